"""The Redis session store against the test services' real Redis (the ``redis_url`` fixture),
side by side with its in-memory twin: the same snapshots must read back the same, whatever
path wrote them. Keys go under the test's ``redis_prefix``, deleted afterwards."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from stream.session_store import MemorySessionStore, RedisSessionStore


def snap(sid, n, *, raw=(), ids=(), closed=False, replace=False, partition=3, last_seen=100.0):
    return {"session_id": sid, "n": n, "ctx": {"prev_ts": 1.5, "recent_ids": [["A1"]]}, "closed": closed,
            "pending": [{"seq": n - 1, "event_id": f"e{n - 1}", "revision": 0}], "model_version": "v1",
            "last_seen": last_seen, "partition": partition, "new_raw": list(raw), "new_ids": list(ids),
            "held": [], "max_ts": None, **({"replace": True} if replace else {})}


@pytest.fixture
def with_redis(redis_url, redis_prefix, redis_client):
    """``run(fn)``: ``fn(store)`` on a Redis store under this test's key prefix (its keys are
    deleted by ``redis_client`` afterwards)."""
    def run(fn):
        async def go():
            store = RedisSessionStore(redis_url, prefix=redis_prefix, ttl_s=120, closed_ttl_s=30)
            try:
                return await fn(store)
            finally:
                await store.close()
        return asyncio.run(go())
    return run


@pytest.fixture
def run_both(with_redis):
    """``run(steps, window, sids)``: every batch of snapshots applied to the Redis store and to
    the in-memory one; what each loads back."""
    def run(steps, window, sids):
        async def go(store):
            for batch in steps:
                await store.save(batch, window)
            return await store.load(sids)
        return with_redis(go), asyncio.run(go(MemorySessionStore()))
    return run


def test_deltas_window_trim_and_ids_read_back_as_in_memory(run_both):
    raw = [{"event_id": f"e{i}", "event_name": f"Open ü {i}"} for i in range(10)]
    steps = [[snap("a", 3, raw=raw[:3], ids=["e0", "e1", "e2"]), snap("b", 1, raw=raw[:1], ids=["e0"])],
             [snap("a", 7, raw=raw[3:7], ids=["e3", "e4", "e5", "e6"]), snap("b", 1)],
             [snap("a", 10, raw=raw[7:], ids=["e7", "e8", "e9", "e2"])]]
    in_redis, in_memory = run_both(steps, window=5, sids=["a", "b", "missing"])
    assert in_redis == in_memory
    meta, window, ids = in_redis["a"]
    assert [w["event_id"] for w in window] == ["e5", "e6", "e7", "e8", "e9"]  # the last 5
    assert ids == {f"e{i}" for i in range(10)} and meta["n"] == 10
    assert "missing" not in in_redis


def test_closing_and_a_full_rewrite_replace_what_was_there(run_both):
    raw = [{"event_id": f"e{i}"} for i in range(6)]
    steps = [[snap("a", 4, raw=raw[:4], ids=["e0", "e1", "e2", "e3"]), snap("c", 2, raw=raw[:2], ids=["e0", "e1"])],
             # after a Redis loss the worker rewrites whole sessions: stale deltas must go
             [snap("a", 6, raw=raw[3:6], ids=["e3", "e4", "e5"], replace=True)],
             [snap("c", 2, closed=True)]]
    in_redis, in_memory = run_both(steps, window=8, sids=["a", "c"])
    assert in_redis == in_memory
    assert [w["event_id"] for w in in_redis["a"][1]] == ["e3", "e4", "e5"]
    assert in_redis["a"][2] == {"e3", "e4", "e5"}
    assert in_redis["c"][1] == [] and in_redis["c"][0]["closed"] is True


def test_what_orjson_refuses_is_saved_and_read_back_too(run_both):
    """Snapshots are written with orjson; what it refuses (a lone surrogate from a JSON escape
    in a text field, an integer past 64 bits) is written with json.dumps instead, and reads
    back from Redis as it does from memory."""
    raw = [{"event_id": "e0", "fields": {"title": "Read: \ud800 x"}}, {"event_id": "e1", "count": 2 ** 70}]
    s = snap("a", 2, raw=raw, ids=["e0", "e1"])
    s["ctx"] = {**s["ctx"], "total": 2 ** 70}
    in_redis, in_memory = run_both([[s]], window=5, sids=["a"])
    assert in_redis == in_memory
    meta, window, ids = in_redis["a"]
    assert window == raw and meta["ctx"]["total"] == 2 ** 70 and ids == {"e0", "e1"}


def test_open_index_ttls_and_a_rewrite_with_many_ids(with_redis):
    many = [f"id-{i}" for i in range(12_000)]  # past what one Lua unpack() takes

    async def go(store):
        await store.save([snap("big", 12_000, raw=[{"i": i} for i in range(40)], ids=many, replace=True,
                               last_seen=50.0),
                          snap("other", 1, raw=[{"i": 0}], ids=["x"], partition=4, last_seen=500.0)], 16)
        await store.save([snap("gone", 1, raw=[{"i": 0}], ids=["y"], last_seen=10.0)], 16)
        await store.save([snap("gone", 1, closed=True, last_seen=10.0)], 16)
        c, k = store.client, store._k
        return (await c.scard(k("big", "ids")), await c.llen(k("big", "win")), await store.idle(3, 100.0),
                await store.idle(4, 100.0), await store.idle(4, 1000.0),
                [await c.ttl(k("big", part)) for part in ("meta", "win", "ids")], await c.ttl(k("gone", "meta")),
                await c.exists(k("gone", "win")))
    n_ids, n_win, idle3, idle4_early, idle4, ttls, closed_ttl, gone_win = with_redis(go)
    assert n_ids == 12_000 and n_win == 16
    assert idle3 == ["big"] and idle4_early == [] and idle4 == ["other"]  # "gone" left the index
    assert all(100 < t <= 120 for t in ttls) and 0 < closed_ttl <= 30 and gone_win == 0


def test_in_doubt_markers_accumulate_read_back_with_the_session_and_clear(with_redis):
    """Markers of two stops add up; ``load`` returns them (also for a session never saved)
    in its one round trip; they outlive the session's keys; ``clear_doubts`` removes them."""
    def marker(i):
        return {"id": f"stop-{i}", "topic": "labels", "partition": 2, "from": 10 * i, "records": [[f"e{i}", 0]]}

    async def go(store):
        await store.save([snap("a", 1, raw=[{"i": 0}], ids=["e0"])], 8)
        await store.mark_in_doubt({"a": marker(1), "new": marker(1)})
        await store.mark_in_doubt({"a": marker(2)})
        doubts, plain = {}, await store.load(["a", "new", "none"])
        found = await store.load(["a", "new", "none"], doubts=doubts)
        ttl = await store.client.ttl(store._k("a", "doubt"))
        await store.clear_doubts(["a", "new"])
        after: dict = {}
        await store.load(["a", "new"], doubts=after)
        return plain, found, doubts, ttl, after

    plain, found, doubts, ttl, after = with_redis(go)
    assert set(found) == set(plain) == {"a"} and found["a"][2] == {"e0"}
    assert doubts == {"a": [marker(1), marker(2)], "new": [marker(1)]}
    assert 120 < ttl <= 240 and after == {}

    async def mem():
        store, doubts = MemorySessionStore(), {}
        await store.mark_in_doubt({"a": marker(1)})
        await store.mark_in_doubt({"a": marker(2)})
        await store.load(["a"], doubts=doubts)
        return doubts
    assert asyncio.run(mem()) == {"a": [marker(1), marker(2)]}


