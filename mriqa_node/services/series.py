"""Series life cycle after intake: completion by idle time or release, then the verdict.

Every transition is a conditional UPDATE on the series row, so several processes (receivers,
workers, monitors on one PostgreSQL) can run these functions concurrently and each transition
still happens once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import (
    Event,
    Instance,
    InstanceState,
    ModelVersion,
    Series,
    SeriesState,
    SeriesVerdict,
    ShadowScore,
    ShadowVerdict,
    SliceScore,
)
from mriqa_node.db.sql import now_utc
from mriqa_node.domain.completion import CompletionRule
from mriqa_node.domain.scope import ModelScope, Scope
from mriqa_node.domain.verdict import SeriesPolicy, SliceResult, Verdict, assess
from mriqa_node.services.alerts import open_alert

log = logging.getLogger(__name__)
UNFINISHED = (InstanceState.pending, InstanceState.claimed)
# The monitor's two questions, asked ten times a second: built once (building a statement
# costs more than running it), run on the connection (the ORM's result handling is not needed).
_QUIET = select(
    Series.id,
    Series.series_uid,
    Series.expected_slices,
    Series.received_slices,
    Series.last_received_at,
    Series.released_at,
).where(Series.state == SeriesState.receiving, Series.last_received_at <= bindparam("since"))
_READY = select(Series.id).where(
    Series.state == SeriesState.complete,
    ~select(Instance.id)
    .where(Instance.series_id == Series.id, Instance.state.in_(UNFINISHED))
    .exists(),
)  # complete series with nothing left to score


class SeriesService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        rule: CompletionRule,
        policy_overrides: dict[str, Any] | None = None,
        reads: sessionmaker[Session] | None = None,
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions  # read-only queries (SQLite: without the write lock)
        self.rule = rule
        self.policy_overrides = policy_overrides or {}

    def tick(self, now: datetime | None = None) -> list[str]:
        """Complete the series that went quiet and decide every complete one that is ready.

        Returns the series UIDs decided in this tick.
        """
        now = now or now_utc()
        quiet_since = now - timedelta(
            seconds=min(self.rule.idle_seconds, self.rule.release_grace_seconds)
        )
        with self.reads() as session:  # no write lock unless something is due
            due = session.connection().execute(_QUIET, {"since": quiet_since}).all()
        complete = [row for row in due if self.rule.is_complete(*row[2:], now)]
        if complete:
            with self.sessions.begin() as session:
                for sid, uid, _, _, last, released in complete:
                    quiet = (now - last).total_seconds()
                    why = f"quiet {quiet:.1f} s" + (" after release" if released else "")
                    mark_complete(session, sid, uid, now, why)
        with self.reads() as session:
            ready = session.connection().execute(_READY).scalars().all()
        return [uid for sid in ready if (uid := self.try_decide(sid))]

    def try_decide(self, series_id: int) -> str | None:
        """Decide a complete series whose instances are all scored; returns its UID if decided."""
        with self.sessions.begin() as session:
            series = session.scalar(
                select(Series)
                .where(Series.id == series_id, Series.state == SeriesState.complete)
                .with_for_update()
            )
            if series is None:
                return None
            unfinished = session.scalar(
                select(func.count(Instance.id)).where(
                    Instance.series_id == series_id, Instance.state.in_(UNFINISHED)
                )
            )
            if unfinished:
                return None
            self._record_verdict(session, series)
            return series.series_uid

    def _record_verdict(self, session: Session, series: Series) -> None:
        now = now_utc()
        rows = session.execute(
            select(SliceScore, Instance.sop_instance_uid, Instance.instance_number)
            .join(Instance, SliceScore.instance_id == Instance.id)
            .where(Instance.series_id == series.id)
            .order_by(SliceScore.id)
        ).all()
        n_unscorable = session.scalar(
            select(func.count(Instance.id)).where(
                Instance.series_id == series.id, Instance.state == InstanceState.unscorable
            )
        )
        model = None
        if rows:  # the newest model that scored this series decides it
            model = session.get(ModelVersion, max(r[0].model_version_id for r in rows))
        latest: dict[tuple[int, int], SliceResult] = {}
        for score, sop_uid, number in rows:
            if model is not None and score.model_version_id == model.id:
                latest[(score.instance_id, score.frame)] = SliceResult(
                    sop_uid, score.frame, score.probabilities, score.position, number,
                    score.distance,
                )  # fmt: skip
        verdict, policy = self._assess(session, series.id, model, list(latest.values()))

        row = SeriesVerdict(
            series_id=series.id,
            model_version_id=model.id if model else None,
            label=verdict.label,
            score=verdict.score,
            worst_slices=verdict.worst_slices,
            n_slices=verdict.n_slices,
            n_unscorable=n_unscorable or 0,
            reason=verdict.reason,
            policy=policy.as_dict(),
            decided_at=now,
            seconds_after_last=(now - series.last_received_at).total_seconds(),
        )
        session.add(row)
        self._record_shadow_verdicts(session, series.id, now)
        session.execute(
            update(Series)
            .where(Series.id == series.id)
            .values(state=SeriesState.decided, decided_at=now)
        )
        session.flush()
        payload = verdict_payload(series, verdict, row)
        session.add(
            Event(kind="verdict", series_uid=series.series_uid, payload=payload, created_at=now)
        )
        log.info(
            "verdict series %s (%s): %s%s score=%s slices=%d unscorable=%d, %.2f s after the last",
            series.series_uid,
            series.series_description or "-",
            verdict.label,
            f" ({verdict.reason})" if verdict.reason else "",
            verdict.score,
            verdict.n_slices,
            row.n_unscorable,
            row.seconds_after_last,
        )
        if verdict.non_diagnostic:
            self._raise_alert(session, series, row, payload, now)

    def _assess(self, session: Session, series_id: int, model: ModelVersion | None,
                slices: list[SliceResult]) -> tuple[Verdict, SeriesPolicy]:  # fmt: skip
        """The verdict of these slices under the model's own policy, scope and OOD guard."""
        policy = SeriesPolicy.from_dict(model.meta.get("policy") if model else None)
        policy = policy.overridden(**self.policy_overrides)
        classes = model.meta["class_names"] if model else ["non_diagnostic"]
        meta = model.meta if model else {}
        verdict = assess(
            slices, policy, classes,
            scope=Scope(ModelScope.from_dict(meta.get("scope"))),
            ood_threshold=(meta.get("ood") or {}).get("threshold"),
            empty_reason=None if slices else self._not_assessed_reason(session, series_id),
        )  # fmt: skip
        return verdict, policy

    def _record_shadow_verdicts(self, session: Session, series_id: int, now: datetime) -> None:
        """What each shadow candidate that scored this series says of it, from its own scores
        under its own policy, decided with the active verdict; recorded, never alerted."""
        rows = session.execute(
            select(ShadowScore, Instance.sop_instance_uid, Instance.instance_number)
            .join(Instance, ShadowScore.instance_id == Instance.id)
            .where(Instance.series_id == series_id)
            .order_by(ShadowScore.id)
        ).all()
        by_model: dict[int, list[SliceResult]] = {}
        for sc, uid, number in rows:
            by_model.setdefault(sc.model_version_id, []).append(
                SliceResult(uid, sc.frame, sc.probabilities, sc.position, number, sc.distance)
            )
        for model_id, slices in by_model.items():
            verdict, _ = self._assess(session, series_id, session.get(ModelVersion, model_id),
                                      slices)  # fmt: skip
            session.add(ShadowVerdict(series_id=series_id, model_version_id=model_id,
                                      label=verdict.label, score=verdict.score,
                                      n_slices=verdict.n_slices, decided_at=now))  # fmt: skip

    @staticmethod
    def _not_assessed_reason(session: Session, series_id: int) -> str | None:
        """The scope rule of the series' first out-of-scope instance, else the first "not
        assessed" reason of an unscorable one (no anatomy)."""
        for state in (InstanceState.out_of_scope, InstanceState.unscorable):
            reason = session.scalar(
                select(Instance.reason)
                .where(Instance.series_id == series_id, Instance.state == state,
                       Instance.reason.like("not assessed%"))
                .order_by(Instance.id)
                .limit(1)
            )  # fmt: skip
            if reason:
                return reason
        return None

    def _raise_alert(
        self, session: Session, series: Series, verdict: SeriesVerdict, payload: dict, now: datetime
    ) -> None:
        alert = open_alert(session, series.id, verdict.id, now)
        session.add(
            Event(
                kind="alert",
                series_uid=series.series_uid,
                payload={**payload, "alert_id": alert.id},
                created_at=now,
            )
        )
        worst = ", ".join(
            f"#{w['slice_index'] + 1} (p={w['p_nondiagnostic']:.2f})" for w in verdict.worst_slices
        )
        log.warning(
            "RESCAN ALERT: series %s '%s' from %s is NON-DIAGNOSTIC (score %.2f); worst slices %s",
            series.series_uid,
            series.series_description or "-",
            series.calling_aet or "-",
            verdict.score or 0.0,
            worst,
        )


def verdict_payload(series: Series, verdict: Verdict, row: SeriesVerdict) -> dict[str, Any]:
    """What consumers (console, notifiers) get for a verdict; no patient data."""
    return {
        "series_uid": series.series_uid,
        "series_description": series.series_description,
        "calling_aet": series.calling_aet,
        "label": verdict.label,
        "score": verdict.score,
        "worst_slices": verdict.worst_slices,
        "n_slices": verdict.n_slices,
        "n_unscorable": row.n_unscorable,
        "reason": verdict.reason,
        "verdict_id": row.id,
    }


def mark_complete(
    session: Session, series_id: int, series_uid: str, now: datetime, why: str
) -> bool:
    """receiving -> complete, once (a conditional update, safe across processes)."""
    done = session.execute(
        update(Series)
        .where(Series.id == series_id, Series.state == SeriesState.receiving)
        .values(state=SeriesState.complete, completed_at=now)
    ).rowcount
    if done:
        session.add(
            Event(
                kind="series_complete", series_uid=series_uid, payload={"why": why}, created_at=now
            )
        )
        log.info("series %s complete (%s)", series_uid, why)
    return bool(done)
