"""Read models for people and scripts (`mriqa status`, later the console)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from mriqa_node.db.models import Series, SeriesVerdict


def recent_series(sessions: sessionmaker[Session], limit: int = 20) -> list[dict[str, Any]]:
    """Newest series first, each with its latest verdict (no patient data)."""
    with sessions() as session:
        rows = session.scalars(
            select(Series)
            .options(selectinload(Series.study), selectinload(Series.verdicts))
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
        return [_series_row(s) for s in rows]


def _series_row(s: Series) -> dict[str, Any]:
    v: SeriesVerdict | None = s.verdicts[-1] if s.verdicts else None
    return {
        "study_uid": s.study.study_uid,
        "series_uid": s.series_uid,
        "series_description": s.series_description,
        "calling_aet": s.calling_aet,
        "instances": s.received_instances,
        "slices": s.received_slices,
        "expected_slices": s.expected_slices,
        "state": s.state.value,
        "label": v.label if v else None,
        "score": v.score if v else None,
        "worst_slices": [w["slice_index"] + 1 for w in v.worst_slices] if v else [],
        "decided_at": v.decided_at.isoformat(timespec="seconds") if v else None,
        "last_received_at": s.last_received_at.isoformat(timespec="seconds"),
    }
