"""FeedCursor: every event id handed out once, none skipped when a lower id commits late."""

from __future__ import annotations

import time

from mriqa_node.services.feed import FeedCursor


def test_ids_are_handed_out_once_and_low_follows_contiguous_ids() -> None:
    c = FeedCursor(10)
    assert c.accept([11, 12, 13]) == [11, 12, 13] and c.low == 13
    assert c.accept([11, 12, 13, 14]) == [14] and c.low == 14
    assert c.accept([]) == [] and c.low == 14


def test_a_late_commit_below_a_gap_is_still_delivered() -> None:
    c = FeedCursor(0, grace=60)
    assert c.accept([1, 3]) == [1, 3]
    assert c.low == 1  # 2 may still commit: keep reading from above 1
    assert c.accept([3]) == []  # re-read: 3 is not handed out twice
    assert c.accept([2, 3]) == [2]  # the late one arrives
    assert c.low == 3


def test_a_gap_older_than_the_grace_is_a_rollback() -> None:
    c = FeedCursor(0, grace=0.05)
    assert c.accept([1, 3, 4]) == [1, 3, 4] and c.low == 1
    time.sleep(0.1)
    assert c.accept([3, 4]) == [] and c.low == 4
    assert c.accept([2]) == []  # below low: too late, never handed out
