"""Where session snapshots live between events: Redis, behind a small interface.

The worker keeps the sessions of its partitions in memory (``stream.tagging.LiveTagger``) and
writes each processed batch through to the store in one pipelined round trip; it reads a
session back only when it does not hold it (after a restart, a rebalance or a model swap).

Redis layout (every key of a session shares the hash tag ``{sid}``, so a session lives in one
Redis Cluster slot; ``TAGGER_REDIS=redis+cluster://host:port`` serves it from a cluster, see
``stream.redis_client``):

    <prefix>s:{<sid>}:meta   JSON snapshot: counts, feature context, pending labels, revisions
    <prefix>s:{<sid>}:win    list of the last W raw events (JSON), for rebuilding model state
    <prefix>s:{<sid>}:ids    set of accepted event ids (idempotency on redelivery)
    <prefix>s:{<sid>}:doubt  JSON list, one entry per stop: label records of the session a worker
                             sent but stopped before the broker acknowledged them (the label
                             topic partition, the offset they could have landed from, their
                             identities); see ``stream.in_doubt``. Deleted once resolved
    <prefix>s:{<sid>}:wal    JSON, the write-ahead marker: set before a batch's label records
                             of the session are sent (the label partition and the offset from
                             which they may land, no identities), deleted by the save that
                             follows their acknowledgement (inside the save script); one left
                             behind means the worker died in between. See ``stream.in_doubt``
    <prefix>open:<p>         sorted set: open sessions of input partition p by last activity,
                             so a worker that takes over a partition can finalise idle ones;
                             members older than the session TTL (their keys have expired) are
                             pruned by the idle sweep, and members whose meta is gone are
                             removed when the sweep finds them

All keys carry a TTL. ``MemorySessionStore`` is the in-memory twin with the same behaviour.

Every Redis failure (connection, timeout, and also error replies such as NOPERM, OOM or
READONLY) is raised as ``StoreUnavailable``: the worker holds its sessions in memory and
rewrites them when Redis takes writes again; a Redis problem never becomes a dead letter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence

import orjson

from stream.redis_client import async_client, unavailable_errors  # one server or a Redis Cluster
from stream.errors import StreamError


class StoreUnavailable(StreamError):
    """The session store could not be reached or refused the command (NOPERM, OOM, READONLY...)."""


def store_errors() -> tuple[type[BaseException], ...]:
    """What a store call may raise that means "Redis cannot serve us now": any Redis error
    reply (NOPERM, OOM, READONLY, ...) and the lost-connection errors of one server or a
    cluster. The worker holds its state in memory and retries; nothing is dead-lettered."""
    import redis.exceptions as rexc
    return (rexc.RedisError, *unavailable_errors())


def _unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"Redis unavailable while {what}: {type(exc).__name__}: {exc}")


class SessionStore(Protocol):
    async def load(self, session_ids: Sequence[str], *,
                   doubts: Optional[dict[str, list[dict]]] = None) -> dict[str, tuple[dict, list[dict], set[str]]]: ...
    async def mark_in_doubt(self, markers: Mapping[str, dict]) -> None: ...
    async def mark_ahead(self, markers: Mapping[str, dict]) -> None: ...
    async def clear_doubts(self, session_ids: Iterable[str]) -> None: ...
    async def save(self, snapshots: Sequence[Mapping[str, Any]], window: int, *,
                   unmark: Iterable[str] = ()) -> None: ...
    async def idle(self, partition: int, older_than: float, limit: int = 1000) -> list[str]: ...
    async def forget_open(self, partition: int, session_ids: Iterable[str]) -> None: ...
    async def prune_open(self, partition: int, before: float) -> int: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


def session_key(prefix: str, sid: str, part: str) -> str:
    """``<prefix>s:{<sid>}:<part>``. Redis Cluster hashes the text between the first ``{`` and
    the next ``}``; an id that starts with ``}`` would make that empty (the whole key hashed,
    each part in another slot), so such ids are tagged by their digest under ``s#`` instead."""
    if sid.startswith("}"):
        return f"{prefix}s#{{{hashlib.sha1(sid.encode()).hexdigest()}}}:{sid}:{part}"
    return f"{prefix}s:{{{sid}}}:{part}"


