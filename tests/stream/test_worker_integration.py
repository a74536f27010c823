"""The live worker end to end, as a consumer of its topics sees it.

Each test runs ``faust -A stream.app worker`` as a subprocess on the real test broker and
Redis (see tests/conftest.py), publishes generated sessions the way agents do
(``EventPublisher`` + ``replay_messages``), reads ``tagger.labels`` / ``tagger.events.dlq``
from the beginning with a plain aiokafka consumer, and checks the topic contracts of
DESIGN.md: exactly one final per event with nothing after it, revisions counted 0, 1, 2...,
dead letters that keep the original bytes and say where they came from, hot swaps that lose
nothing, bad artifacts refused, a SIGKILLed worker that loses nothing, health endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream.tools.publisher import EventPublisher, replay_messages
from stream.records import LABEL_FIELDS, validate_label
from stream.settings import Settings, kafka_client_kwargs
from stream.tools.processes import free_port, metric_value
from tests.helpers import serving_root
from trainer.artifacts import POINTER, promote
from trainer.loading import read_events

pytestmark = pytest.mark.integration

WAIT_S = 60.0
# The generator makes these two steps depend on what comes after them (whether the account
# gets updated), so a causal model with lookahead revises them more often than the others.
BRANCH_STEPS = {"Account Update Duty Invoice", "No Account Update Duty Invoice"}

Key = tuple[str, str]  # (session_id, event_id)


# --------------------------------------------------------------------------- helpers


def _run(coro, timeout_s: float = 240.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def _version(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "manifest.json").read_text())["version"]


def _point_at(root: Path, target: Path) -> None:
    """Aim the ``current`` pointer at ``target`` directly (``promote`` refuses bad models)."""
    tmp = root / (POINTER + ".tmp")
    tmp.write_text(f"{target.resolve()}\n", encoding="utf-8")
    os.replace(tmp, root / POINTER)


def _traffic(log: Path, sessions: int, *, no_end: Callable[[int], bool] = lambda i: False):
    """``(messages, events, truth)`` for the first ``sessions`` sessions of ``log``.

    ``events`` maps every published event's key to ``(seq, event_name)``; sessions whose
    index (in file order) satisfies ``no_end`` get no ``session_end`` message.
    """
    frame, _ = read_events(log, require_label=False)
    messages, truth = replay_messages(frame, sessions=sessions)
    order = {sid: i for i, sid in enumerate(dict.fromkeys(m["session_id"] for m in messages))}
    messages = [m for m in messages
                if not (m.get("type") == "session_end" and no_end(order[m["session_id"]]))]
    events: dict[Key, tuple[int, str]] = {}
    seqs: dict[str, int] = defaultdict(int)
    for m in messages:
        if m.get("type") != "session_end":
            sid = m["session_id"]
            events[(sid, m["event_id"])] = (seqs[sid], m["event_name"])
            seqs[sid] += 1
    return messages, events, truth


async def _publish(settings: Settings, messages: list[dict], *, rate: float | None = None) -> None:
    async with EventPublisher(settings.kafka, settings.input_topic,
                              security=kafka_client_kwargs(settings)) as pub:
        for i, m in enumerate(messages):
            if rate is not None and i:
                await asyncio.sleep(1.0 / rate)
            await pub.publish({**m, "published_at": time.time()})


class Tail:
    """Everything on a topic from its start, read as it arrives."""

    def __init__(self, settings: Settings, topic: str):
        self.consumer = AIOKafkaConsumer(
            topic, group_id=None, auto_offset_reset="earliest",
            fetch_max_wait_ms=50,  # tansu answers a fetch only when the wait expires
            **kafka_client_kwargs(settings))
        self.messages: list = []
        self.records: list[dict] = []

    async def __aenter__(self) -> "Tail":
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_ms: int = 100) -> None:
        for batch in (await self.consumer.getmany(timeout_ms=timeout_ms)).values():
            for msg in batch:
                self.messages.append(msg)
                self.records.append(json.loads(msg.value))

    async def until(self, cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
        """Read until ``cond()`` holds; fail after ``timeout_s``. Returns seconds waited."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await self.poll()
            if cond():
                return loop.time() - start
            if loop.time() - start > timeout_s:
                raise AssertionError(f"no {what} after {timeout_s:.0f} s "
                                     f"({len(self.records)} records read)")

    async def settle(self, seconds: float = 1.0) -> None:
        """Keep reading a little: whatever the worker would still emit shows up."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await self.poll()


def _by_event(records: list[dict]) -> dict[Key, list[dict]]:
    out: dict[Key, list[dict]] = defaultdict(list)
    for r in records:
        out[(r["session_id"], r["event_id"])].append(r)
    return out


def _all_final(tail: Tail, keys) -> Callable[[], bool]:
    keys = set(keys)

    def cond() -> bool:
        done = {(r["session_id"], r["event_id"]) for r in tail.records if r["final"]}
        return keys <= done
    return cond


def _assert_contract(records: list[dict], events: dict[Key, tuple[int, str]]) -> None:
    """Every record is contract-shaped; every event has revisions 0..k with one final last."""
    for r in records:
        validate_label(r)
        assert set(r) == set(LABEL_FIELDS), sorted(set(r) ^ set(LABEL_FIELDS))
        assert r["model_version"]
    by = _by_event(records)
    assert set(by) == set(events), (
        f"labels for unknown events: {sorted(set(by) - set(events))[:5]}; "
        f"events without labels: {sorted(set(events) - set(by))[:5]}")
    for key, recs in by.items():
        # One session is one partition, so its records arrive in the order they were emitted.
        assert [r["revision"] for r in recs] == list(range(len(recs))), (key, recs)
        assert [r["final"] for r in recs] == [False] * (len(recs) - 1) + [True], (key, recs)
        seq, name = events[key]
        assert {r["seq"] for r in recs} == {seq}, (key, recs)
        assert {r["event_name"] for r in recs} == {name.strip()}, (key, recs)


def _http(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(port: int, selector: str) -> float:
    _, body = _http(port, "/metrics")
    return metric_value(body.decode(), selector)


async def _wait_for(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await asyncio.to_thread(cond):
        if loop.time() - start > timeout_s:
            raise AssertionError(f"no {what} after {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
    return loop.time() - start


# --------------------------------------------------------------------------- tests


def test_every_event_gets_one_final_and_branch_steps_get_revised(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log):
    """The output contract over live traffic, including sessions that never send
    ``session_end`` (finalised by the inactivity timeout)."""
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), inactivity_s=4)
    messages, events, truth = _traffic(heldout_log, 24, no_end=lambda i: i % 2 == 1)
    assert sum(m.get("type") == "session_end" for m in messages) == 12
    # Published while the worker starts: the first batches arrive before the model is loaded.
    worker = faust_worker(settings)

    async def main():
        async with Tail(settings, settings.output_topic) as tail:
            await _publish(settings, messages)
            await asyncio.to_thread(worker.wait_ready)
            waited = await tail.until(_all_final(tail, events), "final for every event")
            await tail.settle()
            return tail.records, waited

    records, waited = _run(main())
    print(f"{len(events)} events, {len(records)} records; all final {waited:.1f} s after publishing")
    _assert_contract(records, events)
    assert {r["model_version"] for r in records} == {_version(tiny_model)}

    # the stable policy shows a label (or an abstention) on arrival and revises it at most
    # once, at finality: the events whose final label differs from their first one
    first = {(r["session_id"], r["event_id"]): r["step_name"] for r in records if r["revision"] == 0}
    final = {(r["session_id"], r["event_id"]): r["step_name"] for r in records if r["final"]}
    revised = {k for k, v in final.items() if first[k] != v}
    assert len(revised) >= 5, f"only {len(revised)} events revised by their final"
    share_all = sum(truth[k] in BRANCH_STEPS for k in events) / len(events)
    share_revised = sum(truth[k] in BRANCH_STEPS for k in revised) / len(revised)
    print(f"{len(revised)} revised events; branch steps are {share_revised:.0%} of them "
          f"and {share_all:.0%} of all events")
    assert share_revised > share_all
    log_text = worker.log_text()
    assert "idle sessions" in log_text  # half the sessions ended by inactivity
    assert "sent to the DLQ" not in log_text and "Traceback" not in log_text
    assert worker.proc.poll() is None


def test_malformed_messages_go_to_the_dlq_and_valid_traffic_flows(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log):
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), inactivity_s=4)
    messages, events, _ = _traffic(heldout_log, 6)
    sids = list(dict.fromkeys(m["session_id"] for m in messages))
    bad = [  # (value, reason); keyed by real sessions so they share their partitions
        (b'{"session_id": "x1", "timestamp": "2024-05-20T10:00:00Z", "event_name": ', "invalid_json"),
        (json.dumps({"session_id": "x2", "event_name": "Read: a in b"}).encode(), "missing_field"),
        (json.dumps({"session_id": "x3", "timestamp": "2024-05-20T10:00:00Z",
                     "event_name": 42}).encode(), "wrong_type"),
        (b'{"session_id": "x4", "timestamp": "2024-05-20T10:00:00Z", "event_name": "Read: \xff\xfe"}',
         "invalid_utf8"),
    ]
    worker = faust_worker(settings)
    worker.wait_ready()

    async def main():
        producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
        await producer.start()
        sent = []  # (value, reason, key, delivery future)
        try:
            step = max(1, len(messages) // (len(bad) + 1))
            for i, m in enumerate(messages):
                await producer.send(settings.input_topic, json.dumps({**m, "published_at": time.time()}).encode(),
                                    key=m["session_id"].encode())
                if i % step == step - 1 and len(sent) < len(bad):
                    value, reason = bad[len(sent)]
                    key = sids[len(sent) % len(sids)].encode()
                    sent.append((value, reason, key, await producer.send(settings.input_topic, value, key=key)))
            delivered = [await fut for *_, fut in sent]
        finally:
            await producer.stop()
        assert len(sent) == len(bad)
        async with Tail(settings, settings.dlq_topic) as dlq, Tail(settings, settings.output_topic) as labels:
            await dlq.until(lambda: len(dlq.records) >= len(bad), "dead letters")
            await labels.until(_all_final(labels, events), "final for every valid event")
            await dlq.settle(0.5)
            await labels.settle(0.5)
            return dlq.records, labels.records, [(v, r, k, md) for (v, r, k, _), md in zip(sent, delivered)]

    letters, records, sent = _run(main())
    assert len(letters) == len(bad)
    by_offset = {(d["source"]["partition"], d["source"]["offset"]): d for d in letters}
    for value, reason, key, md in sent:
        d = by_offset[(md.partition, md.offset)]
        assert base64.b64decode(d["original"]) == value
        assert d["reason"] == reason, d
        assert d["source"] == {"topic": settings.input_topic, "partition": md.partition, "offset": md.offset}
        assert base64.b64decode(d["key"]) == key
        assert d["detail"]
    _assert_contract(records, events)
    assert worker.proc.poll() is None, "the worker died on bad input"
    assert "Traceback" not in worker.log_text()


def test_hot_swap_mid_stream_loses_and_doubles_nothing(
        tmp_path, settings_factory, faust_worker, tiny_model, tiny_model_b, heldout_log):
    root = serving_root(tmp_path, tiny_model)
    old, new = _version(tiny_model), _version(tiny_model_b)
    assert old != new
    settings = settings_factory(artifacts_dir=root, inactivity_s=30)
    messages, events, _ = _traffic(heldout_log, 10)
    # Split the interleaved stream in the middle: some sessions are open across the swap.
    half = len(messages) // 2
    first, rest = messages[:half], messages[half:]
    first_keys = [(m["session_id"], m["event_id"]) for m in first if m.get("type") != "session_end"]
    rest_keys = [(m["session_id"], m["event_id"]) for m in rest if m.get("type") != "session_end"]
    spanning = {k[0] for k in first_keys} & {k[0] for k in rest_keys}
    assert spanning, "the split should leave some sessions open across the swap"
    worker = faust_worker(settings)
    worker.wait_ready()

    async def main():
        async with Tail(settings, settings.output_topic) as tail:
            await _publish(settings, first)
            await tail.until(lambda: set(first_keys) <= {(r["session_id"], r["event_id"]) for r in tail.records},
                             "first labels for the first half")
            promote(tiny_model_b, root)
            swap_s = await _wait_for(lambda: "loaded and checked" in worker.log_text(), "model swap")
            await _publish(settings, rest)
            await tail.until(_all_final(tail, events), "final for every event")
            await tail.settle()
            return tail.messages, swap_s

    msgs, swap_s = _run(main())
    print(f"new model loaded {swap_s:.1f} s after promote")
    records = [json.loads(m.value) for m in msgs]
    _assert_contract(records, events)
    by = _by_event(records)
    assert all(by[k][0]["model_version"] == old for k in first_keys)
    assert all(r["model_version"] == new for k in rest_keys for r in by[k])
    # Per partition (the order consumers see), the new version never gives way to the old.
    seen_new: set[int] = set()
    for m, r in zip(msgs, records):
        if r["model_version"] == new:
            seen_new.add(m.partition)
        assert not (m.partition in seen_new and r["model_version"] == old), r
    assert f"now serving model {new}" in worker.log_text()
    assert "sent to the DLQ" not in worker.log_text()
    assert worker.proc.poll() is None


def test_bad_artifact_is_rejected_and_the_old_model_keeps_serving(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log):
    root = serving_root(tmp_path, tiny_model)
    old = _version(tiny_model)
    port = free_port()
    settings = settings_factory(artifacts_dir=root, inactivity_s=30, web_port=port)
    messages, events, _ = _traffic(heldout_log, 8)
    half = len(messages) // 2
    garbage = tmp_path / "bad-weights"
    shutil.copytree(tiny_model, garbage)
    (garbage / "weights.pt").write_bytes(b"\x00not a state dict\xff" * 64)
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(tiny_model, no_manifest)
    (no_manifest / "manifest.json").unlink()
    rejected = 'tagger_model_swaps_total{result="rejected"}'
    worker = faust_worker(settings)
    worker.wait_ready()

    async def main():
        async with Tail(settings, settings.output_topic) as tail:
            await _publish(settings, messages[:half])
            await tail.until(lambda: len(tail.records) >= half // 2, "first labels")
            _point_at(root, garbage)
            await _wait_for(lambda: _metric(port, rejected) >= 1, "rejection of corrupt weights")
            _point_at(root, no_manifest)
            await _wait_for(lambda: _metric(port, rejected) >= 2, "rejection of a folder without manifest")
            await _publish(settings, messages[half:])
            await tail.until(_all_final(tail, events), "final for every event")
            await tail.settle()
            return tail.records

    records = _run(main())
    _assert_contract(records, events)
    assert {r["model_version"] for r in records} == {old}
    assert _metric(port, rejected) == 2
    assert _metric(port, 'tagger_model_swaps_total{result="ok"}') == 0  # the initial load is not a swap
    assert _metric(port, "tagger_model_current_rejected") == 1  # `current` names a refused model
    assert _metric(port, f'tagger_model_info{{version="{old}"}}') == 1
    log_text = worker.log_text()
    assert log_text.count("model swap rejected") == 2, log_text[-3000:]
    assert str(garbage) in log_text and str(no_manifest) in log_text
    status, body = _http(port, "/readyz")
    assert status == 200 and json.loads(body)["model_version"] == old
    assert "sent to the DLQ" not in log_text
    assert worker.proc.poll() is None


@pytest.mark.parametrize("inactivity", [30, 3], ids=["resumed", "finalised-from-redis"])
def test_a_killed_worker_restarts_without_losing_finals(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log, inactivity):
    """The restart takes several seconds (the dead member must time out of the group first).
    With an inactivity timeout longer than that the new worker resumes the dead one's
    sessions from Redis; with a shorter one its sweep finalises them from Redis first and
    later events reopen them. Either way no event may lose its final."""
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), inactivity_s=inactivity)
    messages, events, _ = _traffic(heldout_log, 10)
    first = faust_worker(settings)
    first.wait_ready()

    async def main():
        async with Tail(settings, settings.output_topic) as tail:
            publishing = asyncio.create_task(_publish(settings, messages, rate=50))
            await tail.until(lambda: len(tail.records) >= 25, "labels before the kill")
            os.killpg(first.proc.pid, signal.SIGKILL)
            mid_stream = not publishing.done()
            await asyncio.to_thread(first.proc.wait, 10)
            killed_after = len(tail.records)
            second = faust_worker(settings)
            ready_s = await asyncio.to_thread(second.wait_ready)
            await publishing
            await tail.until(_all_final(tail, events), "final for every event after the restart")
            await tail.settle()
            return tail.records, killed_after, ready_s, second, mid_stream

    records, killed_after, ready_s, second, mid_stream = _run(main())
    assert first.proc.returncode == -signal.SIGKILL
    assert mid_stream, "the kill came after the last event was published"
    # Replays may repeat records; each repeat must be the same record (emitted_at aside).
    unique: dict[tuple[str, str, int], dict] = {}
    repeats = 0
    for r in records:
        k = (r["session_id"], r["event_id"], r["revision"])
        if k in unique:
            repeats += 1
            a, b = unique[k], r
            same = {f: a[f] for f in LABEL_FIELDS if f not in ("emitted_at", "confidence")}
            assert same == {f: b[f] for f in same}, (a, b)
            assert abs(a["confidence"] - b["confidence"]) < 1e-4, (a, b)
        else:
            unique[k] = r
    print(f"killed after {killed_after} records; restarted in {ready_s:.1f} s; "
          f"{len(records)} records ({repeats} repeats) for {len(events)} events")
    deduped = sorted(unique.values(), key=lambda r: (r["session_id"], r["seq"], r["revision"]))
    _assert_contract(deduped, events)
    assert "sent to the DLQ" not in second.log_text()
    assert second.proc.poll() is None


def test_health_and_readiness(tmp_path, settings_factory, faust_worker, tiny_model):
    port = free_port()
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), web_port=port)
    worker = faust_worker(settings)
    worker.wait_ready()
    status, body = _http(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    deadline = time.monotonic() + 15  # partitions are assigned around the "Ready" log line
    while time.monotonic() < deadline and _http(port, "/readyz")[0] != 200:
        time.sleep(0.2)
    status, body = _http(port, "/readyz")
    info = json.loads(body)
    assert status == 200, info
    assert info["ready"] is True and info["partitions_assigned"] is True
    assert info["redis"] is True and info["model_loaded"] is True
    assert info["model_version"] == _version(tiny_model)
    assert worker.proc.poll() is None



def _on_embedded_stack(base, info, tmp_path, tiny_model, **overrides):
    """Worker settings on an embedded stack (its own broker and session timeout), serving the
    tiny model, with sessions kept open for the test's length."""
    from stream.tools.stack import EMBEDDED_SESSION_TIMEOUT_S
    return dataclasses.replace(
        base, kafka=info["kafka"], security_protocol="PLAINTEXT", kafka_session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S,
        artifacts_dir=serving_root(tmp_path, tiny_model), web_port=free_port(), inactivity_s=300, **overrides)


