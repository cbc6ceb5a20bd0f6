"""Real anatomy as training data: k-space motion on real slices, nuisances, the corrupt command."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.test_preprocess import make_ds
from training.manifest import read_manifest
from training.realmotion import CorruptConfig, corrupt_slice, find_series, write_corrupted
from training.realmotion.kspace import LineOrder, draw_motion, severity_from_error
from training.realmotion.nuisance import Nuisance, draw_nuisance
from training.synth.raters import classify

ANATOMY = Path(__file__).resolve().parents[2] / "shared" / "data" / "anatomy"
needs_anatomy = pytest.mark.skipif(
    not ANATOMY.is_dir(), reason=f"real anatomy not present at {ANATOMY}"
)


def _head(size: int = 96, seed: int = 0) -> np.ndarray:
    """A textured ellipse on a dark background: enough structure for ghosts to show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body = ((y / 0.8) ** 2 + (x / 0.65) ** 2 < 1).astype(np.float32)
    inner = ((y / 0.5) ** 2 + ((x - 0.1) / 0.3) ** 2 < 1).astype(np.float32)
    img = 800 * body + 600 * inner + 50 * rng.random((size, size)) * body
    return img.astype(np.float32)


def _corrupt(image, amplitude, seed=0, nuisance=None, neighbour=None):
    nuisance = nuisance or Nuisance()
    rng = np.random.default_rng(seed)
    draw = draw_motion(rng, rigid=1.0, periodic=1.0, through=1.0)
    order = LineOrder(n_pe=image.shape[0], etl=8, tr_s=2.0)
    return corrupt_slice(image, amplitude, order, draw, nuisance, rng, neighbour)


def test_deterministic_by_seed_and_identity_at_zero():
    img = _head()
    a, ea = _corrupt(img, 0.8, seed=3, neighbour=img[::-1])
    b, eb = _corrupt(img, 0.8, seed=3, neighbour=img[::-1])
    c, _ = _corrupt(img, 0.8, seed=4, neighbour=img[::-1])
    assert np.array_equal(a, b) and ea == eb
    assert not np.array_equal(a, c)
    same, err = _corrupt(img, 0.0)
    assert err == 0.0 and same.tobytes() == img.tobytes()


def test_measured_severity_grows_with_amplitude():
    img = _head()
    errors = [_corrupt(img, amp, seed=1, neighbour=np.roll(img, 3, 0))[1]
              for amp in (0.01, 0.1, 0.4, 1.0)]  # fmt: skip
    assert all(b > a for a, b in itertools.pairwise(errors)), errors
    sev = severity_from_error(np.asarray(errors))
    assert classify(sev[:1])[0] == 2 and classify(sev[-1:])[0] == 0  # excellent .. non-diag


def test_nuisances_leave_the_label_unchanged():
    img = _head()
    rng = np.random.default_rng(0)
    agree = []
    for i in range(12):
        nuisance = draw_nuisance(rng, 1.0)
        for amp in (0.0, 0.03, 1.0):
            _, plain = _corrupt(img, amp, seed=i)
            out, with_nuisance = _corrupt(img, amp, seed=i, nuisance=nuisance)
            assert np.isfinite(out).all()
            if amp == 0.0:
                assert with_nuisance == 0.0  # a clean slice stays clean under any nuisance
            agree.append(classify(severity_from_error(plain)) ==
                         classify(severity_from_error(with_nuisance)))  # fmt: skip
    assert np.mean(agree) >= 0.9


def _write_clean_series(folder: Path, subject: str, n: int = 4, size: int = 64) -> None:
    folder.mkdir(parents=True)
    series = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    for i in range(n):
        tags = {"PatientID": subject, "Manufacturer": "ACME", "InstanceNumber": i + 1,
                "ImageType": ["ORIGINAL", "PRIMARY", "M"], "EchoTrainLength": 8,
                "RepetitionTime": 3000, **series}  # fmt: skip
        ds = make_ds(_head(size, seed=i).astype(np.uint16), **tags)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)


