"""Phantom series as real DICOM: MR Image Storage, 12 bits in 16, complete consistent headers.

The node, DCMTK and viewers must take these for what a scanner sends: one series per scan,
patient/study/series attributes identical across it, per-instance position, number, times and
UIDs consistent with the geometry. Nothing depends on the wall clock: dates, times and
demographics derive from the study UID and patient ID (so several series of one study or
patient agree), and UIDs from what the caller passes, so the same inputs give the same bytes.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from .acquire import BITS_STORED, Scan

__all__ = ["Header", "datasets", "uid", "write_series"]

IMPLEMENTATION_VERSION = "MRIQA_PHANTOM_2"
_UID_TAG = "mriqa-node-phantom-v2"


def uid(*parts: object) -> str:
    """A UID derived from ``parts`` only (stable across processes and machines)."""
    return generate_uid(entropy_srcs=[_UID_TAG, *(str(p) for p in parts)])


def _ds(value: float) -> DSfloat:
    """Decimal String within the 16-character limit."""
    return DSfloat(float(value), auto_format=True)


def _key(text: str) -> int:
    """Stable integer from text (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Header:
    """Who and what a series is; the acquisition attributes come from its ``Scan``."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int = 1
    series_description: str = "T2 FSE AX ABDOMEN"
    announce_count: bool = True  # ImagesInAcquisition, so the node knows when it is complete


def datasets(header: Header, scan: Scan) -> list[Dataset]:
    """One dataset per slice, file meta set (Explicit VR Little Endian), ready to save or
    send; instance 1 is the most superior slice."""
    when = _study_time(header.study_uid)
    series_time = when + dt.timedelta(minutes=4 * header.series_number)
    template = _series(header, scan, when, series_time)
    n, rows, cols = scan.pixels.shape
    pixel_mm = scan.subject.fov_mm / cols
    x0 = _ds(-cols * pixel_mm / 2.0 + pixel_mm / 2.0)
    y0 = _ds(-rows * pixel_mm / 2.0 + pixel_mm / 2.0)
    step = scan.protocol.spacing_mm
    out = []
    for i in range(n):
        ds = copy.deepcopy(template)
        sop_uid = uid("instance", header.series_uid, i + 1)
        acq_time = (series_time + dt.timedelta(seconds=i)).strftime("%H%M%S.%f")[:13]
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.AcquisitionTime = acq_time
        ds.ContentTime = acq_time
        ds.InstanceNumber = i + 1
        z = _ds(round(step * ((n - 1) / 2.0 - i), 3))
        ds.ImagePositionPatient = [x0, y0, z]
        ds.SliceLocation = z
        ds.PixelData = np.ascontiguousarray(scan.pixels[i], dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out


def _study_time(study_uid: str) -> dt.datetime:
    """A plausible study date and time of day, the same for every series of the study."""
    k = _key(study_uid)
    return dt.datetime(2024, 1, 8, 8, 0) + dt.timedelta(days=k % 365, minutes=(k >> 16) % 540)


def _series(header: Header, scan: Scan, when: dt.datetime, series_time: dt.datetime) -> Dataset:
    """Everything the instances of the series share."""
    sub, proto = scan.subject, scan.protocol
    acq = proto.acq
    n, rows, cols = scan.pixels.shape
    k = _key(header.study_uid)
    pk = _key(header.patient_id)
    birth = dt.date(1940 + pk % 50, 1 + (pk >> 8) % 12, 1 + (pk >> 16) % 28)
    age = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    male = (pk >> 24) % 2 == 0

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
    ds.InstanceCreationTime = series_time.strftime("%H%M%S")
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.SeriesDate = series_time.strftime("%Y%m%d")
    ds.AcquisitionDate = series_time.strftime("%Y%m%d")
    ds.ContentDate = series_time.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.AccessionNumber = f"PH{k % 10**8:08d}"
    ds.Modality = "MR"
    ds.Manufacturer = "mriqa-node phantom"
    ds.InstitutionName = "mriqa-node phantom site"
    ds.ReferringPhysicianName = ""
    ds.StationName = "MRIQAPHANTOM"
    ds.StudyDescription = "MR ABDOMEN"
    ds.SeriesDescription = header.series_description
    ds.ManufacturerModelName = "mriqa_node.phantom"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "M" if male else "F"
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientSize = _ds(1.58 + 0.06 * male + 0.3 * ((pk >> 32) % 100) / 100)
    ds.PatientWeight = _ds(55.0 + 10.0 * male + (pk >> 40) % 50)
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "OSP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"tse2d1_{acq.etl}"
    ds.SliceThickness = _ds(proto.thickness_mm)
    ds.RepetitionTime = _ds(round(acq.tr_s * 1000.0, 1))
    ds.EchoTime = _ds(round(proto.te_s * 1000.0, 1))
    ds.NumberOfAverages = _ds(acq.nex)
    ds.ImagingFrequency = _ds(round(42.577478 * sub.field_t, 6))
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(sub.field_t)
    ds.SpacingBetweenSlices = _ds(proto.spacing_mm)
    ds.NumberOfPhaseEncodingSteps = acq.n_pe
    ds.EchoTrainLength = acq.etl
    ds.PercentSampling = _ds(100.0)
    ds.PercentPhaseFieldOfView = _ds(100.0)
    ds.PixelBandwidth = _ds(250.0)
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION
    ds.ProtocolName = header.series_description
    ds.ReceiveCoilName = "BODY ARRAY"
    ds.TransmitCoilName = "BODY"
    ds.AcquisitionMatrix = [0, acq.n_ro, acq.n_pe, 0]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = _ds(90.0)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = str(1 + k % 9999)
    ds.SeriesNumber = header.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 1, 0)]
    ds.FrameOfReferenceUID = header.frame_uid
    ds.PositionReferenceIndicator = ""
    if header.announce_count:
        ds.ImagesInAcquisition = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(sub.fov_mm / cols)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(round(scan.window[0]))
    ds.WindowWidth = _ds(max(round(scan.window[1]), 2))
    ds.WindowCenterWidthExplanation = "BODY"
    return ds


def write_series(datasets: list[Dataset], out_dir: Path) -> list[Path]:
    """Save as out_dir/IM0001.dcm ... with preamble and file meta; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, ds in enumerate(datasets, start=1):
        path = out_dir / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
