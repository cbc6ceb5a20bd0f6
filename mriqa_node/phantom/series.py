"""Phantom series for the demo scanner (``mriqa demo``), tests and benchmarks."""

from __future__ import annotations

from pydicom.dataset import Dataset

from .acquire import MotionPlan, scan
from .dicom import Header, datasets, uid

__all__ = ["DEMO_RANDOMISE", "synth_series"]

# Milder than training's default: the demo shows series a model trained on the reference look
# also knows, yet no two demo subjects look alike.
DEMO_RANDOMISE = 0.3
_KEY_TAG = 0x4D524951  # "MRIQ": separates the demo's streams from the training set's


def synth_series(
    n_slices: int = 30,
    size: int = 512,
    motion: float = 0.0,
    seed: int = 0,
    announce_count: bool = True,
    series_description: str = "T2 FSE AX ABDOMEN",
    study_uid: str | None = None,
    patient_id: str = "DEMO0001",
    series_number: int = 1,
    randomise: float = DEMO_RANDOMISE,
) -> list[Dataset]:
    """Datasets with file_meta set (Explicit VR Little Endian), ready to save or send.

    ``motion`` (0 still .. 1 deep free breathing) scales the breathing excursion that is
    applied in k-space; 0 gives an image free of any ghosting. The same arguments always give
    identical pixels and UIDs; subject, protocol and noise depend on ``seed`` only, so series
    differing only in ``motion`` differ only by the motion artefact.
    """
    key = (abs(seed), int(seed < 0), _KEY_TAG)
    result = scan(key, n_slices, size, MotionPlan.level(motion), randomise)
    if study_uid is None:
        study_uid = uid("demo-study", seed, patient_id)
    series_uid = uid(
        "demo-series",
        study_uid,
        seed,
        series_number,
        series_description,
        float(motion),
        n_slices,
        size,
        announce_count,
        float(randomise),
    )
    header = Header(
        patient_id=patient_id,
        patient_name="DEMO^PHANTOM",
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=uid("demo-frame-of-reference", study_uid),
        series_number=series_number,
        series_description=series_description,
        announce_count=announce_count,
    )
    return datasets(header, result)
