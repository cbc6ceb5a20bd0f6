"""DICOM header parsing for intake: dataset -> InstanceHeader, with clear reasons on failure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from mriqa_node.dicom.scan import scan_header
from mriqa_node.domain.records import InstanceHeader
from mriqa_node.domain.scope import ImageFacts, orientation_of

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
STORAGE_SOP_CLASSES = (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE)


class InvalidInstance(ValueError):
    """The dataset cannot be accepted; str(exc) says why (logged, never with patient data)."""


def read_header(stream: bytes, transfer_syntax_uid: str, decode: Callable[[], Dataset],
                start: int = 0) -> InstanceHeader:  # fmt: skip
    """The header of a received data set (``stream[start:]``): from one scan of its bytes
    where that is sure (dicom/scan.py), else from ``decode()`` (pydicom), which also says what
    is wrong."""
    scanned = scan_header(stream, transfer_syntax_uid, start)
    if scanned is None:
        return parse_header(decode(), transfer_syntax_uid)
    return header_from(scanned, transfer_syntax_uid)


def parse_header(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    """The header of a data set pydicom decoded."""
    _check_complete(ds)
    return header_from(ds, transfer_syntax_uid)


def header_from(ds: Mapping[Any, Any], transfer_syntax_uid: str) -> InstanceHeader:
    """From a pydicom Dataset or the same fields as scan_header found them (read with .get
    only, keyword or private tag)."""
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        if not str(ds.get(k, "") or "").strip()
    ]
    if missing:
        raise InvalidInstance(f"missing {', '.join(missing)}")
    frames = _int(ds.get("NumberOfFrames")) or 1
    expected = _int(ds.get("ImagesInAcquisition"))
    if expected is None and ds.get("SOPClassUID") == ENHANCED_MR_IMAGE_STORAGE and frames > 1:
        expected = frames  # one enhanced object usually carries the whole series
    return InstanceHeader(
        sop_class_uid=str(ds.get("SOPClassUID")),
        sop_instance_uid=str(ds.get("SOPInstanceUID")).strip(),
        series_uid=str(ds.get("SeriesInstanceUID")).strip(),
        study_uid=str(ds.get("StudyInstanceUID")).strip(),
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
        facts=image_facts(ds),
    )


# Enhanced MR states the pulse sequence as EchoPulseSequence (+ EchoPlanarPulseSequence).
_ECHO_PULSE = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}


def image_facts(ds: Mapping[Any, Any]) -> ImageFacts:
    """The header facts scope rules read (classic and Enhanced MR, vendors' b-value tags)."""
    sequence = _values(ds.get("ScanningSequence"))
    if not sequence:
        sequence = _ECHO_PULSE.get(str(ds.get("EchoPulseSequence", "")).upper(), ())
        if str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES":
            sequence = (*sequence, "EP")
    return ImageFacts(
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=_str(ds.get("Modality"), 16),
        image_type=_values(ds.get("ImageType")),
        scanning_sequence=sequence,
        sequence_variant=_values(ds.get("SequenceVariant")),
        b_value=_b_value(ds),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        samples_per_pixel=_int(ds.get("SamplesPerPixel")) or 1,
        body_part=_str(ds.get("BodyPartExamined"), 16),
        orientation=orientation_of(_orientation(ds)),
        series_description=_str(ds.get("SeriesDescription"), 200),
        protocol_name=_str(ds.get("ProtocolName"), 200),
    )


def _values(value: object) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    items = value if isinstance(value, list | tuple | MultiValue) else [value]
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def _b_value(ds: Mapping[Any, Any]) -> float | None:
    """The largest b-value stated: DICOM (0018,9087), per frame in Enhanced MR, GE (0043,1039,
    stored + 1e9 on some releases), Siemens (0019,100C)."""
    found: list[float] = []
    for tag in ((0x0018, 0x9087), (0x0019, 0x100C)):
        if (value := _tag_value(ds, tag)) is not None:
            found.append(_float(value))
    if (value := _tag_value(ds, (0x0043, 0x1039))) is not None:
        first = _float(value)
        found.append(first % 1e9 if first >= 1e9 else first)
    for item in ds.get("PerFrameFunctionalGroupsSequence", [])[:512]:
        for diffusion in item.get("MRDiffusionSequence", []):
            found.append(_float(diffusion.get("DiffusionBValue")))
    found = [b for b in found if b == b]  # drop NaN (unreadable values)
    return max(found) if found else None


def _float(value: object) -> float:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").split("\\")[0]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _tag_value(ds: Mapping[Any, Any], tag: tuple[int, int]) -> Any:
    """A Dataset gives an element for a tag, scan_header the value itself."""
    item = ds.get(tag)
    return getattr(item, "value", item)


def _orientation(ds: Mapping[Any, Any]) -> list[float] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        for group in ds.get("SharedFunctionalGroupsSequence", []):
            for item in group.get("PlaneOrientationSequence", []):
                iop = item.get("ImageOrientationPatient")
    try:
        return [float(v) for v in iop] if iop is not None else None
    except (TypeError, ValueError):
        return None


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
