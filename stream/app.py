"""The live worker: the Faust app, its topics and the agent that tags events.

``faust -A stream.app worker`` (or ``tagger worker``) runs it; ``create_app(settings)`` builds
an app for tests. The app is the only global object (STYLE.md); everything else hangs off
``app.tagger`` (a ``WorkerService``) and is built from ``Settings`` at start-up.

Per batch of input messages (``take_events``): validate (bad messages go to the DLQ with the
original bytes, the reason and the source topic/partition/offset) -> load sessions this
worker does not hold from Redis -> tag in a single-thread executor (model compute stays off
the event loop) -> produce all label records at once and wait for the broker's acks ->
write the touched sessions through to Redis -> the batch's offsets are committed. A crash
anywhere before the commit replays the batch: records may repeat (same session, event and
revision, so they deduplicate) but none is lost.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import faust

from stream.metrics import Metrics
from stream.model_holder import ModelHolder
from stream.records import InvalidEvent, dlq_record, encode_label, parse_event
from stream.revisions import RevisionPolicy
from stream.session_store import RedisSessionStore, SessionStore, StoreUnavailable
from stream.settings import Settings, faust_broker_settings
from stream.tagging import LiveTagger

log = logging.getLogger("tagger.worker")

# A dead letter carries the original bytes base64-encoded (x4/3) plus a text preview; it must
# fit the producer's max_request_size (Faust: 1,000,000) and the broker's message.max.bytes
# (Kafka: ~1 MiB). Past this size only the head of the original is kept (the detail says so
# and gives the sha256 of the whole): a DLQ send that fails would stop the agent.
DLQ_MAX_ORIGINAL_BYTES = 512 * 1024


class WorkerService:
    """The worker's state and its batch loop (everything but the Faust wiring)."""

    def __init__(self, app: faust.App, settings: Settings, *, metrics: Metrics | None = None,
                 store: SessionStore | None = None, policy: RevisionPolicy | None = None):
        self.app, self.settings = app, settings
        self.metrics = metrics or Metrics.create()
        self.store = store or RedisSessionStore(settings.redis_url, prefix=settings.redis_prefix,
                                                ttl_s=settings.session_ttl_s)
        self.holder = ModelHolder(settings.artifacts_dir, on_event=self._on_model_event)
        self.policy = policy or RevisionPolicy()
        self.tagger: Optional[LiveTagger] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagger-model")
        self.lock = asyncio.Lock()
        self.assigned: set[int] = set()
        self._finals = deque(maxlen=2000)  # recent final outcomes, for the coverage gauge
        self.started_at = time.time()
        self.processed = 0
        self.model_ready = asyncio.Event()
        # A failed write-through leaves Redis behind memory (and a restarted Redis has lost
        # everything): until a full rewrite of the sessions held here succeeds, Redis cannot
        # be trusted to resume them after a crash or rebalance.
        self._store_stale = False
        self._last_rewrite = 0.0
        self._closed_unsaved: set[str] = set()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        import torch
        torch.set_num_threads(1)  # small per-batch work: threads cost more than they give
        loop = asyncio.get_running_loop()
        lm = await loop.run_in_executor(self.executor, self.holder.load_initial)
        self.tagger = LiveTagger(lm, self.policy, max_events_per_session=self.settings.max_events_per_session,
                                 lateness_s=self.settings.lateness_s,
                                 max_sessions=self.settings.max_sessions_in_memory)
        log.info("serving model %s (lookahead %s, labels %d)", lm.version, lm.lookahead, len(lm.labels))
        # Everything loaded so far (torch, Faust, the model) lives as long as the process. Move
        # it out of the collector's view: otherwise every full collection walks those millions
        # of objects, a ~0.3 s pause every second or two under load (the p99 latency spikes).
        gc.collect()
        gc.freeze()
        self.model_ready.set()

    async def stop(self) -> None:
        if self._store_stale and self.tagger is not None:
            self._last_rewrite = 0.0
            await self._persist([], [])  # last chance to hand the sessions on
        await self.store.close()
        self.executor.shutdown(wait=False)

    def _on_model_event(self, result: str, version: str, detail: str) -> None:
        self.metrics.model_event(result, version)

    # ---- the batch loop -----------------------------------------------------------------
    async def handle(self, events: list) -> None:
        """Process a batch; if it fails unexpectedly, process its events one by one so that
        a poison message goes to the DLQ (reason ``processing_error``) and the rest flow."""
        # Faust starts the agent before the _Lifecycle service has loaded the model
        await self.model_ready.wait()
        async with self.lock:
            try:
                await self._handle(events)
            except Exception:
                log.exception("batch of %d failed; retrying its events one by one", len(events))
                for ev in events:
                    try:
                        await self._handle([ev])
                    except Exception as exc:
                        await self._dead_letter(ev, "processing_error", f"{type(exc).__name__}: {exc}", None)

    async def _dead_letter(self, ev, reason: str, detail: str, field) -> Any:
        msg = ev.message
        raw = bytes(ev.value) if isinstance(ev.value, (bytes, bytearray)) else b""
        if len(raw) > DLQ_MAX_ORIGINAL_BYTES:
            detail = (f"{detail} [the message is {len(raw)} bytes: this dead letter keeps the first "
                      f"{DLQ_MAX_ORIGINAL_BYTES}; sha256 of all of it: {hashlib.sha256(raw).hexdigest()}]")
            raw = raw[:DLQ_MAX_ORIGINAL_BYTES]
        key = msg.key if isinstance(msg.key, (bytes, type(None))) else None
        payload = dlq_record(raw, reason, field, msg.topic, msg.partition, msg.offset, key, detail=detail)
        self.metrics.dlq.labels(reason=reason).inc()
        self.metrics.events.labels(result="invalid").inc()
        log.warning("message at %s[%s]@%s sent to the DLQ: %s: %s", msg.topic, msg.partition, msg.offset,
                    reason, detail)
        return await self.app.producer.send(self.settings.dlq_topic, key, payload, None, None, None)

    async def _handle(self, events: list) -> None:
        assert self.tagger is not None
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        candidate = self.holder.take_candidate()
        if candidate is not None:
            self.tagger.swap(candidate)
            log.info("now serving model %s", candidate.version)
        s = self.settings
        parsed, partitions, published, sends, sources = [], [], {}, [], []
        for ev in events:
            msg = ev.message
            try:
                e = parse_event(ev.value if isinstance(ev.value, (bytes, bytearray)) else bytes(ev.value or b""),
                                max_bytes=s.max_message_bytes)
            except InvalidEvent as exc:
                sends.append(await self._dead_letter(ev, exc.reason, exc.detail, exc.field))
                continue
            parsed.append(e)
            sources.append(ev)
            partitions.append(msg.partition)
            if e.type != "session_end":
                pub = e.fields.get("published_at")
                published[(e.session_id, e.event_id)] = float(pub) if isinstance(pub, (int, float)) else (
                    msg.timestamp if msg.timestamp else time.time())
        if parsed:
            missing = list({e.session_id for e in parsed} - self.tagger.sessions.keys())
            if missing:
                try:
                    for sid, (meta, window, ids) in (await self.store.load(missing)).items():
                        self.tagger.restore(meta, window, ids)
                except StoreUnavailable as exc:
                    log.error("%s; continuing with in-memory state only", exc)
            t0 = time.perf_counter()
            try:
                batch = await loop.run_in_executor(self.executor, self.tagger.process, parsed, partitions)
                model_s = time.perf_counter() - t0
                for i, reason, detail in batch.rejected:
                    sends.append(await self._dead_letter(sources[i], reason, detail, "session_id"))
                t1 = time.perf_counter()
                sends += await self._produce(batch.records)
                t2 = time.perf_counter()
                await _delivered(sends)
                t3 = time.perf_counter()
                log.debug("phases: model %.1f queue %.1f ack %.1f ms (%d records)", 1000 * model_s,
                         1000 * (t2 - t1), 1000 * (t3 - t2), len(batch.records))
                now = time.time()
                for rec in batch.records:
                    if rec["revision"] == 0:
                        pub = published.get((rec["session_id"], rec["event_id"]))
                        if pub is not None:
                            self.metrics.latency.observe(max(0.0, now - pub))
            except BaseException:
                # Redis holds every session as of the last completed batch; memory may now be
                # ahead of it. Forget this batch's sessions so a retry (or the next owner)
                # resumes them from Redis and labels these events again instead of skipping
                # them as already seen. Repeated records deduplicate by revision.
                self.tagger.drop({e.session_id for e in parsed})
                raise
            await self._persist(batch.touched, batch.closed)
            n_ends = sum(1 for e in parsed if e.type == "session_end")
            self.metrics.events.labels(result="accepted").inc(batch.accepted)
            self.metrics.events.labels(result="duplicate").inc(batch.duplicates)
            self.metrics.events.labels(result="session_end").inc(n_ends)
            if batch.accepted:
                self.metrics.inference.observe(model_s / batch.accepted)
            self.metrics.batch_size.observe(len(events))
            self.processed += batch.accepted
        elif sends:
            await _delivered(sends)
        self.metrics.open_sessions.set(len(self.tagger.sessions))
        log.debug("batch of %d in %.1f ms", len(events), 1000 * (time.perf_counter() - started))

    async def _produce(self, records: list[dict[str, Any]]) -> list:
        """Queue every record with the producer at once (it batches them into few requests)
        and return the delivery futures; the caller awaits them all before committing."""
        producer, topic = self.app.producer, self.settings.output_topic
        futs = []
        kinds = {"first": 0, "revision": 0, "final": 0}
        labelled = abstained = 0
        for rec in records:
            futs.append(await producer.send(topic, rec["session_id"].encode(), encode_label(rec), None, None, None))
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
        return futs

    async def _persist(self, touched, closed) -> None:
        """Write the touched sessions through to the store (their changes since the last
        snapshot), then forget the closed ones. After a store failure every session held in
        memory is rewritten in full instead, at most once a second until it succeeds: deltas
        on top of a Redis that missed some (or restarted empty) would leave sessions no one
        could resume. Until then closed sessions stay in memory too, so that neither the idle
        sweep nor a successor finalises them a second time from stale open state in Redis."""
        self._closed_unsaved.update(closed)
        if self._store_stale:
            if time.monotonic() - self._last_rewrite < 1.0:
                return
            self._last_rewrite = time.monotonic()
            snaps = [self._full_snapshot(sid) for sid in list(self.tagger.sessions)]
        else:
            snaps = [self.tagger.snapshot(sid) for sid in touched if sid in self.tagger.sessions]
        try:
            await self.store.save(snaps, self.tagger.window_size)
        except StoreUnavailable as exc:
            if not self._store_stale:
                log.error("%s; sessions stay in memory and are rewritten when it is back", exc)
            self._store_stale = True
            self.tagger.evict_enabled = False  # memory holds the only copy until the rewrite
            return
        if self._store_stale:
            log.info("session store back: rewrote %d sessions held in memory", len(snaps))
            self._store_stale = False
            self.tagger.evict_enabled = True
        sessions = self.tagger.sessions
        self.tagger.drop([sid for sid in self._closed_unsaved if sid in sessions and sessions[sid].closed])
        self._closed_unsaved.clear()

    def _full_snapshot(self, sid: str) -> dict[str, Any]:
        """A snapshot that replaces everything the store holds for the session."""
        snap = self.tagger.snapshot(sid)
        sess = self.tagger.sessions[sid]
        snap.update(new_raw=list(sess.window), new_ids=sorted(sess.ids), replace=True)
        return snap

    # ---- timers -------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Finalise sessions idle longer than the inactivity timeout: those in memory, and
        those of this worker's partitions known only to Redis (left by a crashed worker)."""
        if self.tagger is None:
            return
        async with self.lock:
            if self._store_stale:
                await self._persist([], [])
            now = time.time()
            idle = self.tagger.inactive(now, self.settings.inactivity_s)
            try:
                for p in sorted(self.assigned):
                    stale = [sid for sid in await self.store.idle(p, now - self.settings.inactivity_s)
                             if sid not in self.tagger.sessions]
                    for sid, (meta, window, ids) in (await self.store.load(stale)).items():
                        self.tagger.restore(meta, window, ids)
                        idle.append(sid)
            except StoreUnavailable as exc:
                log.error("%s; idle sweep of stored sessions skipped", exc)
            except Exception as exc:  # Redis client errors other than connectivity
                log.error("idle sweep failed: %r", exc)
            if not idle:
                return
            loop = asyncio.get_running_loop()
            records = await loop.run_in_executor(self.executor, self.tagger.finalize, idle)
            await _delivered(await self._produce(records))
            await self._persist(idle, idle)
            log.info("finalised %d idle sessions (%d records)", len(idle), len(records))

    async def poll_model(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.holder.poll)

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
        consumer = self.app.consumer
        try:
            assignment = [tp for tp in consumer.assignment() if tp.topic == self.settings.input_topic]
            lags = {}
            for tp in assignment:
                end = consumer.highwater(tp)
                committed = consumer._committed_offset.get(tp)  # next offset to read, or None
                read = consumer._read_offset.get(tp)  # last offset handed to the agent, or None
                position = committed if committed is not None else (read + 1 if read is not None else None)
                if end is not None and position is not None:
                    lags[tp.partition] = max(0, end - position)
        except Exception as exc:  # not started yet, or mid-rebalance: lag is observability only
            log.debug("consumer lag not updated: %r", exc)
            return
        gauge = self.metrics.consumer_lag
        gauge.clear()
        for partition, lag in sorted(lags.items()):
            gauge.labels(partition=str(partition)).set(lag)

    # ---- rebalances ---------------------------------------------------------------------
    async def on_assigned(self, assigned) -> None:
        self.assigned = {tp.partition for tp in assigned if tp.topic == self.settings.input_topic}
        self.metrics.partitions.set(len(self.assigned))

    async def on_revoked(self, revoked) -> None:
        lost = {tp.partition for tp in revoked if tp.topic == self.settings.input_topic}
        if not lost or self.tagger is None:
            return
        async with self.lock:
            if self._store_stale:  # the new owner resumes from Redis: give it what we hold
                self._last_rewrite = 0.0
                await self._persist([], [])
            gone = [sid for sid, sess in self.tagger.sessions.items() if sess.partition in lost]
            self.tagger.drop(gone)  # their state is in Redis; the new owner resumes them
            self.assigned -= lost
        self.metrics.partitions.set(len(self.assigned))


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
    app = faust.App(settings.app_id, **faust_broker_settings(settings, datadir=datadir))
    events = app.topic(settings.input_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    labels = app.topic(settings.output_topic, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw", partitions=1)
    service = WorkerService(app, settings, metrics=metrics, store=store, policy=policy)
    app.tagger = service  # type: ignore[attr-defined]

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
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
            await service.handle(batch)

    @app.timer(interval=max(0.5, min(5.0, settings.inactivity_s / 4)))
    async def _sweep() -> None:
        await service.sweep()

    @app.timer(interval=2.0)
    async def _poll_model() -> None:
        await service.poll_model()
        service.update_lag()

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
        checks = {"model_loaded": service.tagger is not None,
                  "partitions_assigned": bool(service.assigned),
                  "redis": await service.store.ping()}
        ok = all(checks.values())
        return web.json({"ready": ok, **checks,
                         "model_version": service.tagger.model.version if service.tagger else None},
                        status=200 if ok else 503)

    return app


def _module_app() -> faust.App:
    return create_app(Settings.from_env())


def __getattr__(name: str):
    # `faust -A stream.app` looks up `app`; build it on first access, not on import.
    if name == "app":
        globals()["app"] = _module_app()
        return globals()["app"]
    raise AttributeError(name)
