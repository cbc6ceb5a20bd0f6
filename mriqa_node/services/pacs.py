"""What the PACS learns from the node: rejection notes and QA results, made from the event feed.

- A series confirmed as rejected (the technologist acknowledged its alert with "rescanned",
  `mriqa reject`, or, when configured, any non-diagnostic verdict) gets an IHE IOCM Key Object
  Selection document, "Rejected for Quality Reasons" (113001, DCM), referencing every instance.
- A decided series gets a Comprehensive SR with the verdict, score, flagged slices, model and
  per-slice probabilities (and, optionally, a Secondary Capture montage with the heat maps).

Both are written to the spool's ``qa/`` folder and queued in the forwarding outbox for the
destinations that want them, after the series' own instances (the outbox keeps id order).
Their UIDs are derived from the series (and verdict), so handling an event twice queues the
same object once. The feed position is kept in the database (cursor ``pacs``).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.config import DestinationConfig
from mriqa_node.db.models import Cursor, Event, Instance, Series
from mriqa_node.db.sql import insert_ignore, now_utc
from mriqa_node.dicom.objects import build_montage_sc, build_qa_sr, build_rejection_kos
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


class PacsPublisher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        reads: sessionmaker[Session],
        spool: Spool,
        destinations: Sequence[DestinationConfig],
        station_ae: str,
        reject_on_non_diagnostic: bool = False,
        montage: Callable[[str], bytes] | None = None,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.reads = reads
        self.spool = spool
        self.destinations = list(destinations)
        self.station_ae = station_ae
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
            headers = self._headers(session, series.id)
            if not headers:
                raise NotRejectable(f"series {series_uid} has no instance to reject")
            kos = build_rejection_kos(headers, station_ae=self.station_ae, when=now)
            _pin_uids(kos, series_uid, "kos")
            self._queue(session, kos, "kos", series_uid, targets, now)
            session.add(Event(kind="series_rejected", series_uid=series_uid,
                              payload={"series_uid": series_uid, "by": by,
                                       "kos_sop_instance_uid": str(kos.SOPInstanceUID),
                                       "destinations": targets}, created_at=now))  # fmt: skip
        log.warning("series %s rejected for quality reasons by %s; rejection note to %s",
                    series_uid, by, ", ".join(targets) or "no destination")  # fmt: skip
        self.on_queued()
        return str(kos.SOPInstanceUID)

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
            headers = self._headers(session, self._series_id(session, series_uid))
            classes = {str(h.SOPInstanceUID): str(h.SOPClassUID) for h in headers}
            scored = [s for s in detail["slice_list"] if s["p_nondiagnostic"] is not None]
            slices = [{**s, "sop_class_uid": classes.get(s["sop_instance_uid"])} for s in scored]
            if sr_targets:
                sr = build_qa_sr(headers, verdict, slices, detail["model"], when=now)
                _pin_uids(sr, series_uid, f"sr-{verdict_id}")
                self._queue(session, sr, "sr", series_uid, sr_targets, now)
                queued.append(str(sr.SOPInstanceUID))
            if png is not None:
                sc = build_montage_sc(headers, png, when=now)
                _pin_uids(sc, series_uid, f"montage-{verdict_id}")
                self._queue(session, sc, "montage", series_uid, sc_targets, now)
                queued.append(str(sc.SOPInstanceUID))
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
        except (NotRejectable, queries.SeriesNotFound, OSError,
                pydicom.errors.InvalidDicomError, ValueError) as exc:  # fmt: skip
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

    def _headers(self, session: Session, series_id: int) -> list[pydicom.Dataset]:
        paths = session.scalars(
            select(Instance.spool_path).where(Instance.series_id == series_id).order_by(Instance.id)
        ).all()
        return [pydicom.dcmread(self.spool.path(p), stop_before_pixels=True) for p in paths]

    @staticmethod
    def _series_id(session: Session, series_uid: str) -> int:
        return session.scalar(select(Series.id).where(Series.series_uid == series_uid))

    def _queue(
        self,
        session: Session,
        ds: pydicom.FileDataset,
        kind: str,
        about: str,
        targets: list[str],
        now: datetime,
    ) -> None:
        """Write the object to the spool (durably, before the commit) and queue it, filed
        under the series it is ``about`` (so the outbox shows the scanned series)."""
        relpath = self.spool.qa_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        ds.SOPInstanceUID)  # fmt: skip
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        self.spool.write(relpath, buf.getbuffer())
        for destination in targets:
            enqueue_forward(session, destination, kind, ds.SOPClassUID, ds.SOPInstanceUID,
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


def _pin_uids(ds: pydicom.FileDataset, series_uid: str, what: str) -> None:
    """Derive the object's series and instance UIDs from what it reports on, so making it
    again (an event handled twice, a restart) gives the same object, queued once."""
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[series_uid, what, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, what, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