def ahead_marker(frm):
    return {"id": "w", "topic": "labels", "partition": 1, "from": frm, "records": None, "at": 1.0}


async def write_ahead_steps(store):
    """Write-ahead markers through their life: set, read back with the session (after its
    stop-time markers), replaced, removed by a save (inside the script for a saved session,
    by a DEL for another), kept by a save that does not name them, cleared."""
    await store.save([snap("a", 1, raw=[{"i": 0}], ids=["e0"])], 8)
    await store.mark_in_doubt({"a": {"id": "stop", "records": [["e0", 0]]}})
    await store.mark_ahead({"a": ahead_marker(3), "b": ahead_marker(None), "c": ahead_marker(5)})
    await store.mark_ahead({"c": ahead_marker(7)})
    first: dict = {}
    await store.load(["a", "b", "c", "d"], doubts=first)
    await store.save([snap("a", 2, raw=[{"i": 1}], ids=["e1"]), snap("c", 1)], 8, unmark=["a", "b"])
    second: dict = {}
    loaded = await store.load(["a", "b", "c"], doubts=second)
    await store.clear_doubts(["a", "c"])
    third: dict = {}
    await store.load(["a", "b", "c"], doubts=third)
    return first, second, loaded["a"][0]["n"], third


def test_write_ahead_markers_read_back_with_the_session_and_go_with_its_save(with_redis):
    in_redis, in_memory = with_redis(write_ahead_steps), asyncio.run(write_ahead_steps(MemorySessionStore()))
    assert in_redis == in_memory
    first, second, n, third = in_redis
    stop = {"id": "stop", "records": [["e0", 0]]}
    assert first == {"a": [stop, ahead_marker(3)], "b": [ahead_marker(None)], "c": [ahead_marker(7)]}
    assert second == {"a": [stop], "c": [ahead_marker(7)]} and n == 2
    assert third == {}


