"""The DICOM receiver: associations, C-ECHO and C-STORE, around the intake service.

Each connection is served in a thread of its own that reads whole PDUs straight from the
socket (dicom/limits.py), assembles each C-STORE's data set behind the file meta it will be
kept with, and hands it to the intake service in the same thread; the upper layer is
dicom/upper.py. There is no polling loop: a thread sleeps in ``recv`` until its peer sends.

Success is answered only after the instance is durable: its spool file written and its record
synced in the receive journal (services/receiving.py); its row follows within milliseconds.
Status codes (PS3.4 B.2.3): 0xA700 out of resources (the scanner retries later), 0xA900 data
set does not match SOP class, 0xC210 cannot understand, 0xC211 unexpected error; 0x0122 SOP
class not supported (PS3.7 C.4).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy.exc import SQLAlchemyError

from mriqa_node.config import DicomConfig
from mriqa_node.dicom import upper
from mriqa_node.dicom.headers import STORAGE_SOP_CLASSES, InvalidInstance, read_header
from mriqa_node.dicom.limits import PduReader, PeerExceedsLimit
from mriqa_node.dicom.part10 import file_prefix
from mriqa_node.dicom.upper import AssociateRequest, Command, ProtocolError
from mriqa_node.services.receiving import JournaledIntake
from mriqa_node.spool import SpoolError

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]
SUPPORTED = {VERIFICATION: frozenset(TRANSFER_SYNTAXES[:3])} | {
    sop_class: frozenset(TRANSFER_SYNTAXES) for sop_class in STORAGE_SOP_CLASSES
}

IDLE_EVICTABLE = 1.0  # seconds after accept; a real peer sends its request within milliseconds
ACCEPT_POLL = 0.5  # seconds; how soon the listening thread notices a stop
RELEASE_WAIT_SECONDS = 10.0  # at most, for rows before the release response (kept anyway)
STOP_WAIT_SECONDS = 10.0  # at most, for the connections' threads at stop
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
UNEXPECTED_ERROR = 0xC211


@dataclass(eq=False)
class Connection:
    """One accepted connection: its slot, and whether it has associated yet."""

    sock: socket.socket
    ip: str
    accepted_at: float = field(default_factory=time.monotonic)
    associated: bool = False
    thread: threading.Thread | None = None


class StoreSCP:
    """Accepts connections on the node's DICOM port and serves each in its own thread."""

    def __init__(self, config: DicomConfig, receiving: JournaledIntake) -> None:
        self.config = config
        self.reuse_port = config.receivers > 1  # other receiver processes share the port
        self.receiving = receiving
        self.max_dataset = config.max_instance_mb * 2**20
        # The largest PDU read: what we announce (0 announces no limit), or a data set's worth.
        self.max_pdu = max(config.max_pdu, 2**20) if config.max_pdu else self.max_dataset + 2**20
        self.ssl_context = _ssl_context(config)
        self._listener: socket.socket | None = None
        self._open: list[Connection] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accepting: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.config.host, self.config.port))
        listener.listen(128)
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept_loop, name="dicom-acceptor",
                                           daemon=True)  # fmt: skip
        self._accepting.start()
        log.info(
            "DICOM SCP %s listening on %s:%d%s; allowed callers: %s",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            " (TLS)" if self.config.tls else "",
            ", ".join(self.config.allowed_calling_aets) or "(none)",
        )

    def stop(self) -> None:
        """Stop listening, close the connections still open, and wait (bounded) for their
        threads: an instance being stored is then either acknowledged or not, never midway."""
        self._stopping.set()
        if self._accepting is not None:
            self._accepting.join(timeout=2 * ACCEPT_POLL + 1)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            open_now = list(self._open)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # its thread's recv returns at once
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for conn in open_now:
            if conn.thread is not None:
                conn.thread.join(timeout=max(deadline - time.monotonic(), 0))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def open_connections(self, ip: str) -> int:
        with self._lock:
            return sum(1 for c in self._open if c.ip == ip)

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of file descriptors, for one: try again shortly
                if self._stopping.is_set():
                    return
                log.error("cannot accept a connection: %s", exc)
                time.sleep(ACCEPT_POLL)
                continue
            conn = self._admit(sock, address[0])
            if conn is None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                continue
            conn.thread = threading.Thread(target=self._serve, args=(conn,),
                                           name=f"dicom-{conn.ip}", daemon=True)  # fmt: skip
            conn.thread.start()

    def _admit(self, sock: socket.socket, ip: str) -> Connection | None:
        """A slot for the connection, or None (logged) when it is refused."""
        # Nagle's algorithm stalls each C-STORE response ~40 ms against delayed ACKs.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.allowed_ips and ip not in self.config.allowed_ips:
            log.warning("refused connection from %s: address not allowed", ip)
            return None
        limit = self.config.max_associations_per_peer
        with self._lock:
            from_peer = sum(1 for c in self._open if c.ip == ip)
            if from_peer >= limit:
                log.warning(
                    "refused connection from %s: %d connections already open from it"
                    " ([dicom] max_associations_per_peer = %d)", ip, from_peer, limit,
                )  # fmt: skip
                return None
            if not self._room_for_one():
                log.warning("refused connection from %s: %d connections open, none idle"
                            " ([dicom] max_associations)", ip, len(self._open))  # fmt: skip
                return None
            conn = Connection(sock, ip)
            self._open.append(conn)
            return conn

    def _room_for_one(self) -> bool:
        """Below max_associations, or made so by closing the oldest connection that has not
        associated within IDLE_EVICTABLE seconds (call with the lock held)."""
        if len(self._open) < self.config.max_associations:
            return True
        now = time.monotonic()
        idle = [c for c in self._open
                if not c.associated and now - c.accepted_at > IDLE_EVICTABLE]  # fmt: skip
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.accepted_at)
        log.warning("closing a connection from %s that never associated, to make room",
                    oldest.ip)  # fmt: skip
        with contextlib.suppress(OSError):
            oldest.sock.shutdown(socket.SHUT_RDWR)  # its thread reads the end and closes it
        self._open.remove(oldest)
        return True

    def _serve(self, conn: Connection) -> None:
        try:
            Association(self, conn).run()
        except Exception:
            log.exception("association from %s ended by an unexpected error", conn.ip)
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)

    # -- what the node does with a message ----------------------------------------------------

    def check(self, request: AssociateRequest) -> tuple[int, int, int] | None:
        """Why the association is rejected (result, source, reason), or None."""
        if not request.protocol_version & 1:
            return upper.PROTOCOL_VERSION_NOT_SUPPORTED
        if request.application_context != upper.APPLICATION_CONTEXT:
            return upper.APPLICATION_CONTEXT_NOT_SUPPORTED
        allowed = [aet.strip() for aet in self.config.allowed_calling_aets]
        if allowed and request.calling_ae not in allowed:
            return upper.CALLING_AE_NOT_RECOGNISED
        return None

    def store(self, calling: str, command: Command, transfer_syntax: str, encoded: bytes,
              prefix: int) -> tuple[int, str | None]:  # fmt: skip
        """Keep one instance (``encoded[prefix:]`` is its data set): the C-STORE status, and
        the series it belongs to once it is kept."""
        try:
            header = read_header(encoded, transfer_syntax, lambda: _decode(encoded), prefix)
        except InvalidInstance as exc:
            log.warning("refused instance from %s: %s", calling, exc)
            return DATASET_MISMATCH, None
        except Exception as exc:  # undecodable stream: pydicom raises many types here
            log.warning("refused instance from %s: cannot decode dataset: %s", calling, exc)
            return CANNOT_UNDERSTAND, None
        if header.sop_class_uid != command.sop_class_uid:
            log.warning(
                "refused instance %s: SOP class %s differs from the request's %s",
                header.sop_instance_uid,
                header.sop_class_uid,
                command.sop_class_uid,
            )
            return DATASET_MISMATCH, None
        try:
            self.receiving.accept(header, encoded, calling)
        except (SpoolError, SQLAlchemyError) as exc:
            log.error(
                "cannot keep instance %s, answering 0xA700 so the sender retries: %s",
                header.sop_instance_uid,
                _short(exc),
            )
            return OUT_OF_RESOURCES, None
        except Exception:
            log.exception("unexpected error storing instance %s", header.sop_instance_uid)
            return UNEXPECTED_ERROR, None
        return SUCCESS, header.series_uid

    def released(self, calling: str, series_uids: set[str]) -> None:
        """Before the release response: wait (bounded) until what the sender was told Success
        for has its spool file and row, so a released association means 'in the database'.
        A clean release also hints that the sender is done with its series (an abort does not)."""
        if not self.receiving.drain(RELEASE_WAIT_SECONDS):
            log.warning("association from %s released before its instances have rows (they"
                        " are kept in the receive journal; rows follow)", calling)  # fmt: skip
        self.receiving.released(series_uids)