def _dumps(obj: Any) -> bytes | str:
    # orjson: a session's snapshot in a fraction of json.dumps' time (the write-through's CPU
    # per event ~0.71x in process, docs/performance.md). json.dumps takes what orjson refuses
    # (a lone surrogate, an integer past 64 bits). The two differ on NaN (orjson writes null),
    # which does not reach a snapshot: input with NaN is refused at parsing, and a label with
    # a confidence that is not finite is refused when it is encoded (stream.records).
    try:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(obj, separators=(",", ":"), default=str)


# Writes one session's snapshot. KEYS: meta, win, ids and, when given, the write-ahead marker
# to delete with it (one hash tag, so one Cluster slot).
# ARGV: ttl, window, closed (0/1), replace (0/1: window and ids are whole, not deltas), meta
# JSON, n (raw events that follow), the n raw events (JSON), then the new event ids.
# RPUSH/SADD go in chunks: Lua's unpack() fails past a few thousand values, and a full
# rewrite after a Redis loss carries every id of the session.
SAVE_SESSION = """
local ttl, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local closed, replace = ARGV[3] == '1', ARGV[4] == '1'
local n_raw = tonumber(ARGV[6])
redis.call('SET', KEYS[1], ARGV[5], 'EX', ttl)
if replace or closed then redis.call('DEL', KEYS[2]) end
if replace then redis.call('DEL', KEYS[3]) end
local function chunked(cmd, key, first, last)
  for i = first, last, 1000 do
    redis.call(cmd, key, unpack(ARGV, i, math.min(i + 999, last)))
  end
end
if not closed then
  if n_raw > 0 then
    chunked('RPUSH', KEYS[2], 7, 6 + n_raw)
    if redis.call('LLEN', KEYS[2]) > window then redis.call('LTRIM', KEYS[2], -window, -1) end
  end
  redis.call('EXPIRE', KEYS[2], ttl)
end
if #ARGV > 6 + n_raw then chunked('SADD', KEYS[3], 7 + n_raw, #ARGV) end
redis.call('EXPIRE', KEYS[3], ttl)
if #KEYS > 3 then redis.call('DEL', KEYS[4]) end
return 1
"""


