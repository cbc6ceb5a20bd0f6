"""Pulling a past study from the PACS: which series to move, and what the moves achieved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SUCCESS = 0x0000


class NothingToPull(LookupError):
    """The PACS has nothing of the study (or series) that the node would keep."""


@dataclass
class MoveResult:
    """The outcome of a C-MOVE: sub-operation counts from the final response, and its status."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and self.failed == 0

    @classmethod
    def merged(cls, results: Sequence[MoveResult]) -> MoveResult:
        """Several moves as one: the counts added, the first status that is not success."""
        return cls(
            status=next((r.status for r in results if r.status != SUCCESS), SUCCESS),
            completed=sum(r.completed for r in results),
            failed=sum(r.failed for r in results),
            warning=sum(r.warning for r in results),
            failed_sop_instance_uids=[u for r in results for u in r.failed_sop_instance_uids],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": f"0x{self.status:04X}",
            "completed": self.completed,
            "failed": self.failed,
            "warning": self.warning,
            "failed_sop_instance_uids": self.failed_sop_instance_uids,
        }


@dataclass(frozen=True)
class PullPlan:
    """The series to pull (C-FIND rows), those left out, and the moves that fetch them:
    a series UID each, or None for the whole study."""

    series: list[Mapping[str, Any]]
    skipped: list[Mapping[str, Any]]
    moves: list[str | None]

    @property
    def expected_instances(self) -> int:
        return sum(s.get("NumberOfSeriesRelatedInstances") or 0 for s in self.series)

    @property
    def series_uids(self) -> list[str]:
        return [s["SeriesInstanceUID"] for s in self.series]


def plan_pull(
    listed: Sequence[Mapping[str, Any]], study_uid: str, series_uid: str | None = None,
    where: str = "the PACS",
) -> PullPlan:  # fmt: skip
    """The node keeps MR images only: from a mixed study, the MR series are moved one by one;
    a study of MR only (or one named series) in one move."""
    if series_uid is not None:
        listed = [s for s in listed if s["SeriesInstanceUID"] == series_uid]
    if not listed:
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        raise NothingToPull(f"{what} not found on {where}: nothing to pull")
    skipped = [] if series_uid else [s for s in listed if s.get("Modality") != "MR"]
    wanted = [s for s in listed if s not in skipped]
    if not wanted:
        raise NothingToPull(f"study {study_uid} has no MR series: nothing to pull")
    if series_uid or not skipped:
        moves: list[str | None] = [series_uid]
    else:
        moves = [s["SeriesInstanceUID"] for s in wanted]
    return PullPlan(list(wanted), list(skipped), moves)
