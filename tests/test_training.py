"""The training package: manifest and labels, split by patient, image cache and pipeline, the two
models learning an easy separation, resumable runs, runtime selection, the operating point and
an exported artifact that the node loads and scores exactly as training did.

Data: phantom patients (mriqa_node.phantom) with one clean series (rated diagnostic/excellent)
and one series with full respiratory motion (rated non-diagnostic), at 64 px; the models train
at 64 px (the export test at the node's 512 px with the tiny widths of the node's tests).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from mriqa_node.phantom import synth_series, write_series
from training import data as data_mod
from training.data import ImageCache, make_dataset
from training.manifest import (
    ManifestError,
    Record,
    assert_no_patient_leak,
    label_of,
    read_manifest,
    split_by_patient,
    split_report,
    task_label,
    write_manifest,
)
from training.train import (
    TrainConfig,
    class_weights,
    read_history,
    select_runtime,
    soft_targets,
    train,
)

REPO = Path(__file__).resolve().parents[1]
# Keras' own model.save under numpy 2 (not ours): "__array__ implementation doesn't accept a copy"
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY_WIDTHS = (4, 8, 8, 16)  # the node tests' ConvNet: cheap at 512 px
SMALL_WIDTHS = (8, 16, 16, 32)  # at 64 px: learns the phantom's motion reliably (4-8-8-16: not)
N_PATIENTS, N_SLICES, SIZE = 10, 6, 64


# --- fixtures -------------------------------------------------------------------------------


def phantom_records(root: Path, n_patients: int, n_slices: int, size: int) -> list[Record]:
    """Per patient: a clean series (raters 2 and 1) and a moving one (raters 0 and 0)."""
    records = []
    for p in range(n_patients):
        pid = f"PAT{p:03d}"
        for number, (motion, ratings, truth) in enumerate(((0.0, (2, 1), 2), (1.0, (0, 0), 0))):
            datasets = synth_series(
                n_slices, size, motion=motion, seed=100 + p, patient_id=pid,
                series_number=number + 1,
            )  # fmt: skip
            paths = write_series(datasets, root / pid / f"s{number + 1}")
            for ds, path in zip(datasets, paths, strict=True):
                records.append(
                    Record(
                        path, pid, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                        int(ds.InstanceNumber), {"rater1": ratings[0], "rater2": ratings[1]},
                        motion, truth,
                    )
                )  # fmt: skip
    return records


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    records = phantom_records(root / "dicom", N_PATIENTS, N_SLICES, SIZE)
    return write_manifest(records, root / "manifest.csv")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(manifest: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    base = dict(
        manifest=manifest, out_dir=out, input_size=SIZE, widths=SMALL_WIDTHS, width=4, batch=16,
        eval_every=20, checkpoint_every=20, cache_dir=cache, fractions=(0.6, 0.2, 0.2),
        progress=False, bn_recalibration=8,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def rec(pid: str, i: int, raters: dict, truth: int | None = None, series: str = "S") -> Record:
    return Record(Path(f"/x/{pid}/{i}.dcm"), pid, "ST", f"{pid}{series}", f"{pid}.{series}.{i}",
                  i, raters, None, truth)  # fmt: skip


# --- manifest and labels --------------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path) -> None:
    records = [
        rec("A", 1, {"rater1": 0, "rater2": 1, "rater10": 2}, truth=0),
        rec("B", 2, {"rater1": 2, "rater2": None, "rater10": 1}),
    ]
    records[0].path = tmp_path / "dicom" / "a.dcm"  # under the manifest's directory: relative
    records[0].severity = 0.75
    path = write_manifest(records, tmp_path / "m.csv")
    with path.open() as fh:
        header = next(csv.reader(fh))
        first = next(csv.reader(fh))
    assert header == [
        *("path", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "instance"),
        *("rater1", "rater2", "rater10", "severity", "true_class"),
    ]
    assert first[0] == "dicom/a.dcm"
    back = read_manifest(path)
    assert [r.raters for r in back] == [r.raters for r in records]
    assert back[0].path == (tmp_path / "dicom" / "a.dcm").resolve()
    assert back[1].path == Path("/x/B/2.dcm")
    assert (back[0].severity, back[0].true_class, back[1].severity, back[1].true_class) == (
        0.75, 0, None, None,
    )  # fmt: skip
    assert back[1].instance == 2

    path.write_text("path,patient_id\nx,y\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(path)
    path.write_text(
        "path,patient_id,study_uid,series_uid,sop_instance_uid,instance,rater1,severity,"
        "true_class\nx,P,S,SE,1.2,1,7,,\n"
    )
    with pytest.raises(ManifestError, match=r"m\.csv:2: rater1"):
        read_manifest(path)


def test_label_sources_and_task_mapping() -> None:
    r = rec("A", 1, {"rater1": 0, "rater2": 1}, truth=2)
    assert [label_of(r, s) for s in ("rater1", "rater2", "mean", "worst", "truth")] == [
        0, 1, 1, 0, 2,
    ]  # fmt: skip
    # mean: rounded half up; raters who did not rate are left out
    assert label_of(rec("B", 1, {"rater1": 1, "rater2": 2}), "mean") == 2
    assert label_of(rec("B", 1, {"rater1": 0, "rater2": 2}), "mean") == 1
    assert label_of(rec("B", 1, {"rater1": 0, "rater2": 0, "rater3": 1}), "mean") == 0
    assert label_of(rec("B", 1, {"rater1": None, "rater2": 2}), "mean") == 2
    assert label_of(rec("B", 1, {"rater1": None}), "worst") is None
    assert label_of(rec("B", 1, {"rater1": 1}), "truth") is None
    with pytest.raises(ValueError, match="label source"):
        label_of(r, "median")
    assert [task_label(c, "binary") for c in (0, 1, 2)] == [0, 1, 1]
    assert [task_label(c, "3class") for c in (0, 1, 2)] == [0, 1, 2]
    assert task_label(None, "binary") is None
    np.testing.assert_array_equal(task_label(np.array([0, 1, 2, -1]), "binary"), [0, 1, 1, -1])
    with pytest.raises(ValueError):
        task_label(1, "4class")


def test_class_weights_inverse_frequency() -> None:
    w = class_weights([0, 1, 1, 1], 2)
    np.testing.assert_allclose(w, [4 / (2 * 1), 4 / (2 * 3)])
    y = np.array([0] * 10 + [1] * 30 + [2] * 60)
    w3 = class_weights(y, 3)
    np.testing.assert_allclose(w3, [100 / 30, 100 / 90, 100 / 180], rtol=1e-6)
    assert np.isclose(w3[y].mean(), 1.0)  # the mean weight per sample is 1
    np.testing.assert_allclose(class_weights([1, 1], 3), [1.0, 2 / 6, 1.0])  # absent class: 1


# --- split by patient -----------------------------------------------------------------------


def _cohort(n: int = 90, seed: int = 5) -> tuple[list[Record], list[int]]:
    rng = np.random.default_rng(seed)
    records, labels = [], []
    for p in range(n):
        share = (0.0, 0.3, 1.0)[p % 3]  # clean, partly corrupted, fully corrupted patients
        for i in range(int(rng.integers(15, 40))):
            label = 0 if rng.random() < share else 1
            records.append(rec(f"P{p:03d}", i, {"rater1": label}))
            labels.append(label)
    return records, labels


def test_split_by_patient_no_leak_fractions_stratified_deterministic() -> None:
    records, labels = _cohort()
    splits = split_by_patient(records, labels, (0.7, 0.1, 0.2), seed=0)
    assert_no_patient_leak(splits)
    assert sum(len(v) for v in splits.values()) == len(records)
    by_uid = {r.sop_instance_uid: lab for r, lab in zip(records, labels, strict=True)}
    overall = np.mean(np.asarray(labels) == 0)
    for name, target in zip(("train", "val", "test"), (0.7, 0.1, 0.2), strict=True):
        share = len(splits[name]) / len(records)
        assert abs(share - target) < 0.04, (name, share)
        nondiag = np.mean([by_uid[r.sop_instance_uid] == 0 for r in splits[name]])
        assert abs(nondiag - overall) < 0.08, (name, nondiag, overall)  # stratified
    again = split_by_patient(records, labels, (0.7, 0.1, 0.2), seed=0)
    assert {k: [r.sop_instance_uid for r in v] for k, v in again.items()} == {
        k: [r.sop_instance_uid for r in v] for k, v in splits.items()
    }
    other = split_by_patient(records, labels, (0.7, 0.1, 0.2), seed=1)
    assert {r.patient_id for r in other["test"]} != {r.patient_id for r in splits["test"]}

    report = split_report(splits, by_uid)
    assert sum(v["images"] for v in report.values()) == len(records)
    assert report["val"]["classes"]["0"] + report["val"]["classes"]["1"] == len(splits["val"])
    assert sum(v["patients"] for v in report.values()) == 90

    few = split_by_patient(records[:100], labels[:100], (0.7, 0.1, 0.2))  # ~4 patients
    assert all(few[s] for s in ("train", "val", "test"))

    leaky = {"train": splits["train"], "test": [*splits["test"], splits["train"][0]]}
    with pytest.raises(AssertionError, match=splits["train"][0].patient_id):
        assert_no_patient_leak(leaky)


# --- runtime selection ----------------------------------------------------------------------


def test_runtime_selection_falls_back_on_cpu() -> None:
    cpu = select_runtime(0, None)
    assert (cpu.strategy, cpu.mixed_precision, cpu.xla) == ("default", False, False)
    one = select_runtime(1, None)
    assert (one.strategy, one.mixed_precision, one.xla) == ("default", True, True)
    assert select_runtime(4, None).strategy == "mirrored"
    cluster = json.dumps({"cluster": {"worker": ["h1:2222", "h2:2222"]},
                          "task": {"type": "worker", "index": 0}})  # fmt: skip
    assert select_runtime(0, cluster).strategy == "multi_worker"
    assert select_runtime(2, cluster).strategy == "multi_worker"
    assert select_runtime(0, "not json").strategy == "default"
    assert select_runtime(0, "{}").strategy == "default"
    forced = select_runtime(0, None, mixed_precision="on", xla=True)
    assert (forced.mixed_precision, forced.xla) == (True, True)
    off = select_runtime(8, None, mixed_precision="off", xla="off")
    assert (off.strategy, off.mixed_precision, off.xla) == ("mirrored", False, False)
    with pytest.raises(ValueError):
        select_runtime(0, None, mixed_precision="sometimes")


# --- cache and pipeline ---------------------------------------------------------------------


def _multiframe(tmp_path: Path) -> Record:
    """A 3-frame file built from three phantom slices (one row per frame in the cache)."""
    slices = synth_series(3, 48, motion=0.5, seed=7, patient_id="MF")
    ds = slices[0]
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.999"
    path = tmp_path / "mf.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Record(path, "MF", "ST", "SE", "1.2.3.4.5.999", 1, {"rater1": 1})


def test_image_cache_reuse_frames_failures_and_dataset(phantom: Path, tmp_path: Path) -> None:
    from mriqa_node.preprocess import preprocess

    records = read_manifest(phantom)[:20]
    multi = _multiframe(tmp_path)
    broken = Record(tmp_path / "garbage.dcm", "X", "S", "S", "9.9.9", 1, {"rater1": 0})
    broken.path.write_bytes(b"not dicom at all")
    missing = Record(tmp_path / "not-yet.dcm", "X", "S", "S", "9.9.8", 2, {"rater1": 0})
    cache = ImageCache(tmp_path / "cache", size=SIZE)
    stats = cache.build([*records, multi, broken, missing], progress=False)
    assert (stats.decoded, stats.reused, stats.failed, stats.rows) == (21, 0, 2, 23)
    assert list(cache.rows(multi)) == [20, 21, 22]
    assert cache.failure(broken) and not cache.rows(broken)
    expected = preprocess(pydicom.dcmread(records[3].path), SIZE)[0]
    got = cache.gather(np.array([3]))[0]
    assert got.dtype == np.float32 and got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, expected, atol=1e-3)  # float16 storage

    write_series(synth_series(1, SIZE, seed=3), tmp_path / "late")[0].rename(missing.path)
    again = ImageCache(tmp_path / "cache", size=SIZE)  # a second run: only the late file
    stats = again.build([*records, multi, broken, missing], progress=False)
    assert (stats.decoded, stats.reused, stats.failed, stats.rows) == (1, 21, 1, 24)
    assert list(again.rows(missing)) == [23] and again.failure(broken)
    samples = again.samples([records[0], multi, broken])
    assert samples.rows.tolist() == [0, 20, 21, 22]
    assert samples.frame.tolist() == [0, 0, 1, 2] and samples.record.tolist() == [0, 1, 1, 1]
    other_size = ImageCache(tmp_path / "cache", size=32)
    assert len(other_size) == 0 and other_size.directory != again.directory

    rows = np.arange(23)
    labels = rows % 2
    ds = make_dataset(again, rows, labels, batch=5, shuffle=True, seed=3)
    batches = list(ds)
    x, y = batches[0]
    assert x.dtype.name == "float32" and x.shape[1:] == (SIZE, SIZE, 1) and y.dtype.name == "int32"
    seen = np.concatenate([b[1].numpy() for b in batches])
    assert len(seen) == 23 and sorted(seen.tolist()) == sorted(labels.tolist())
    same = np.concatenate([b[1].numpy() for b in make_dataset(again, rows, labels, 5, True,
                                                                  seed=3)])  # fmt: skip
    np.testing.assert_array_equal(seen, same)  # deterministic for a seed
    # images arrive with their own labels (gathered in sorted order, returned in batch order)
    for xb, yb in make_dataset(again, rows, rows, 7, shuffle=True, seed=1):
        np.testing.assert_allclose(xb.numpy(), again.gather(yb.numpy()))
    x16 = next(iter(make_dataset(again, rows, labels, 4, dtype="float16")))[0].numpy()
    assert x16.dtype == np.float16
    np.testing.assert_array_equal(x16.astype(np.float32), again.gather(rows[:4]))
    repeated = make_dataset(again, rows, labels, 8, shuffle=True, repeat=True)
    assert all(b[0].shape[0] == 8 for b in repeated.take(10))


def test_image_cache_parallel_decode(phantom: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "_SERIAL_BELOW", 1)
    records = read_manifest(phantom)[:12]
    cache = ImageCache(tmp_path / "cache", size=SIZE)
    stats = cache.build(records, workers=2, progress=False)
    assert (stats.decoded, stats.rows) == (12, 12)
    serial = ImageCache(tmp_path / "serial", size=SIZE)
    serial.build(records, workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(cache.data), np.asarray(serial.data))


# --- learning, resuming, exporting ----------------------------------------------------------


def test_augmentation_flips_but_never_transposes() -> None:
    """Preprocessing puts the phase-encoding axis (where ghosts lie) down the columns; the
    on-the-fly augmentation may flip it but must not turn it into the rows."""
    import tensorflow as tf

    x = np.zeros((64, 16, 16, 1), np.float32)
    x[:, 2, 5, 0] = 1.0  # one bright pixel off both diagonals
    out = data_mod._augment(tf.constant(x), tf.constant([7, 0], tf.int64)).numpy()
    peaks = {np.unravel_index(int(np.argmax(o[..., 0])), (16, 16)) for o in out}
    assert peaks == {(2, 5), (13, 5), (2, 10), (13, 10)}  # all four flips, no transpose


def test_soft_targets_follow_the_measured_severity() -> None:
    records = [rec("P", i, {}, truth=c) for i, c in enumerate((2, 1, 1, 0, 0, 0))]
    severities = (0.0, 0.3, 0.45, 0.55, 0.9, None)
    records = [replace(r, severity=s) for r, s in zip(records, severities, strict=True)]
    labels = np.asarray([task_label(r.true_class, "binary") for r in records])
    p = soft_targets(records, labels, width=0.05)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(np.diff(p[:5, 0]) > 0)  # P(non-diagnostic) rises with the severity
    assert p[0, 0] < 0.001 and 0.1 < p[2, 0] < 0.5 < p[3, 0] < 0.9 and p[4, 0] > 0.99
    assert p[5, 0] == 1.0  # no severity (a rated series): its hard label
    with pytest.raises(ValueError, match="binary"):
        TrainConfig(manifest="m", out_dir="o", task="3class", soft_labels=0.1)


@pytest.mark.parametrize(
    ("model", "steps", "soft"),
    [("convnet", 120, 0.0), ("resnet10", 100, 0.0), ("convnet", 120, 0.1)],
    ids=["convnet", "resnet10", "convnet-soft-labels"],
)
def test_model_learns_motion_on_held_out_patients(
    phantom: Path, cache_dir: Path, tmp_path: Path, model: str, steps: int, soft: float
) -> None:
    run = train(tiny_config(phantom, tmp_path / model, cache_dir, model=model, steps=steps,
                            soft_labels=soft))  # fmt: skip
    for name in ("config.json", "splits.json", "history.csv", "model.keras", "predictions.npz"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir()) and list((run / "checkpoints").glob("ckpt-*.index"))
    splits = json.loads((run / "splits.json").read_text())
    assert not set(splits["patients"]["train"]) & set(splits["patients"]["test"])
    with np.load(run / "predictions.npz") as npz:
        preds = {k: npz[k] for k in npz.files}
    assert not set(preds["test_patient_ids"]) & set(splits["patients"]["train"])
    n = len(preds["test_labels"])
    assert n == splits["counts"]["test"]["images"] and preds["test_probs"].shape == (n, 2)
    np.testing.assert_allclose(preds["test_probs"].sum(axis=1), 1.0, atol=1e-5)
    assert preds["test_raters"].shape == (n, 2)
    assert list(preds["rater_names"]) == ["rater1", "rater2"]
    np.testing.assert_array_equal(preds["test_labels"], preds["test_truth"] > 0)
    assert set(preds["test_labels"]) == {0, 1}
    # Ranking is what it learns first; the 0.5 cut also depends on the prior (edge slices of a
    # moving series move little). Chance is 0.5 for both.
    auc = roc_auc_score(preds["test_labels"], preds["test_probs"][:, 1])
    accuracy = (preds["test_probs"].argmax(axis=1) == preds["test_labels"]).mean()
    assert auc >= 0.95 and accuracy >= 0.8, (auc, accuracy)
    history = read_history(run)
    assert history[-1]["step"] == steps and history[-1]["val_acc"] >= 0.85


def test_training_resumes_from_last_checkpoint(phantom: Path, cache_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = tiny_config(phantom, out, cache_dir, steps=30, eval_every=10, checkpoint_every=10,
                      class_weights=True, task="3class")  # fmt: skip
    train(cfg)
    first = read_history(out)
    assert [r["step"] for r in first] == [10, 20, 30]
    cfg.steps = 60
    train(cfg)
    history = read_history(out)
    assert [r["step"] for r in history] == [10, 20, 30, 40, 50, 60]
    assert history[:3] == first  # continued, not restarted
    seconds = [r["seconds"] for r in history]
    assert seconds == sorted(seconds)
    ckpt = (out / "checkpoints" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-60"' in ckpt
    assert len(list((out / "checkpoints").glob("ckpt-*.index"))) == 3  # keeps the last three
    assert json.loads((out / "config.json").read_text())["steps"] == 60

    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(out / "checkpoints" / "ckpt-60"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 60
    iterations = [k for k in reader.get_variable_to_shape_map() if "iteration" in k]
    assert iterations and reader.get_tensor(iterations[0]) == 60  # the optimizer went on too

    with np.load(out / "predictions.npz") as npz:
        assert npz["val_probs"].shape[1] == 3 and set(npz["val_labels"]) == {0, 2}
        logits = npz["val_logits"]
    train(cfg)  # already at its last step: nothing to train, the same model exported again
    with np.load(out / "predictions.npz") as npz:
        np.testing.assert_array_equal(npz["val_logits"], logits)
    with pytest.raises(ValueError, match="other settings"):
        train(tiny_config(phantom, out, cache_dir, steps=90, task="binary"))


def test_forced_mixed_precision_and_xla_paths_run_on_cpu(
    phantom: Path, cache_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(phantom, tmp_path / "mp", cache_dir, steps=6, eval_every=3,
                      mixed_precision="on", xla="on", bn_recalibration=2)  # fmt: skip
    run = train(cfg)
    runtime = json.loads((run / "config.json").read_text())["runtime"]
    assert runtime["mixed_precision"] and runtime["xla"] and runtime["strategy"] == "default"
    import keras

    model = keras.saving.load_model(run / "model.keras")
    assert {w.dtype for w in model.weights} == {"float32"}
    assert model.dtype_policy.name == "float32"  # the node gets a float32 model
    # resumable without mixed precision (e.g. a GPU run continued on a CPU)
    train(tiny_config(phantom, tmp_path / "mp", cache_dir, steps=9, eval_every=3,
                      mixed_precision="off", bn_recalibration=2))  # fmt: skip
    assert [r["step"] for r in read_history(run)] == [3, 6, 9]


def test_mirrored_strategy_over_two_cpu_replicas(phantom: Path, cache_dir: Path, tmp_path: Path):
    """The multi-replica code path (all-reduce, per-replica batches) on two logical CPUs, in a
    child process because logical devices must be set before TensorFlow starts."""
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        two = [tf.config.LogicalDeviceConfiguration()] * 2
        tf.config.set_logical_device_configuration(cpu, two)
        from training.train import TrainConfig, train, read_history
        if __name__ == "__main__":
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
            cfg = TrainConfig(manifest={str(phantom)!r}, out_dir={str(tmp_path / "m")!r},
                input_size={SIZE}, widths={TINY_WIDTHS}, batch=16, steps=8, eval_every=4,
                checkpoint_every=4, cache_dir={str(cache_dir)!r}, progress=False,
                fractions=(0.6, 0.2, 0.2), bn_recalibration=2)
            run = train(cfg, strategy=strategy)
            print("STEPS", [int(r["step"]) for r in read_history(run)])
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=180, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STEPS [4, 8]" in result.stdout
    runtime = json.loads((tmp_path / "m" / "config.json").read_text())["runtime"]
    assert (runtime["strategy"], runtime["replicas"]) == ("mirrored", 2)


def test_exported_artifact_loads_in_node_with_same_probabilities(
    phantom: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from mriqa_node.ml.artifact import ArtifactError, read_meta
    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION
    from training.calibration import softmax
    from training.export import export_artifact

    # 512 px on a CPU costs ~1 s a step even this narrow (the 10x10 first convolution)
    cfg = tiny_config(phantom, tmp_path / "run512", cache_dir, input_size=INPUT_SIZE, steps=8,
                      batch=8, widths=TINY_WIDTHS, eval_every=8, checkpoint_every=8,
                      bn_recalibration=2)  # fmt: skip
    run = train(cfg)
    meta = export_artifact(run, tmp_path / "artifact", "convnet-test", "1.0.0", sensitivity=0.9)
    loaded = read_meta(tmp_path / "artifact")  # hash, preprocessing version, input size
    assert loaded.sha256 == meta.sha256 and loaded.trained and loaded.output == "logits"
    assert (loaded.task, loaded.class_names) == ("binary", ["non_diagnostic", "diagnostic"])
    assert loaded.preprocessing_version == PREPROCESSING_VERSION
    assert 0 <= loaded.policy["slice_threshold"] <= 1
    assert 0 <= loaded.policy["series_threshold"] <= 1
    op = loaded.extra["operating_point"]
    assert op["chosen_on"] == "val" and op["slice"]["sensitivity"] >= 0.9
    assert op["max_false_alerts"] == 0.05 and op["false_alert_cap_met"] in (True, None)
    assert loaded.temperature == loaded.extra["calibration"]["temperature"] > 0
    data = loaded.training_data
    assert data["label_source"] == "mean" and len(data["manifest_sha256"]) == 64
    assert set(data["counts"]) == {"train", "val", "test"}
    assert data["counts"]["test"]["classes"] == {"0": 12, "1": 12}
    assert loaded.test_metrics["n_slices"] == 24 and "auc" in loaded.test_metrics

    with np.load(run / "predictions.npz") as npz:
        sops, probs, logits = npz["val_sop_uids"], npz["val_probs"], npz["val_logits"]
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-6)
    records = {r.sop_instance_uid: r for r in read_manifest(phantom)}
    cache = ImageCache(cache_dir, size=INPUT_SIZE)
    x = cache.gather(np.array([cache.rows(records[s])[0] for s in sops]))
    scorer = Scorer(tmp_path / "artifact")
    np.testing.assert_allclose(scorer.predict(x), softmax(logits, loaded.temperature), atol=1e-5)

    small = train(tiny_config(phantom, tmp_path / "run64", cache_dir, steps=2, eval_every=2))
    with pytest.raises(ArtifactError, match="512"):
        export_artifact(small, tmp_path / "nope", "x", "0")


def test_merged_convnets_score_the_mean_of_their_logits(tmp_path: Path) -> None:
    import keras

    from mriqa_node.ml.architectures import convnet
    from mriqa_node.ml.explain import feature_layer
    from mriqa_node.ml.ood import feature_model
    from training.ensemble import merge_convnets

    keras.utils.set_random_seed(1)
    members = [convnet(64, widths=SMALL_WIDTHS, downsample=2, head="gap") for _ in range(3)]
    merged = merge_convnets(members)
    x = np.random.default_rng(0).random((5, 64, 64, 1)).astype(np.float32)
    each = [np.asarray(m(x, training=False)) for m in members]
    assert (
        np.abs(each[0] - each[1]).max() > 1e-3
    )  # members that differ, so the mean means something
    np.testing.assert_allclose(np.asarray(merged(x, training=False)), np.mean(each, axis=0),
                               atol=1e-5)  # fmt: skip
    # one feature map for Grad-CAM and the OOD guard: the members' side by side
    assert feature_layer(merged).name == "members"
    assert feature_model(merged)(x)[1].shape == (5, 3 * SMALL_WIDTHS[-1])
    merged.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(merged(x)), atol=1e-6)
    with pytest.raises(ValueError, match="GAP-head"):
        merge_convnets([convnet(64, widths=SMALL_WIDTHS)] * 2)  # flatten head
    with pytest.raises(ValueError, match="at least two"):
        merge_convnets(members[:1])


def test_merged_runs_export_and_the_node_scores_them_as_exported(
    phantom: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.preprocess import INPUT_SIZE
    from training.calibration import softmax
    from training.cli import main as cli_main
    from training.ensemble import merge_runs
    from training.export import export_artifact

    def tiny_gap_run(name: str, steps: int = 4, **kw) -> Path:
        return train(tiny_config(phantom, tmp_path / name, cache_dir, input_size=INPUT_SIZE,
                                 steps=steps, batch=8, widths=TINY_WIDTHS, downsample=2,
                                 head="gap", eval_every=steps, checkpoint_every=steps,
                                 bn_recalibration=2, **kw))  # fmt: skip

    split = dict(val_patients=("PAT00[0-2]",), test_patients=("PAT00[3-5]",),
                 fractions=(1.0, 0.0, 0.0))  # fmt: skip
    runs = [tiny_gap_run(f"seed{seed}", seed=seed, **split) for seed in (0, 1)]
    merged_cli = CliRunner().invoke(cli_main, ["ensemble", *map(str, runs), "--out",
                                               str(tmp_path / "ensemble")])  # fmt: skip
    assert merged_cli.exit_code == 0, merged_cli.output
    run = tmp_path / "ensemble"
    with np.load(run / "predictions.npz") as npz:
        merged = {k: npz[k] for k in npz.files}
    members = [dict(np.load(r / "predictions.npz")) for r in runs]
    mean = (members[0]["val_logits"] + members[1]["val_logits"]) / 2
    np.testing.assert_allclose(merged["val_logits"], mean)
    meta = export_artifact(run, tmp_path / "artifact", "ensemble-test", "1.0.0", ood=False)

    records = {r.sop_instance_uid: r for r in read_manifest(phantom)}
    cache = ImageCache(cache_dir, size=INPUT_SIZE)
    sops = merged["val_sop_uids"][:16]
    x = cache.gather(np.array([cache.rows(records[s])[0] for s in sops]))
    expected = softmax(merged["val_logits"][:16], meta.temperature)
    np.testing.assert_allclose(Scorer(tmp_path / "artifact").predict(x), expected, atol=1e-4)

    other = tiny_gap_run("other", steps=1)  # the default split: another one
    with pytest.raises(ValueError, match="split"):
        merge_runs([runs[0], other], tmp_path / "nope")


# --- operating point ------------------------------------------------------------------------


def test_operating_point_reaches_sensitivity_on_val() -> None:
    from mriqa_node.domain.verdict import SeriesPolicy
    from training.export import choose_operating_point, series_groups, series_verdicts

    rng = np.random.default_rng(0)
    probs, labels, series = [], [], []
    for s in range(60):
        bad = s % 3 == 0
        n = int(rng.integers(10, 30))
        y = np.ones(n, int)
        if bad:
            y[rng.choice(n, max(1, n // 3), replace=False)] = 0
        elif s % 3 == 1:
            y[rng.integers(n)] = 0  # one bad slice: below top_fraction, the series is fine
        p0 = np.clip(np.where(y == 0, 0.65, 0.3) + rng.normal(0, 0.18, n), 0, 1)
        probs.append(np.stack([p0, 1 - p0], axis=1))
        labels.append(y)
        series += [f"S{s}"] * n
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    for target in (0.8, 0.9, 0.95, 1.0):  # no false-alert cap here: tests/test_calibration.py
        op = choose_operating_point(probs, labels, series, sensitivity=target,
                                    max_false_alerts=1.0, top_fraction=0.2)  # fmt: skip
        assert op["slice"]["sensitivity"] >= target and op["series"]["sensitivity"] >= target
        assert 0 < op["slice"]["specificity"] < 1
        # the slice threshold is the most specific one that keeps the sensitivity
        p_bad = probs[labels == 0, 0]
        assert np.mean(p_bad > op["slice_threshold"]) < target
        # the achieved figures are the node's own decisions under this policy
        policy = SeriesPolicy.from_dict(op["policy"])
        groups = series_groups(series)
        _, flags = series_verdicts(probs[:, 0], groups, policy)
        truth = np.array([np.mean(labels[i] == 0) >= 0.2 for i in groups.values()])
        assert flags[truth].mean() == op["series"]["sensitivity"]
        assert op["series"]["n_positive"] == truth.sum() == 20
    assert (
        op["series_threshold"]
        <= choose_operating_point(probs, labels, series, 0.8, 1.0)["series_threshold"]
    )

    none_bad = choose_operating_point(probs[labels == 1], labels[labels == 1],
                                      np.asarray(series)[labels == 1])  # fmt: skip
    assert none_bad["slice_threshold"] == 0.5 and none_bad["warnings"]


def test_evaluate_predictions_three_class() -> None:
    from mriqa_node.domain.verdict import SeriesPolicy
    from training.export import evaluate_predictions

    y = np.array([0, 0, 1, 1, 2, 2, 0, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 2, 0, 1]] * 0.8 + 0.2 / 3
    preds = {"test_probs": probs, "test_labels": y, "test_series_uids": np.array(list("AAAABBBB"))}
    m = evaluate_predictions(preds, "test", SeriesPolicy(slice_threshold=0.5))
    assert m["accuracy"] == 6 / 8 and m["confusion_matrix"][0] == [2, 1, 0]
    assert m["recall_per_class"] == [2 / 3, 1.0, 2 / 3] and 0 < m["auc"] <= 1
    assert m["slice_at_threshold"]["sensitivity"] == 2 / 3
    assert m["series"]["n_series"] == 2 and m["series"]["n_positive"] == 2