@pytest.mark.parametrize("entry", ["tagger worker", "faust -A stream.app worker"])
def test_sigterm_while_the_broker_is_unreachable_stops_cleanly_and_loses_nothing(
        tmp_path, settings_factory, tiny_model, heldout_log, entry):
    """The broker stops answering mid-stream (SIGSTOP: connections hang, as in a network
    partition) and the worker is told to stop. It must exit 0 within a few seconds (not by
    the 10 s watchdog), with the sessions it had labelled in Redis and without committing the
    batch the broker never acknowledged: once the broker is back, a successor gives every
    event its final. A broker of this test's own, so that stopping it disturbs no other."""
    import redis as redis_sync

    from stream.session_store import session_key
    from stream.tools.processes import WorkerProcess
    from stream.tools.stack import embedded_stack, ensure_topics

    base = settings_factory(create_topics=False)
    with embedded_stack(tmp_path / "stack", redis_url=base.redis_url) as info:
        broker = info["components"]["kafka"]["pid"]
        settings = _on_embedded_stack(base, info, tmp_path, tiny_model)
        ensure_topics(settings)
        messages, events, _ = _traffic(heldout_log, 12)
        # `tagger worker`, the production entry point, and Faust's own CLI on the same app
        first = WorkerProcess.start(settings, tmp_path / "worker-1.log",
                                    app="stream.app" if entry.startswith("faust") else None,
                                    args=["-l", "info"] if entry.startswith("faust") else ())
        second = None
        stopped = False
        try:
            first.wait_ready()

            async def main():
                async with Tail(settings, settings.output_topic) as tail:
                    publishing = asyncio.create_task(_publish(settings, messages, rate=40))
                    await tail.until(lambda: len(tail.records) >= 30, "labels before the outage")
                    labelled = {r["session_id"] for r in tail.records}
                    await asyncio.sleep(1.0)  # their write-through follows the broker's ack
                    nonlocal stopped
                    os.kill(broker, signal.SIGSTOP)
                    stopped = True
                    assert not publishing.done(), "the outage came after the last event was published"
                    await _wait_for(lambda: _http(settings.web_port, "/readyz")[0] == 503,
                                    "/readyz 503 after the broker stopped")
                    t0 = time.monotonic()
                    first.proc.send_signal(signal.SIGTERM)
                    code = await asyncio.to_thread(first.proc.wait, 30)
                    exit_s = time.monotonic() - t0
                    os.kill(broker, signal.SIGCONT)
                    stopped = False
                    nonlocal second
                    second = WorkerProcess.start(settings, tmp_path / "worker-2.log")
                    await asyncio.to_thread(second.wait_ready)
                    await publishing
                    await tail.until(_all_final(tail, events), "final for every event after the restart")
                    await tail.settle()
                    return code, exit_s, labelled, tail.records

            code, exit_s, labelled, records = _run(main())
        finally:
            if stopped:
                os.kill(broker, signal.SIGCONT)
            for w in (first, second):
                if w is not None:
                    w.stop()
    log_text = first.log_text()
    print(f"exit {code} after {exit_s:.1f} s; {len(labelled)} sessions labelled before the outage; "
          f"{len(records)} records for {len(events)} events\n{log_text[-1500:]}")
    assert code == 0, log_text[-3000:]
    assert exit_s < 8.0, f"took {exit_s:.1f} s to exit"
    assert "did not finish within" not in log_text
    client = redis_sync.Redis.from_url(settings.redis_url)
    try:
        missing = [sid for sid in labelled
                   if not client.exists(session_key(settings.redis_prefix, sid, "meta"))]
    finally:
        client.close()
    assert not missing, f"sessions labelled before the stop but not in Redis: {missing}"
    unique = {(r["session_id"], r["event_id"], r["revision"]): r for r in records}
    deduped = sorted(unique.values(), key=lambda r: (r["session_id"], r["seq"], r["revision"]))
    _assert_contract(deduped, events)


