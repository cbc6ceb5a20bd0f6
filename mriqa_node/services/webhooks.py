"""Webhooks: a signed JSON POST to each configured URL for every verdict and alert.

Delivery goes through a durable outbox in the database, so a webhook that is down, or a node
that restarts, loses nothing: :meth:`WebhookOutbox.fan_out` copies new events into one
``webhook_delivery`` row per (webhook, event), and the rows are sent until a 2xx answer or the
last retry, with exponential backoff. Several processes on one PostgreSQL may run the outbox:
the unique (webhook, event) key, locked cursors and SKIP LOCKED claims keep one row and one
sender per delivery.

What a receiver gets (``Content-Type: application/json``, ``User-Agent: mriqa-node``):

- ``X-MRIQA-Event``: the event kind (``verdict``, ``alert``, ``alert_acknowledged``, and
  ``drift`` / ``drift_cleared`` for a scanner whose verdicts depart from its own past).
- ``X-MRIQA-Delivery``: the delivery id, the same on every retry. Delivery is at least once (a
  2xx that is lost on the way back is sent again), so receivers de-duplicate on it.
- ``X-MRIQA-Timestamp``: unix seconds when this attempt was sent.
- ``X-MRIQA-Signature``: ``sha256=`` + hex HMAC-SHA256 with the webhook's secret over
  ``f"{timestamp}.".encode() + body`` (absent when no secret is configured). Check it with
  :func:`verify` on the raw body, and reject old timestamps (say > 5 min) against replays.

The body carries the series, verdict, score, worst slices and a console link; never patient
name or ID, nor the free-text acknowledgement comment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.config import WebhookConfig
from mriqa_node.db.models import Cursor, DeliveryState, Event, WebhookDelivery
from mriqa_node.db.sql import dialect, insert_ignore, now_utc
from mriqa_node.domain import retry
from mriqa_node.services.claims import lock_oldest
from mriqa_node.services.feed import GapClock

log = logging.getLogger(__name__)

BATCH = 500  # events read per fan-out transaction
# An id missing below newer events may belong to a transaction not yet committed (PostgreSQL
# hands out ids before commit): wait this long for it before reading past it (a rollback).
VERDICT_FIELDS = (
    "series_description",
    "calling_aet",
    "label",
    "score",
    "worst_slices",
    "n_slices",
    "n_unscorable",
    "reason",
)
ITEM_COLUMNS = (WebhookDelivery.id, WebhookDelivery.webhook, WebhookDelivery.attempts, Event.id,
                Event.kind, Event.series_uid, Event.payload, Event.created_at)  # fmt: skip
OPTIONAL_FIELDS = {"alert_id": "alert_id", "action": "action", "by": "acknowledged_by",
                   # drift and drift_cleared (services/drift.py): a scanner, not a series
                   "protocol": "protocol", "baseline": "baseline", "recent": "recent",
                   "reasons": "reasons"}  # fmt: skip


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-MRIQA-Signature value for a body sent at ``timestamp`` (unix seconds, as sent)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """For receivers: is ``signature`` the sender's for this timestamp and raw body?"""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def backoff(hook: WebhookConfig, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return retry.backoff(attempts, hook.backoff_seconds, hook.backoff_max_seconds)


def cursor_name(webhook: str) -> str:
    """Each webhook reads the feed at its own pace: one that is added starts at the newest
    event, and a process whose configuration lacks a webhook never moves that one's cursor."""
    name = f"webhook:{webhook}"
    return (
        name if len(name) <= 64 else f"webhook:{hashlib.sha256(webhook.encode()).hexdigest()[:48]}"
    )


@dataclass(frozen=True)
class Delivery:
    """A claimed outbox row with its event: what :meth:`WebhookOutbox.deliver` sends."""

    id: int
    webhook: str
    attempts: int
    event_id: int
    kind: str
    series_uid: str | None
    payload: dict[str, Any]
    created_at: datetime


