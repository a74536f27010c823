"""The tagger on a real Redis Cluster (three masters started from the machine's redis-server,
see the ``redis_cluster_url`` fixture): the session store reads back what it wrote whatever
node a session lands on, the live tagger evicts sessions to the cluster and resumes them from
it, and two workers of one consumer group sharing the cluster give every event its final."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter, defaultdict

import pytest
import redis
from hypothesis import given, settings as hyp_settings, strategies as st
from redis.crc import key_slot

from stream.records import EventIn
from stream.redis_client import is_cluster, sync_client
from stream.tools.replay import frame_events
from stream.session_store import MemorySessionStore, RedisSessionStore, session_key
from stream.settings import Settings
from stream.tagging import LiveTagger
from tests.stream.test_session_store import snap, write_ahead_steps
from trainer.artifacts import load_artifact
from trainer.errors import ConfigError
from trainer.loading import read_events


def with_cluster(url, fn):
    """Run ``fn(store)`` on a cluster-backed store under a fresh key prefix; delete its keys."""
    async def go():
        prefix = f"tagger-test:{uuid.uuid4().hex[:8]}:"
        store = RedisSessionStore(url, prefix=prefix, ttl_s=120, closed_ttl_s=30)
        try:
            return await fn(store), prefix
        finally:
            await store.close()
    return asyncio.run(go())


def _cleanup(url: str, prefix: str) -> dict[int, int]:
    """Delete the prefix's keys; returns how many lived on each node (port -> keys)."""
    client = sync_client(url)
    try:
        per_node = Counter()
        for node in client.get_primaries():
            conn = redis.Redis(host=node.host, port=node.port)
            keys = list(conn.scan_iter(match=f"{prefix}*", count=1000))
            per_node[node.port] = len(keys)
            for k in keys:  # one DEL per key: keys of different slots may not share a command
                conn.delete(k)
            conn.close()
        return dict(per_node)
    finally:
        client.close()


def test_cluster_urls_are_settings_and_bad_ones_are_refused():
    s = Settings(redis_url="redis+cluster://:pw@10.0.0.5:7000")
    assert is_cluster(s.redis_url) and s.redacted()["redis_url"] == "redis+cluster://:***@10.0.0.5:7000"
    assert is_cluster("rediss+cluster://cache:7000/0") and not is_cluster("redis://cache:6379/0")
    with pytest.raises(ConfigError, match="only database 0"):
        Settings(redis_url="redis+cluster://10.0.0.5:7000/3")
    with pytest.raises(ConfigError, match="TAGGER_REDIS") as err:
        Settings(redis_url="cluster://:secret@10.0.0.5:7000")
    assert "secret" not in str(err.value)


@hyp_settings(max_examples=300, deadline=None)
@given(sid=st.text(min_size=1, max_size=30), prefix=st.sampled_from(["tagger:", "t{x}:", "a{b:", ""]))
def test_every_key_of_a_session_is_in_one_slot(sid, prefix):
    slots = {key_slot(session_key(prefix, sid, part).encode()) for part in ("meta", "win", "ids", "doubt", "wal")}
    assert len(slots) == 1


def test_an_unreachable_cluster_is_store_unavailable_not_a_crash():
    """What the worker needs to carry on from memory (and not dead-letter the batch)."""
    from stream.session_store import StoreUnavailable
    from stream.redis_client import answers as _redis_answers
    from stream.tools.processes import free_port

    url = f"redis+cluster://127.0.0.1:{free_port()}"
    store = RedisSessionStore(url, prefix="tagger-test:none:")

    async def go():
        try:
            with pytest.raises(StoreUnavailable):
                await store.load(["a"])
            with pytest.raises(StoreUnavailable):
                await store.save([snap("a", 1, raw=[{"i": 0}], ids=["e0"])], 8)
            return await store.ping()
        finally:
            await store.close()
    assert asyncio.run(go()) is False
    assert _redis_answers(url) is False


