"""What the PACS learns from the node: rejection notes and QA results, made from the event feed.

- A series confirmed as rejected (the technologist acknowledged its alert with "rescanned",
  `mriqa reject`, or, when configured, any non-diagnostic verdict) gets an IHE IOCM Key Object
  Selection document, "Rejected for Quality Reasons" (113001, DCM), referencing every instance.
- A decided series gets a Comprehensive SR with the verdict, score, flagged slices, model and
  per-slice probabilities (and, optionally, a Secondary Capture montage with the heat maps).

Both are written to the spool's ``qa/`` folder and queued in the forwarding outbox for the
destinations that want them, after the series' own instances (the outbox keeps id order).
Their UIDs are derived from the series (and verdict), so handling an event twice queues the
same object once. The feed position is kept in the database (cursor ``pacs``). The objects
are encoded by a :class:`QaObjects` (the DICOM layer's ``QaEncoder``), given by the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.config import DestinationConfig
from mriqa_node.db.models import Cursor, Event, Instance, Series
from mriqa_node.db.sql import insert_ignore, now_utc
from mriqa_node.domain.qa import EncodedObject, ModelIdentity, ObjectUids, QaResult, ReportedSlice
from mriqa_node.domain.verdict import NOT_ASSESSED
from mriqa_node.services import queries
from mriqa_node.services.feed import FeedCursor
from mriqa_node.services.forwarding import enqueue_forward
from mriqa_node.spool import Spool

log = logging.getLogger(__name__)
CURSOR = "pacs"
BATCH = 200


class NotRejectable(LookupError):
    pass


class QaObjects(Protocol):
    """Encodes the objects from the series' spool files (ValueError or OSError if it cannot)."""

    def rejection_note(self, sources: Sequence[Path], uids: ObjectUids,
                       when: datetime) -> EncodedObject: ...  # fmt: skip

    def qa_report(self, sources: Sequence[Path], result: QaResult, uids: ObjectUids,
                  when: datetime) -> EncodedObject: ...  # fmt: skip

    def montage(self, sources: Sequence[Path], png: bytes, uids: ObjectUids,
                when: datetime) -> EncodedObject: ...  # fmt: skip


