"""``WorkerService`` (the worker's batch loop, timers and readiness) on the in-memory session
store, with a producer stand-in that records what would go to Kafka and can fail its acks.
The real broker and Redis are exercised by test_worker_integration.py and ``tagger chaos``;
here each failure is injected exactly where it matters: a dependency failing is retried or
held in memory and never becomes a dead letter, deltas survive a failed save, and timers
survive any exception."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from types import SimpleNamespace

import pytest

from stream import in_doubt
from stream.app import DUPLICATE_RUN_WARN, WorkerService, _RateLimit
from stream.tools.publisher import replay_messages
from stream.session_store import MemorySessionStore, StoreUnavailable
from stream.settings import Settings
from trainer.artifacts import promote
from trainer.loading import read_events


class Producer:
    """Records sends; ``fail_acks`` sends in a row get a failed ack (a broker going away);
    while ``hold`` is set no ack comes at all (a broker that stopped answering), and every
    send is kept in ``held``."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.fail_acks = 0
        self.fail_at: set[int] = set()   # these sends (0-based, over all calls) get a failed ack
        self.calls = 0
        self.failed: list[tuple[str, bytes | None, bytes]] = []
        self.hold = False
        self.held: list[tuple[str, bytes | None, bytes]] = []
        self.on_send = None   # called with each send's (topic, key) before it goes out

    async def send(self, topic, key, value, partition, timestamp, headers):
        fut = asyncio.get_running_loop().create_future()
        call, self.calls = self.calls, self.calls + 1
        if self.on_send is not None:
            self.on_send(topic, key)
        if self.hold:
            self.held.append((topic, key, value))
            return fut
        if self.fail_acks > 0 or call in self.fail_at:
            from aiokafka.errors import KafkaTimeoutError
            self.fail_acks = max(0, self.fail_acks - 1)
            self.failed.append((topic, key, value))
            fut.set_exception(KafkaTimeoutError("no ack"))
        else:
            self.sent.append((topic, key, value))
            fut.set_result(self._landed_at(topic, key))
        return fut

    def _landed_at(self, topic, key):
        """The RecordMetadata of the last record sent: partitioned by key like aiokafka's
        default partitioner over the settings' 4 partitions, offsets counted per partition."""
        from aiokafka.partitioner import murmur2
        partition = (murmur2(key) & 0x7FFFFFFF) % 4 if key else 0
        offset = sum(1 for t, k, _ in self.sent if t == topic and self.partition(k) == partition) - 1
        return SimpleNamespace(topic=topic, partition=partition, offset=offset)

    @staticmethod
    def partition(key):
        from aiokafka.partitioner import murmur2
        return (murmur2(key) & 0x7FFFFFFF) % 4 if key else 0

    def land_held(self):
        """The broker, answering again, appends the requests it held (no ack reaches anyone)."""
        self.sent.extend(self.held)
        self.held = []

    def read_back(self, wanted, sids):
        """What ``stream.in_doubt.read_landed`` finds in the records sent so far."""
        found = {}
        for (topic, partition), frm in wanted.items():
            log = [v for t, k, v in self.sent if t == topic and (partition is None or self.partition(k) == partition)]
            for v in log[frm or 0:]:
                rec = json.loads(v)
                if rec["session_id"] in sids:
                    found.setdefault(rec["session_id"], {})[in_doubt.identity(rec)] = in_doubt.digest(rec)
        return found

    def records(self, topic):
        return [json.loads(v) for t, _, v in self.sent if t == topic]


class FlakyStore(MemorySessionStore):
    """The in-memory store; ``fail_saves`` saves in a row raise as a Redis NOPERM/OOM would."""

    def __init__(self):
        super().__init__()
        self.fail_saves = 0
        self.full_rewrites = 0
        self.fail_idle: BaseException | None = None

    async def save(self, snapshots, window, **kw):
        if snapshots and all(snap.get("replace") for snap in snapshots):
            self.full_rewrites += 1
        if self.fail_saves > 0:
            self.fail_saves -= 1
            raise StoreUnavailable("Redis unavailable while saving sessions: ResponseError: OOM command not allowed")
        await super().save(snapshots, window, **kw)

    async def idle(self, partition, older_than, limit=1000):
        if self.fail_idle is not None:
            raise self.fail_idle
        return await super().idle(partition, older_than, limit)


@pytest.fixture
def service(tmp_path, tiny_model):
    root = tmp_path / "artifacts"
    promote(tiny_model, root)
    settings = Settings(artifacts_dir=root.resolve(), inactivity_s=5, web_port=0)
    producer = Producer()
    store = FlakyStore()
    svc = WorkerService(SimpleNamespace(producer=producer), settings, store=store, limit_logs=False)
    asyncio.run(svc.start())
    svc.assigned = {0}
    svc.producer, svc.mem = producer, store
    yield svc
    svc.executor.shutdown(wait=False)


@pytest.fixture(scope="module")
def messages(heldout_log):
    frame, _ = read_events(heldout_log, require_label=False)
    msgs, _ = replay_messages(frame, sessions=4)
    return msgs


def _events(msgs, start=0, key=None):
    out = []
    for i, m in enumerate(msgs, start):
        k = str(m["session_id"]).encode() if key is None else key(m)
        out.append(SimpleNamespace(value=json.dumps(m).encode(), message=SimpleNamespace(
            topic="tagger.events", partition=0, offset=i, key=k, timestamp=None)))
    return out


