"""The Part 10 prefix (preamble, "DICM", file meta) the spool keeps before a received data set.

pynetdicom's ``Event.encoded_dataset`` builds and encodes a pydicom FileMetaDataset for this,
about 0.6 ms per instance on the receive path; it is seven elements of fixed layout (PS3.10
7.1), written here byte for byte as pynetdicom writes them.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def file_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """What goes before the data set to make it a file (group 0002 in Explicit VR LE)."""
    body = b"".join((
        _long(0x0001, b"OB", b"\x00\x01"),
        _short(0x0002, b"UI", uid_value(sop_class_uid)),
        _short(0x0003, b"UI", uid_value(sop_instance_uid)),
        _short(0x0010, b"UI", uid_value(transfer_syntax_uid)),
        _short(0x0012, b"UI", uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _short(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" ")),
    ))  # fmt: skip
    return PREAMBLE + _short(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _long(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value


def uid_value(uid: str) -> bytes:
    """A UI value as DICOM encodes it: ASCII, padded with a NUL to even length."""
    return _even(str(uid).encode("ascii", "replace"), b"\x00")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value
