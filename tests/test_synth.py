"""The synthetic training-data generator: reproducible, valid DICOM, physically plausible motion,
domain randomisation, raters who disagree like people do.

Training results are only comparable if the same seed gives the same data, and the node's tests of
the model are only meaningful if the files are what a scanner would send. Sizes are tiny (64-128
pixels, a few subjects and slices) so the module runs in seconds.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from mriqa_node.phantom.anatomy import draw_subject, render_series
from mriqa_node.preprocess import preprocess
from training.evaluate import cohen_kappa, jaccard_matrix
from training.synth import MANIFEST_COLUMNS, SynthConfig, apply_motion, generate, rate

TINY = SynthConfig(subjects=3, slices_per_subject=(3, 4), size=64, seed=11, workers=1)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-tiny")
    return generate(TINY, out, progress=False)


@pytest.fixture(scope="module")
def phantom_slice() -> tuple[np.ndarray, np.ndarray]:
    """A clean 128 x 128 upper-abdomen slice and its body coverage."""
    anat = render_series(draw_subject(np.random.default_rng(3)), np.array([0.7]), 128)
    return anat.image[0], anat.body[0]


def test_same_seed_same_bytes_whatever_the_worker_count(tiny: Path, tmp_path: Path) -> None:
    other = generate(SynthConfig(**{**TINY.__dict__, "workers": 2}), tmp_path, progress=False)
    assert other.read_bytes() == tiny.read_bytes()
    for row in _rows(tiny):
        a = (tiny.parent / row["path"]).read_bytes()
        b = (other.parent / row["path"]).read_bytes()
        assert a == b, row["path"]
    summary = json.loads((other.parent / "summary.json").read_text())
    assert summary["workers"] == 2


def test_other_seed_other_data(tiny: Path, tmp_path: Path) -> None:
    config = SynthConfig(**{**TINY.__dict__, "seed": TINY.seed + 1, "subjects": 1})
    other = generate(config, tmp_path, progress=False)
    first = pydicom.dcmread(other.parent / _rows(other)[0]["path"])
    mine = pydicom.dcmread(tiny.parent / _rows(tiny)[0]["path"])
    assert first.StudyInstanceUID != mine.StudyInstanceUID
    assert first.PixelData != mine.PixelData


def test_randomise_is_configured_and_changes_only_the_look(tiny: Path, tmp_path: Path) -> None:
    summary = json.loads((tiny.parent / "summary.json").read_text())
    assert TINY.randomise == 1.0 and summary["config"]["randomise"] == 1.0
    reference = generate(SynthConfig(**{**TINY.__dict__, "randomise": 0.0}), tmp_path)
    mine, other = _rows(tiny), _rows(reference)
    # Same subjects, slice counts and UIDs (the randomisation has a stream of its own) ...
    keys = ("patient_id", "series_uid", "sop_instance_uid", "instance")
    assert [[r[k] for k in keys] for r in mine] == [[r[k] for k in keys] for r in other]
    # ... but other images.
    a = pydicom.dcmread(tiny.parent / mine[0]["path"]).pixel_array
    b = pydicom.dcmread(reference.parent / other[0]["path"]).pixel_array
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        generate(SynthConfig(**{**TINY.__dict__, "randomise": -0.1}), tmp_path / "bad")


def test_manifest_columns_files_and_preprocessing(tiny: Path) -> None:
    with tiny.open(newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == list(MANIFEST_COLUMNS)
    rows = _rows(tiny)
    lo, hi = TINY.slices_per_subject
    assert TINY.subjects * lo <= len(rows) <= TINY.subjects * hi
    for row in rows:
        path = tiny.parent / row["path"]
        assert not Path(row["path"]).is_absolute() and path.is_file()
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.SeriesInstanceUID == row["series_uid"] == path.parent.name
        assert ds.PatientID == row["patient_id"] == path.parent.parent.name
        x = preprocess(ds)
        assert x.shape == (1, 512, 512, 1) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
        assert {row["rater1"], row["rater2"], row["true_class"]} <= {"0", "1", "2"}
        assert 0.0 <= float(row["severity"]) <= 1.0
    summary = json.loads((tiny.parent / "summary.json").read_text())
    assert summary["slices"] == len(rows) and summary["subjects"] == TINY.subjects
    truth = summary["class_counts"]["truth"]
    assert sum(truth.values()) == len(rows)
    assert truth == {c: sum(r["true_class"] == c for r in rows) for c in "012"}
    assert -1.0 <= summary["kappa_rater1_rater2"] <= 1.0 and summary["seconds"] > 0


def test_headers_consistent_per_series(tiny: Path) -> None:
    rows = _rows(tiny)
    sops = [r["sop_instance_uid"] for r in rows]
    assert len(set(sops)) == len(sops)
    patients = sorted({r["patient_id"] for r in rows})
    assert patients == [f"SYN{i:04d}" for i in range(1, TINY.subjects + 1)]
    for pid in patients:
        series = [pydicom.dcmread(tiny.parent / r["path"]) for r in rows if r["patient_id"] == pid]
        n = len(series)
        for key in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
            "PatientName",
            "PatientBirthDate",
            "StudyDate",
            "AccessionNumber",
        ):
            assert len({str(ds.get(key)) for ds in series}) == 1, key
        assert [int(ds.InstanceNumber) for ds in series] == list(range(1, n + 1))
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in series])
        steps = np.diff(z)
        assert np.all(steps < 0) or np.all(steps > 0)
        assert np.allclose(np.abs(steps), float(series[0].SpacingBetweenSlices), atol=1e-3)
        for ds in series:
            assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "MR" and ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
            assert ds.ImagesInAcquisition == n
            assert ds.InPlanePhaseEncodingDirection == "COL"
            assert int(ds.EchoTrainLength) >= 2 and ds.ScanningSequence == "SE"
            assert float(ds.WindowWidth) > 1 and ds.Rows == ds.Columns == TINY.size
            assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
            assert ds.pixel_array.max() <= (1 << int(ds.BitsStored)) - 1


def test_apply_motion_zero_is_identity(phantom_slice: tuple[np.ndarray, np.ndarray]) -> None:
    img, _ = phantom_slice
    out = apply_motion(img, 0.0, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, img, atol=1e-5 * float(img.max()))


def test_apply_motion_error_grows_with_severity(
    phantom_slice: tuple[np.ndarray, np.ndarray],
) -> None:
    img, _ = phantom_slice
    errors = []
    for severity in (0.05, 0.2, 0.45, 0.7, 1.0):
        e = [
            np.linalg.norm(apply_motion(img, severity, np.random.default_rng(s)) - img)
            for s in range(6)
        ]
        errors.append(float(np.mean(e)) / float(np.linalg.norm(img)))
    assert errors[0] > 0
    assert all(b > a for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("pe_axis", [0, 1])
def test_ghosts_lie_along_the_phase_encoding_axis(
    phantom_slice: tuple[np.ndarray, np.ndarray], pe_axis: int
) -> None:
    img, body = phantom_slice
    if pe_axis == 1:
        img, body = img.T.copy(), body.T.copy()
    diff = np.abs(apply_motion(img, 0.8, np.random.default_rng(1), pe_axis=pe_axis) - img)
    rows = np.flatnonzero(body.max(axis=1) > 0.5)
    cols = np.flatnonzero(body.max(axis=0) > 0.5)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Background beside the body: above/below it (same columns) versus left/right (same rows).
    above_below = np.concatenate([diff[:r0, c0:c1].ravel(), diff[r1:, c0:c1].ravel()])
    left_right = np.concatenate([diff[r0:r1, :c0].ravel(), diff[r0:r1, c1:].ravel()])
    along, across = (above_below, left_right) if pe_axis == 0 else (left_right, above_below)
    assert along.size and across.size
    assert np.mean(along**2) > 5.0 * np.mean(across**2)


def test_raters_disagree_sometimes_but_agree_mostly() -> None:
    rng = np.random.default_rng(7)
    severity = rng.beta(2.0, 3.0, size=400)
    r1, r2 = rate(severity, 1, rng), rate(severity, 2, rng)
    kappa = cohen_kappa(r1, r2)
    assert 0.35 < kappa < 0.9, kappa
    assert 0.05 < np.mean(r1 != r2) < 0.4
    assert np.count_nonzero(r2 == 0) > np.count_nonzero(r1 == 0)  # rater 2 is stricter
    jac = jaccard_matrix(r1, r2)
    assert np.all(np.diag(jac) < 0.95) and np.all(np.diag(jac) > 0.3)
    assert jac[0, 1] > 0 and jac[1, 2] > 0
    assert cohen_kappa(r1, r1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        rate(severity, 3, rng)


def test_truth_covers_all_classes_on_a_moderate_config(tmp_path: Path) -> None:
    config = SynthConfig(subjects=12, slices_per_subject=(3, 3), size=128, seed=3, workers=2)
    rows = _rows(generate(config, tmp_path, progress=False))
    assert {r["true_class"] for r in rows} == {"0", "1", "2"}
    severity = np.array([float(r["severity"]) for r in rows])
    assert severity.min() < 0.2 and severity.max() > 0.5


def test_dcmdump_accepts_a_generated_file(tiny: Path) -> None:
    dcmdump = shutil.which("dcmdump") or "/usr/bin/dcmdump"
    if not Path(dcmdump).exists():
        pytest.skip("DCMTK dcmdump is not installed")
    path = tiny.parent / _rows(tiny)[0]["path"]
    proc = subprocess.run(
        [dcmdump, "-dc", "+E", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith(("E:", "W:", "F:"))
    ]
    assert not problems, problems
    assert "MRImageStorage" in proc.stdout and "InPlanePhaseEncodingDirection" in proc.stdout