def test_corrupt_command_writes_dicom_and_a_manifest(tmp_path: Path):
    from mriqa_node.preprocess import preprocess

    _write_clean_series(tmp_path / "in" / "a", "SUBJ-A")
    _write_clean_series(tmp_path / "in" / "b", "SUBJ-B")
    (tmp_path / "in" / "README.txt").write_text("not DICOM")
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), seed=7)
    manifest = write_corrupted([tmp_path / "in"], tmp_path / "out", config, progress=False)
    records = read_manifest(manifest)
    assert len(records) == 2 * 2 * 4
    assert {r.patient_id for r in records} == {"ACME_SUBJ-A", "ACME_SUBJ-B"}
    assert len({r.series_uid for r in records}) == 4
    clean = [r for r in records if r.severity == 0.0]
    assert len(clean) == 8 and all(r.true_class == 2 for r in clean)
    ds = pydicom.dcmread(records[0].path)
    assert "SUBJ" not in str(ds.PatientName) or ds.PatientID.startswith("ACME")
    assert preprocess(ds).shape[1:] == (512, 512, 1)
    # Same seed, same bytes.
    again = write_corrupted([tmp_path / "in"], tmp_path / "again", config, progress=False)
    first, second = read_manifest(manifest), read_manifest(again)
    assert [Path(r.path).read_bytes() for r in first] == [Path(r.path).read_bytes() for r in second]


def test_paired_copies_share_one_look_at_different_motion(tmp_path: Path):
    """--paired: copies 2k and 2k+1 get the same nuisance draw (window, noise, zoom, flips),
    so a look never goes with one label only; unpaired copies each draw their own."""
    import csv

    from click.testing import CliRunner

    from training.cli import main

    _write_clean_series(tmp_path / "in" / "a", "SUBJ-A")
    looks = {}
    for paired in (True, False):
        out = tmp_path / f"out-{paired}"
        args = ["corrupt", str(tmp_path / "in"), "--out", str(out), "--copies", "4", "--seed",
                "7", "--levels", "clean,heavy", "--paired" if paired else "--unpaired"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        with (out / "corruption.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        looks[paired] = {int(r["copy"]): r["nuisance"] for r in rows}
        assert {r["level"] for r in rows if int(r["copy"]) % 2} == {"heavy"}
    assert looks[True][0] == looks[True][1] and looks[True][2] == looks[True][3]
    assert looks[True][0] != looks[True][2]
    assert len(set(looks[False].values())) == 4
    bad = CliRunner().invoke(main, ["corrupt", str(tmp_path / "in"), "--out", str(tmp_path / "x"),
                                    "--levels", "clean,wobbly"])  # fmt: skip
    assert bad.exit_code != 0 and "wobbly" in bad.output


@needs_anatomy
def test_real_anatomy_series_and_subjects():
    series = find_series(ANATOMY)
    assert len(series) >= 10
    decubitus = {s.subject for s in series if "prismafit" in s.name}
    assert len(decubitus) == 1  # one volunteer in four positions stays one subject
    assert all(s.slices.ndim == 3 and np.isfinite(s.slices).all() for s in series)


@needs_anatomy
@pytest.mark.slow
def test_tiny_model_separates_clean_from_heavy_motion_on_an_unseen_subject(tmp_path: Path):
    """Trained on some real subjects, tested on a subject (and vendor, and orientation) it
    never saw: clean and heavily corrupted slices must separate well above chance."""
    from sklearn.metrics import roc_auc_score

    from training.train import TrainConfig, train

    folders = [
        "siemens_prismafit_brain_t1_fl2d_sag_hfs", "siemens_prismafit_brain_t1_fl2d_sag_hfp",
        "ge_signahdx_heart_cine_ssfp_sax_scd0000101", "ge_signahdx_heart_cine_ssfp_sax_scd0000201",
        "unknown_unknown_cspine_t2star_gre_tra", "hitachi_echelon_shoulder_se_obl",
        "unknown_unknown_brain_t1_tra_seg3d",
    ]  # fmt: skip
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), max_slices=8, nuisance=0.5,
                           reslice=False)  # fmt: skip
    manifest = write_corrupted([ANATOMY / f for f in folders], tmp_path / "data", config,
                               progress=False)  # fmt: skip
    run = train(
        TrainConfig(
            manifest=manifest, out_dir=tmp_path / "run", widths=(8, 16, 32, 64), downsample=4,
            head="gap", steps=200, batch=16, eval_every=200, checkpoint_every=200,
            val_patients=("GE_MEDICAL_SYSTEMS_SCD0000201",),
            test_patients=("unknown_unknown_brain_t1_tra_seg3d",), fractions=(1.0, 0.0, 0.0),
            cache_dir=tmp_path / "cache", bn_recalibration=4, workers=1, progress=False,
        )
    )  # fmt: skip
    preds = np.load(run / "predictions.npz")
    truth = preds["test_truth"]
    clean_or_heavy = truth != 1
    auc = roc_auc_score(truth[clean_or_heavy] == 0, preds["test_probs"][clean_or_heavy, 0])
    assert auc > 0.75, auc