class Association:
    """One connection from its first byte to its close: negotiation, then messages."""

    def __init__(self, scp: StoreSCP, conn: Connection) -> None:
        self.scp = scp
        self.conn = conn
        self.config = scp.config
        self.sock: socket.socket = conn.sock
        self.calling = ""
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: ID -> (abstract, transfer)
        self.series: set[str] = set()
        # The message being received.
        self.command_bytes = bytearray()
        self.command: Command | None = None
        self.context_id = 0
        self.dataset = upper.MessageBuffer()
        self.prefix = 0

    def run(self) -> None:
        ip = self.conn.ip
        self.sock.settimeout(self.config.acse_timeout_seconds)  # also the wait for the request
        if self.scp.ssl_context is not None:
            try:
                self.sock = self.conn.sock = self.scp.ssl_context.wrap_socket(
                    self.sock, server_side=True
                )
            except OSError as exc:
                log.warning("refused TLS connection from %s: %s", ip, _short(exc) or "timed out")
                return
        reader = PduReader(self.sock, self.scp.max_pdu, self.config.network_timeout_seconds)
        try:
            if not self._associate(reader):
                return
            self.sock.settimeout(self.config.network_timeout_seconds)
            while (pdu := reader.read()) is not None:
                pdu_type, body = pdu
                if pdu_type == upper.P_DATA_TF:
                    self._receive(body)
                elif pdu_type == upper.RELEASE_RQ:
                    self.scp.released(self.calling, self.series)
                    self.sock.sendall(upper.encode_release_rp())
                    log.info("association from %s (%s) released", self.calling, ip)
                    return
                elif pdu_type == upper.ABORT:
                    log.info("association from %s (%s) aborted by the peer", self.calling, ip)
                    return
                else:
                    raise ProtocolError(
                        f"an unexpected PDU of type 0x{pdu_type:02X}", upper.UNEXPECTED_PDU
                    )
            log.info("connection from %s (%s) closed without a release", self.calling or "?", ip)
        except PeerExceedsLimit as exc:
            log.warning("closing connection from %s: %s", ip, exc)
            self._abort(0)
        except ProtocolError as exc:
            log.warning("aborting association from %s (%s): %s", self.calling or "?", ip, exc)
            self._abort(exc.reason)
        except TimeoutError:
            log.warning("closing connection from %s: nothing received for %.0f s", ip,
                        self.sock.gettimeout() or 0)  # fmt: skip
            if self.conn.associated:  # before it, PS3.8 closes the connection without one
                self._abort(0)
        except (ConnectionError, OSError) as exc:
            if not self.scp.stopping:
                log.info("connection from %s lost: %s", ip, _short(exc))

    def _associate(self, reader: PduReader) -> bool:
        pdu = reader.read()
        if pdu is None:
            return False
        pdu_type, body = pdu
        if pdu_type != upper.ASSOCIATE_RQ:
            raise ProtocolError(
                f"a PDU of type 0x{pdu_type:02X} before an association request",
                upper.UNEXPECTED_PDU,
            )
        request = upper.parse_associate_rq(body)
        self.calling = request.calling_ae
        rejection = self.scp.check(request)
        if rejection is not None:
            log.warning("association from %s (%s) rejected: %s", request.calling_ae,
                        self.conn.ip, _REJECTIONS[rejection])  # fmt: skip
            self.sock.sendall(upper.encode_associate_rj(*rejection))
            return False
        results = {}
        for context in request.contexts:
            results[context.id] = result = _negotiate(context)
            if result[0] == upper.ACCEPTANCE:
                self.contexts[context.id] = (context.abstract_syntax, result[1])
        self.peer_max_pdu = request.max_pdu
        self.sock.sendall(upper.encode_associate_ac(request, results, self.config.max_pdu))
        self.conn.associated = True
        log.info("association from %s (%s), %d of %d presentation contexts accepted",
                 request.calling_ae, self.conn.ip, len(self.contexts),
                 len(request.contexts))  # fmt: skip
        return True

    def _receive(self, body: memoryview) -> None:
        """One P-DATA-TF: command and data set fragments, answered as each message completes."""
        for cid, is_command, last, data in upper.iter_pdvs(body):
            if cid not in self.contexts:
                raise ProtocolError(f"a fragment on presentation context {cid}, not accepted")
            if is_command:
                if self.command is not None:
                    raise ProtocolError("a command fragment where a data set was expected")
                self.command_bytes += data
                if len(self.command_bytes) > 2**16:
                    raise ProtocolError("a command set of more than 64 KiB")
                if last:
                    self._command_complete(cid)
            else:
                if self.command is None or cid != self.context_id:
                    raise ProtocolError("a data set fragment without its command")
                self.dataset.add(data)
                if self.dataset.size - self.prefix > self.scp.max_dataset:
                    raise PeerExceedsLimit(f"a dataset of more than {self.scp.max_dataset:,}"
                                           " bytes ([dicom] max_instance_mb)")  # fmt: skip
                if last:
                    self._dataset_complete()

    def _command_complete(self, cid: int) -> None:
        command = upper.parse_command(self.command_bytes)
        self.command_bytes = bytearray()
        abstract, transfer = self.contexts[cid]
        if command.kind == upper.C_ECHO_RQ and not command.has_dataset:
            self._respond(cid, command, SUCCESS)
        elif command.kind == upper.C_STORE_RQ and command.has_dataset:
            self.command, self.context_id = command, cid
            prefix = file_prefix(command.sop_class_uid, command.sop_instance_uid, transfer)
            self.dataset.start(prefix)
            self.prefix = len(prefix)
        else:
            raise ProtocolError(
                f"a DIMSE command 0x{command.kind or 0:04X} on presentation"
                f" context {cid} ({abstract}), which this node does not serve"
            )

    def _dataset_complete(self) -> None:
        command, cid = self.command, self.context_id
        assert command is not None
        encoded, self.command = self.dataset.take(), None
        abstract, transfer = self.contexts[cid]
        if command.sop_class_uid not in STORAGE_SOP_CLASSES or abstract != command.sop_class_uid:
            log.warning("refused instance from %s: SOP class %s on a context for %s",
                        self.calling, command.sop_class_uid, abstract)  # fmt: skip
            status = SOP_CLASS_NOT_SUPPORTED
        else:
            status, series = self.scp.store(self.calling, command, transfer, encoded,
                                            self.prefix)  # fmt: skip
            if series is not None:
                self.series.add(series)
        self._respond(cid, command, status)

    def _respond(self, cid: int, command: Command, status: int) -> None:
        response = upper.encode_response(command, status)
        self.sock.sendall(upper.encode_pdata(cid, True, response, self.peer_max_pdu))

    def _abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(upper.encode_abort(reason))