def _keys(msgs):
    return {(str(m["session_id"]), str(m["event_id"])) for m in msgs if m.get("type") != "session_end"}


def _finals(svc):
    """Events with a final record; a resent batch repeats records exactly (deduplicable by
    revision), but no event may have two different finals."""
    recs = svc.producer.records(svc.settings.output_topic)
    unique = {(r["session_id"], r["event_id"], r["revision"]) for r in recs if r["final"]}
    c = Counter((sid, eid) for sid, eid, _ in unique)
    assert set(c.values()) <= {1}, "an event got two different final records"
    return set(c)


def test_a_batch_is_labelled_and_written_through(service, messages):
    asyncio.run(service.handle(_events(messages)))
    assert _finals(service) == _keys(messages)
    assert not service.producer.records(service.settings.dlq_topic)
    assert set(service.mem.meta) == {str(m["session_id"]) for m in messages}
    assert service.dependencies()["redis"]


def test_at_debug_level_each_batch_logs_where_its_time_went(service, messages, caplog):
    """The lines `tagger bench`'s profile stage splits a batch's time with."""
    from stream.tools.bench import batch_phases
    caplog.set_level(logging.DEBUG, logger="tagger.worker")
    evs = _events(messages)
    asyncio.run(service.handle(evs))
    b = batch_phases(caplog.text)
    assert b["batches"] == 1 and b["events_max"] == len(evs)
    assert b["share"]["model (executor)"] > 0 and b["share"]["Redis save"] > 0
    assert sum(b["share"].values()) == pytest.approx(1.0, abs=1e-2)


def test_a_failed_save_loses_no_delta_and_dead_letters_nothing(service, messages):
    """A save refused by Redis (OOM, NOPERM, READONLY) keeps the sessions in memory and
    rewrites them in full later: the store ends up with every event id and the window."""
    half = len(messages) // 2
    service.mem.fail_saves = 1
    asyncio.run(service.handle(_events(messages[:half])))
    assert service._store_stale and not service.dependencies()["redis"]
    service._last_rewrite = 0.0
    asyncio.run(service.handle(_events(messages[half:], start=half)))
    assert not service._store_stale
    assert not service.producer.records(service.settings.dlq_topic)
    for sid in {str(m["session_id"]) for m in messages}:
        sent = {str(m["event_id"]) for m in messages if str(m["session_id"]) == sid and m.get("type") != "session_end"}
        assert service.mem.ids[sid] == sent, sid
    assert service.metrics.infra_errors.labels(component="redis")._value.get() >= 1


def test_saved_deltas_are_cleared_only_after_the_save(service, messages):
    """A failing save used to clear the deltas (snapshot) before it ran: the next delta
    save then wrote a window and an id set with holes."""
    sid = Counter(str(m["session_id"]) for m in messages).most_common(1)[0][0]
    first = [m for m in messages if str(m["session_id"]) == sid and m.get("type") != "session_end"]
    service.mem.fail_saves = 1
    asyncio.run(service.handle(_events(first[:3])))
    sess = service.live.sessions[sid]
    assert len(sess.new_ids) == 3, "the deltas of a failed save were dropped"


def test_failed_acks_are_retried_never_dead_lettered(service, messages):
    service.producer.fail_acks = 3
    asyncio.run(service.handle(_events(messages)))
    assert _finals(service) == _keys(messages)
    assert not service.producer.records(service.settings.dlq_topic)
    assert service.metrics.dlq.labels(reason="processing_error")._value.get() == 0
    assert service.metrics.infra_errors.labels(component="kafka")._value.get() >= 1
    assert service.metrics.events.labels(result="duplicate")._value.get() == 0


def test_a_retry_resends_only_the_unacknowledged_records_in_session_order(service, messages):
    """One ack lost in the middle of a batch: the retry must not repeat the records the broker
    took before it (a consumer would see duplicates), and resends the session of the lost
    record from that record on, in order, so the last record of every event is its final."""
    service.producer.fail_at = {3}
    asyncio.run(service.handle(_events(messages)))
    recs = service.producer.records(service.settings.output_topic)
    ids = [(r["session_id"], r["event_id"], r["revision"]) for r in recs]
    sessions_before = {r["session_id"] for r in recs[:3]}
    failed = json.loads(service.producer.failed[0][2])["session_id"]   # its ack was lost
    repeated = {i[0] for i in ids if ids.count(i) > 1}
    # only the session whose ack was lost may repeat records (from that record on, to keep
    # its order); the three acknowledged before it, of other sessions, are not sent again
    assert repeated <= {failed} and not (sessions_before - {failed}) & repeated
    assert len(sessions_before - {failed}) >= 2
    assert _finals(service) == _keys(messages)
    last: dict = {}
    for r in recs:                       # a consumer keeps the last record per event: the final
        last[(r["session_id"], r["event_id"])] = r
    assert all(r["final"] for r in last.values())
    assert service.metrics.infra_errors.labels(component="kafka")._value.get() >= 1


