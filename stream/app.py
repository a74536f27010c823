"""The live worker: the Faust app, its topics and the agent that tags events.

``faust -A stream.app worker`` (or ``tagger worker``) runs it; ``create_app(settings)`` builds
an app for tests. The app is the only global object (STYLE.md); everything else hangs off
``app.worker_service`` (a ``WorkerService``) and is built from ``Settings`` at start-up.

Per batch of input messages (``stream.batching.age_bounded_batches``): validate (bad messages go to the DLQ with the
original bytes, the reason and the source topic/partition/offset) -> load sessions this
worker does not hold from Redis -> tag in a single-thread executor (model compute stays off
the event loop) -> produce all label records at once and wait for the broker's acks ->
write the touched sessions through to Redis -> the batch's offsets are committed. A crash
anywhere before the commit replays the batch: records may repeat (same session, event and
revision, so they deduplicate) but none is lost. Before a batch's label records are sent,
its sessions get write-ahead markers in Redis (written while the model runs), removed by the
save after the acks; a worker that dies in between (or stops with records unacknowledged,
which also marks them) leaves them, and the next owner reads the label topic back instead of
sending again what landed (``stream.in_doubt``). With ``TAGGER_OVERLAP`` (on by default) the
next batch is tagged while a batch's output waits for its acks and its save: the batch's
sessions are snapshotted when its tagging ends, its offsets are committed only after both, and
the next batch's sends wait for them (``WorkerService.handle``).

Errors are classified where they happen. Bad input (and only bad input) goes to the DLQ.
Infrastructure failures never do: a Redis failure (``StoreUnavailable``: connection, timeout,
NOPERM, OOM, READONLY...) leaves the sessions in memory, rewritten to Redis in full once it
takes writes again; a Kafka failure (a send or its ack) keeps the batch's output in an outbox
that is sent again, with backoff, before anything else happens (the batch is not committed
meanwhile). The timers (idle sweep, model poll, broker probe) log and count any exception and
keep running. ``/readyz`` answers 503 within a few seconds of the broker or Redis going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import logging
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import faust
from aiokafka.partitioner import murmur2

from stream import in_doubt
from stream.batching import age_bounded_batches
from stream.catch_up import CatchUp
from stream.metrics import Metrics
from stream.model_holder import ModelHolder
from stream.records import InvalidEvent, check_key, dlq_record, encode_label, parse_event
from stream.revisions import RevisionPolicy
from stream.session_store import RedisSessionStore, SessionStore, StoreUnavailable
from stream.settings import Settings, faust_broker_settings, kafka_client_kwargs
from stream.stopping import bounded_stop_worker_class
from stream.tagging import LiveTagger

log = logging.getLogger("tagger.worker")

# A dead letter carries the original bytes base64-encoded (x4/3) plus a text preview; it must
# fit the producer's max_request_size (Faust: 1,000,000) and the broker's message.max.bytes
# (Kafka: ~1 MiB). Past this size only the head of the original is kept (the detail says so
# and gives the sha256 of the whole): a DLQ send that fails would stop the agent.
DLQ_MAX_ORIGINAL_BYTES = 512 * 1024
# A dependency counts as down for /readyz when its last successful check is older than this.
DEPENDENCY_STALE_S = 4.0
# Events in a row dropped as already seen before the worker says so (log line and metric).
DUPLICATE_RUN_WARN = 200
# Session-key hashes cached for the write-ahead markers' label partitions (murmur2 costs
# ~10 µs a key); the least recently used leave first.
PARTITION_CACHE_MAX = 10_000


def key_hash(key: bytes) -> int:
    """What aiokafka's default partitioner takes modulo the partition count of a keyed record."""
    return murmur2(key) & 0x7FFFFFFF


def infrastructure(exc: BaseException) -> Optional[str]:
    """``redis`` or ``kafka`` when ``exc`` is a failure of that dependency (retried or held in
    memory, never dead-lettered), else None (a bug or a poison message)."""
    if isinstance(exc, StoreUnavailable):
        return "redis"
    from aiokafka.errors import KafkaError
    from faust.exceptions import ProducerSendError
    if isinstance(exc, (KafkaError, ProducerSendError, asyncio.TimeoutError, ConnectionError, OSError)):
        return "kafka"
    return None


