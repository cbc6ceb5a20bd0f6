"""The DICOM receiver: pynetdicom handlers bound to events, around the intake service.

Success is answered only after the instance is durable: its spool file written and its record
synced in the receive journal (services/receiving.py); its row follows within milliseconds.
Status codes (PS3.4 B.2.3): 0xA700 out of resources (the scanner retries later), 0xA900 data
set does not match SOP class, 0xC210 cannot understand, 0xC211 unexpected error.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from typing import Any

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
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from mriqa_node.config import DicomConfig
from mriqa_node.dicom.headers import STORAGE_SOP_CLASSES, InvalidInstance, read_header
from mriqa_node.dicom.limits import metered, metered_socket_classes
from mriqa_node.dicom.part10 import file_prefix
from mriqa_node.services.receiving import JournaledIntake
from mriqa_node.spool import SpoolError

log = logging.getLogger(__name__)

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

IDLE_EVICTABLE = 1.0  # seconds after accept; a real peer sends its request within milliseconds
IDLE_POLL = 0.001  # pynetdicom's own sleep in its network loop, for an association gone quiet
QUIET_SECONDS = 1.0  # without a C-STORE, after which an association sleeps IDLE_POLL again
RELEASE_WAIT_SECONDS = 10.0  # at most, for rows before the release response (kept anyway)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
UNEXPECTED_ERROR = 0xC211


class StoreSCP:
    """Binds the intake service to a pynetdicom acceptor."""

    def __init__(self, config: DicomConfig, receiving: JournaledIntake) -> None:
        self.config = config
        self.reuse_port = config.receivers > 1  # other receiver processes share the port
        self.receiving = receiving
        self._series_by_assoc: dict[int, set[str]] = defaultdict(set)
        # Sockets open per peer address, taken at accept and pruned once closed. Not counted
        # by events: a malformed request can kill pynetdicom's reactor thread (InvalidEventError
        # in its state machine), and then no connection-closed event ever comes.
        self._open_by_peer: dict[str, list[socket.socket]] = {}
        self._accepted_at: dict[int, float] = {}  # id(socket) -> when it was accepted
        self._peer_lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None
        self._busy_poll = config.busy_poll_ms / 1000
        self._last_store: dict[int, tuple[Any, float]] = {}  # id(assoc) -> (assoc, when)
        self._stopping = threading.Event()
        max_dataset = config.max_instance_mb * 2**20
        max_pdu = max(config.max_pdu, 2**20) if config.max_pdu else max_dataset + 2**20
        self._socket_class, self._ssl_socket_class = metered_socket_classes(
            max_pdu, max_dataset, config.network_timeout_seconds
        )

    def make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        # The node enforces max_associations at accept (making room by closing connections
        # that never asked to associate); pynetdicom's own check, at the request, would count
        # those silent connections too and refuse a scanner while they wait to time out.
        ae.maximum_associations = 2 * self.config.max_associations
        ae.acse_timeout = self.config.acse_timeout_seconds  # also the wait for the request
        ae.network_timeout = self.config.network_timeout_seconds
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> ThreadedAssociationServer:
        ae = self.make_ae()
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ACSE_RECV, self.handle_acse_received),
        ]
        server = ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
            server_class=SharedPortServer if self.reuse_port else ThreadedAssociationServer,
        )
        # What ae.start_server(block=False) does, which has no server_class of its own.
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
        ae._servers.append(server)  # server.shutdown() takes itself off this list
        # socketserver calls these for every accepted connection: accept (and wrap for TLS)
        # in the listening thread, check the peer there, then serve it in a thread of its own.
        server.get_request = self._accept  # type: ignore[method-assign]
        server.verify_request = self._verify_connection  # type: ignore[method-assign]
        self._serve = server.process_request_thread
        server.process_request_thread = self._serve_connection  # type: ignore[method-assign]
        self.server = server
        if self._busy_poll < IDLE_POLL:
            threading.Thread(target=self._relax_quiet, name="dicom-poll", daemon=True).start()
        log.info(
            "DICOM SCP %s listening on %s:%d%s; allowed callers: %s",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            " (TLS)" if self.config.tls else "",
            ", ".join(self.config.allowed_calling_aets) or "(none)",
        )
        return server

    def stop(self) -> None:
        self._stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _accept(self) -> tuple[socket.socket, Any]:
        """Accept without the TLS handshake, which pynetdicom does here, in the listening
        thread: one client that connects and stays silent would stop every other one."""
        assert self.server is not None and self.server.socket is not None
        sock, address = self.server.socket.accept()
        context = self.server.ssl_context
        if context is None:
            return metered(sock, self._socket_class), address
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: bound every read (a peer that stops halfway
        through a PDU would otherwise hold its thread and slot for good), then shake hands."""
        ip = _ip(client_address)
        try:
            request.settimeout(self.config.acse_timeout_seconds)
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            request.settimeout(self.config.network_timeout_seconds)
        except OSError as exc:
            log.warning("refused TLS connection from %s: %s", ip, _short(exc) or "timed out")
            assert self.server is not None
            self.server.shutdown_request(request)  # closed: its slot is free
            return
        self._serve(request, client_address)

    def _verify_connection(self, request: Any, client_address: Any) -> bool:
        # Nagle's algorithm stalls each C-STORE response ~40 ms against delayed ACKs.
        sock = request if isinstance(request, socket.socket) else request[1]
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip = _ip(client_address)
        if self.config.allowed_ips and ip not in self.config.allowed_ips:
            log.warning("refused connection from %s: address not allowed", ip)
            return False
        limit = self.config.max_associations_per_peer
        with self._peer_lock:
            from_peer = len(self._prune(ip))
            if from_peer < limit:
                if self._room_for_one():
                    self._open_by_peer.setdefault(ip, []).append(sock)
                    self._accepted_at[id(sock)] = time.monotonic()
                    return True
                most = self.config.max_associations
                log.warning("refused connection from %s: %d connections open, none idle"
                            " ([dicom] max_associations)", ip, most)  # fmt: skip
                return False
        log.warning(
            "refused connection from %s: %d connections already open from it"
            " ([dicom] max_associations_per_peer = %d)", ip, from_peer, limit,
        )  # fmt: skip
        return False

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key or None)
        context.sslsocket_class = self._ssl_socket_class  # decrypted bytes are metered
        if self.config.tls_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.config.tls_ca)
        return context

    # -- event handlers ---------------------------------------------------------------------

    def handle_accepted(self, event: evt.Event) -> None:
        self._busy(event.assoc)  # a scanner sends right after associating
        log.info(
            "association from %s (%s)",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

    def handle_rejected(self, event: evt.Event) -> None:
        log.warning(
            "association from %s (%s) rejected: calling AE not allowed, no usable context, or"
            " [dicom] max_associations reached",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

    def handle_store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title
        request = event.request
        try:
            ts = event.context.transfer_syntax
            stream = request.DataSet.getvalue()
            header = read_header(stream, ts, lambda: event.dataset)
        except InvalidInstance as exc:
            log.warning("refused instance from %s: %s", calling, exc)
            return DATASET_MISMATCH
        except Exception as exc:  # undecodable stream: pydicom raises many types here
            log.warning("refused instance from %s: cannot decode dataset: %s", calling, exc)
            return CANNOT_UNDERSTAND
        if header.sop_class_uid != request.AffectedSOPClassUID:
            log.warning(
                "refused instance %s: SOP class %s differs from the request's %s",
                header.sop_instance_uid,
                header.sop_class_uid,
                request.AffectedSOPClassUID,
            )
            return DATASET_MISMATCH
        try:
            prefix = file_prefix(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, ts)
            self.receiving.accept(header, prefix + stream, calling)
        except (SpoolError, SQLAlchemyError) as exc:
            log.error(
                "cannot keep instance %s, answering 0xA700 so the sender retries: %s",
                header.sop_instance_uid,
                _short(exc),
            )
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("unexpected error storing instance %s", header.sop_instance_uid)
            return UNEXPECTED_ERROR
        self._series_by_assoc[id(event.assoc)].add(header.series_uid)
        self._busy(event.assoc)
        return 0x0000

    def handle_acse_received(self, event: evt.Event) -> None:
        """Before the release response: wait (bounded) until what the sender was told Success
        for has its spool file and row, so a released association means 'in the database'."""
        primitive = event.primitive
        release_request = isinstance(primitive, A_RELEASE) and primitive.result is None
        if release_request and not self.receiving.drain(RELEASE_WAIT_SECONDS):
            log.warning("association from %s released before its instances have rows (they"
                        " are kept in the receive journal; rows follow)",
                        event.assoc.requestor.ae_title)  # fmt: skip

    def handle_released(self, event: evt.Event) -> None:
        """A clean release hints that the sender is done with its series (an abort does not)."""
        self.receiving.released(self._series_by_assoc.pop(id(event.assoc), set()))

    def handle_closed(self, event: evt.Event) -> None:
        self._series_by_assoc.pop(id(event.assoc), None)
        self._last_store.pop(id(event.assoc), None)

    def _busy(self, assoc: Any) -> None:
        """pynetdicom sleeps 1 ms in its network loop whenever it finds nothing to do, which
        adds to every C-STORE's round trip; while a sender is busy, its association's loop
        (an attribute of its own DUL, not the library's code) sleeps less."""
        if self._busy_poll < IDLE_POLL:
            assoc.dul._run_loop_delay = self._busy_poll
            self._last_store[id(assoc)] = (assoc, time.monotonic())

    def _relax_quiet(self) -> None:
        while not self._stopping.wait(QUIET_SECONDS / 2):
            now = time.monotonic()
            for key, (assoc, when) in list(self._last_store.items()):
                if now - when > QUIET_SECONDS:
                    assoc.dul._run_loop_delay = IDLE_POLL
                    self._last_store.pop(key, None)

    def open_connections(self, ip: str) -> int:
        with self._peer_lock:
            return len(self._prune(ip))

    def _prune(self, ip: str) -> list[socket.socket]:
        """The peer's sockets still open (call with the lock held)."""
        alive = []
        for s in self._open_by_peer.get(ip, []):
            if s.fileno() != -1:
                alive.append(s)
            else:
                self._accepted_at.pop(id(s), None)
        if alive:
            self._open_by_peer[ip] = alive
        else:
            self._open_by_peer.pop(ip, None)
        return alive

    def _room_for_one(self) -> bool:
        """Below max_associations, or made so by closing the oldest connection that has not
        associated within IDLE_EVICTABLE seconds (call with the lock held)."""
        open_now = [s for ip in list(self._open_by_peer) for s in self._prune(ip)]
        if len(open_now) < self.config.max_associations:
            return True
        assert self.server is not None
        established = {
            id(a.dul.socket.socket)
            for a in self.server.active_associations
            if a.is_established and a.dul.socket is not None
        }
        now = time.monotonic()
        idle = [s for s in open_now if id(s) not in established
                and now - self._accepted_at.get(id(s), now) > IDLE_EVICTABLE]  # fmt: skip
        if not idle:
            return False
        oldest = min(idle, key=lambda s: self._accepted_at.get(id(s), now))
        with contextlib.suppress(OSError):
            log.warning("closing a connection from %s that never associated, to make room",
                        oldest.getpeername()[0])  # fmt: skip
            oldest.shutdown(socket.SHUT_RDWR)  # pynetdicom reads the end and closes it
        for socks in self._open_by_peer.values():
            if oldest in socks:
                socks.remove(oldest)
                break
        self._accepted_at.pop(id(oldest), None)
        return True


class SharedPortServer(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT: several receiver processes listen on one port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _ip(client_address: Any) -> str:
    return client_address[0] if isinstance(client_address, tuple) else str(client_address)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300]
