"""The receiver's header reading: read_header (elements before the pixel data, from the bytes
as a C-STORE carries them) gives what parse_header gives on the whole decoded data set."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from mriqa_node.dicom.headers import InvalidInstance, parse_header, read_header
from mriqa_node.phantom import synth_series
from tests.fuzz import received_part


def as_received(ds: pydicom.Dataset, ts: str) -> tuple[bytes, pydicom.uid.UID]:
    buf = BytesIO()
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian,
               little_endian=ts != ExplicitVRBigEndian)  # fmt: skip
    return received_part(buf.getvalue())


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_same_header_as_the_whole_decode(ts: str) -> None:
    ds = synth_series(2, size=64, seed=70)[1]
    body, uid = as_received(ds, ts)
    expected = parse_header(pydicom.dcmread(BytesIO(_file(ds, ts))), ts)
    assert read_header(body, uid) == expected
    assert expected.series_uid == ds.SeriesInstanceUID and expected.facts is not None


def test_truncated_pixel_data_is_refused() -> None:
    body, uid = as_received(synth_series(1, size=64, seed=71)[0], ExplicitVRLittleEndian)
    read_header(body, uid)
    with pytest.raises(InvalidInstance, match="truncated"):
        read_header(body[:-100], uid)


def test_elements_after_the_pixel_data_are_read_and_checked() -> None:
    ds = synth_series(1, size=64, seed=72)[0]
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # data set trailing padding, after the pixels
    body, uid = as_received(ds, ExplicitVRLittleEndian)
    assert read_header(body, uid).sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(InvalidInstance, match="truncated"):
        read_header(body[:-10], uid)


def test_compressed_pixel_data() -> None:
    ds = synth_series(1, size=64, seed=73)[0]
    ds.compress(RLELossless)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, uid = received_part(buf.getvalue())
    assert uid == RLELossless
    assert read_header(body, uid) == parse_header(pydicom.dcmread(BytesIO(buf.getvalue())), uid)


def _file(ds: pydicom.Dataset, ts: str) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian,
               little_endian=ts != ExplicitVRBigEndian)  # fmt: skip
    return buf.getvalue()
