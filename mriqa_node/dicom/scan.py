"""A single pass over a C-STORE data set's bytes that picks out the header fields intake needs.

Decoding a whole data set with pydicom and converting its header elements costs about 1 ms per
instance, as much as pynetdicom's own work for it; this walk costs a small fraction of that. It
reads little-endian streams (implicit and explicit VR, which encapsulated transfer syntaxes use
too), steps over every value it does not need (pixel data, sequences, their items) by length,
and converts the few it keeps the way pydicom would. Whatever it is not sure of (another byte
order, a deflated stream, Enhanced MR's functional groups, a character set other than Latin-1
or UTF-8, an unknown explicit VR, a value past the end of the stream, a text field holding
several values) makes it give up: the caller then decodes with pydicom, which gives the reason.
"""

from __future__ import annotations

import struct
from typing import Any

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
TEXT_VRS = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT UN".split())

# tag -> (keyword, kind). Kinds: text (one value), multi (backslash-separated), uid, int (IS),
# floats (DS list), us (unsigned short), fd (double), raw (text kept as bytes, as pydicom keeps
# private elements it cannot name).
WANTED: dict[int, tuple[Any, str]] = {
    0x00080005: ("SpecificCharacterSet", "multi"),
    0x00080008: ("ImageType", "multi"),
    0x00080016: ("SOPClassUID", "uid"),
    0x00080018: ("SOPInstanceUID", "uid"),
    0x00080020: ("StudyDate", "text"),
    0x00080050: ("AccessionNumber", "text"),
    0x00080060: ("Modality", "text"),
    0x00081030: ("StudyDescription", "text"),
    0x0008103E: ("SeriesDescription", "text"),
    0x00100010: ("PatientName", "text"),
    0x00100020: ("PatientID", "text"),
    0x00180015: ("BodyPartExamined", "text"),
    0x00180020: ("ScanningSequence", "multi"),
    0x00180021: ("SequenceVariant", "multi"),
    0x00181030: ("ProtocolName", "text"),
    0x00189008: ("EchoPulseSequence", "text"),
    0x00189018: ("EchoPlanarPulseSequence", "text"),
    0x00189087: ((0x0018, 0x9087), "fd"),
    0x0019100C: ((0x0019, 0x100C), "raw"),
    0x00200011: ("SeriesNumber", "int"),
    0x00200013: ("InstanceNumber", "int"),
    0x0020000D: ("StudyInstanceUID", "uid"),
    0x0020000E: ("SeriesInstanceUID", "uid"),
    0x00200037: ("ImageOrientationPatient", "floats"),
    0x00201002: ("ImagesInAcquisition", "int"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280008: ("NumberOfFrames", "int"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00431039: ((0x0043, 0x1039), "raw"),
}
# Where the scan hands over to pydicom: Enhanced MR keeps its facts in these sequences.
GIVE_UP_TAGS = frozenset({0x52009229, 0x52009230})
# The VR implicit streams imply for the wanted elements that are not text.
_IMPLICIT_BINARY = {0x00189087: b"FD", 0x00280002: b"US", 0x00280010: b"US", 0x00280011: b"US"}
# group, element, then explicit VR's (VR, 2-byte length, 4-byte length) or implicit VR's
# 4-byte length in the first two fields' bytes.
_ELEMENT = struct.Struct("<HH2sHL").unpack_from
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
             "ISO_IR 192": "utf-8"}  # fmt: skip


class GiveUp(Exception):
    """The stream is not one this scan is sure of; decode it with pydicom instead."""


def scan_header(stream: bytes, transfer_syntax_uid: str, start: int = 0) -> dict[Any, Any] | None:
    """The wanted elements of a little-endian data set (``stream[start:]``) as pydicom would
    convert them (keyword or private tag -> value), or None when pydicom should decode it
    instead."""
    if transfer_syntax_uid in (BIG_ENDIAN, DEFLATED):
        return None
    explicit = transfer_syntax_uid != IMPLICIT_VR_LE
    raw: dict[int, tuple[bytes, bytes]] = {}
    try:
        end = _walk(stream, start, len(stream), explicit, raw, top=True)
        if end != len(stream) or not raw:
            return None
        return _convert(raw)
    except (GiveUp, struct.error, UnicodeDecodeError, ValueError):
        return None


def _walk(buf: bytes, pos: int, end: int, explicit: bool,
          keep: dict[int, tuple[bytes, bytes]] | None, top: bool = False) -> int:  # fmt: skip
    """Step over the elements in buf[pos:end] (to a delimiter for undefined lengths), keeping
    the wanted top-level ones in ``keep``; returns where it stopped."""
    previous = -1
    while pos < end:
        if pos + 12 <= end:
            group, element, vr, short, length = _ELEMENT(buf, pos)
        else:  # the last element, with a short header and a short value
            group, element, vr, short, length = _ELEMENT(buf[pos:end] + bytes(12), 0)
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag != ITEM:
                if top:
                    raise GiveUp("delimiter outside a sequence")
                return pos  # the caller reads the delimiter
            raise GiveUp("an item outside a sequence")
        if top and tag <= previous:
            raise GiveUp("elements out of order")
        previous = tag
        if not explicit:
            length = vr[0] | vr[1] << 8 | short << 16
            vr = b"SQ" if length == UNDEFINED else _IMPLICIT_BINARY.get(tag, b"")
            pos += 8
        elif vr in LONG_VRS:
            pos += 12
        elif vr in SHORT_VRS:
            length = short
            pos += 8
        else:
            raise GiveUp("unknown VR")
        if top and tag in GIVE_UP_TAGS:
            raise GiveUp("functional groups")
        if length == UNDEFINED:
            if vr not in (b"SQ", b"OB", b"OW"):
                raise GiveUp("undefined length outside a sequence")
            pos = _skip_items(buf, pos, end, explicit)
            continue
        if pos + length > end:
            raise GiveUp("value past the end of the stream")
        if vr == b"SQ":
            _skip_defined_items(buf, pos, pos + length, explicit)
        elif keep is not None and tag in WANTED:
            keep[tag] = (vr, buf[pos : pos + length])
        pos += length
    return pos


def _skip_items(buf: bytes, pos: int, end: int, explicit: bool) -> int:
    """Past a sequence (or encapsulated pixel data) of undefined length, delimiter included."""
    while True:
        if pos + 8 > end:
            raise GiveUp("sequence without its delimiter")
        tag = _tag_at(buf, pos)
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise GiveUp("not an item")
        if length == UNDEFINED:
            pos = _walk(buf, pos, end, explicit, None)
            if pos + 8 > end or _tag_at(buf, pos) != ITEM_END:
                raise GiveUp("item without its delimiter")
            pos += 8
        elif pos + length > end:
            raise GiveUp("item past the end of the stream")
        else:
            pos += length


def _skip_defined_items(buf: bytes, pos: int, end: int, explicit: bool) -> None:
    """Check that a sequence of defined length is made of items that fit in it."""
    while pos < end:
        if _tag_at(buf, pos) != ITEM:
            raise GiveUp("not an item")
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        pos += 8
        if length == UNDEFINED:
            pos = _walk(buf, pos, end, explicit, None)
            if _tag_at(buf, pos) != ITEM_END:
                raise GiveUp("item without its delimiter")
            pos += 8
        else:
            pos += length
    if pos != end:
        raise GiveUp("items overrun their sequence")


def _tag_at(buf: bytes, pos: int) -> int:
    group, element = struct.unpack_from("<HH", buf, pos)
    return group << 16 | element


def _convert(raw: dict[int, tuple[bytes, bytes]]) -> dict[Any, Any]:
    charsets = raw.get(0x00080005)
    charset = _text(charsets[1], "ascii").strip() if charsets else ""
    if charset not in _CHARSETS:
        raise GiveUp("character set")
    encoding = _CHARSETS[charset]
    out: dict[Any, Any] = {}
    for tag, (vr, value) in raw.items():
        key, kind = WANTED[tag]
        if kind in ("us", "fd"):
            out[key] = _binary(kind, vr, value)
            continue
        if vr and vr not in TEXT_VRS:
            raise GiveUp("a text element with a binary VR")
        if kind == "raw":
            out[key] = value  # as pydicom keeps a private element it has no name for
            continue
        text = _text(value, encoding)
        if kind == "uid":
            out[key] = text.rstrip("\0 ")
        elif kind == "multi":
            parts = [p.strip() for p in text.split("\\")]
            out[key] = parts if len(parts) > 1 else parts[0]
        elif kind == "floats":
            out[key] = [float(v) for v in text.split("\\")] if text.strip() else None
        elif "\\" in text:
            raise GiveUp("several values where one is expected")
        elif kind == "int":
            out[key] = _is(text)
        else:
            out[key] = text.strip()
    return out


def _text(value: bytes, encoding: str) -> str:
    return value.decode(encoding).rstrip("\0")


def _binary(kind: str, vr: bytes, value: bytes) -> float | int | None:
    if kind == "us":
        if vr not in (b"US", b"") or len(value) != 2:
            raise GiveUp("unsigned short")
        return struct.unpack("<H", value)[0]
    if vr not in (b"FD", b"") or len(value) % 8:
        raise GiveUp("double")
    return struct.unpack_from("<d", value)[0] if value else None


def _is(text: str) -> int | str | None:
    """An Integer String as pydicom reads it: an int, None when empty; anything else is left
    to pydicom's own rules."""
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise GiveUp("not an integer string") from None