class RedisSessionStore:
    def __init__(self, url: str, *, prefix: str = "tagger:", ttl_s: int = 3600,
                 closed_ttl_s: int = 900, client=None):
        self.client = client or async_client(url, decode_responses=False,
                                             socket_timeout=5, socket_connect_timeout=5,
                                             health_check_interval=10)
        self.prefix, self.ttl, self.closed_ttl = prefix, ttl_s, closed_ttl_s
        self._save_sha = hashlib.sha1(SAVE_SESSION.encode()).hexdigest()  # the name EVALSHA uses

    def _k(self, sid: str, part: str) -> str:
        return session_key(self.prefix, sid, part)

    def _open(self, partition: Optional[int]) -> str:
        return f"{self.prefix}open:{partition if partition is not None else 'x'}"

    async def load(self, session_ids: Sequence[str], *,
                   doubts: Optional[dict[str, list[dict]]] = None) -> dict[str, tuple[dict, list[dict], set[str]]]:
        """The stored sessions among ``session_ids``. With ``doubts`` (a dict), also fills it
        with the in-doubt markers of the sessions that have any, stop-time and write-ahead
        ones in one list (same round trip)."""
        if not session_ids:
            return {}
        try:
            pipe = self.client.pipeline(transaction=False)
            for sid in session_ids:
                if doubts is None:
                    pipe.get(self._k(sid, "meta"))
                else:  # one command for the three: same slot (the session's hash tag)
                    pipe.execute_command("MGET", self._k(sid, "meta"), self._k(sid, "doubt"), self._k(sid, "wal"))
                pipe.lrange(self._k(sid, "win"), 0, -1)
                pipe.smembers(self._k(sid, "ids"))
            res = await pipe.execute()
        except store_errors() as exc:
            raise _unavailable("loading sessions", exc) from exc
        out = {}
        for i, sid in enumerate(session_ids):
            meta, win, ids = res[3 * i:3 * i + 3]
            if doubts is not None:
                meta, stop, ahead = meta
                ms = [*(json.loads(stop) if stop else []), *([json.loads(ahead)] if ahead else [])]
                if ms:
                    doubts[sid] = ms
            if meta is None:
                continue
            out[sid] = (json.loads(meta), [json.loads(w) for w in win], {x.decode() for x in ids})
        return out

    async def mark_in_doubt(self, markers: Mapping[str, dict]) -> None:
        """Add one in-doubt marker per session (``{sid: marker}``, JSON-able) to the markers the
        session already has; they outlive the session's own keys. Plain GET/SET (a JSON list),
        so that the ACL in docs/operations.md needs no new command."""
        if not markers:
            return
        sids = list(markers)
        try:
            pipe = self.client.pipeline(transaction=False)
            for sid in sids:
                pipe.get(self._k(sid, "doubt"))
            old = await pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            for sid, prev in zip(sids, old):
                pipe.set(self._k(sid, "doubt"), _dumps([*(json.loads(prev) if prev else []), markers[sid]]),
                         ex=2 * self.ttl)
            await pipe.execute()
        except store_errors() as exc:
            raise _unavailable("marking records in doubt", exc) from exc

    async def mark_ahead(self, markers: Mapping[str, dict]) -> None:
        """Set the write-ahead marker of each session (``{sid: marker}``, JSON-able; replacing
        any it had): one pipelined round trip of plain ``SET``s, each in the session's slot.
        The save that follows the records' acknowledgement deletes them (``unmark``)."""
        if not markers:
            return
        ttl = 2 * self.ttl
        try:
            pipe = self.client.pipeline(transaction=False)
            for sid, marker in markers.items():
                pipe.execute_command("SET", self._k(sid, "wal"), _dumps(marker), "EX", ttl)
            await pipe.execute()
        except store_errors() as exc:
            raise _unavailable("writing write-ahead markers", exc) from exc

    async def clear_doubts(self, session_ids: Iterable[str]) -> None:
        """Delete the markers (stop-time and write-ahead) of these sessions."""
        keys = [self._k(sid, part) for sid in session_ids for part in ("doubt", "wal")]
        if not keys:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:  # one key per command: each session's key is in its own slot
                pipe.delete(key)
            await pipe.execute()
        except store_errors() as exc:
            raise _unavailable("clearing in-doubt markers", exc) from exc

    async def save(self, snapshots: Sequence[Mapping[str, Any]], window: int, *,
                   unmark: Iterable[str] = ()) -> None:
        """One pipelined round trip: per session one call of the ``SAVE_SESSION`` script (its
        keys share a slot), then one ``ZADD``/``ZREM`` per partition for the open index
        (another slot). Replaces seven commands per session: building and parsing them in
        redis-py was as much of the worker's time as the model. The write-ahead markers of
        the sessions in ``unmark`` go in the same round trip: inside the script for a saved
        session, a ``DEL`` for any other."""
        import redis.exceptions as rexc
        unmark = set(unmark)
        if not snapshots and not unmark:
            return
        opened: dict[str, dict[str, float]] = {}
        closed_by: dict[str, list[str]] = {}
        calls = []
        for snap in snapshots:
            sid = snap["session_id"]
            meta = {k: v for k, v in snap.items() if k not in ("new_raw", "new_ids", "replace")}
            closed = bool(snap.get("closed"))
            raw = [] if closed else [_dumps(r) for r in snap.get("new_raw") or ()]
            ids = list(snap.get("new_ids") or ())
            keys = [self._k(sid, "meta"), self._k(sid, "win"), self._k(sid, "ids")]
            if sid in unmark:
                unmark.discard(sid)
                keys.append(self._k(sid, "wal"))
            calls.append((keys,
                          [self.closed_ttl if closed else self.ttl, window, int(closed),
                           int(bool(snap.get("replace"))), _dumps(meta), len(raw), *raw, *ids]))
            index = self._open(snap.get("partition"))
            if closed:
                closed_by.setdefault(index, []).append(sid)
            else:
                opened.setdefault(index, {})[sid] = float(snap.get("last_seen") or 0)
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                # execute_command: redis-py's cluster pipeline blocks its evalsha() helper,
                # not the command; each call's keys share a slot, so it is routed like any other
                pipe.execute_command("EVALSHA", self._save_sha, len(keys), *keys, *args)
            for index, members in opened.items():
                pipe.zadd(index, members)
            for index, sids in closed_by.items():
                pipe.zrem(index, *sids)
            for index in opened:  # an index of a partition gone quiet expires with its sessions
                pipe.expire(index, self.ttl)
            for sid in unmark:  # (the saved ones were taken out above)
                pipe.delete(self._k(sid, "wal"))
            try:
                await pipe.execute()
                return
            except rexc.NoScriptError as exc:
                if attempt == 2:
                    raise _unavailable("saving sessions", exc) from exc
                # a restarted (or flushed) Redis has no scripts: load it and redo the batch;
                # every command here may be repeated (the script did nothing without itself)
                try:
                    await self.client.script_load(SAVE_SESSION)
                except store_errors() as exc2:
                    raise _unavailable("loading the save script", exc2) from exc2
            except store_errors() as exc:
                raise _unavailable("saving sessions", exc) from exc

    async def idle(self, partition: int, older_than: float, limit: int = 1000) -> list[str]:
        try:
            res = await self.client.zrangebyscore(self._open(partition), "-inf", older_than, start=0, num=limit)
        except store_errors() as exc:
            raise _unavailable("listing idle sessions", exc) from exc
        return [r.decode() for r in res]

    async def forget_open(self, partition: int, session_ids: Iterable[str]) -> None:
        ids = list(session_ids)
        if ids:
            try:
                await self.client.zrem(self._open(partition), *ids)
            except store_errors() as exc:
                raise _unavailable("updating the open-session index", exc) from exc

    async def prune_open(self, partition: int, before: float) -> int:
        """Drop index members last active before ``before`` (older than the TTL: their keys
        have expired, so nobody could resume them). Returns how many went."""
        try:
            return int(await self.client.zremrangebyscore(self._open(partition), "-inf", f"({before}"))
        except store_errors() as exc:
            raise _unavailable("pruning the open-session index", exc) from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:  # any failure means "not ready"
            return False

    async def close(self) -> None:
        await self.client.aclose()


