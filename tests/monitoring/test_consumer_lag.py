"""``tagger_consumer_lag_messages{partition}``: what a worker reports and that it is the group's real lag.

Unit: ``WorkerService.update_lag`` over a stand-in for Faust's consumer (the three things it
reads: the assignment, each partition's high watermark, the committed and read offsets):
log end minus committed offset, the read-offset fallback before the first commit, no sample
before the first fetch, other topics ignored, revoked partitions dropped.

Integration: a real worker on the test broker gets a burst of events; its lag rises above
zero while it works through them and every partition's lag ends at exactly 0, which is what
Kafka itself says (end offsets minus the group's committed offsets).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from faust.types import TP
from prometheus_client.parser import text_string_to_metric_families

from stream.app import WorkerService
from stream.metrics import Metrics
from stream.session_store import MemorySessionStore
from stream.settings import Settings, kafka_client_kwargs
from stream.tools.processes import free_port, run_sync
from tests.helpers import make_log, serving_root

TOPIC = "tagger.events"


class ConsumerStandIn:
    """The part of ``faust.transport.consumer.Consumer`` that ``update_lag`` reads."""

    def __init__(self):
        self.assigned: set[TP] = set()
        self.highwaters: dict[TP, int] = {}
        self._committed_offset: dict[TP, int] = {}
        self._read_offset: dict[TP, int] = {}

    def assignment(self):
        return set(self.assigned)

    def highwater(self, tp):
        return self.highwaters.get(tp)


def lag_samples(metrics: Metrics) -> dict[str, float]:
    return {s.labels["partition"]: s.value for s in metrics.consumer_lag.collect()[0].samples}


@pytest.fixture
def service(tmp_path):
    consumer = ConsumerStandIn()
    metrics = Metrics.create()
    svc = WorkerService(SimpleNamespace(consumer=consumer), Settings(artifacts_dir=tmp_path),
                        metrics=metrics, store=MemorySessionStore())
    yield svc, consumer, metrics
    svc.executor.shutdown(wait=False)


def test_lag_is_log_end_minus_committed_offset(service):
    svc, consumer, metrics = service
    tps = [TP(TOPIC, p) for p in range(3)]
    consumer.assigned = {*tps, TP("tagger-worker-__assignor-__leader", 0)}
    consumer.highwaters = {tps[0]: 120, tps[1]: 50, tps[2]: 7}
    consumer._committed_offset = {tps[0]: 100, tps[1]: 50}   # committed = next offset to read
    consumer._read_offset = {tps[0]: 110, tps[1]: 49, tps[2]: 3}  # last offset handed over
    svc.update_lag()
    # p0: 20 not yet committed (10 of them read but in flight); p1 caught up; p2 never
    # committed: falls back to the last read offset + 1
    assert lag_samples(metrics) == {"0": 20.0, "1": 0.0, "2": 3.0}


def test_no_sample_before_the_first_fetch_and_revoked_partitions_disappear(service):
    svc, consumer, metrics = service
    a, b = TP(TOPIC, 0), TP(TOPIC, 1)
    consumer.assigned = {a, b}
    consumer.highwaters = {a: 10}           # b not fetched yet
    consumer._committed_offset = {a: 4, b: 0}
    svc.update_lag()
    assert lag_samples(metrics) == {"0": 6.0}
    consumer.highwaters[b] = 5
    svc.update_lag()
    assert lag_samples(metrics) == {"0": 6.0, "1": 5.0}
    consumer.assigned = {b}                  # a rebalance gave partition 0 to another worker
    svc.update_lag()
    assert lag_samples(metrics) == {"1": 5.0}, "a moved partition must not be counted twice"


def test_a_consumer_that_is_not_running_leaves_the_gauge_alone(service):
    svc, consumer, metrics = service
    a = TP(TOPIC, 0)
    consumer.assigned, consumer.highwaters, consumer._committed_offset = {a}, {a: 9}, {a: 9}
    svc.update_lag()

    def not_started():
        raise RuntimeError("consumer not started")

    consumer.assignment = not_started
    svc.update_lag()
    assert lag_samples(metrics) == {"0": 0.0}


# --------------------------------------------------------------------------- integration


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def group_lag(settings: Settings, total: int) -> dict[int, int]:
    """Kafka's own view: each partition's end offset minus the group's committed offset.

    The end offsets come from reading the topic (the high watermark of fetch responses):
    tansu answers ListOffsets(latest), aiokafka's ``end_offsets``, with the last batch's
    base offset rather than the log end, so that cannot be the reference here.
    """
    async def query():
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        tps = [TopicPartition(settings.input_topic, p) for p in range(settings.partitions)]
        reader = AIOKafkaConsumer(**kafka_client_kwargs(settings))
        await reader.start()
        try:
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            seen, deadline = 0, time.monotonic() + 30
            while seen < total and time.monotonic() < deadline:
                batch = await reader.getmany(timeout_ms=500)
                seen += sum(len(msgs) for msgs in batch.values())
            assert seen == total, f"read {seen} of {total} messages back"
            ends = {tp: reader.highwater(tp) or 0 for tp in tps}
        finally:
            await reader.stop()
        # group_id only to read the group's offsets: this consumer subscribes to nothing,
        # so it never joins the group
        group = AIOKafkaConsumer(group_id=settings.app_id, enable_auto_commit=False,
                                 **kafka_client_kwargs(settings))
        await group.start()
        try:
            return {tp.partition: ends[tp] - ((await group.committed(tp)) or 0) for tp in tps}
        finally:
            await group.stop()
    return run_sync(query())


@pytest.mark.integration
def test_a_live_worker_reports_the_group_lag(settings_factory, faust_worker, tiny_model, tmp_path):
    from stream.tools.publisher import replay

    port = free_port()
    # one event a batch, so that the worker stays behind the burst for several of the gauge's
    # 2-s refreshes (at full speed it caught up with 250 sessions in ~2 s, and no scrape saw
    # the backlog; with one event a batch, 80 sessions kept it behind for ~4 s here)
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), web_port=port, batch_max=1)
    worker = faust_worker(settings)
    worker.wait_ready()

    data = make_log(tmp_path, 160, 31, "burst.csv")
    published: dict = {}
    burst = threading.Thread(target=lambda: published.update(
        asyncio.run(replay(data, settings.kafka, settings.input_topic))))
    burst.start()  # as fast as the producer goes: the worker falls behind for a while

    lag_key = "tagger_consumer_lag_messages"
    peak, samples = 0.0, []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = scrape(port)
        lags = {dict(k)["partition"]: v for k, v in m.get(lag_key, {}).items()}
        samples.append(lags)
        peak = max(peak, sum(lags.values()))
        accepted = m.get("tagger_events_total", {}).get((("result", "accepted"),), 0)
        done = not burst.is_alive() and accepted >= published.get("events", float("inf"))
        if done and len(lags) == settings.partitions and not any(lags.values()):
            break
        time.sleep(0.25)
    burst.join()
    total = published["events"] + published["sessions"]  # events + session_end markers

    assert peak > 0, "the lag never rose while the worker worked through a burst"
    assert all(0 <= v <= total for lags in samples for v in lags.values())
    final = samples[-1]
    assert final == {str(p): 0.0 for p in range(settings.partitions)}, (
        f"a caught-up worker must report 0 on each of its partitions, got {final}")
    assert group_lag(settings, total) == {p: 0 for p in range(settings.partitions)}