@pytest.mark.integration
def test_store_on_the_cluster_reads_back_as_in_memory(redis_cluster_url):
    raw = [{"event_id": f"e{i}", "event_name": f"Open ü {i}"} for i in range(10)]
    sids = [f"sess-{i}" for i in range(40)]
    steps = [[snap(sid, 3, raw=raw[:3], ids=["e0", "e1", "e2"], partition=i % 4, last_seen=float(i))
              for i, sid in enumerate(sids)],
             [snap(sid, 7, raw=raw[3:7], ids=["e3", "e4", "e5", "e6"], partition=i % 4, last_seen=100.0 + i)
              for i, sid in enumerate(sids[:20])],
             [snap(sids[0], 7, raw=raw[4:7], ids=["e4", "e5", "e6"], replace=True, last_seen=200.0)],
             [snap(sid, 3, closed=True, partition=i % 4) for i, sid in enumerate(sids[30:], 30)]]

    async def go(store):
        for batch in steps[:2]:
            await store.save(batch, 5)
        await store.client.script_flush()  # a restarted cluster has no scripts on any node
        for batch in steps[2:]:
            await store.save(batch, 5)
        return (await store.load(sids + ["missing"]), await store.idle(1, 50.0), await store.idle(2, 1000.0),
                await store.ping())

    (loaded, idle1, idle2, ping), prefix = with_cluster(redis_cluster_url, go)
    per_node = _cleanup(redis_cluster_url, prefix)
    mem = MemorySessionStore()

    async def twin():
        for batch in steps:
            await mem.save(batch, 5)
        return await mem.load(sids + ["missing"])
    assert loaded == asyncio.run(twin())
    assert [w["event_id"] for w in loaded[sids[1]][1]] == ["e2", "e3", "e4", "e5", "e6"]
    assert [w["event_id"] for w in loaded[sids[0]][1]] == ["e4", "e5", "e6"]  # rewritten whole
    assert loaded[sids[35]][1] == [] and loaded[sids[35]][0]["closed"] is True
    # partition 1: sessions 1, 5, 9, ... last seen at their index, the first 20 again at 100+
    assert sorted(idle1) == sorted(f"sess-{i}" for i in range(21, 30, 4))
    assert sorted(idle2) == sorted(f"sess-{i}" for i in range(2, 30, 4))  # closed ones left
    assert ping is True
    assert len(per_node) == 3 and min(per_node.values()) > 0, per_node  # spread over every master


@pytest.mark.integration
def test_write_ahead_markers_on_the_cluster_behave_as_in_memory(redis_cluster_url):
    """Markers set, read back, removed inside the save script and by DEL, on whichever
    node each session lives."""
    got, prefix = with_cluster(redis_cluster_url, write_ahead_steps)
    _cleanup(redis_cluster_url, prefix)
    assert got == asyncio.run(write_ahead_steps(MemorySessionStore()))


@pytest.mark.integration
def test_live_tagger_evicts_to_the_cluster_and_resumes_from_it(redis_cluster_url, tiny_model, heldout_log):
    """A tagger that holds only 4 sessions in memory, writing every batch through to the
    cluster and reading back the sessions it does not hold (as the worker does), labels
    interleaved sessions exactly like one that holds them all."""
    lm = load_artifact(tiny_model)
    frame, _ = read_events(heldout_log)
    by_session = list(frame_events(frame).items())[:10]
    stream: list[EventIn] = []
    queues = [list(evs) + [EventIn(sid, "", "", 0.0, "", "session_end", {})] for sid, evs in by_session]
    while any(queues):
        for q in queues[:5] if any(queues[:5]) else queues[5:]:
            if q:
                stream.append(q.pop(0))
    batches = [stream[i:i + 3] for i in range(0, len(stream), 3)]

    reference = LiveTagger(lm)
    expected = [r for b in batches for r in reference.process(b).records]

    async def go(store):
        tagger = LiveTagger(lm, max_sessions=3)
        records, restored = [], 0
        for b in batches:
            missing = list({e.session_id for e in b} - tagger.sessions.keys())
            for sid, (meta, window, ids) in (await store.load(missing)).items():
                tagger.restore(meta, window, ids)
                restored += 1
            out = tagger.process(b)
            records += out.records
            await store.save([tagger.snapshot(s) for s in out.touched if s in tagger.sessions],
                             tagger.window_size)
            tagger.drop([s for s in out.closed if tagger.sessions[s].closed])
        return records, restored, len(tagger.evicted)

    (records, restored, evicted), prefix = with_cluster(redis_cluster_url, go)
    _cleanup(redis_cluster_url, prefix)
    assert evicted > 10 and restored > 10  # the cluster really carried sessions between batches
    finals = Counter((r["session_id"], r["event_id"]) for r in records if r["final"])
    assert len(finals) == sum(len(evs) for _, evs in by_session) and set(finals.values()) == {1}
    revisions = defaultdict(list)
    for r in records:
        revisions[(r["session_id"], r["event_id"])].append(r["revision"])
    assert all(v == list(range(len(v))) for v in revisions.values())

    def final_labels(recs):
        return {(r["session_id"], r["event_id"]): (r["step_name"], r["abstained"]) for r in recs if r["final"]}
    assert final_labels(records) == final_labels(expected)