def test_a_stop_while_a_batch_waits_for_its_acks_sends_nothing_twice_and_saves_none_of_it(
        service, messages):
    """SIGTERM during a broker outage, while a batch waits for acks that do not come. Its
    records are in the producer's queue already: sending them again would put a second copy
    there, and both arrive if the broker answers before the process is gone (exact repeats
    of finals). Its sessions must not be written to Redis either, even by the full rewrite
    that follows a Redis failure: memory is ahead of the delivered labels, and the next
    owner would skip the batch's events as already seen (finals lost)."""
    async def main():
        service.producer.hold = True
        batch = asyncio.create_task(service.handle(_events(messages)))
        for _ in range(200):
            if service.producer.held and service.unacknowledged:
                break
            await asyncio.sleep(0.05)
        assert service.producer.held, "the batch never reached the producer"
        assert not await service.drain(0.3)   # the batch holds on: the broker is unreachable
        service._store_stale = True           # and Redis had failed before: stop() rewrites
        await service.stop()
        batch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batch

    asyncio.run(main())
    sends = Counter((t, k, v) for t, k, v in service.producer.held)
    assert sends and max(sends.values()) == 1, "stop() sent a record a second time"
    assert not service.mem.meta, "sessions of an undelivered batch were written to the store"


def _stop_with_the_batch_unacknowledged(service, evs):
    """SIGTERM while the broker holds ``evs``' label records without acknowledging them."""
    async def main():
        service.producer.hold = True
        batch = asyncio.create_task(service.handle(evs))
        for _ in range(200):
            if service.producer.held and service.unacknowledged:
                break
            await asyncio.sleep(0.05)
        assert service.producer.held, "the batch never reached the producer"
        assert not await service.drain(0.3)
        await service.stop()
        batch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batch
    asyncio.run(main())
    service.producer.hold = False


def _next_owner(service):
    """A second worker on the same store and broker; its read-backs are recorded."""
    reads = []

    async def read_landed(wanted, sids):
        reads.append((dict(wanted), set(sids)))
        return service.producer.read_back(wanted, sids)
    nxt = WorkerService(SimpleNamespace(producer=service.producer), service.settings, store=service.mem,
                        limit_logs=False, read_landed=read_landed)
    asyncio.run(nxt.start())
    nxt.assigned = {0}
    nxt.producer, nxt.mem = service.producer, service.mem
    return nxt, reads


def _redelivered_to_the_next_owner(service, messages, half, landed):
    """The broker answers again, having appended the held label records (``landed``) or not;
    the next owner is redelivered ``messages[half:]``. Each record must be on the topic once
    and every event must have one final. Returns the next owner and its read-backs."""
    if landed:
        service.producer.land_held()
    else:
        service.producer.held = []
    nxt, reads = _next_owner(service)
    asyncio.run(nxt.handle(_events(messages[half:], start=half)))   # the redelivered batch
    recs, copies = _copies(service)
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1][:5]
    finals = Counter((r["session_id"], r["event_id"]) for r in recs if r["final"])
    assert set(finals) == _keys(messages) and set(finals.values()) == {1}
    return nxt, reads


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_records_a_stopped_worker_left_unacknowledged_are_on_the_label_topic_once(service, messages, landed):
    """A worker stops while the broker holds its last batch's label records; once the broker
    answers again it may append them (``landed``) or not. The next owner is redelivered the
    batch and labels it again: each record must be on the topic exactly once either way,
    and every event must have exactly one final."""
    half = len(messages) // 2
    asyncio.run(service.handle(_events(messages[:half])))
    acked = Counter(service.producer.partition(k) for t, k, _ in service.producer.sent
                    if t == service.settings.output_topic)
    _stop_with_the_batch_unacknowledged(service, _events(messages[half:], start=half))
    marked = {sid: list(ms) for sid, ms in service.mem.doubts.items()}
    assert marked, "no marker for the records in doubt"
    for ms in marked.values():   # read back from where this worker's acknowledged output ended
        assert all(m["from"] == acked.get(m["partition"]) for m in ms)
    nxt, reads = _redelivered_to_the_next_owner(service, messages, half, landed)
    assert reads and set().union(*(sids for _, sids in reads)) == set(marked)
    assert not service.mem.doubts, "the markers outlived their resolution"
    assert nxt.metrics.repeats_suppressed._value.get() == (sum(
        len(m["records"]) for ms in marked.values() for m in ms) if landed else 0)


def _kill_with_the_output_unacknowledged(service, step):
    """SIGKILL while the broker holds the label records of ``step()`` (a batch or an idle
    sweep) without acknowledging them: nothing of the worker runs after that, no stop()."""
    async def main():
        service.producer.hold = True
        task = asyncio.create_task(step())
        for _ in range(200):
            if service.producer.held and service.unacknowledged:
                break
            await asyncio.sleep(0.05)
        assert service.producer.held, "the output never reached the producer"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    asyncio.run(main())
    service.producer.hold = False


def _copies(service):
    recs = service.producer.records(service.settings.output_topic)
    return recs, Counter((r["session_id"], r["event_id"], r["revision"]) for r in recs)


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_records_a_killed_worker_left_unacknowledged_are_on_the_label_topic_once(service, messages, landed):
    """SIGKILL while the broker holds a batch's label records: no stop() runs, so only what
    was in the store before the send can tell the next owner that they may have landed.
    Every record must be on the topic once, every event have exactly one final."""
    half = len(messages) // 2
    asyncio.run(service.handle(_events(messages[:half])))
    _kill_with_the_output_unacknowledged(service, lambda: service.handle(_events(messages[half:], start=half)))
    assert not service.mem.doubts   # no stop-time marker: the process was gone
    nxt, reads = _redelivered_to_the_next_owner(service, messages, half, landed)
    assert reads, "the next owner never read the label topic back"
    assert not service.mem.ahead and not service.mem.doubts, "markers outlived their resolution"
    assert (nxt.metrics.repeats_suppressed._value.get() > 0) == landed


