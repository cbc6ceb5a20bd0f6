"""The part of the DICOM upper layer (PS3.8) and of DIMSE (PS3.7) that the receiver speaks.

The receiver only accepts associations and serves C-ECHO and C-STORE: a small, fixed part of
the standard, encoded and decoded here as plain functions over bytes. It does not go through
pynetdicom's loops, which poll every millisecond, read 4 KiB at a time and cost 5-8 ms per
512 KiB instance on this machine, more than the node's own work (docs/benchmarks.md, section
1). pynetdicom remains the node's SCU (forwarding, query/retrieve) and its tests' peer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from mriqa_node.dicom.part10 import uid_value

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_HEADER = struct.Struct(">BxL")  # type, reserved, length
PDV_HEADER = struct.Struct(">LBB")  # length, presentation context ID, message control header
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
CALLING_AE_NOT_RECOGNISED = (1, 1, 3)
APPLICATION_CONTEXT_NOT_SUPPORTED = (1, 1, 2)
PROTOCOL_VERSION_NOT_SUPPORTED = (1, 2, 2)
# A-ABORT (source 2: service provider) reasons, PS3.8 9.3.8
UNEXPECTED_PDU, INVALID_PARAMETER = 2, 6

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101


class ProtocolError(ValueError):
    """The peer sent something this part of the standard does not allow; str says what, and
    ``reason`` is the A-ABORT reason that tells the peer."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PresentationContext:
    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    protocol_version: int
    application_context: str
    contexts: tuple[PresentationContext, ...]
    max_pdu: int = 0  # the largest PDU the requestor receives; 0: no limit


@dataclass
class Command:
    """A DIMSE command set: its elements of group 0000 as raw values."""

    elements: dict[int, bytes] = field(default_factory=dict)

    def uid(self, element: int) -> str:
        return self.elements.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    def us(self, element: int) -> int | None:
        value = self.elements.get(element)
        return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

    @property
    def kind(self) -> int | None:
        """The command field: C_STORE_RQ, C_ECHO_RQ, ..."""
        return self.us(0x0100)

    @property
    def message_id(self) -> int:
        return self.us(0x0110) or 0

    @property
    def has_dataset(self) -> bool:
        return self.us(0x0800) not in (None, NO_DATASET)

    @property
    def sop_class_uid(self) -> str:
        return self.uid(0x0002)

    @property
    def sop_instance_uid(self) -> str:
        return self.uid(0x1000)


# -- association ---------------------------------------------------------------------------


def parse_associate_rq(body: bytes | memoryview) -> AssociateRequest:
    """An A-ASSOCIATE-RQ's body (after the 6-byte PDU header)."""
    body = bytes(body)
    if len(body) < 68:
        raise ProtocolError(f"an association request of {len(body)} bytes (at least 68)")
    version = struct.unpack_from(">H", body)[0]
    called, calling = _ae(body[4:20]), _ae(body[20:36])
    application_context, contexts, user = "", [], b""
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            application_context = _uid(value)
        elif item_type == 0x20:
            contexts.append(_presentation_context(value))
        elif item_type == 0x50:
            user = value
    max_pdu = 0
    for sub_type, value in _items(user, 0):
        if sub_type == 0x51 and len(value) == 4:
            max_pdu = struct.unpack(">L", value)[0]
    if not application_context:
        raise ProtocolError("an association request without an application context")
    return AssociateRequest(called, calling, version, application_context, tuple(contexts),
                            max_pdu)  # fmt: skip


def _presentation_context(value: bytes) -> PresentationContext:
    if len(value) < 4:
        raise ProtocolError("a presentation context item of fewer than 4 bytes")
    abstract, transfer = "", []
    for sub_type, sub in _items(value, 4):
        if sub_type == 0x30:
            abstract = _uid(sub)
        elif sub_type == 0x40:
            transfer.append(_uid(sub))
    if not abstract or not transfer or value[0] % 2 == 0:
        raise ProtocolError(f"presentation context {value[0]} lacks a syntax or has an even ID")
    return PresentationContext(value[0], abstract, tuple(transfer))


def _items(data: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """Items of type, reserved byte, 2-byte length and value (PS3.8 9.3.2)."""
    i = start
    while i < len(data):
        if i + 4 > len(data):
            raise ProtocolError("an item header runs past the end of its PDU")
        item_type, length = data[i], struct.unpack_from(">H", data, i + 2)[0]
        if i + 4 + length > len(data):
            raise ProtocolError(f"an item of type 0x{item_type:02X} runs past the end")
        yield item_type, data[i + 4 : i + 4 + length]
        i += 4 + length


def encode_associate_ac(request: AssociateRequest, results: dict[int, tuple[int, str]],
                        max_pdu: int) -> bytes:  # fmt: skip
    """The A-ASSOCIATE-AC PDU: ``results`` maps each context ID to (result, transfer syntax)."""
    contexts = b"".join(
        _item(0x21, struct.pack(">BxBx", cid, result) + _item(0x40, _uid_bytes(ts)))
        for cid, (result, ts) in results.items()
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", max_pdu))
                 + _item(0x52, _uid_bytes(PYNETDICOM_IMPLEMENTATION_UID))
                 + _item(0x55, PYNETDICOM_IMPLEMENTATION_VERSION.encode()))  # fmt: skip
    fixed = struct.pack(">H2x16s16s32x", 1, _ae_bytes(request.called_ae),
                        _ae_bytes(request.calling_ae))  # fmt: skip
    return _pdu(ASSOCIATE_AC, fixed + _item(0x10, APPLICATION_CONTEXT.encode()) + contexts + user)


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, struct.pack(">xBBB", result, source, reason))


