"""Forwarding to the PACS: a durable outbox of C-STOREs, sent in order per destination.

Jobs are written in the same transaction that keeps an instance (or, for the QA objects the
node makes, with the object's file), so a PACS that is down for minutes, or a node restart,
loses nothing. One sender lane per destination claims the oldest due jobs (``SKIP LOCKED`` on
PostgreSQL, so several node processes can share the work), sends them in one association, and
records each status. A destination that cannot be reached is retried with capped exponential
backoff and keeps its order; a job the destination refuses (a failure status other than
"out of resources") is retried a few times, then marked failed with the status for an admin.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.config import DestinationConfig
from mriqa_node.db.models import ForwardJob, ForwardState
from mriqa_node.db.sql import insert_ignore, now_utc
from mriqa_node.domain import retry
from mriqa_node.services import claims
from mriqa_node.services.claims import lock_oldest, process_alive

log = logging.getLogger(__name__)

REFUSED_TRIES = 3  # a job the destination keeps refusing is marked failed after this many
CLAIM_SECONDS = 300.0  # a lane that died mid-batch loses its claim after this


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    spool_path: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """What happened to one job: a DIMSE status, or None when nothing was answered."""

    status: int | None
    error: str | None = None

    @property
    def sent(self) -> bool:  # Success, or a Warning (the PACS kept it, e.g. with coercion)
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xBFFF)

    @property
    def transient(self) -> bool:  # worth retrying without limit: unreachable or out of resources
        return self.status is None or 0xA700 <= self.status <= 0xA7FF


# What a destination lane uses to send: (destination, jobs) -> outcome per job id.
Sender = Callable[[DestinationConfig, Sequence[Job]], dict[int, Outcome]]


def _one_claimer(session: Session, destination: str) -> None:
    """Claims of one destination happen one at a time, so two lanes never pick the same series
    (SQLite: already so, writes are serialised; PostgreSQL: a transaction advisory lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                        {"key": f"forward:{destination}"})  # fmt: skip


def backoff(dest: DestinationConfig, attempts: int) -> float:
    return retry.backoff(attempts, dest.backoff_seconds, dest.backoff_max_seconds)


