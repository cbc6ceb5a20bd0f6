"""Retry timing shared by the forwarder and the webhook outbox."""

from __future__ import annotations

MAX_DOUBLINGS = 60  # 2**60 s outlasts everything; beyond it only the cap matters


def backoff(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: ``base * 2**(attempts - 1)``,
    capped, and bounded for any number of failures (a week-long outage never overflows)."""
    doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
    return min(base_seconds * 2.0**doublings, max_seconds)