def test_real_evaluation_per_source_counts_alerts_and_catches():
    from mriqa_node.domain.verdict import SeriesPolicy
    from training.realeval import evaluate_real, pooled

    rng = np.random.default_rng(0)
    preds, corruption = {k: [] for k in ("sop", "series", "subject", "logits", "labels")}, {}
    for subject in ("A", "B"):
        for copy, level in enumerate(("clean", "heavy", "clean", "heavy", "heavy")):
            for k in range(5):
                sop = f"{subject}.{copy}.{k}"
                # The last heavy-level copy's moves left no trace: it reads as diagnostic.
                heavy = level == "heavy" and copy < 4
                # B's model is confused: its clean series look like motion.
                p = 0.9 if heavy or subject == "B" else 0.1
                p = float(np.clip(p + 0.05 * rng.standard_normal(), 0.01, 0.99))
                preds["sop"].append(sop)
                preds["series"].append(f"{subject}.{copy}")
                preds["subject"].append(subject)
                preds["logits"].append([np.log(p), np.log(1 - p)])
                preds["labels"].append(0 if heavy else 1)
                corruption[sop] = {"source": subject, "level": level,
                                   "amplitude": "0" if level == "clean" else "0.8",
                                   "severity": "0.9" if heavy else "0",
                                   "true_class": "0" if heavy else "2"}  # fmt: skip
    npz = {
        "test_sop_uids": np.asarray(preds["sop"]), "test_series_uids": np.asarray(preds["series"]),
        "test_patient_ids": np.asarray(preds["subject"]),
        "test_logits": np.asarray(preds["logits"]), "test_labels": np.asarray(preds["labels"]),
    }  # fmt: skip
    out = evaluate_real(npz, "test", corruption, SeriesPolicy(slice_threshold=0.5,
                                                              series_threshold=0.5))  # fmt: skip
    assert out["A"]["auc_clean_vs_heavy"] == 1.0
    assert (out["A"]["clean_series_alerted"], out["A"]["clean_series"]) == (0, 2)
    assert (out["A"]["nondiag_series_caught"], out["A"]["nondiag_series"]) == (2, 2)
    assert (out["A"]["heavy_series_caught"], out["A"]["heavy_series"]) == (2, 3)
    assert out["B"]["clean_series_alerted"] == 2  # the per-source view shows B's false alerts
    assert pooled(out)["clean_series_alerted"] == 2


def test_a_run_trained_elsewhere_is_scored_on_real_anatomy_it_never_saw(tmp_path: Path):
    """`reproduce`'s real-anatomy evaluation: every slice of a corrupted set, through the
    run's own model, and a per-source table in the run report."""
    from tests.test_report import make_run
    from training.realeval import predict_real
    from training.report import write_run_report, write_summary

    _write_clean_series(tmp_path / "in" / "a", "SUBJ-A")
    _write_clean_series(tmp_path / "in" / "b", "SUBJ-B")
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), seed=3)
    manifest = write_corrupted([tmp_path / "in"], tmp_path / "real", config, progress=False)
    run = make_run(tmp_path / "runs", "convnet", "binary")
    preds = np.load(predict_real(run, manifest, batch=5, progress=False))
    assert preds["real_logits"].shape == (16, 2)
    assert set(preds["real_patient_ids"]) == {"ACME_SUBJ-A", "ACME_SUBJ-B"}
    assert np.isfinite(preds["real_logits"]).all()
    text = write_run_report(run).read_text()
    section = text.split("outside this run's data")[1].split("## ")[0]
    assert "| ACME_SUBJ-A | 4/" in section and "| ACME_SUBJ-B | 4/" in section
    summary = write_summary([run], tmp_path / "summary").read_text()
    row = summary.split("On real anatomy (trained on phantoms only)")[1].splitlines()
    assert any(line.startswith("| ConvNet binary | 2 |") and line.endswith("/2 |") for line in row)


