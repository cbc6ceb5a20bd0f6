"""Rescan alerts: listed for the console, acknowledged once by a technologist.

An acknowledgement is a conditional UPDATE (only an open alert can be acknowledged), so two
people clicking at once record one acknowledgement; the second gets a clear conflict. Each
acknowledgement is also an ``alert_acknowledged`` event, for live pages and notifiers.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import AckAction, Alert, AlertState, Event, Series, SeriesVerdict
from mriqa_node.db.sql import now_utc
from mriqa_node.services.users import Principal

log = logging.getLogger(__name__)
MAX_COMMENT = 2000


class AlertNotFound(LookupError):
    pass


class AlertConflict(ValueError):
    """The alert is not open any more (someone acknowledged it first)."""


def _alert_row(alert: Alert, series: Series, verdict: SeriesVerdict) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "state": alert.state.value,
        "series_uid": series.series_uid,
        "series_description": series.series_description,
        "calling_aet": series.calling_aet,
        "score": verdict.score,
        "label": verdict.label,
        "worst_slices": verdict.worst_slices,
        "n_slices": verdict.n_slices,
        "created_at": alert.created_at.isoformat(),
        "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
        "acknowledged_by": alert.acknowledged_by,
        "action": alert.action,
        "comment": alert.comment,
    }


class AlertService:
    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions

    def _query(self):
        return (
            select(Alert, Series, SeriesVerdict)
            .join(Series, Alert.series_id == Series.id)
            .join(SeriesVerdict, Alert.verdict_id == SeriesVerdict.id)
        )

    def list(
        self, state: str | None = None, series_uid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Newest first; ``state`` is "open" or "acknowledged"."""
        query = self._query().order_by(Alert.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Alert.state == AlertState(state))
        if series_uid is not None:
            query = query.where(Series.series_uid == series_uid)
        with self.reads() as session:
            return [_alert_row(*row) for row in session.execute(query).all()]

    def get(self, alert_id: int) -> dict[str, Any]:
        with self.reads() as session:
            row = session.execute(self._query().where(Alert.id == alert_id)).first()
            if row is None:
                raise AlertNotFound(f"no alert {alert_id}")
            return _alert_row(*row)

    def acknowledge(
        self, alert_id: int, user: Principal, action: AckAction | str, comment: str | None = None
    ) -> dict[str, Any]:
        action = AckAction(action)
        comment = (comment or "").strip()[:MAX_COMMENT] or None
        now = now_utc()
        with self.sessions.begin() as session:
            done = session.execute(
                update(Alert)
                .where(Alert.id == alert_id, Alert.state == AlertState.open)
                .values(
                    state=AlertState.acknowledged,
                    acknowledged_at=now,
                    acknowledged_by=user.name,
                    action=action.value,
                    comment=comment,
                )
            ).rowcount
            alert = session.get(Alert, alert_id)
            if alert is None:
                raise AlertNotFound(f"no alert {alert_id}")
            if not done:
                raise AlertConflict(
                    f"alert {alert_id} was already acknowledged by {alert.acknowledged_by} "
                    f"({alert.action})"
                )
            series_uid = session.scalar(
                select(Series.series_uid).where(Series.id == alert.series_id)
            )
            session.add(
                Event(
                    kind="alert_acknowledged",
                    series_uid=series_uid,
                    payload={"alert_id": alert_id, "series_uid": series_uid,
                             "action": action.value, "by": user.name, "comment": comment},
                    created_at=now,
                )
            )  # fmt: skip
        log.info("alert %d for series %s acknowledged by %s: %s", alert_id, series_uid, user.name,
                 action.value)  # fmt: skip
        return self.get(alert_id)


def open_alert(session: Session, series_id: int, verdict_id: int, now: datetime) -> Alert:
    """The series' open rescan alert, pointed at this verdict: a new one, or the one already
    open (a reopened series decided again must not stack a second alert)."""
    alert = session.scalar(
        select(Alert).where(Alert.series_id == series_id, Alert.state == AlertState.open)
    )
    if alert is None:
        alert = Alert(series_id=series_id, verdict_id=verdict_id, kind="non_diagnostic",
                      created_at=now)  # fmt: skip
        session.add(alert)
    else:
        alert.verdict_id = verdict_id
    session.flush()
    return alert
