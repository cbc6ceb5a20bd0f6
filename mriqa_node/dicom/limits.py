"""Bounds on what a peer may make the receiver hold in memory.

pynetdicom reads a whole PDU before it looks at it (whatever length the PDU header declares)
and assembles a whole dataset in memory before the C-STORE handler runs. The receiver's
sockets therefore read through a small streaming parser of the upper layer protocol: a PDU
that declares more than the limit, or a dataset whose fragments add up to more than
``[dicom] max_instance_mb``, closes the connection at once, logged with the reason, before
the bytes are kept; so does a PDU that trickles in slower than MIN_RATE once it has taken
longer than the network timeout (pynetdicom's timers do not run while it waits inside a PDU,
so one byte a second would hold a connection for as long as the declared length lasts).
Reading stays pynetdicom's; only ``recv`` is observed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from typing import Any

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
PDU_HEADER = 6  # type, reserved, 4-byte length
PDV_HEADER = 6  # 4-byte length, presentation context id, message control header
MIN_RATE = 8192  # bytes/s a PDU must average once it has taken longer than the patience


class PeerExceedsLimit(OSError):
    """The peer sent more than the receiver accepts; pynetdicom closes the connection."""


class UpperLayerMeter:
    """Fed every received byte in order; raises PeerExceedsLimit when a bound is passed."""

    def __init__(
        self, max_pdu_bytes: int, max_dataset_bytes: int, patience_seconds: float = 60.0
    ) -> None:
        self.max_pdu_bytes = max_pdu_bytes
        self.max_dataset_bytes = max_dataset_bytes
        self.patience_seconds = patience_seconds
        self._pdu_started = 0.0
        self._pdu_received = 0
        self._pdu_header = bytearray()
        self._pdu_left = 0
        self._pdu_type = 0
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_dataset = False
        self._pdv_last = False
        self.dataset_bytes = 0  # of the message being received

    def feed(self, data: bytes | bytearray | memoryview, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        n = len(data)
        if n < self._pdv_left and n < self._pdu_left and self._pdu_type == P_DATA_TF:
            # Inside one fragment, as nearly every read is: pynetdicom reads 4 KiB at a time,
            # 128 reads for a 512x512 slice, so this short cut saves ~1 ms per instance.
            self._pdu_left -= n
            self._pdu_received += n
            self._pdv_left -= n
            if self._pdv_dataset:
                self._count_dataset(n)
            self._check_rate(now)
            return
        view, i = memoryview(data), 0
        while i < len(view):
            if self._pdu_left == 0:
                take = min(PDU_HEADER - len(self._pdu_header), len(view) - i)
                if not self._pdu_header:
                    self._pdu_started, self._pdu_received = now, 0
                self._pdu_header += view[i : i + take]
                i += take
                if len(self._pdu_header) == PDU_HEADER:
                    self._start_pdu(*struct.unpack(">BxL", self._pdu_header))
                    self._pdu_header.clear()
                continue
            take = min(self._pdu_left, len(view) - i)
            if self._pdu_type == P_DATA_TF:
                self._feed_pdvs(view[i : i + take])
            self._pdu_left -= take
            self._pdu_received += take
            i += take
        self._check_rate(now)

    def _check_rate(self, now: float) -> None:
        elapsed = now - self._pdu_started
        midway = self._pdu_left > 0 or bool(self._pdu_header)
        if midway and elapsed > self.patience_seconds and self._pdu_received < MIN_RATE * elapsed:
            raise PeerExceedsLimit(
                f"a PDU trickles in: {self._pdu_received:,} bytes in {elapsed:.0f} s"
            )

    def _start_pdu(self, pdu_type: int, length: int) -> None:
        if length > self.max_pdu_bytes:
            raise PeerExceedsLimit(
                f"a PDU (type 0x{pdu_type:02X}) declares {length:,} bytes, more than the "
                f"{self.max_pdu_bytes:,} accepted"
            )
        self._pdu_type, self._pdu_left = pdu_type, length
        self._pdv_header.clear()
        self._pdv_left = 0

    def _feed_pdvs(self, view: memoryview) -> None:
        j = 0
        while j < len(view):
            if self._pdv_left == 0:
                take = min(PDV_HEADER - len(self._pdv_header), len(view) - j)
                self._pdv_header += view[j : j + take]
                j += take
                if len(self._pdv_header) == PDV_HEADER:
                    length, _, control = struct.unpack(">LBB", self._pdv_header)
                    self._pdv_header.clear()
                    self._pdv_left = max(length - 2, 0)
                    self._pdv_dataset, self._pdv_last = not control & 1, bool(control & 2)
                    self._end_fragment()
                continue
            take = min(self._pdv_left, len(view) - j)
            if self._pdv_dataset:
                self._count_dataset(take)
            self._pdv_left -= take
            j += take
            self._end_fragment()

    def _count_dataset(self, n: int) -> None:
        self.dataset_bytes += n
        if self.dataset_bytes > self.max_dataset_bytes:
            raise PeerExceedsLimit(
                f"a dataset of more than {self.max_dataset_bytes:,} bytes ([dicom] max_instance_mb)"
            )

    def _end_fragment(self) -> None:
        if self._pdv_left == 0 and self._pdv_dataset and self._pdv_last:
            self.dataset_bytes = 0  # the message's dataset is complete


class _Metered:
    """``recv`` that feeds an UpperLayerMeter; mixed into a socket class below."""

    limits: tuple[int, int, float] = (0, 0, 60.0)  # max PDU, max dataset bytes; patience

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)  # type: ignore[misc]
        meter = self.__dict__.get("_meter")
        if meter is None:
            meter = self.__dict__["_meter"] = UpperLayerMeter(*self.limits)
        try:
            meter.feed(data)
        except PeerExceedsLimit as exc:
            log.warning("closing connection from %s: %s", _peer(self), exc)
            raise
        return data


def metered_socket_classes(
    max_pdu_bytes: int, max_dataset_bytes: int, patience_seconds: float
) -> tuple[type, type]:
    """(socket class, SSLSocket class) whose ``recv`` enforces these limits."""
    limits = {"limits": (max_pdu_bytes, max_dataset_bytes, patience_seconds)}
    plain = type("MeteredSocket", (_Metered, socket.socket), limits)
    tls = type("MeteredSSLSocket", (_Metered, ssl.SSLSocket), limits)
    return plain, tls


def metered(sock: socket.socket, cls: type) -> socket.socket:
    """The accepted socket as ``cls`` (same file descriptor and timeout)."""
    timeout = sock.gettimeout()
    wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
    wrapped.settimeout(timeout)
    return wrapped


def _peer(sock: Any) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "a closed peer"
