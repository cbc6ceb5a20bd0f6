"""How a model does on the node's labelled series, and whether a candidate may replace it.

Labels come from the site's feedback (domain only: the service gathers them): a series is
non-diagnostic by its raters' series ratings (majority of class 0) or, without ratings, by
the technologist's acknowledgement of an alert ("Rescanned": it was; "Accepted anyway" or
"Disagree": it was not). Rates carry Wilson 95 % intervals, because a site has tens of
labelled series, not thousands, and a difference of one series must not read as a trend.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n (0..1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rates:
    """A model's alerts against the labels: non-diagnostic series caught, diagnostic flagged."""

    n_positive: int  # labelled non-diagnostic
    caught: int
    n_negative: int  # labelled diagnostic
    false_alerts: int

    @classmethod
    def of(cls, pairs: list[tuple[bool, bool]]) -> Rates:
        """From (labelled non-diagnostic, alerted) per series."""
        return cls(
            n_positive=sum(1 for truth, _ in pairs if truth),
            caught=sum(1 for truth, flagged in pairs if truth and flagged),
            n_negative=sum(1 for truth, _ in pairs if not truth),
            false_alerts=sum(1 for truth, flagged in pairs if not truth and flagged),
        )

    @property
    def sensitivity(self) -> float | None:
        return self.caught / self.n_positive if self.n_positive else None

    @property
    def false_alert_rate(self) -> float | None:
        return self.false_alerts / self.n_negative if self.n_negative else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sensitivity": self.sensitivity,
                "sensitivity_ci": wilson(self.caught, self.n_positive),
                "false_alert_rate": self.false_alert_rate,
                "false_alert_ci": wilson(self.false_alerts, self.n_negative)}  # fmt: skip

    def describe(self) -> str:
        lo, hi = wilson(self.caught, self.n_positive)
        flo, fhi = wilson(self.false_alerts, self.n_negative)
        return (f"sensitivity {self.caught}/{self.n_positive} ({_pct(self.sensitivity)}, 95 % CI"
                f" {lo:.0%}-{hi:.0%}), false alerts {self.false_alerts}/{self.n_negative}"
                f" ({_pct(self.false_alert_rate)}, 95 % CI {flo:.0%}-{fhi:.0%})")  # fmt: skip


@dataclass(frozen=True)
class Judgement:
    allowed: bool
    reasons: tuple[str, ...]


def judge_promotion(active: Rates, candidate: Rates, min_labelled: int = 1) -> Judgement:
    """A candidate may replace the active model only if, on the same labelled series, it
    catches at least as many non-diagnostic series and raises no more false alerts. (Point
    counts on the same series: the intervals say how much the counts can tell, and with few
    series they overlap whatever happens; a worse count is still refused.)"""
    reasons = []
    labelled = candidate.n_positive + candidate.n_negative
    if labelled < min_labelled:
        reasons.append(f"only {labelled} labelled series with verdicts of both models"
                       f" (at least {min_labelled} needed)")  # fmt: skip
    if candidate.n_positive and candidate.caught < active.caught:
        reasons.append(f"it catches fewer non-diagnostic series: {candidate.caught} against"
                       f" {active.caught} of {candidate.n_positive}")  # fmt: skip
    if candidate.n_negative and candidate.false_alerts > active.false_alerts:
        reasons.append(
            f"it raises more false alerts: {candidate.false_alerts} against"
            f" {active.false_alerts} of {candidate.n_negative} diagnostic series"
        )
    return Judgement(not reasons, tuple(reasons))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
