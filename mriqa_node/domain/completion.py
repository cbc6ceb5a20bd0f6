"""When is a series complete? Pure rules; the state itself lives in the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class CompletionRule:
    idle_seconds: float
    release_grace_seconds: float

    def count_reached(self, expected: int | None, received: int) -> bool:
        """0 or None: no usable announced count (0 marks a count found to be wrong)."""
        return bool(expected) and received >= expected

    def deadline(self, last_received: datetime, released_at: datetime | None) -> datetime:
        """Quiet for idle_seconds, or for the (shorter) grace once the sender has released."""
        wait = self.idle_seconds
        if released_at is not None and released_at >= last_received:
            wait = min(wait, self.release_grace_seconds)
        return last_received + timedelta(seconds=wait)

    def is_complete(
        self,
        expected: int | None,
        received: int,
        last_received: datetime,
        released_at: datetime | None,
        now: datetime,
    ) -> bool:
        return self.count_reached(expected, received) or now >= self.deadline(
            last_received, released_at
        )
