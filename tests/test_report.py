"""The training package's evaluation report: metrics, the paper's figures 3-7, run report, summary.

No training: tiny untrained Keras models on 32x32 inputs and fake run directories whose
predictions are correlated with a known synthetic truth.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
keras = pytest.importorskip("keras")

from PIL import Image  # noqa: E402
from sklearn.metrics import cohen_kappa_score, roc_auc_score  # noqa: E402

from training import evaluate, figures, report  # noqa: E402
from training.evaluate import metrics, to_task_labels  # noqa: E402
from training.files import to_jsonable  # noqa: E402
from training.synth import MANIFEST_COLUMNS  # noqa: E402

SIZE = 32
LINK = re.compile(r"\]\(([^)\s]+)\)")


# --------------------------------------------------------------------------- helpers


def phantom(size: int = SIZE) -> np.ndarray:
    """A small MR-like slice: a bright body ellipse with two darker organs."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    img = np.zeros((size, size), np.float32)
    img[(xx / 0.85) ** 2 + (yy / 0.6) ** 2 < 1] = 0.8
    img[((xx + 0.35) / 0.2) ** 2 + (yy / 0.25) ** 2 < 1] = 0.35
    img[((xx - 0.3) / 0.25) ** 2 + ((yy + 0.1) / 0.2) ** 2 < 1] = 0.55
    return img


