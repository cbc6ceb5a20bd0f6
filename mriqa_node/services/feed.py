"""Reading the event feed in id order without losing a late commit.

On PostgreSQL an event's id is assigned when it is inserted, not when it commits, so an event
with a lower id can become visible after one with a higher id. A consumer that only remembers
the highest id it saw would skip it for good. ``FeedCursor`` hands out every new id at once but
keeps its low-water mark below a missing id until the gap is older than ``grace`` seconds (by
then the transaction committed or rolled back); reading ``id > low`` again picks up the late
ones, and ids already handed out are not handed out twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

GAP_GRACE_SECONDS = 10.0


class GapClock:
    """When each missing id was first missed: a gap younger than ``grace`` may still be a
    transaction about to commit; an older one was a rollback. Shared by every feed reader."""

    def __init__(self, grace: float = GAP_GRACE_SECONDS) -> None:
        self.grace = grace
        self._since: dict[int, float] = {}

    def may_fill(self, missing: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - self._since.setdefault(missing, now) < self.grace

    def forget(self, up_to: int) -> None:
        """Gaps at or below ``up_to`` are settled."""
        self._since = {k: v for k, v in self._since.items() if k > up_to}


class FeedCursor:
    def __init__(self, start: int, grace: float = GAP_GRACE_SECONDS) -> None:
        self.low = start  # every id <= low is handled (or was a rollback)
        self._seen: set[int] = set()  # handed out, above low
        self._gaps = GapClock(grace)

    def accept(self, ids: Iterable[int]) -> list[int]:
        """The ids not handed out before (in order); moves ``low`` as far as it safely can."""
        new = sorted(i for i in set(ids) if i > self.low and i not in self._seen)
        self._seen.update(new)
        now = time.monotonic()
        while self._seen:
            nxt = self.low + 1
            if nxt in self._seen:
                self._seen.discard(nxt)
            elif self._gaps.may_fill(nxt, now):
                break
            self.low = nxt
        self._gaps.forget(self.low)
        return new