class _Consumer:
    """What the sweep asks Faust's consumer after an assignment: the log end of the first
    fetch (None before one answered), the group's committed offset (and the last offset
    read, which the lag gauge reads too)."""

    def __init__(self, topic, end, committed):
        from faust.types import TP
        self.tp = TP(topic, 0)
        self.end, self._committed_offset, self._read_offset = end, {self.tp: committed}, {}

    def assignment(self):
        return [self.tp]

    def highwater(self, tp):
        return self.end


def test_a_new_owner_finalises_no_idle_session_before_reading_the_partitions_backlog(service, messages):
    """The chaos drill's two_workers failure (CI, 2026-12-05): a worker is killed with a
    batch's records landed but its sessions not saved; the new owner's idle sweep ran before
    it read the redelivered batch, found the stored sessions idle and finalised them from the
    older state, so one (event, revision) reached the topic with two contents. Now the
    sweep leaves the partition's sessions alone until the backlog the first fetch reported
    is processed; then every record is on the topic once and every event has one final."""
    open_only = [m for m in messages if m.get("type") != "session_end"]
    ends = [m for m in messages if m.get("type") == "session_end"]
    half = len(open_only) // 2
    asyncio.run(service.handle(_events(open_only[:half])))
    _kill_with_the_output_unacknowledged(service, lambda: service.handle(_events(open_only[half:], start=half)))
    service.producer.land_held()
    for part in service.mem.open.values():   # the stored sessions look idle to the next owner
        for sid in part:
            part[sid] -= 60
    nxt, _ = _next_owner(service)
    consumer = _Consumer(service.settings.input_topic, end=None, committed=half)
    nxt.app = SimpleNamespace(producer=service.producer, consumer=consumer)
    asyncio.run(nxt.on_assigned([consumer.tp]))
    before = len(service.producer.records(service.settings.output_topic))
    asyncio.run(nxt.sweep())                   # no fetch answered yet
    consumer.end = len(open_only)              # the first fetch: the redelivered batch is there
    asyncio.run(nxt.sweep())
    assert len(service.producer.records(service.settings.output_topic)) == before, \
        "idle sessions were finalised before the partition's backlog was read"
    asyncio.run(nxt.handle(_events(open_only[half:], start=half)))
    asyncio.run(nxt.handle(_events(ends, start=len(open_only))))
    recs, copies = _copies(service)
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1][:5]
    finals = Counter((r["session_id"], r["event_id"]) for r in recs if r["final"])
    assert set(finals) == _keys(messages) and set(finals.values()) == {1}
    asyncio.run(nxt.sweep())
    assert nxt.catch_up.partitions == [], "the partition was still held after its backlog"


def test_a_successor_killed_while_resolving_sends_none_of_what_either_worker_landed(service, heldout_log):
    """Worker A dies with a batch of session S1 in flight (its records land). B is
    redelivered it in two smaller batches, together with new events of S2, which shares S1's
    label partition: B's acknowledged output on that partition ends past A's records before
    it loads S1, and after B's batch of S1 part of A's records are still to be seen again.
    B dies with its next batch in flight. C must send again none of the records A or B landed: B's markers must
    neither start after A's records nor be removed while some of them are still in doubt."""
    frame, _ = read_events(heldout_log, require_label=False)
    msgs, _ = replay_messages(frame, sessions=12)
    by_sid = {}
    for m in msgs:
        if m.get("type") != "session_end":
            by_sid.setdefault(str(m["session_id"]), []).append(m)
    same = {}
    for sid, ms in by_sid.items():
        if len(ms) >= 6:
            same.setdefault(service.producer.partition(sid.encode()), []).append(sid)
    s1, s2 = next(sids for sids in same.values() if len(sids) >= 2)[:2]
    m1, m2 = by_sid[s1], by_sid[s2]
    ev = lambda ms, start: _events(ms, start=start)  # noqa: E731
    asyncio.run(service.handle(ev(m1[:2] + m2[:2], 0)))
    _kill_with_the_output_unacknowledged(service, lambda: service.handle(ev(m1[2:6], 4)))
    service.producer.land_held()
    b, _ = _next_owner(service)
    asyncio.run(b.handle(ev(m2[2:3], 4)))                  # B's output on the partition goes on
    asyncio.run(b.handle(ev(m1[2:4] + m2[3:4], 5)))
    _kill_with_the_output_unacknowledged(b, lambda: b.handle(ev(m1[4:6] + m2[4:6], 8)))
    service.producer.land_held()
    c, reads = _next_owner(service)
    ends = [m for m in msgs if m.get("type") == "session_end" and str(m["session_id"]) in (s1, s2)]
    asyncio.run(c.handle(ev(m1[4:] + m2[4:] + ends, 8)))
    recs, copies = _copies(service)
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1][:5]
    finals = Counter((r["session_id"], r["event_id"]) for r in recs if r["final"])
    assert set(finals) == _keys(m1 + m2) and set(finals.values()) == {1}
    assert not service.mem.ahead and not service.mem.doubts   # closed: resolved