class MemorySessionStore:
    """The in-memory twin of ``RedisSessionStore`` (same semantics, no TTL expiry)."""

    def __init__(self):
        self.meta: dict[str, dict] = {}
        self.win: dict[str, list[dict]] = {}
        self.ids: dict[str, set[str]] = {}
        self.open: dict[Any, dict[str, float]] = {}
        self.doubts: dict[str, list[dict]] = {}
        self.ahead: dict[str, dict] = {}   # the write-ahead markers (``:wal``)

    async def load(self, session_ids, *, doubts=None):
        if doubts is not None:
            for sid in session_ids:
                ms = [*self.doubts.get(sid, ()), *([self.ahead[sid]] if sid in self.ahead else [])]
                if ms:
                    doubts[sid] = json.loads(_dumps(ms))
        return {sid: (json.loads(_dumps(self.meta[sid])), list(self.win.get(sid, [])), set(self.ids.get(sid, ())))
                for sid in session_ids if sid in self.meta}

    async def mark_in_doubt(self, markers):
        for sid, marker in markers.items():
            self.doubts.setdefault(sid, []).append(json.loads(_dumps(marker)))

    async def mark_ahead(self, markers):
        for sid, marker in markers.items():
            self.ahead[sid] = json.loads(_dumps(marker))

    async def clear_doubts(self, session_ids):
        for sid in session_ids:
            self.doubts.pop(sid, None)
            self.ahead.pop(sid, None)

    async def save(self, snapshots, window, *, unmark=()):
        for sid in unmark:
            self.ahead.pop(sid, None)
        for snap in snapshots:
            sid = snap["session_id"]
            self.meta[sid] = {k: v for k, v in snap.items() if k not in ("new_raw", "new_ids", "replace")}
            if snap.get("replace"):
                self.win.pop(sid, None)
                self.ids.pop(sid, None)
            part = self.open.setdefault(snap.get("partition"), {})
            if snap.get("closed"):
                self.win.pop(sid, None)
                part.pop(sid, None)
            else:
                self.win[sid] = (self.win.get(sid, []) + list(snap.get("new_raw", [])))[-window:]
                part[sid] = float(snap.get("last_seen") or 0)
            self.ids.setdefault(sid, set()).update(snap.get("new_ids", []))

    async def idle(self, partition, older_than, limit=1000):
        found = sorted((t, sid) for sid, t in self.open.get(partition, {}).items() if t <= older_than)
        return [sid for _, sid in found[:limit]]

    async def prune_open(self, partition, before):
        part = self.open.get(partition, {})
        gone = [sid for sid, t in part.items() if t < before]
        for sid in gone:
            del part[sid]
        return len(gone)

    async def forget_open(self, partition, session_ids):
        for sid in session_ids:
            self.open.get(partition, {}).pop(sid, None)

    async def ping(self):
        return True

    async def close(self):
        pass
