"""Synthetic series as real DICOM: MR Image Storage, 16-bit, complete and consistent headers.

Training reads these files through the node's own ``preprocess``, and people open them in
viewers, so they must look like what a scanner sends: one study and one series per subject,
patient/study/series attributes identical across the series, per-instance position, number,
times and UIDs consistent with the geometry. Nothing depends on the wall clock or on the process
that wrote the file: UIDs, dates and times derive from the generator seed and subject index, so
the same seed gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

__all__ = ["SeriesInfo", "uids", "write_series"]

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
IMPLEMENTATION_VERSION = "MRIQA_SYNTH_1"
_UID_TAG = "mriqa-node-training-synth-v1"


def _ds(value: float) -> DSfloat:
    """Decimal String within the 16-character limit."""
    return DSfloat(float(value), auto_format=True)


def _key(*parts: object) -> int:
    """Stable integer from text (Python's hash() is salted per process)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def uids(seed: int, index: int) -> tuple[str, str, str]:
    """(study, series, frame of reference) UIDs of subject ``index`` for a generator seed."""
    study, series, frame = (
        generate_uid(entropy_srcs=[_UID_TAG, kind, str(seed), str(index)])
        for kind in ("study", "series", "frame-of-reference")
    )
    return study, series, frame


@dataclass(frozen=True)
class SeriesInfo:
    """Acquisition and subject attributes of one synthetic series."""

    seed: int
    index: int  # subject index (0-based)
    patient_id: str
    sex: str
    age_years: int
    weight_kg: float
    height_m: float
    fov_mm: float
    thickness_mm: float
    spacing_mm: float
    n_pe: int
    n_ro: int
    etl: int
    tr_ms: float
    te_ms: float
    nex: int
    field_t: float


def write_series(
    info: SeriesInfo, pixels: np.ndarray, out_dir: Path, window: tuple[float, float]
) -> list[tuple[Path, str]]:
    """Write ``pixels`` (n, rows, cols) uint16, instance 1 the most superior slice, as
    out_dir/IM0001.dcm ...; return (path, SOP instance UID) per instance.

    One dataset is filled once and only its per-instance attributes change from file to file
    (much faster than building ~90 elements 30 times).
    """
    n, rows, cols = pixels.shape
    study_uid, series_uid, for_uid = uids(info.seed, info.index)
    k = _key(study_uid)
    when = dt.datetime(2023, 1, 2, 7, 30) + dt.timedelta(days=k % 700, minutes=(k >> 12) % 600)
    series_time = when + dt.timedelta(minutes=3 + (k >> 24) % 20)
    birth = dt.date(when.year - info.age_years, 1 + (k >> 32) % 12, 1 + (k >> 36) % 28)
    if (birth.month, birth.day) > (when.month, when.day):
        birth = birth.replace(year=birth.year - 1)  # keep PatientAge consistent with the dates
    pixel_mm = info.fov_mm / cols
    # Slice positions along +z (superior); instance 1 is the top of the slab.
    z_top = info.spacing_mm * (n - 1) / 2.0
    x0 = -info.fov_mm / 2.0 + pixel_mm / 2.0
    y0 = -(rows * pixel_mm) / 2.0 + pixel_mm / 2.0
    freq = 42.577478 * info.field_t

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    ds.InstanceCreationDate = series_time.strftime("%Y%m%d")
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.SeriesDate = series_time.strftime("%Y%m%d")
    ds.AcquisitionDate = series_time.strftime("%Y%m%d")
    ds.ContentDate = series_time.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.AccessionNumber = f"SYN{k % 10**9:09d}"
    ds.Modality = "MR"
    ds.Manufacturer = "mriqa-node synthetic"
    ds.InstitutionName = "mriqa-node synthetic site"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTHMR"
    ds.StudyDescription = "MR ABDOMEN"
    ds.SeriesDescription = "T2 FSE AX"
    ds.ManufacturerModelName = "training.synth"
    ds.PatientName = f"SYNTHETIC^{info.patient_id}"
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = info.sex
    ds.PatientAge = f"{info.age_years:03d}Y"
    ds.PatientSize = _ds(round(info.height_m, 2))
    ds.PatientWeight = _ds(round(info.weight_kg, 1))
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "OSP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"tse2d1_{info.etl}"
    ds.SliceThickness = _ds(info.thickness_mm)
    ds.RepetitionTime = _ds(round(info.tr_ms, 1))
    ds.EchoTime = _ds(round(info.te_ms, 1))
    ds.NumberOfAverages = _ds(info.nex)
    ds.ImagingFrequency = _ds(round(freq, 6))
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(info.field_t)
    ds.SpacingBetweenSlices = _ds(info.spacing_mm)
    ds.NumberOfPhaseEncodingSteps = info.n_pe
    ds.EchoTrainLength = info.etl
    ds.PercentSampling = _ds(100.0)
    ds.PercentPhaseFieldOfView = _ds(100.0)
    ds.PixelBandwidth = _ds(250.0)
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION
    ds.ProtocolName = "T2 FSE AX ABDOMEN"
    ds.ReceiveCoilName = "BODY ARRAY"
    ds.TransmitCoilName = "BODY"
    ds.AcquisitionMatrix = [0, info.n_ro, info.n_pe, 0]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = _ds(90.0)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(1 + k % 9999)
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 1, 0)]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(pixel_mm), _ds(pixel_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(round(window[0]))
    ds.WindowWidth = _ds(max(round(window[1]), 2))
    ds.WindowCenterWidthExplanation = "BODY"

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    for i in range(n):
        sop_uid = generate_uid(entropy_srcs=[_UID_TAG, "instance", series_uid, str(i + 1)])
        acq_time = series_time + dt.timedelta(seconds=round(info.tr_ms / 1000.0 * i / n, 3))
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationTime = series_time.strftime("%H%M%S")
        ds.AcquisitionTime = acq_time.strftime("%H%M%S.%f")[:13]
        ds.ContentTime = acq_time.strftime("%H%M%S.%f")[:13]
        ds.InstanceNumber = i + 1
        z = z_top - i * info.spacing_mm
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(round(z, 3))]
        ds.SliceLocation = _ds(round(z, 3))
        ds.PixelData = np.ascontiguousarray(pixels[i], dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"
        path = out_dir / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((path, sop_uid))
    return written
