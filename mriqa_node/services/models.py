"""The shadow candidate against the active model, on the node's own series and feedback.

``compare`` pairs each series' newest verdict of the active model with the newest verdict of
the candidate, says where they differ, and scores both against the site's feedback labels
(domain/evaluation.py); ``mriqa model promote`` refuses a candidate that does worse there.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import (
    AckAction,
    Alert,
    ModelVersion,
    Rating,
    Series,
    SeriesVerdict,
    ShadowVerdict,
)
from mriqa_node.domain.evaluation import Judgement, Rates, judge_promotion
from mriqa_node.domain.verdict import NON_DIAGNOSTIC, NOT_ASSESSED
from mriqa_node.ml.store import ModelStore

FALSE_ALERT_ACTIONS = (AckAction.accepted.value, AckAction.disagree.value)


@dataclass
class Comparison:
    active: dict[str, Any]  # name, version, sha256 of each model
    candidate: dict[str, Any]
    series: int  # with a verdict of both
    agreement: Counter = field(default_factory=Counter)  # "active/candidate" label pairs
    differing: list[dict[str, Any]] = field(default_factory=list)
    active_rates: Rates = field(default_factory=lambda: Rates(0, 0, 0, 0))
    candidate_rates: Rates = field(default_factory=lambda: Rates(0, 0, 0, 0))
    judgement: Judgement = field(default_factory=lambda: Judgement(False, ()))

    @property
    def agree(self) -> int:
        return sum(n for pair, n in self.agreement.items() if _flag(pair[0]) == _flag(pair[1]))

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active, "candidate": self.candidate, "series": self.series,
            "agree": self.agree,
            "agreement": {f"{a} / {c}": n for (a, c), n in sorted(self.agreement.items())},
            "differing": self.differing,
            "against_feedback": {"active": self.active_rates.to_json(),
                                 "candidate": self.candidate_rates.to_json()},
            "promotion": {"allowed": self.judgement.allowed,
                          "reasons": list(self.judgement.reasons)},
        }  # fmt: skip


class ModelComparisons:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def compare(self, active_sha: str, candidate_sha: str, min_labelled: int = 1) -> Comparison:
        with self.sessions() as session:
            active = _model(session, active_sha)
            candidate = _model(session, candidate_sha)
            ident = {
                "active": _ident(active, active_sha),
                "candidate": _ident(candidate, candidate_sha),
            }
            if active is None or candidate is None:
                return Comparison(
                    ident["active"],
                    ident["candidate"],
                    0,
                    judgement=Judgement(False, ("no verdicts of both models yet",)),
                )
            mine = _newest(session, SeriesVerdict, active.id)
            theirs = _newest(session, ShadowVerdict, candidate.id)
            labels = feedback_labels(session)
            both = sorted(set(mine) & set(theirs))
            series = {s.id: s for s in session.scalars(select(Series).where(Series.id.in_(both)))}
        comparison = Comparison(ident["active"], ident["candidate"], len(both))
        pairs_active, pairs_candidate = [], []
        for sid in both:
            a, c = mine[sid], theirs[sid]
            comparison.agreement[(a, c)] += 1
            if _flag(a) != _flag(c):
                s = series[sid]
                comparison.differing.append({
                    "series_uid": s.series_uid, "description": s.series_description,
                    "calling_aet": s.calling_aet, "active": a, "candidate": c,
                    "feedback": None if sid not in labels else
                    ("non_diagnostic" if labels[sid] else "diagnostic"),
                })  # fmt: skip
            if sid in labels and NOT_ASSESSED not in (a, c):
                pairs_active.append((labels[sid], _flag(a)))
                pairs_candidate.append((labels[sid], _flag(c)))
        comparison.active_rates = Rates.of(pairs_active)
        comparison.candidate_rates = Rates.of(pairs_candidate)
        comparison.judgement = judge_promotion(
            comparison.active_rates, comparison.candidate_rates, min_labelled
        )
        return comparison


class ModelOverview:
    """The active model, the shadow candidate and how they compare, for `mriqa model compare`
    and the console's Models page."""

    def __init__(self, reads: sessionmaker[Session], store: ModelStore,
                 active: Callable[[], Path]) -> None:  # fmt: skip
        self.comparisons = ModelComparisons(reads)
        self.store = store
        self.active = active  # the artifact directory the node uses now

    def compare(self, min_labelled: int = 1) -> Comparison | None:
        """None when no shadow candidate is installed."""
        shadow = self.store.shadow()
        if shadow is None:
            return None
        return self.comparisons.compare(_sha(self.active()), _sha(shadow), min_labelled)

    def report(self, min_labelled: int = 10) -> dict[str, Any]:
        shadow = self.store.shadow()
        compared = self.compare(min_labelled)
        return {
            "active": _card(self.active()),
            "candidate": _card(shadow) if shadow else None,
            "comparison": compared.to_json() if compared else None,
            "min_labelled": min_labelled,
            "history": self.store.history()[-20:][::-1],
        }


def _sha(artifact: Path) -> str:
    return json.loads((artifact / "model.json").read_text())["sha256"]


def _card(artifact: Path) -> dict[str, Any]:
    meta = json.loads((artifact / "model.json").read_text())
    return {"name": meta.get("name"), "version": meta.get("version"),
            "sha256": meta.get("sha256"), "task": meta.get("task"),
            "trained": meta.get("trained", True), "path": str(artifact)}  # fmt: skip


def feedback_labels(session: Session) -> dict[int, bool]:
    """Series id -> labelled non-diagnostic, from series ratings (majority; a tie is no
    label) or else the technologist's acknowledgement of the alert."""
    labels: dict[int, bool] = {}
    for series_id, action in session.execute(
        select(Alert.series_id, Alert.action).where(Alert.action.is_not(None)).order_by(Alert.id)
    ):
        labels[series_id] = action == AckAction.rescanned.value
    votes = session.execute(
        select(
            Rating.series_id, func.sum(case((Rating.value == 0, 1), else_=0)), func.count(Rating.id)
        )
        .where(Rating.instance_id.is_(None))
        .group_by(Rating.series_id)
    )
    for series_id, zeros, n in votes:
        zeros = int(zeros or 0)
        if 2 * zeros != n:
            labels[series_id] = 2 * zeros > n
        else:
            labels.pop(series_id, None)
    return labels


def _newest(session: Session, table: type, model_id: int) -> dict[int, str]:
    """Series id -> label of that model's newest verdict of the series."""
    newest = (select(func.max(table.id)).where(table.model_version_id == model_id)
              .group_by(table.series_id))  # fmt: skip
    rows = session.execute(select(table.series_id, table.label).where(table.id.in_(newest)))
    return dict(rows.all())


def _model(session: Session, sha: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha))


def _ident(model: ModelVersion | None, sha: str) -> dict[str, Any]:
    if model is None:
        return {"sha256": sha}
    return {"name": model.name, "version": model.version, "sha256": model.sha256}


def _flag(label: str) -> bool:
    return label == NON_DIAGNOSTIC
