"""Tests for mriqa_node.preprocess: synthetic datasets with known answers, pydicom-data files, and
the real multi-vendor files in ../shared/data/intake (skipped with a reason when absent)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from mriqa_node.preprocess import (
    INPUT_SIZE,
    MIN_STRUCTURE,
    PREPROCESSING_VERSION,
    Unscorable,
    frame_count,
    preprocess,
    preprocess_frames,
    slice_positions,
    structure,
)

INTAKE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "intake"
MANIFEST = INTAKE / "MANIFEST.csv"
NO_INTAKE = f"real test data not found: {INTAKE} (../shared/data/intake) is absent"
needs_intake = pytest.mark.skipif(not MANIFEST.is_file(), reason=NO_INTAKE)

IMAGE_SOPS = {"MR Image Storage", "Enhanced MR Image Storage"}
COLOUR_SOPS = {"Enhanced MR Color Image Storage"}
NON_IMAGE_SOPS = {"Enhanced SR Storage", "Raw Data Storage"}


# --- helpers --------------------------------------------------------------------------------


def make_ds(pixels: np.ndarray, **tags: Any) -> Dataset:
    """A minimal MR Image Storage dataset (Explicit VR LE) holding `pixels`.

    2-D -> single frame, 3-D -> multi-frame (NumberOfFrames). uint16 or int16 (signed) pixels.
    Extra keyword arguments are set as DICOM attributes (e.g. WindowCenter=..., RescaleSlope=...).
    """
    pixels = np.asarray(pixels)
    assert pixels.dtype in (np.uint16, np.int16), pixels.dtype
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def make_rgb_ds(rows: int = 32, cols: int = 32) -> Dataset:
    ds = make_ds(np.zeros((rows, cols), np.uint16))
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = np.full((rows, cols, 3), 128, np.uint8).tobytes()
    return ds


def _item(**tags: Any) -> Dataset:
    item = Dataset()
    for keyword, value in tags.items():
        setattr(item, keyword, value)
    return item


def make_enhanced(
    frames: np.ndarray,
    per_frame: list[dict[str, Any]],
    shared: dict[str, Any] | None = None,
) -> Dataset:
    """Enhanced MR dataset; per_frame[i] / shared may hold slope, intercept, center, width,
    ipp (ImagePositionPatient), iop (ImageOrientationPatient) and pe
    (InPlanePhaseEncodingDirection) for the functional groups."""

    def group(spec: dict[str, Any]) -> Dataset:
        g = Dataset()
        if "slope" in spec or "intercept" in spec:
            g.PixelValueTransformationSequence = [
                _item(RescaleSlope=spec.get("slope", 1), RescaleIntercept=spec.get("intercept", 0))
            ]
        if "center" in spec:
            g.FrameVOILUTSequence = [_item(WindowCenter=spec["center"], WindowWidth=spec["width"])]
        if "ipp" in spec:
            g.PlanePositionSequence = [_item(ImagePositionPatient=spec["ipp"])]
        if "iop" in spec:
            g.PlaneOrientationSequence = [_item(ImageOrientationPatient=spec["iop"])]
        if "pe" in spec:
            g.MRFOVGeometrySequence = [_item(InPlanePhaseEncodingDirection=spec["pe"])]
        return g

    ds = make_ds(frames)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.PerFrameFunctionalGroupsSequence = [group(spec) for spec in per_frame]
    if shared is not None:
        ds.SharedFunctionalGroupsSequence = [group(shared)]
    return ds


def linear_window(x: np.ndarray | float, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function with output range [0, 1] (reference)."""
    x = np.asarray(x, dtype=np.float64)
    return np.clip((x - (center - 0.5 - (width - 1) / 2)) / (width - 1), 0.0, 1.0)


def check_output(out: np.ndarray, n_frames: int) -> None:
    assert out.shape == (n_frames, INPUT_SIZE, INPUT_SIZE, 1)
    assert out.dtype == np.float32
    assert not np.isnan(out).any()
    assert out.min() >= 0.0 and out.max() <= 1.0


