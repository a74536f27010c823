"""Batches of input events whose wait is bounded per event, not per poll.

Faust's ``Stream.take_events(max_, within)`` starts a fresh ``within`` wait every time it is
asked for a batch, and holds new events out of its buffer while the caller works on the last
one. So every event waits for the batch in progress to finish *and then* for a whole
``within`` more, even when it arrived long before: at a steady input rate the wait is a floor
on every label's latency, paid twice by the events that arrive during a batch.

``age_bounded_batches`` keeps the same contract (at most ``max_`` events a batch, each event
acknowledged only once the caller is done with its batch and asks for the next) with one rule
for the wait instead: **a batch is handed over once its oldest event has waited ``wait_s``**
(or ``max_`` events are in). Events keep being buffered while the caller works, so the events
that arrived during one batch form the next at once; an event arriving at an idle worker waits
at most ``wait_s`` for others to join it. ``wait_s`` = 0 hands over whatever has arrived as soon
as something has ("natural batching": batches grow with the load by themselves).

It drives the stream as ``take_events`` does (a processor fills the buffer while the stream is
drained passively), through the same Stream methods.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


async def age_bounded_batches(stream: Any, max_: int, wait_s: float, *, ack: bool = True) -> AsyncIterator[list]:
    """Yield lists of Faust events from ``stream``: at most ``max_`` each, handed over when the
    oldest has waited ``wait_s`` seconds. The events of a batch are acknowledged when the next
    batch is asked for (or the iteration ends), never before; with ``ack=False`` never here:
    the caller acknowledges each with ``stream.ack(event)`` once it is done with it (a caller
    that finishes a batch after asking for the next)."""
    if max_ < 1:
        raise ValueError(f"max_ must be at least 1, got {max_}")
    loop = asyncio.get_running_loop()
    pending: list = []
    times: list[float] = []    # loop time each pending event was buffered
    arrived = asyncio.Event()  # something is pending
    full = asyncio.Event()     # max_ events are pending
    room = asyncio.Event()     # the buffer may take more
    room.set()

    async def buffer(value: Any) -> Any:
        while len(pending) >= max_:
            room.clear()
            await stream.wait(room)
            if stream.should_stop:
                return value
        event = stream.current_event
        if event is None:
            raise RuntimeError("the stream gave a value without its event")
        pending.append(event)
        times.append(loop.time())
        arrived.set()
        if len(pending) >= max_:
            full.set()
        return value

    acks_before = stream.enable_acks
    stream.enable_acks = False   # events are acknowledged here, after their batch
    stream.add_processor(buffer)
    stream._enable_passive(aiter(stream.channel))  # noqa: SLF001 - how take_events drains the stream too
    try:
        while not stream.should_stop:
            if not pending:
                arrived.clear()
                await stream.wait_for_stopped(arrived, timeout=1.0)
                if not pending:
                    continue
            left = times[0] + wait_s - loop.time()
            if left > 0 and len(pending) < max_:
                full.clear()
                await stream.wait_for_stopped(full, timeout=left)
            elif wait_s <= 0:
                # let the rest of what was fetched with the first event reach the buffer
                await asyncio.sleep(0)
            batch = pending[:max_]
            del pending[:max_], times[:max_]
            if not pending:
                arrived.clear()
            full.clear()
            room.set()
            try:
                yield batch
            finally:
                if ack:
                    for event in batch:
                        await stream.ack(event)
    finally:
        stream.enable_acks = acks_before
        stream._processors.remove(buffer)  # noqa: SLF001 - the processor added above