class PacsPublisher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        reads: sessionmaker[Session],
        spool: Spool,
        destinations: Sequence[DestinationConfig],
        objects: QaObjects,
        reject_on_non_diagnostic: bool = False,
        montage: Callable[[str], bytes] | None = None,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.reads = reads
        self.spool = spool
        self.destinations = list(destinations)
        self.objects = objects
        self.reject_on_non_diagnostic = reject_on_non_diagnostic
        self.montage = montage  # series UID -> PNG montage with heat maps (None: no montage)
        self.on_queued = on_queued  # wakes the forwarder
        self._cursor: FeedCursor | None = None

    # -- rejection ---------------------------------------------------------------------------

    def reject(self, series_uid: str, by: str) -> str | None:
        """Mark the series rejected and queue its rejection note; None if it already was."""
        targets = [d.name for d in self.destinations if d.send_kos]
        with self.sessions.begin() as session:
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            if series is None:
                raise NotRejectable(f"no series {series_uid}")
            now = now_utc()
            done = session.execute(
                update(Series)
                .where(Series.id == series.id, Series.rejected_at.is_(None))
                .values(rejected_at=now, rejected_by=by)
            ).rowcount
            if not done:
                return None
            sources = self._sources(session, series.id)
            if not sources:
                raise NotRejectable(f"series {series_uid} has no instance to reject")
            kos = self.objects.rejection_note(sources, ObjectUids.derived(series_uid, "kos"), now)
            self._queue(session, kos, "kos", series_uid, targets, now)
            session.add(Event(kind="series_rejected", series_uid=series_uid,
                              payload={"series_uid": series_uid, "by": by,
                                       "kos_sop_instance_uid": kos.sop_instance_uid,
                                       "destinations": targets}, created_at=now))  # fmt: skip
        log.warning("series %s rejected for quality reasons by %s; rejection note to %s",
                    series_uid, by, ", ".join(targets) or "no destination")  # fmt: skip
        self.on_queued()
        return kos.sop_instance_uid

    # -- QA results --------------------------------------------------------------------------

    def publish_result(self, series_uid: str, verdict_id: int) -> list[str]:
        """Queue the SR (and montage) for a verdict; returns the SOP Instance UIDs queued."""
        sr_targets = [d.name for d in self.destinations if d.send_sr]
        sc_targets = [d.name for d in self.destinations if d.send_montage] if self.montage else []
        if not sr_targets and not sc_targets:
            return []
        detail = queries.series_detail(self.reads, series_uid)
        verdict = next((v for v in detail["verdicts"] if v["id"] == verdict_id), None)
        if verdict is None or detail["model"] is None or verdict["label"] == NOT_ASSESSED:
            # Superseded, nothing scored, or not assessed (a localizer, a DWI...): no QA
            # result for the radiologist's PACS, where an SR per localizer would be clutter.
            return []
        png = self.montage(series_uid) if sc_targets else None
        queued = []
        with self.sessions.begin() as session:
            now = now_utc()
            sources = self._sources(session, self._series_id(session, series_uid))
            if sr_targets:
                result = qa_result(verdict, detail["slice_list"], detail["model"])
                uids = ObjectUids.derived(series_uid, f"sr-{verdict_id}")
                sr = self.objects.qa_report(sources, result, uids, now)
                self._queue(session, sr, "sr", series_uid, sr_targets, now)
                queued.append(sr.sop_instance_uid)
            if png is not None:
                uids = ObjectUids.derived(series_uid, f"montage-{verdict_id}")
                sc = self.objects.montage(sources, png, uids, now)
                self._queue(session, sc, "montage", series_uid, sc_targets, now)
                queued.append(sc.sop_instance_uid)
        self.on_queued()
        return queued

    # -- the feed ----------------------------------------------------------------------------

    def step(self) -> int:
        """Handle new events once; returns how many were handled."""
        if self._cursor is None:
            self._cursor = FeedCursor(self._load_cursor())
        with self.reads() as session:
            events = session.execute(
                select(Event.id, Event.kind, Event.series_uid, Event.payload)
                .where(Event.id > self._cursor.low)
                .order_by(Event.id)
                .limit(BATCH)
            ).all()
        new = set(self._cursor.accept(e.id for e in events))
        handled = 0
        for event_id, kind, series_uid, payload in events:
            if event_id in new:
                handled += self._handle(kind, series_uid, payload)
        self._save_cursor(self._cursor.low)
        return handled

    def _handle(self, kind: str, series_uid: str | None, payload: dict[str, Any]) -> int:
        try:
            if kind == "verdict":
                self.publish_result(series_uid, payload["verdict_id"])
            elif kind == "alert_acknowledged" and payload.get("action") == "rescanned":
                self.reject(series_uid, payload.get("by") or "console")
            elif kind == "alert" and self.reject_on_non_diagnostic:
                self.reject(series_uid, "automatic (non-diagnostic verdict)")
            elif kind == "reject_requested":
                self.reject(series_uid, payload.get("by") or "cli")
            else:
                return 0
        except (NotRejectable, queries.SeriesNotFound, OSError, ValueError) as exc:
            log.error("PACS %s for series %s not made: %s", kind, series_uid, exc)
        return 1

    def run(self, stop: threading.Event, poll_seconds: float = 0.3) -> None:
        while not stop.is_set():
            try:
                if not self.step():
                    stop.wait(poll_seconds)
            except Exception:  # database away: the cursor is in the database, retry
                log.exception("PACS publisher error; retrying in 1 s")
                stop.wait(1.0)

    # -- helpers -----------------------------------------------------------------------------

    def _sources(self, session: Session, series_id: int) -> list[Path]:
        paths = session.scalars(
            select(Instance.spool_path).where(Instance.series_id == series_id).order_by(Instance.id)
        ).all()
        return [self.spool.path(p) for p in paths]

    @staticmethod
    def _series_id(session: Session, series_uid: str) -> int:
        return session.scalar(select(Series.id).where(Series.series_uid == series_uid))

    def _queue(
        self,
        session: Session,
        obj: EncodedObject,
        kind: str,
        about: str,
        targets: list[str],
        now: datetime,
    ) -> None:
        """Write the object to the spool (durably, before the commit) and queue it, filed
        under the series it is ``about`` (so the outbox shows the scanned series)."""
        relpath = self.spool.qa_relpath(obj.study_uid, obj.series_uid, obj.sop_instance_uid)
        self.spool.write(relpath, obj.data)
        for destination in targets:
            enqueue_forward(session, destination, kind, obj.sop_class_uid, obj.sop_instance_uid,
                            about, relpath, now)  # fmt: skip

    def _load_cursor(self) -> int:
        with self.sessions.begin() as session:
            top = session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0
            insert_ignore(session, Cursor, name=CURSOR, last_event_id=top)
            return session.scalar(select(Cursor.last_event_id).where(Cursor.name == CURSOR))

    def _save_cursor(self, low: int) -> None:
        with self.reads() as session:
            stored = session.scalar(select(Cursor.last_event_id).where(Cursor.name == CURSOR))
        if stored != low:
            with self.sessions.begin() as session:
                session.execute(
                    update(Cursor).where(Cursor.name == CURSOR).values(last_event_id=low)
                )


def qa_result(
    verdict: Mapping[str, Any], slices: Sequence[Mapping[str, Any]], model: Mapping[str, Any]
) -> QaResult:
    """The report's content from the series read model (queries.series_detail)."""
    scored = tuple(
        ReportedSlice(s["sop_instance_uid"], int(s["frame"]), int(s["index"]), s["p_nondiagnostic"])
        for s in slices
        if s["p_nondiagnostic"] is not None
    )
    worst = tuple(
        ReportedSlice(
            w["sop_instance_uid"],
            int(w.get("frame") or 0),
            int(w["slice_index"]),
            w.get("p_nondiagnostic"),
        )
        for w in verdict.get("worst_slices") or []
    )
    decided = verdict.get("decided_at")
    return QaResult(
        label=verdict["label"],
        score=verdict.get("score"),
        n_slices=int(verdict.get("n_slices") or len(slices)),
        n_unscorable=int(verdict.get("n_unscorable") or 0),
        model=ModelIdentity(
            str(model["name"]), str(model["version"]), model.get("sha256"), model.get("task")
        ),
        slices=scored,
        worst=worst,
        n_flagged=sum(bool(s.get("flagged")) for s in slices),
        decided_at=datetime.fromisoformat(decided) if decided else None,
    )