def test_finals_of_an_idle_sweep_a_killed_worker_left_unacknowledged_are_sent_once(service, messages):
    """The same for the inactivity finals of the idle sweep: the next owner's sweep finds
    the sessions idle in the store and finalises them again; the finals that landed are not
    sent twice."""
    open_only = [m for m in messages if m.get("type") != "session_end"]
    asyncio.run(service.handle(_events(open_only)))
    for sess in service.live.sessions.values():
        sess.last_seen -= 60
    for part in service.mem.open.values():
        for sid in part:
            part[sid] -= 60
    _kill_with_the_output_unacknowledged(service, service.sweep)
    service.producer.land_held()
    nxt, reads = _next_owner(service)
    asyncio.run(nxt.sweep())
    recs, copies = _copies(service)
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1][:5]
    finals = Counter((r["session_id"], r["event_id"]) for r in recs if r["final"])
    assert set(finals) == _keys(open_only) and set(finals.values()) == {1}
    assert reads and not service.mem.ahead


def test_markers_are_in_the_store_before_a_send_and_gone_with_the_save(service, messages):
    """The write-ahead marker of every session with label records is durable before the
    first of them is sent, and removed by the save that follows their acknowledgement: a
    worker that keeps running leaves none, and its successor reads nothing back."""
    missing = []

    def check(topic, key):
        if topic == service.settings.output_topic and key.decode() not in service.mem.ahead:
            missing.append(key)
    service.producer.on_send = check
    asyncio.run(service.handle(_events(messages)))
    assert service.producer.records(service.settings.output_topic) and not missing
    assert not service.mem.ahead and not service._ahead
    nxt, reads = _next_owner(service)
    asyncio.run(nxt.handle(_events(messages)))   # a replay after a clean handover
    assert not reads


def test_a_store_that_refuses_the_markers_holds_no_labels_and_dead_letters_nothing(service, messages):
    """Redis failing (OOM, NOPERM, gone) when the markers are written: the batch is
    labelled from memory as with any store failure, counted as a Redis error."""
    async def refuse(markers):
        raise StoreUnavailable("Redis unavailable while writing write-ahead markers: OOM command not allowed")
    service.mem.mark_ahead = refuse
    asyncio.run(service.handle(_events(messages)))
    assert _finals(service) == _keys(messages)
    assert not service.producer.records(service.settings.dlq_topic)
    assert service.metrics.infra_errors.labels(component="redis")._value.get() >= 1
    # as after a failed save, Redis is rewritten in full from memory (a Redis that refused a
    # write may have restarted empty): the rewrite saves replace whole sessions
    assert service.mem.full_rewrites, "no full rewrite after the failed marker write"
    assert set(service.mem.meta) == {str(m["session_id"]) for m in messages} and not service._store_stale


def test_a_record_that_landed_with_other_content_is_sent_again(service, messages):
    """A successor that labels differently (another model version) emits its own records:
    suppression is only for exact repeats."""
    half = len(messages) // 2
    asyncio.run(service.handle(_events(messages[:half])))
    _stop_with_the_batch_unacknowledged(service, _events(messages[half:], start=half))
    held = []
    for t, k, v in service.producer.held:
        rec = json.loads(v)
        rec["model_version"] = "older"
        held.append((t, k, json.dumps(rec).encode()))
    service.producer.held = held
    service.producer.land_held()
    n_before = len(service.producer.records(service.settings.output_topic))
    nxt, reads = _next_owner(service)
    asyncio.run(nxt.handle(_events(messages[half:], start=half)))
    resent = service.producer.records(service.settings.output_topic)[n_before:]
    assert reads and len(resent) == len(held)
    assert not service.mem.doubts


def test_no_marker_no_read_back(service, messages):
    """Sessions without a marker never cost a read of the label topic."""
    nxt, reads = _next_owner(service)
    asyncio.run(nxt.handle(_events(messages)))
    assert _finals(service) == _keys(messages) and not reads


def test_a_message_keyed_by_another_session_or_by_nothing_is_dead_lettered(service, messages):
    evs = _events(messages[:3], key=lambda m: b"someone-else")
    evs += _events(messages[3:5], start=3, key=lambda m: None)
    asyncio.run(service.handle(evs))
    letters = service.producer.records(service.settings.dlq_topic)
    assert [d["reason"] for d in letters] == ["key_mismatch"] * 5
    assert "someone-else" in letters[0]["detail"] and "no key" in letters[3]["detail"]
    assert not service.producer.records(service.settings.output_topic)


def test_no_session_is_finalised_as_idle_while_the_broker_is_away(service, messages):
    """During a broker outage sessions look idle because nothing can reach the worker; an
    inactivity final then would be revised by the events still waiting upstream. So the
    sweep finalises nothing while the broker is away, and gives the backlog one full timeout
    after it is back."""
    open_only = [m for m in messages if m.get("type") != "session_end"]
    asyncio.run(service.handle(_events(open_only)))
    before = len(_finals(service))
    assert before < len(_keys(messages))                   # some events wait for their final
    service._infra_failed("kafka", ConnectionError("broker gone"), "test")  # as a failed send does
    for sess in service.live.sessions.values():
        sess.last_seen -= 60                                 # idle for a minute
    asyncio.run(service.sweep())
    assert len(_finals(service)) == before
    service._broker_up()                                     # a probe or a send succeeds again
    asyncio.run(service.sweep())
    assert len(_finals(service)) == before                   # the backlog may still arrive
    service._broker_back_at -= 60
    asyncio.run(service.sweep())
    assert _finals(service) == _keys(messages)


