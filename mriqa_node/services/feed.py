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


class FeedCursor:
    def __init__(self, start: int, grace: float = GAP_GRACE_SECONDS) -> None:
        self.low = start  # every id <= low is handled (or was a rollback)
        self.grace = grace
        self._seen: set[int] = set()  # handed out, above low
        self._gap_since: dict[int, float] = {}  # missing id -> when it was first missed

    def accept(self, ids: Iterable[int]) -> list[int]:
        """The ids not handed out before (in order); moves ``low`` as far as it safely can."""
        new = sorted(i for i in set(ids) if i > self.low and i not in self._seen)
        self._seen.update(new)
        now = time.monotonic()
        while self._seen:
            nxt = self.low + 1
            if nxt in self._seen:
                self._seen.discard(nxt)
            elif now - self._gap_since.setdefault(nxt, now) < self.grace:
                break
            self._gap_since.pop(nxt, None)
            self.low = nxt
        return new
