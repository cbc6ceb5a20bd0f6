"""DICOM header parsing for intake: dataset -> InstanceHeader, with clear reasons on failure."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import UID

from mriqa_node.domain.records import InstanceHeader

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
STORAGE_SOP_CLASSES = (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE)


class InvalidInstance(ValueError):
    """The dataset cannot be accepted; str(exc) says why (logged, never with patient data)."""


def parse_header(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        if not str(ds.get(k, "") or "").strip()
    ]
    if missing:
        raise InvalidInstance(f"missing {', '.join(missing)}")
    _check_complete(ds)
    frames = _int(ds.get("NumberOfFrames")) or 1
    expected = _int(ds.get("ImagesInAcquisition"))
    if expected is None and ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE and frames > 1:
        expected = frames  # one enhanced object usually carries the whole series
    return InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        series_uid=str(ds.SeriesInstanceUID).strip(),
        study_uid=str(ds.StudyInstanceUID).strip(),
        transfer_syntax_uid=str(transfer_syntax_uid),
        instance_number=_int(ds.get("InstanceNumber")),
        frames=frames,
        expected_slices=expected if expected and expected > 0 else None,
        modality=_str(ds.get("Modality"), 16),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_str(ds.get("SeriesDescription"), 200),
        protocol_name=_str(ds.get("ProtocolName"), 200),
        patient_id=_str(ds.get("PatientID"), 64),
        patient_name=_str(ds.get("PatientName"), 200),
        accession_number=_str(ds.get("AccessionNumber"), 16),
        study_date=_str(ds.get("StudyDate"), 8),
        study_description=_str(ds.get("StudyDescription"), 200),
    )


def _check_complete(ds: Dataset) -> None:
    """A stream that ended early: pydicom keeps the short value of the last element without a
    word, so compare the last (still raw, unconverted) element with its declared length."""
    tags = list(ds.keys())
    if not tags:
        raise InvalidInstance("empty dataset")
    raw = ds.get_item(tags[-1])
    length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        raise InvalidInstance(
            f"truncated dataset: element {raw.tag} has {len(value)} of {length} bytes"
        )


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _str(value: object, limit: int) -> str | None:
    text = str(value).strip() if value not in (None, "") else ""
    return text[:limit] or None
