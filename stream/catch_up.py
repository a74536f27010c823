"""Partitions still catching up after an assignment: their idle sessions wait.

A worker that is assigned a partition (at start, or from a rebalance after another worker
died) resumes its sessions from Redis as the last owner saved them. The partition may still
hold events the worker has not read: those published while nobody consumed it, and those the
last owner labelled but did not commit (it may even have sent their label records and died
before saving the sessions, see ``stream.in_doubt``). Measured from the saved state, every
session of that partition looks idle, so the inactivity sweep would finalise it before its
own waiting events are read: finals too early, and, for a session whose last owner already
sent later records, a final whose revision number clashes with one of those (two finals of
one event, or one identity with two contents).

So the sweep leaves a partition's sessions alone until the worker has caught up with it: has
processed every message up to the log end the first fetch after the assignment reported (the
high watermark; the consumer forgets it on every assignment, so it is never a stale one), or
the group's committed offset is already there. A partition that cannot be judged (no fetch
answered) for ``max_hold_s`` is let go with a warning: the sweep then behaves as without
this, rather than never finalising its sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

log = logging.getLogger("tagger.worker")


@dataclass
class _Held:
    since: float                    # when the partition was assigned
    target: Optional[int] = None    # the log end to reach (next offset), once known


class CatchUp:
    """Which assigned partitions are still catching up (``holding``)."""

    def __init__(self, max_hold_s: float = 300.0):
        self.max_hold_s = max_hold_s
        self._held: dict[int, _Held] = {}
        self._done: dict[int, int] = {}   # partition -> next offset after the last processed

    def assigned(self, partitions: Iterable[int], now: float) -> None:
        """A new assignment: each of ``partitions`` catches up from here."""
        self._held = {p: _Held(now) for p in partitions}
        self._done = {}

    def processed(self, partition: int, offset: int) -> None:
        """The message at ``offset`` of ``partition`` was processed (labelled or dead-lettered).
        Kept only while the partition is held: a caught-up one needs no bookkeeping."""
        if partition in self._held and offset >= self._done.get(partition, -1):
            self._done[partition] = offset + 1

    def holding(self, partition: int, highwater: Optional[int], committed: Optional[int],
                now: float) -> bool:
        """Whether ``partition``'s idle sessions must wait. ``highwater``: the log end from
        the consumer's latest fetch (None before one answered); ``committed``: the group's
        committed offset (the next to read), or None."""
        held = self._held.get(partition)
        if held is None:
            return False
        if held.target is None and highwater is not None:
            held.target = highwater
        reached = max(self._done.get(partition, 0), committed if committed is not None else 0)
        if held.target is not None and reached >= held.target:
            del self._held[partition]
            log.info("partition %d caught up to offset %d in %.1f s: its idle sessions are "
                     "finalised from now on", partition, held.target, now - held.since)
            return False
        if now - held.since >= self.max_hold_s:
            del self._held[partition]
            log.warning("partition %d has not caught up after %.0f s (%s): its idle sessions are "
                        "finalised anyway", partition, now - held.since,
                        "no fetch answered" if held.target is None
                        else f"at offset {reached} of {held.target}")
            return False
        return True

    @property
    def active(self) -> bool:
        """Whether any partition is still held (else the worker skips all of this)."""
        return bool(self._held)

    @property
    def partitions(self) -> list[int]:
        """The partitions still held."""
        return sorted(self._held)