def test_labels_in_flight_when_the_broker_stops_are_on_the_topic_once_after_a_successor_replays(
        tmp_path, settings_factory, tiny_model, heldout_log):
    """The broker stops (SIGSTOP) while the worker's next batch is forming; the batch goes out
    to a broker that holds the request without answering, and the worker is told to stop.
    When the broker resumes it appends those records anyway, and the successor is redelivered
    the batch (never committed). It must not emit the records again: every
    ``(session_id, event_id, revision)`` once on the label topic, one final per event."""
    from stream.tools.processes import WorkerProcess
    from stream.tools.stack import embedded_stack, ensure_topics

    base = settings_factory(create_topics=False)
    with embedded_stack(tmp_path / "stack", redis_url=base.redis_url) as info:
        broker = info["components"]["kafka"]["pid"]
        # a batch gathers for 1 s: the one forming when the broker stops is sent into the outage
        settings = _on_embedded_stack(base, info, tmp_path, tiny_model, batch_wait_ms=1000.0)
        ensure_topics(settings)
        messages, events, _ = _traffic(heldout_log, 16)
        first = WorkerProcess.start(settings, tmp_path / "worker-1.log")
        second = None
        stopped = False
        try:
            first.wait_ready()

            async def main():
                async with Tail(settings, settings.output_topic) as tail:
                    publishing = asyncio.create_task(_publish(settings, messages, rate=60))
                    await tail.until(lambda: len(tail.records) >= 30, "labels before the outage")
                    await asyncio.sleep(0.5)   # mid-way through a batch window
                    nonlocal stopped, second
                    os.kill(broker, signal.SIGSTOP)
                    stopped = True
                    assert not publishing.done(), "the outage came after the last event was published"
                    await asyncio.sleep(2.0)   # the window closes: its records go out, unanswered
                    first.proc.send_signal(signal.SIGTERM)
                    code = await asyncio.to_thread(first.proc.wait, 30)
                    os.kill(broker, signal.SIGCONT)
                    stopped = False
                    second = WorkerProcess.start(settings, tmp_path / "worker-2.log")
                    await asyncio.to_thread(second.wait_ready)
                    await publishing
                    await tail.until(_all_final(tail, events), "final for every event after the restart")
                    await tail.settle(3.0)
                    return code, tail.records

            code, records = _run(main())
        finally:
            if stopped:
                os.kill(broker, signal.SIGCONT)
            for w in (first, second):
                if w is not None:
                    w.stop()
    log_text, log2 = first.log_text(), second.log_text()
    print(f"exit {code}; {len(records)} records for {len(events)} events\n{log_text[-1500:]}\n{log2[-1500:]}")
    assert code == 0, log_text[-3000:]
    copies = Counter((r["session_id"], r["event_id"], r["revision"]) for r in records)
    repeated = sorted(k for k, n in copies.items() if n > 1)
    finals = [k for k in repeated if any(r["final"] for r in records if (r["session_id"], r["event_id"], r["revision"]) == k)]
    assert not repeated, f"{len(repeated)} records on the topic twice ({len(finals)} finals): {repeated[:5]}"
    _assert_contract(records, events)
    # the scenario did happen: the stopped worker had records in flight and marked them
    assert "marked in doubt" in log_text, log_text[-3000:]
    assert "read back the label records in doubt" in log2, log2[-3000:]