def ghost_motion(image: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Motion-like ghosting: some phase-encode lines of k-space come from a shifted object."""
    k = np.fft.fft2(image)
    k_moved = np.fft.fft2(np.roll(image, max(1, int(4 * severity)), axis=0))
    lines = rng.random(image.shape[0]) < 0.5 * severity + 0.1
    k[lines] = k_moved[lines]
    return np.clip(np.abs(np.fft.ifft2(k)), 0, 1).astype(np.float32)


def tiny_convnet(num_classes: int) -> keras.Model:
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.Conv2D(4, 5, strides=2, padding="same", name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(layers.ReLU(name="relu1")(x))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(layers.ReLU(name="relu2")(x))
    out = layers.Dense(num_classes, name="logits")(layers.Flatten()(x))
    return keras.Model(inp, out, name="tiny_convnet")


def tiny_resnet(num_classes: int) -> keras.Model:
    """A stem and one residual block whose 1x1 projection is built last (so it is the last
    Conv2D in graph order): the last conv of the last stage is 'b_2_conv', not the projection."""
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.ReLU()(layers.Conv2D(4, 3, strides=2, padding="same", name="stem_conv")(inp))
    y = layers.ReLU()(layers.Conv2D(8, 3, strides=2, padding="same", name="b_1_conv")(x))
    y = layers.Conv2D(8, 3, padding="same", name="b_2_conv")(y)
    s = layers.Conv2D(8, 1, strides=2, padding="same", name="b_proj_conv")(x)
    x = layers.ReLU()(layers.Add()([y, s]))
    out = layers.Dense(num_classes, name="logits")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out, name="tiny_resnet")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def noisy(truth3: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """A rater: the truth, moved to a neighbouring class with probability p."""
    flip = rng.random(truth3.size) < p
    step = rng.choice([-1, 1], truth3.size)
    return np.where(flip, np.clip(truth3 + step, 0, 2), truth3).astype(np.int64)


def make_run(
    root: Path, model: str, task: str, seed: int = 0, truth: bool = True, keras_model: bool = True
) -> Path:
    rng = np.random.default_rng(seed)
    c = 2 if task == "binary" else 3
    run = root / f"{model}_{task}{'' if truth else '_real'}"
    run.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {"rater_names": np.array(["rater1", "rater2"])}
    for split, n in (("val", 60), ("test", 150)):
        truth3 = rng.choice(3, n, p=[0.25, 0.55, 0.2])
        raters = np.stack([noisy(truth3, 0.2, rng), noisy(truth3, 0.3, rng)], axis=1)
        t = to_task_labels(truth3, task)
        logits = 2.5 * np.eye(c)[t] + rng.normal(size=(n, c))
        arrays |= {
            f"{split}_logits": logits.astype(np.float32),
            f"{split}_probs": softmax(logits).astype(np.float32),
            f"{split}_labels": to_task_labels(raters[:, 0], task),
            f"{split}_raters": raters,
            f"{split}_truth3": truth3 if truth else np.full(n, -1),
            f"{split}_patients": np.array([f"P{i // 10:03d}" for i in range(n)]),
            f"{split}_series_uids": np.array([f"1.2.3.{i // 10}" for i in range(n)]),
            f"{split}_sops": np.array([f"1.2.3.{i // 10}.{i}" for i in range(n)]),
            f"{split}_frames": np.zeros(n, dtype=np.int64),
        }
    np.savez(run / "predictions.npz", **arrays)
    (run / "config.json").write_text(
        json.dumps(
            {
                "model": model,
                "task": task,
                "label": "rater1",
                "steps": 500,
                "batch": 8,
                "input_size": SIZE,
            }
        )
    )
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"])
        for step in range(0, 501, 10):
            acc = 0.5 + 0.35 * (1 - np.exp(-step / 150)) + rng.normal(0, 0.04)
            val = f"{acc - 0.05:.4f}" if step % 50 == 0 else ""
            w.writerow(
                [
                    step,
                    f"{1 - acc:.4f}",
                    f"{acc:.4f}",
                    val and f"{1 - float(val):.4f}",
                    val,
                    f"{step * 0.01:.2f}",
                ]
            )
    (run / "splits.json").write_text(
        json.dumps(
            {
                "train": {"images": 700, "patients": 49, "classes": {"0": 180, "1": 390, "2": 130}},
                "val": {"images": 60},
                "test": {"images": 150},
            }
        )
    )
    if keras_model:
        build = tiny_convnet if model == "convnet" else tiny_resnet
        build(c).save(run / "model.keras")
    return run


def make_manifest(root: Path, n: int = 40, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for i in range(n):
            severity = float(rng.random())
            true_class = 0 if severity > 0.6 else (1 if severity > 0.2 else 2)
            img = ghost_motion(phantom(), severity, rng) if severity > 0.2 else phantom()
            np.save(img_dir / f"{i}.npy", img)
            r1 = noisy(np.array([true_class]), 0.2, rng)[0]
            r2 = noisy(np.array([true_class]), 0.3, rng)[0]
            w.writerow(
                [
                    f"images/{i}.npy",
                    f"P{i // 10}",
                    "1.2",
                    f"1.2.{i // 10}",
                    f"1.2.{i}",
                    i % 10 + 1,
                    r1,
                    r2,
                    f"{severity:.3f}",
                    true_class,
                ]
            )
    return path


def assert_png(path: Path, min_kb: float = 8.0) -> None:
    path = Path(path)
    assert path.is_file(), path
    assert path.stat().st_size > min_kb * 1024, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 400 and h >= 300
        px = np.asarray(im.convert("L"), dtype=np.float32)
    assert px.std() > 5.0, f"{path} looks blank"


def links(md: Path) -> list[str]:
    return LINK.findall(md.read_text())


def assert_links_exist(md: Path) -> list[str]:
    found = links(md)
    assert found, f"{md} links nothing"
    for target in found:
        assert not target.startswith(("/", "http")), target
        assert (md.parent / target).is_file(), f"{md} links missing {target}"
    return found


@pytest.fixture(scope="module")
def motion_images() -> tuple[np.ndarray, np.ndarray]:
    clean = phantom()
    return clean, ghost_motion(clean, 0.8, np.random.default_rng(0))


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("runs")
    return [
        make_run(root, model, task, seed=i)
        for i, (model, task) in enumerate(
            [
                ("convnet", "binary"),
                ("convnet", "3class"),
                ("resnet10", "binary"),
                ("resnet10", "3class"),
            ]
        )
    ]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="module")
def summary(four_runs: list[Path], manifest: Path, motion_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("summary")
    return report.write_summary(four_runs, out, manifest=manifest, images=motion_images)


# --------------------------------------------------------------------------- metrics


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 1, 0, 1, 1, 1, 0])
    m = metrics(np.eye(2)[y], y, 2)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0
    assert m["auc"] == 1.0 and m["kappa"] == 1.0
    assert m["confusion"]["counts"] == [[3, 0], [0, 5]]
    assert m["auc_positive"].startswith("0") and "non_diagnostic" in m["auc_positive"]
    y3 = np.array([0, 1, 2, 2, 1, 0, 1])
    m3 = metrics(np.eye(3)[y3] * 0.9 + 0.1 / 3, y3, 3)
    assert m3["accuracy"] == 1.0 and m3["auc"] == 1.0
    assert all(v == 1.0 for v in m3["auc_per_class"].values())


def test_inverted_predictions() -> None:
    y = np.array([0, 1, 1, 0, 1, 1, 1, 0])
    m = metrics(np.eye(2)[1 - y] * 0.8 + 0.1, y, 2)
    assert m["accuracy"] == 0.0
    assert m["auc"] == 0.0
    assert m["confusion"]["normalized"] == [[0.0, 1.0], [1.0, 0.0]]


def test_known_confusion_matrix() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 1, 2, 0, 2])
    rng = np.random.default_rng(0)
    probs = softmax(3 * np.eye(3)[pred] + rng.normal(0, 0.3, (10, 3)))
    assert (probs.argmax(1) == pred).all()
    m = metrics(probs, y, 3)
    assert m["confusion"]["counts"] == [[2, 1, 0], [0, 3, 1], [1, 0, 2]]
    np.testing.assert_allclose(
        m["confusion"]["normalized"], [[2 / 3, 1 / 3, 0], [0, 3 / 4, 1 / 4], [1 / 3, 0, 2 / 3]]
    )
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)
    pc = m["per_class"]
    assert pc["non_diagnostic"]["precision"] == pytest.approx(2 / 3)
    assert pc["diagnostic"]["recall"] == pytest.approx(0.75)
    assert pc["excellent"]["support"] == 3
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_unknown_labels_and_single_class() -> None:
    y = np.array([0, -1, 1, -1, 1])
    m = metrics(np.eye(2)[[0, 1, 1, 0, 1]], y, 2)
    assert m["n"] == 3 and m["n_unknown"] == 2 and m["accuracy"] == 1.0
    m1 = metrics(np.eye(2)[[1, 1, 0]], np.array([1, 1, 1]), 2)
    assert m1["auc"] is None and m1["accuracy"] == pytest.approx(2 / 3)
    empty = metrics(np.eye(2)[[1, 0]], np.array([-1, -1]), 2)
    assert empty["n"] == 0 and empty["accuracy"] is None
    json.dumps(to_jsonable(empty), allow_nan=False)


def test_kappa_and_label_mapping() -> None:
    a = np.array([0, 1, 2, 2, 1, 0, 1, 1, 2, 0])
    assert evaluate.cohen_kappa(a, a, 3) == pytest.approx(1.0)
    b = np.array([0, 1, 1, 2, 1, 0, 2, 1, 2, 1])
    assert evaluate.cohen_kappa(a, b, 3) == pytest.approx(cohen_kappa_score(a, b))
    # The node's own (hand-computed, sklearn-free) kappa agrees, missing ratings left out.
    from mriqa_node.domain import agreement

    gaps = np.where(np.arange(10) % 4 == 0, -1, b)
    assert evaluate.cohen_kappa(a, gaps, 3) == pytest.approx(agreement.cohen_kappa(a, gaps, 3))
    assert evaluate.cohen_kappa([1, 1, 1], [1, 1, 1], 3) is None  # one class: undefined
    assert to_task_labels([0, 1, 2, -1], "binary").tolist() == [0, 1, 1, -1]
    assert to_task_labels([0, 1, 2, -1], "3class").tolist() == [0, 1, 2, -1]


def test_jaccard_hand_computed(tmp_path: Path) -> None:
    r1 = np.array([0, 0, 1, 1, 1, 2, 2, 0, -1])
    r2 = np.array([0, 1, 1, 1, 2, 2, 0, 0, 2])  # the last pair has a missing rating
    expected = np.array([[1 / 2, 1 / 5, 0], [0, 2 / 4, 1 / 4], [1 / 4, 0, 1 / 3]])
    np.testing.assert_allclose(evaluate.jaccard_matrix(r1, r2), expected)
    path, j = figures.fig6_rater_jaccard((r1, r2), tmp_path / "fig6.png")
    np.testing.assert_allclose(j, expected)
    assert_png(path)
    same = evaluate.jaccard_matrix(r1[:-1], r1[:-1])
    np.testing.assert_allclose(np.diag(same), 1.0)
    assert np.nansum(same) == pytest.approx(3.0)


# --------------------------------------------------------------------------- figures


def test_every_figure_is_a_real_png(tmp_path: Path, motion_images, four_runs, manifest) -> None:
    clean, motion = motion_images
    model = tiny_convnet(2)
    p3 = figures.fig3_activation_maps(model, clean, motion, tmp_path / "f3.png", "ConvNet")
    hist = {
        "ConvNet binary": four_runs[0] / "history.csv",
        "ResNet-10 binary": [
            {"step": s, "train_acc": 0.5 + s / 2000, "val_acc": ""} for s in range(0, 500, 25)
        ],
    }
    p4 = figures.fig4_accuracy_curves(hist, tmp_path / "f4.png")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p5 = figures.fig5_roc_curves(
        {"ConvNet": (y + rng.normal(0, 0.8, 200), y == 1), "inverse": (-y.astype(float), y == 1)},
        tmp_path / "f5.png",
    )
    p6, j = figures.fig6_rater_jaccard(manifest, tmp_path / "f6.png")
    assert j.shape == (3, 3) and np.nanmax(j) <= 1.0
    p7 = figures.fig7_confusion(
        [[40, 10], [5, 45]], ["non_diagnostic", "diagnostic"], tmp_path / "f7.png", "ConvNet binary"
    )
    for p in (p3, p4, p5, p6, p7):
        assert_png(p)


def test_conv_layers_found_by_type() -> None:
    first, last = figures.conv_layers(tiny_convnet(2))
    assert (first.name, last.name) == ("conv1", "conv2")
    first, last = figures.conv_layers(tiny_resnet(3))
    assert (first.name, last.name) == ("stem_conv", "b_2_conv")  # not the 1x1 projection
    inp = keras.Input((SIZE, SIZE, 1))
    dense_only = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(inp)))
    with pytest.raises(ValueError, match="no top-level Conv2D"):
        figures.conv_layers(dense_only)


@pytest.mark.parametrize("build", [tiny_convnet, tiny_resnet])
def test_activation_maps_differ_with_motion(build, motion_images) -> None:
    keras.utils.set_random_seed(1)
    clean, motion = motion_images
    maps = figures.activation_maps(build(2), [clean, motion, clean])
    for key in ("first", "last"):
        a = maps[key]
        assert a.ndim == 3 and a.shape[0] == 3 and np.isfinite(a).all()
        assert figures.relative_difference(a[0], a[1]) > 0.01
        assert figures.relative_difference(a[0], a[2]) == pytest.approx(0.0, abs=1e-6)
    assert maps["first"].shape[1] > maps["last"].shape[1]  # stride-2 convs shrink the maps


def test_motion_pair_without_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "training.synth", None)  # import fails
    with pytest.raises(RuntimeError, match="apply_motion"):
        figures.motion_pair(phantom())


# --------------------------------------------------------------------------- evaluate_run


def test_evaluate_run_metrics_json(four_runs: list[Path]) -> None:
    res = evaluate.evaluate_run(four_runs[1])  # ConvNet 3-class
    data = json.loads((four_runs[1] / "metrics.json").read_text())  # strict JSON, no NaN
    assert data["task"] == "3class" and set(data["splits"]) == {"test", "val"}
    test = res["splits"]["test"]
    assert test["vs_truth"]["n"] == 150
    assert set(test["vs_raters"]) == {"rater1", "rater2"}
    # predictions are built from the truth, so they look better against it than against raters
    assert test["vs_truth"]["accuracy"] > test["vs_raters_mean"]["accuracy"]
    noise = res["label_noise"]
    assert noise["available"]
    for k in evaluate.SCALAR_KEYS:
        assert noise["cost_vs_raters"][k] == pytest.approx(
            noise["vs_truth"][k] - noise["vs_raters_mean"][k]
        )
    assert noise["cost_vs_raters"]["accuracy"] > 0
    r1 = noise["raters"]["rater1"]
    assert 0.5 < r1["accuracy_vs_truth"] < 1.0
    assert r1["apparent_errors_correct_vs_truth"] <= r1["apparent_errors"]
    assert test["raters"]["pairs"]["rater1~rater2"]["kappa_3class"] < 1.0
    assert res["history"]["final_step"] == 500 and res["history"]["best_val_acc"] is not None


def test_binary_truth_mapping(four_runs: list[Path]) -> None:
    res = evaluate.evaluate_run(four_runs[0], write=False)
    preds = evaluate.load_predictions(four_runs[0])
    t = preds["test_truth3"]
    vt = res["splits"]["test"]["vs_truth"]
    assert vt["per_class"]["non_diagnostic"]["support"] == int((t == 0).sum())
    assert vt["per_class"]["diagnostic"]["support"] == int((t > 0).sum())
    assert "non_diagnostic" in vt["auc_method"]


def test_truthless_run_skips_truth(tmp_path: Path) -> None:
    run = make_run(tmp_path, "convnet", "binary", truth=False, keras_model=False)
    res = evaluate.evaluate_run(run)
    assert res["splits"]["test"]["vs_truth"] is None
    assert res["label_noise"]["available"] is False
    assert res["splits"]["test"]["vs_raters"]["rater2"]["n"] == 150
    md = report.write_run_report(run)
    text = md.read_text()
    assert "truth (synthetic)" not in text and "Not available" in text
    assert_links_exist(md)
    out = report.write_summary([run], tmp_path / "summary")
    text = out.read_text()
    assert "No run has ground truth" in text
    assert "84%" in text  # the paper's numbers are always beside ours
    assert_links_exist(out)
    agg = json.loads((tmp_path / "summary" / "metrics.json").read_text())
    assert agg["label_noise"] == {"available": False}


# --------------------------------------------------------------------------- reports


def test_run_report(four_runs: list[Path], manifest: Path, motion_images, tmp_path: Path) -> None:
    out = tmp_path / "r" / "report.md"
    md = report.write_run_report(four_runs[2], manifest=manifest, out=out, images=motion_images)
    assert md == out
    found = assert_links_exist(md)
    figs = {Path(f).name for f in found}
    assert {
        "fig3_activations.png",
        "fig4_accuracy.png",
        "fig5_roc.png",
        "fig6_jaccard.png",
        "fig7_confusion_labels.png",
        "fig7_confusion_truth.png",
        "reliability.png",
        "series_roc.png",
    } <= figs
    for f in found:
        if f.endswith(".png"):
            assert_png(md.parent / f)
    text = md.read_text()
    assert "ResNet-10 binary" in text and "| rater1 |" in text and "truth (synthetic)" in text
    assert "| train | 700 | 49 |" in text  # splits.json counts
    assert "Notes" not in text  # every figure was drawn
    metrics = json.loads((four_runs[2] / "metrics.json").read_text())
    cal, op = metrics["calibration"], metrics["operating_point"]
    assert cal["temperature"] > 0 and set(cal["splits"]) == {"val", "test"}
    assert f"| val | 60 | {cal['splits']['val']['ece_before']:.3f} |" in text
    assert op["max_false_alerts"] == 0.05 and op["test"]["n_positive"] > 0
    assert "series non-diag. / diag." in text


def test_run_report_fig3_from_manifest(
    tmp_path: Path, manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("training.synth")
    fake.apply_motion = ghost_motion
    monkeypatch.setitem(sys.modules, "training.synth", fake)
    run = make_run(tmp_path, "convnet", "binary", seed=5)
    md = report.write_run_report(run, manifest=manifest)
    assert (run / "figures" / "fig3_activations.png").is_file()
    assert "fig3_activations.png" in md.read_text()
    assert json.loads((run / "metrics.json").read_text())["activation_change"]["last"] > 0


def test_summary_four_runs(summary: Path, four_runs: list[Path]) -> None:
    text = summary.read_text()
    table = [
        ln for ln in text.splitlines() if ln.startswith("| ConvNet") or ln.startswith("| ResNet-10")
    ]
    combos = {tuple(c.strip() for c in ln.split("|")[1:3]) for ln in table}
    assert {
        ("ConvNet", "binary"),
        ("ConvNet", "3-class"),
        ("ResNet-10", "binary"),
        ("ResNet-10", "3-class"),
    } <= combos
    assert "_no run_" not in text
    convnet_binary = next(ln for ln in table if "| ConvNet | binary |" in ln)
    assert "84%" in convnet_binary and "0.79" in convnet_binary
    assert "65%" in next(ln for ln in table if "| ConvNet | 3-class |" in ln)
    assert next(ln for ln in table if "| ResNet-10 | binary |" in ln).endswith("| — | — |")
    found = assert_links_exist(summary)
    names = {Path(f).name for f in found}
    assert {
        "fig3_convnet.png",
        "fig3_resnet10.png",
        "fig4_accuracy.png",
        "fig5_roc.png",
        "fig6_jaccard.png",
        "metrics.json",
    } <= names
    assert sum(n.startswith("fig7_") for n in names) == 4
    assert sum(f.endswith("report.md") for f in found) == 4
    for f in found:
        if f.endswith(".png"):
            assert_png(summary.parent / f)
    assert "Label noise" in text and "percentage points" in text
    agg = json.loads((summary.parent / "metrics.json").read_text())
    assert len(agg["runs"]) == 4 and len(agg["table"]) == 4
    assert agg["label_noise"]["available"] and agg["label_noise"]["mean_cost_vs_raters"]["accuracy"]
    assert np.asarray(agg["jaccard"]["matrix"], dtype=float).shape == (3, 3)
    assert set(agg["activation_change"]) == {"convnet", "resnet10"}
    for run in four_runs:
        assert_links_exist(run / "report.md")


def test_summary_missing_combinations(tmp_path: Path) -> None:
    """A single run: the other paper rows say there is no run; no model file, no manifest."""
    run = make_run(tmp_path, "resnet10", "3class", seed=9, keras_model=False)
    out = report.write_summary([run], tmp_path / "s")
    text = out.read_text()
    assert text.count("_no run_") == 3
    assert "Fig. 3 not drawn" in text
    assert_links_exist(out)


def test_layout_written_by_training_train(tmp_path: Path) -> None:
    """training.train's predictions.npz names the truth ``{split}_truth`` (the contract says
    ``truth3``), carries ``task``, and may have a third, mostly unrated rater; its splits.json
    nests the counts under "counts" beside the patient lists."""
    run = make_run(tmp_path, "convnet", "3class", seed=3, keras_model=False)
    preds = dict(np.load(run / "predictions.npz"))
    for split in ("val", "test"):
        preds[f"{split}_truth"] = preds.pop(f"{split}_truth3")
        r = preds[f"{split}_raters"]
        third = np.full(len(r), -1)
        third[:5] = r[:5, 0]
        preds[f"{split}_raters"] = np.concatenate([r, third[:, None]], axis=1).astype(np.int32)
    preds["rater_names"] = np.array(["rater1", "rater2", "rater3"])
    preds["task"] = np.str_("3class")
    np.savez(run / "predictions.npz", **preds)
    (run / "config.json").write_text(json.dumps({"model": "convnet", "label": "consensus"}))
    (run / "splits.json").write_text(
        json.dumps(
            {
                "manifest_sha256": "ab" * 32,
                "task": "3class",
                "counts": {
                    "train": {"patients": 49, "series": 49, "images": 700,
                              "classes": {"0": 180, "1": 390, "2": 130}},
                    "test": {"patients": 14, "series": 14, "images": 150},
                },
                "patients": {"train": ["P1"], "val": ["P2"], "test": ["P3"]},
            }
        )
    )  # fmt: skip
    res = evaluate.evaluate_run(run)
    assert res["task"] == "3class"
    test = res["splits"]["test"]
    assert test["vs_truth"]["n"] == 150
    assert test["vs_raters"]["rater3"]["n"] == 5 and test["vs_raters"]["rater3"]["n_unknown"] == 145
    assert set(test["raters"]["pairs"]) == {"rater1~rater2", "rater1~rater3", "rater2~rater3"}
    md = report.write_run_report(run)
    text = md.read_text()
    assert "| train | 49 | 49 | 700 | 180 | 390 | 130 |" in text
    assert "manifest_sha256" not in text
    assert_links_exist(md)
    assert report.write_summary([run], tmp_path / "s").is_file()


def test_summary_leaves_out_a_broken_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from training.cli import main as mriqa_train

    good = make_run(tmp_path, "convnet", "binary", seed=4, keras_model=False)
    broken = tmp_path / "crashed"
    broken.mkdir()
    result = CliRunner().invoke(
        mriqa_train, ["report", str(good), str(broken), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    text = Path(result.output.strip().removeprefix("summary: ")).read_text()
    assert "crashed left out" in text and "convnet_binary" in text
    with pytest.raises(ValueError, match="no run could be evaluated"):
        report.write_summary([broken], tmp_path / "s2")


def test_run_files_are_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    from training.files import replaced_atomically, write_json

    path = write_json(tmp_path / "run" / "metrics.json", {"auc": np.float32(0.5), "x": math.nan})
    assert json.loads(path.read_text()) == {"auc": 0.5, "x": None}
    with pytest.raises(RuntimeError), replaced_atomically(path) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text())["auc"] == 0.5  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
