"""Drift per scanner and protocol: does a group's recent verdicts depart from its own past?

A broken coil, a software update or a new protocol version changes what one scanner sends;
the node then alerts (or leaves not assessed) far more or less often than that scanner used
to, or its scores move. Each group (calling AE, protocol) is compared with itself: its most
recent ``recent`` decided series against the ``baseline`` series before them. A departure is
a two-proportion z-test on the alert rate and on the not-assessed rate (|z| >= ``z``) or a
two-sample Kolmogorov-Smirnov test on the series scores (D above its asymptotic critical value
at ``ks_alpha``); groups with too few series say nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mriqa_node.domain.verdict import NON_DIAGNOSTIC, NOT_ASSESSED


@dataclass(frozen=True)
class DriftRule:
    recent: int = 20  # series in the recent window
    baseline: int = 60  # at most, before it
    min_baseline: int = 20
    z: float = 3.0
    ks_alpha: float = 0.001


@dataclass(frozen=True)
class Window:
    series: int
    alerts: int
    not_assessed: int
    mean_score: float | None

    @property
    def alert_rate(self) -> float:
        return self.alerts / self.series if self.series else 0.0

    @property
    def not_assessed_rate(self) -> float:
        return self.not_assessed / self.series if self.series else 0.0

    def to_json(self) -> dict:
        return {
            "series": self.series,
            "alert_rate": round(self.alert_rate, 4),
            "not_assessed_rate": round(self.not_assessed_rate, 4),
            "mean_score": None if self.mean_score is None else round(self.mean_score, 4),
        }


@dataclass(frozen=True)
class GroupDrift:
    calling_aet: str | None
    protocol: str | None
    baseline: Window
    recent: Window
    reasons: tuple[str, ...]  # empty: no departure

    @property
    def drifting(self) -> bool:
        return bool(self.reasons)


@dataclass(frozen=True)
class Bin:
    """Consecutive series of one group: a point of its chart over time."""

    start: int  # index of its first series in the group's history
    first_at: datetime
    last_at: datetime
    window: Window
    quantiles: tuple[float, float, float] | None  # quartiles of the series scores

    def to_json(self) -> dict:
        return {"start": self.start, "first_at": self.first_at.isoformat(),
                "last_at": self.last_at.isoformat(), **self.window.to_json(),
                "quartiles": None if self.quantiles is None else
                [round(q, 4) for q in self.quantiles]}  # fmt: skip


def timeline(
    labels: Sequence[str], scores: Sequence[float | None], times: Sequence[datetime],
    max_bins: int = 40, min_size: int = 5,
) -> list[Bin]:  # fmt: skip
    """The group's history (oldest first) in bins of equal numbers of series, so that every
    point of the chart rests on as many series as the next (a quiet night is no spike)."""
    import numpy as np

    size = max(min_size, math.ceil(len(labels) / max_bins))
    bins = []
    for start in range(0, len(labels), size):
        part = slice(start, start + size)
        known = [s for s in scores[part] if s is not None]
        quartiles = tuple(np.quantile(known, (0.25, 0.5, 0.75)).tolist()) if known else None
        bins.append(Bin(start, times[part][0], times[part][-1],
                        window(labels[part], scores[part]), quartiles))  # fmt: skip
    return bins


def window(labels: Sequence[str], scores: Sequence[float | None]) -> Window:
    known = [s for s in scores if s is not None]
    return Window(len(labels), sum(1 for x in labels if x == NON_DIAGNOSTIC),
                  sum(1 for x in labels if x == NOT_ASSESSED),
                  sum(known) / len(known) if known else None)  # fmt: skip


def assess_group(
    calling_aet: str | None,
    protocol: str | None,
    labels: Sequence[str],
    scores: Sequence[float | None],
    rule: DriftRule | None = None,
) -> GroupDrift | None:
    """Labels and scores of the group's decided series, oldest first; None when the group
    has too few series to tell."""
    rule = rule or DriftRule()
    if len(labels) < rule.recent + rule.min_baseline:
        return None
    split = len(labels) - rule.recent
    start = max(0, split - rule.baseline)
    base = window(labels[start:split], scores[start:split])
    now = window(labels[split:], scores[split:])
    reasons = []
    for name, (k1, k2) in (
        ("alert rate", (base.alerts, now.alerts)),
        ("not-assessed rate", (base.not_assessed, now.not_assessed)),
    ):
        z = two_proportion_z(k1, base.series, k2, now.series)
        if abs(z) >= rule.z:
            reasons.append(
                f"{name} {k2 / now.series:.0%} in the last {now.series} series against"
                f" {k1 / base.series:.0%} in the {base.series} before (z = {z:.1f})"
            )
    a = [s for s in scores[start:split] if s is not None]
    b = [s for s in scores[split:] if s is not None]
    if len(a) >= rule.min_baseline and len(b) >= rule.recent // 2:
        d, critical = ks_statistic(a, b), ks_critical(len(a), len(b), rule.ks_alpha)
        if d > critical:
            reasons.append(f"score distribution moved (mean {now.mean_score:.2f} against"
                           f" {base.mean_score:.2f}; Kolmogorov-Smirnov D = {d:.2f} >"
                           f" {critical:.2f})")  # fmt: skip
    return GroupDrift(calling_aet, protocol, base, now, tuple(reasons))


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z of p2 - p1 with the pooled variance (0 when there is no variance at all)."""
    if not n1 or not n2:
        return 0.0
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return 0.0
    return (k2 / n2 - k1 / n1) / math.sqrt(var)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    import numpy as np

    x, y = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / len(x)
    cdf_y = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.max(np.abs(cdf_x - cdf_y)))


def ks_critical(n: int, m: int, alpha: float) -> float:
    """D beyond which the two samples differ at level ``alpha`` (the asymptotic bound
    c(alpha) * sqrt((n + m) / (n m)), c(alpha) = sqrt(-ln(alpha / 2) / 2))."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))
