"""Simulated radiologists: quality classes from the known motion severity, with disagreement.

The paper's two experts disagree a lot (its Fig. 6: Jaccard indices well below 1 on the diagonal
and clearly above 0 off it). Raters here read the same true severity through their own Gaussian
perception noise and their own class boundaries; rater 2 is stricter (calls images
non-diagnostic sooner and excellent later). The truth uses fixed thresholds without noise.

Classes: 0 non-diagnostic, 1 diagnostic, 2 excellent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "RATERS",
    "TRUTH_THRESHOLDS",
    "Rater",
    "classify",
    "rate",
]

# Severity below the first value: excellent (2); at or above the second: non-diagnostic (0).
TRUTH_THRESHOLDS = (0.2, 0.5)


@dataclass(frozen=True)
class Rater:
    """Class boundaries on the severity scale and the spread of the rater's perception."""

    excellent_below: float
    nondiagnostic_from: float
    noise: float


RATERS = {
    1: Rater(excellent_below=0.2, nondiagnostic_from=0.5, noise=0.06),
    2: Rater(excellent_below=0.17, nondiagnostic_from=0.46, noise=0.075),
}


def classify(
    severity: np.ndarray, thresholds: tuple[float, float] = TRUTH_THRESHOLDS
) -> np.ndarray:
    """Severity -> class 2 / 1 / 0 with the given (excellent_below, nondiagnostic_from)."""
    s = np.asarray(severity, dtype=np.float64)
    lo, hi = thresholds
    return np.where(s < lo, 2, np.where(s >= hi, 0, 1)).astype(np.int64)


def rate(severity: np.ndarray, rater: int, rng: np.random.Generator) -> np.ndarray:
    """Simulated labels 0/1/2 of rater 1 or 2 for true severities in [0, 1]."""
    if rater not in RATERS:
        raise ValueError(f"unknown rater {rater!r} (known: {sorted(RATERS)})")
    r = RATERS[rater]
    s = np.asarray(severity, dtype=np.float64)
    perceived = s + r.noise * rng.standard_normal(s.shape)
    return classify(perceived, (r.excellent_below, r.nondiagnostic_from))