def test_labels_in_flight_when_a_worker_is_killed_are_on_the_topic_once_after_a_successor_replays(
        tmp_path, settings_factory, tiny_model, heldout_log):
    """As above, but the worker is killed (SIGKILL) instead of told to stop: nothing of it
    runs after the send, so only what it wrote before sending can tell the successor that
    those records may have landed. When the broker resumes it appends them anyway, and the
    successor is redelivered the batch: every ``(session_id, event_id, revision)`` must be on
    the label topic once, with one final per event."""
    from stream.tools.processes import WorkerProcess, metric_value
    from stream.tools.stack import embedded_stack, ensure_topics

    base = settings_factory(create_topics=False)
    with embedded_stack(tmp_path / "stack", redis_url=base.redis_url) as info:
        broker = info["components"]["kafka"]["pid"]
        settings = _on_embedded_stack(base, info, tmp_path, tiny_model, batch_wait_ms=1000.0)
        ensure_topics(settings)
        messages, events, _ = _traffic(heldout_log, 16)
        first = WorkerProcess.start(settings, tmp_path / "worker-1.log")
        second = None
        stopped = False

        def queued() -> float:   # label records the worker has queued for sending so far
            text = first.metrics()
            return sum(metric_value(text, f'tagger_label_records_total{{kind="{k}"}}')
                       for k in ("first", "revision", "final"))
        try:
            first.wait_ready()

            async def main():
                async with Tail(settings, settings.output_topic) as tail:
                    publishing = asyncio.create_task(_publish(settings, messages, rate=60))
                    await tail.until(lambda: len(tail.records) >= 30, "labels before the outage")
                    nonlocal stopped, second
                    # stop the broker the moment a batch is queued for sending: either its acks
                    # are still to come, or (acknowledged already) the worker labels the next
                    # batch, which gathers for 1 s and is sent into the outage. A count read
                    # after the stop could not tell (on a loaded machine, the forming batch had
                    # gone out before the read, and the worker then waits for its acks)
                    before = await asyncio.to_thread(queued)
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 30
                    while await asyncio.to_thread(queued) <= before:
                        assert loop.time() < deadline, "no batch went out before the outage"
                    os.kill(broker, signal.SIGSTOP)
                    stopped = True
                    assert not publishing.done(), "the outage came after the last event was published"
                    # the next batch's window closes and its requests reach the broker's socket;
                    # that records did go out unanswered is asserted below (repeats suppressed)
                    await asyncio.sleep(2.5)
                    first.kill9()
                    await asyncio.to_thread(first.proc.wait, 30)
                    os.kill(broker, signal.SIGCONT)
                    stopped = False
                    second = WorkerProcess.start(settings, tmp_path / "worker-2.log")
                    await asyncio.to_thread(second.wait_ready)
                    await publishing
                    await tail.until(_all_final(tail, events), "final for every event after the restart")
                    await tail.settle(3.0)
                    return tail.records, await asyncio.to_thread(second.metrics)

            records, metrics2 = _run(main())
        finally:
            if stopped:
                os.kill(broker, signal.SIGCONT)
            for w in (first, second):
                if w is not None:
                    w.stop()
    log2 = second.log_text()
    print(f"{len(records)} records for {len(events)} events\n{first.log_text()[-1500:]}\n{log2[-1500:]}")
    assert first.proc.returncode == -signal.SIGKILL
    copies = Counter((r["session_id"], r["event_id"], r["revision"]) for r in records)
    repeated = sorted(k for k, n in copies.items() if n > 1)
    finals = [k for k in repeated if any(r["final"] for r in records if (r["session_id"], r["event_id"], r["revision"]) == k)]
    assert not repeated, f"{len(repeated)} records on the topic twice ({len(finals)} finals): {repeated[:5]}"
    _assert_contract(records, events)
    # the scenario did happen: records of the killed worker landed and were not sent again
    assert metric_value(metrics2, "tagger_label_repeats_suppressed_total") > 0, log2[-3000:]