class WebhookOutbox:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        reads: sessionmaker[Session] | None,
        webhooks: list[WebhookConfig],
        console_url: str,
        worker_id: str,
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions  # polling queries (SQLite: without the write lock)
        self.hooks = {h.name: h for h in webhooks}
        self.console_url = console_url.rstrip("/")
        self.worker_id = worker_id
        self._gaps = GapClock()

    def fan_out(self) -> int:
        """Copy new events into the outbox; returns the number of deliveries created."""
        cursors = {cursor_name(name): hook for name, hook in self.hooks.items()}
        if not cursors:
            return 0
        with self.reads() as session:  # no write lock unless there is something new
            seen = dict(
                session.execute(
                    select(Cursor.name, Cursor.last_event_id).where(Cursor.name.in_(cursors))
                ).all()
            )
            top = session.scalar(select(func.max(Event.id))) or 0
        if len(seen) == len(cursors) and min(seen.values()) >= top:
            return 0
        now, created = now_utc(), 0
        with self.sessions.begin() as session:
            top = session.scalar(select(func.max(Event.id))) or 0
            for name in cursors.keys() - seen.keys():  # a new webhook starts at the newest event
                insert_ignore(session, Cursor, name=name, last_event_id=top)
            # Locked in name order: concurrent fan-outs queue here instead of deadlocking.
            rows = session.scalars(
                select(Cursor)
                .where(Cursor.name.in_(cursors))
                .order_by(Cursor.name)
                .with_for_update()
            ).all()
            start = min(c.last_event_id for c in rows)
            events = session.execute(
                select(Event.id, Event.kind).where(Event.id > start).order_by(Event.id).limit(BATCH)
            ).all()
            events = self._without_gaps(start, events)
            for cursor in rows:
                hook = cursors[cursor.name]
                new = [{"webhook": hook.name, "event_id": event_id, "state": DeliveryState.pending,
                        "attempts": 0, "next_attempt_at": now, "created_at": now}
                       for event_id, kind in events
                       if event_id > cursor.last_event_id and kind in hook.events]  # fmt: skip
                if new:  # ON CONFLICT DO NOTHING: a row that exists stays as it is
                    insert = dialect(session).insert(WebhookDelivery).values(new)
                    returning = insert.on_conflict_do_nothing().returning(WebhookDelivery.id)
                    created += len(session.execute(returning).all())
                if events and events[-1][0] > cursor.last_event_id:
                    cursor.last_event_id = events[-1][0]
        return created

    def _without_gaps(self, start: int, events: list[Any]) -> list[Any]:
        """The events up to the first missing id that may still be committed."""
        prev = start
        for i, (event_id, _) in enumerate(events):
            if event_id != prev + 1 and self._gaps.may_fill(prev + 1):
                return events[:i]
            prev = event_id
        self._gaps.forget(prev)
        return events

    def _claimable(self, now: datetime) -> Any:
        d = WebhookDelivery
        unclaimed = or_(d.claimed_by.is_(None), d.claim_expires_at < now)
        return (d.state == DeliveryState.pending) & (d.next_attempt_at <= now) & unclaimed

    def due_webhooks(self) -> set[str]:
        """Configured webhooks with a delivery to send now (a cheap read, for polling)."""
        with self.reads() as session:
            return set(
                session.scalars(
                    select(WebhookDelivery.webhook)
                    .distinct()
                    .where(self._claimable(now_utc()), WebhookDelivery.webhook.in_(self.hooks))
                )
            )

    def claim_due(self, limit: int, webhook: str | None = None) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries (of one webhook, or of all configured), oldest
        first, long enough to send them one after the other."""
        names = [webhook] if webhook else list(self.hooks)
        now = now_utc()
        d = WebhookDelivery
        with self.sessions.begin() as session:
            ids = lock_oldest(session, d.id, self._claimable(now) & d.webhook.in_(names), limit)
            if not ids:
                return []
            timeout = max(self.hooks[n].timeout_seconds for n in names)
            expires = now + timedelta(seconds=timeout * (len(ids) + 1) + 10)
            session.execute(
                update(d)
                .where(d.id.in_(ids))
                .values(claimed_by=self.worker_id, claim_expires_at=expires)
            )
            rows = session.execute(
                select(*ITEM_COLUMNS)
                .join(Event, d.event_id == Event.id)
                .where(d.id.in_(ids))
                .order_by(d.id)
            ).all()
        return [Delivery(*row) for row in rows]

    def body(self, item: Delivery) -> dict[str, Any]:
        """The JSON a receiver gets: the event's verdict fields, no patient data."""
        p = item.payload
        series_uid = item.series_uid or p.get("series_uid")
        body: dict[str, Any] = {
            "event": item.kind,
            "event_id": item.event_id,
            "delivery_id": item.id,
            "created_at": item.created_at.isoformat(),
            "series_uid": series_uid,
            **{key: p.get(key) for key in VERDICT_FIELDS},
        }
        body |= {out: p[key] for key, out in OPTIONAL_FIELDS.items() if key in p}
        page = (f"/series/{series_uid}" if series_uid
                else "/scanners" if item.kind in ("drift", "drift_cleared") else "")  # fmt: skip
        body["console_url"] = self.console_url + page
        return body

    def deliver(self, item: Delivery) -> bool:
        """One attempt for a claimed delivery; True when the receiver answered 2xx."""
        hook = self.hooks[item.webhook]
        content = json.dumps(self.body(item), separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "mriqa-node",
            "X-MRIQA-Event": item.kind,
            "X-MRIQA-Delivery": str(item.id),
            "X-MRIQA-Timestamp": timestamp,
        }
        if hook.secret:
            headers["X-MRIQA-Signature"] = sign(hook.secret, timestamp, content)
        status: int | None = None
        error: str | None = None
        try:
            response = httpx.post(
                hook.url, content=content, headers=headers, timeout=hook.timeout_seconds
            )
            status = response.status_code
            if not response.is_success:
                error = f"HTTP {status} {response.reason_phrase}"
        except Exception as exc:  # refused, timed out, TLS, bad URL: all one failed attempt
            error = f"{type(exc).__name__}: {exc}"
        self._record(item, hook, status, error and error[:300])
        return error is None

    def _record(
        self, item: Delivery, hook: WebhookConfig, status: int | None, error: str | None
    ) -> None:
        now, attempts = now_utc(), item.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status": status,
            "last_error": error,
            "claimed_by": None,
            "claim_expires_at": None,
        }
        if error is None:
            values |= {"state": DeliveryState.delivered, "delivered_at": now}
        elif attempts >= hook.max_attempts:
            values["state"] = DeliveryState.failed
            log.error("webhook %s: delivery %d (%s event %d) failed after %d attempts: %s",
                      hook.name, item.id, item.kind, item.event_id, attempts, error)  # fmt: skip
        else:
            wait = backoff(hook, attempts)
            values["next_attempt_at"] = now + timedelta(seconds=wait)
            log.warning("webhook %s: delivery %d attempt %d failed (%s), retry in %.1f s",
                        hook.name, item.id, attempts, error, wait)  # fmt: skip
        d = WebhookDelivery
        with self.sessions.begin() as session:  # only while the claim is still ours
            session.execute(
                update(d)
                .where(
                    d.id == item.id,
                    d.claimed_by == self.worker_id,
                    d.state == DeliveryState.pending,
                )
                .values(**values)
            )

    def run(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        """Fan out and send until ``stop`` is set. Each webhook has its own lane (thread), so
        a slow or dead one does not hold up the others; errors are logged and retried."""
        if not self.hooks:
            return
        lanes: dict[str, Future[None]] = {}
        with ThreadPoolExecutor(len(self.hooks), thread_name_prefix="webhook") as pool:
            while not stop.is_set():
                try:
                    self.fan_out()
                    for name in self.due_webhooks():
                        if name not in lanes or lanes[name].done():
                            lanes[name] = pool.submit(self._drain, name, stop)
                except Exception:  # database away: the outbox is in the database, try again
                    log.exception("webhook outbox error")
                    stop.wait(1.0)
                stop.wait(poll_seconds)

    def _drain(self, webhook: str, stop: threading.Event) -> None:
        """Send one webhook's due deliveries, one claim at a time."""
        try:
            while not stop.is_set() and (items := self.claim_due(1, webhook)):
                self.deliver(items[0])
        except Exception:
            log.exception("webhook %s: outbox error", webhook)

    def deliveries(self, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
        """Newest deliveries first, for the admin page and API."""
        d = WebhookDelivery
        query = (
            select(
                d.id,
                d.webhook,
                Event.kind.label("event"),
                d.event_id,
                Event.series_uid,
                d.state,
                d.attempts,
                d.last_status,
                d.last_error,
                d.next_attempt_at,
                d.created_at,
                d.delivered_at,
            )
            .join(Event, d.event_id == Event.id)
            .order_by(d.id.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(d.state == DeliveryState(state))
        with self.reads() as session:
            return [dict(row._mapping) for row in session.execute(query)]
