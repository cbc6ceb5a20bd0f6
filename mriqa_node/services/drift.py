"""Drift per scanner (calling AE) and protocol, as events, webhooks and metrics.

:meth:`DriftMonitor.check` (the node's monitor runs it every minute) compares each group's
recent verdicts with its own earlier ones (domain/drift.py) and records a ``drift`` event when
a group starts to depart (and ``drift_cleared`` when it is back), so a scanner that suddenly
has every series flagged, or none, reaches the console and the webhooks once, not every
minute.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import Event, Series, SeriesVerdict
from mriqa_node.db.sql import now_utc
from mriqa_node.domain.drift import DriftRule, GroupDrift, assess_group, timeline

log = logging.getLogger(__name__)

DRIFT, CLEARED = "drift", "drift_cleared"
HISTORY = 5000  # newest series verdicts read per check


class DriftMonitor:
    def __init__(self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None,
                 rule: DriftRule | None = None) -> None:  # fmt: skip
        self.sessions = sessions
        self.reads = reads or sessions
        self.rule = rule or DriftRule()

    def groups(self) -> list[GroupDrift]:
        """Every (calling AE, protocol) with enough decided series to tell, drifting or not."""
        found = [assess_group(aet, protocol, h.labels, h.scores, self.rule)
                 for (aet, protocol), h in self._histories().items()]  # fmt: skip
        return [g for g in found if g is not None]

    def report(self, max_bins: int = 40) -> list[dict]:
        """Each group's history for the console's chart: the rates and score quartiles over
        time, where its baseline and recent windows lie, its drift state and events."""
        with self.reads() as session:
            events = session.execute(
                select(Event.kind, Event.payload, Event.created_at)
                .where(Event.kind.in_((DRIFT, CLEARED))).order_by(Event.id.desc()).limit(10_000)
            ).all()[::-1]  # fmt: skip
        out = []
        for (aet, protocol), h in sorted(self._histories().items(), key=_by_name):
            g = assess_group(aet, protocol, h.labels, h.scores, self.rule)
            n, rule = len(h.labels), self.rule
            recent_from = max(0, n - rule.recent)
            out.append({
                "calling_aet": aet, "protocol": protocol, "series": n,
                "state": "too few series" if g is None else
                         "drifting" if g.drifting else "steady",
                "reasons": list(g.reasons) if g else [],
                "baseline": g.baseline.to_json() if g else None,
                "recent": g.recent.to_json() if g else None,
                "baseline_from": max(0, recent_from - rule.baseline), "recent_from": recent_from,
                "needed": rule.recent + rule.min_baseline,
                "bins": [b.to_json() for b in timeline(h.labels, h.scores, h.times, max_bins)],
                "events": [{"kind": kind, "at": at.isoformat(), "reasons": p.get("reasons", []),
                            "after_series": sum(t <= at for t in h.times)}  # on the chart
                           for kind, p, at in events
                           if (p.get("calling_aet"), p.get("protocol")) == (aet, protocol)],
            })  # fmt: skip
        return out

    def _histories(self) -> dict[tuple, _History]:
        """(calling AE, protocol or description) -> its newest verdicts, oldest first."""
        newest = select(func.max(SeriesVerdict.id)).group_by(SeriesVerdict.series_id)
        with self.reads() as session:
            rows = session.execute(
                select(Series.calling_aet, Series.protocol_name, Series.series_description,
                       SeriesVerdict.label, SeriesVerdict.score, SeriesVerdict.decided_at)
                .join(Series, Series.id == SeriesVerdict.series_id)
                .where(SeriesVerdict.id.in_(newest))
                .order_by(SeriesVerdict.id.desc())
                .limit(HISTORY)
            ).all()  # fmt: skip
        grouped: dict[tuple, _History] = defaultdict(_History)
        for aet, protocol, description, label, score, at in reversed(rows):
            h = grouped[(aet, protocol or description)]
            h.labels.append(label)
            h.scores.append(score)
            h.times.append(at)
        return grouped

    def check(self) -> list[GroupDrift]:
        """Record an event for each group that started or stopped drifting; returns them."""
        groups = self.groups()
        with self.sessions.begin() as session:
            last = _last_states(session)
            changed = [g for g in groups if last.get((g.calling_aet, g.protocol), False)
                       != g.drifting]  # fmt: skip
            now = now_utc()
            for g in changed:
                payload = {"calling_aet": g.calling_aet, "protocol": g.protocol,
                           "baseline": g.baseline.to_json(), "recent": g.recent.to_json(),
                           "reasons": list(g.reasons)}  # fmt: skip
                session.add(Event(kind=DRIFT if g.drifting else CLEARED, series_uid=None,
                                  payload=payload, created_at=now))  # fmt: skip
                if g.drifting:
                    log.warning("DRIFT: scanner %s, protocol %s: %s", g.calling_aet or "-",
                                g.protocol or "-", "; ".join(g.reasons))  # fmt: skip
                else:
                    log.info("drift cleared: scanner %s, protocol %s", g.calling_aet, g.protocol)
        return changed


@dataclass
class _History:
    labels: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)


def _by_name(item: tuple) -> tuple[str, str]:
    (aet, protocol), _ = item
    return aet or "", protocol or ""


def _last_states(session: Session) -> dict[tuple, bool]:
    """(calling AE, protocol) -> drifting, by the newest drift event of each group."""
    states: dict[tuple, bool] = {}
    events = session.execute(
        select(Event.kind, Event.payload).where(Event.kind.in_((DRIFT, CLEARED)))
        .order_by(Event.id.desc()).limit(10_000)
    )  # fmt: skip
    for kind, payload in events:
        states.setdefault((payload.get("calling_aet"), payload.get("protocol")), kind == DRIFT)
    return states
