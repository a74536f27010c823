"""The worker's input batching (``stream.batching.age_bounded_batches``) on a real Faust agent
(Faust's test context: a channel instead of a topic; nothing is sent anywhere)."""

from __future__ import annotations

import asyncio
import time

import faust
import pytest

from stream.batching import age_bounded_batches


def _agent_run(max_: int, wait_s: float, feed, work_s: float = 0.0, expect: int = 0, timeout_s: float = 30.0):
    """Run an agent that takes ``age_bounded_batches(stream, max_, wait_s)`` and spends
    ``work_s`` on each batch; ``feed(agent)`` puts the values. Returns, per batch, the values,
    when it was handed over, when its work ended, and whether each event's message was acked
    while the batch was being worked on."""
    app = faust.App(f"batching-test-{time.monotonic_ns()}", broker="kafka://127.0.0.1:9", store="memory://")
    batches: list[dict] = []

    @app.agent()
    async def take(stream):
        async for batch in age_bounded_batches(stream, max_, wait_s):
            t = time.monotonic()
            acked_during = [ev.message.acked for ev in batch]
            if work_s:
                await asyncio.sleep(work_s)
            batches.append({"values": [ev.value for ev in batch], "at": t, "done": time.monotonic(),
                            "acked_during": acked_during, "events": list(batch)})

    async def main():
        async with take.test_context() as agent:
            await feed(agent)
            deadline = time.monotonic() + timeout_s
            while sum(len(b["values"]) for b in batches) < expect and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)   # the last batch's acks happen when the next is asked for
            return [dict(b, acked_after=[ev.message.acked for ev in b["events"]]) for b in batches]

    return asyncio.run(main())


def test_events_that_arrive_during_a_batch_are_handed_over_when_it_ends_not_a_whole_wait_later():
    # Faust's take_events would start a fresh 1 s wait after the 0.3 s batch: the second batch
    # would come ~1.3 s after the first. Here its events have waited long enough by then.
    async def feed(agent):
        await agent.put(0)
        await asyncio.sleep(1.2)          # the first batch is handed over after its 1 s wait
        for i in range(1, 4):             # ... and these arrive while it is worked on
            await agent.put(i)
            await asyncio.sleep(0.05)

    batches = _agent_run(max_=100, wait_s=1.0, feed=feed, work_s=1.5, expect=4)
    assert [b["values"] for b in batches] == [[0], [1, 2, 3]]
    gap = batches[1]["at"] - batches[0]["done"]
    assert gap < 0.5, f"the second batch came {gap:.2f} s after the first was done"


def test_an_event_at_an_idle_worker_waits_for_others_to_join_it_at_most_wait_s():
    async def feed(agent):
        for i in range(3):
            await agent.put(i)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)          # the first three are handed over together by now
        feed.t0 = time.monotonic()
        await agent.put(3)

    batches = _agent_run(max_=100, wait_s=0.4, feed=feed, expect=4)
    assert [b["values"] for b in batches] == [[0, 1, 2], [3]]
    lone = batches[1]["at"] - feed.t0
    assert 0.3 <= lone < 2.0, f"a lone event was handed over after {lone:.2f} s (wait 0.4 s)"


def test_batches_hold_at_most_max_events_in_arrival_order_and_are_acked_only_after_their_work():
    async def feed(agent):
        for i in range(10):
            await agent.put(i)

    batches = _agent_run(max_=4, wait_s=0.05, feed=feed, work_s=0.05, expect=10)
    assert [v for b in batches for v in b["values"]] == list(range(10))
    assert all(1 <= len(b["values"]) <= 4 for b in batches)
    assert not any(a for b in batches for a in b["acked_during"]), "an event was acked before its batch was done"
    assert all(all(b["acked_after"]) for b in batches), "a finished batch was not acked"


def test_zero_wait_hands_over_what_has_arrived_at_once_and_a_bad_max_is_refused():
    async def feed(agent):
        for i in range(5):
            await agent.put(i)
            await asyncio.sleep(0.2)

    batches = _agent_run(max_=10, wait_s=0.0, feed=feed, expect=5)
    assert [v for b in batches for v in b["values"]] == list(range(5))
    assert len(batches) == 5   # nothing held back waiting for company

    async def take_none():
        async for _ in age_bounded_batches(object(), 0, 0.0):
            pass

    with pytest.raises(ValueError, match="max_ must be at least 1"):
        asyncio.run(take_none())
