"""Grad-CAM heat maps (mriqa_node.ml.explain) and PNG rendering for the console (imaging)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mriqa_node.imaging import heatmap_png, montage_png, thumbnail_png
from mriqa_node.ml.artifact import TASK_CLASSES, ArtifactError, ArtifactMeta, save_artifact
from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION, preprocess
from tests.conftest import TINY_WIDTHS

SIZE = INPUT_SIZE
HALF = SIZE // 2


def _save(model, directory: Path) -> Path:
    meta = ArtifactMeta(
        name=model.name,
        version="0.0.0+test",
        task="binary",
        class_names=TASK_CLASSES["binary"],
        input_size=SIZE,
        preprocessing_version=PREPROCESSING_VERSION,
        sha256="",
    )
    save_artifact(model, directory, meta)
    return directory


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="module")
def mapper(model_dir: Path):
    from mriqa_node.ml.explain import HeatMapper

    return HeatMapper(model_dir)


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    from mriqa_node.phantom import synth_series

    return np.concatenate([preprocess(ds) for ds in synth_series(2, motion=0.7, seed=3)])


# --- HeatMapper -----------------------------------------------------------------------------


def test_heat_maps_shape_range_and_batch_independence(mapper, slices: np.ndarray) -> None:
    maps = mapper.heat_maps(slices)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps.max(axis=(1, 2)), 1.0)  # normalised per image
    for i in range(2):  # batch statistics must not leak between slices
        np.testing.assert_allclose(mapper.heat_maps(slices[i : i + 1])[0], maps[i], atol=1e-4)


def test_zero_map_stays_zero_and_empty_batch(mapper) -> None:
    # The untrained ConvNet has zero biases and identity batch norm: a black slice gives
    # all-zero features, so the map is 0 / 0 before normalisation.
    maps = mapper.heat_maps(np.zeros((1, SIZE, SIZE, 1), np.float32))
    assert np.isfinite(maps).all() and not maps.any()
    assert mapper.heat_maps(np.zeros((0, SIZE, SIZE, 1), np.float32)).shape == (0, SIZE, SIZE)


def test_sha256_and_feature_layer(mapper, model_dir: Path) -> None:
    from mriqa_node.ml.artifact import read_meta

    assert mapper.sha256 == read_meta(model_dir).sha256
    assert mapper.layer_name == "bn4"  # the last spatial map, after conv4 -> relu4 -> bn4


def test_works_for_resnet_and_refuses_models_without_convolutions(tmp_path: Path) -> None:
    import keras

    from mriqa_node.ml.explain import HeatMapper, feature_layer
    from training.models import resnet10

    keras.utils.set_random_seed(0)
    mapper = HeatMapper(_save(resnet10(SIZE, width=4), tmp_path / "resnet"))
    assert mapper.layer_name == "stage4_out"  # after the residual add, not the last Conv2D
    maps = mapper.heat_maps(np.random.default_rng(0).random((1, SIZE, SIZE, 1), np.float32))
    assert maps.shape == (1, SIZE, SIZE) and np.isfinite(maps).all()

    inputs = keras.Input((SIZE, SIZE, 1))
    dense = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ArtifactError, match="no Conv2D"):
        feature_layer(dense)


def _patch_images(rng: np.random.Generator, quadrants: np.ndarray, patch: int = 160) -> np.ndarray:
    """Flat noisy slices; where quadrant >= 0, a square of strong noise (the "artefact")
    somewhere inside that quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    x = 0.3 + 0.05 * rng.standard_normal((len(quadrants), SIZE, SIZE, 1))
    for i, q in enumerate(quadrants):
        if q >= 0:
            top, left = rng.integers(8, HALF - patch - 8, 2) + HALF * np.array(divmod(q, 2))
            x[i, top : top + patch, left : left + patch, 0] = rng.random((patch, patch))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def test_grad_cam_follows_the_artefact(tmp_path: Path) -> None:
    """A tiny ConvNet trained (a few seconds) to call slices with a noise patch anywhere
    non-diagnostic must put most of the heat in the patch's quadrant, whichever it is."""
    import keras

    from mriqa_node.ml.architectures import convnet
    from mriqa_node.ml.explain import HeatMapper

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    model = convnet(SIZE, 2, TINY_WIDTHS)
    for layer in model.layers:  # short run: let the moving statistics keep up
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    labels = rng.integers(0, 2, 128)  # class 0 = non-diagnostic = with a patch
    quadrants = np.where(labels == 0, rng.integers(0, 4, 128), -1)
    model.fit(_patch_images(rng, quadrants), labels, batch_size=16, epochs=2, verbose=0)

    mapper = HeatMapper(_save(model, tmp_path / "toy"))
    test_quadrants = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    images = _patch_images(rng, test_quadrants)
    p_non_diagnostic = keras.ops.softmax(model(images)).numpy()[:, 0]
    assert (p_non_diagnostic > 0.9).all(), "the toy model did not learn the task"

    maps = mapper.heat_maps(images).astype(np.float64)
    per_quadrant = maps.reshape(-1, 2, HALF, 2, HALF).sum(axis=(2, 4)).reshape(-1, 4)
    share = per_quadrant[np.arange(len(maps)), test_quadrants] / per_quadrant.sum(axis=1)
    assert (share > 0.6).all(), f"heat share in the artefact's quadrant {share} (chance 0.25)"


