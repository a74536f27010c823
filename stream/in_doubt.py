"""Label records in doubt: sent by a worker that stopped or died before the broker acknowledged them.

Without idempotent produce (tansu refuses InitProducerId) a worker that stops while its last
batch's label records are unacknowledged cannot know whether they landed: the broker may hold
the request (paused, partitioned away) and append it later. The batch is not committed and its
sessions stay in Redis as they were before it, so the next owner of the partition labels
those events again; had the records landed, each would appear twice (an "exact repeat", a
second final of the same event). Dropping them instead could lose a final. So:

1. Write-ahead: before a batch's label records are sent, each of its sessions gets a marker
   in the store (``SessionStore.mark_ahead``; ``<prefix>s:{sid}:wal``, in the session's own
   Redis slot, one ``SET``): the label topic partition its records go to and the offset from
   which they could land (the end of the worker's last acknowledged output on that partition,
   or None when it had none: the log start). It names no identities: anything of the session
   on that partition from there on is in doubt. The worker starts the write when the batch's
   sessions are known, before the model step, and awaits it just before sending, so on the
   happy path it costs no wait. The save that follows the records' acknowledgement removes it
   (inside the save script, same round trip). A marker left behind means the worker died
   (SIGKILL, a crash) between send and save; a later batch's marker of the session keeps the
   earliest offset of any marker not yet removed.
2. At a clean stop the worker also writes a *stop-time* marker per session with records still
   unacknowledged (``SessionStore.mark_in_doubt``, ``<prefix>s:{sid}:doubt``): the same partition
   and offset, plus the identities ``(event_id, revision)`` in doubt.
3. A worker that loads a session with markers (both kinds come back in the load's round trip)
   reads that label partition from the lowest marked offset to its end (``read_landed``: a
   consumer of its own, no group) before tagging, and keeps the content digests of the
   session's records found there. In doubt (pending) are the identities a stop-time marker
   names, and, for a write-ahead marker, every identity of the session found.
4. A record it is about to emit whose identity landed with the same content is not sent again
   (tagging is deterministic for the same model version); one with other content (another
   model) or not found is sent as usual. Nothing is dropped that did not land.
5. The markers are deleted once every identity in doubt has been seen again (sent or
   suppressed) or the session closed, and its sessions were written through.

While Redis fails (the worker holds sessions in memory) no write-ahead marker is written and
the records go out anyway: the sessions' saves fail too, so a successor would resume them
from older state and repeat records regardless, and holding the output would turn a Redis
outage into a labelling outage. A Redis that restarts empty loses its markers with the
sessions. Only sessions with markers pay for the read-back; loading a session reads its
markers in the same command as its snapshot, and a session without one costs a dict lookup
per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger("tagger.worker")

# What a repeat must match to count as the same record (confidence and emitted_at may differ).
SAME_FIELDS = ("session_id", "event_id", "seq", "timestamp", "event_name", "step_name", "abstained",
               "revision", "final", "model_version")
# The read-back of a label partition: how long it may take before the batch is held and retried.
READ_TIMEOUT_S = 20.0

Identity = tuple[str, int]   # (event_id, revision) within a session


def digest(rec: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps([rec.get(k) for k in SAME_FIELDS], default=str).encode()).hexdigest()


def identity(rec: Mapping[str, Any]) -> Identity:
    return (str(rec["event_id"]), int(rec["revision"]))


@dataclass
class Doubt:
    """A session being resolved: what landed of it, and which identities are still in doubt."""

    landed: dict[Identity, str] = field(default_factory=dict)
    pending: set[Identity] = field(default_factory=set)


def markers(messages: Iterable[tuple[str, Optional[bytes], bytes]], topic: str, partition_of,
            label_end: Mapping[int, int], marker_id: str) -> dict[str, dict]:
    """One marker per session for the label records among ``messages`` (outbox entries),
    ``partition_of(key)`` giving the partition each went to."""
    out: dict[str, dict] = {}
    now = time.time()
    for t, key, value in messages:
        if t != topic or key is None:
            continue
        try:
            rec = json.loads(value)
            sid = str(rec["session_id"])
        except (ValueError, KeyError, TypeError):
            continue
        m = out.get(sid)
        if m is None:
            p = partition_of(key)
            m = out[sid] = {"id": marker_id, "topic": topic, "partition": p,
                            "from": label_end.get(p) if p is not None else None, "records": [], "at": now}
        m["records"].append(list(identity(rec)))
    return out


def spans(doubts: Mapping[str, list[dict]]) -> dict[tuple[str, Optional[int]], Optional[int]]:
    """``(topic, partition) -> offset to read from`` for the markers of ``doubts`` (the lowest;
    None: from the log start). A partition of None (unknown) means every partition."""
    out: dict[tuple[str, Optional[int]], Optional[int]] = {}
    for ms in doubts.values():
        for m in ms:
            k = (m["topic"], m.get("partition"))
            frm = m.get("from")
            if k not in out:
                out[k] = frm
            elif out[k] is not None:
                out[k] = None if frm is None else min(out[k], frm)
    return out


async def read_landed(settings, wanted: Mapping[tuple[str, Optional[int]], Optional[int]], sids: set[str],
                      timeout_s: float = READ_TIMEOUT_S) -> dict[str, dict[Identity, str]]:
    """Read each ``(topic, partition)`` of ``wanted`` from its offset to the end (the high
    watermark of the fetch responses: tansu's ListOffsets answers the last batch's base offset)
    and return, for the sessions ``sids``, the digest of every record found by identity.

    Raises ``KafkaTimeoutError`` (an infrastructure error: the batch is held and retried) when
    the broker does not answer; when it answers but the span is too long to read in
    ``timeout_s``, what was found is returned (a record not found is sent again, never lost)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaTimeoutError

    from stream.settings import kafka_client_kwargs

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100, request_timeout_ms=5000,
                                client_id=f"{settings.app_id}-in-doubt")
    found: dict[str, dict[Identity, str]] = {}
    keys = {sid.encode(): sid for sid in sids}
    try:
        await asyncio.wait_for(consumer.start(), 10.0)
        tps = []
        for (topic, partition), frm in wanted.items():
            parts = [partition] if partition is not None else sorted(
                consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
            for p in parts:
                tps.append((TopicPartition(topic, p), frm))
        consumer.assign([tp for tp, _ in tps])
        for tp, frm in tps:
            if frm is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, frm)
        todo = {tp for tp, _ in tps}
        deadline = time.monotonic() + timeout_s
        read = 0
        while todo:
            if time.monotonic() > deadline:
                if not read and any(consumer.highwater(tp) is None for tp in todo):
                    raise KafkaTimeoutError(f"no answer reading {sorted(map(str, todo))} back")
                log.warning("reading back label records in doubt took over %.0f s; %d records read, "
                            "the rest may be sent again", timeout_s, read)
                break
            batches = await consumer.getmany(*todo, timeout_ms=500)
            for tp, msgs in batches.items():
                for msg in msgs:
                    read += 1
                    sid = keys.get(msg.key) if msg.key is not None else None
                    if sid is None:
                        continue
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        rec = json.loads(msg.value)
                        if str(rec["session_id"]) == sid:
                            found.setdefault(sid, {})[identity(rec)] = digest(rec)
            for tp in list(todo):
                hw = consumer.highwater(tp)
                if hw is not None and await consumer.position(tp) >= hw:
                    todo.discard(tp)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5.0)
    return found


async def _partitions(consumer, topic: str) -> set[int]:
    parts = await consumer._client._wait_on_metadata(topic)
    return set(parts or ())
