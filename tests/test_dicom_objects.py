"""The QA objects sent to the PACS (mriqa_node.dicom.objects): IOCM rejection KOS, QA SR and
montage SC, checked with pydicom, DCMTK (dsrdump, dsr2xml, dcmdump) and a real Orthanc."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from mriqa_node.dicom.objects import (
    COMPREHENSIVE_SR_STORAGE,
    KEY_OBJECT_SELECTION_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    build_montage_sc,
    build_qa_sr,
    build_rejection_kos,
)
from mriqa_node.domain.qa import ModelIdentity, ObjectUids, QaResult, ReportedSlice
from mriqa_node.phantom import synth_series, write_series
from tests.orthanc import Orthanc
from tests.peers import free_port

N = 6
WHEN = datetime(2024, 5, 2, 14, 30, 5)
MODEL = ModelIdentity("paper-convnet", "2.1.0", "ab12" * 16, "motion")
UIDS = ObjectUids.derived("1.2.3.4", "test")
DCMTK_NOTES = (
    "Check for template constraints not yet supported",
    "The VR checker does not support this Specific Character Set",
)
needs_dcmtk = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dsrdump", "dsr2xml", "dcmdump")), reason="DCMTK missing"
)


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Instance headers as the node has them: files read back with stop_before_pixels."""
    paths = write_series(synth_series(N, size=64, seed=7), tmp_path_factory.mktemp("series"))
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _save(ds: pydicom.FileDataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def _dsrdump(path: Path) -> str:
    """dsrdump with full codes and referenced UIDs; must exit 0 without errors or warnings
    (other than DCMTK's notes on what it does not check: template constraints, UTF-8 VRs)."""
    result = _run("dsrdump", "+Pc", "+Pu", "+Pl", "+Pt", path)
    assert result.returncode == 0, result.stderr
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not any(note in line for note in DCMTK_NOTES)
    ]
    assert problems == [], result.stderr
    return result.stdout


def _walk(items: DicomSequence) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence") or [])


def _code(seq: DicomSequence) -> tuple[str, str, str]:
    (item,) = seq
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


def _slices(headers: list[Dataset]) -> tuple[ReportedSlice, ...]:
    return tuple(
        ReportedSlice(ds.SOPInstanceUID, 0, i, round(0.1 + 0.15 * i, 4))
        for i, ds in enumerate(headers)
    )


def _result(headers: list[Dataset], label: str = "non_diagnostic") -> QaResult:
    slices = _slices(headers)
    return QaResult(
        label=label,
        score=0.8125,
        n_slices=N,
        n_unscorable=0,
        model=MODEL,
        slices=slices,
        worst=tuple(slices[i] for i in (5, 4, 3)),
        n_flagged=2,
        decided_at=datetime.fromisoformat("2024-05-02T14:29:58.250000+02:00"),
    )