def test_evaluate_command_scores_an_artifact_per_source(tmp_path: Path, model_dir: Path):
    """`mriqa-train evaluate`: an exported model over corrupted real series, one row per
    source (--source keeps only the named ones), series counted as the operating point counts
    them; the policy, calibration and preprocessing are the artifact's own."""
    import json

    from click.testing import CliRunner

    from training.cli import main as train_main

    _write_clean_series(tmp_path / "in" / "a", "SUBJ-A")
    _write_clean_series(tmp_path / "in" / "b", "SUBJ-B")
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), seed=7)
    write_corrupted([tmp_path / "in"], tmp_path / "data", config, progress=False)

    def evaluate(*args: str):
        return CliRunner().invoke(train_main, ["evaluate", str(model_dir),
                                               str(tmp_path / "data"), *args])  # fmt: skip

    table = evaluate()
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.startswith("| ACME_")]
    assert [r.split(" | ")[0] for r in rows] == ["| ACME_SUBJ-A", "| ACME_SUBJ-B"]
    only = evaluate("--source", "ACME_SUBJ-B", "--json")
    figures = json.loads(only.output[only.output.index("{") :])
    assert list(figures) == ["ACME_SUBJ-B"]
    b = figures["ACME_SUBJ-B"]
    assert b["clean_series"] == 1 and b["heavy_series"] == 1
    assert b["slices"]["clean"] == 4 and 0 <= b["clean_series_alerted"] <= 1
    assert b["nondiag_series"] == int(b["slices"]["heavy"] >= 1)  # top fraction 0.2 of 4
    missing = evaluate("--source", "NOBODY")
    assert missing.exit_code != 0 and "no corrupted slices" in missing.output


@pytest.mark.slow
def test_leave_one_source_out_holds_each_source_out_and_scores_it_on_other_data(tmp_path: Path):
    """Each fold never sees its source (nor does its operating point); its row is that source
    alone; --eval-data scores the same folds on another corrupted set of those subjects
    without training them again."""
    import json

    from training.loso import run_loso
    from training.train import TrainConfig

    for name in ("A", "B", "C", "D"):
        _write_clean_series(tmp_path / "in" / name, f"SUBJ-{name}")
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), seed=3)
    manifest = write_corrupted([tmp_path / "in"], tmp_path / "data", config, progress=False)
    other = CorruptConfig(copies=4, levels=("clean", "heavy"), seed=4, paired=True)
    write_corrupted([tmp_path / "in"], tmp_path / "other", other, progress=False)
    base = TrainConfig(manifest=manifest, out_dir=tmp_path / "loso", widths=(4, 8, 8, 8),
                       downsample=8, head="gap", steps=3, batch=4, eval_every=3,
                       checkpoint_every=3, cache_dir=tmp_path / "cache", bn_recalibration=1,
                       workers=1, progress=False)  # fmt: skip
    sources = {"a": ("ACME_SUBJ-A",), "b": ("ACME_SUBJ-B",)}
    val = ("ACME_SUBJ-A", "ACME_SUBJ-C")
    corruption = [tmp_path / "data" / "corruption.csv"]
    summary = run_loso(base, corruption, sources, val, tmp_path / "loso")
    assert list(summary["per_source"]) == ["a: ACME_SUBJ-A", "b: ACME_SUBJ-B"]
    assert summary["per_source"]["a: ACME_SUBJ-A"]["clean_series"] == 1
    splits = json.loads((tmp_path / "loso" / "a" / "splits.json").read_text())["patients"]
    assert splits["test"] == ["ACME_SUBJ-A"]
    assert "ACME_SUBJ-A" not in splits["val"] + splits["train"]
    checkpoints = sorted(p.name for p in (tmp_path / "loso" / "a" / "checkpoints").iterdir())

    again = run_loso(base, corruption, sources, val, tmp_path / "loso",
                     eval_data=[tmp_path / "other"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "loso" / "a" / "checkpoints").iterdir()) == (
        checkpoints
    )  # the same folds, not trained again
    assert [r["slices"] for r in again["per_source"].values()] == [
        r["slices"] for r in summary["per_source"].values()]  # fmt: skip
    assert again["per_source_eval"]["a: ACME_SUBJ-A"]["clean_series"] == 2  # 4 copies there
    assert "The same folds on" in (tmp_path / "loso" / "loso.md").read_text()

    # A second seed per fold, merged as the bundle recipe merges its runs: seed 0 is reused.
    merged = run_loso(base, corruption, {"a": sources["a"]}, val, tmp_path / "loso", seeds=2)
    assert sorted(p.name for p in (tmp_path / "loso" / "a" / "checkpoints").iterdir()) == (
        checkpoints
    )
    members = json.loads((tmp_path / "loso" / "a-ensemble" / "ensemble.json").read_text())
    assert [Path(m).name for m in members["members"]] == ["a", "a-seed1"]
    assert members["seeds"] == [0, 1]
    assert merged["seeds"] == 2 and "2 seeds merged" in (tmp_path / "loso" / "loso.md").read_text()
    assert merged["per_source"]["a: ACME_SUBJ-A"]["slices"] == again["per_source"][
        "a: ACME_SUBJ-A"]["slices"]  # fmt: skip