# --- imaging --------------------------------------------------------------------------------


def test_imaging_does_not_import_tensorflow() -> None:
    code = "import sys, mriqa_node.imaging; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (SIZE, SIZE, 1), (40, 40)])
def test_thumbnail_png_size_mode_and_order(shape: tuple[int, ...]) -> None:
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, shape[1], dtype=np.float32), shape[:2])
    image = _decode(thumbnail_png(ramp.reshape(shape), 96))
    assert image.size == (96, 96) and image.mode == "L"
    row = np.asarray(image)[48].astype(int)
    assert (np.diff(row) >= 0).all() and row[-1] - row[0] > 200  # still a left-to-right ramp


def test_heatmap_png_alpha_follows_heat() -> None:
    heat = np.zeros((SIZE, SIZE), np.float32)
    heat[:, HALF:] = np.linspace(0.2, 1.0, HALF, dtype=np.float32)  # right half: rising heat
    image = _decode(heatmap_png(heat, 128, alpha_max=0.6))
    assert image.size == (128, 128) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3].astype(int)
    assert not alpha[:, :60].any()  # no heat: fully transparent
    assert (np.diff(alpha[64, 68:]) >= 0).all() and alpha[64, 70] < alpha[64, 127]
    assert 140 <= alpha.max() <= round(255 * 0.6)  # opacity capped at alpha_max


def test_montage_png_dimensions_and_overlay() -> None:
    tiles = [np.full((SIZE, SIZE), v, np.float32) for v in (0.2, 0.4, 0.6, 0.8, 1.0)]
    plain = _decode(montage_png(tiles, None, columns=3, tile=64))
    assert plain.mode == "RGB" and plain.size == (3 * 64, 2 * 64)
    pixels = np.asarray(plain).astype(int)
    assert pixels[32, 32].tolist() == [51, 51, 51]  # first tile, grey
    assert not pixels[96:, 128:].any()  # the sixth cell is empty

    heats = [np.zeros((SIZE, SIZE), np.float32) for _ in tiles]
    heats[1][:] = 1.0
    hot = np.asarray(_decode(montage_png(tiles, heats, columns=3, tile=64))).astype(int)
    assert (hot[:, :64] == pixels[:, :64]).all()  # zero heat leaves the slice as it was
    r, g, b = hot[32, 96]
    assert not r == g == b  # full heat tints the second tile
    assert _decode(montage_png(tiles[:2], None, columns=4, tile=32)).size == (64, 32)