def _png(rows: int = 37, columns: int = 51, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(3)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (rows, columns, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# KOS


def test_kos_structure(headers: list[Dataset], tmp_path: Path) -> None:
    kos = pydicom.dcmread(
        _save(build_rejection_kos(headers, UIDS, when=WHEN), tmp_path / "kos.dcm")
    )
    src = headers[0]
    assert kos.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert kos.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert kos.SOPClassUID == KEY_OBJECT_SELECTION_STORAGE == kos.file_meta.MediaStorageSOPClassUID
    assert kos.Modality == "KO" and kos.SeriesNumber == 9901 and kos.InstanceNumber == 1
    assert kos.StudyInstanceUID == src.StudyInstanceUID
    assert (kos.SeriesInstanceUID, kos.SOPInstanceUID) == (UIDS.series, UIDS.instance)
    assert kos.SOPInstanceUID not in {ds.SOPInstanceUID for ds in headers}
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        assert kos[keyword].value == src[keyword].value, keyword
    assert (kos.ContentDate, kos.ContentTime) == ("20240502", "143005")

    assert kos.ValueType == "CONTAINER" and kos.ContinuityOfContent == "SEPARATE"
    assert _code(kos.ConceptNameCodeSequence) == ("113001", "DCM", "Rejected for Quality Reasons")
    (template,) = kos.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    assert "ReferencedRequestSequence" not in kos  # the phantom carries no request attributes

    (study,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == src.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    expected = sorted((ds.SOPClassUID, ds.SOPInstanceUID) for ds in headers)
    evidence = [
        (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == expected

    first, *refs = kos.ContentSequence
    assert (first.RelationshipType, first.ValueType) == ("CONTAINS", "TEXT")
    assert _code(first.ConceptNameCodeSequence) == ("113012", "DCM", "Key Object Description")
    assert "Motion" in first.TextValue
    assert all((r.RelationshipType, r.ValueType) == ("CONTAINS", "IMAGE") for r in refs)
    content = [
        (
            r.ReferencedSOPSequence[0].ReferencedSOPClassUID,
            r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        )
        for r in refs
    ]
    assert sorted(content) == expected


@needs_dcmtk
def test_kos_dcmtk(headers: list[Dataset], tmp_path: Path) -> None:
    # A duplicate header (an instance received twice) is referenced once.
    path = _save(build_rejection_kos([*headers, headers[0]], UIDS), tmp_path / "kos.dcm")
    out = _dsrdump(path)
    assert 'CONTAINER:(113001,DCM,"Rejected for Quality Reasons")' in out
    assert "TID 2010 (DCMR)" in out
    assert '(113012,DCM,"Key Object Description")' in out
    for ds in headers:
        assert out.count(f'IMAGE:=(MR image,"{ds.SOPInstanceUID}")') == 1
    assert _run("dcmdump", path).returncode == 0


def test_kos_rejects_bad_input(headers: list[Dataset]) -> None:
    with pytest.raises(ValueError):
        build_rejection_kos([], UIDS)
    other = copy.deepcopy(headers[1])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="series"):
        build_rejection_kos([headers[0], other], UIDS)
    missing = copy.deepcopy(headers[0])
    del missing.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_rejection_kos([missing], UIDS)


@needs_dcmtk
def test_kos_requests_composite_and_charset(headers: list[Dataset], tmp_path: Path) -> None:
    """Request attributes become a Referenced Request Sequence, non-image objects COMPOSITE
    items, and a non-Latin-1 patient name survives in the source's character set."""
    items = [copy.deepcopy(ds) for ds in headers[:2]]
    for ds in items:
        request = Dataset()
        request.RequestedProcedureID = "RP42"
        request.ScheduledProcedureStepID = "SPS1"
        ds.RequestAttributesSequence = DicomSequence([request])
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Łukasz^Żółć"
    items[1].SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"  # MR Spectroscopy Storage
    path = _save(build_rejection_kos(items, UIDS), tmp_path / "kos.dcm")
    kos = pydicom.dcmread(path)
    (request,) = kos.ReferencedRequestSequence
    assert request.RequestedProcedureID == "RP42"
    assert request.AccessionNumber == headers[0].AccessionNumber
    assert [r.ValueType for r in kos.ContentSequence] == ["TEXT", "IMAGE", "COMPOSITE"]
    assert kos.PatientName == "Łukasz^Żółć"
    out = _dsrdump(path)
    assert "COMPOSITE" in out


# --------------------------------------------------------------------------------------------
# SR


def test_sr_structure(headers: list[Dataset], tmp_path: Path) -> None:
    ds = build_qa_sr(headers, _result(headers), UIDS, when=WHEN)
    sr = pydicom.dcmread(_save(ds, tmp_path / "sr.dcm"))
    src = headers[0]
    assert sr.SOPClassUID == COMPREHENSIVE_SR_STORAGE and sr.Modality == "SR"
    assert sr.SeriesNumber == 9902
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert (sr.PatientID, sr.PatientName, sr.AccessionNumber) == (
        src.PatientID,
        src.PatientName,
        src.AccessionNumber,
    )
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert _code(sr.ConceptNameCodeSequence) == (
        "QA-MOTION",
        "99MRIQA",
        "MRI motion artifact quality assessment",
    )
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MRIQA"

    items = list(_walk(sr.ContentSequence))
    nums = [i for i in items if i.ValueType == "NUM"]
    assert nums and all("MeasuredValueSequence" in i for i in nums)
    for item in nums:
        for measured in item.MeasuredValueSequence:
            assert _code(measured.MeasurementUnitsCodeSequence) == ("1", "UCUM", "no units")

    (verdict,) = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "QA-VERDICT"]
    assert _code(verdict.ConceptCodeSequence)[0] == "QA-NONDIAG"

    evidence = {
        r.ReferencedSOPInstanceUID
        for r in sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in headers}

    per_slice = [i for i in nums if i.ConceptNameCodeSequence[0].CodeValue == "QA-P-NONDIAG"]
    assert len(per_slice) == N
    real = {ds.SOPInstanceUID: ds.SOPClassUID for ds in headers}
    for number, item in enumerate(per_slice, start=1):
        slice_no, image = item.ContentSequence
        assert slice_no.RelationshipType == "HAS PROPERTIES"
        assert int(slice_no.MeasuredValueSequence[0].NumericValue) == number
        assert (image.RelationshipType, image.ValueType) == ("INFERRED FROM", "IMAGE")
        ref = image.ReferencedSOPSequence[0]
        assert real[ref.ReferencedSOPInstanceUID] == ref.ReferencedSOPClassUID
        assert ref.ReferencedSOPInstanceUID == headers[number - 1].SOPInstanceUID
        assert "ReferencedFrameNumber" not in ref  # single-frame images


@needs_dcmtk
def test_sr_dcmtk(headers: list[Dataset], tmp_path: Path) -> None:
    path = _save(build_qa_sr(headers, _result(headers), UIDS), tmp_path / "sr.dcm")
    out = _dsrdump(path)
    assert "Comprehensive SR Document" in out
    assert '(QA-VERDICT,99MRIQA,"Series quality verdict")=(QA-NONDIAG,99MRIQA,' in out
    assert "Non-diagnostic (motion artifacts)" in out
    assert '"Series score, P(non-diagnostic)")="0.8125"' in out
    assert '"Worst slices")="slice 6 (P=0.850), slice 5 (P=0.700), slice 4 (P=0.550)"' in out
    assert '"Verdict decided at")="20240502122958.250000"' in out  # in UTC
    assert '(111001,DCM,"Algorithm Name")="paper-convnet"' in out
    assert MODEL.sha256 in out
    for number, ds in enumerate(headers, start=1):
        assert f'"Slice number")="{number}"' in out
        assert out.count(f'(MR image,"{ds.SOPInstanceUID}")') == 1
    assert out.count('<inferred from IMAGE:(121112,DCM,"Source of Measurement")') == N

    result = _run("dsr2xml", path)
    assert result.returncode == 0, result.stderr
    root = ET.fromstring(result.stdout.encode("latin-1"))
    assert root.get("type") == "Comprehensive SR"
    assert _run("dcmdump", path).returncode == 0


@needs_dcmtk
def test_sr_unscorable_and_multiframe(headers: list[Dataset], tmp_path: Path) -> None:
    """Missing scores are empty NUMs with a "Measurement failure" qualifier; frames of a
    multi-frame object are referenced 1-based; slices must come from the given instances."""
    enhanced = copy.deepcopy(headers[0])
    enhanced.NumberOfFrames = 3
    slices = tuple(
        ReportedSlice(enhanced.SOPInstanceUID, f, f, None if f == 1 else 0.2) for f in range(3)
    )
    result = QaResult("unscorable", None, 3, 1, MODEL, slices)
    path = _save(build_qa_sr([enhanced], result, UIDS), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(path)
    refs = [i.ReferencedSOPSequence[0] for i in _walk(sr.ContentSequence) if i.ValueType == "IMAGE"]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [1, 2, 3]
    out = _dsrdump(path)
    assert '(QA-UNSCORABLE,99MRIQA,"Unscorable")' in out
    assert out.count('=empty (114006,DCM,"Measurement failure")') == 2  # series score + slice 2
    assert '"Worst slices")="none"' in out

    with pytest.raises(ValueError, match="not given"):
        build_qa_sr(headers[1:], _result(headers), UIDS)


# --------------------------------------------------------------------------------------------
# SC


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_sc_pixels(headers: list[Dataset], tmp_path: Path, mode: str) -> None:
    png = _png(mode=mode)  # 37 x 51 x 3: an odd number of bytes, padded
    path = _save(
        build_montage_sc(headers, png, UIDS, description="QA heat map"), tmp_path / "sc.dcm"
    )
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SECONDARY_CAPTURE_STORAGE
    assert (sc.ConversionType, sc.BurnedInAnnotation, sc.SeriesNumber) == ("WSD", "NO", 9903)
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.PlanarConfiguration) == (
        3,
        "RGB",
        0,
    )
    assert sc.StudyInstanceUID == headers[0].StudyInstanceUID
    assert sc.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert sc.PatientID == headers[0].PatientID and sc.SeriesDescription == "QA heat map"
    expected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert sc.pixel_array.shape == expected.shape == (37, 51, 3)
    np.testing.assert_array_equal(sc.pixel_array, expected)
    if shutil.which("dcmdump"):
        result = _run("dcmdump", "-E", path)
        assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Orthanc


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="Orthanc missing")
def test_orthanc_accepts_all_three(headers: list[Dataset], tmp_path: Path) -> None:
    objects = {
        "kos": build_rejection_kos(headers, ObjectUids.derived("1.2.3.4", "kos")),
        "sr": build_qa_sr(headers, _result(headers), ObjectUids.derived("1.2.3.4", "sr")),
        "sc": build_montage_sc(headers, _png(), ObjectUids.derived("1.2.3.4", "sc")),
    }
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    try:
        for name, ds in objects.items():
            answer = pacs.upload(_save(ds, tmp_path / f"{name}.dcm"))
            assert answer["Status"] == "Success", (name, answer)
            tags = pacs.get(f"/instances/{answer['ID']}/simplified-tags")
            assert tags["SOPInstanceUID"] == ds.SOPInstanceUID
            assert tags["StudyInstanceUID"] == headers[0].StudyInstanceUID
            assert tags["PatientID"] == headers[0].PatientID
        (study,) = pacs.get("/studies")
        modalities = {
            pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"]
            for s in pacs.get(f"/studies/{study}")["Series"]
        }
        assert modalities == {"KO", "SR", "OT"}
    finally:
        pacs.stop()
