"""Retrospective QA of past studies: find them on the PACS, have it send them to the node
(which scores them like a scanner's series), and wait for the verdicts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.domain.retrieve import MoveResult, PullPlan, plan_pull
from mriqa_node.services.queries import SeriesNotFound, series_detail

PULLED_KEYS = (
    "series_uid",
    "series_number",
    "series_description",
    "instances",
    "expected_slices",
    "state",
    "label",
    "score",
    "worst_slices",
    "decided_at",
)


class QueryRetrieve(Protocol):
    """The PACS, as the pull needs it (the DICOM layer's PacsQR)."""

    name: str

    def find_series(self, study_uid: str) -> list[dict[str, Any]]: ...

    def move(self, study_uid: str, series_uid: str | None) -> MoveResult: ...


def plan(pacs: QueryRetrieve, study_uid: str, series_uid: str | None = None) -> PullPlan:
    """Which series of the study to pull (NothingToPull when there is none)."""
    return plan_pull(pacs.find_series(study_uid), study_uid, series_uid, pacs.name)


def pull(pacs: QueryRetrieve, study_uid: str, plan: PullPlan) -> MoveResult:
    """Run the plan's moves; the node receives the instances while each move runs."""
    return MoveResult.merged([pacs.move(study_uid, uid) for uid in plan.moves])


def wait_for_verdicts(
    sessions: sessionmaker[Session], series_uids: Sequence[str], timeout: float,
    poll_seconds: float = 0.5,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each series as the node has it once all received ones are decided (or at timeout);
    a series the node never received comes back with state "not_received"."""
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        for uid in series_uids:
            try:
                detail = series_detail(sessions, uid)
            except SeriesNotFound:
                rows.append({"series_uid": uid, "state": "not_received"})
                continue
            rows.append({k: detail[k] for k in PULLED_KEYS})
        received = [r for r in rows if r["state"] != "not_received"]
        if all(r["state"] == "decided" for r in received) or time.monotonic() > deadline:
            return rows
        time.sleep(poll_seconds)