@dataclass
class Outbox:
    """A batch's output not yet acknowledged by the broker: messages to send (dead letters
    and label records, in order), the sessions to write through once they are, and what to
    count then. Sent again until it goes through; only then is the batch done."""

    messages: list[tuple[str, Optional[bytes], bytes]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    after: list[Any] = field(default_factory=list)  # callables run once delivered and persisted
    # the write of the batch's write-ahead markers (stream.in_doubt), started with the model
    # step; awaited before the first send
    ahead: Optional[asyncio.Future] = None
    # once delivered and persisted: seconds spent sending and awaiting the acks (the
    # write-ahead markers' wait included), then writing the sessions through
    timing: Optional[tuple[float, float]] = None
    # With overlap (``WorkerService.handle``), taken when the batch's tagging ended, before
    # the next batch changes its sessions: their snapshots, the deltas those hold
    # (``LiveTagger.pending_deltas``) and the sessions whose write-ahead markers the save
    # removes. None: taken when the sessions are saved (``_persist``).
    snaps: Optional[list[dict[str, Any]]] = None
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    unmark: list[str] = field(default_factory=list)
    # the batch's input events and the coroutine that acknowledges one, called for each once
    # the output is delivered and saved (overlap); None: ``handle`` acknowledges them
    acks: Optional[tuple[Any, list]] = None


class WorkerService:
    """The worker's state and its batch loop (everything but the Faust wiring)."""

    def __init__(self, app: faust.App, settings: Settings, *, metrics: Metrics | None = None,
                 store: SessionStore | None = None, policy: RevisionPolicy | None = None,
                 limit_logs: bool = True, read_landed=None):
        self.app, self.settings = app, settings
        self.limit_logs = limit_logs
        self.metrics = metrics or Metrics.create()
        self.store = store or RedisSessionStore(settings.redis_url, prefix=settings.redis_prefix,
                                                ttl_s=settings.session_ttl_s)
        self.holder = ModelHolder(settings.artifacts_dir, on_event=self._on_model_event)
        self.policy = policy or RevisionPolicy()
        self.live: Optional[LiveTagger] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagger-model")
        self.lock = asyncio.Lock()
        self.assigned: set[int] = set()
        # partitions whose backlog is not read yet since their assignment: their sessions
        # are not finalised as idle until it is (stream.catch_up)
        self.catch_up = CatchUp()
        self._finals = deque(maxlen=2000)  # recent final outcomes, for the coverage gauge
        self.started_at = time.time()
        self.model_ready = asyncio.Event()
        # A failed write-through leaves Redis behind memory (and a restarted Redis has lost
        # everything): until a full rewrite of the sessions held here succeeds, Redis cannot
        # be trusted to resume them after a crash or rebalance.
        self._store_stale = False
        self._last_rewrite = 0.0
        self._closed_unsaved: set[str] = set()
        self._outbox: Optional[Outbox] = None
        # Overlap: the flush of the last batch (sends, acks, save), running while the next
        # batch is tagged, and its outbox. What its save changes in memory (deltas handed to
        # the store, closed sessions dropped) waits in _deferred while a batch is tagged.
        self._inflight: Optional[asyncio.Future] = None
        self._inflight_box: Optional[Outbox] = None
        self._tagging = False
        self._deferred: list[Any] = []
        # the sessions of the batch being tagged, until its outbox holds their output
        self._tagging_sids: set[str] = set()
        self._duplicate_run = 0
        self._broker_ok_at: Optional[float] = None
        # inactivity is only measured while events can arrive: a failed send or broker probe
        # stops the idle sweep, and when the broker answers again the backlog gets one full
        # timeout to arrive (wall-clock time it came back; 0.0: no outage seen)
        self._broker_down = False
        self._broker_back_at: Optional[float] = 0.0
        self._redis_ok_at: Optional[float] = None
        self._probe = None  # an aiokafka client of our own for the broker check
        self._error_logged: dict[str, float] = {}
        # label records in doubt (stream.in_doubt): per label partition, the offset after this
        # worker's last fully acknowledged output there; sessions loaded with a marker
        self._label_end: dict[int, int] = {}
        self._doubts: dict[str, in_doubt.Doubt] = {}
        # sessions that may have a write-ahead marker in the store -> the offset it reads back
        # from (kept until a save after their records' acks removes it: a later batch's marker
        # must not narrow what an earlier, unsaved one covers)
        self._ahead: dict[str, Optional[int]] = {}
        # the partitioner's hash of session keys, least recently used dropped (murmur2 costs)
        self._key_hash = functools.lru_cache(maxsize=PARTITION_CACHE_MAX)(key_hash)
        self._marker_id = f"{settings.app_id}:{os.getpid()}:{time.time():.6f}"
        self._read_landed = read_landed or (lambda wanted, sids: in_doubt.read_landed(self.settings, wanted, sids))

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        import torch
        torch.set_num_threads(1)  # small per-batch work: threads cost more than they give
        loop = asyncio.get_running_loop()
        lm = await loop.run_in_executor(self.executor, self.holder.load_initial)
        self.live = LiveTagger(lm, self.policy, max_events_per_session=self.settings.max_events_per_session,
                                 lateness_s=self.settings.lateness_s,
                                 max_sessions=self.settings.max_sessions_in_memory,
                                 max_ids=self.settings.max_event_ids_in_memory)
        if self.limit_logs:
            install_log_rate_limit()
        log.info("serving model %s (lookahead %s, labels %d)", lm.version, lm.lookahead, len(lm.labels))
        # Everything loaded so far (torch, Faust, the model) lives as long as the process. Move
        # it out of the collector's view: otherwise every full collection walks those millions
        # of objects, a ~0.3 s pause every second or two under load (the p99 latency spikes).
        gc.collect()
        gc.freeze()
        self.model_ready.set()

    @property
    def unacknowledged(self) -> int:
        """Records sent (or to send) that the broker has not acknowledged yet."""
        return len(self._outbox.messages) if self._outbox is not None else 0

    async def settle(self) -> None:
        """Wait until the last batch's output is delivered and its sessions saved (with
        overlap it may still be in flight when ``handle`` returns); a broker or Redis failure
        is waited out as a batch would wait it out."""
        async with self.lock:
            await self._until_infrastructure_works(self._settle)

    async def drain(self, timeout_s: float = 2.0) -> bool:
        """Before a shutdown: wait up to ``timeout_s`` for the batch in progress and any held
        output to go through, then check the broker. True when nothing is left in flight and
        the broker answers (Faust's own stop may then commit and leave the group); False when
        the broker is unreachable, and a stop that waits for it would hang."""
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout_s)
        except asyncio.TimeoutError:
            return False   # a batch is still waiting for its acks
        try:
            try:
                await asyncio.wait_for(self._settle(), max(0.1, deadline - time.monotonic()))
                if self._outbox is not None:
                    await asyncio.wait_for(self._flush_outbox(), max(0.1, deadline - time.monotonic()))
            except Exception:
                return False
            try:
                await asyncio.wait_for(self._probe_broker(), max(1.5, deadline - time.monotonic()))
            except Exception:
                return False
            return True
        finally:
            self.lock.release()

    async def stop(self) -> None:
        """Bounded: with the broker or Redis gone, a stop must not wait for them. Output the
        broker has not acknowledged is given up, never saved as done: its batch's offsets are
        not committed and its sessions stay in Redis as of their last delivered records, so
        the next owner labels those events again (the records it emits are exact repeats of
        any that did arrive)."""
        flight = self._inflight
        if flight is not None and not flight.done():
            # the last batch's output, in flight: give it as long as a held outbox gets below
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(flight), 3.0)
        flying = flight is not None and not flight.done()
        if self._outbox is not None and not self.lock.locked() and not flying:
            # (a batch holding the lock is still waiting on these sends: sending them again
            # would put a second copy in the producer's queue)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_outbox(), 3.0)
        if self._outbox is not None:
            await self._mark_in_doubt(self._outbox)
        if self._store_stale and self.live is not None:
            self._last_rewrite = 0.0
            # last chance to hand the sessions on, but none whose output is undelivered:
            # memory is ahead of the labels for those, and the next owner would skip the events
            held = set(self._tagging_sids)
            for box in (self._outbox, self._inflight_box if flying else None):
                if box is not None:
                    held |= box.touched
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._persist([], [], skip=held), 3.0)
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._probe.close(), 2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.close(), 2.0)
        self.executor.shutdown(wait=False)

    async def _mark_in_doubt(self, box: Outbox) -> None:
        """Leave a marker in the store for each session with label records in ``box`` (sent,
        maybe landed, never acknowledged): its next owner reads them back before sending
        them again (``stream.in_doubt``)."""
        marks = in_doubt.markers(box.messages, self.settings.output_topic, self._label_partition,
                                 self._label_end, f"{self.settings.app_id}:{os.getpid()}:{time.time():.6f}")
        if not marks:
            return
        try:
            await asyncio.wait_for(self.store.mark_in_doubt(marks), 3.0)
        except Exception as exc:
            log.error("could not mark the label records of %d sessions as in doubt (%s: %s): their next "
                      "owner may send them again", len(marks), type(exc).__name__, exc)
            return
        log.warning("%d label records of %d sessions were not acknowledged: marked in doubt for their "
                    "next owner", sum(len(m["records"]) for m in marks.values()), len(marks))

    def _mark_ahead(self, session_ids) -> Optional[asyncio.Future]:
        """Start writing the write-ahead markers of sessions whose label records are about to
        be sent (``stream.in_doubt``): the label partition of each and the offset its records
        may land from. Returns the write in progress, which ``_flush_outbox`` awaits before
        sending; None while the store is failing (see ``_written_ahead``)."""
        if self._store_stale or not session_ids:
            return None
        topic, now = self.settings.output_topic, time.time()
        markers = {}
        for sid in session_ids:
            p = self._label_partition(sid.encode())
            frm = self._ahead[sid] if sid in self._ahead else self._label_end.get(p)
            self._ahead[sid] = frm
            markers[sid] = {"id": self._marker_id, "topic": topic, "partition": p, "from": frm,
                            "records": None, "at": now}
        task = asyncio.ensure_future(self.store.mark_ahead(markers))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if never awaited
        return task

    async def _written_ahead(self, box: Outbox) -> None:
        """Wait for ``box``'s write-ahead markers. One that fails does not hold the records:
        the store is failing, so the sessions' saves fail too and a successor would resume
        them from older state and repeat records anyway; holding would only turn a Redis
        outage into a labelling outage, where the worker otherwise labels from memory."""
        task, box.ahead = box.ahead, None
        try:
            await task
        except StoreUnavailable as exc:
            # like a failed save: Redis may have lost writes (a restart), so rewrite it in full
            self._write_failed(exc, "label records sent without write-ahead markers")
        except Exception as exc:  # a bug must not hold (or dead-letter) the batch
            self._log_limited("ahead", logging.ERROR, "writing write-ahead markers failed (%s: %s); label "
                              "records sent without them", type(exc).__name__, exc)

    def _label_partition(self, key: bytes) -> int:
        """The label topic partition the producer sends ``key``'s records to: aiokafka's
        default partitioner (which Faust's producer uses) over the label topic's partitions."""
        return self._key_hash(key) % self._label_partition_count()

    def _label_partition_count(self) -> int:
        """The label topic's partition count in the producer's metadata (aiokafka internals,
        read only), else the configured one (before the producer has metadata)."""
        aio = getattr(self.app.producer, "_producer", None)
        with contextlib.suppress(Exception):
            partitions = aio._metadata.partitions_for_topic(self.settings.output_topic)
            if partitions:
                return len(partitions)
        return self.settings.partitions

    def _on_model_event(self, result: str, version: str, detail: str) -> None:
        self.metrics.model_event(result, version)

    # ---- the batch loop -----------------------------------------------------------------
    async def handle(self, events: list, ack=None) -> None:
        """Process a batch. A Redis or Kafka failure is waited out (the batch is retried with
        backoff, its output kept in the outbox); any other failure processes its events one
        by one, so that a poison message goes to the DLQ (reason ``processing_error``) and the
        rest flow.

        ``ack`` (the agent's ``stream.ack``) acknowledges an input event; the batching then
        leaves that to the worker. With it and ``settings.overlap``, a batch's output is sent,
        acknowledged by the broker and saved while the next batch is tagged: ``handle``
        returns once the batch is tagged and its output queued, and its events are
        acknowledged once that output is delivered and its sessions saved. Each batch's sends
        and save start only after the previous batch's have finished, so a session's records
        stay in order and no older snapshot is written over a newer one. Without ``ack`` the
        batch is done, output and save, when ``handle`` returns."""
        # Faust starts the agent before the _Lifecycle service has loaded the model
        await self.model_ready.wait()
        overlap = ack if self.settings.overlap else None
        handed = False   # the batch's input acknowledgements went with its output in flight

        async def step() -> None:
            nonlocal handed
            handed = await self._handle(events, overlap)

        async with self.lock:
            try:
                await self._until_infrastructure_works(step)
            except Exception:
                log.exception("batch of %d failed; retrying its events one by one", len(events))
                for ev in events:
                    async def one(ev=ev) -> None:
                        try:
                            await self._handle([ev])
                        except Exception as exc:
                            if infrastructure(exc) is not None:
                                raise
                            box = Outbox()
                            self._letter(box, ev, "processing_error", f"{type(exc).__name__}: {exc}", None)
                            self._outbox = box
                            await self._flush_outbox()
                    await self._until_infrastructure_works(one)
            if self.catch_up.active:   # labelled or dead-lettered, every one
                for ev in events:
                    self.catch_up.processed(ev.message.partition, ev.message.offset)
            if ack is not None and not handed:
                for ev in events:
                    await ack(ev)

    async def _until_infrastructure_works(self, step) -> None:
        """Run ``step``; while it fails on Redis or Kafka, wait (0.5 s doubling to 5 s) and
        finish the outbox, or run ``step`` again if it failed before producing one. Other
        exceptions propagate."""
        delay = 0.5
        queued = False  # the step ran far enough to leave its output in the outbox
        retry = False
        while True:
            stepped = False
            before = None
            try:
                if retry:
                    await self._settle()   # the batch in flight (overlap) failed: its outbox first
                if self._outbox is not None and self._inflight is None:
                    await self._flush_outbox()   # an earlier output first (order per session)
                if queued:
                    return   # the failed step's output went through: it is done
                stepped, before = True, self._outbox
                await step()
                return
            except Exception as exc:
                component = infrastructure(exc)
                if component is None:
                    raise
                # (an outbox that was there before the step is the batch in flight, not its own)
                queued = queued or (stepped and self._outbox is not None and self._outbox is not before)
                self._infra_failed(component, exc, "batch held; retrying")
            retry = True
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    def _broker_up(self) -> None:
        self._broker_ok_at = time.monotonic()
        if self._broker_down:
            self._broker_down = False
            self._broker_back_at = time.time()

    def _infra_failed(self, component: str, exc: BaseException, what: str) -> None:
        self.metrics.infra_errors.labels(component=component).inc()
        if component == "kafka":
            self._broker_ok_at = None
            self._broker_down = True
        else:
            self._redis_ok_at = None
        self._log_limited(f"{component}:{what}", logging.ERROR, "%s failure (%s: %s); %s", component,
                          type(exc).__name__, exc, what)

    def _log_limited(self, key: str, level: int, msg: str, *args) -> None:
        """At most one line per ``key`` every 30 s: an outage repeats the same failure."""
        now = time.monotonic()
        if now - self._error_logged.get(key, -1e9) >= 30.0:
            self._error_logged[key] = now
            log.log(level, msg, *args)

    def _letter(self, box: Outbox, ev, reason: str, detail: str, field) -> None:
        """Queue a dead letter for ``ev`` in ``box``."""
        msg = ev.message
        raw = bytes(ev.value) if isinstance(ev.value, (bytes, bytearray)) else b""
        if len(raw) > DLQ_MAX_ORIGINAL_BYTES:
            detail = (f"{detail} [the message is {len(raw)} bytes: this dead letter keeps the first "
                      f"{DLQ_MAX_ORIGINAL_BYTES}; sha256 of all of it: {hashlib.sha256(raw).hexdigest()}]")
            raw = raw[:DLQ_MAX_ORIGINAL_BYTES]
        key = msg.key if isinstance(msg.key, (bytes, type(None))) else None
        payload = dlq_record(raw, reason, field, msg.topic, msg.partition, msg.offset, key, detail=detail)
        box.messages.append((self.settings.dlq_topic, key, payload))

        def count() -> None:
            self.metrics.dlq.labels(reason=reason).inc()
            self.metrics.events.labels(result="invalid").inc()
            log.warning("message at %s[%s]@%s sent to the DLQ: %s: %s", msg.topic, msg.partition, msg.offset,
                        reason, detail)
        box.after.append(count)

    async def _flush_outbox(self) -> None:
        """Send the outbox and wait for every ack, then write its sessions through and count
        it. Raises (and keeps the outbox) when the broker does not take it."""
        box = self._outbox
        if box is None:
            return
        t0 = time.perf_counter()
        if box.ahead is not None:
            await self._written_ahead(box)
        producer = self.app.producer
        futs = []
        try:
            for topic, key, value in box.messages:
                futs.append(await producer.send(topic, key, value, None, None, None))
            await _delivered(futs)
        except BaseException:
            # keep for the retry only what may not have arrived: per key (a session's records,
            # in order), everything from its first unacknowledged message on; what the broker
            # took before that is not sent twice
            box.messages = _unacknowledged(box.messages, futs)
            raise
        self._broker_up()
        topic = self.settings.output_topic
        for (t, _, _), fut in zip(box.messages, futs):
            md = fut.result() if t == topic else None
            if md is not None and hasattr(md, "offset") and md.offset >= self._label_end.get(md.partition, -1):
                self._label_end[md.partition] = md.offset + 1
        self._outbox = None
        t1 = time.perf_counter()
        if box.snaps is not None:
            await self._save_taken(box)
        else:
            await self._persist(box.touched, box.closed)
        box.timing = (t1 - t0, time.perf_counter() - t1)
        for fn in box.after:
            fn()
        if box.acks is not None:
            ack, events = box.acks
            for ev in events:
                await ack(ev)

    async def _settle(self) -> None:
        """Wait for the batch whose output is in flight (overlap), then finish what its save
        left for after the tagging. Raises as its flush did (its outbox is kept for a retry)."""
        await self._landed()
        self._run_deferred()

    async def _landed(self) -> None:
        """Wait for the flush in flight, if any (a cancelled wait leaves it running)."""
        flight = self._inflight
        if flight is None:
            return
        try:
            await asyncio.shield(flight)
        finally:
            if flight.done():
                self._inflight = self._inflight_box = None

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()

    async def _save_taken(self, box: Outbox) -> None:
        """``_persist`` for a batch whose snapshots were taken when its tagging ended
        (overlap). The save is the same; what it changes in memory waits while the next batch
        is tagged. Once the store has failed, the full rewrite of ``_persist`` (taken by the
        next batch, which does not overlap then) writes these sessions instead."""
        self._closed_unsaved.update(box.closed)
        if self._store_stale:
            return
        try:
            await self.store.save(box.snaps, self.live.window_size, unmark=box.unmark)
        except StoreUnavailable as exc:
            self._write_failed(exc, "sessions stay in memory and are rewritten when it is back")
            return
        self._redis_ok_at = time.monotonic()
        for sid in box.unmark:
            self._ahead.pop(sid, None)
        self._closed_unsaved.difference_update(box.closed)

        def in_memory() -> None:
            self.live.saved(box.marks)
            sessions = self.live.sessions
            # (a session the next batch reopened with a late event stays)
            self.live.drop([sid for sid in box.closed if sid in sessions and sessions[sid].closed])

        if self._tagging:
            self._deferred.append(in_memory)
        else:
            in_memory()

    async def _handle(self, events: list, ack=None) -> bool:
        """Tag a batch and deliver its output. With ``ack`` (overlap, see ``handle``) the
        tagging runs while the previous batch's output is in flight, and this batch's output is
        left in flight in turn: returns True when its input acknowledgements went with it."""
        assert self.live is not None
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        flight = self._inflight
        if flight is not None and (ack is None or flight.done()):
            await self._settle()
        candidate = self.holder.take_candidate()
        if candidate is not None:
            self._swap(candidate)
        s = self.settings
        box = Outbox()
        model_s = queue_s = 0.0
        parsed, partitions, published, sources = [], [], {}, []
        for ev in events:
            msg = ev.message
            try:
                e = parse_event(ev.value if isinstance(ev.value, (bytes, bytearray)) else bytes(ev.value or b""),
                                max_bytes=s.max_message_bytes)
                check_key(msg.key, e)
            except InvalidEvent as exc:
                self._letter(box, ev, exc.reason, exc.detail, exc.field)
                continue
            parsed.append(e)
            sources.append(ev)
            partitions.append(msg.partition)
            if e.type != "session_end":
                pub = e.fields.get("published_at")
                published[(e.session_id, e.event_id)] = float(pub) if isinstance(pub, (int, float)) else (
                    msg.timestamp if msg.timestamp else time.time())
        if parsed:
            sids = {e.session_id for e in parsed}
            missing = list(sids - self.live.sessions.keys())
            if self._inflight is not None and (self._doubts or self._store_stale
                                               or any(sid in self._ahead for sid in missing)):
                # Redis holds a missing session as of its last save (the batch in flight
                # saves only sessions held here), but resolving doubts, a rewrite or a marker
                # the flight removes wait for it
                await self._settle()
                missing = list(sids - self.live.sessions.keys())
            if missing:
                try:
                    await self._restore(missing)
                except StoreUnavailable as exc:
                    self._infra_failed("redis", exc, "continuing with in-memory state only")
            flight = self._inflight
            if flight is None:
                # written while the model runs; the send waits for it (_flush_outbox)
                box.ahead = self._mark_ahead(sids)
            else:
                # the sessions the flight's save will hold are not evicted before it has
                self.live.pinned = self._inflight_box.touched
                self._tagging = True
            t0 = time.perf_counter()
            self._tagging_sids = sids
            tagged = loop.run_in_executor(self.executor, self.live.process, parsed, partitions)
            try:
                if flight is not None:
                    await self._landed()
                    # after the flight's save, which removes the markers it covers
                    box.ahead = self._mark_ahead(sids)
                batch = await tagged
            except BaseException:
                if not tagged.done():   # the model thread still changes these sessions
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(tagged)
                self._tagging, self.live.pinned = False, frozenset()
                self._run_deferred()
                # Redis holds every session as of the last completed batch; memory may now be
                # ahead of it. Forget this batch's sessions so a retry (or the next owner)
                # resumes them from Redis and labels these events again instead of skipping
                # them as already seen. Repeated records deduplicate by revision.
                self.live.drop(sids)
                self._tagging_sids = set()
                raise
            self._tagging, self.live.pinned = False, frozenset()
            self._run_deferred()
            model_s = time.perf_counter() - t0
            for i, reason, detail in batch.rejected:
                self._letter(box, sources[i], reason, detail, "session_id")
            t1 = time.perf_counter()
            self._queue_records(box, self._not_landed(batch.records) if self._doubts else batch.records)
            queue_s = time.perf_counter() - t1
            box.touched, box.closed = set(batch.touched), set(batch.closed)
            n_ends = sum(1 for e in parsed if e.type == "session_end")

            def count() -> None:
                now = time.time()
                for rec in batch.records:
                    if rec["revision"] == 0:
                        pub = published.get((rec["session_id"], rec["event_id"]))
                        if pub is not None:
                            self.metrics.latency.observe(max(0.0, now - pub))
                self.metrics.events.labels(result="accepted").inc(batch.accepted)
                self.metrics.events.labels(result="duplicate").inc(batch.duplicates)
                self.metrics.events.labels(result="session_end").inc(n_ends)
                if batch.accepted:
                    self.metrics.inference.observe(model_s / batch.accepted)
                self.metrics.batch_size.observe(len(events))
                self._count_duplicates(batch.accepted, batch.duplicates)
            box.after.append(count)

        def phases() -> None:
            if log.isEnabledFor(logging.DEBUG):   # read by `tagger bench`'s profile
                log.debug("phases: model %.1f queue %.1f ack %.1f save %.1f ms (%d records)", 1000 * model_s,
                          1000 * queue_s, 1000 * box.timing[0], 1000 * box.timing[1], len(box.messages))
        box.after.append(phases)
        if self._inflight is not None:   # (a batch of dead letters only: nothing was tagged)
            await self._settle()
        self._outbox = box
        self._tagging_sids = set()
        overlap = ack is not None and not self._store_stale and not self._doubts
        if overlap:
            # the snapshots now, before the next batch changes these sessions
            box.marks, box.snaps = self._snapshots(box.touched)
            box.unmark = list(self._ahead)
            box.acks = (ack, events)
            self._inflight_box = box
            self._inflight = asyncio.ensure_future(self._flush_outbox())
            # (a failure is raised to whoever waits for it next: _settle)
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        else:
            await self._flush_outbox()
        self.metrics.open_sessions.set(len(self.live.sessions))
        log.debug("batch of %d in %.1f ms", len(events), 1000 * (time.perf_counter() - started))
        return overlap

    async def _restore(self, session_ids: list[str]) -> list[str]:
        """Load these sessions from the store into memory (those it has; returned). Sessions
        with label records in doubt are resolved first: their label partitions are read back
        (a Kafka failure raises before anything is restored, so a retry loads them again)."""
        doubts: dict[str, list[dict]] = {}
        found = await self.store.load(session_ids, doubts=doubts)
        resolved: dict[str, in_doubt.Doubt] = {}
        if doubts:
            t0 = time.monotonic()
            try:
                landed = await self._read_landed(in_doubt.spans(doubts), set(doubts))
            except Exception as exc:
                if infrastructure(exc) is not None:
                    raise   # the batch is held and retried until the broker can be read
                # a bug here must not turn valid events into dead letters: send everything
                # (exact repeats are possible, a loss is not)
                log.exception("reading back label records in doubt failed; sending them again")
                landed = {}
            for sid, ms in doubts.items():
                got = landed.get(sid, {})
                # a write-ahead marker names no identities: what landed of the session is in doubt
                pending = set(got) if any(m.get("records") is None for m in ms) else set()
                pending.update((str(e), int(r)) for m in ms for e, r in m.get("records") or ())
                resolved[sid] = in_doubt.Doubt(landed=got, pending=pending)
                # a new write-ahead marker of the session (which replaces the one found) must
                # read back from as early as the markers found did
                p = self._label_partition(sid.encode())
                froms = [m.get("from") for m in ms if m.get("partition") in (p, None)]
                if froms:
                    frm = None if any(f is None for f in froms) else min(froms)
                    if sid in self._ahead:
                        old = self._ahead[sid]
                        frm = None if old is None or frm is None else min(old, frm)
                    self._ahead[sid] = frm
            log.info("read back the label records in doubt of %d sessions in %.2f s: %d of %d landed",
                     len(doubts), time.monotonic() - t0,
                     sum(len(d.landed.keys() & d.pending) for d in resolved.values()),
                     sum(len(d.pending) for d in resolved.values()))
        for sid, (meta, window, ids) in found.items():
            self.live.restore(meta, window, ids)
        for sid, doubt in resolved.items():
            self._doubts[sid] = doubt
        return list(found)

    def _not_landed(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` less those of sessions in doubt that already landed with the same
        content (a stopped worker sent them; see ``stream.in_doubt``)."""
        out = []
        suppressed = 0
        for rec in records:
            doubt = self._doubts.get(rec["session_id"])
            if doubt is not None:
                ident = in_doubt.identity(rec)
                doubt.pending.discard(ident)
                if doubt.landed.get(ident) == in_doubt.digest(rec):
                    suppressed += 1
                    continue
            out.append(rec)
        if suppressed:
            self.metrics.repeats_suppressed.inc(suppressed)
            log.info("%d label records not sent again: they landed before their sender stopped", suppressed)
        return out

    async def _resolve_doubts(self, closed) -> None:
        """Delete the markers of sessions no longer in doubt (every identity seen again, or
        the session closed); after a write-through, so that a successor finds either the
        marker or the sessions' new state."""
        done, gone = [], []
        for sid, d in self._doubts.items():
            if not d.pending or sid in closed:
                done.append(sid)
            elif sid not in self.live.sessions:
                gone.append(sid)  # evicted: reloading it reads its marker again
        for sid in gone:
            del self._doubts[sid]
            self._ahead.pop(sid, None)   # its markers stay in the store, read again on reload
        if not done:
            return
        try:
            await self.store.clear_doubts(done)
        except StoreUnavailable as exc:
            self._infra_failed("redis", exc, "in-doubt markers kept; cleared later")
            return
        for sid in done:
            self._doubts.pop(sid, None)
            self._ahead.pop(sid, None)

    def _swap(self, candidate) -> None:
        old = self.live.loaded
        self.live.swap(candidate)
        del old
        # the new model lives as long as the process, like the first one (see start): out of
        # the collector's view, or every full collection walks its objects again
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info("now serving model %s", candidate.version)

    def _count_duplicates(self, accepted: int, duplicates: int) -> None:
        """Say so when a long run of events is dropped as already seen: a session store that
        outlived its broker (a new embedded stack, a recreated topic) silences the worker."""
        if accepted:
            self._duplicate_run = 0
        before = self._duplicate_run
        self._duplicate_run += 0 if accepted else duplicates
        self.metrics.duplicate_run.set(self._duplicate_run)
        if before < DUPLICATE_RUN_WARN <= self._duplicate_run:
            self.metrics.duplicate_runs.inc()
            log.warning("%d input events in a row were dropped as duplicates of events the session store "
                        "(Redis prefix %r) already holds, and none was new. If the broker or its topics "
                        "were recreated while Redis kept its state (tagger stack down/up with the machine's "
                        "Redis), republished events count as already seen: give each stack its own "
                        "TAGGER_REDIS_PREFIX, or delete the old keys", self._duplicate_run,
                        self.settings.redis_prefix)

    def _queue_records(self, box: Outbox, records: list[dict[str, Any]]) -> None:
        """Put label records in the outbox (the producer batches them into few requests) and
        count them."""
        topic = self.settings.output_topic
        kinds = {"first": 0, "revision": 0, "final": 0}
        labelled = abstained = 0
        for rec in records:
            box.messages.append((topic, rec["session_id"].encode(), encode_label(rec)))
            if rec["final"]:
                kinds["final"] += 1
                if rec["abstained"]:
                    abstained += 1
                else:
                    labelled += 1
                self._finals.append(not rec["abstained"])
            else:
                kinds["first" if rec["revision"] == 0 else "revision"] += 1
        for kind, n in kinds.items():  # once per batch, not per record
            if n:
                self.metrics.label_records.labels(kind=kind).inc(n)
        if labelled:
            self.metrics.finals.labels(outcome="labelled").inc(labelled)
        if abstained:
            self.metrics.finals.labels(outcome="abstained").inc(abstained)
        if self._finals:
            self.metrics.coverage.set(sum(self._finals) / len(self._finals))

    async def _persist(self, touched, closed, *, skip: set[str] = frozenset()) -> None:
        """Write the touched sessions through to the store (their changes since the last
        snapshot), then forget the closed ones. After a store failure every session held in
        memory is rewritten in full instead, at most once a second until it succeeds: deltas
        on top of a Redis that missed some (or restarted empty) would leave sessions no one
        could resume. Until then closed sessions stay in memory too, so that neither the idle
        sweep nor a successor finalises them a second time from stale open state in Redis."""
        self._closed_unsaved.update(closed)
        rewrite = self._store_stale
        if rewrite:
            if time.monotonic() - self._last_rewrite < 1.0:
                return
            self._last_rewrite = time.monotonic()
            sids = [sid for sid in self.live.sessions if sid not in skip]
            marks = self.live.pending_deltas(sids)
            snaps = [self._full_snapshot(sid) for sid in sids]
        else:
            marks, snaps = self._snapshots(touched)
        # Write-ahead markers that can go with this save: every output is acknowledged by
        # now (but that of ``skip``), and the store holds every session (those saved here;
        # when it was not stale, the others as of an earlier save). Sessions being resolved
        # keep theirs until _resolve_doubts.
        unmark = [sid for sid in self._ahead if sid not in skip and sid not in self._doubts
                  and (sid in marks or not rewrite)]
        try:
            await self.store.save(snaps, self.live.window_size, unmark=unmark)
        except StoreUnavailable as exc:
            self._write_failed(exc, "sessions stay in memory and are rewritten when it is back")
            return
        self._redis_ok_at = time.monotonic()
        self.live.saved(marks)
        for sid in unmark:
            del self._ahead[sid]
        if self._store_stale and not skip & self.live.sessions.keys():
            log.info("session store back: rewrote %d sessions held in memory", len(snaps))
            self._store_stale = False
            self.live.evict_enabled = True
        sessions = self.live.sessions
        closed_now = set(self._closed_unsaved)
        self.live.drop([sid for sid in self._closed_unsaved if sid in sessions and sessions[sid].closed])
        self._closed_unsaved.clear()
        if self._doubts:
            await self._resolve_doubts(closed_now)

    def _snapshots(self, touched) -> tuple[dict[str, tuple[int, int]], list[dict[str, Any]]]:
        """The touched sessions still held here: the deltas each holds and its snapshot. The
        deltas stay on the sessions until the save succeeded (``LiveTagger.saved``)."""
        marks = self.live.pending_deltas(touched)         # (only sessions held here)
        return marks, [self.live.snapshot(sid, clear=False) for sid in marks]

    def _write_failed(self, exc: StoreUnavailable, what: str) -> None:
        """A write to Redis failed: until a full rewrite of the sessions held here succeeds,
        Redis cannot be trusted to resume them (it may have missed writes, or restarted empty)."""
        self._infra_failed("redis", exc, what)
        self._store_stale = True
        self.live.evict_enabled = False  # memory holds the only copy until the rewrite

    def _full_snapshot(self, sid: str) -> dict[str, Any]:
        """A snapshot that replaces everything the store holds for the session."""
        snap = self.live.snapshot(sid, clear=False)
        sess = self.live.sessions[sid]
        snap.update(new_raw=list(sess.window), new_ids=sorted(sess.ids), replace=True)
        return snap

    # ---- timers -------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Finalise sessions idle longer than the inactivity timeout: those in memory, and
        those of this worker's partitions known only to Redis (left by a crashed worker).
        Never raises: a failure is logged (once per 30 s) and counted, and the next tick
        tries again."""
        if self.live is None:
            return
        async with self.lock:
            try:
                await self._sweep()
                self.metrics.timer_last_run.labels(timer="sweep").set(time.time())
            except Exception as exc:
                self._timer_failed("sweep", exc)

    async def _sweep(self) -> None:
        await self._settle()
        if self._outbox is not None:
            await self._flush_outbox()
        if self._store_stale:
            await self._persist([], [])
        now = time.time()
        if self._broker_down or now - (self._broker_back_at or 0.0) < self.settings.inactivity_s:
            return   # sessions look idle because nothing could reach us: finalise none yet
        held = self._catching_up(now)
        idle = [sid for sid in self.live.inactive(now, self.settings.inactivity_s)
                if self.live.sessions[sid].partition not in held]
        try:
            for p in sorted(self.assigned - held):
                # index members older than the TTL have no keys left: drop them, or they
                # would be read first (oldest first) forever and starve real idle sessions
                await self.store.prune_open(p, now - self.settings.session_ttl_s)
                stale = [sid for sid in await self.store.idle(p, now - self.settings.inactivity_s)
                         if sid not in self.live.sessions]
                found = await self._restore(stale)
                await self.store.forget_open(p, [sid for sid in stale if sid not in found])
                idle.extend(found)
        except StoreUnavailable as exc:
            self._infra_failed("redis", exc, "idle sweep of stored sessions skipped")
        if not idle:
            return
        loop = asyncio.get_running_loop()
        ahead = self._mark_ahead(idle)
        records = await loop.run_in_executor(self.executor, self.live.finalize, idle)
        if self._doubts:
            records = self._not_landed(records)
        box = Outbox(touched=set(idle), closed=set(idle), ahead=ahead)
        self._queue_records(box, records)
        self._outbox = box
        try:
            await self._flush_outbox()
        except Exception as exc:
            if infrastructure(exc) is None:
                raise
            self._infra_failed("kafka", exc, "finals of idle sessions held; sent again next tick")
            return
        log.info("finalised %d idle sessions (%d records)", len(idle), len(records))

    def _catching_up(self, now: float) -> set[int]:
        """The assigned partitions whose backlog this worker has not read yet (``CatchUp``)."""
        if not self.catch_up.active:
            return set()
        offsets = {}
        with contextlib.suppress(Exception):   # mid-rebalance: nothing can be judged yet
            offsets = self._input_offsets()
        held = set()
        for p in self.catch_up.partitions:
            end, committed, _ = offsets.get(p, (None, None, None))
            if self.catch_up.holding(p, end, committed, now):
                held.add(p)
        return held

    def _timer_failed(self, timer: str, exc: BaseException) -> None:
        self.metrics.timer_errors.labels(timer=timer).inc()
        component = infrastructure(exc)
        if component is not None:
            self._infra_failed(component, exc, f"{timer} retried next tick")
            return
        now = time.monotonic()
        if now - self._error_logged.get(f"timer:{timer}", -1e9) >= 30.0:
            self._error_logged[f"timer:{timer}"] = now
            log.error("%s failed (it runs again next tick)", timer, exc_info=exc)

    async def poll_model(self) -> None:
        """The model poll and the lag gauge; never raises (see ``sweep``)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.holder.poll)
            self.metrics.timer_last_run.labels(timer="model_poll").set(time.time())
        except Exception as exc:
            self._timer_failed("model_poll", exc)
        try:
            self.update_lag()
        except Exception as exc:
            self._timer_failed("model_poll", exc)

    async def probe(self) -> None:
        """Check the broker (a metadata request on a client of our own) and Redis (PING), for
        /readyz and ``tagger_dependency_up``; never raises."""
        try:
            await self._probe_broker()
            self._broker_up()
        except Exception as exc:
            self._broker_down = True
            self._log_limited("probe:kafka", logging.WARNING, "broker check failed: %s: %s",
                              type(exc).__name__, exc)
            if self._probe is not None:
                probe, self._probe = self._probe, None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(probe.close(), 2.0)
        try:
            if await asyncio.wait_for(self.store.ping(), 3.0) and not self._store_stale:
                self._redis_ok_at = time.monotonic()
        except Exception:
            pass
        ready = self.dependencies()
        for dep, ok in ready.items():
            self.metrics.dependency_up.labels(dependency=dep).set(1 if ok else 0)
        self.metrics.timer_last_run.labels(timer="broker_probe").set(time.time())

    async def _probe_broker(self) -> None:
        from aiokafka.client import AIOKafkaClient
        if self._probe is None:
            client = AIOKafkaClient(**kafka_client_kwargs(self.settings), request_timeout_ms=3000,
                                    client_id=f"{self.settings.app_id}-probe")
            try:
                await asyncio.wait_for(client.bootstrap(), 3.0)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            self._probe = client
            return
        await asyncio.wait_for(self._probe.fetch_all_metadata(), 3.0)

    def dependencies(self) -> dict[str, bool]:
        now = time.monotonic()
        fresh = lambda t: t is not None and now - t < DEPENDENCY_STALE_S  # noqa: E731
        return {"kafka": fresh(self._broker_ok_at), "redis": fresh(self._redis_ok_at) and not self._store_stale}

    def update_lag(self) -> None:
        """Set ``tagger_consumer_lag_messages{partition}`` for each input partition this worker holds.

        Lag is the partition's log-end offset minus the group's position in it, the LAG of
        ``kafka-consumer-groups --describe``. The log end is the high watermark that came with
        the partition's latest fetch response (``Consumer.highwater``; aiokafka fetches every
        partition whose buffer is empty, so it is fresh whenever the worker keeps up; a
        ListOffsets request would cost a round trip, and tansu answers it with the last
        batch's base offset instead of the log end). The position is the offset Faust last committed for the group: a message is acknowledged
        only after its labels are produced and acked, and acknowledged offsets are committed
        every ``broker_commit_interval``, so lag counts messages not yet labelled, not merely
        not yet fetched. Before this worker's first commit on a partition the position is
        the last offset read + 1; before the first fetch there is no sample.

        The gauge is rebuilt from the current assignment on each call (on the event loop, so
        no scrape sees it half-built): a partition that moved to another worker stops being
        reported here, and the sum over workers is the group's lag.
        """
        try:
            lags = {}
            for partition, (end, committed, read) in self._input_offsets().items():
                position = committed if committed is not None else (read + 1 if read is not None else None)
                if end is not None and position is not None:
                    lags[partition] = max(0, end - position)
        except Exception as exc:  # not started yet, or mid-rebalance: lag is observability only
            log.debug("consumer lag not updated: %r", exc)
            return
        gauge = self.metrics.consumer_lag
        gauge.clear()
        for partition, lag in sorted(lags.items()):
            gauge.labels(partition=str(partition)).set(lag)

    def _input_offsets(self) -> dict[int, tuple[Optional[int], Optional[int], Optional[int]]]:
        """Per input partition the consumer holds: (the log end from its latest fetch, the
        group's committed offset, i.e. the next to read, the last offset handed to the
        agent), each None while unknown. Raises while the consumer cannot say (not started,
        mid-rebalance)."""
        consumer = self.app.consumer
        return {tp.partition: (consumer.highwater(tp), consumer._committed_offset.get(tp),
                               consumer._read_offset.get(tp))
                for tp in consumer.assignment() if tp.topic == self.settings.input_topic}

    # ---- rebalances ---------------------------------------------------------------------
    async def on_assigned(self, assigned) -> None:
        self.assigned = {tp.partition for tp in assigned if tp.topic == self.settings.input_topic}
        self.catch_up.assigned(self.assigned, time.time())
        self.metrics.partitions.set(len(self.assigned))

    async def on_revoked(self, revoked) -> None:
        lost = {tp.partition for tp in revoked if tp.topic == self.settings.input_topic}
        if not lost or self.live is None:
            return
        async with self.lock:
            # the last batch's output first, as a batch in progress would (and its save, which
            # must not land after the new owner has resumed these sessions)
            await self._until_infrastructure_works(self._settle)
            if self._store_stale:  # the new owner resumes from Redis: give it what we hold
                self._last_rewrite = 0.0
                # (but not sessions whose output is held unacknowledged: see stop)
                await self._persist([], [], skip=self._outbox.touched if self._outbox is not None else set())
            gone = [sid for sid, sess in self.live.sessions.items() if sess.partition in lost]
            self.live.drop(gone)  # their state is in Redis; the new owner resumes them
            for sid in gone:      # (and any marker of theirs, still in Redis, with them)
                self._doubts.pop(sid, None)
                self._ahead.pop(sid, None)
            self.assigned -= lost
        self.metrics.partitions.set(len(self.assigned))


def _unacknowledged(messages: list, futures: list) -> list:
    """The messages to send again after a failed flush: for each (topic, key), from its first
    message without a successful ack (failed, still pending, or never sent) to its last, so
    that a retry neither repeats what arrived before it nor reorders a session's records."""
    from_here: set[tuple] = set()
    keep = []
    for i, msg in enumerate(messages):
        k = (msg[0], msg[1])
        fut = futures[i] if i < len(futures) else None
        acked = fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
        if not acked:
            from_here.add(k)
        if k in from_here:
            keep.append(msg)
    return keep


async def _delivered(futures: list) -> None:
    """Wait for the broker to acknowledge every send (cheaper than gather for thousands of
    futures, most of which are already done); the first failure is raised."""
    for fut in futures:
        if not fut.done():
            await fut
        elif fut.exception() is not None:
            raise fut.exception()


def create_app(settings: Settings, *, metrics: Metrics | None = None, store: SessionStore | None = None,
               policy: RevisionPolicy | None = None) -> faust.App:
    # sessions live in Redis; Faust's table data folder would only litter the working directory
    datadir = Path(tempfile.gettempdir()) / f"tagger-faust-{settings.app_id}"
    # `faust -A stream.app worker` builds this class too, so it stops as `tagger worker` does
    app = faust.App(settings.app_id, Worker=bounded_stop_worker_class(),
                    **faust_broker_settings(settings, datadir=datadir))
    events = app.topic(settings.input_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    labels = app.topic(settings.output_topic, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw", partitions=1)
    service = WorkerService(app, settings, metrics=metrics, store=store, policy=policy)
    app.worker_service = service  # type: ignore[attr-defined]  (not app.service: Faust's decorator)

    @app.task
    async def _startup() -> None:
        for topic in (events, labels, dlq):
            try:
                await topic.maybe_declare()
            except Exception as exc:  # the broker may auto-create; a real cluster has them
                log.warning("could not declare topic %s: %r", topic.get_topic_name(), exc)

    @app.service
    class _Lifecycle(faust.Service):  # noqa: N801 - Faust registers the class
        async def on_start(self) -> None:
            await service.start()

        async def on_stop(self) -> None:
            await service.stop()

    @app.agent(events)
    async def tag(stream):
        # with overlap the worker acknowledges each batch once its output is delivered and saved
        ack = stream.ack if settings.overlap else None
        async for batch in age_bounded_batches(stream, settings.batch_max, settings.batch_wait_ms / 1000,
                                               ack=ack is None):
            await service.handle(batch, ack)

    @app.timer(interval=max(0.5, min(5.0, settings.inactivity_s / 4)))
    async def _sweep() -> None:
        await service.sweep()

    @app.timer(interval=2.0)
    async def _poll_model() -> None:
        await service.poll_model()

    @app.timer(interval=1.0)
    async def _probe() -> None:
        await service.probe()

    @app.on_partitions_assigned.connect
    async def _assigned(sender, assigned, **kwargs) -> None:
        await service.on_assigned(assigned)

    @app.on_partitions_revoked.connect
    async def _revoked(sender, revoked, **kwargs) -> None:
        await service.on_revoked(revoked)

    @app.page("/metrics")
    async def _metrics(web, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return web.bytes(generate_latest(service.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def _healthz(web, request):
        return web.json({"status": "ok", "uptime_s": round(time.time() - service.started_at, 1)})

    @app.page("/readyz")
    async def _readyz(web, request):
        deps = service.dependencies()  # from the 1 s probe: a dead broker shows within ~5 s
        checks = {"model_loaded": service.live is not None,
                  "partitions_assigned": bool(service.assigned),
                  "redis": deps["redis"], "kafka": deps["kafka"]}
        ok = all(checks.values())
        return web.json({"ready": ok, **checks,
                         "model_version": service.live.loaded.version if service.live else None},
                        status=200 if ok else 503)

    return app


class _RateLimit(logging.Filter):
    """Lets one warning-or-worse line per (library logger, message) through every
    ``every_s`` seconds; the next one says how many were held back. A broker outage makes
    aiokafka and Faust repeat the same few errors many times a second."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self.seen: dict[tuple[str, Any], list[float]] = {}  # key -> [last emitted, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        # the worker's own lines are limited where they are logged (distinct model rejections
        # must all show); this is for the libraries' repeats
        if record.levelno < logging.WARNING or record.name.startswith("tagger"):
            return True
        try:
            text = record.getMessage()[:300]
        except Exception:  # a bad format string: let the handler report it
            return True
        key = (record.name, text)
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is None:
            if len(self.seen) > 1000:  # bounded: templates, not values, but be safe
                self.seen.clear()
            self.seen[key] = [now, 0]
            return True
        if now - entry[0] < self.every_s:
            entry[1] += 1
            return False
        if entry[1]:
            record.msg = f"{record.msg} [{int(entry[1])} more like this in the last {now - entry[0]:.0f} s]"
        entry[0], entry[1] = now, 0
        return True


def install_log_rate_limit(every_s: float = 30.0) -> None:
    """Put the rate limit on the root logger's handlers (Faust has set them up by the time
    the worker starts); idempotent."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RateLimit) for f in handler.filters):
            handler.addFilter(_RateLimit(every_s))


def _module_app() -> faust.App:
    return create_app(Settings.from_env())


def __getattr__(name: str):
    # `faust -A stream.app` looks up `app`; build it on first access, not on import.
    if name == "app":
        globals()["app"] = _module_app()
        return globals()["app"]
    raise AttributeError(name)
