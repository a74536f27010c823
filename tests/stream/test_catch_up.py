"""A newly assigned partition's idle sessions wait until its backlog is read (``stream.catch_up``)."""

from __future__ import annotations

import logging

from stream.catch_up import CatchUp


def test_a_partition_is_held_until_the_log_end_of_the_first_fetch_is_processed():
    c = CatchUp()
    c.assigned({0, 1}, now=100.0)
    # no fetch answered yet: nothing is known about the backlog
    assert c.holding(0, None, None, 101.0)
    # the first fetch says the log ends at offset 50; the group had committed 40
    assert c.holding(0, 50, 40, 102.0)
    for offset in range(40, 49):
        c.processed(0, offset)
    assert c.holding(0, 57, 40, 103.0)      # a later fetch's end does not move the target
    c.processed(0, 49)
    assert not c.holding(0, 57, 40, 104.0)
    assert c.partitions == [1]
    assert not c.holding(0, None, None, 105.0)  # caught up stays caught up


def test_a_partition_without_backlog_is_not_held():
    c = CatchUp()
    c.assigned({3}, now=0.0)
    assert not c.holding(3, 12, 12, 0.5)    # committed at the log end: nothing to read
    c.assigned({4}, now=0.0)
    assert not c.holding(4, 0, None, 0.5)   # an empty partition
    assert not c.active                     # nothing held: the worker skips the bookkeeping


def test_a_new_assignment_starts_over_and_forgets_old_progress():
    c = CatchUp()
    c.assigned({0}, now=0.0)
    c.processed(0, 99)
    assert not c.holding(0, 100, None, 1.0)
    c.assigned({0, 2}, now=10.0)            # a rebalance: the backlog may have grown meanwhile
    assert c.holding(0, None, None, 11.0) and c.holding(0, 130, 100, 11.0)
    c.processed(0, 129)
    assert not c.holding(0, 130, 100, 12.0)
    assert not c.holding(5, None, None, 12.0)   # a partition it was never assigned


def test_a_partition_that_cannot_be_judged_is_let_go_with_a_warning(caplog):
    c = CatchUp(max_hold_s=30.0)
    c.assigned({0, 1}, now=0.0)
    assert c.holding(0, None, None, 29.0)
    with caplog.at_level(logging.WARNING, logger="tagger.worker"):
        assert not c.holding(0, None, None, 30.0)
        assert not c.holding(1, 80, 10, 31.0)
    text = caplog.text
    assert "partition 0 has not caught up after 30 s (no fetch answered)" in text
    assert "partition 1 has not caught up after 31 s (at offset 10 of 80)" in text
