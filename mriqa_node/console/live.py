"""Live push for the console: one poller reads the event feed and series progress from the
database and fans them out to every open page (server-sent events).

The database is the source, not this process: verdicts written by a worker on another host
reach the page the same way, within one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import Event, Series, SeriesState
from mriqa_node.db.sql import now_utc
from mriqa_node.services.feed import FeedCursor
from mriqa_node.services.queries import DISPLAY_STATE

log = logging.getLogger(__name__)
PROGRESS_OVERLAP = timedelta(seconds=0.5)
REPLAY_LIMIT = 200  # events replayed to a page that reconnects with Last-Event-ID


def _event_message(e: Event) -> dict[str, Any]:
    return {"id": e.id, "kind": e.kind, "series_uid": e.series_uid,
            "payload": e.payload, "created_at": e.created_at.isoformat()}  # fmt: skip


class LiveFeed:
    def __init__(self, reads: sessionmaker[Session], poll_seconds: float = 0.15) -> None:
        self.reads = reads
        self.poll_seconds = poll_seconds
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._cursor: FeedCursor | None = None
        self._progress_since: datetime | None = None

    def start_at_latest(self) -> None:
        """Begin after the newest event; pages catch up from their own Last-Event-ID."""
        with self.reads() as session:
            self._cursor = FeedCursor(session.scalar(select(func.max(Event.id))) or 0)

    # -- reading the database (in a worker thread) ---------------------------------------------

    def _read(self) -> list[dict[str, Any]]:
        now = now_utc()
        if self._cursor is None:
            self.start_at_latest()
        with self.reads() as session:
            events = session.scalars(
                select(Event).where(Event.id > self._cursor.low).order_by(Event.id).limit(500)
            ).all()
            new = set(self._cursor.accept(e.id for e in events))
            messages = [_event_message(e) for e in events if e.id in new]
            # Overlap the windows: a row stamped just before our last read may commit after it.
            since = (self._progress_since or now) - PROGRESS_OVERLAP
            moving = session.execute(
                select(Series.series_uid, Series.received_instances, Series.received_slices,
                       Series.expected_slices, Series.state)
                .where(Series.last_received_at >= since)
            ).all()  # fmt: skip
        self._progress_since = now
        messages += [
            {"kind": "progress", "series_uid": uid, "payload": {
                "instances": n, "slices": slices, "expected_slices": expected,
                "state": state.value, "display_state": DISPLAY_STATE[SeriesState(state)]}}
            for uid, n, slices, expected, state in moving
        ]  # fmt: skip
        return messages

    def replay(self, after: int) -> list[dict[str, Any]]:
        with self.reads() as session:
            events = session.scalars(
                select(Event).where(Event.id > after).order_by(Event.id).limit(REPLAY_LIMIT)
            ).all()
            return [_event_message(e) for e in events]

    # -- fan-out (on the event loop) -----------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled; a database hiccup is logged and the poll goes on."""
        while True:
            try:
                for message in await anyio.to_thread.run_sync(self._read):
                    for queue in list(self._subscribers):
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.put_nowait(message)
            except Exception:
                log.exception("live feed poll failed; retrying")
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.poll_seconds)

    async def subscribe(self, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Messages for one page: first what it missed (``after``: its Last-Event-ID), then the
        live ones. Subscribed before the catch-up read, so nothing falls between the two."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        try:
            sent: set[int] = set()
            if after is not None:
                for message in await anyio.to_thread.run_sync(self.replay, after):
                    sent.add(message["id"])
                    yield message
            while True:
                message = await queue.get()
                if message.get("id") is None or message["id"] not in sent:
                    yield message
        finally:
            self._subscribers.discard(queue)