def encode_release_rp() -> bytes:
    return _pdu(RELEASE_RP, bytes(4))


def encode_abort(reason: int = 0, source: int = 2) -> bytes:
    return _pdu(ABORT, struct.pack(">xxBB", source, reason))


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _ae_bytes(ae: str) -> bytes:
    return ae.encode("ascii", "replace")[:16].ljust(16)


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii", "replace")


# -- data ----------------------------------------------------------------------------------


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """The PDVs of a P-DATA-TF body: (context ID, is command, is last fragment, data)."""
    i = 0
    while i < len(body):
        if i + PDV_HEADER.size > len(body):
            raise ProtocolError("a PDV header runs past the end of its PDU")
        length, cid, control = PDV_HEADER.unpack_from(body, i)
        if length < 2 or i + 4 + length > len(body):
            raise ProtocolError(f"a PDV of length {length} does not fit its PDU")
        yield cid, bool(control & 1), bool(control & 2), body[i + 6 : i + 4 + length]
        i += 4 + length


class MessageBuffer:
    """A message's data set, assembled fragment by fragment behind a prefix in one buffer that
    is kept for the connection's next message, so a 512 KiB instance does not grow a fresh
    buffer (and copy it over) again each time."""

    KEEP_BYTES = 8 * 2**20  # a larger buffer is let go after its message
    GROW_BYTES = 64 * 2**20

    def __init__(self) -> None:
        self._buffer = bytearray(2**20)
        self.size = 0  # bytes held, prefix included

    def start(self, prefix: bytes) -> None:
        if len(self._buffer) > self.KEEP_BYTES:
            self._buffer = bytearray(2**20)
        self.size = 0
        self.add(prefix)

    def add(self, data: bytes | memoryview) -> None:
        end = self.size + len(data)
        if end > len(self._buffer):  # doubling, but never more than GROW_BYTES ahead
            grown = max(end, min(2 * len(self._buffer), end + self.GROW_BYTES))
            self._buffer += bytes(grown - len(self._buffer))
        self._buffer[self.size : end] = data
        self.size = end

    def take(self) -> bytes:
        """The message's bytes (a copy); the buffer is then free for the next one."""
        data = bytes(memoryview(self._buffer)[: self.size])
        self.size = 0
        return data


def encode_pdata(cid: int, command: bool, data: bytes, max_pdu: int) -> bytes:
    """``data`` as one or more P-DATA-TF PDUs of at most ``max_pdu`` bytes (0: one)."""
    step = max(max_pdu - 12, 2) if max_pdu else max(len(data), 1)  # PDU + PDV headers
    out = []
    for start in range(0, max(len(data), 1), step):
        chunk = data[start : start + step]
        control = (1 if command else 0) | (2 if start + step >= len(data) else 0)
        out.append(_pdu(P_DATA_TF, PDV_HEADER.pack(len(chunk) + 2, cid, control) + chunk))
    return b"".join(out)


def parse_command(data: bytes) -> Command:
    """A command set in Implicit VR Little Endian (PS3.7 6.3.1)."""
    elements, i = {}, 0
    while i < len(data):
        if i + 8 > len(data):
            raise ProtocolError("a command element header runs past the end")
        group, element, length = struct.unpack_from("<HHL", data, i)
        if group != 0 or i + 8 + length > len(data):
            raise ProtocolError(f"command element ({group:04X},{element:04X}) is not valid")
        elements[element] = bytes(data[i + 8 : i + 8 + length])
        i += 8 + length
    return Command(elements)


def encode_response(request: Command, status: int) -> bytes:
    """The C-STORE-RSP or C-ECHO-RSP command set that answers ``request``."""
    store = request.kind == C_STORE_RQ
    elements = [(0x0002, uid_value(request.sop_class_uid)),
                (0x0100, struct.pack("<H", C_STORE_RSP if store else C_ECHO_RSP)),
                (0x0120, struct.pack("<H", request.message_id)),
                (0x0800, struct.pack("<H", NO_DATASET)),
                (0x0900, struct.pack("<H", status))]  # fmt: skip
    if store:
        elements.append((0x1000, uid_value(request.sop_instance_uid)))
    return encode_command(elements)


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHL", 0, e, len(v)) + v for e, v in sorted(elements))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body
