"""The DICOM objects the node sends to the PACS about a series it assessed: pure builders.

No database, no network: each function takes the series' instance headers (datasets read with
``stop_before_pixels=True``), the domain's plain data (mriqa_node.domain.qa) and the new
object's UIDs, and returns a ``FileDataset`` ready to save (``save_as(path,
enforce_file_format=True)``) or to C-STORE. :class:`QaEncoder` is the service layer's view of
them: spool files in, finished bytes out. Every object is a new instance in a
new series of the *same study*, with the Patient and General Study attributes copied from the
assessed images, so the PACS files it with the right patient and study.

* :func:`build_rejection_kos` -- an IHE IOCM (Imaging Object Change Management) rejection note:
  a Key Object Selection Document titled (113001, DCM, "Rejected for Quality Reasons") that
  lists every instance of a non-diagnostic series. An IOCM-aware archive hides (or deletes) the
  referenced instances when it receives it; any other archive simply stores it in the study.
  Template TID 2010: a "Key Object Description" TEXT item saying why, then one IMAGE (or
  COMPOSITE) item per rejected instance.
* :func:`build_qa_sr` -- the QA result for viewers and downstream systems: a Comprehensive SR
  with the series verdict, score, slice counts, worst slices, the model's identity and, per
  slice, P(non-diagnostic) linked to the image it was inferred from.
* :func:`build_montage_sc` -- a Secondary Capture image (RGB) of a montage or heat map the
  node rendered as PNG, so that any plain viewer shows the result next to the series.

Design choices (SR):

* Private coding scheme ``99MRIQA`` (declared in CodingSchemeIdentificationSequence) for the
  concepts DICOM has no code for. Standard codes are used where they exist: observer context
  (121005/121007/121012/121013), algorithm name and version (111001/111003), "Source of
  Measurement" (121112) for the image a slice score comes from, "Measurement failure" (114006)
  as the numeric value qualifier of a score that could not be computed, UCUM "1" (no units).
* The verdict is a CODE item (99MRIQA, QA-VERDICT) whose value is one of QA-NONDIAG,
  QA-DIAG, QA-EXCELLENT, QA-UNSCORABLE (see :data:`VERDICT_CODES`), so a receiving system can
  act on it without parsing text; an unknown label falls back to a TEXT item (same concept).
* Per slice, a NUM (99MRIQA, QA-P-NONDIAG) with two children: HAS PROPERTIES NUM "Slice number"
  (1-based, anatomical order) and INFERRED FROM IMAGE (121112, DCM, "Source of Measurement")
  pointing at the slice's SOP instance (with ReferencedFrameNumber, 1-based, for multi-frame
  objects). Both relationships are permitted from a NUM source in the Comprehensive SR IOD;
  INFERRED FROM is the one that says the value was derived from the image, as in TID 300.
  The slice items are grouped under a CONTAINER (99MRIQA, QA-SLICES).

Input conventions: ``frame`` and ``index`` (the position in anatomical order) are 0-based, as
the node stores them; the objects show them 1-based.

highdicom (0.28) was tried for these objects and not adopted: its Key Object Selection
references every instance as IMAGE, so a rejection note for a series holding a non-image
object (MR Spectroscopy) fails DCMTK's dsrdump, and its content date is local time without
an offset. The hand-written builders below pass dsrdump, dsr2xml and Orthanc (tests).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from mriqa_node.domain.qa import EncodedObject, ObjectUids, QaResult, ReportedSlice

__all__ = [
    "COMPREHENSIVE_SR_STORAGE",
    "KEY_OBJECT_SELECTION_STORAGE",
    "PRIVATE_SCHEME",
    "SECONDARY_CAPTURE_STORAGE",
    "VERDICT_CODES",
    "QaEncoder",
    "build_montage_sc",
    "build_qa_sr",
    "build_rejection_kos",
]

KEY_OBJECT_SELECTION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.59")
COMPREHENSIVE_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.33")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

MANUFACTURER = "mriqa-node"
IMPLEMENTATION_VERSION = "MRIQA_NODE"  # SH, at most 16 characters
DEFAULT_CHARSET = "ISO_IR 192"  # UTF-8, where the source images declare none

Code = tuple[str, str, str]  # (value, scheme designator, meaning)

PRIVATE_SCHEME = "99MRIQA"

# Standard codes (PS3.16, DCM and UCUM).
REJECTED_FOR_QUALITY = ("113001", "DCM", "Rejected for Quality Reasons")
KEY_OBJECT_DESCRIPTION = ("113012", "DCM", "Key Object Description")
OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
DEVICE = ("121007", "DCM", "Device")
DEVICE_OBSERVER_UID = ("121012", "DCM", "Device Observer UID")
DEVICE_OBSERVER_NAME = ("121013", "DCM", "Device Observer Name")
ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
SOURCE_OF_MEASUREMENT = ("121112", "DCM", "Source of Measurement")
MEASUREMENT_FAILURE = ("114006", "DCM", "Measurement failure")
NO_UNITS = ("1", "UCUM", "no units")

# Private codes (99MRIQA); values are SH (<= 16 characters), meanings LO (<= 64).
QA_MOTION = ("QA-MOTION", PRIVATE_SCHEME, "MRI motion artifact quality assessment")
QA_VERDICT = ("QA-VERDICT", PRIVATE_SCHEME, "Series quality verdict")
QA_SCORE = ("QA-SCORE", PRIVATE_SCHEME, "Series score, P(non-diagnostic)")
QA_N_SLICES = ("QA-N-SLICES", PRIVATE_SCHEME, "Number of slices")
QA_N_UNSCORABLE = ("QA-N-UNSCORABLE", PRIVATE_SCHEME, "Number of unscorable slices")
QA_N_FLAGGED = ("QA-N-FLAGGED", PRIVATE_SCHEME, "Number of flagged slices")
QA_WORST = ("QA-WORST", PRIVATE_SCHEME, "Worst slices")
QA_DECIDED_AT = ("QA-DECIDED-AT", PRIVATE_SCHEME, "Verdict decided at")
QA_MODEL_SHA256 = ("QA-MODEL-SHA256", PRIVATE_SCHEME, "Model SHA-256")
QA_MODEL_TASK = ("QA-MODEL-TASK", PRIVATE_SCHEME, "Model task")
QA_SLICES = ("QA-SLICES", PRIVATE_SCHEME, "Per-slice assessment")
QA_P_NONDIAG = ("QA-P-NONDIAG", PRIVATE_SCHEME, "P(non-diagnostic)")
QA_SLICE_NUMBER = ("QA-SLICE-NO", PRIVATE_SCHEME, "Slice number")

#: Verdict label (mriqa_node.domain.verdict) -> value of the QA-VERDICT CODE item.
VERDICT_CODES: dict[str, Code] = {
    "non_diagnostic": ("QA-NONDIAG", PRIVATE_SCHEME, "Non-diagnostic (motion artifacts)"),
    "diagnostic": ("QA-DIAG", PRIVATE_SCHEME, "Diagnostic"),
    "excellent": ("QA-EXCELLENT", PRIVATE_SCHEME, "Excellent"),
    "unscorable": ("QA-UNSCORABLE", PRIVATE_SCHEME, "Unscorable"),
}

# Copied from the assessed images: Patient module, General Study module (type 2 ones are
# always written, empty where the source has none), then optional ones when present.
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
_PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "InstitutionName",
)


# --------------------------------------------------------------------------------------------
# shared helpers


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("mriqa-node")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise ValueError(f"instance header without {keyword}")
    return value


def _unique_instances(instances: Sequence[Dataset]) -> list[Dataset]:
    """Validate one series of one study; drop repeated SOP instances (first one kept)."""
    if not instances:
        raise ValueError("no instances given")
    studies = {_uid(ds, "StudyInstanceUID") for ds in instances}
    if len(studies) > 1:
        raise ValueError(f"instances of {len(studies)} studies given, expected one")
    series = {_uid(ds, "SeriesInstanceUID") for ds in instances}
    if len(series) > 1:
        raise ValueError(f"instances of {len(series)} series given, expected one")
    seen: set[str] = set()
    unique = []
    for ds in instances:
        _uid(ds, "SOPClassUID")
        sop = _uid(ds, "SOPInstanceUID")
        if sop not in seen:
            seen.add(sop)
            unique.append(ds)
    return unique


def _new_object(
    instances: Sequence[Dataset],
    uids: ObjectUids,
    *,
    sop_class_uid: UID,
    modality: str,
    series_number: int,
    series_description: str,
    station_ae: str,
    when: datetime | None,
) -> FileDataset:
    """A new instance in a new series of the instances' study, with file meta, SOP Common,
    Patient, General Study, series and General Equipment attributes, and content date/time."""
    src = instances[0]
    # All dates and times in UTC, declared once by Timezone Offset From UTC (DCMTK 3.6.7
    # rejects a DT that carries its own "+0000" offset).
    when = (when or datetime.now(UTC)).astimezone(UTC)
    sop_uid = UID(uids.instance)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    # SOP Common. The character set follows the source so copied names keep their encoding.
    ds.SpecificCharacterSet = copy.deepcopy(src.get("SpecificCharacterSet") or DEFAULT_CHARSET)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")

    # Patient and General Study (copied), study identity unchanged.
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword in src:
            ds[keyword] = copy.deepcopy(src[keyword])
        else:
            setattr(ds, keyword, "")
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in src and src[keyword].value not in (None, ""):
            ds[keyword] = copy.deepcopy(src[keyword])
    ds.StudyInstanceUID = _uid(src, "StudyInstanceUID")

    # Series (General / SR Document / Key Object Document Series): always a new one.
    ds.Modality = modality
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = series_number
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = series_description

    # General Equipment.
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = _software_version()
    ds.StationName = station_ae[:16]

    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = "+0000"
    return ds


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _code_seq(code: Code) -> DicomSequence:
    return DicomSequence([_code(code)])


def _sop_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = _uid(ds, "SOPClassUID")
    item.ReferencedSOPInstanceUID = _uid(ds, "SOPInstanceUID")
    return item


def _evidence(instances: Sequence[Dataset]) -> DicomSequence:
    """Hierarchical SOP Instance Reference: study -> series -> every instance, once each."""
    by_series: dict[str, list[Dataset]] = {}
    for ds in instances:
        by_series.setdefault(_uid(ds, "SeriesInstanceUID"), []).append(ds)
    study = Dataset()
    study.StudyInstanceUID = _uid(instances[0], "StudyInstanceUID")
    study.ReferencedSeriesSequence = DicomSequence()
    for series_uid, members in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = DicomSequence([_sop_ref(ds) for ds in members])
        study.ReferencedSeriesSequence.append(series)
    return DicomSequence([study])


def _referenced_requests(instances: Sequence[Dataset]) -> DicomSequence | None:
    """Referenced Request Sequence items from the images' Request Attributes Sequence, one per
    distinct request; None where the images carry none."""
    items: list[Dataset] = []
    seen: set[tuple[str, str]] = set()
    study_uid = _uid(instances[0], "StudyInstanceUID")
    for ds in instances:
        for req in ds.get("RequestAttributesSequence") or []:
            accession = str(req.get("AccessionNumber") or ds.get("AccessionNumber") or "")
            procedure_id = str(req.get("RequestedProcedureID") or "")
            if (accession, procedure_id) in seen:
                continue
            seen.add((accession, procedure_id))
            item = Dataset()
            item.StudyInstanceUID = study_uid
            item.AccessionNumber = accession
            item.IssuerOfAccessionNumberSequence = copy.deepcopy(
                req.get("IssuerOfAccessionNumberSequence")
                or ds.get("IssuerOfAccessionNumberSequence")
                or DicomSequence()
            )
            item.PlacerOrderNumberImagingServiceRequest = ""
            item.FillerOrderNumberImagingServiceRequest = ""
            item.RequestedProcedureID = procedure_id
            item.RequestedProcedureDescription = str(req.get("RequestedProcedureDescription") or "")
            item.RequestedProcedureCodeSequence = copy.deepcopy(
                req.get("RequestedProcedureCodeSequence") or DicomSequence()
            )
            items.append(item)
    return DicomSequence(items) if items else None


def _is_image(ds: Dataset) -> bool:
    """Image storage SOP classes are referenced as IMAGE, anything else as COMPOSITE."""
    uid = UID(_uid(ds, "SOPClassUID"))
    name = uid.name if uid.is_valid else ""
    if name and name != str(uid):  # a SOP class pydicom knows
        return "Image Storage" in name
    return "Rows" in ds and "Columns" in ds  # private SOP class: judge by the Image Pixel module


def _content_item(relationship: str, value_type: str, concept: Code | None = None) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    if concept is not None:
        item.ConceptNameCodeSequence = _code_seq(concept)
    return item


def _text(relationship: str, concept: Code, text: str) -> Dataset:
    item = _content_item(relationship, "TEXT", concept)
    item.TextValue = text
    return item


def _code_item(relationship: str, concept: Code, value: Code) -> Dataset:
    item = _content_item(relationship, "CODE", concept)
    item.ConceptCodeSequence = _code_seq(value)
    return item


def _uidref(relationship: str, concept: Code, uid: str) -> Dataset:
    item = _content_item(relationship, "UIDREF", concept)
    item.UID = uid
    return item


def _ds_value(value: float) -> str:
    """A DS string (at most 16 characters) for a finite float."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def _num(relationship: str, concept: Code, value: float | None, unit: Code = NO_UNITS) -> Dataset:
    """NUM item; a missing or non-finite value gives an empty Measured Value Sequence (type 2)
    and the numeric value qualifier "Measurement failure"."""
    item = _content_item(relationship, "NUM", concept)
    if value is None or not np.isfinite(float(value)):
        item.MeasuredValueSequence = DicomSequence()
        item.NumericValueQualifierCodeSequence = _code_seq(MEASUREMENT_FAILURE)
        return item
    measured = Dataset()
    measured.NumericValue = _ds_value(float(value))
    measured.MeasurementUnitsCodeSequence = _code_seq(unit)
    item.MeasuredValueSequence = DicomSequence([measured])
    return item