def _negotiate(context: upper.PresentationContext) -> tuple[int, str]:
    """(result, transfer syntax): the requestor's first transfer syntax the node takes."""
    supported = SUPPORTED.get(context.abstract_syntax)
    if supported is None:
        return upper.ABSTRACT_SYNTAX_NOT_SUPPORTED, context.transfer_syntaxes[0]
    for transfer in context.transfer_syntaxes:
        if transfer in supported:
            return upper.ACCEPTANCE, transfer
    return upper.TRANSFER_SYNTAXES_NOT_SUPPORTED, context.transfer_syntaxes[0]


_REJECTIONS = {
    upper.CALLING_AE_NOT_RECOGNISED: "calling AE title not allowed ([dicom] allowed_calling_aets)",
    upper.APPLICATION_CONTEXT_NOT_SUPPORTED: "application context not supported",
    upper.PROTOCOL_VERSION_NOT_SUPPORTED: "protocol version not supported",
}


def _decode(encoded: bytes) -> pydicom.Dataset:
    """pydicom's decode of a received instance, for what the header scan is not sure of."""
    return pydicom.dcmread(BytesIO(encoded), force=True)


def _ssl_context(config: DicomConfig) -> ssl.SSLContext | None:
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key or None)
    if config.tls_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=config.tls_ca)
    return context


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]