def test_timers_survive_any_exception(service, messages, tmp_path):
    service.mem.fail_idle = RuntimeError("boom")
    asyncio.run(service.sweep())
    service.mem.fail_idle = None
    assert service.metrics.timer_errors.labels(timer="sweep")._value.get() == 1
    # a malformed manifest (KeyError/ValueError in load_artifact) is a rejected model
    bad = tmp_path / "bad_model"
    import shutil
    shutil.copytree(service.holder.current.path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["calibration"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    from stream.tools.chaos import point_at
    point_at(service.settings.artifacts_dir, bad)
    asyncio.run(service.poll_model())
    assert service.metrics.model_swaps.labels(result="rejected")._value.get() == 1
    assert service.metrics.timer_last_run.labels(timer="model_poll")._value.get() > 0
    asyncio.run(service.sweep())
    assert service.metrics.timer_last_run.labels(timer="sweep")._value.get() > 0


def test_the_idle_sweep_drops_orphans_of_the_open_index(service, messages):
    """Index members whose session keys expired must not starve real idle sessions."""
    import time
    now = time.time()
    service.mem.open[0] = {f"orphan-{i}": now - 60 for i in range(5)}           # meta gone
    service.mem.open[0].update({f"ancient-{i}": now - 10 * 3600 for i in range(5)})  # past the TTL
    asyncio.run(service.sweep())
    assert service.mem.open[0] == {}


def test_a_long_run_of_duplicates_is_reported(service, messages, caplog):
    evs = _events(messages)
    asyncio.run(service.handle(evs))
    caplog.set_level(logging.WARNING, logger="tagger.worker")
    for _ in range(DUPLICATE_RUN_WARN // len(_keys(messages)) + 1):
        asyncio.run(service.handle(evs))
    assert service.metrics.duplicate_runs._value.get() == 1
    assert service.metrics.duplicate_run._value.get() >= DUPLICATE_RUN_WARN
    assert "dropped as duplicates" in caplog.text and "TAGGER_REDIS_PREFIX" in caplog.text


def test_memory_bounds_hold(tmp_path, tiny_model, messages):
    from stream.tagging import LiveTagger
    from stream.records import parse_event
    from trainer.artifacts import load_artifact
    tagger = LiveTagger(load_artifact(tiny_model), max_sessions=2, max_ids=10)
    evs = [parse_event(json.dumps(m).encode()) for m in messages if m.get("type") != "session_end"]
    for ev in evs:
        tagger.process([ev])
        assert len(tagger.sessions) <= 2 or not tagger.evict_enabled
    assert tagger.n_ids == sum(len(s.ids) for s in tagger.sessions.values())
    assert tagger.n_ids <= 10 + max(len(s.ids) for s in tagger.sessions.values())
    assert len(tagger.evicted) <= tagger.evicted.maxlen


def test_closed_sessions_leave_no_per_session_state_behind(service, messages):
    """A worker that has seen sessions open and close holds nothing of them afterwards (the
    30-minute soak grew 0.16 MB a minute while the label partition of every session ever
    seen stayed cached)."""
    sids = {str(m["session_id"]) for m in messages}
    assert any(m.get("type") == "session_end" for m in messages)
    asyncio.run(service.handle(_events(messages)))
    closed = {str(m["session_id"]) for m in messages if m.get("type") == "session_end"}
    assert closed and closed <= sids
    assert not closed & service.live.sessions.keys()
    assert not closed & service._ahead.keys()


def test_label_partition_cache_is_bounded(tmp_path, tiny_model, messages, monkeypatch):
    """The write-ahead markers' cache of session key hashes keeps the most recently labelled
    sessions only, however many sessions pass, and the partition it gives is the producer's
    (murmur2 over the label topic's partitions, as many as the producer's metadata says once
    it has them)."""
    from aiokafka.partitioner import murmur2

    import stream.app as app_module
    monkeypatch.setattr(app_module, "PARTITION_CACHE_MAX", 3)
    root = tmp_path / "artifacts"
    promote(tiny_model, root)
    settings = Settings(artifacts_dir=root.resolve(), inactivity_s=5, web_port=0, partitions=4)
    svc = WorkerService(SimpleNamespace(producer=Producer()), settings, store=FlakyStore(), limit_logs=False)
    asyncio.run(svc.start())
    svc.assigned = {0}
    try:
        renamed = [{**m, "session_id": f"{m['session_id']}-{copy}"} for copy in range(4) for m in messages]
        sids = {m["session_id"] for m in renamed}
        assert len(sids) >= 12
        asyncio.run(svc.handle(_events(renamed)))
        info = svc._key_hash.cache_info()
        assert info.misses >= len(sids) and info.currsize == 3
        for sid in sids:
            assert svc._label_partition(sid.encode()) == (murmur2(sid.encode()) & 0x7FFFFFFF) % 4
        # once the producer knows the label topic (8 partitions here), cached keys follow it
        topic = settings.output_topic
        svc.app.producer._producer = SimpleNamespace(_metadata=SimpleNamespace(
            partitions_for_topic=lambda t: set(range(8)) if t == topic else None))
        for sid in sids:
            assert svc._label_partition(sid.encode()) == (murmur2(sid.encode()) & 0x7FFFFFFF) % 8
    finally:
        svc.executor.shutdown(wait=False)


def test_repeated_warnings_are_rate_limited():
    f = _RateLimit(every_s=30.0)
    rec = lambda: logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "Unable connect to %s", ("x",), None)  # noqa: E731
    assert [f.filter(rec()) for _ in range(100)].count(True) == 1
    info = logging.LogRecord("aiokafka", logging.INFO, __file__, 1, "fine", (), None)
    assert f.filter(info)
    # the worker's own lines (each model rejection, say) are never held back here
    own = lambda: logging.LogRecord("tagger.worker", logging.ERROR, __file__, 1, "model swap rejected: %s", ("x",), None)  # noqa: E731
    assert all(f.filter(own()) for _ in range(3))


def test_session_ttl_must_outlive_the_inactivity_timeout():
    from trainer.errors import ConfigError
    with pytest.raises(ConfigError, match="TAGGER_SESSION_TTL_S"):
        Settings(session_ttl_s=300, inactivity_s=300)


def test_the_worker_consumer_takes_its_fetch_wait_from_the_setting(monkeypatch):
    """TAGGER_FETCH_MAX_WAIT_MS reaches the consumer the worker's Faust app builds (a floor on
    every label's latency on tansu), and a nonsensical value is refused by name."""
    from trainer.errors import ConfigError
    from stream import settings as settings_module
    from stream.settings import faust_broker_settings
    # faust_broker_settings sets it for the process: restored afterwards whatever happens here
    monkeypatch.setattr(settings_module, "_fetch_max_wait_ms", settings_module._fetch_max_wait_ms)
    with pytest.raises(ConfigError, match="TAGGER_FETCH_MAX_WAIT_MS"):
        Settings.from_env({"TAGGER_FETCH_MAX_WAIT_MS": "0"})
    import faust

    async def consumer_wait(env: dict) -> int:
        settings = Settings.from_env(env)
        app = faust.App("fetch-wait-test", **faust_broker_settings(settings))
        thread = app.consumer._thread  # noqa: SLF001 - the consumer thread Faust would start
        return thread._create_worker_consumer(app.transport)._fetch_max_wait_ms  # noqa: SLF001

    assert asyncio.run(consumer_wait({"TAGGER_FETCH_MAX_WAIT_MS": "35"})) == 35
    assert asyncio.run(consumer_wait({})) == Settings().fetch_max_wait_ms == 20


def test_a_swap_to_another_label_set_mid_stream_is_what_a_consumer_sees(service, messages,
                                                                        tiny_model_relabelled):
    """Hot swap to a retrain with one step merged into another and one renamed (a shorter,
    shifted label list), with sessions open across the swap. A consumer reading the labels
    topic sees every event finalised once, each record naming a step of the model that
    wrote it (``model_version``), the new model's records after the swap, and none of the
    removed steps from it."""
    from stream.tools.chaos import RELABEL
    from trainer.artifacts import load_artifact

    old, new = load_artifact(service.holder.root), load_artifact(tiny_model_relabelled)
    assert set(old.labels) - set(new.labels) == set(RELABEL) and old.version != new.version
    events = [m for m in messages if m.get("type") != "session_end"]
    ends = [m for m in messages if m.get("type") == "session_end"]
    half = len(events) // 2
    asyncio.run(service.handle(_events(events[:half])))
    before = len(service.producer.records(service.settings.output_topic))
    promote(tiny_model_relabelled, service.holder.root)
    asyncio.run(service.poll_model())
    asyncio.run(service.handle(_events(events[half:] + ends, start=half)))

    recs = service.producer.records(service.settings.output_topic)
    assert _finals(service) == _keys(messages)
    assert not service.producer.records(service.settings.dlq_topic)
    labels_of = {old.version: set(old.labels), new.version: set(new.labels)}
    for r in recs:
        assert r["step_name"] is None or r["step_name"] in labels_of[r["model_version"]], r
    after = recs[before:]
    assert after and {r["model_version"] for r in after} == {new.version}
    assert not {r["step_name"] for r in after} & set(RELABEL)
    # sessions open across the swap: events labelled by the old model are finalised by the new one
    old_first = {(r["session_id"], r["event_id"]) for r in recs[:before]}
    assert any(r["final"] and (r["session_id"], r["event_id"]) in old_first for r in after)
    assert service.metrics.model_swaps.labels(result="ok")._value.get() == 1


# ---- overlap: a batch is tagged while the last one's output is in flight -----------------

class GatedProducer(Producer):
    """Acks come only when ``release()`` is called (a broker that takes its time), until
    ``gated`` is set to False."""

    def __init__(self):
        super().__init__()
        self.waiting: list = []
        self.gated = True

    async def send(self, topic, key, value, partition, timestamp, headers):
        if not self.gated or self.fail_acks > 0 or self.calls in self.fail_at:
            return await super().send(topic, key, value, partition, timestamp, headers)
        fut = asyncio.get_running_loop().create_future()
        self.calls += 1
        self.waiting.append((fut, (topic, key, value)))
        return fut

    def release(self):
        for fut, sent in self.waiting:
            self.sent.append(sent)
            fut.set_result(self._landed_at(sent[0], sent[1]))
        self.waiting = []


def _labels(records):
    """Label records less what differs between two runs (when, and the model's promotion)."""
    return [{k: v for k, v in r.items() if k not in ("emitted_at", "model_version")} for r in records]


def _batches(msgs, size):
    return [_events(msgs[i:i + size], start=i) for i in range(0, len(msgs), size)]


def _serial_records(tiny_model, tmp_path, msgs, size):
    """The label records a worker without overlap sends for ``msgs`` in batches of ``size``."""
    root = tmp_path / "serial"
    promote(tiny_model, root)
    svc = WorkerService(SimpleNamespace(producer=Producer()), Settings(artifacts_dir=root.resolve(), inactivity_s=5,
                        web_port=0, overlap=False), store=FlakyStore(), limit_logs=False)

    async def main():
        await svc.start()
        acked = []

        async def ack(ev):
            acked.append(ev)
        for batch in _batches(msgs, size):
            await svc.handle(batch, ack)
            assert acked[-len(batch):] == batch, "without overlap a batch is acknowledged by the time handle returns"
    asyncio.run(main())
    svc.executor.shutdown(wait=False)
    return svc.app.producer.records(svc.settings.output_topic), svc.store


def test_with_overlap_the_next_batch_is_tagged_while_the_last_ones_acks_are_awaited(
        service, messages, tiny_model, tmp_path):
    """The point of the overlap, and its rules: batch 2 is tagged while batch 1's label
    records wait for their acks; batch 2's records are sent only after batch 1's are acked
    and saved (a session's records in order); an input event is acknowledged only once its
    batch's output is delivered and its sessions saved; and the records are exactly those of
    a worker that handles one batch at a time."""
    producer = service.producer = service.app.producer = GatedProducer()
    size = 9
    b1, b2, *rest = _batches(messages, size)
    first2 = {(str(m["session_id"]), str(m["event_id"])) for m in messages[size:2 * size] if m.get("type") != "session_end"}
    acked = []

    async def ack(ev):
        m = json.loads(ev.value)
        sid = str(m["session_id"])
        if m.get("type") != "session_end":
            assert any(r["session_id"] == sid and r["event_id"] == str(m["event_id"])
                       for r in producer.records(service.settings.output_topic)), "acknowledged before its label"
            assert str(m["event_id"]) in service.mem.ids.get(sid, ()), "acknowledged before its session was saved"
        acked.append(ev)

    async def main():
        await service.handle(b1, ack)            # returns with its output in flight
        for _ in range(400):
            if producer.waiting:
                break
            await asyncio.sleep(0.01)
        assert producer.waiting and not acked
        second = asyncio.create_task(service.handle(b2, ack))
        for _ in range(400):                     # batch 2 gets tagged meanwhile
            seen = {(sid, eid) for sid, s in service.live.sessions.items() for eid in s.ids}
            if first2 <= seen:
                break
            await asyncio.sleep(0.01)
        assert first2 <= seen, "batch 2 was not tagged while batch 1 waited for its acks"
        n_waiting = len(producer.waiting)
        await asyncio.sleep(0.05)
        assert not second.done() and len(producer.waiting) == n_waiting, \
            "batch 2 sent before batch 1 was acknowledged"
        assert not acked
        producer.release()                       # batch 1 delivered: saved, acknowledged
        await second
        assert acked == b1
        producer.gated = False
        producer.release()
        for batch in rest:
            await service.handle(batch, ack)
        await asyncio.wait_for(service.settle(), 10)
        assert acked == [ev for batch in [b1, b2, *rest] for ev in batch]

    asyncio.run(main())
    serial, serial_store = _serial_records(tiny_model, tmp_path, messages, size)
    assert _labels(producer.records(service.settings.output_topic)) == _labels(serial)
    assert service.mem.ids == serial_store.ids and service.mem.meta.keys() == serial_store.meta.keys()
    assert _finals(service) == _keys(messages)


def test_with_overlap_a_failed_ack_of_the_batch_in_flight_loses_and_doubles_no_label(
        service, messages, tiny_model, tmp_path):
    """The broker fails an ack of batch 1 while batch 2 is tagged: batch 2's tagging is undone
    and redone after batch 1 is delivered (from the state batch 1 saved), so consumers see
    the same labels as from a worker without overlap, each event acknowledged once."""
    size = 9
    service.producer.fail_at = {4}
    acked = Counter()

    async def ack(ev):
        acked[(ev.message.partition, ev.message.offset)] += 1

    async def main():
        for batch in _batches(messages, size):
            await service.handle(batch, ack)
        await asyncio.wait_for(service.settle(), 30)

    asyncio.run(main())
    assert service.metrics.infra_errors.labels(component="kafka")._value.get() >= 1
    assert set(acked.values()) == {1} and len(acked) == len(messages)
    serial, _ = _serial_records(tiny_model, tmp_path, messages, size)
    key = lambda r: (r["session_id"], r["event_id"], r["revision"])  # noqa: E731
    got = {key(r): r for r in _labels(service.producer.records(service.settings.output_topic))}
    assert got == {key(r): r for r in _labels(serial)}, "not the labels of a worker without overlap"
    assert _finals(service) == _keys(messages)
    assert not service.producer.records(service.settings.dlq_topic)


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_with_overlap_a_stop_with_the_batch_in_flight_leaves_it_unacknowledged_and_in_doubt(
        service, messages, landed):
    """SIGTERM while the broker holds the label records of the batch in flight (``handle``
    has returned, the next batch would be tagged meanwhile): none of its input is
    acknowledged, its records are marked in doubt, and the next owner, redelivered the
    batch, puts each record on the topic once and gives every event one final."""
    half = len(messages) // 2
    acked = []

    async def ack(ev):
        acked.append(ev)

    async def main():
        await service.handle(_events(messages[:half]), ack)
        await asyncio.wait_for(service.settle(), 10)
        service.producer.hold = True
        await service.handle(_events(messages[half:], start=half), ack)   # returns: its output in flight
        for _ in range(200):
            if service.producer.held:
                break
            await asyncio.sleep(0.05)
        assert service.producer.held, "the batch never reached the producer"
        await service.stop()

    asyncio.run(main())
    service.producer.hold = False
    assert len(acked) == half, "input of the batch in flight was acknowledged"
    assert service.mem.doubts, "no marker for the records in doubt"
    _redelivered_to_the_next_owner(service, messages, half, landed)