class ForwardQueue:
    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:  # fmt: skip
        self.sessions = sessions
        self.reads = reads or sessions
        self.clock = clock  # injected by tests that live through a week-long outage

    def claim(self, destination: str, limit: int, worker_id: str) -> list[Job]:
        """The oldest due jobs of one series of a destination, claimed for this worker.

        A series that another lane (or process) is sending is left alone, so each series
        reaches the destination in order, its instances before its QA objects, while lanes
        send different series at once."""
        now = self.clock()
        j = ForwardJob
        busy = select(j.series_uid).where(
            j.destination == destination,
            j.state == ForwardState.pending,
            j.claimed_by.is_not(None),
            j.claim_expires_at >= now,
        )
        free = (
            (j.destination == destination)
            & (j.state == ForwardState.pending)
            & (j.next_attempt_at <= now)
            & or_(j.claimed_by.is_(None), j.claim_expires_at < now)
            & j.series_uid.not_in(busy)
        )
        with self.reads() as session:  # polling costs no write lock while nothing is due
            if session.scalar(select(j.id).where(free).limit(1)) is None:
                return []
        with self.sessions.begin() as session:
            _one_claimer(session, destination)
            series_uid = session.scalar(select(j.series_uid).where(free).order_by(j.id).limit(1))
            if series_uid is None:
                return []
            ids = lock_oldest(session, j.id, free & (j.series_uid == series_uid), limit)
            rows = session.execute(
                update(j)
                .where(j.id.in_(ids))
                .values(claimed_by=worker_id,
                        claim_expires_at=now + timedelta(seconds=CLAIM_SECONDS))
                .returning(j.id, j.kind, j.sop_class_uid, j.sop_instance_uid, j.series_uid,
                           j.spool_path, j.attempts)
            ).all()  # fmt: skip
        return sorted((Job(*row) for row in rows), key=lambda job: job.id)

    def release_dead_claims(
        self, hostname: str, alive: Callable[[int], bool] = process_alive
    ) -> int:
        """Give back at once the jobs that a killed process of this host had claimed (its
        lane died mid-batch), instead of after CLAIM_SECONDS."""
        with self.sessions.begin() as session:
            return claims.release_dead_claims(
                session, ForwardJob, ForwardJob.state == ForwardState.pending,
                {"claimed_by": None, "claim_expires_at": None}, hostname, alive,
            )  # fmt: skip

    def record(
        self,
        dest: DestinationConfig,
        worker_id: str,
        jobs: Sequence[Job],
        outcomes: dict[int, Outcome],
    ) -> None:
        """Store each job's outcome; only the claim holder may (a lost claim is ignored)."""
        now = self.clock()
        with self.sessions.begin() as session:
            for job in jobs:
                outcome = outcomes.get(job.id, Outcome(None, "not attempted"))
                attempts = job.attempts + 1
                values: dict[str, Any] = {"attempts": attempts, "last_status": outcome.status,
                                          "last_error": outcome.error, "claimed_by": None,
                                          "claim_expires_at": None}  # fmt: skip
                if outcome.sent:
                    values |= {"state": ForwardState.sent, "sent_at": now}
                elif (dest.max_attempts and attempts >= dest.max_attempts) or (
                    not outcome.transient and attempts >= REFUSED_TRIES
                ):
                    values["state"] = ForwardState.failed
                    log.error("forward of %s %s to %s failed for good after %d attempt(s): %s",
                              job.kind, job.sop_instance_uid, dest.name, attempts,
                              outcome.error or f"status 0x{outcome.status:04X}")  # fmt: skip
                else:
                    values["next_attempt_at"] = now + timedelta(seconds=backoff(dest, attempts))
                session.execute(
                    update(ForwardJob)
                    .where(ForwardJob.id == job.id, ForwardJob.claimed_by == worker_id)
                    .values(**values)
                )

    def summary(self) -> list[dict[str, Any]]:
        """Per destination: jobs by state, the oldest pending, the last error (for status)."""
        j = ForwardJob
        with self.reads() as session:
            counts = session.execute(
                select(j.destination, j.state, func.count(j.id), func.min(j.created_at))
                .group_by(j.destination, j.state)
            ).all()  # fmt: skip
            errors = dict(
                session.execute(
                    select(j.destination, j.last_error)
                    .where(j.last_error.is_not(None), j.state != ForwardState.sent)
                    .order_by(j.id.desc())
                ).all()
            )
        out: dict[str, dict[str, Any]] = {}
        for destination, state, n, oldest in counts:
            row = out.setdefault(destination, {"destination": destination, "pending": 0,
                                               "sent": 0, "failed": 0, "oldest_pending": None,
                                               "last_error": errors.get(destination)})  # fmt: skip
            row[ForwardState(state).value] = n
            if state == ForwardState.pending:
                row["oldest_pending"] = oldest.isoformat(timespec="seconds")
        return sorted(out.values(), key=lambda r: r["destination"])

    def jobs(
        self, limit: int = 100, destination: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, for the console's admin page and API."""
        query = select(ForwardJob).order_by(ForwardJob.id.desc()).limit(limit)
        if destination:
            query = query.where(ForwardJob.destination == destination)
        if state:
            query = query.where(ForwardJob.state == ForwardState(state))
        with self.reads() as session:
            return [_job_row(j) for j in session.scalars(query)]


def _job_row(j: ForwardJob) -> dict[str, Any]:
    def iso(t: datetime | None) -> str | None:
        return t.isoformat(timespec="seconds") if t else None

    return {"id": j.id, "destination": j.destination, "kind": j.kind,
            "sop_instance_uid": j.sop_instance_uid, "series_uid": j.series_uid,
            "state": j.state.value, "attempts": j.attempts, "last_status": j.last_status,
            "last_error": j.last_error, "created_at": iso(j.created_at),
            "next_attempt_at": iso(j.next_attempt_at), "sent_at": iso(j.sent_at)}  # fmt: skip


class Forwarder:
    """``lanes`` per destination (one by default): claim, send in one association, record,
    repeat. Lanes share the outbox through claims, like several node processes do."""

    def __init__(
        self,
        queue: ForwardQueue,
        destinations: Sequence[DestinationConfig],
        send: Sender,
        worker_id: str,
        wake: threading.Event | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        self.queue = queue
        self.destinations = list(destinations)
        self.send = send
        self.worker_id = worker_id
        self.wake = wake or threading.Event()  # set by intake when it queues a job
        self.poll_seconds = poll_seconds

    def run(self, stop: threading.Event) -> None:
        lanes = [
            threading.Thread(target=self._lane, args=(d, stop), name=f"forward-{d.name}-{i}",
                             daemon=True)
            for d in self.destinations for i in range(d.lanes)
        ]  # fmt: skip
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()

    def _lane(self, dest: DestinationConfig, stop: threading.Event) -> None:
        failures = 0  # consecutive batches that reached nobody
        while not stop.is_set():
            try:
                jobs = self.queue.claim(dest.name, dest.batch, self.worker_id)
                if not jobs:
                    self.wake.wait(self.poll_seconds)
                    self.wake.clear()
                    continue
                outcomes = self.send(dest, jobs)
                self.queue.record(dest, self.worker_id, jobs, outcomes)
                sent = sum(o.sent for o in outcomes.values())
                if sent:
                    failures = 0
                elif all(o.status is None for o in outcomes.values()):
                    failures += 1  # unreachable: wait, then try the same (oldest) jobs again
                    stop.wait(backoff(dest, failures))
                log.debug("forwarded %d/%d to %s", sent, len(jobs), dest.name)
            except Exception:  # database away: keep trying, jobs are in the database
                log.exception("forwarder %s error; retrying in 1 s", dest.name)
                stop.wait(1.0)


def enqueue_forward(
    session: Session,
    destination: str,
    kind: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_uid: str,
    spool_path: str,
    now: datetime,
) -> None:
    """Queue a C-STORE of a spooled file to a destination (once per SOP instance)."""
    insert_ignore(session, ForwardJob, destination=destination, kind=kind,
                   sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                   series_uid=series_uid, spool_path=spool_path, state=ForwardState.pending,
                   attempts=0, next_attempt_at=now, created_at=now)  # fmt: skip
