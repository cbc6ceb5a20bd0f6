"""The work queue: instances without a score, claimed by workers, scores recorded.

Claims use ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several workers on several hosts never
take the same instance; SQLite has one writer and ignores the clause. A claim that is not
finished before it expires (worker crashed) is simply claimed again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import Instance, InstanceState, ModelVersion, ShadowScore, SliceScore
from mriqa_node.db.sql import dialect, now_utc
from mriqa_node.services import claims
from mriqa_node.services.claims import lock_oldest


@dataclass(frozen=True)
class Claim:
    instance_id: int
    series_id: int
    sop_instance_uid: str
    spool_path: str


@dataclass
class InstanceResult:
    """Scores for every frame of one instance, or the reason it cannot be scored."""

    claim: Claim
    probabilities: Sequence[Sequence[float]] = ()
    positions: Sequence[float | None] = ()
    reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    frames: Sequence[int] | None = None  # frame numbers of the scores (None: 0, 1, ...)
    distances: Sequence[float] | None = None  # to the training data, per score (OOD guard)


class WorkQueue:
    def __init__(self, sessions: sessionmaker[Session], claim_seconds: float = 30.0) -> None:
        self.sessions = sessions
        self.claim_seconds = claim_seconds

    def claim(self, worker_id: str, limit: int) -> list[Claim]:
        now = now_utc()
        claimable = or_(
            Instance.state == InstanceState.pending,
            (Instance.state == InstanceState.claimed) & (Instance.claim_expires_at < now),
        )
        with self.sessions.begin() as session:
            ids = lock_oldest(session, Instance.id, claimable, limit)
            if not ids:
                return []
            rows = session.execute(
                update(Instance)
                .where(Instance.id.in_(ids))
                .values(
                    state=InstanceState.claimed,
                    claimed_by=worker_id,
                    claim_expires_at=now + timedelta(seconds=self.claim_seconds),
                )
                .returning(
                    Instance.id, Instance.series_id, Instance.sop_instance_uid, Instance.spool_path
                )
            ).all()
        return sorted((Claim(*row) for row in rows), key=lambda c: c.instance_id)

    def release_dead_claims(self, hostname: str, alive: Callable[[int], bool]) -> int:
        """Give back at once the claims of workers on this host whose process is gone (killed),
        instead of waiting for the claims to expire."""
        with self.sessions.begin() as session:
            return claims.release_dead_claims(
                session, Instance, Instance.state == InstanceState.claimed,
                {"state": InstanceState.pending, "claimed_by": None, "claim_expires_at": None},
                hostname, alive,
            )  # fmt: skip

    def depth(self) -> int:
        """Instances waiting for a score (for status and metrics)."""
        from sqlalchemy import func

        with self.sessions() as session:
            return (
                session.scalar(
                    select(func.count(Instance.id)).where(
                        Instance.state.in_([InstanceState.pending, InstanceState.claimed])
                    )
                )
                or 0
            )

    def model_version_id(self, meta: dict[str, Any]) -> int:
        """The row for this artifact (by weights hash), created on first use.

        Workers starting together race to create it: the loser of the unique-key race reads
        the winner's row instead of failing."""
        query = select(ModelVersion.id).where(ModelVersion.sha256 == meta["sha256"])
        with self.sessions.begin() as session:
            found = session.scalar(query)
            if found is not None:
                return found
            row = ModelVersion(
                name=meta["name"],
                version=meta["version"],
                sha256=meta["sha256"],
                task=meta["task"],
                meta=json.loads(json.dumps(meta)),
                first_used_at=now_utc(),
            )
            try:
                with session.begin_nested():
                    session.add(row)
                return row.id
            except IntegrityError:
                return session.scalars(query).one()

    def record(
        self, worker_id: str, model_version_id: int, results: Sequence[InstanceResult]
    ) -> set[int]:
        """Store scores; returns the series touched. Results for claims we lost are dropped."""
        now = now_utc()
        touched: set[int] = set()
        with self.sessions.begin() as session:
            for result in results:
                state = InstanceState.unscorable if result.reason else InstanceState.scored
                mine = session.execute(
                    update(Instance)
                    .where(
                        Instance.id == result.claim.instance_id,
                        Instance.state == InstanceState.claimed,
                        Instance.claimed_by == worker_id,
                    )
                    .values(
                        state=state,
                        scored_at=now,
                        reason=result.reason,
                        claimed_by=None,
                        claim_expires_at=None,
                    )
                ).rowcount
                if not mine:
                    continue
                touched.add(result.claim.series_id)
                numbers = result.frames or range(len(result.probabilities))
                for k, (frame, probs) in enumerate(zip(numbers, result.probabilities, strict=True)):
                    position = result.positions[k] if k < len(result.positions) else None
                    session.add(
                        SliceScore(
                            instance_id=result.claim.instance_id,
                            frame=frame,
                            position=position,
                            probabilities=[float(p) for p in probs],
                            p_nondiagnostic=float(probs[0]),
                            distance=None
                            if result.distances is None
                            else float(result.distances[k]),
                            model_version_id=model_version_id,
                        )
                    )
        return touched

    def record_shadow(self, model_version_id: int, results: Sequence[InstanceResult]) -> None:
        """Store a shadow candidate's scores of the same slices (a rescore replaces nothing:
        the first score of a slice by a model is the one kept)."""
        rows = [
            {"instance_id": r.claim.instance_id, "frame": int(frame),
             "position": r.positions[k] if k < len(r.positions) else None,
             "probabilities": [float(p) for p in probs], "p_nondiagnostic": float(probs[0]),
             "distance": None if r.distances is None else float(r.distances[k]),
             "model_version_id": model_version_id}
            for r in results if not r.reason
            for k, (frame, probs) in enumerate(
                zip(r.frames or range(len(r.probabilities)), r.probabilities, strict=True))
        ]  # fmt: skip
        if not rows:
            return
        with self.sessions.begin() as session:
            session.execute(dialect(session).insert(ShadowScore).values(rows)
                            .on_conflict_do_nothing())  # fmt: skip
