"""Series verdict policy: from slice probabilities to a series label, score and worst slices.

Pure domain code (no I/O). Class 0 is always "non_diagnostic", as in the paper; a 3-class model
adds "excellent" as class 2. The series score estimates how likely the series is non-diagnostic:
the mean P(non-diagnostic) over the worst ``top_fraction`` of slices, so that a few badly
corrupted slices condemn a series while one noisy slice in forty does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from mriqa_node.domain.scope import Scope

NON_DIAGNOSTIC = "non_diagnostic"
DIAGNOSTIC = "diagnostic"
EXCELLENT = "excellent"
UNSCORABLE = "unscorable"
NOT_ASSESSED = "not_assessed"  # outside the model's scope: never an alert, always with a reason


@dataclass(frozen=True)
class SeriesPolicy:
    slice_threshold: float = 0.5  # a slice with P(non-diagnostic) >= this is flagged
    series_threshold: float = 0.5  # a series with score >= this is non-diagnostic
    top_fraction: float = 0.2  # share of worst slices averaged into the series score
    worst_count: int = 3  # slices listed for the technologist

    def __post_init__(self) -> None:
        if not (0 <= self.slice_threshold <= 1 and 0 <= self.series_threshold <= 1):
            raise ValueError("thresholds must lie in [0, 1]")
        if not 0 < self.top_fraction <= 1:
            raise ValueError("top_fraction must lie in (0, 1]")
        if self.worst_count < 1:
            raise ValueError("worst_count must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SeriesPolicy:
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def overridden(self, **overrides: Any) -> SeriesPolicy:
        """Config overrides; None means keep the model's value."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SliceResult:
    sop_instance_uid: str
    frame: int
    probabilities: Sequence[float]
    position: float | None = None
    instance_number: int | None = None
    distance: float | None = None  # to the training data (the OOD guard); None: not measured

    @property
    def p_nondiagnostic(self) -> float:
        return float(self.probabilities[0])


@dataclass(frozen=True)
class Verdict:
    label: str
    score: float | None
    worst_slices: list[dict[str, Any]]
    n_slices: int
    n_flagged: int
    reason: str | None = None  # why a series is not assessed (or unscorable)

    @property
    def non_diagnostic(self) -> bool:
        return self.label == NON_DIAGNOSTIC


def not_assessed(reason: str, n_slices: int = 0) -> Verdict:
    """The verdict of a series the model is not made for: no score, no alert."""
    return Verdict(NOT_ASSESSED, None, [], n_slices, 0, reason)


UNLIKE = "not assessed: unlike the training data"


def guard(
    slices: Sequence[SliceResult], threshold: float | None
) -> tuple[list[SliceResult], Verdict | None]:
    """The OOD guard: slices farther from the training data than ``threshold`` are left out;
    when they are half the series or more, the series is not assessed at all (never an
    alert). Returns the slices to decide on, or the not-assessed verdict."""
    if threshold is None:
        return list(slices), None
    kept = [s for s in slices if s.distance is None or s.distance <= threshold]
    unlike = len(slices) - len(kept)
    if slices and 2 * unlike >= len(slices):
        return [], not_assessed(f"{UNLIKE} ({unlike} of {len(slices)} slices)", len(slices))
    return kept, None


def order_slices(slices: Sequence[SliceResult]) -> list[SliceResult]:
    """Anatomical order: by position along the normal, else instance number, then frame."""
    return sorted(
        slices,
        key=lambda s: (
            s.position is None,
            s.position if s.position is not None else 0.0,
            s.instance_number if s.instance_number is not None else 0,
            s.frame,
        ),
    )


def decide(
    slices: Sequence[SliceResult], policy: SeriesPolicy, class_names: Sequence[str]
) -> Verdict:
    if not slices:
        return Verdict(UNSCORABLE, None, [], 0, 0)
    if class_names[0] != NON_DIAGNOSTIC:
        raise ValueError(f"class 0 must be {NON_DIAGNOSTIC!r}, got {class_names[0]!r}")
    ordered = order_slices(slices)
    p = [s.p_nondiagnostic for s in ordered]
    k = max(1, math.ceil(policy.top_fraction * len(p)))
    score = sum(sorted(p, reverse=True)[:k]) / k
    n_flagged = sum(x >= policy.slice_threshold for x in p)

    if score >= policy.series_threshold:
        label = NON_DIAGNOSTIC
    elif EXCELLENT in class_names:
        i_exc, i_diag = class_names.index(EXCELLENT), class_names.index(DIAGNOSTIC)
        exc = sum(s.probabilities[i_exc] for s in ordered)
        diag = sum(s.probabilities[i_diag] for s in ordered)
        label = EXCELLENT if exc > diag else DIAGNOSTIC
    else:
        label = DIAGNOSTIC

    worst_idx = sorted(range(len(p)), key=lambda i: p[i], reverse=True)[: policy.worst_count]
    worst = [
        {
            "sop_instance_uid": ordered[i].sop_instance_uid,
            "frame": ordered[i].frame,
            "slice_index": i,  # 0-based in anatomical order
            "instance_number": ordered[i].instance_number,
            "position": ordered[i].position,
            "p_nondiagnostic": round(p[i], 4),
            "flagged": p[i] >= policy.slice_threshold,
        }
        for i in worst_idx
    ]
    return Verdict(label, round(score, 4), worst, len(p), n_flagged)


def assess(
    slices: Sequence[SliceResult],
    policy: SeriesPolicy,
    class_names: Sequence[str],
    scope: Scope | None = None,
    ood_threshold: float | None = None,
    empty_reason: str | None = None,
) -> Verdict:
    """The series verdict the node records (and `mriqa score` prints): not assessed when
    nothing was scored for a stated reason (out of scope, no anatomy), when the slices are
    mostly unlike the training data, or when too few are left for the model's scope; else
    ``decide`` on the slices the guard kept."""
    if not slices and empty_reason:
        return not_assessed(empty_reason)
    kept, unlike = guard(slices, ood_threshold)
    if unlike is not None:
        return unlike
    few = scope.too_few_slices(len(kept)) if scope is not None else None
    return not_assessed(few, len(kept)) if few else decide(kept, policy, class_names)
