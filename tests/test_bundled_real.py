"""The bundled model on real clean structural series: no rescan alert; with heavy motion: one.

The clean series are the real ones of ../shared/data (the held-out ones among them were never
seen in training, see the model card); the corrupted copies are made here with a seed the
bundle recipe never used, so the exact images were never seen either.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mriqa_node.domain.verdict import SeriesPolicy
from mriqa_node.ml.artifact import read_meta
from mriqa_node.ml.scorer import Scorer
from mriqa_node.offline import score_files
from training.realmotion import CorruptConfig, write_corrupted

BUNDLED = Path(__file__).resolve().parents[1] / "mriqa_node" / "models" / "bundled"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLEAN = [
    SHARED / "anatomy" / "siemens_prismafit_brain_t1_fl2d_sag_hfs",
    SHARED / "anatomy" / "uih_umr770_brain_t1_gre3d_sag",
    SHARED / "anatomy" / "ge_signahdx_heart_cine_ssfp_sax_scd0000201",
    SHARED / "anatomy" / "unknown_unknown_cspine_t2star_gre_tra",
    SHARED / "intake" / "philips_elition_classic_mprage",
    SHARED / "intake" / "siemens_xa30_enh_t1",
]
INTAKE_STRUCTURAL = [SHARED / "intake" / p for p in (
    "philips_elition_classic_mprage", "siemens_xa30_enh_t1", "pydicom_siemens_overlay",
    "pydicom_mr2_philips_shoulder",
)]  # fmt: skip
pytestmark = pytest.mark.skipif(
    not all(p.exists() for p in CLEAN), reason=f"real series not present under {SHARED}"
)


@pytest.fixture(scope="module")
def scorer() -> tuple[Scorer, SeriesPolicy]:
    return Scorer(BUNDLED), SeriesPolicy.from_dict(read_meta(BUNDLED).policy)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corrupted")
    config = CorruptConfig(copies=2, levels=("clean", "heavy"), max_slices=12, seed=12345,
                           reslice=False)  # fmt: skip
    write_corrupted(CLEAN, out, config, progress=False)
    return out


def _verdicts(files: list[Path], scorer: Scorer, policy: SeriesPolicy) -> dict[str, str]:
    """Series UID -> "description: label" of every scored series."""
    reports, _ = score_files(files, scorer, policy)
    return {r.series_uid: f"{r.description}: {r.verdict['label']}" for r in reports if r.slices}


def test_clean_real_series_raise_no_alert(scorer):
    """Every clean DICOM series of ../shared/data/anatomy and the intake's structural ones:
    brains of four vendors in four patient positions, hearts, shoulders, an abdomen."""
    folders = [*sorted((SHARED / "anatomy").iterdir()), *INTAKE_STRUCTURAL]
    notes = (".nii.gz", ".txt", ".md", ".csv")
    files = [f for p in folders if p.is_dir() for f in sorted(p.rglob("*"))
             if f.is_file() and not f.name.endswith(notes)]  # fmt: skip
    verdicts = _verdicts(files, *scorer)
    assert len(verdicts) >= 11  # 12 series; pydicom's abdominal slice is an MPR: out of scope
    alerted = [v for v in verdicts.values() if v.endswith("non_diagnostic")]
    assert not alerted, verdicts


def _by_level(corrupted: Path, scorer) -> dict[str, list[str]]:
    by_level: dict[str, list[str]] = {"clean": [], "heavy": []}
    for v in _verdicts(sorted(corrupted.rglob("*.dcm")), *scorer).values():
        by_level["heavy" if "[heavy]" in v else "clean"].append(v.rsplit(": ", 1)[1])
    return by_level


def test_the_same_series_with_heavy_motion_raise_one(scorer, corrupted: Path):
    by_level = _by_level(corrupted, scorer)
    assert len(by_level["heavy"]) == len(CLEAN)
    assert by_level["heavy"].count("non_diagnostic") == len(CLEAN), by_level


def test_their_clean_copies_rarely_raise_one(scorer, corrupted: Path):
    """The clean copies carry the nuisance looks (noise, window, partial Fourier, zoom...). On
    48 such copies (seed 777) 2.2.0 and 2.3.0 alerted on 4 each, 2.4.0 on 3, 2.5.0 on 1; which of
    these six crosses the series threshold changes with the training seed
    (docs/bundled-model/loso.md, 2026-12-07): at most one of six, while the original clean
    series above raise none."""
    by_level = _by_level(corrupted, scorer)
    assert len(by_level["clean"]) == len(CLEAN)
    assert by_level["clean"].count("non_diagnostic") <= 1, by_level


def test_bundled_model_is_calibrated_and_says_what_it_was_trained_on():
    meta = read_meta(BUNDLED)
    assert meta.temperature != 1.0
    card = (BUNDLED / "MODEL_CARD.md").read_text()
    assert "Real anatomy never seen in training" in card


def test_the_guard_passes_held_out_real_slices_and_stops_what_is_not_mr(scorer):
    """The OOD guard of the bundled model: held-out real structural slices (the Philips MPRAGE,
    a test subject) pass; pure noise and a photograph-like image do not; a blank image is
    stopped before it, by the node's no-anatomy check."""
    import numpy as np
    import pydicom

    from mriqa_node.preprocess import preprocess_frames
    from tests.test_preprocess import make_ds
    from training.ood import probe_images

    model, _ = scorer
    assert model.ood_threshold is not None
    files = sorted((SHARED / "intake" / "philips_elition_classic_mprage").rglob("*.dcm"))[::4]
    frames = [preprocess_frames(pydicom.dcmread(f)) for f in files]
    images = np.concatenate([f.images[f.anatomy] for f in frames])
    _, distance = model.score(images)
    assert len(distance) >= 30 and np.mean(distance <= model.ood_threshold) >= 0.95, distance
    probes = probe_images(512)
    _, probe_distance = model.score(np.stack([probes["noise"], probes["photo"]])[..., None])
    assert np.all(probe_distance > model.ood_threshold), probe_distance
    blank = make_ds(np.zeros((64, 64), np.uint16))
    assert len(preprocess_frames(blank).anatomy) == 0
