"""The receiver's one-pass header scan (mriqa_node/dicom/scan.py) against pydicom: the same
header wherever it answers, and a hand-over to pydicom wherever it is not sure."""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from mriqa_node.dicom.headers import InvalidInstance, header_from, parse_header, read_header
from mriqa_node.dicom.scan import scan_header
from mriqa_node.phantom import synth_series
from tests.fuzz import mutate, seed_files, split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set as a C-STORE carries it: no preamble, no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    buf.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    return buf.getvalue()


def by_pydicom(stream: bytes, transfer_syntax: str):
    ds = pydicom.dcmread(BytesIO(stream), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return parse_header(ds, transfer_syntax)


def no_decode():
    raise AssertionError("the scan handed over to pydicom")


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_phantom_series_are_scanned_as_pydicom_reads_them(transfer_syntax) -> None:
    for ds in synth_series(3, size=64, seed=5, announce_count=True):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SequenceOfUltrasoundRegions = Sequence([Dataset(), Dataset()])  # stepped over
        ds.SequenceOfUltrasoundRegions[0].RegionSpatialFormat = 1
        stream = encode(ds, transfer_syntax)
        header = read_header(stream, transfer_syntax, no_decode)
        assert header == parse_header(ds, transfer_syntax)
        assert header.facts.orientation == "AX" and header.expected_slices == 3


def test_real_files_agree_with_pydicom() -> None:
    """Every real file of ../shared/data (else the MR images pydicom ships): where the scan
    answers, the header is pydicom's; most of them take the scan."""
    files = sorted(SHARED.rglob("*.dcm"))[:400] if SHARED.is_dir() else seed_files()
    scanned = 0
    for path in files:
        try:
            stream, ts = split(path.read_bytes())
            expected = by_pydicom(stream, ts)
        except Exception:
            continue  # not something the receiver accepts in the first place
        found = scan_header(stream, ts)
        if found is not None:
            scanned += 1
            assert header_from(found, ts) == expected, path
    assert scanned >= len(files) // 2


def test_what_the_scan_is_not_sure_of_goes_to_pydicom() -> None:
    (ds,) = synth_series(1, size=32, seed=1)
    stream = encode(ds)
    assert scan_header(stream, ExplicitVRLittleEndian) is not None
    assert scan_header(encode(ds, ExplicitVRBigEndian), ExplicitVRBigEndian) is None
    assert scan_header(stream[:-7], ExplicitVRLittleEndian) is None  # cut short
    assert scan_header(stream + b"\x00\x00", ExplicitVRLittleEndian) is None  # trailing bytes
    japanese = ds.copy()
    japanese.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    assert scan_header(encode(japanese), ExplicitVRLittleEndian) is None
    enhanced = ds.copy()
    enhanced.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    assert scan_header(encode(enhanced), ExplicitVRLittleEndian) is None
    two = ds.copy()
    two.SeriesDescription = "a\\b"  # pydicom makes that a list: its rules apply
    assert scan_header(encode(two), ExplicitVRLittleEndian) is None


def test_utf8_names_and_a_missing_uid() -> None:
    (ds,) = synth_series(1, size=32, seed=2)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    header = read_header(encode(ds), ExplicitVRLittleEndian, no_decode)
    assert header.patient_name == "Müller^Jürgen" == parse_header(ds, "").patient_name
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidInstance, match="SeriesInstanceUID"):
        read_header(encode(ds), ExplicitVRLittleEndian, no_decode)


def test_private_b_values_are_read_as_pydicom_reads_them() -> None:
    (ds,) = synth_series(1, size=32, seed=3)
    ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100C), "IS", "1000")
    ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    ds.add_new((0x0043, 0x1039), "IS", [1000000800, 8, 0, 0])
    ds.SOPInstanceUID = generate_uid()
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        header = read_header(encode(ds, ts), ts, no_decode)
        assert header.facts.b_value == 1000 == by_pydicom(encode(ds, ts), ts).facts.b_value


SEEDS = [p.read_bytes() for p in seed_files()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**63))
def test_damaged_files_get_pydicoms_header_or_go_to_pydicom(seed: int) -> None:
    rng = random.Random(seed)
    try:
        stream, ts = split(mutate(rng.choice(SEEDS), rng))
    except Exception:
        return  # the file meta itself is broken: not a C-STORE's concern
    found = scan_header(stream, ts)
    if found is None:
        return
    try:
        expected = by_pydicom(stream, ts)
    except InvalidInstance as exc:
        with pytest.raises(InvalidInstance, match=str(exc).split(":")[0]):
            header_from(found, ts)
        return
    assert header_from(found, ts) == expected
