"""Read models for people and scripts (`mriqa status`, the console and its API).

No patient names or IDs leave here: the console shows series, not patients.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from mriqa_node.db.models import (
    Alert,
    AlertState,
    Event,
    Instance,
    ModelVersion,
    Series,
    SeriesState,
    SeriesVerdict,
    SliceScore,
)
from mriqa_node.domain.verdict import SliceResult, order_slices

# What the technologist sees: a complete series is being scored.
DISPLAY_STATE = {
    SeriesState.receiving: "receiving",
    SeriesState.complete: "scoring",
    SeriesState.decided: "decided",
}


class SeriesNotFound(LookupError):
    pass


def recent_series(
    sessions: sessionmaker[Session], limit: int = 20, offset: int = 0
) -> list[dict[str, Any]]:
    """Newest series first, each with its latest verdict and open alert (no patient data)."""
    with sessions() as session:
        rows = session.scalars(
            select(Series)
            .options(selectinload(Series.study), selectinload(Series.verdicts))
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .offset(offset)
            .limit(limit)
        ).all()
        open_alerts = dict(
            session.execute(
                select(Alert.series_id, func.max(Alert.id))
                .where(Alert.state == AlertState.open, Alert.series_id.in_([s.id for s in rows]))
                .group_by(Alert.series_id)
            ).all()
        )
        return [_series_row(s, open_alerts.get(s.id)) for s in rows]


def last_event_id(sessions: sessionmaker[Session]) -> int:
    """Where a page's live feed starts: it renders the state up to this event."""
    with sessions() as session:
        return session.scalar(select(func.max(Event.id))) or 0


def count_series(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count(Series.id))) or 0


def _series_row(s: Series, open_alert: int | None = None) -> dict[str, Any]:
    v: SeriesVerdict | None = s.verdicts[-1] if s.verdicts else None
    return {
        "study_uid": s.study.study_uid,
        "series_uid": s.series_uid,
        "series_number": s.series_number,
        "series_description": s.series_description,
        "calling_aet": s.calling_aet,
        "instances": s.received_instances,
        "slices": s.received_slices,
        "expected_slices": s.expected_slices,
        "state": s.state.value,
        "display_state": DISPLAY_STATE[s.state],
        "label": v.label if v else None,
        "score": v.score if v else None,
        "reason": v.reason if v else None,
        "worst_slices": [w["slice_index"] + 1 for w in v.worst_slices] if v else [],
        "decided_at": v.decided_at.isoformat(timespec="seconds") if v else None,
        "first_received_at": s.first_received_at.isoformat(timespec="seconds"),
        "last_received_at": s.last_received_at.isoformat(timespec="seconds"),
        "open_alert_id": open_alert,
    }


def series_detail(sessions: sessionmaker[Session], series_uid: str) -> dict[str, Any]:
    """One series with its slices in anatomical order, their scores, and its verdict history."""
    with sessions() as session:
        series = session.scalar(
            select(Series)
            .options(selectinload(Series.study), selectinload(Series.verdicts))
            .where(Series.series_uid == series_uid)
        )
        if series is None:
            raise SeriesNotFound(f"no series {series_uid}")
        verdict = series.verdicts[-1] if series.verdicts else None
        model_id = verdict.model_version_id if verdict else None
        if model_id is None:  # not decided yet: the newest model that scored anything here
            model_id = session.scalar(
                select(func.max(SliceScore.model_version_id))
                .join(Instance, SliceScore.instance_id == Instance.id)
                .where(Instance.series_id == series.id)
            )
        instances = session.scalars(
            select(Instance)
            .where(Instance.series_id == series.id)
            .options(selectinload(Instance.slices))
        ).all()
        model = session.get(ModelVersion, model_id) if model_id else None
        open_alert = session.scalar(
            select(func.max(Alert.id)).where(
                Alert.series_id == series.id, Alert.state == AlertState.open
            )
        )
        row = _series_row(series, open_alert)
        row["slice_list"] = _slices(instances, model_id, verdict)
        row["verdicts"] = [_verdict(v) for v in series.verdicts]
        row["model"] = (
            {"name": model.name, "version": model.version, "task": model.task,
             "sha256": model.sha256, "class_names": model.meta.get("class_names")}
            if model else None
        )  # fmt: skip
        row["study_description"] = series.study.study_description
        row["study_date"] = series.study.study_date
        return row


def _slices(
    instances: list[Instance], model_id: int | None, verdict: SeriesVerdict | None
) -> list[dict[str, Any]]:
    """Every slice (frame) of the series, anatomical order; unscorable instances at the end."""
    worst = {(w["sop_instance_uid"], w["frame"]) for w in (verdict.worst_slices if verdict else [])}
    threshold = verdict.policy.get("slice_threshold") if verdict else None
    scored: dict[SliceResult, dict[str, Any]] = {}
    rest: list[dict[str, Any]] = []
    for inst in instances:
        scores = [s for s in inst.slices if s.model_version_id == model_id]
        if not scores:
            rest.append({
                "instance_id": inst.id, "sop_instance_uid": inst.sop_instance_uid,
                "instance_number": inst.instance_number, "frame": 0, "position": None,
                "p_nondiagnostic": None, "probabilities": None, "state": inst.state.value,
                "reason": inst.reason, "worst": False, "flagged": False,
            })  # fmt: skip
            continue
        for s in scores:
            key = SliceResult(inst.sop_instance_uid, s.frame, tuple(s.probabilities), s.position,
                              inst.instance_number)  # fmt: skip
            scored[key] = {
                "instance_id": inst.id, "sop_instance_uid": inst.sop_instance_uid,
                "instance_number": inst.instance_number, "frame": s.frame,
                "position": s.position, "p_nondiagnostic": round(s.p_nondiagnostic, 4),
                "probabilities": [round(p, 4) for p in s.probabilities],
                "state": inst.state.value, "reason": None,
                "worst": (inst.sop_instance_uid, s.frame) in worst,
                "flagged": threshold is not None and s.p_nondiagnostic >= threshold,
            }  # fmt: skip
    ordered = [scored[k] for k in order_slices(list(scored))]
    rest.sort(key=lambda r: r["instance_number"] or 0)
    for index, item in enumerate(ordered + rest):
        item["index"] = index  # 0-based, as the verdict's slice_index
    return ordered + rest


def _verdict(v: SeriesVerdict) -> dict[str, Any]:
    return {
        "id": v.id,
        "label": v.label,
        "score": v.score,
        "n_slices": v.n_slices,
        "n_unscorable": v.n_unscorable,
        "reason": v.reason,
        "worst_slices": v.worst_slices,
        "policy": v.policy,
        "decided_at": v.decided_at.isoformat(timespec="seconds"),
        "seconds_after_last": v.seconds_after_last,
    }
