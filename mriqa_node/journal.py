"""The receive journal: an append-only, checksummed log whose fdatasync makes an instance durable.

A receiver answers Success once the instance's record is in the journal and synced: one
fdatasync per acknowledged instance, and fewer under load, because concurrent associations
share one (group commit: the first thread to need a sync syncs everything appended so far,
the others wait for it). The spool files and database rows are written behind it, in batches
(services/intake.py, JournalApplier), and rebuilt from the journal at start after a crash.

Layout: ``<dir>/<segment number>.journal``, each a run of records::

    b"MQJ1" | meta length u32 | payload length u32 | crc32(meta + payload) u32 | meta | payload

A record whose checksum or length does not hold is a write torn by a crash before its sync
returned, so it was never acknowledged: reading stops there. A new process never appends to
an old segment; it starts the next one, and a segment is deleted once everything in it is
applied (its files synced and its rows committed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"MQJ1"
_HEAD = struct.Struct("<4sIII")
SUFFIX = ".journal"

Position = tuple[int, int]  # (segment number, byte offset): ordered like the log itself


@dataclass(frozen=True)
class Record:
    meta: dict[str, Any]
    payload: bytes
    end: Position  # the position just after this record


class Journal:
    """Appends are durable on return (with ``fsync``); reads see only synced records."""

    def __init__(self, directory: Path, segment_bytes: int = 16 * 2**20, fsync: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()  # the write position
        self._synced_cond = threading.Condition()  # the synced position and who syncs
        self._syncing = False
        existing = self.segments()
        self._segment = (existing[-1] + 1) if existing else 1
        self._fd = self._create(self._segment)
        self._offset = 0
        self._appended: Position = (self._segment, 0)
        self._synced: Position = (self._segment, 0)
        # Where replay starts: the oldest segment a previous process left behind.
        self.start: Position = (existing[0], 0) if existing else (self._segment, 0)

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SUFFIX}"

    def _create(self, segment: int) -> int:
        fd = os.open(self._path(segment), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        if self.fsync:  # the new name itself must survive a power cut
            _fsync_dir(self.directory)
        return fd

    def append(self, meta: dict[str, Any], payload: bytes | memoryview) -> Position:
        """Write one record and return once it is on disk; raises OSError (nothing kept)."""
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        crc = zlib.crc32(payload, zlib.crc32(meta_bytes))
        parts = [_HEAD.pack(MAGIC, len(meta_bytes), len(payload), crc), meta_bytes, payload]
        with self._lock:
            if self._offset >= self.segment_bytes:
                self._rotate()
            start = self._offset
            try:
                _write_all(self._fd, parts)
            except OSError:
                with contextlib.suppress(OSError):  # no torn record left behind a refusal
                    os.ftruncate(self._fd, start)
                    os.lseek(self._fd, start, os.SEEK_SET)
                raise
            self._offset = start + sum(len(p) for p in parts)
            end = self._appended = (self._segment, self._offset)
        self._sync_through(end)
        return end

    def _rotate(self) -> None:
        """Start the next segment (called with the write lock held); the old one is synced
        first so that 'synced up to (n, x)' keeps meaning every record before it."""
        if self.fsync:
            os.fdatasync(self._fd)
        old = self._fd
        self._segment += 1
        self._fd = self._create(self._segment)
        self._offset = 0
        with self._synced_cond:
            self._synced = max(self._synced, (self._segment, 0))
            self._synced_cond.notify_all()
        os.close(old)

    def _sync_through(self, position: Position) -> None:
        """Group commit: sync once for every record appended so far, or wait for the thread
        that is doing so. (Lock order: the write lock is never taken under the condition.)"""
        while True:
            with self._synced_cond:
                while self._syncing and self._synced < position:
                    self._synced_cond.wait()
                if self._synced >= position:
                    return
                self._syncing = True
            synced = None
            try:
                with self._lock:
                    target, fd = self._appended, os.dup(self._fd)
                try:
                    if self.fsync:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
                synced = target
            finally:
                with self._synced_cond:
                    self._syncing = False
                    if synced is not None:
                        self._synced = max(self._synced, synced)
                    self._synced_cond.notify_all()

    def synced(self) -> Position:
        with self._synced_cond:
            return self._synced

    def read(self, start: Position, end: Position | None = None) -> Iterator[Record]:
        """The whole records from ``start`` up to ``end`` (default: what is synced now)."""
        end = self.synced() if end is None else end
        for segment in (s for s in self.segments() if start[0] <= s <= end[0]):
            offset = start[1] if segment == start[0] else 0
            limit = end[1] if segment == end[0] else None
            yield from self._read_segment(segment, offset, limit)

    def _read_segment(self, segment: int, offset: int, limit: int | None) -> Iterator[Record]:
        path = self._path(segment)
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(offset)
            while limit is None or offset < limit:
                head = f.read(_HEAD.size)
                if not head:
                    return
                record = _parse(head, f)
                if record is None:
                    log.warning("journal %s: torn record at byte %d (never acknowledged):"
                                " reading stops there", path.name, offset)  # fmt: skip
                    return
                meta, payload, size = record
                offset += size
                yield Record(meta, payload, (segment, offset))

    def release(self, upto: Position) -> None:
        """Delete the segments wholly before ``upto`` (everything in them is applied)."""
        with self._lock:
            current = self._segment
        for segment in self.segments():
            if segment < upto[0] and segment < current:
                self._path(segment).unlink(missing_ok=True)

    def backlog_bytes(self, applied: Position) -> int:
        """Bytes appended but not yet applied (approximate across segments)."""
        with self._lock:
            segment, offset = self._segment, self._offset
        if applied[0] == segment:
            return offset - applied[1]
        older = sum(_size(self._path(s)) for s in self.segments() if applied[0] <= s < segment)
        return max(older - applied[1], 0) + offset

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            os.close(self._fd)


def _parse(head: bytes, f: Any) -> tuple[dict[str, Any], bytes, int] | None:
    if len(head) < _HEAD.size:
        return None
    magic, meta_len, payload_len, crc = _HEAD.unpack(head)
    if magic != MAGIC:
        return None
    meta_bytes = f.read(meta_len)
    payload = f.read(payload_len)
    if len(meta_bytes) < meta_len or len(payload) < payload_len:
        return None
    if zlib.crc32(payload, zlib.crc32(meta_bytes)) != crc:
        return None
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        return None
    return meta, payload, _HEAD.size + meta_len + payload_len


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
