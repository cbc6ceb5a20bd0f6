"""The receive path: journal first, answer, then spool files and rows in batches behind it.

:meth:`JournaledIntake.accept` returns once the instance is in the receive journal and synced
(mriqa_node/journal.py): that is what Success means, and it costs one fdatasync, shared by
concurrent associations. A thread (:meth:`JournaledIntake.run`) applies what the journal holds:
spool files written unsynced, one syncfs, then the rows in one transaction (Intake.apply_batch).
A segment of the journal is deleted only once all of it is applied; after a crash, whatever is
left is applied again at start, and rows that already exist make that a no-op.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from mriqa_node.db.sql import now_utc
from mriqa_node.domain.records import InstanceHeader
from mriqa_node.journal import Journal, Position, Record
from mriqa_node.services.intake import Intake, Received
from mriqa_node.spool import SpoolError

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # between attempts to apply while the database or the spool is away
GATHER_SECONDS = 0.25  # the applier waits at most this long for a full batch (~8 ms per batch)
FREE_SPACE_AGE = 0.05  # seconds a free-space reading is used for, with what was written since
HEADROOM_BYTES = 2**18  # file system slack (blocks, directories) kept free beyond an instance


class NotAccepting(SpoolError):
    """The node cannot keep more now (its database or spool is away): the sender retries."""


class JournaledIntake:
    def __init__(self, intake: Intake, journal: Journal, batch: int = 64,
                 gather_seconds: float = GATHER_SECONDS) -> None:  # fmt: skip
        self.intake = intake
        self.spool = intake.spool
        self.journal = journal
        self.batch = batch
        self.applied: Position = journal.start
        self.failing: str | None = None  # why the last apply failed; None when healthy
        self.gather_seconds = gather_seconds
        self.replaying = False  # applying what a previous process left: rewrite every file
        self._wake = threading.Event()
        self._urgent = threading.Event()  # rows wanted now: a release, a stop, a full batch
        self._waiting = 0  # records since the last batch (no lock: it only sets _urgent)
        self._progress = threading.Condition()
        self._hooks: list[tuple[Position, Callable[[], None]]] = []

    # -- the hot path -----------------------------------------------------------------------

    def accept(self, header: InstanceHeader, encoded: bytes, calling_aet: str | None) -> None:
        """Durable on return; raises SpoolError (disk, journal, or NotAccepting)."""
        if self.failing is not None:
            raise NotAccepting(errno.EAGAIN, f"instances are not being kept: {self.failing}")
        relpath = self.spool.relpath(header.study_uid, header.series_uid, header.sop_instance_uid)
        free = self.spool.free_bytes(max_age=FREE_SPACE_AGE)
        self.spool.check_space(free)
        if free < 2 * len(encoded) + HEADROOM_BYTES:  # the spool's copy and the journal's
            raise SpoolError(errno.ENOSPC, f"no room: {free} bytes free on the spool's disk")
        # The spool file now, unsynced (its space is then taken: an acknowledged instance
        # never waits for room), unless the name is taken: the first copy is the one kept.
        wrote = not self.spool.exists(relpath)
        if wrote:
            self.spool.write(relpath, encoded, sync=False)
        self.spool.reserve(2 * len(encoded))
        meta = {"header": header.to_json(), "relpath": relpath, "calling_aet": calling_aet,
                "received_at": now_utc().isoformat()}  # fmt: skip
        try:
            self.journal.append(meta, encoded)
        except OSError as exc:
            if wrote:  # not acknowledged: nothing of it stays
                self.spool.path(relpath).unlink(missing_ok=True)
            raise SpoolError(exc.errno, f"cannot journal {relpath}: {exc.strerror or exc}") from exc
        self._waiting += 1
        if self._waiting >= self.batch:
            self._urgent.set()
        self._wake.set()

    def released(self, series_uids: set[str]) -> None:
        """The association that sent these series was released: a hint that they are
        complete, recorded once their instances have rows."""
        if series_uids:
            self.after_backlog(lambda: self._mark_released(series_uids))
            self._urgent.set()

    def _mark_released(self, series_uids: set[str]) -> None:
        try:
            self.intake.mark_released(series_uids)
        except SQLAlchemyError as exc:  # only a hint: idle completion still applies
            log.warning("could not record association release: %s", _short(exc))

    def after_backlog(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything acknowledged so far has its rows (e.g. the release
        hint, which must not reach a series before its instances do)."""
        position = self.journal.synced()
        with self._progress:
            if self.applied < position:
                self._hooks.append((position, action))
                self._wake.set()
                return
        action()

    # -- behind it --------------------------------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Apply until ``stopping``, then once more for what came in meanwhile."""
        while not stopping.is_set():
            self._wake.wait(RETRY_SECONDS)
            # Gather a batch: one syncfs and one commit per batch, not per instance (a sync per
            # instance here would queue behind, and ahead of, the journal's own; a commit per
            # few instances costs the receiving threads the GIL for ~8 ms each).
            self._urgent.wait(self.gather_seconds)
            self._wake.clear()
            self._urgent.clear()
            self._waiting = 0
            if not self.apply_pending() and not stopping.is_set():
                stopping.wait(RETRY_SECONDS)
        self.apply_pending()

    def apply_pending(self) -> bool:
        """Apply what is synced in the journal; False (and ``failing`` says why) when the
        database or the spool refused, so nothing of the batch counts as applied."""
        end = self.journal.synced()
        batch: list[Record] = []
        try:
            for record in self.journal.read(self.applied, end):
                batch.append(record)
                if len(batch) >= self.batch:
                    self._apply(batch)
                    batch = []
            if batch:
                self._apply(batch)
        except (SQLAlchemyError, OSError) as exc:
            if self.failing is None:
                log.error("cannot apply the receive journal (retrying every %.0f s; new instances"
                          " get 0xA700 meanwhile): %s", RETRY_SECONDS, _short(exc))  # fmt: skip
            with self._progress:
                self.failing = _short(exc)
                self._progress.notify_all()  # a release waiting for rows stops waiting
            return False
        if self.failing is not None:
            log.info("receive journal applied again: instances are being kept")
            self.failing = None
        self._advance(max(self.applied, end))
        return True

    def _apply(self, batch: list[Record]) -> None:
        items = [_received(r) for r in batch]
        payloads = {id(item): r.payload for item, r in zip(items, batch, strict=True)}

        def write(item: Received) -> None:
            """The receiver wrote the file; after a crash it may be missing or torn (it was
            not synced), and the journal's copy replaces it."""
            if self.replaying or not self.spool.has(item.relpath, item.size):
                self.spool.write(item.relpath, payloads[id(item)], sync=False)

        self.intake.apply_batch(items, write=write, sync=self.spool.sync)
        self._advance(batch[-1].end)

    def _advance(self, position: Position) -> None:
        with self._progress:
            self.applied = position
            due = [a for p, a in self._hooks if p <= position]
            self._hooks = [(p, a) for p, a in self._hooks if p > position]
            self._progress.notify_all()
        self.journal.release(position)
        for action in due:
            try:
                action()
            except Exception:
                log.exception("error after applying the receive journal")

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until everything acknowledged so far has its file and row (tests, shutdown)."""
        target = self.journal.synced()
        self._wake.set()
        self._urgent.set()
        with self._progress:  # not while applying fails: the records are kept, rows follow
            return (
                self._progress.wait_for(
                    lambda: self.applied >= target or self.failing is not None, timeout
                )
                and self.applied >= target
            )

    def backlog(self) -> dict[str, object]:
        """For /healthz and /metrics."""
        return {"bytes": self.journal.backlog_bytes(self.applied), "failing": self.failing}


def replay(intake: Intake, directories: Sequence[Path]) -> int:
    """At start, before the receivers that wrote them run again: apply the journals that
    previous processes left, then delete them; the records applied."""
    applied = 0
    for sub in (Path(d) for d in directories if Path(d).is_dir()):
        journal = Journal(sub, segment_bytes=0)  # to read: its own new segment stays empty
        try:
            records = sum(1 for _ in journal.read(journal.start))
            if records:
                receiving = JournaledIntake(intake, journal)
                receiving.replaying = True
                if not receiving.apply_pending():
                    why = receiving.failing
                    raise SpoolError(errno.EAGAIN, f"journal {sub} not applied: {why}")
                applied += records
                log.info("applied %d instance(s) left in the receive journal %s", records, sub.name)
            for segment in journal.segments():  # all applied: nothing here is needed any more
                journal.directory.joinpath(f"{segment:012d}.journal").unlink(missing_ok=True)
        finally:
            journal.close()
    return applied


def _received(record: Record) -> Received:
    meta = record.meta
    return Received(
        header=InstanceHeader.from_json(meta["header"]),
        relpath=meta["relpath"],
        size=len(record.payload),
        calling_aet=meta.get("calling_aet"),
        received_at=datetime.fromisoformat(meta["received_at"]),
    )


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