def test_a_redis_that_lost_its_scripts_still_takes_saves(with_redis):
    async def go(store):
        await store.save([snap("a", 1, raw=[{"i": 0}], ids=["e0"])], 8)
        await store.client.script_flush()  # what a restarted Redis looks like to the script
        await store.save([snap("a", 2, raw=[{"i": 1}], ids=["e1"])], 8)
        return await store.load(["a"])
    meta, window, ids = with_redis(go)["a"]
    assert meta["n"] == 2 and window == [{"i": 0}, {"i": 1}] and ids == {"e0", "e1"}


def test_error_replies_of_redis_are_store_unavailable_and_the_acl_in_the_docs_suffices(
        redis_url, redis_prefix, redis_client):
    """A Redis that refuses a command (here NOPERM: an ACL user without the Lua commands)
    raises StoreUnavailable, which the worker holds in memory, instead of an untranslated
    ResponseError that dead-lettered labelled events; with the commands docs/operations.md
    lists the same user saves, loads, lists and prunes. The ACL user is namespaced and
    deleted afterwards."""
    import re
    from pathlib import Path

    from stream.session_store import StoreUnavailable

    ops = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    line = next(ln for ln in ops.splitlines() if ln.strip().startswith("ACL SETUSER tagger"))
    granted = [t for t in line.split() if t.startswith("+")]
    user, pw = f"tagger-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    prefix, admin = redis_prefix, redis_client
    without_lua = [g for g in granted if not re.match(r"\+(evalsha|script)", g)]
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{pw}", f"~{prefix}*", "-@all", *without_lua)
    parts = urlsplit(redis_url)   # the test Redis, as the ACL user
    url = urlunsplit(parts._replace(netloc=f"{user}:{pw}@{parts.netloc.rpartition('@')[2]}"))

    async def go(grant):
        store = RedisSessionStore(url, prefix=prefix, ttl_s=120, closed_ttl_s=30)
        try:
            if not grant:
                with pytest.raises(StoreUnavailable, match="NOPERM|NoPermission|permission"):
                    await store.save([snap("s1", 1, raw=[{"a": 1}], ids=["e0"])], 5)
                return None
            await store.save([snap("s1", 1, raw=[{"a": 1}], ids=["e0"])], 5)
            assert await store.idle(3, 1e12) == ["s1"]
            assert await store.prune_open(3, 0.0) == 0
            await store.mark_in_doubt({"s1": {"id": "x", "records": [["e0", 0]]}})   # in-doubt markers
            doubts: dict = {}
            await store.load(["s1"], doubts=doubts)
            assert doubts == {"s1": [{"id": "x", "records": [["e0", 0]]}]}
            await store.clear_doubts(["s1"])
            await store.mark_ahead({"s1": {"id": "w", "records": None}})   # write-ahead markers
            await store.save([snap("s1", 2)], 5, unmark=["s1", "s2"])
            doubts = {}
            await store.load(["s1"], doubts=doubts)
            assert doubts == {}
            return await store.load(["s1"])
        finally:
            await store.close()

    try:
        asyncio.run(go(False))
        admin.execute_command("ACL", "SETUSER", user, *granted)
        assert asyncio.run(go(True))["s1"][2] == {"e0"}
    finally:
        admin.execute_command("ACL", "DELUSER", user)   # (redis_client deletes the keys)