def _reference_item(
    relationship: str, ds: Dataset, concept: Code | None = None, frames: Iterable[int] = ()
) -> Dataset:
    item = _content_item(relationship, "IMAGE" if _is_image(ds) else "COMPOSITE", concept)
    ref = _sop_ref(ds)
    frames = list(frames)
    if frames and item.ValueType == "IMAGE":
        ref.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
    item.ReferencedSOPSequence = DicomSequence([ref])
    return item


def _dicom_datetime(moment: datetime) -> str:
    """A DICOM DT in UTC (the object's Timezone Offset From UTC); a naive value is UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    text = moment.strftime("%Y%m%d%H%M%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text


# --------------------------------------------------------------------------------------------
# Key Object Selection: IHE IOCM rejection note


def build_rejection_kos(
    instances: Sequence[Dataset],
    uids: ObjectUids,
    *,
    series_number: int = 9901,
    station_ae: str = "MRIQA",
    when: datetime | None = None,
    description: str = "Motion artifacts: non-diagnostic (mriqa-node)",
) -> FileDataset:
    """IHE IOCM "Rejected for Quality Reasons" Key Object Selection Document for one series.

    References every instance of ``instances`` (headers of one series; repeated SOP instances
    are referenced once) in the evidence and in the content tree (TID 2010). ``description``
    becomes the "Key Object Description" TEXT item, the first content item. Raises ValueError
    for an empty list, or instances of more than one study or series.
    """
    unique = _unique_instances(instances)
    ds = _new_object(
        unique,
        uids,
        sop_class_uid=KEY_OBJECT_SELECTION_STORAGE,
        modality="KO",
        series_number=series_number,
        series_description="Rejected for Quality Reasons",
        station_ae=station_ae,
        when=when,
    )
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()  # type 2

    # Key Object Document module.
    requests = _referenced_requests(unique)
    if requests is not None:
        ds.ReferencedRequestSequence = requests
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(unique)

    # SR Document Content module, root of TID 2010.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _code_seq(REJECTED_FOR_QUALITY)
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    content = [_text("CONTAINS", KEY_OBJECT_DESCRIPTION, description)]
    content += [_reference_item("CONTAINS", inst) for inst in unique]
    ds.ContentSequence = DicomSequence(content)
    return ds


# --------------------------------------------------------------------------------------------
# Comprehensive SR: the QA result


def _slice_text(entry: ReportedSlice) -> str:
    p = entry.p_nondiagnostic
    number = entry.index + 1
    return f"slice {number} (P={p:.3f})" if p is not None else f"slice {number}"


def build_qa_sr(
    instances: Sequence[Dataset],
    result: QaResult,
    uids: ObjectUids,
    *,
    series_number: int = 9902,
    station_ae: str = "MRIQA",
    when: datetime | None = None,
) -> FileDataset:
    """Comprehensive SR with the motion QA of one series (see the module docstring for the tree).

    Every slice of ``result`` must refer to one of ``instances`` (ValueError otherwise); all of
    ``instances`` are listed as evidence.
    """
    unique = _unique_instances(instances)
    by_sop = {_uid(ds, "SOPInstanceUID"): ds for ds in unique}
    unknown = [s.sop_instance_uid for s in result.slices if s.sop_instance_uid not in by_sop]
    if unknown:
        raise ValueError(f"{len(unknown)} slice(s) refer to instances not given: {unknown[:3]}")

    ds = _new_object(
        unique,
        uids,
        sop_class_uid=COMPREHENSIVE_SR_STORAGE,
        modality="SR",
        series_number=series_number,
        series_description="MRIQA motion QA",
        station_ae=station_ae,
        when=when,
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "mriqa-node motion QA codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    ds.CodingSchemeIdentificationSequence = DicomSequence([scheme])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()  # type 2

    # SR Document General module.
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence()  # type 2
    requests = _referenced_requests(unique)
    if requests is not None:
        ds.ReferencedRequestSequence = requests
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(unique)

    # SR Document Content module.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _code_seq(QA_MOTION)
    ds.ContinuityOfContent = "SEPARATE"

    content: list[Dataset] = [
        _code_item("HAS OBS CONTEXT", OBSERVER_TYPE, DEVICE),
        _uidref(
            "HAS OBS CONTEXT",
            DEVICE_OBSERVER_UID,
            generate_uid(entropy_srcs=["mriqa-node device observer", station_ae]),
        ),
        _text("HAS OBS CONTEXT", DEVICE_OBSERVER_NAME, station_ae),
    ]

    if result.label in VERDICT_CODES:
        content.append(_code_item("CONTAINS", QA_VERDICT, VERDICT_CODES[result.label]))
    else:
        content.append(_text("CONTAINS", QA_VERDICT, result.label or "unknown"))
    content.append(_num("CONTAINS", QA_SCORE, result.score))
    content.append(_num("CONTAINS", QA_N_SLICES, result.n_slices))
    content.append(_num("CONTAINS", QA_N_UNSCORABLE, result.n_unscorable))
    if result.n_flagged is not None:
        content.append(_num("CONTAINS", QA_N_FLAGGED, result.n_flagged))
    worst = ", ".join(_slice_text(w) for w in result.worst) or "none"
    content.append(_text("CONTAINS", QA_WORST, worst))
    if result.decided_at is not None:
        item = _content_item("CONTAINS", "DATETIME", QA_DECIDED_AT)
        item.DateTime = _dicom_datetime(result.decided_at)
        content.append(item)

    model = result.model
    content.append(_text("CONTAINS", ALGORITHM_NAME, model.name or "unknown"))
    content.append(_text("CONTAINS", ALGORITHM_VERSION, model.version or "unknown"))
    if model.sha256:
        content.append(_text("CONTAINS", QA_MODEL_SHA256, model.sha256))
    if model.task:
        content.append(_text("CONTAINS", QA_MODEL_TASK, model.task))

    per_slice = _content_item("CONTAINS", "CONTAINER", QA_SLICES)
    per_slice.ContinuityOfContent = "SEPARATE"
    per_slice.ContentSequence = DicomSequence()
    for entry in sorted(result.slices, key=lambda s: s.index):
        instance = by_sop[entry.sop_instance_uid]
        n_frames = int(instance.get("NumberOfFrames") or 1)
        frames = [entry.frame + 1] if n_frames > 1 or entry.frame > 0 else []
        num = _num("CONTAINS", QA_P_NONDIAG, entry.p_nondiagnostic)
        num.ContentSequence = DicomSequence(
            [
                _num("HAS PROPERTIES", QA_SLICE_NUMBER, entry.index + 1),
                _reference_item("INFERRED FROM", instance, SOURCE_OF_MEASUREMENT, frames),
            ]
        )
        per_slice.ContentSequence.append(num)
    content.append(per_slice)
    ds.ContentSequence = DicomSequence(content)
    return ds


# --------------------------------------------------------------------------------------------
# Secondary Capture: a rendered montage / heat map


def build_montage_sc(
    instances: Sequence[Dataset],
    png_bytes: bytes,
    uids: ObjectUids,
    *,
    series_number: int = 9903,
    description: str = "MRIQA motion QA montage",
    station_ae: str = "MRIQA",
    when: datetime | None = None,
) -> FileDataset:
    """Secondary Capture image (8-bit RGB, uncompressed) of a PNG, in the instances' study.

    The PNG is decoded with Pillow and converted to RGB (an alpha channel is dropped).
    The picture must not show patient-identifying text (BurnedInAnnotation is "NO").
    """
    unique = _unique_instances(instances)
    with Image.open(io.BytesIO(png_bytes)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    rows, columns = rgb.shape[:2]
    if rows > 0xFFFF or columns > 0xFFFF:
        raise ValueError(f"image of {columns}x{rows} is too large for DICOM")

    ds = _new_object(
        unique,
        uids,
        sop_class_uid=SECONDARY_CAPTURE_STORAGE,
        modality="OT",
        series_number=series_number,
        series_description=description[:64],
        station_ae=station_ae,
        when=when,
    )
    # SC Equipment, General Image, SC Image.
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.DerivationDescription = description
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.DateOfSecondaryCapture = ds.ContentDate
    ds.TimeOfSecondaryCapture = ds.ContentTime

    # Image Pixel.
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0  # R1 G1 B1 R2 G2 B2 ...
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    data = rgb.tobytes()
    if len(data) % 2:
        data += b"\0"  # values have even length
    ds.PixelData = data
    ds["PixelData"].VR = "OB"
    return ds


# --------------------------------------------------------------------------------------------
# The service layer's port: spool files in, finished objects out


class QaEncoder:
    """Builds the objects from the series' files (headers only are read) and encodes them."""

    def __init__(self, station_ae: str) -> None:
        self.station_ae = station_ae

    def rejection_note(self, sources: Sequence[Path], uids: ObjectUids,
                       when: datetime) -> EncodedObject:  # fmt: skip
        return _encoded(build_rejection_kos(_headers(sources), uids, station_ae=self.station_ae,
                                            when=when))  # fmt: skip

    def qa_report(self, sources: Sequence[Path], result: QaResult, uids: ObjectUids,
                  when: datetime) -> EncodedObject:  # fmt: skip
        return _encoded(build_qa_sr(_headers(sources), result, uids, station_ae=self.station_ae,
                                    when=when))  # fmt: skip

    def montage(self, sources: Sequence[Path], png: bytes, uids: ObjectUids,
                when: datetime) -> EncodedObject:  # fmt: skip
        return _encoded(build_montage_sc(_headers(sources), png, uids,
                                         station_ae=self.station_ae, when=when))  # fmt: skip


def _headers(paths: Sequence[Path]) -> list[Dataset]:
    """The instances' headers; ValueError for a file that is not DICOM."""
    try:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    except pydicom.errors.InvalidDicomError as exc:
        raise ValueError(str(exc)) from exc


def _encoded(ds: FileDataset) -> EncodedObject:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return EncodedObject(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                         str(ds.SeriesInstanceUID), buf.getvalue())  # fmt: skip
