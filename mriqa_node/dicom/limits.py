"""Bounds on what a peer may make the receiver hold in memory, or wait for.

The receiver reads each PDU through :class:`PduReader`: a PDU that declares more than the
limit closes the connection after its 6-byte header, before any of it is kept; so does one
that trickles in slower than MIN_RATE once it has taken longer than the patience (a socket
timeout alone would let one byte a second hold a connection for as long as the declared length
lasts). The data set size limit is checked as its fragments arrive (dicom/scp.py).
"""

from __future__ import annotations

import socket
import time

from mriqa_node.dicom.upper import PDU_HEADER

MIN_RATE = 8192  # bytes/s a PDU must average once it has taken longer than the patience
KEEP_BUFFER_BYTES = 4 * 2**20  # a larger PDU gets a buffer of its own, not kept afterwards


class PeerExceedsLimit(OSError):
    """The peer sent more, or slower, than the receiver accepts; the connection is closed."""


class PduReader:
    """Reads whole PDUs from a connected socket (plain or TLS) into one reused buffer."""

    def __init__(self, sock: socket.socket, max_pdu_bytes: int,
                 patience_seconds: float = 60.0) -> None:  # fmt: skip
        self.sock = sock
        self.max_pdu_bytes = max_pdu_bytes
        self.patience_seconds = patience_seconds
        self._head = bytearray(PDU_HEADER.size)
        self._buffer = bytearray(256 * 1024)
        self._started = 0.0
        self._received = 0

    def read(self) -> tuple[int, memoryview] | None:
        """The next PDU's type and body (valid until the next read); None when the peer
        closed the connection between PDUs. Raises PeerExceedsLimit, ConnectionError, and
        TimeoutError when nothing came for the socket's timeout."""
        self._received = 0
        if not self._fill(memoryview(self._head), first=True):
            return None
        pdu_type, length = PDU_HEADER.unpack(self._head)
        if length > self.max_pdu_bytes:
            raise PeerExceedsLimit(
                f"a PDU (type 0x{pdu_type:02X}) declares {length:,} bytes, more than the "
                f"{self.max_pdu_bytes:,} accepted"
            )
        if length > KEEP_BUFFER_BYTES:
            return pdu_type, self._read_large(length)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._fill(body)
        return pdu_type, body

    def _read_large(self, length: int) -> memoryview:
        """A PDU larger than the kept buffer, in a buffer that grows as its bytes arrive: what
        a peer declares is not allocated before it is sent (a 1 GiB header and ten bytes
        would otherwise cost 1 GiB)."""
        body = bytearray()
        while len(body) < length:
            step = min(length - len(body), max(len(body), KEEP_BUFFER_BYTES))
            start = len(body)
            body += bytes(step)
            self._fill(memoryview(body)[start:])
        return memoryview(body)

    def _fill(self, view: memoryview, first: bool = False) -> bool:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                if first and got == 0:
                    return False
                raise ConnectionError("the peer closed the connection inside a PDU")
            now = time.monotonic()
            if first and got == 0:
                self._started = now  # the clock runs from the PDU's first byte
            got += n
            self._received += n
            elapsed = now - self._started
            if elapsed > self.patience_seconds and self._received < MIN_RATE * elapsed:
                raise PeerExceedsLimit(
                    f"a PDU trickles in: {self._received:,} bytes in {elapsed:.0f} s"
                )
        return True