def pydicom_testfile(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom-data file {name} is not available")
    return pydicom.dcmread(path)


def _manifest_rows() -> list[dict[str, str]]:
    if not MANIFEST.is_file():
        return []
    with MANIFEST.open(newline="") as f:
        return list(csv.DictReader(f))


ROWS = _manifest_rows()
ROW_PARAMS = [pytest.param(r, id=r["path"][:90]) for r in ROWS] or [
    pytest.param(None, id="no-intake", marks=pytest.mark.skip(reason=NO_INTAKE))
]


# --- constants and small helpers ------------------------------------------------------------


def test_public_constants() -> None:
    assert INPUT_SIZE == 512
    assert isinstance(PREPROCESSING_VERSION, str) and PREPROCESSING_VERSION
    assert issubclass(Unscorable, ValueError)


def test_frame_count() -> None:
    assert frame_count(make_ds(np.zeros((16, 16), np.uint16))) == 1
    assert frame_count(make_ds(np.zeros((3, 16, 16), np.uint16))) == 3
    ds = make_ds(np.zeros((16, 16), np.uint16))
    ds.NumberOfFrames = "0"
    assert frame_count(ds) == 1


# --- intensity: window, rescale, percentile, MONOCHROME1 ------------------------------------


def test_header_window_is_applied() -> None:
    center, width = 1000.0, 1001.0  # linear range [499.5, 1499.5]
    values = np.array([0, 400, 499, 750, 1000, 1250, 1500, 1600, 4000], np.uint16)
    pixels = np.resize(values, (512, 512))  # 512x512: no resampling blurs the values
    out = preprocess(make_ds(pixels, WindowCenter=center, WindowWidth=width))
    check_output(out, 1)
    got = out[0, :, :, 0]
    np.testing.assert_allclose(got, linear_window(pixels, center, width), atol=1e-5)
    np.testing.assert_allclose(got[pixels == 1000], 0.5, atol=1e-3)  # centre -> middle grey
    np.testing.assert_allclose(got[pixels == 750], 0.25, atol=1e-3)
    assert np.all(got[pixels <= 499] == 0.0)  # below the window -> black
    assert np.all(got[pixels >= 1500] == 1.0)  # above the window -> white


def test_multi_valued_window_uses_the_first() -> None:
    pixels = (np.arange(512 * 512) % 3000).astype(np.uint16).reshape(512, 512)
    first = preprocess(make_ds(pixels, WindowCenter=1500, WindowWidth=2001))
    multi = preprocess(make_ds(pixels, WindowCenter=[1500, 200], WindowWidth=[2001, 50]))
    np.testing.assert_array_equal(first, multi)
    expected = linear_window(pixels, 1500, 2001)
    np.testing.assert_allclose(multi[0, :, :, 0], expected, atol=1e-5)


def test_rescale_is_applied_before_the_window() -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(600, 2000, (512, 512), dtype=np.uint16)
    real = (stored.astype(np.int32) * 2 - 1000).astype(np.uint16)  # 200 .. 3000
    window = {"WindowCenter": 1600, "WindowWidth": 2000}
    rescaled = preprocess(make_ds(stored, RescaleSlope=2, RescaleIntercept=-1000, **window))
    direct = preprocess(make_ds(real, **window))
    np.testing.assert_allclose(rescaled, direct, atol=1e-6)
    # Without the rescale the same window would give a clearly different image.
    ignored = preprocess(make_ds(stored, **window))
    assert np.abs(ignored - direct).mean() > 0.1


def test_percentile_window_without_window_tags() -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(100, 200, (512, 512), dtype=np.uint16)
    pixels[:10, :10] = 60000  # 0.04 % hot pixels must not squash the image
    out = preprocess(make_ds(pixels))[0, :, :, 0]
    lo, hi = np.percentile(pixels.astype(np.float64), [0.5, 99.5])
    expected = np.clip((pixels - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.all(out[:10, :10] == 1.0)
    body = out[10:, 10:]
    assert body.max() == 1.0 and body.min() == 0.0 and 0.3 < body.mean() < 0.7


@pytest.mark.parametrize("width", [0, 0.5])
def test_window_width_below_one_falls_back_to_percentiles(width: float) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, (64, 64), dtype=np.uint16)
    percentile = preprocess(make_ds(pixels))
    np.testing.assert_array_equal(
        preprocess(make_ds(pixels, WindowCenter=2048, WindowWidth=width)), percentile
    )


@pytest.mark.parametrize(("slope", "intercept"), [(0.5, 100.0), (-2.0, 5000.0)])
def test_percentile_window_on_signed_pixels_with_rescale(slope: float, intercept: float) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(-2048, 2047, (512, 512), dtype=np.int16)
    ds = make_ds(pixels, RescaleSlope=slope, RescaleIntercept=intercept)
    out = preprocess(ds)[0, :, :, 0]
    real = pixels.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(real, [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((real - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mostly_background_frame_uses_full_range() -> None:
    pixels = np.zeros((512, 512), np.uint16)
    pixels[100:110, 100:110] = 800  # 0.04 % of pixels: both percentiles are 0
    out = preprocess(make_ds(pixels))[0, :, :, 0]
    assert np.all(out[100:110, 100:110] == 1.0)
    assert out.sum() == 100.0


@pytest.mark.parametrize("value", [0, 1234])
def test_constant_frame_gives_zeros_not_an_error(value: int) -> None:
    out = preprocess(make_ds(np.full((64, 64), value, np.uint16)))
    check_output(out, 1)
    assert not out.any()


@pytest.mark.parametrize("shape", [(512, 512), (64, 64), (100, 60)])
def test_monochrome1_is_inverted(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 4096, shape, dtype=np.uint16)
    for window in ({}, {"WindowCenter": 2000, "WindowWidth": 3000}):
        mono2 = preprocess(make_ds(pixels, **window))
        mono1 = preprocess(make_ds(pixels, PhotometricInterpretation="MONOCHROME1", **window))
        assert np.abs(mono2 - 0.5).mean() > 0.1  # not a degenerate all-grey image
        if shape[0] == shape[1]:
            np.testing.assert_allclose(mono1 + mono2, 1.0, atol=1e-5)
        else:  # 100x60: image in columns ~102..410; the padding stays 0 (black) in both
            np.testing.assert_allclose((mono1 + mono2)[0, :, 110:400], 1.0, atol=1e-5)
            assert mono1[0, :, :95].max() == 0.0 and mono2[0, :, :95].max() == 0.0
            assert mono1[0, :, 420:].max() == 0.0 and mono2[0, :, 420:].max() == 0.0


def test_float_pixel_data_matches_integer_pixels() -> None:
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 4096, (64, 64), dtype=np.uint16)
    ds = make_ds(pixels)
    del ds.PixelData, ds.PixelRepresentation, ds.BitsStored, ds.HighBit
    ds.BitsAllocated = 32
    ds.FloatPixelData = pixels.astype("<f4").tobytes()
    np.testing.assert_allclose(preprocess(ds), preprocess(make_ds(pixels)), atol=1e-5)


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(256, 128), (128, 256)])
def test_non_square_is_padded_centred_then_resized(rows: int, cols: int) -> None:
    pixels = np.full((rows, cols), 1000, np.uint16)  # window maps every pixel to 1
    out = preprocess(make_ds(pixels, WindowCenter=100, WindowWidth=100))[0, :, :, 0]
    check_output(out[None, :, :, None], 1)
    img = out if rows > cols else out.T  # columns padded; for wide images rows are
    # 256x128 -> 64 zero columns each side of 256x256 -> x2 -> 128 each side of 512.
    assert img[:, :126].max() == 0.0
    assert img[:, 386:].max() == 0.0
    assert img[:, 130:382].min() == 1.0
    np.testing.assert_allclose(img, img[:, ::-1], atol=1e-6)  # centred


@pytest.mark.parametrize("pixels_512", [False, True])
def test_phase_encoding_along_rows_is_turned_to_the_columns(pixels_512: bool) -> None:
    """Ghosts lie along the phase-encoding axis: the model always gets it vertical."""
    rng = np.random.default_rng(3)
    side = 512 if pixels_512 else 96
    pixels = rng.integers(0, 4096, (side, side // 2), dtype=np.uint16)
    window = {"WindowCenter": 2048, "WindowWidth": 4097}
    col = preprocess(make_ds(pixels, InPlanePhaseEncodingDirection="COL", **window))
    row = preprocess(make_ds(pixels, InPlanePhaseEncodingDirection="ROW", **window))
    unknown = preprocess(make_ds(pixels, **window))
    np.testing.assert_array_equal(unknown, col)  # unknown counts as COL
    np.testing.assert_array_equal(row[0, :, :, 0], col[0, :, :, 0].T)
    assert not np.array_equal(row, col)


def test_version_1_does_not_turn_and_unknown_versions_are_refused() -> None:
    """A model trained before the turn (a site's own, say) keeps getting what it learnt on."""
    pixels = np.random.default_rng(5).integers(0, 4096, (64, 32), dtype=np.uint16)
    row = make_ds(pixels, InPlanePhaseEncodingDirection="ROW")
    np.testing.assert_array_equal(preprocess(row, version="1"), preprocess(make_ds(pixels)))
    assert not np.array_equal(preprocess(row, version="1"), preprocess(row))
    with pytest.raises(ValueError, match="preprocessing v0"):
        preprocess(row, version="0")


def test_worker_prepares_frames_for_the_models_preprocessing_version() -> None:
    from io import BytesIO

    from mriqa_node.services.scoring import Claim
    from mriqa_node.worker import prepare_data

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.InPlanePhaseEncodingDirection = "ROW"
    buf = BytesIO()
    ds.save_as(buf)
    claim = Claim(instance_id=1, series_id=1, sop_instance_uid=ds.SOPInstanceUID, spool_path="x")
    v1, v2 = (prepare_data(claim, buf.getvalue(), 64, v) for v in ("1", "2"))
    np.testing.assert_array_equal(v2.frames[0, ..., 0], v1.frames[0, ..., 0].T)


def test_enhanced_phase_encoding_is_read_per_frame() -> None:
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 1000, (3, 48, 48), dtype=np.uint16)
    ds = make_enhanced(frames, per_frame=[{"pe": "ROW"}, {"pe": "COL"}, {}],
                       shared={"pe": "ROW"})  # fmt: skip
    out = preprocess(ds)
    for i, turned in enumerate([True, False, True]):  # the third frame: the shared group's ROW
        single = preprocess(make_ds(frames[i].T if turned else frames[i]))[0]
        np.testing.assert_allclose(out[i], single, atol=1e-6, err_msg=f"frame {i}")


def test_small_image_is_upscaled_smoothly() -> None:
    pixels = np.zeros((64, 64), np.uint16)
    pixels[:, 32:] = 1000
    out = preprocess(make_ds(pixels))[0, :, :, 0]
    assert out[:, :252].max() == 0.0 and out[:, 260:].min() == 1.0
    edge = out[0, 252:260]  # x8 bilinear: a ramp across the edge, not a nearest-neighbour step
    assert np.all(np.diff(edge) > 0) and edge.min() > 0 and edge.max() < 1


def test_512_input_is_not_resampled() -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, (512, 512), dtype=np.uint16)
    out = preprocess(make_ds(pixels, WindowCenter=2048, WindowWidth=4097))[0, :, :, 0]
    np.testing.assert_allclose(out, linear_window(pixels, 2048, 4097), atol=1e-6)


def test_other_output_size() -> None:
    out = preprocess(make_ds(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)), size=128)
    assert out.shape == (1, 128, 128, 1) and out.dtype == np.float32


# --- unscorable inputs ------------------------------------------------------------------------


def test_no_pixel_data_is_unscorable() -> None:
    ds = make_ds(np.zeros((16, 16), np.uint16))
    del ds.PixelData
    with pytest.raises(Unscorable, match="pixel"):
        preprocess(ds)


def test_rgb_is_unscorable() -> None:
    with pytest.raises(Unscorable, match=r"colour image \(RGB\)"):
        preprocess(make_rgb_ds())
    with pytest.raises(Unscorable, match=r"colour image \(RGB\)"):
        preprocess(pydicom_testfile("SC_rgb.dcm"))


def test_tiny_image_is_unscorable() -> None:
    with pytest.raises(Unscorable, match="too small"):
        preprocess(make_ds(np.ones((4, 4), np.uint16)))


def test_truncated_native_pixel_data_is_unscorable() -> None:
    ds = make_ds(np.ones((64, 64), np.uint16))
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(Unscorable, match=r"truncated pixel data \(8092 of 8192 bytes\)"):
        preprocess(ds)
    with pytest.raises(Unscorable, match="truncated pixel data"):
        preprocess(pydicom_testfile("MR_truncated.dcm"))


def test_undecodable_compressed_pixel_data_names_the_transfer_syntax() -> None:
    ds = pydicom_testfile("MR_small_jp2klossless.dcm")
    fragment = next(generate_fragmented_frames(ds.PixelData))[0]
    ds.PixelData = encapsulate([fragment[: len(fragment) // 2]])
    with pytest.raises(Unscorable, match="cannot decode JPEG 2000 Image Compression") as info:
        preprocess(ds)
    assert "\n" not in str(info.value)


def test_a_header_claiming_gigabytes_is_refused_before_decoding() -> None:
    """A damaged header with huge Rows x Columns could make a decoder allocate gigabytes
    before it finds the data short (a long fuzz run peaked at 1.3 GiB in one worker)."""
    ds = pydicom_testfile("MR_small_jp2klossless.dcm")
    ds.Rows, ds.Columns = 30000, 30000
    with pytest.raises(Unscorable, match="too large to decode"):
        preprocess(ds)


def test_truncated_file_from_pydicom_data() -> None:
    path = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    if path is None:
        pytest.skip("pydicom-data file emri_small_jpeg_2k_lossless_too_short.dcm unavailable")
    _check_truncated_file(path)


def _check_truncated_file(path: str | Path) -> None:
    """pydicom warns and returns an empty dataset for this truncated file; preprocess says so."""
    with pytest.warns(UserWarning, match="End of file reached"):
        ds = pydicom.dcmread(path)
    with pytest.raises(Unscorable, match=r"no pixel data .*truncated"):
        preprocess(ds)


# --- transfer syntaxes and multi-frame (pydicom-data) ---------------------------------------


def test_transfer_syntaxes_agree_pydicom_data() -> None:
    names = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ]
    reference = preprocess(pydicom_testfile(names[0]))
    check_output(reference, 1)
    assert reference.std() > 0.05
    for name in names[1:]:
        np.testing.assert_allclose(
            preprocess(pydicom_testfile(name)), reference, atol=1e-5, err_msg=name
        )


def test_multi_frame_pydicom_data() -> None:
    ds = pydicom_testfile("emri_small.dcm")
    out = preprocess(ds)
    check_output(out, 10)
    assert frame_count(ds) == 10
    assert len(slice_positions(ds)) == 10  # no functional groups in this file: all unknown
    assert slice_positions(ds) == [None] * 10
    # Each frame is split out and windowed on its own, like a single-frame image of it.
    raw = ds.pixel_array
    for i in range(10):
        single = preprocess(make_ds(raw[i].astype(np.uint16)))
        np.testing.assert_allclose(out[i], single[0], atol=1e-6, err_msg=f"frame {i}")
    assert len({round(float(out[i].mean()), 4) for i in range(10)}) > 5  # frames differ


def test_enhanced_per_frame_rescale_and_window() -> None:
    rng = np.random.default_rng(8)
    frame = rng.integers(0, 1000, (64, 64), dtype=np.uint16)
    frames = np.stack([frame] * 4)
    ds = make_enhanced(
        frames,
        per_frame=[
            {"slope": 1, "intercept": 0},
            {"slope": 2, "intercept": -500},
            {"slope": 1, "intercept": 0, "center": 300, "width": 201},
            {},  # nothing per frame: shared group applies
        ],
        shared={"center": 500, "width": 1001, "slope": 3, "intercept": 0},
    )
    out = preprocess(ds)
    check_output(out, 4)
    expected = [
        make_ds(frame, WindowCenter=500, WindowWidth=1001),
        make_ds(frame, RescaleSlope=2, RescaleIntercept=-500, WindowCenter=500, WindowWidth=1001),
        make_ds(frame, WindowCenter=300, WindowWidth=201),
        make_ds(frame, RescaleSlope=3, WindowCenter=500, WindowWidth=1001),
    ]
    for i, single in enumerate(expected):
        np.testing.assert_allclose(out[i], preprocess(single)[0], atol=1e-6, err_msg=f"frame {i}")
    assert len({round(float(out[i].mean()), 3) for i in range(4)}) == 4  # four distinct results


def test_enhanced_falls_back_to_top_level_and_percentiles() -> None:
    rng = np.random.default_rng(9)
    frames = rng.integers(0, 1000, (2, 32, 32), dtype=np.uint16)
    ds = make_enhanced(frames, per_frame=[{}, {}])
    percentile = preprocess(ds)
    for i in range(2):
        np.testing.assert_allclose(percentile[i], preprocess(make_ds(frames[i]))[0], atol=1e-6)
    ds.WindowCenter, ds.WindowWidth = 200, 101
    top = preprocess(ds)
    for i in range(2):
        single = make_ds(frames[i], WindowCenter=200, WindowWidth=101)
        np.testing.assert_allclose(top[i], preprocess(single)[0], atol=1e-6)


def test_enhanced_slice_positions() -> None:
    frames = np.zeros((3, 16, 16), np.uint16)
    axial = [1, 0, 0, 0, 1, 0]  # normal +z
    ds = make_enhanced(
        frames,
        per_frame=[{"ipp": [5, 5, z]} for z in (10.0, 12.5, 15.0)],
        shared={"iop": axial},
    )
    assert slice_positions(ds) == pytest.approx([10.0, 12.5, 15.0])
    sagittal = [0, 1, 0, 0, 0, -1]  # row x col = (-1, 0, 0)
    ds = make_enhanced(
        frames,
        per_frame=[{"ipp": [x, 3, 4], "iop": sagittal} for x in (-2.0, 0.0, 2.0)],
    )
    assert slice_positions(ds) == pytest.approx([2.0, 0.0, -2.0])
    ds = make_enhanced(frames, per_frame=[{"ipp": [0, 0, 1]}, {}, {"ipp": [0, 0, 3]}])
    assert slice_positions(ds) == [None, None, None]  # no orientation anywhere
    ds.ImageOrientationPatient = axial
    first, middle, last = slice_positions(ds)
    assert (first, middle, last) == (pytest.approx(1.0), None, pytest.approx(3.0))


def test_classic_slice_position() -> None:
    ds = make_ds(np.zeros((16, 16), np.uint16))
    assert slice_positions(ds) == [None]
    ds.ImagePositionPatient = [-10, 20, 42.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal: normal (0, 1, 0)
    assert slice_positions(ds) == pytest.approx([20.0])
    # For a multi-frame object the top-level position describes frame 0 only: unknown.
    multi = make_ds(np.zeros((2, 16, 16), np.uint16))
    multi.ImagePositionPatient = [0, 0, 0]
    multi.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert slice_positions(multi) == [None, None]


# --- the real intake files --------------------------------------------------------------------


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_intake_file(row: dict[str, str]) -> None:
    path = INTAKE / row["path"]
    note, sop = row["note"], row["sop"]
    if "truncated" in note:
        _check_truncated_file(path)
        return
    ds = pydicom.dcmread(path)
    if sop in IMAGE_SOPS:
        out = preprocess(ds)  # must not raise: RLE, JPEG-LL, JPEG-LS and J2K all decode
        n = int(row["frames"] or 1)
        assert frame_count(ds) == n
        check_output(out, n)
        assert len(slice_positions(ds)) == n
        assert all(out[i].max() > out[i].min() for i in range(n)), "a frame came out flat"
    elif sop in COLOUR_SOPS:
        with pytest.raises(Unscorable, match=r"colour image \(RGB\)"):
            preprocess(ds)
    elif sop in NON_IMAGE_SOPS:
        with pytest.raises(Unscorable, match=rf"no pixel data \({sop}\)"):
            preprocess(ds)
    else:
        pytest.fail(f"manifest SOP class {sop!r} is not classified by this test")


@needs_intake
def test_intake_transfer_syntaxes_agree() -> None:
    """siemens_trio_ts/1..9.dcm: one image in 9 lossless encodings -> equal outputs."""
    datasets = [pydicom.dcmread(INTAKE / f"siemens_trio_ts/{i}.dcm") for i in range(1, 10)]
    # 7 distinct UIDs: JPEG lossless and JPEG-LS lossless appear twice each (different encoders)
    assert len({ds.file_meta.TransferSyntaxUID for ds in datasets}) == 7
    outputs = [preprocess(ds) for ds in datasets]
    assert outputs[0].std() > 0.05
    for i, out in enumerate(outputs[1:], start=2):
        np.testing.assert_allclose(out, outputs[0], atol=1e-5, err_msg=f"{i}.dcm")


@needs_intake
def test_intake_lossy_j2k_is_close_to_uncompressed() -> None:
    folder = INTAKE / "pydicom_mr2_philips_shoulder"
    raw, lossless, lossy = (
        preprocess(pydicom.dcmread(folder / f"MR2_{k}.dcm")) for k in ("UNCR", "J2KR", "J2KI")
    )
    np.testing.assert_allclose(lossless, raw, atol=1e-5)
    diff = np.abs(lossy - raw)
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.1


@needs_intake
def test_intake_enhanced_stack_positions() -> None:
    path = next((INTAKE / "siemens_xa30_enh_t1").glob("*.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    positions = slice_positions(ds)
    assert len(positions) == frame_count(ds) == 96
    assert None not in positions
    steps = np.diff(np.asarray(positions, dtype=float))
    assert len(set(positions)) == 96
    assert np.all(steps < 0) or np.all(steps > 0)  # one monotonic stack
    np.testing.assert_allclose(np.abs(steps), np.abs(steps[0]), atol=1e-3)


@needs_intake
def test_intake_enhanced_matches_classic_export() -> None:
    """Philips exported one pCASL acquisition both as 40 classic files and one 40-frame enhanced
    file: the per-frame functional-group path must give what the top-level path gives."""
    enhanced = pydicom.dcmread(next((INTAKE / "philips_elition_enh_pcasl").glob("*.dcm")))
    frames = preprocess(enhanced)
    by_position = {round(p, 2): i for i, p in enumerate(slice_positions(enhanced))}
    assert len(by_position) == 40
    matched = 0
    for path in sorted((INTAKE / "philips_elition_classic_pcasl").glob("*.dcm")):
        classic = pydicom.dcmread(path)
        (position,) = slice_positions(classic)
        i = by_position[round(position, 2)]
        np.testing.assert_allclose(preprocess(classic)[0], frames[i], atol=1e-5, err_msg=path.name)
        matched += 1
    assert matched == 40


@needs_intake
def test_intake_philips_mixed_rescale_is_per_frame() -> None:
    """The Philips field map mixes magnitude and phase frames with different rescales; each
    frame must equal a single-frame dataset built with that frame's own rescale and window."""
    path = next((INTAKE / "philips_elition_enh_fmap_mixed").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    out = preprocess(ds)
    raw = ds.pixel_array
    groups = ds.PerFrameFunctionalGroupsSequence
    slopes = {float(g.PixelValueTransformationSequence[0].RescaleSlope) for g in groups}
    assert len(slopes) > 1
    checked = set()
    for i, g in enumerate(groups):
        pv, voi = g.PixelValueTransformationSequence[0], g.FrameVOILUTSequence[0]
        key = float(pv.RescaleSlope)
        if key in checked:
            continue
        checked.add(key)
        single = make_ds(
            raw[i].astype(np.uint16),
            RescaleSlope=pv.RescaleSlope,
            RescaleIntercept=pv.RescaleIntercept,
            WindowCenter=voi.WindowCenter,
            WindowWidth=voi.WindowWidth,
        )
        np.testing.assert_allclose(out[i], preprocess(single)[0], atol=1e-5, err_msg=f"frame {i}")
    assert checked == slopes


@needs_intake
def test_intake_manifest_covers_the_expected_kinds() -> None:
    """Guards the parametrized test above against a manifest that silently lost its hard cases."""
    ts = {r["ts"] for r in ROWS if r["sop"] in IMAGE_SOPS}
    for name in (
        "RLE Lossless",
        "JPEG-LS Lossless Image Compression",
        "JPEG 2000 Image Compression",
    ):
        assert name in ts
    assert any(t.startswith("JPEG Lossless") for t in ts)
    assert {r["sop"] for r in ROWS} >= IMAGE_SOPS | COLOUR_SOPS | NON_IMAGE_SOPS
    assert any("truncated" in r["note"] for r in ROWS)


def test_dataset_is_left_unchanged() -> None:
    """preprocess leaves the dataset as it was (no cached pixel array, no changed tags)."""
    ds = make_ds(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), WindowCenter=100)
    ds.WindowWidth = 50
    before = copy.deepcopy(ds)
    preprocess(ds)
    assert ds == before
    assert getattr(ds, "_pixel_array", None) is None


# --- frames without anatomy ---------------------------------------------------------------------


def _magnitude_noise(shape: tuple[int, ...], sd: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hypot(rng.normal(0, sd, shape), rng.normal(0, sd, shape))


def _disc(size: int = 128) -> np.ndarray:
    """A bright smooth object on a dark background, with a little noise: an 'anatomy'."""
    y, x = np.mgrid[:size, :size] - size / 2
    obj = 900.0 * (np.hypot(y, x) < size / 3) * (1 + 0.2 * np.sin(x / 5))
    return obj + _magnitude_noise((size, size), 20, seed=1)


def test_structure_tells_noise_from_an_object() -> None:
    assert structure(_magnitude_noise((128, 128), 50)) < 0.2
    assert structure(_disc()) > 0.9
    assert structure(np.full((64, 64), 7.0)) == 0.0


def test_frames_without_anatomy_are_left_out_per_frame() -> None:
    frames = np.stack([_disc(), _magnitude_noise((128, 128), 50), np.zeros((128, 128))])
    out = preprocess_frames(make_ds(frames.astype(np.uint16)))
    assert out.images.shape == (3, INPUT_SIZE, INPUT_SIZE, 1)
    assert out.anatomy.tolist() == [0]
    assert np.array_equal(out.images, preprocess(make_ds(frames.astype(np.uint16))))


def test_noise_stays_noise_after_an_upscale() -> None:
    """Measured on the stored grid: bilinear upsampling to 512 would smooth noise into
    something that correlates."""
    small = _magnitude_noise((64, 64), 50).astype(np.uint16)
    assert preprocess_frames(make_ds(small)).structure[0] < MIN_STRUCTURE


@needs_intake
def test_the_air_slices_of_a_real_sagittal_series_are_not_assessed() -> None:
    """The Prisma HFDL series ends in nine slices of pure noise beyond the head."""
    folder = INTAKE.parent / "anatomy" / "siemens_prismafit_brain_t1_fl2d_sag_hfdl"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    datasets = sorted((pydicom.dcmread(p) for p in folder.rglob("*.dcm")),
                      key=lambda ds: int(ds.InstanceNumber))  # fmt: skip
    shows = [len(preprocess_frames(ds).anatomy) for ds in datasets]
    assert shows[:26] == [1] * 26 and shows[26:] == [0] * 9
