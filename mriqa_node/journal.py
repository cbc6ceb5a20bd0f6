"""The receive journal: an append-only, checksummed log whose fdatasync makes an instance durable.

A receiver answers Success once the instance's record is in the journal and synced: one
fdatasync per acknowledged instance, and fewer under load, because concurrent associations
share one (group commit: the first thread to need a sync syncs everything appended so far,
the others wait for it). The spool files and database rows are written behind it, in batches
(services/receiving.py, JournaledIntake), and rebuilt from the journal at start after a crash.

Layout: ``<dir>/<segment number>.journal``, each a run of records::

    b"MQJ2" | segment u32 | meta length u32 | payload length u32 | crc32(meta + payload) u32
    | meta (JSON) | payload

Segments are made ahead of time, filled with zeros (a zero header ends the records) or recycled
from an applied segment (a record with another segment number ends them); either way fdatasync
then writes data, not file size and extents. A record whose checksum or length does not hold
is a write torn by a crash before its sync returned, so it was never acknowledged: reading
stops there. A new process never appends to an old segment; it starts the next one, and a
segment is deleted or recycled once everything in it is applied (files synced, rows committed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mriqa_node.spool import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"MQJ2"
_HEAD = struct.Struct("<4sIIII")  # magic, segment number, meta length, payload length, crc32
SUFFIX = ".journal"

Position = tuple[int, int]  # (segment number, byte offset): ordered like the log itself


@dataclass(frozen=True)
class Record:
    meta: dict[str, Any]
    payload: bytes
    end: Position  # the position just after this record


class Journal:
    """Appends are durable on return (with ``fsync``); reads see only synced records."""

    def __init__(self, directory: Path, segment_bytes: int = 16 * 2**20, fsync: bool = True,
                 cache_bytes: int = 64 * 2**20):  # fmt: skip
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._owner = _own(self.directory)  # one process per journal, ever
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()  # the write position
        self._synced_cond = threading.Condition()  # the synced position and who syncs
        self._syncing = False
        existing = self.segments()
        self._segment = (existing[-1] + 1) if existing else 1
        self._fd = self._new_segment(self._segment)
        self._offset = 0
        self._lengths: dict[int, int] = {}  # bytes used in this process's full segments
        self._appended: Position = (self._segment, 0)
        self._synced: Position = (self._segment, 0)
        self._spare: tuple[int, int] | None = None  # the next segment, made ahead of time
        # The records not yet released, kept in memory up to cache_bytes: the applier reads
        # them from here instead of reading back (and checksumming) what was just written.
        # Each with the position before it (a segment's end, for a segment's first record).
        self.cache_bytes = cache_bytes
        self._cache: deque[tuple[Position, Record]] = deque()
        self._cached_bytes = 0
        self._spare_thread: threading.Thread | None = None
        # Where replay starts: the oldest segment a previous process left behind.
        self.start: Position = (existing[0], 0) if existing else (self._segment, 0)

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SUFFIX}"

    def _new_segment(self, segment: int) -> int:
        """Create a segment filled with zeros where the disk has room: overwriting allocated
        blocks, fdatasync then writes the data alone, not the file's size and extents (about
        half the cost on this machine's disk). Without room, a file that grows."""
        fd = os.open(self._path(segment), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            if shutil.disk_usage(self.directory).free < 4 * self.segment_bytes:
                raise OSError(errno.ENOSPC, "no room to make the segment ahead")
            zeros = bytes(max(min(self.segment_bytes, 2**20), 1))
            for offset in range(0, self.segment_bytes, len(zeros)):
                os.pwrite(fd, zeros[: self.segment_bytes - offset], offset)
            if self.fsync:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, 0)
        if self.fsync:  # the new name itself must survive a power cut
            fsync_dir(self.directory)
        return fd

    def _ensure_spare(self) -> None:
        """Make the next segment in the background, unless an applied one was recycled as
        it (the usual case: the applier releases a segment long before the next one is half
        written). Called with the write lock held."""
        if self._spare is not None or (self._spare_thread and self._spare_thread.is_alive()):
            return

        def prepare(segment: int) -> None:
            with contextlib.suppress(OSError):  # rotation then makes it itself
                self._spare = (segment, self._new_segment(segment))

        self._spare_thread = threading.Thread(target=prepare, args=(self._segment + 1,),
                                              daemon=True, name="journal-spare")  # fmt: skip
        self._spare_thread.start()

    def append(self, meta: dict[str, Any], payload: bytes | memoryview) -> Position:
        """Write one record and return once it is on disk; raises OSError (nothing kept)."""
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        crc = zlib.crc32(payload, zlib.crc32(meta_bytes))
        with self._lock:
            before = self._appended
            size = _HEAD.size + len(meta_bytes) + len(payload)
            if self._offset and self._offset + size > self.segment_bytes:
                self._rotate()
            elif self._offset + size > self.segment_bytes // 2:
                self._ensure_spare()
            head = _HEAD.pack(MAGIC, self._segment, len(meta_bytes), len(payload), crc)
            parts = [head, meta_bytes, payload]
            start = self._offset
            try:
                _write_all(self._fd, parts, start)
            except OSError:
                with contextlib.suppress(OSError):  # no torn record left behind a refusal
                    os.pwrite(self._fd, bytes(_HEAD.size), start)
                raise
            self._offset = start + size
            end = self._appended = (self._segment, self._offset)
            if self._cached_bytes + len(payload) <= self.cache_bytes:
                self._cache.append((before, Record(meta, bytes(payload), end)))
                self._cached_bytes += len(payload)
        self._sync_through(end)
        return end

    def _rotate(self) -> None:
        """Go on in the next segment (called with the write lock held); the old one is synced
        first so that 'synced up to (n, x)' keeps meaning every record before it."""
        if self.fsync:
            os.fdatasync(self._fd)
        old = self._fd
        self._lengths[self._segment] = self._offset
        if self._spare_thread:
            self._spare_thread.join()
        self._segment += 1
        spare, self._spare = self._spare, None
        if spare and spare[0] == self._segment:
            self._fd = spare[1]
        else:
            self._fd = self._new_segment(self._segment)
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
        """The whole records from ``start`` up to ``end`` (default: what is synced now):
        from memory while they are there, else from the segments."""
        end = self.synced() if end is None else end
        position = start
        while position < end:
            run = self._cached_run(position, end)
            if not run:
                yield from self._read_segments(position, end)
                return
            yield from run
            position = run[-1].end

    def _cached_run(self, position: Position, end: Position) -> list[Record]:
        """The cached records that follow ``position`` without a gap, up to ``end``."""
        run: list[Record] = []
        with self._lock:
            for before, record in self._cache:
                if record.end <= position:
                    continue
                if before != (run[-1].end if run else position) or record.end > end:
                    break
                run.append(record)
        return run

    def _read_segments(self, start: Position, end: Position) -> Iterator[Record]:
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
                if not head.strip(b"\0"):
                    return  # the end: the zeros the segment was made with
                magic, number = _HEAD.unpack(head)[:2] if len(head) == _HEAD.size else (b"", 0)
                if magic == MAGIC and number != segment:
                    return  # the end: a record from the file's life as an older segment
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
            while self._cache and self._cache[0][1].end <= upto:
                self._cached_bytes -= len(self._cache.popleft()[1].payload)
            for segment in self.segments():
                if segment < upto[0] and segment < current:
                    self._lengths.pop(segment, None)
                    if not self._recycle(segment):
                        self._path(segment).unlink(missing_ok=True)

    def _recycle(self, segment: int) -> bool:
        """Keep an applied segment as the next one: its blocks are allocated, so it needs no
        zero fill, and its old records carry another segment number, which ends reading.
        Called with the write lock held."""
        if self._spare is not None or (self._spare_thread and self._spare_thread.is_alive()):
            return False
        try:
            os.rename(self._path(segment), self._path(self._segment + 1))
            self._spare = (self._segment + 1, os.open(self._path(self._segment + 1), os.O_RDWR))
            if self.fsync:
                fsync_dir(self.directory)
        except OSError:
            return False
        return True

    def backlog_bytes(self, applied: Position) -> int:
        """Bytes appended but not yet applied."""
        with self._lock:
            segment, offset = self._segment, self._offset
            full = sum(n for s, n in self._lengths.items() if applied[0] <= s < segment)
        return full + offset - applied[1]

    def close(self) -> None:
        if self._spare_thread:
            self._spare_thread.join()
        with self._lock, contextlib.suppress(OSError):
            os.close(self._fd)
            if self._spare:
                os.close(self._spare[1])
        os.close(self._owner)  # and with it the lock


class JournalBusy(OSError):
    """Another process still holds this journal."""


def _own(directory: Path, wait: float = 30.0) -> int:
    """An exclusive lock on the journal (released when this process ends, however it ends):
    a receiver restarted while its predecessor is still finishing waits for it."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                why = f"journal {directory} is held by another process"
                raise JournalBusy(errno.EBUSY, why) from None
            time.sleep(0.1)


def _parse(head: bytes, f: Any) -> tuple[dict[str, Any], bytes, int] | None:
    if len(head) < _HEAD.size:
        return None
    magic, _segment, meta_len, payload_len, crc = _HEAD.unpack(head)
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


def _write_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