@pytest.mark.integration
def test_two_workers_in_one_group_on_the_cluster_give_every_event_one_final(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log, redis_cluster_url):
    """Two ``faust -A stream.app worker`` processes in one consumer group, sessions in the
    cluster: once the group has split the partitions, traffic to all of them gets exactly one
    final history per event (repeats, if a rebalance replays a batch, are exact copies)."""
    from stream.tools.processes import free_port
    from tests.helpers import serving_root
    from tests.stream.test_worker_integration import (Tail, _assert_contract, _metric, _publish, _run,
                                                      _traffic, _wait_for)

    root = serving_root(tmp_path, tiny_model)
    settings = settings_factory(artifacts_dir=root, inactivity_s=30, redis_url=redis_cluster_url)
    ports = [free_port(), free_port()]
    workers = [faust_worker(dataclasses.replace(settings, web_port=p)) for p in ports]
    messages, events, _ = _traffic(heldout_log, 16)

    def split() -> bool:  # both members hold partitions, and together all of them
        held = [_metric(p, "tagger_assigned_partitions") for p in ports]
        return min(held) >= 1 and sum(held) == settings.partitions

    async def main():
        for w in workers:
            await asyncio.to_thread(w.wait_ready, 120)
        await _wait_for(split, "both workers holding partitions", timeout_s=120)
        async with Tail(settings, settings.output_topic) as tail:
            await _publish(settings, messages)
            await tail.until(lambda: {(r["session_id"], r["event_id"]) for r in tail.records if r["final"]}
                             >= set(events), "final for every event", timeout_s=120)
            await tail.settle()
            return tail.records

    records = _run(main(), 360)
    unique: dict[tuple[str, str, int], dict] = {}
    for r in records:
        k = (r["session_id"], r["event_id"], r["revision"])
        if k in unique:
            same = ("step_name", "abstained", "final", "seq", "model_version")
            assert {f: unique[k][f] for f in same} == {f: r[f] for f in same}, (unique[k], r)
        unique.setdefault(k, r)
    _assert_contract(sorted(unique.values(), key=lambda r: (r["session_id"], r["seq"], r["revision"])), events)
    accepted = [_metric(p, 'tagger_events_total{result="accepted"}') for p in ports]
    assert min(accepted) > 0 and sum(accepted) >= len(events), accepted  # both did work
    for w in workers:
        assert w.proc.poll() is None and "Traceback" not in w.log_text()
    stored = _cleanup(redis_cluster_url, settings.redis_prefix)  # the sessions went to the cluster
    assert sum(stored.values()) >= len({sid for sid, _ in events}), stored


@pytest.mark.integration
def test_a_cluster_started_in_a_relative_folder_comes_up(tmp_path, monkeypatch):
    """``tagger bench`` starts its cluster under its relative default folder (runs/bench):
    redis-server moves into --dir before it opens its cluster config file, so a relative path
    used to point nowhere and every node exited at start-up."""
    from stream.tools.stack import local_redis_cluster
    monkeypatch.chdir(tmp_path)
    with local_redis_cluster("runs/bench/redis-cluster") as cluster:
        client = sync_client(cluster["url"])
        try:
            client.set("tagger-test:relative", "1")
            assert client.get("tagger-test:relative") == b"1"
            client.delete("tagger-test:relative")
        finally:
            client.close()
    assert list((tmp_path / "runs/bench/redis-cluster").glob("node-*/nodes.conf"))
