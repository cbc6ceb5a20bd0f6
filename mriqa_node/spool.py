"""Durable file store for received instances: write temp, fsync, rename, fsync the directory.

Files are kept exactly as they arrived (the encoded dataset with its file meta), so nothing is
decoded and re-encoded on the receive path. Layout: ``<study uid>/<series uid>/<sop uid>.dcm``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

_UID_RE = re.compile(r"^[0-9.]{1,64}$")
SUFFIX = ".dcm"
TMP_SUFFIX = ".part"


QA_DIR = "qa"
_SYNCFS = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "syncfs", None)  # Linux


class SpoolError(OSError):
    """The instance could not be kept (disk full, read-only, ...)."""


class LowDiskSpace(SpoolError):
    """Free space on the spool's file system is below the configured watermark."""


class Spool:
    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._free, self._free_at = 0, -1e9

    def free_bytes(self, max_age: float = 0.0) -> int:
        """Free space on the spool's file system; ``max_age`` seconds old at most (statvfs
        costs as much as the rest of a receive, so the receiver asks every 50 ms at most and
        counts what it writes between)."""
        now = time.monotonic()
        if max_age <= 0 or now - self._free_at > max_age:
            self._free, self._free_at = shutil.disk_usage(self.root).free, now
        return self._free

    def reserve(self, size: int) -> None:
        """Count ``size`` bytes as used until the next statvfs."""
        self._free -= size

    def space(self) -> dict[str, int | bool]:
        """Free bytes on the spool's file system, the watermark, and whether it is crossed."""
        free = self.free_bytes()
        return {"free_bytes": free, "min_free_bytes": self.min_free_bytes,
                "low": bool(self.min_free_bytes) and free < self.min_free_bytes}  # fmt: skip

    def check_space(self, free: int | None = None) -> None:
        """LowDiskSpace below the watermark: refuse a new instance while the disk still has
        room for the files being written, the database and the logs."""
        free = self.free_bytes() if free is None else free
        if self.min_free_bytes and free < self.min_free_bytes:
            raise LowDiskSpace(
                errno.ENOSPC,
                f"{free / 2**20:.0f} MiB free on the spool's disk, below the watermark of"
                f" {self.min_free_bytes / 2**20:.0f} MiB ([storage] min_free_mb)",
            )

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where an instance lives; UIDs are validated so they cannot escape the spool."""
        for uid in (study_uid, series_uid, sop_uid):
            if not _UID_RE.match(uid):
                raise ValueError(f"not a valid DICOM UID: {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}{SUFFIX}"

    def qa_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where a QA object the node made for the PACS lives (kept apart from received ones:
        never re-ingested, never scored)."""
        return f"{QA_DIR}/{self.relpath(study_uid, series_uid, sop_uid)}"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def write(self, relpath: str, data: bytes | memoryview, sync: bool = True) -> int:
        """Atomically put the data at relpath: temp file, fdatasync, rename, fsync directory.

        ``sync=False`` leaves the syncing to one :meth:`sync` for a whole batch (the receive
        journal holds the bytes until then)."""
        sync = sync and self.fsync
        final = self.root / relpath
        directory = final.parent
        tmp = directory / f".{final.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            self._ensure_dir(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if sync:
                fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(exc.errno, f"cannot keep {relpath}: {exc.strerror or exc}") from exc
        return len(data)

    def sync(self) -> None:
        """Make every file written so far durable, with their directories: one syncfs(2) of
        the spool's file system (os.sync where the C library has none)."""
        if not self.fsync:
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _SYNCFS is None or _SYNCFS(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:  # make the new directory entries themselves durable
            for d in (directory.parent, directory.parent.parent):
                fsync_dir(d)
        self._known_dirs.add(directory)

    def read(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def has(self, relpath: str, size: int) -> bool:
        """A file of this size is at relpath."""
        try:
            return (self.root / relpath).stat().st_size == size
        except OSError:
            return False

    def files(self) -> Iterator[str]:
        """Every kept instance (relative paths); leftover temp files are removed."""
        for path in self.root.rglob("*"):
            if path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
            elif path.is_file() and path.suffix == SUFFIX:
                relpath = path.relative_to(self.root).as_posix()
                if not relpath.startswith(f"{QA_DIR}/"):
                    yield relpath


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
