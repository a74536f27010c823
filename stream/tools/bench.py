"""``tagger bench``: throughput, latency, scaling, memory and label quality, beside baselines.

Everything runs on the embedded broker (tansu) and the machine's Redis, in one run, so the
worker and its baselines share the same broker, tuning and machine load. Stages:

``throughput``
    A fresh input topic is pre-filled with N messages (generated sessions, ``session_end``
    included); then the consumer starts, and its rate is the number of outputs over the span
    from its first output to its last, both read from the output records' timestamps (set by
    the producer when the record is queued). Measured for the full worker (``tagger worker``
    subprocess: Kafka in, Redis, model, label records out; outputs = final records, one per
    event) and three baselines: a bare Faust agent forwarding each message unchanged
    (``stream.tools.bench_apps:passthrough``), the same agent with the worker's batch loop
    (``stream.tools.bench_apps:batched``; the gap to the worker is the cost of tagging) and a bare
    aiokafka consume->produce loop (in-process). Fresh topics, consumer group and Redis
    prefix for every run. Completion is counted by consuming the output topic (tansu's end
    offsets undercount batched records, so they are not used).
``capacity``
    The headline: for the worker and for the bare Faust agent, the highest paced input rate
    at which p99 first-label latency stays within 50 ms over a 30 s window (``--quick``: 4 s,
    and fewer probes), found by a short search over rates, each probe on fresh processes and
    topics; and the worker's process CPU per event at 500 events/s paced. Full mode also
    measures the worker's capacity with its sessions in a local Redis Cluster (three masters),
    with one worker and with two in one consumer group.
``latency``
    Fresh workers are fed fresh sessions paced at 25/50/75% of the worker's paced capacity
    (``--quick``: 50% only); latency is an event's ``published_at`` (set just before the
    bench's producer sends it) to the broker timestamp of its first label record. Full mode
    also sends the 50% load through a fresh bare Faust agent: the floor that the broker and
    Faust alone impose.
``memory``
    K sessions left open (no ``session_end``) through that worker; Redis ``MEMORY USAGE`` of
    their keys, per session and per event; the worker's RSS (``/proc/<pid>/status``).
``scaling``
    The engine alone (``LiveTagger`` + ``RedisSessionStore.save``, the worker's write-through):
    one group of B sessions per position, stepped in lockstep to just before it, then the
    groups' calls around positions 10, 100 and 1000 interleaved (so machine load hits them
    alike); per-event cost there, and the Redis bytes a session holds at position 1000.
``quality``
    bilstm, transformer and the logreg baseline trained on a generated log (and, in full
    mode, on each real log ``<real-data>/*.train.csv``), scored with ``trainer.evaluate``
    offline and streaming (neural models), with training time and inference time per event.

Each figure is the median over repeats with its min-max spread (``--quick``: 1 repeat, small
sizes). The results folder gets ``report.md``, ``results.json`` (every figure and raw
sample), ``headline.json`` (the keys ``--json`` writes), ``readme_table.md`` and the plots
``latency_cdf.png``, ``throughput_vs_load.png``, ``cost_vs_position.png`` and
``risk_coverage_<dataset>.png``; ``logs/`` holds the subprocesses' logs. With ``--profile``
the worker is sampled by py-spy (``--gil``) during one extra throughput run, with its
per-batch phase timings from its debug log, and the top costs go into the report.
In-process model work runs on one torch thread, as the worker does.

``run_bench(BenchConfig.for_mode(quick, out_dir), json_out=...)`` is the Python entry point;
``tagger bench`` (``stream.cli``) the command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from stream.errors import StackError
from stream.settings import FETCH_MAX_WAIT_MS, Settings, kafka_client_kwargs
from stream.tools.bench_apps import CLIENT_FORWARDERS
from stream.tools.processes import REPO_ROOT, WorkerProcess, free_port, metric_value, run_sync, wait_until

HEADLINE_KEYS = ("worker_events_per_s", "faust_passthrough_events_per_s",
                 "aiokafka_passthrough_events_per_s", "latency_p99_s_at_50pct",
                 "cost_ratio_pos1000_pos10", "redis_bytes_per_event")
# Printed beside the figures, never asserted (the machine decides too much of them).
TARGETS = {"worker_vs_faust": 0.5, "latency_p99_s_at_50pct": 0.050, "cost_ratio_pos1000_pos10": 1.2,
           "capacity_vs_faust": 0.5, "worker_cpu_ms_per_event_at_500": 0.5}
P99_TARGET_S = 0.050      # the latency a paced rate must keep to count as within capacity
CPU_PROBE_RATE = 500.0    # events/s at which the worker's CPU per event is reported
BARE_KINDS = ("faust", *CLIENT_FORWARDERS)  # forwarders without tagging (stream.tools.bench_apps)
FINAL = b'"final":true'
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
QUALITY_ARCHS = ("bilstm", "transformer", "logreg")
WARMUP_EVENTS = 300  # through each fresh latency worker before it is measured
SMALL_MODEL = {"hidden_dim": 32, "emb_event_dim": 32, "num_layers": 1, "lookahead": 3, "context": 32}


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one bench run; ``for_mode`` gives the full and the ``--quick`` defaults."""

    out_dir: Path
    quick: bool = False
    model: Optional[Path] = None          # served by the worker; trained when None
    repeats: int = 3
    events: int = 20_000                  # messages pre-filled per worker / Faust run
    aiokafka_events: int = 100_000        # the aiokafka loop is ~20x faster: more to time
    loads: tuple[float, ...] = (0.25, 0.5, 0.75)
    load_seconds: float = 15.0            # publishing time per load level
    positions: tuple[int, ...] = (10, 100, 1000)
    lockstep_sessions: int = 32
    memory_sessions: int = 500
    pool_sessions: int = 1500             # generated sessions every stage draws from
    train_sessions: int = 800             # the served model (when --model is not given)
    quality: bool = True
    quality_train_sessions: int = 800
    quality_test_sessions: int = 200
    real_data: Optional[Path] = None      # folder of <name>.train.csv / <name>.test.csv
    batched_baseline: bool = True         # also time the Faust agent with the worker's batch loop
    latency_floor: bool = True            # latency of the bare Faust agent at the 50% load
    capacity_window_s: float = 30.0       # paced publishing per capacity probe
    capacity_probes: int = 6              # probes per capacity search (the first at CPU_PROBE_RATE)
    cluster_capacity: bool = True         # capacity of 1 and 2 workers on a local Redis Cluster
    profile: bool = False
    seed: int = 5

    @classmethod
    def for_mode(cls, quick: bool, out_dir: str | Path, **overrides: Any) -> "BenchConfig":
        base: dict[str, Any] = {"out_dir": Path(out_dir), "quick": quick}
        if quick:
            base.update(repeats=1, events=2500, aiokafka_events=20_000, load_seconds=3.0, loads=(0.5,),
                        capacity_window_s=4.0, capacity_probes=3, cluster_capacity=False,
                        batched_baseline=False, latency_floor=False, lockstep_sessions=4,
                        memory_sessions=100, pool_sessions=300,
                        train_sessions=150, quality_train_sessions=120, quality_test_sessions=30,
                        real_data=None)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# =========================================================================== entry point


def run_bench(cfg: BenchConfig, *, json_out: str | Path | None = None, readme: str | Path | None = None,
              command: str = "tagger bench", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage, write the results folder (and ``json_out``); returns the results."""
    out = Path(cfg.out_dir)
    for sub in ("logs", "models", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started = time.time()
    run_id = uuid.uuid4().hex[:8]
    res: dict[str, Any] = {"command": command, "started_at": _iso(started), "quick": cfg.quick,
                           "config": _plain(dataclasses.asdict(cfg)), "machine": machine_info()}
    echo(f"bench {run_id}: results -> {out} ({'quick' if cfg.quick else 'full'} mode, "
         f"load average {res['machine']['loadavg_start']})")

    stage_s: dict[str, float] = res.setdefault("stage_seconds", {})

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stage_s[name] = round(time.perf_counter() - t0, 1)

    # In-process model work (the engine-scaling stage, training and evaluation) runs on one
    # thread, as the worker does: small per-batch tensors gain nothing from more threads,
    # and on a shared machine extra threads make torch much slower (measured ~10x on 2
    # busy cores).
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _stages(cfg, res, out, run_id, timed, echo)
    finally:
        torch.set_num_threads(threads)
    res["machine"]["loadavg_end"] = _loadavg()
    res["seconds"] = round(time.time() - started, 1)
    res["headline"] = headline(res)
    write_results(res, out, json_out=json_out, readme=readme)
    echo(format_headline(res))
    return res


def _stages(cfg: BenchConfig, res: dict[str, Any], out: Path, run_id: str, timed, echo) -> None:
    from stream.tools.stack import embedded_stack
    pool = _generated(out / "data", cfg.pool_sessions, cfg.seed, "pool")
    model_dir = Path(cfg.model) if cfg.model else timed("train_served_model", _train_served_model, cfg, out, echo)
    res["model"] = _model_info(model_dir)

    with ExitStack() as stack:
        info = stack.enter_context(embedded_stack(timeout_s=60))
        base = Settings(kafka=info["kafka"], redis_url=info["redis"], kafka_session_timeout_s=3.0,
                        web_port=0)
        prefix = f"tagger-bench:{run_id}:"
        stack.callback(_delete_redis_prefix, base.redis_url, prefix)
        artifacts = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tagger-bench-art-")))
        from trainer.artifacts import promote
        promote(model_dir, artifacts)
        h = _Harness(cfg, base, run_id, prefix, artifacts, out, pool, echo)
        stack.callback(h.close)

        res["throughput"] = timed("throughput", h.throughput)
        res["memory"] = timed("memory", h.memory)
        h.close()  # the kept worker: later runs should have the machine to themselves
        res["capacity"] = timed("capacity", h.capacities, [("worker", "worker", 1, None),
                                                            ("faust", "faust", 1, None)])
        res["client_floor"] = timed("client_floor", h.client_floor)
        cap = res["capacity"]["worker"]
        # loads are fractions of the worker's paced capacity (nothing passed: of the lowest probe)
        paced_max = cap["events_per_s"] or min(p["rate"] for p in cap["probes"])
        res["latency"] = timed("latency", h.latency, paced_max)
        if cfg.latency_floor:
            half = res["latency"]["levels"].get("0.5") or next(iter(res["latency"]["levels"].values()))
            res["latency"]["floor"] = timed("latency_floor", h.latency_floor, half["rate_events_per_s"])
        if cfg.cluster_capacity:
            res["cluster"] = timed("cluster_capacity", h.cluster_capacity, out / "redis-cluster")
        if cfg.profile:
            res["profile"] = timed("profile", h.profile)
            h.close()
        res["scaling"] = timed("scaling", stage_scaling, model_dir, pool, cfg, base.redis_url,
                               prefix + "scaling:", echo)
    if cfg.quality:
        res["quality"] = timed("quality", stage_quality, cfg, out, echo)


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The figures ``--json`` writes (HEADLINE_KEYS first), each a median over repeats."""
    tp, lat, sc, mem = res["throughput"], res["latency"], res["scaling"], res["memory"]
    w = tp["worker"]["events_per_s"]["median"]
    f = tp["faust_passthrough"]["events_per_s"]["median"]
    a = tp["aiokafka_passthrough"]["events_per_s"]["median"]
    half = lat["levels"].get("0.5") or next(iter(lat["levels"].values()))
    cap_w, cap_f = res["capacity"]["worker"], res["capacity"]["faust"]
    cluster = res.get("cluster") or {}
    out = {
        "capacity_events_per_s_at_p99_50ms": cap_w["events_per_s"],
        "faust_capacity_events_per_s_at_p99_50ms": cap_f["events_per_s"],
        "worker_cpu_ms_per_event_at_500": cap_w["cpu_ms_per_event_at_500"],
        "faust_cpu_ms_per_event_at_500": cap_f["cpu_ms_per_event_at_500"],
        **{f"{k}_cpu_ms_per_event_at_500": r["cpu_ms_per_event"] for k, r in (res.get("client_floor") or {}).items()},
        "capacity_vs_faust": _ratio(cap_w["events_per_s"], cap_f["events_per_s"]),
        "capacity_window_s": cap_w["window_s"],
        "cluster_capacity_events_per_s_1_worker": (cluster.get("1") or {}).get("events_per_s"),
        "cluster_capacity_events_per_s_2_workers": (cluster.get("2") or {}).get("events_per_s"),
        "worker_events_per_s": w,
        "faust_passthrough_events_per_s": f,
        "aiokafka_passthrough_events_per_s": a,
        "latency_p99_s_at_50pct": half["p99_s"]["median"],
        "cost_ratio_pos1000_pos10": sc["ratio_last_first"]["median"],
        "redis_bytes_per_event": mem["redis_bytes_per_event"],
        "faust_batched_passthrough_events_per_s": (tp.get("faust_batched_passthrough") or {}).get(
            "events_per_s", {}).get("median"),
        "worker_vs_faust": _ratio(w, f),
        "worker_vs_aiokafka": _ratio(w, a),
        "latency_p50_s_at_50pct": half["p50_s"]["median"],
        "latency_p95_s_at_50pct": half["p95_s"]["median"],
        "faust_latency_p99_s_at_50pct": (lat.get("floor") or {}).get("p99_s"),
        "redis_bytes_per_session": mem["redis_bytes_per_session"],
        "redis_bytes_per_session_at_pos1000": sc["redis_bytes_per_session_at_end"],
        "redis_write_us_per_event": sc["redis_write_us_per_event"]["median"],
        "worker_rss_bytes": mem["worker_rss_bytes"],
        "quick": res["quick"],
        "repeats": res["config"]["repeats"],
        "targets": dict(TARGETS),
    }
    for p, v in sc["positions"].items():
        out[f"cost_us_per_event_pos{p}"] = v["step_us"]["median"]
    return out


# =========================================================================== the broker side


class _Harness:
    """The throughput, latency, memory and profile stages: subprocesses on one stack."""

    def __init__(self, cfg: BenchConfig, base: Settings, run_id: str, prefix: str, artifacts: Path,
                 out: Path, pool: Path, echo):
        self.cfg, self.base, self.run_id, self.prefix = cfg, base, run_id, prefix
        self.artifacts, self.out, self.echo = artifacts, out, echo
        self.template = _template(pool)
        self.procs: list[WorkerProcess] = []
        self.worker: Optional[WorkerProcess] = None          # the last throughput worker, kept for the memory stage
        self.worker_settings: Optional[Settings] = None
        self.kw = kafka_client_kwargs(base)
        self._n = 0

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()
        self.worker = None

    def _settings(self, name: str) -> Settings:
        self._n += 1
        ns = f"bench-{self.run_id}-{self._n}-{name}"
        return dataclasses.replace(self.base, input_topic=f"{ns}.in", output_topic=f"{ns}.out",
                                   dlq_topic=f"{ns}.dlq", app_id=ns,
                                   redis_prefix=f"{self.prefix}{self._n}:", artifacts_dir=self.artifacts)

    # ---- throughput ---------------------------------------------------------------------
    def throughput(self) -> dict[str, Any]:
        cfg = self.cfg
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(cfg.repeats):
            self.echo(f"throughput, repeat {r + 1}/{cfg.repeats}")
            runs["faust_passthrough"].append(self._faust_run(f"r{r}", batched=False))
            if cfg.batched_baseline:
                runs["faust_batched_passthrough"].append(self._faust_run(f"r{r}", batched=True))
            runs["aiokafka_passthrough"].append(self._aiokafka_run(f"r{r}"))
            runs["worker"].append(self._worker_run(f"r{r}", keep=r == cfg.repeats - 1))
            for name, rs in runs.items():
                self.echo(f"  {name:28s} {rs[-1]['events_per_s']:10.0f} events/s "
                          f"({rs[-1]['outputs']} outputs in {rs[-1]['span_s']:.2f} s)")
        res = {name: {"events_per_s": _summ([x["events_per_s"] for x in rs]), "runs": rs}
               for name, rs in runs.items()}
        w = res["worker"]["events_per_s"]["median"]
        for name in [n for n in runs if n != "worker"]:
            res[f"worker_vs_{name}"] = _ratio(w, res[name]["events_per_s"]["median"])
        return res

    def _messages(self, n_events: int, tag: str, *, end_sessions: bool = True) -> list[dict]:
        return _stage_messages(self.template, n_events, f"{self.run_id}{tag}", end_sessions=end_sessions)

    def _faust_run(self, tag: str, *, batched: bool) -> dict[str, Any]:
        from stream.tools.stack import ensure_topics
        name = "batched" if batched else "passthrough"
        s = self._settings(f"faust-{name}-{tag}")
        ensure_topics(s, [s.input_topic, s.output_topic])
        msgs = self._messages(self.cfg.events, f"f{name[0]}{tag}")
        _run(_produce(self.kw, s.input_topic, [_kv(m) for m in msgs]))
        proc = self._start(s, f"faust-{name}-{tag}", app=f"stream.tools.bench_apps:{name}",
                           args=["--without-web", "-l", "warn"])
        try:
            got = _run(_collect(self.kw, s.output_topic, s.partitions, len(msgs), proc=proc,
                                timeout_s=_timeout(len(msgs)), what=f"Faust {name} output"))
        finally:
            proc.stop()
        return _rate(got.ts, len(msgs))

    def _aiokafka_run(self, tag: str) -> dict[str, Any]:
        from stream.tools.stack import ensure_topics
        s = self._settings(f"aiokafka-{tag}")
        ensure_topics(s, [s.input_topic, s.output_topic])
        msgs = self._messages(self.cfg.aiokafka_events, f"a{tag}")
        _run(_produce(self.kw, s.input_topic, [_kv(m) for m in msgs]))
        _run(_aiokafka_loop(self.kw, s.input_topic, s.output_topic, s.partitions, len(msgs)))
        got = _run(_collect(self.kw, s.output_topic, s.partitions, len(msgs), timeout_s=60.0,
                            what="aiokafka loop output"))
        return _rate(got.ts, len(msgs))

    def _worker_run(self, tag: str, *, keep: bool) -> dict[str, Any]:
        from stream.tools.stack import ensure_topics
        s = dataclasses.replace(self._settings(f"worker-{tag}"), web_port=free_port())
        ensure_topics(s)
        msgs = self._messages(self.cfg.events, f"w{tag}")
        n_events = sum(1 for m in msgs if m.get("type") != "session_end")
        _run(_produce(self.kw, s.input_topic, [_kv(m) for m in msgs]))
        proc = self._start(s, f"worker-{tag}")
        t0 = time.monotonic()
        try:
            got = _run(_collect(self.kw, s.output_topic, s.partitions, n_events, match=FINAL, proc=proc,
                                timeout_s=_timeout(n_events), what="worker final labels"))
            wall = time.monotonic() - t0
            rss = _rss(proc.proc.pid)
            batches = _metric(s, "tagger_batch_events_count")
            batch_mean = _metric(s, "tagger_batch_events_sum") / max(batches, 1)
            model_us = 1e6 * _metric(s, "tagger_inference_seconds_sum") / max(
                _metric(s, "tagger_inference_seconds_count"), 1)
        except BaseException:
            proc.stop()
            raise
        if keep:
            self.worker, self.worker_settings = proc, s
        else:
            proc.stop()
        finals = [t for t, v in zip(got.ts, got.values) if FINAL in v]
        out = _rate(np.asarray(finals), n_events)
        out.update(label_records=len(got.ts), records_per_event=round(len(got.ts) / max(n_events, 1), 3),
                   start_to_done_s=round(wall, 2), rss_bytes=rss, batches=int(batches),
                   batch_events_mean=round(batch_mean, 1), model_us_per_event_mean=round(model_us, 1))
        if len(finals) != n_events:
            raise StackError(f"worker run {tag}: {len(finals)} final records for {n_events} events")
        return out

    # ---- capacity -----------------------------------------------------------------------
    def capacities(self, specs: Sequence[tuple[str, str, int, Optional[str]]]) -> dict[str, dict[str, Any]]:
        """For each ``(name, kind, workers, redis_url)``: the highest paced input rate at which
        p99 first-label latency stays within ``P99_TARGET_S`` over ``capacity_window_s`` of
        traffic, for the worker (``kind`` "worker", ``workers`` of them in one group) or the
        bare Faust agent ("faust").

        A short search each: the first probe at ``CPU_PROBE_RATE``, then double (or halve)
        until a rate passes and one fails, then bisect geometrically; the answer is the
        highest rate that passed (0 if none did). The searches take turns probe by probe, so
        that load from elsewhere on the machine drifts over all of them alike. Each probe
        runs on fresh processes and fresh topics, after a warm-up, for the same reason as the
        latency stage."""
        cfg = self.cfg
        state = {name: {"lo": 0.0, "hi": math.inf, "rate": CPU_PROBE_RATE, "probes": [], "done": False}
                 for name, *_ in specs}
        for k in range(cfg.capacity_probes):
            for name, kind, workers, redis_url in specs:
                st = state[name]
                if st["done"]:
                    continue
                rate = st["rate"]
                self.echo(f"capacity, {name}: probe {k + 1}/{cfg.capacity_probes} at {rate:.0f} events/s "
                          f"for {cfg.capacity_window_s:g} s")
                run = self._probe(kind, rate, f"cap-{name}-{k}", workers=workers, redis_url=redis_url)
                run["ok"] = ok = run["p99_s"] <= P99_TARGET_S
                st["probes"].append(run)
                self.echo(f"  p50 {1000 * run['p50_s']:.1f} ms, p99 {1000 * run['p99_s']:.1f} ms: "
                          f"{'within' if ok else 'over'} {1000 * P99_TARGET_S:.0f} ms; "
                          f"process CPU {run['cpu_ms_per_event']:.3f} ms/event")
                if ok:
                    st["lo"] = max(st["lo"], rate)
                else:
                    st["hi"] = min(st["hi"], rate)
                lo, hi = st["lo"], st["hi"]
                if math.isinf(hi):
                    rate *= 2
                elif lo == 0:
                    rate /= 2
                elif hi / lo < 1.1:
                    st["done"] = True
                else:
                    rate = math.sqrt(lo * hi)
                st["rate"] = float(round(rate))
        out = {}
        for name, kind, workers, _ in specs:
            st = state[name]
            at_500 = [p["cpu_ms_per_event"] for p in st["probes"] if p["rate"] == CPU_PROBE_RATE]
            out[name] = {
                "events_per_s": st["lo"], "failed_at_events_per_s": None if math.isinf(st["hi"]) else st["hi"],
                "kind": kind, "workers": workers, "window_s": cfg.capacity_window_s, "p99_target_s": P99_TARGET_S,
                "cpu_ms_per_event_at_500": at_500[0] if at_500 else None, "probes": st["probes"],
                "definition": f"highest paced rate (of {len(st['probes'])} probed) with p99 first-label latency "
                              f"<= {1000 * P99_TARGET_S:.0f} ms over {cfg.capacity_window_s:g} s of traffic"
                              + (" (--quick: a short window, few probes)" if cfg.quick else "")}
        return out

    def _probe(self, kind: str, rate: float, tag: str, *, workers: int = 1,
               redis_url: Optional[str] = None) -> dict[str, Any]:
        seconds = self.cfg.capacity_window_s
        if kind in BARE_KINDS:
            from stream.tools.stack import ensure_topics
            s = self._settings(tag)
            ensure_topics(s, [s.input_topic, s.output_topic])
            if kind == "faust":
                proc = self._start(s, tag, app="stream.tools.bench_apps:passthrough",
                                   args=["--without-web", "-l", "info"])
            else:  # a forwarder on the Kafka client alone (stream.tools.bench_apps)
                proc = self._start(s, tag, module="stream.tools.bench_apps", args=[kind])
            try:
                proc.wait_logged("[^Worker]: Ready", 120)
                time.sleep(1.0)
                cpu0 = _cpu_s(proc.proc.pid)
                _, run, _ = self._paced(s, proc, {}, rate, tag, worker=False, seconds=seconds)
                cpu1 = _cpu_s(proc.proc.pid)
            finally:
                proc.stop()
            return {"rate": rate, **run, "cpu_ms_per_event": round(1000 * (cpu1 - cpu0) / max(run["events"], 1), 4)}
        s, procs, warm = self._fresh_workers(tag, workers, redis_url=redis_url)
        try:
            cpu0 = sum(_cpu_s(p.proc.pid) for p in procs)
            _, run, _ = self._paced(s, procs[0], warm, rate, tag, worker=True, seconds=seconds)
            cpu1 = sum(_cpu_s(p.proc.pid) for p in procs)
        finally:
            for p in procs:
                p.stop()
        # process CPU (every thread) from the first paced event to the last final label
        return {"rate": rate, **run, "cpu_ms_per_event": round(1000 * (cpu1 - cpu0) / max(run["events"], 1), 4)}

    def client_floor(self) -> dict[str, Any]:
        """CPU per event of a forwarder on each Kafka client alone (no Faust, no tagging), paced
        at ``CPU_PROBE_RATE`` for one capacity window: what the client costs any Python worker
        before its own work (``stream.tools.bench_apps``)."""
        out = {}
        for kind in CLIENT_FORWARDERS:
            self.echo(f"client floor, {kind}: {CPU_PROBE_RATE:.0f} events/s for {self.cfg.capacity_window_s:g} s")
            run = self._probe(kind, CPU_PROBE_RATE, f"floor-{kind}")
            self.echo(f"  p50 {1000 * run['p50_s']:.1f} ms, p99 {1000 * run['p99_s']:.1f} ms; "
                      f"process CPU {run['cpu_ms_per_event']:.3f} ms/event")
            out[kind] = run
        return out

    def cluster_capacity(self, folder: Path) -> dict[str, Any]:
        """Worker capacity with its sessions in a Redis Cluster (three masters on loopback),
        one worker, then two in one consumer group."""
        from stream.tools.stack import local_redis_cluster
        with local_redis_cluster(folder) as cluster:
            self.echo(f"Redis Cluster at {cluster['url']} (ports {cluster['ports']})")
            caps = self.capacities([(f"cluster-{n}-worker{'s' if n > 1 else ''}", "worker", n, cluster["url"])
                                    for n in (1, 2)])
            return {str(c["workers"]): c for c in caps.values()}

    # ---- latency ------------------------------------------------------------------------
    def latency(self, max_rate: float) -> dict[str, Any]:
        """Each load level runs on a fresh worker with fresh topics. tansu's produce->fetch
        latency grows with the number of record batches in a partition (measured with a bare
        aiokafka consumer, no Faust, no group: p50 13 -> 42 ms over 8 x 6 s at 554 records/s),
        so runs on one long-lived topic would measure the dev broker more than the worker."""
        cfg = self.cfg
        samples: dict[str, list[np.ndarray]] = defaultdict(list)
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(cfg.repeats):
            for load in cfg.loads:
                rate = max(1.0, load * max_rate)
                key = f"{load:g}"
                self.echo(f"latency, repeat {r + 1}/{cfg.repeats}: {load:.0%} load = {rate:.0f} events/s")
                s, proc, warm = self._fresh_worker(f"latency-{r}-{int(load * 100)}")
                try:
                    lat, run, _ = self._paced(s, proc, warm, rate, f"l{r}{int(load * 100)}", worker=True)
                finally:
                    proc.stop()
                samples[key].append(lat)
                runs[key].append(run)
                self.echo(f"  p50 {1000 * run['p50_s']:.1f} ms, p95 {1000 * run['p95_s']:.1f} ms, "
                          f"p99 {1000 * run['p99_s']:.1f} ms")
        levels = {}
        for key, rs in runs.items():
            levels[key] = {"load": float(key), "rate_events_per_s": rs[0]["offered_events_per_s"],
                           **{f"p{q}_s": _summ([x[f"p{q}_s"] for x in rs]) for q in (50, 95, 99)},
                           "offered_events_per_s": _summ([x["offered_events_per_s"] for x in rs]),
                           "achieved_events_per_s": _summ([x["achieved_events_per_s"] for x in rs]),
                           "runs": rs}
        cdf = {key: np.sort(np.concatenate(v)).tolist() for key, v in samples.items()}
        return {"max_events_per_s": max_rate, "load_of": "the worker's paced capacity (p99 <= 50 ms)",
                "levels": levels, "samples_s": cdf,
                "definition": "published_at (bench producer, just before send) -> broker timestamp of the "
                              "first label record (the worker's producer, when it queued the record); "
                              f"each run on a fresh worker and fresh topics, after {WARMUP_EVENTS} "
                              "warm-up events"}

    def _fresh_worker(self, name: str) -> tuple[Settings, WorkerProcess, dict[int, int]]:
        s, procs, positions = self._fresh_workers(name, 1)
        return s, procs[0], positions

    def _fresh_workers(self, name: str, n: int, *, redis_url: Optional[str] = None
                       ) -> tuple[Settings, list[WorkerProcess], dict[int, int]]:
        """``n`` workers of one group on fresh topics, ready (with ``n`` > 1: every member
        holding partitions) and warmed up: a few sessions (not measured) have been through
        them, so that first-call costs (allocations, torch's first kernels) are not counted as
        latency under load. Returns the output positions after the warm-up."""
        from stream.tools.stack import ensure_topics
        s = self._settings(name)
        if redis_url:
            s = dataclasses.replace(s, redis_url=redis_url)
        ensure_topics(s)
        members = [dataclasses.replace(s, web_port=free_port()) for _ in range(n)]
        procs = [self._start(m, f"{name}-{i}" if n > 1 else name)
                 for i, m in enumerate(members)]
        try:
            for m, proc in zip(members, procs):
                proc.wait_ready(120)
            if n > 1:
                held = lambda: [_metric(m, "tagger_assigned_partitions") for m in members]  # noqa: E731
                _wait(lambda: min(held()) >= 1 and sum(held()) == s.partitions, procs[0], 120,
                      "every worker of the group holding partitions")
            warm = self._messages(WARMUP_EVENTS, f"warm-{name}")
            n_events = sum(1 for m in warm if m.get("type") != "session_end")
            _run(_produce(self.kw, s.input_topic, [_kv(m) for m in warm]))
            got = _run(_collect(self.kw, s.output_topic, s.partitions, n_events, match=FINAL, proc=procs[0],
                                timeout_s=_timeout(n_events), what="warm-up final labels"))
        except BaseException:
            for proc in procs:
                proc.stop()
            raise
        return members[0], procs, got.positions

    def latency_floor(self, rate: float) -> dict[str, Any]:
        """The same paced load through the bare Faust agent: what the broker, the Faust
        consumer (fetch wait) and producer cost before any tagging."""
        from stream.tools.stack import ensure_topics
        s = self._settings("faust-floor")
        ensure_topics(s, [s.input_topic, s.output_topic])
        self.echo(f"latency floor: bare Faust agent at {rate:.0f} events/s")
        proc = self._start(s, "faust-floor", app="stream.tools.bench_apps:passthrough",
                           args=["--without-web", "-l", "info"])
        try:
            proc.wait_logged("[^Worker]: Ready", 120)
            time.sleep(1.0)
            lat, run, _ = self._paced(s, proc, {}, rate, "floor", worker=False)
        finally:
            proc.stop()
        self.echo(f"  p50 {1000 * run['p50_s']:.1f} ms, p95 {1000 * run['p95_s']:.1f} ms, "
                  f"p99 {1000 * run['p99_s']:.1f} ms")
        return {**run, "samples_s": np.sort(lat).tolist(),
                "definition": "published_at -> broker timestamp of the forwarded copy"}

    def _paced(self, s: Settings, proc: WorkerProcess, start: dict[int, int], rate: float, tag: str, *,
               worker: bool, seconds: Optional[float] = None) -> tuple[np.ndarray, dict[str, Any], dict[int, int]]:
        """Publish ``seconds`` (default ``load_seconds``) of fresh sessions at ``rate`` and read
        back each event's first output: (latencies in s, summary, output positions to continue
        from)."""
        msgs = self._messages(max(50, int(rate * (seconds or self.cfg.load_seconds))), tag)
        n_events = sum(1 for m in msgs if m.get("type") != "session_end")
        published = _run(_publish_paced(self.kw, s.input_topic, msgs, rate))
        got = _run(_collect(self.kw, s.output_topic, s.partitions, n_events if worker else len(msgs),
                            match=FINAL if worker else None, start=start, proc=proc,
                            timeout_s=_timeout(n_events), what="outputs of the paced load"))
        lat, first_ts = [], []
        seen: set = set()
        for t, v in zip(got.ts, got.values):
            if worker and b'"revision":0,' not in v:
                continue
            rec = json.loads(v)
            k = (str(rec["session_id"]), str(rec.get("event_id")))
            if k in published["at"] and k not in seen:
                seen.add(k)
                lat.append(t / 1000.0 - published["at"][k])
                first_ts.append(t)
        lat_a = np.asarray(lat)
        run = {"offered_events_per_s": round(published["events"] / published["seconds"], 1),
               "achieved_events_per_s": _rate(np.asarray(first_ts), len(first_ts))["events_per_s"],
               "events": n_events, "labelled": len(lat),
               **{f"p{q}_s": float(np.percentile(lat_a, q)) for q in (50, 95, 99)}, "max_s": float(lat_a.max())}
        return lat_a, run, got.positions

    # ---- memory -------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        assert self.worker is not None and self.worker_settings is not None
        s, k = self.worker_settings, self.cfg.memory_sessions
        self.echo(f"memory: {k} open sessions through the worker")
        msgs = _stage_messages(self.template, 10 ** 9, f"{self.run_id}m", end_sessions=False, max_sessions=k)
        n_events = len(msgs)
        before = _metric(s, "tagger_events_total", 'result="accepted"')
        _run(_produce(self.kw, s.input_topic, [_kv(m) for m in msgs]))
        _wait(lambda: _metric(s, "tagger_events_total", 'result="accepted"') >= before + n_events,
              self.worker, _timeout(n_events), "worker accepted events")
        per_session = Counter(m["session_id"] for m in msgs)
        usage = _redis_usage(s.redis_url, s.redis_prefix, list(per_session))
        window = int(_model_window(self.artifacts))
        buffered = sum(min(n, window) for n in per_session.values())
        total = usage["total"]
        status = _proc_status(self.worker.proc.pid)
        return {"sessions": len(per_session), "events": n_events, "window": window,
                "buffered_events": buffered, "redis_bytes_total": total, "redis_bytes_by_key": usage["by_key"],
                "redis_bytes_per_session": round(total / len(per_session), 1),
                "redis_bytes_per_event": round(total / n_events, 1),
                "redis_bytes_per_buffered_event": round(total / max(buffered, 1), 1),
                "worker_rss_bytes": status.get("VmRSS"), "worker_peak_rss_bytes": status.get("VmHWM")}

    # ---- profile ------------------------------------------------------------------------
    def profile(self) -> dict[str, Any]:
        """One more worker run with py-spy attached: the worker starts on an empty topic, the
        sampler attaches once it is ready, then the topic is filled as fast as possible.

        py-spy samples only the thread holding the GIL (``--gil``): the worker's Python work
        (event loop, model executor, Faust's consumer thread) is serialised by the GIL, so
        that profile is where its throughput goes; without ``--gil`` threads waiting for the
        GIL show up as time in whatever call released it (socket writes, mostly)."""
        from stream.tools.stack import ensure_topics
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            return {"error": "py-spy is not installed (pip install py-spy)"}
        s = dataclasses.replace(self._settings("worker-profile"), web_port=free_port())
        ensure_topics(s)
        n = self.cfg.events * 2
        msgs = self._messages(n, "prof")
        n_events = sum(1 for m in msgs if m.get("type") != "session_end")
        # -v: the worker logs each batch's phases (model, queueing, acks) at debug level
        proc = self._start(s, "worker-profile", verbose=True)
        raw = self.out / "logs" / "profile.raw.txt"
        try:
            proc.wait_ready(120)
            self.echo(f"profile: py-spy on the worker (pid {proc.proc.pid}) for {n_events} events")
            sampler = subprocess.Popen([spy, "record", "--pid", str(proc.proc.pid), "--format", "raw",
                                        "--output", str(raw), "--rate", "200", "--threads", "--gil", "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            if sampler.poll() is not None:
                return {"error": f"py-spy exited: {sampler.stderr.read().decode(errors='replace')[-500:]}"}
            t0 = time.monotonic()
            _run(_produce(self.kw, s.input_topic, [_kv(m) for m in msgs]))
            _run(_collect(self.kw, s.output_topic, s.partitions, n_events, match=FINAL, proc=proc,
                          timeout_s=_timeout(n_events), what="worker final labels"))
            seconds = time.monotonic() - t0
            sampler.send_signal(signal.SIGINT)
            try:
                sampler.wait(30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                sampler.wait(5)
        finally:
            proc.stop()
        if not raw.exists():
            return {"error": "py-spy wrote no profile"}
        summary = summarize_pyspy(raw.read_text(errors="replace"))
        summary.update(events=n_events, seconds=round(seconds, 2), raw=str(raw.relative_to(self.out)),
                       events_per_s_while_sampled=round(n_events / seconds, 1),
                       batches=batch_phases(proc.log.read_text(errors="replace")))
        return summary

    # ---- processes ----------------------------------------------------------------------
    def _start(self, s: Settings, name: str, *, app: Optional[str] = None, args: Sequence[str] = (),
               verbose: bool = False, module: str = "tagger.cli") -> WorkerProcess:
        """A worker (or, with ``app``, a bare Faust app) in a fresh temporary folder, logging
        to ``logs/NAME.log``; stopped by ``close``. Its code comes from ``REPO_ROOT``."""
        path = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        p = WorkerProcess.start(s, self.out / "logs" / f"{name}.log", app=app, args=args,
                                verbose=verbose, module=module, env={"PYTHONPATH": path})
        self.procs.append(p)
        return p


def _wait(check: Callable[[], bool], proc: Optional[WorkerProcess], timeout_s: float, what: str) -> None:
    """Until ``check()`` is true (``StackError`` with the log's tail if ``proc`` exits first)."""
    def probe() -> None:
        if not check():
            raise TimeoutError(f"{what}: not yet")
    wait_until(probe, what, timeout_s, proc.proc if proc else None, proc.log if proc else None)


def _timeout(n: int) -> float:
    return 90.0 + n / 100.0  # a busy 2-core machine still does >100 events/s


def _metric(s: Settings, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return metric_value(text, f"{name}{{{labels}}}" if labels else name)


# =========================================================================== Kafka helpers


_run = run_sync


def _kv(msg: dict) -> tuple[bytes, bytes]:
    return str(msg["session_id"]).encode(), json.dumps(msg, separators=(",", ":")).encode()


async def _produce(kw: dict, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
    """Publish pre-encoded (key, value) pairs as fast as the producer takes them."""
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(linger_ms=10, max_batch_size=1 << 20, acks=1, **kw)
    await producer.start()
    try:
        futs = [await producer.send(topic, value=v, key=k) for k, v in messages]
        await producer.flush()
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _publish_paced(kw: dict, topic: str, messages: Sequence[dict], rate: float) -> dict[str, Any]:
    """Publish at ``rate`` events/s (``session_end`` not counted), each with ``published_at``."""
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(linger_ms=0, acks=1, **kw)
    await producer.start()
    at: dict[tuple[str, str], float] = {}
    loop = asyncio.get_running_loop()
    sent = 0
    futs = []
    try:
        start = loop.time()
        i = 0
        while i < len(messages):
            due = int((loop.time() - start) * rate) + 1
            while i < len(messages) and (sent < due or messages[i].get("type") == "session_end"):
                msg = dict(messages[i])
                i += 1
                msg["published_at"] = time.time()
                k, v = _kv(msg)
                futs.append(await producer.send(topic, value=v, key=k))
                if msg.get("type") != "session_end":
                    at[(str(msg["session_id"]), str(msg["event_id"]))] = msg["published_at"]
                    sent += 1
            await asyncio.sleep(0.002)
        seconds = loop.time() - start
        await producer.flush()
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return {"at": at, "events": sent, "seconds": max(seconds, 1e-9)}


def _consumer(kw: dict):
    from aiokafka import AIOKafkaConsumer
    return AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, max_partition_fetch_bytes=8 << 20,
                            fetch_max_bytes=64 << 20, **kw)


async def _collect(kw: dict, topic: str, partitions: int, expected: int, *, match: Optional[bytes] = None,
                   start: Optional[dict[int, int]] = None, proc: Optional[WorkerProcess] = None,
                   timeout_s: float = 120.0, what: str = "outputs") -> "_Records":
    """Consume ``topic`` (from ``start`` positions, else the beginning) until ``expected``
    records containing ``match`` (all records when None) have been read; returns every
    record read with its broker timestamp (ms) and the positions to continue from.

    Completion is counted rather than read from end offsets: tansu reports a partition's
    end as the last *batch* base offset + 1, which undercounts batched records.
    """
    from aiokafka import TopicPartition
    c = _consumer(kw)
    await c.start()
    ts: list[int] = []
    values: list[bytes] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        for tp in tps:
            if start and tp.partition in start:
                c.seek(tp, start[tp.partition])
            else:
                await c.seek_to_beginning(tp)
        seen = 0
        deadline = time.monotonic() + timeout_s
        while seen < expected:
            if proc is not None and proc.proc.poll() is not None:
                raise StackError(f"{what}: the process exited with {proc.proc.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{what}: {seen} of {expected} after {timeout_s:.0f} s"
                                 + (f"\n{proc.tail()}" if proc else ""))
            batch = await c.getmany(timeout_ms=250, max_records=20_000)
            for msgs in batch.values():
                for m in msgs:
                    ts.append(m.timestamp)
                    values.append(m.value)
                    if match is None or match in m.value:
                        seen += 1
        positions = {tp.partition: await c.position(tp) for tp in tps}
    finally:
        await c.stop()
    return _Records(np.asarray(ts, dtype=np.int64), values, positions)


@dataclass
class _Records:
    ts: np.ndarray          # broker timestamps, ms
    values: list[bytes]
    positions: dict[int, int]


async def _aiokafka_loop(kw: dict, src: str, dst: str, partitions: int, n: int) -> None:
    """The bare consume -> produce loop: poll a batch, send each message, await the acks."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    from stream.tools.bench_apps import forward_fetched
    c = _consumer(kw)
    producer = AIOKafkaProducer(acks="all", **kw)
    await c.start()
    await producer.start()
    try:
        tps = [TopicPartition(src, p) for p in range(partitions)]
        c.assign(tps)
        for tp in tps:
            await c.seek_to_beginning(tp)
        done = 0
        while done < n:
            done += await forward_fetched(c, producer, dst, 500)
    finally:
        await producer.stop()
        await c.stop()


def _rate(ts_ms: np.ndarray, expected: int) -> dict[str, Any]:
    """Outputs per second from their timestamps: those after the first millisecond over the
    span first -> last (the first batch's own processing time is not in the span)."""
    ts_ms = np.asarray(ts_ms)
    if ts_ms.size < 2:
        raise StackError(f"too few outputs to time ({ts_ms.size} of {expected})")
    t0, t1 = int(ts_ms.min()), int(ts_ms.max())
    span = max(t1 - t0, 1) / 1000.0
    after = int((ts_ms > t0).sum())
    return {"events_per_s": round(after / span, 1), "outputs": int(ts_ms.size), "expected": expected,
            "span_s": round(span, 3)}


# =========================================================================== data


def _generated(folder: Path, sessions: int, seed: int, name: str) -> Path:
    from trainer.generate import generate
    path = folder / f"{name}_{sessions}_{seed}.csv"
    if not path.exists():
        generate(sessions, seed, path)
    return path


def _template(csv: Path) -> list[list[dict]]:
    """The pool's sessions as message lists in replay order (``session_end`` last)."""
    from stream.tools.publisher import replay_messages
    from trainer.loading import read_events
    frame, _ = read_events(csv)
    messages, _ = replay_messages(frame, end_sessions=True)
    by_session: dict[str, list[dict]] = {}
    for m in messages:
        by_session.setdefault(str(m["session_id"]), []).append(m)
    return list(by_session.values())


def _stage_messages(template: list[list[dict]], n_events: int, tag: str, *, end_sessions: bool = True,
                    max_sessions: Optional[int] = None) -> list[dict]:
    """At least ``n_events`` events (whole sessions, cycling through the pool) under session
    ids unique to ``tag``; sessions are interleaved round-robin, as live agents overlap."""
    chosen: list[list[dict]] = []
    count = 0
    i = 0
    while count < n_events and (max_sessions is None or len(chosen) < max_sessions):
        src = template[i % len(template)]
        sid = f"{tag}-{i}"
        sess = [{**m, "session_id": sid} for m in src if end_sessions or m.get("type") != "session_end"]
        chosen.append(sess)
        count += sum(1 for m in sess if m.get("type") != "session_end")
        i += 1
    # Interleave a few dozen sessions at a time: agents overlap, and each batch then steps
    # many sessions at once as in production (a session's own events stay in order).
    out: list[dict] = []
    width = 64
    for g in range(0, len(chosen), width):
        group = [list(s) for s in chosen[g:g + width]]
        while any(group):
            for s in group:
                if s:
                    out.append(s.pop(0))
    return out


def _train_served_model(cfg: BenchConfig, out: Path, echo) -> Path:
    """The model the worker serves: a small BiLSTM in quick mode, the demo's otherwise."""
    from trainer.artifacts import load_artifact
    from trainer.config import from_dict
    from trainer.errors import ArtifactError
    from trainer.train import train
    name = "worker-bilstm-quick" if cfg.quick else "worker-bilstm"
    model_dir = out / "models" / name
    try:
        load_artifact(model_dir)
        echo(f"serving the model already trained in {model_dir}")
        return model_dir
    except ArtifactError:
        pass
    data = _generated(out / "data", cfg.train_sessions, cfg.seed + 1, "train")
    conf = ({"model": SMALL_MODEL, "train": {"epochs": 6, "patience": 3, "batch_size": 16}} if cfg.quick
            else {"train": {"epochs": 12, "patience": 3}})
    echo(f"training the served BiLSTM on {cfg.train_sessions} generated sessions -> {model_dir}")
    train(data, model_dir, from_dict(conf), progress=False, echo=lambda *_: None)
    return model_dir


def _model_info(model_dir: Path) -> dict[str, Any]:
    from trainer.artifacts import load_artifact
    from trainer.config import candidate_of
    lm = load_artifact(model_dir)
    args = lm.manifest.get("model_args", {})
    if args.get("arch") == "mixture":           # model.arch auto: describe the network member
        members = args.get("members") or []
        net = next((m for m in members if m.get("arch") != "crf"), members[0] if members else {})
        arch = "mixture of " + ", ".join(candidate_of(m) for m in members)
        args = {**net, "arch": arch}
    return {"path": str(model_dir), "version": lm.version, "arch": args.get("arch"),
            "lookahead": lm.lookahead, "context": args.get("context"), "hidden_dim": args.get("hidden_dim"),
            "num_layers": args.get("num_layers"), "labels": len(lm.labels)}


def _model_window(artifacts: Path) -> int:
    from trainer.artifacts import load_artifact
    args = load_artifact(artifacts).manifest.get("model_args", {})
    return int(args.get("context", 64)) + int(args.get("lookahead") or 0)


# =========================================================================== Redis


def _redis_usage(url: str, prefix: str, session_ids: Sequence[str]) -> dict[str, Any]:
    """``MEMORY USAGE`` of the sessions' keys (meta, window, ids) and of the open-session
    indexes they appear in (shared, counted in full)."""
    from stream.redis_client import sync_client  # one server or a cluster
    client = sync_client(url)
    try:
        by_key: Counter = Counter()
        pipe = client.pipeline(transaction=False)
        parts = ("meta", "win", "ids")
        for sid in session_ids:
            for part in parts:
                pipe.memory_usage(f"{prefix}s:{{{sid}}}:{part}", samples=0)
        for i, v in enumerate(pipe.execute()):
            by_key[parts[i % 3]] += int(v or 0)
        for key in client.scan_iter(match=f"{prefix}open:*", count=1000):
            by_key["open"] += int(client.memory_usage(key, samples=0) or 0)
        return {"total": int(sum(by_key.values())), "by_key": dict(by_key)}
    finally:
        client.close()


def _delete_redis_prefix(url: str, prefix: str) -> None:
    from stream.redis_client import sync_client  # one server or a cluster
    client = sync_client(url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    except Exception:  # best effort: every key carries a TTL anyway
        pass
    finally:
        client.close()


# =========================================================================== engine scaling


def stage_scaling(model_dir: Path, pool: Path, cfg: BenchConfig, redis_url: str, prefix: str,
                  echo=print) -> dict[str, Any]:
    """Per-event cost of ``LiveTagger.process`` and of the Redis write-through at positions
    10, 100, 1000 of long sessions.

    One group of B sessions per position, stepped in lockstep (one event of each session per
    call, like a worker batch of B concurrent sessions), each advanced to just before its
    position; then the groups' calls at positions p-8 .. p+8 are interleaved, so that load
    from elsewhere on the machine hits every position alike. The longest group's calls also
    give the cost-vs-position curve. After each call the touched sessions are written
    through to Redis as the worker does (``snapshot`` + ``RedisSessionStore.save``)."""
    from stream.records import EventIn
    from stream.tools.replay import frame_events
    from stream.session_store import RedisSessionStore
    from stream.tagging import LiveTagger
    from trainer.artifacts import load_artifact
    from trainer.loading import read_events

    frame, _ = read_events(pool)
    flat = [ev for evs in frame_events(frame).values() for ev in evs]
    positions = sorted(cfg.positions)
    B = cfg.lockstep_sessions
    half = max(1, min(8, positions[0] - 2))     # calls at positions p-half .. p+half
    top = positions[-1]
    lm = load_artifact(model_dir)
    tagger = LiveTagger(lm)
    loop = asyncio.new_event_loop()
    store = RedisSessionStore(redis_url, prefix=prefix)

    def long_sessions(tag: str, length: int) -> list[list[EventIn]]:
        out = []
        for b in range(B):
            ts = 1.7e9 + 86400.0 * b
            seq = []
            for i in range(length):
                ev = flat[(b * length + i) % len(flat)]
                prev = flat[(b * length + i - 1) % len(flat)]
                gap = ev.ts - prev.ts if i and prev.session_id == ev.session_id else 5.0
                ts += min(max(gap, 0.0), 600.0)
                stamp = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()
                fields = {k: v for k, v in ev.fields.items() if k not in ("session_id", "event_id", "timestamp")}
                seq.append(EventIn(f"{tag}-{b}", f"e{i}", stamp, ts, ev.event_name, "event", fields))
            out.append(seq)
        return out

    def call(group: list[list[EventIn]], i: int) -> tuple[float, float]:
        """Step every session of the group by its i-th event; seconds per event (model, Redis)."""
        t0 = time.perf_counter()
        res = tagger.process([s[i] for s in group])
        t1 = time.perf_counter()
        loop.run_until_complete(store.save([tagger.snapshot(sid) for sid in res.touched], tagger.window_size))
        t2 = time.perf_counter()
        return (t1 - t0) / B, (t2 - t1) / B

    def end(sids: list[str]) -> None:
        tagger.process([EventIn(sid, "", "", 0.0, "", "session_end", {}) for sid in sids])
        tagger.drop(sids)

    measured: dict[int, list[list[tuple[float, float]]]] = {p: [] for p in positions}
    curves, mem = [], []
    try:
        warm = long_sessions("warmup", 20)
        for i in range(20):
            call(warm, i)
        end([s[0].session_id for s in warm])
        for r in range(cfg.repeats):
            echo(f"scaling, repeat {r + 1}/{cfg.repeats}: {len(positions)} groups of {B} sessions in lockstep, "
                 f"to position {top + half}")
            groups = {p: long_sessions(f"long{r}p{p}", p + half) for p in positions}
            curve = []
            for p in positions:
                for i in range(p - 1 - half):
                    c = call(groups[p], i)
                    if p == top:
                        curve.append(c)
            calls: dict[int, list[tuple[float, float]]] = {p: [] for p in positions}
            for k in range(2 * half + 1):
                for p in (positions if k % 2 == 0 else positions[::-1]):
                    calls[p].append(call(groups[p], p - 1 - half + k))
            curve += calls[top]
            for p in positions:
                measured[p].append(calls[p])
            curves.append(np.asarray(curve))
            top_sids = [s[0].session_id for s in groups[top]]
            mem.append(_redis_usage(redis_url, prefix, top_sids)["total"] / B)
            end([s[0].session_id for g in groups.values() for s in g])
    finally:
        loop.run_until_complete(store.close())
        loop.close()

    def med(p: int, j: int) -> list[float]:  # per repeat: median µs/event of the calls around p
        return [1e6 * float(np.median([c[j] for c in calls])) for calls in measured[p]]

    first = positions[0]
    ratios = [b / a for a, b in zip(med(first, 0), med(top, 0))]
    curve = np.median(np.stack(curves), axis=0) * 1e6      # (positions, 2)
    all_calls = [c for p in positions for calls in measured[p] for c in calls]
    return {"sessions_in_lockstep": B, "length": top + half, "window_calls": 2 * half + 1,
            "positions": {str(p): {"step_us": _summ(med(p, 0)), "redis_write_us": _summ(med(p, 1))}
                          for p in positions},
            "ratio_last_first": _summ(ratios),
            "ratio_definition": f"engine cost per event at position {top} / at position {first}",
            "step_us_per_event": {"median": 1e6 * float(np.median([c[0] for c in all_calls]))},
            "redis_write_us_per_event": _summ([1e6 * float(np.median([c[1] for p in positions
                                                                     for c in measured[p][r]]))
                                               for r in range(len(curves))]),
            "redis_bytes_per_session_at_end": round(float(np.median(mem)), 1),
            "curve_step_us": [round(float(x), 2) for x in curve[:, 0]],
            "curve_redis_write_us": [round(float(x), 2) for x in curve[:, 1]]}


# =========================================================================== label quality


def stage_quality(cfg: BenchConfig, out: Path, echo=print) -> dict[str, Any]:
    """Train each architecture and the baseline per dataset; score offline and streaming."""
    datasets: list[tuple[str, Path, Path]] = [(
        "generated", _generated(out / "data", cfg.quality_train_sessions, cfg.seed + 2, "quality_train"),
        _generated(out / "data", cfg.quality_test_sessions, cfg.seed + 3, "quality_test"))]
    if cfg.real_data is not None and Path(cfg.real_data).is_dir():
        for train_csv in sorted(Path(cfg.real_data).glob("*.train.csv")):
            test_csv = train_csv.with_name(train_csv.name.replace(".train.csv", ".test.csv"))
            if test_csv.exists():
                datasets.append((train_csv.name[:-len(".train.csv")], train_csv, test_csv))
    res: dict[str, Any] = {}
    for name, train_csv, test_csv in datasets:
        res[name] = {"train": str(train_csv), "test": str(test_csv), "models": {}}
        for arch in QUALITY_ARCHS:
            echo(f"quality: {arch} on {name}")
            try:
                res[name]["models"][arch] = _quality_one(cfg, out / "quality" / name, arch, train_csv, test_csv)
            except Exception as exc:  # one failed model should not void the other figures
                res[name]["models"][arch] = {"error": f"{type(exc).__name__}: {exc}"}
                echo(f"  failed: {exc}")
    return res


def _quality_one(cfg: BenchConfig, folder: Path, arch: str, train_csv: Path, test_csv: Path) -> dict[str, Any]:
    from trainer.artifacts import load_artifact
    from trainer.config import from_dict
    from trainer.evaluate import evaluate
    from trainer.loading import read_events
    from trainer.train import train

    conf: dict[str, Any] = {"data": {"test_size": 0.0}, "model": {"arch": arch}, "train": {}}
    if cfg.quick:
        conf["model"].update(SMALL_MODEL)
        conf["train"].update(epochs=4, patience=2, batch_size=16)
    else:
        conf["train"].update(epochs=12, patience=3)
    model_dir = folder / arch
    t0 = time.perf_counter()
    metrics = train(train_csv, model_dir, from_dict(conf), progress=False, echo=lambda *_: None)
    train_s = time.perf_counter() - t0
    lm = load_artifact(model_dir)
    frame, _ = read_events(test_csv, require_label=True, numeric_columns=lm.encoder.data.num_features)
    t0 = time.perf_counter()
    lm.predict_proba(frame, base_dir=test_csv.parent)
    offline_us = 1e6 * (time.perf_counter() - t0) / max(len(frame), 1)
    streaming = lm.kind == "neural" and lm.lookahead is not None
    from stream.tools.replay import streaming_evaluation
    ev = evaluate(model_dir, test_csv, folder / f"{arch}.json", plots=False,
                  streaming=streaming_evaluation if streaming else None)
    rc = ev["details"]["risk_coverage"]
    return {"offline": ev["offline"], "streaming": ev.get("streaming"), "events": ev["events"],
            "sessions": ev["sessions"], "train_seconds": round(train_s, 2),
            "fit_seconds": metrics.get("train_seconds"),
            "offline_us_per_event": round(offline_us, 1),
            "streaming_us_per_event": (ev.get("streaming") or {}).get("us_per_event"),
            "risk_coverage": rc.get("model", rc)}


# =========================================================================== profile summary


IDLE_LEAVES = re.compile(r"^(EpollSelector\.select|select|_worker|Condition\.wait|wait) "
                         r"\((selectors|concurrent/futures/thread|threading)\.py\)$")


# Inclusive time is shown for the project's own functions (and the library calls it makes
# most), not for the event-loop and thread plumbing every stack passes through.
PROJECT_PATHS = ("(redis/asyncio/client.py)", "(aiokafka/producer/producer.py)",
                 "(faust/transport/consumer.py)", "(json/__init__.py)")
ENTRY_FRAMES = re.compile(r"^(main|cmd_worker|<module>) \(")


def summarize_pyspy(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy ``--format raw --threads`` output (collapsed stacks: ``thread;frame;...;frame
    count``) -> busy samples per thread and the functions with the most self and inclusive
    samples, in percent of all busy samples. Stacks whose leaf is an idle wait (an event
    loop's ``select``, an executor thread waiting for work) are counted apart as idle."""
    per_thread: Counter = Counter()
    self_t: Counter = Counter()
    incl: Counter = Counter()
    thread_self: dict[str, Counter] = defaultdict(Counter)
    total = idle = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        thread = ""
        while frames and frames[0].startswith(("thread", "process")):
            thread, frames = frames[0], frames[1:]
        names = [_frame_name(f) for f in frames]
        if not names or IDLE_LEAVES.match(names[-1]):
            idle += count
            continue
        total += count
        t = _thread_name(thread)
        per_thread[t] += count
        self_t[names[-1]] += count
        thread_self[t][names[-1]] += count
        for nm in set(names):
            if nm.endswith(PROJECT_PATHS) or " (stream/" in nm or " (trainer/" in nm:
                incl[nm] += count

    def pct(c: Counter, n: int = top) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "percent": round(100.0 * v / max(total, 1), 1)}
                for k, v in c.most_common(n)]

    for k in [k for k in incl if ENTRY_FRAMES.match(k)]:
        del incl[k]
    return {"samples": total, "idle_samples": idle, "threads": pct(per_thread), "self": pct(self_t),
            "inclusive": pct(incl, 2 * top),
            "self_by_thread": {t: pct(c, 8) for t, c in thread_self.items()}}


def batch_phases(log: str) -> dict[str, Any]:
    """The worker's debug lines ``phases: model M queue Q ack A save S ms (R records)`` and
    ``batch of N in T ms`` -> batch sizes and where a batch's time goes."""
    ph = np.asarray(re.findall(r"phases: model ([\d.]+) queue ([\d.]+) ack ([\d.]+) save ([\d.]+) ms "
                               r"\((\d+) records\)", log), dtype=float).reshape(-1, 5)
    bt = np.asarray(re.findall(r"batch of (\d+) in ([\d.]+) ms", log), dtype=float).reshape(-1, 2)
    if not len(ph) or not len(bt):
        return {}
    total = float(bt[:, 1].sum())
    model, queue, ack, save = (float(x) for x in ph[:, :4].sum(0))
    return {"batches": int(len(bt)), "events_median": float(np.median(bt[:, 0])),
            "events_mean": round(float(bt[:, 0].mean()), 1), "events_max": int(bt[:, 0].max()),
            "batch_ms_median": float(np.median(bt[:, 1])), "total_ms": round(total, 1),
            "share": {"model (executor)": round(model / total, 3), "produce (queue records)": round(queue / total, 3),
                      "broker acks": round(ack / total, 3), "Redis save": round(save / total, 3),
                      "other (parse, Redis load, metrics)": round(1 - (model + queue + ack + save) / total, 3)}}


def _thread_name(frame: str) -> str:
    # "thread (0x7F..)" or "thread (1234): MainThread" (py-spy --threads)
    return frame.rpartition("): ")[2] if "): " in frame else (frame or "main")


def _frame_name(frame: str) -> str:
    # "process (stream/tagging.py:123)" -> "process (stream/tagging.py)"
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    fn, path = m.groups()
    for marker in ("site-packages/", "/work/main/", str(REPO_ROOT) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{fn} ({path})"


# =========================================================================== output


def write_results(res: dict[str, Any], out: Path, *, json_out: str | Path | None = None,
                  readme: str | Path | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "headline": out / "headline.json", "report": out / "report.md",
             "readme_table": out / "readme_table.md"}
    paths.update(write_plots(res, out))
    paths["results"].write_text(json.dumps(_plain(res), indent=1))
    paths["headline"].write_text(json.dumps(_plain(res["headline"]), indent=2))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(_plain(res["headline"]), indent=2))
    table = readme_table(res)
    paths["readme_table"].write_text(table)
    paths["report"].write_text(format_report(res, {k: v.name for k, v in paths.items() if v.suffix == ".png"}))
    if readme:
        update_readme(Path(readme), table)
    return paths


def write_plots(res: dict[str, Any], out: Path) -> dict[str, Path]:
    from matplotlib.figure import Figure

    from trainer.report import plot_risk_coverage
    paths: dict[str, Path] = {}
    lat = res["latency"]

    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    for key, xs in lat["samples_s"].items():
        x = 1000 * np.asarray(xs)
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size,
                    label=f"{float(key):.0%} load ({lat['levels'][key]['rate_events_per_s']:.0f} events/s)")
    if lat.get("floor"):
        x = 1000 * np.asarray(lat["floor"]["samples_s"])
        ax.plot(x, np.arange(1, x.size + 1) / x.size, color="0.4", linestyle="--",
                label="bare Faust agent, 50% load (floor)")
    ax.axvline(1000 * TARGETS["latency_p99_s_at_50pct"], color="crimson", linestyle="--", linewidth=1,
               label="p99 target at 50% load")
    ax.axhline(0.99, color="0.6", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    paths["latency_cdf"] = _finish(fig, ax, out / "latency_cdf.png", "publication -> first label (ms, log scale)",
                                   "share of events", "First-label latency under load (worker)")

    tp = res["throughput"]
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    xs = [lv["offered_events_per_s"]["median"] for lv in lat["levels"].values()]
    ys = [lv["achieved_events_per_s"]["median"] for lv in lat["levels"].values()]
    wmax = tp["worker"]["events_per_s"]
    ax.plot(xs, ys, marker="o", label="worker, paced load")
    ax.errorbar([wmax["median"]], [wmax["median"]],
                yerr=[[wmax["median"] - wmax["min"]], [wmax["max"] - wmax["median"]]],
                marker="*", markersize=12, linestyle="none", color="crimson", label="worker, saturated (backlog)")
    hi = max(xs + [wmax["max"]]) * 1.15
    ax.plot([0, hi], [0, hi], color="0.7", linestyle=":", linewidth=1, label="achieved = offered")
    for name, style in (("faust_passthrough", "--"), ("faust_batched_passthrough", "-."),
                        ("aiokafka_passthrough", ":")):
        if name not in tp:
            continue
        v = tp[name]["events_per_s"]["median"]
        ax.axhline(v, linestyle=style, linewidth=1, color="0.3")
        ax.annotate(f"{name} {v:,.0f}/s", (0.99 * hi, v), fontsize=7, va="bottom", ha="right")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, max(hi, tp["faust_passthrough"]["events_per_s"]["median"] * 1.1))
    paths["throughput_vs_load"] = _finish(fig, ax, out / "throughput_vs_load.png", "offered load (events/s)",
                                          "labelled (events/s)",
                                          "Throughput vs offered load (aiokafka loop may be off the top)")

    sc = res["scaling"]
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    curve = np.asarray(sc["curve_step_us"])
    wcurve = np.asarray(sc["curve_redis_write_us"])
    pos = np.arange(1, curve.size + 1)
    ax.plot(pos, _rolling_median(curve, 9), label="engine step (LiveTagger.process)")
    ax.plot(pos, _rolling_median(wcurve, 9), label="Redis write-through (snapshot + save)")
    for p, v in sc["positions"].items():
        ax.plot([int(p)], [v["step_us"]["median"]], marker="o", color="crimson")
        ax.annotate(f"{v['step_us']['median']:.0f} µs", (int(p), v["step_us"]["median"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("position in the session (log scale)")
    ax.set_ylabel(f"µs per event ({sc['sessions_in_lockstep']} sessions per call, rolling median of 9)")
    ax.set_title(f"Per-event cost vs position (position {_positions(sc)[-1]} / {_positions(sc)[0]}: "
                 f"{sc['ratio_last_first']['median']:.2f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths["cost_vs_position"] = _save(fig, out / "cost_vs_position.png")

    for ds, block in (res.get("quality") or {}).items():
        curves = {arch: m["risk_coverage"] for arch, m in block["models"].items() if m.get("risk_coverage")}
        aurcs = {arch: m["offline"].get("aurc") for arch, m in block["models"].items() if m.get("offline")}
        if curves:
            paths[f"risk_coverage_{ds}"] = plot_risk_coverage(curves, out / f"risk_coverage_{ds}.png", aurcs=aurcs)
    return paths


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid and legend of one bench plot; saved to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    return path


def _rolling_median(x: np.ndarray, k: int) -> np.ndarray:
    if x.size < k:
        return x
    pad = np.pad(x, (k // 2, k - 1 - k // 2), mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(pad, k), axis=1)


def _fmt_summ(s: dict[str, Any], scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    med = f"{s['median'] * scale:,.{digits}f}{unit}"
    if s.get("n", 1) > 1:
        return f"{med} ({s['min'] * scale:,.{digits}f}–{s['max'] * scale:,.{digits}f})"
    return med


def _positions(sc: dict[str, Any]) -> list[str]:
    return sorted(sc["positions"], key=int)


def _mark(ok: Optional[bool]) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def headline_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    tp, lat, sc, mem = res["throughput"], res["latency"], res["scaling"], res["memory"]
    h = res["headline"]
    half = lat["levels"].get("0.5") or next(iter(lat["levels"].values()))
    first, last = _positions(sc)[0], _positions(sc)[-1]
    cap_w, cap_f = res["capacity"]["worker"], res["capacity"]["faust"]
    win = f"{cap_w['window_s']:g} s window"
    cluster = res.get("cluster") or {}
    cpu = h["worker_cpu_ms_per_event_at_500"]
    return [
        (f"capacity at p99 ≤ {1000 * P99_TARGET_S:.0f} ms, worker / bare Faust agent (events/s, paced, {win})",
         f"{cap_w['events_per_s']:,.0f} / {cap_f['events_per_s']:,.0f}",
         f"≥ {TARGETS['capacity_vs_faust']:.0%} of Faust agent (ratio {h['capacity_vs_faust']:.3f})",
         _mark(h["capacity_vs_faust"] >= TARGETS["capacity_vs_faust"]) if cap_f["events_per_s"] else "—"),
        (f"worker CPU per event at {CPU_PROBE_RATE:.0f} events/s paced (ms; bare Faust agent)",
         ("—" if cpu is None else f"{cpu:.3f}") + (f" ({h['faust_cpu_ms_per_event_at_500']:.3f})"
                                                    if h.get("faust_cpu_ms_per_event_at_500") else ""),
         f"≤ {TARGETS['worker_cpu_ms_per_event_at_500']}",
         "—" if cpu is None else _mark(cpu <= TARGETS["worker_cpu_ms_per_event_at_500"])),
        *([(f"Kafka client alone at {CPU_PROBE_RATE:.0f} events/s paced, aiokafka / librdkafka (CPU ms/event)",
            f"{h['aiokafka_cpu_ms_per_event_at_500']:.3f} / {h['librdkafka_cpu_ms_per_event_at_500']:.3f}",
            "floor of a worker on that client", "")]
          if h.get("aiokafka_cpu_ms_per_event_at_500") else []),
        *([("capacity on a Redis Cluster (3 masters), 1 / 2 workers (events/s)",
            f"{cluster['1']['events_per_s']:,.0f} / {cluster['2']['events_per_s']:,.0f}", "", "")]
          if cluster else []),
        ("worker throughput, backlog (events/s)", _fmt_summ(tp["worker"]["events_per_s"]),
         f"≥ {TARGETS['worker_vs_faust']:.0%} of Faust agent (ratio {h['worker_vs_faust']:.3f})",
         _mark(h["worker_vs_faust"] >= TARGETS["worker_vs_faust"])),
        ("bare Faust agent (events/s)", _fmt_summ(tp["faust_passthrough"]["events_per_s"]), "", ""),
        *([("Faust agent, worker's batch loop (events/s)",
            _fmt_summ(tp["faust_batched_passthrough"]["events_per_s"]), "", "")]
          if "faust_batched_passthrough" in tp else []),
        ("bare aiokafka loop (events/s)", _fmt_summ(tp["aiokafka_passthrough"]["events_per_s"]),
         f"worker/aiokafka {h['worker_vs_aiokafka']:.3f}", ""),
        ("first-label latency p50 / p95 / p99 at 50% of capacity (ms)",
         f"{_fmt_summ(half['p50_s'], 1000, 1)} / {_fmt_summ(half['p95_s'], 1000, 1)} / "
         f"{_fmt_summ(half['p99_s'], 1000, 1)}", f"p99 < {1000 * TARGETS['latency_p99_s_at_50pct']:.0f} ms",
         _mark(half["p99_s"]["median"] < TARGETS["latency_p99_s_at_50pct"])),
        *([("latency floor: bare Faust agent at the same load, p50 / p99 (ms)",
            f"{1000 * lat['floor']['p50_s']:.1f} / {1000 * lat['floor']['p99_s']:.1f}", "", "")]
          if lat.get("floor") else []),
        (f"engine cost per event at position {' / '.join(_positions(sc))} (µs)",
         " / ".join(_fmt_summ(sc["positions"][p]["step_us"], 1, 0) for p in _positions(sc)), "", ""),
        (f"cost ratio position {last} / {first}", _fmt_summ(sc["ratio_last_first"], 1, 2),
         f"≤ {TARGETS['cost_ratio_pos1000_pos10']}",
         _mark(sc["ratio_last_first"]["median"] <= TARGETS["cost_ratio_pos1000_pos10"])),
        ("Redis write-through (µs/event)", _fmt_summ(sc["redis_write_us_per_event"], 1, 0), "", ""),
        ("Redis bytes per open session / per event", f"{mem['redis_bytes_per_session']:,.0f} / "
         f"{mem['redis_bytes_per_event']:,.0f}", "", ""),
        (f"Redis bytes per session at position {sc['length']}", f"{sc['redis_bytes_per_session_at_end']:,.0f}", "", ""),
        ("worker RSS (MiB)", f"{(mem['worker_rss_bytes'] or 0) / 2 ** 20:,.0f} (peak "
         f"{(mem['worker_peak_rss_bytes'] or 0) / 2 ** 20:,.0f})", "", ""),
    ]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def readme_table(res: dict[str, Any]) -> str:
    m = res["machine"]
    n = res["config"]["repeats"]
    mode = ("quick run (small sizes), " if res["quick"] else "full run, ") + (
        f"median of {n} runs (min–max)" if n > 1 else "one run")
    return (f"`{res['command']}` on {m['cpu']} ({m['cpus']} CPUs, load average {m['loadavg_start']} at start), "
            f"{res['started_at'][:10]}; {mode}; model {res['model']['arch']} "
            f"(hidden {res['model']['hidden_dim']}, lookahead {res['model']['lookahead']}).\n\n"
            + _md_table(("figure", "measured", "target", ""), headline_rows(res)))


def update_readme(path: Path, table: str) -> bool:
    """Replace the text between the bench markers in ``path``; False if it has none."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")
    return True


def format_report(res: dict[str, Any], plots: dict[str, str]) -> str:
    m, tp, lat, sc, mem = res["machine"], res["throughput"], res["latency"], res["scaling"], res["memory"]
    parts = [f"# tagger bench — {'quick' if res['quick'] else 'full'} run, {res['started_at']}\n",
             f"Command: `{res['command']}` ({res['seconds']:.0f} s). Machine: {m['cpu']}, {m['cpus']} CPUs, "
             f"{m['memory_gib']} GiB, {m['os']}; Python {m['python']}, torch {m['torch']}, faust {m['faust']}, "
             f"aiokafka {m['aiokafka']}. Load average at start {m['loadavg_start']}, at end {m['loadavg_end']} "
             f"(other work on the machine shows up in every figure).\n",
             f"Served model: {res['model']['arch']} {res['model']['version']} (hidden {res['model']['hidden_dim']}, "
             f"{res['model']['num_layers']} layers, context {res['model']['context']}, lookahead "
             f"{res['model']['lookahead']}). Figures: median of {res['config']['repeats']} repeat(s), "
             f"(min–max) when more than one.\n",
             "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res.get("stage_seconds", {}).items())
             + ". In-process model work (engine scaling, training, evaluation) runs on one torch thread, as "
             "the worker does.\n",
             "## Headline\n", _md_table(("figure", "measured", "target", ""), headline_rows(res)),
             "\n## Throughput\n",
             "Input topic pre-filled, consumer started, rate = outputs / (last − first output timestamp). "
             "Outputs: final label records for the worker, forwarded messages for the baselines.\n\n",
             _md_table(("consumer", "events/s", "outputs per run", "worker / this"),
                       [(name, _fmt_summ(tp[name]["events_per_s"]), tp[name]["runs"][0]["outputs"],
                         f"{tp.get('worker_vs_' + name, 1.0):.3f}" if name != "worker" else "1")
                        for name in ("worker", "faust_passthrough", "faust_batched_passthrough",
                                     "aiokafka_passthrough") if name in tp]),
             f"\nWorker (last run): {tp['worker']['runs'][-1]['records_per_event']} label records per event "
             f"(first + revisions + final); {tp['worker']['runs'][-1]['batch_events_mean']} events per batch on "
             f"average; model {tp['worker']['runs'][-1]['model_us_per_event_mean']:.0f} µs per event (the "
             f"worker's own `tagger_inference_seconds`).\n",
             "\n## Capacity at a latency target\n",
             _capacity_section(res),
             "\n## Latency under load\n", f"{lat['definition']}.\n\n",
             _md_table(("load", "offered events/s", "labelled events/s", "p50 ms", "p95 ms", "p99 ms"),
                       [(f"{lv['load']:.0%}", _fmt_summ(lv["offered_events_per_s"]),
                         _fmt_summ(lv["achieved_events_per_s"]), _fmt_summ(lv["p50_s"], 1000, 1),
                         _fmt_summ(lv["p95_s"], 1000, 1), _fmt_summ(lv["p99_s"], 1000, 1))
                        for lv in lat["levels"].values()]
                       + ([("bare Faust agent, 50% load", _fmt_summ(_summ([lat["floor"]["offered_events_per_s"]])),
                            _fmt_summ(_summ([lat["floor"]["achieved_events_per_s"]])),
                            f"{1000 * lat['floor']['p50_s']:.1f}", f"{1000 * lat['floor']['p95_s']:.1f}",
                            f"{1000 * lat['floor']['p99_s']:.1f}")] if lat.get("floor") else [])),
             "\n## Scaling with session length\n",
             f"{sc['sessions_in_lockstep']} sessions stepped in lockstep to position {sc['length']} through "
             f"`LiveTagger.process`, each call followed by the worker's Redis write-through; cost per event is the "
             f"median of the {sc['window_calls']} calls around each position.\n\n",
             _md_table(("position", "engine µs/event", "Redis write µs/event"),
                       [(p, _fmt_summ(v["step_us"], 1, 0), _fmt_summ(v["redis_write_us"], 1, 0))
                        for p, v in sorted(sc["positions"].items(), key=lambda kv: int(kv[0]))]),
             f"\nRatio: {_fmt_summ(sc['ratio_last_first'], 1, 2)} ({sc['ratio_definition']}).\n",
             "\n## Memory\n",
             f"{mem['sessions']} sessions ({mem['events']} events) left open in the worker; Redis MEMORY USAGE of "
             f"their keys: {mem['redis_bytes_total']:,} bytes = {mem['redis_bytes_per_session']:,.0f} per session, "
             f"{mem['redis_bytes_per_event']:,.0f} per event ({mem['redis_bytes_per_buffered_event']:,.0f} per event "
             f"held in the {mem['window']}-event window). By key: "
             + ", ".join(f"{k} {v:,}" for k, v in mem["redis_bytes_by_key"].items())
             + f". At position {sc['length']}: {sc['redis_bytes_per_session_at_end']:,.0f} bytes per session. "
             f"Worker RSS {(mem['worker_rss_bytes'] or 0) / 2 ** 20:,.0f} MiB (peak "
             f"{(mem['worker_peak_rss_bytes'] or 0) / 2 ** 20:,.0f} MiB).\n"]
    if res.get("quality"):
        parts.append("\n## Label quality\n")
        parts.append("Offline: whole sessions (`tagger evaluate`). Streaming: replayed event by event through "
                     "`LiveTagger` (neural models with bounded lookahead only). Training time is wall clock "
                     "(encoding, fit, calibration); inference µs per event offline (whole sessions) and "
                     "streaming (one cached step per event, 64 sessions per batch).\n\n")
        rows = []
        for ds, block in res["quality"].items():
            for arch, q in block["models"].items():
                if "error" in q:
                    rows.append((ds, arch, "error: " + q["error"][:80], *([""] * 9)))
                    continue
                o, s = q["offline"], q.get("streaming") or {}
                rows.append((ds, arch, _f(o.get("token_accuracy")), _f(o.get("macro_f1")), _f(o.get("coverage")),
                             _f(o.get("selective_accuracy")), _f(s.get("first_accuracy")),
                             _f(s.get("final_accuracy")), _f(s.get("edit_overhead")), _f(s.get("correction_time")),
                             f"{q['train_seconds']:.1f}",
                             f"{q['offline_us_per_event']:.0f} / {s.get('us_per_event', '—')}"))
        parts.append(_md_table(("data", "model", "accuracy", "macro-F1", "coverage", "selective acc.",
                                "first acc.", "final acc.", "edit overhead", "correction time", "train s",
                                "µs/event offline / streaming"), rows))
    if res.get("profile"):
        parts.append("\n## Worker profile (py-spy)\n")
        prof = res["profile"]
        if "error" in prof:
            parts.append(f"Not profiled: {prof['error']}\n")
        else:
            parts.append(f"Samples of the thread holding the GIL (`py-spy record --gil`): {prof['samples']} busy "
                         f"samples (and {prof['idle_samples']} idle ones, left out) over "
                         f"{prof['seconds']} s ({prof['events']} events, {prof['events_per_s_while_sampled']} "
                         f"events/s while sampled); raw stacks in `{prof['raw']}`.\n\nBusy samples by thread: "
                         + ", ".join(f"{t['function']} {t['percent']}%" for t in prof["threads"]) + "\n\n")
            b = prof.get("batches") or {}
            if b:
                parts.append(f"Batches (worker debug log): {b['batches']} batches, {b['events_median']:.0f} events "
                             f"median (mean {b['events_mean']}, max {b['events_max']}), {b['batch_ms_median']:.0f} ms "
                             f"median; batch time spent: "
                             + ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["share"].items()) + ".\n\n")
            parts.append(_md_table(("self time", "%"), [(f"`{r['function']}`", r["percent"]) for r in prof["self"]]))
            parts.append("\n")
            parts.append(_md_table(("inclusive time (project functions)", "%"),
                                   [(f"`{r['function']}`", r["percent"]) for r in prof["inclusive"]]))
    parts.append("\n## Plots\n")
    parts += [f"![{name}]({fname})\n" for name, fname in plots.items()]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def _capacity_section(res: dict[str, Any]) -> str:
    blocks = [("worker", res["capacity"]["worker"]), ("bare Faust agent", res["capacity"]["faust"])]
    blocks += [(f"worker x{n}, Redis Cluster", c) for n, c in (res.get("cluster") or {}).items()]
    text = f"{res['capacity']['worker']['definition']}. Each probe on fresh processes and topics.\n\n"
    rows = []
    for name, c in blocks:
        for p in c["probes"]:
            rows.append((name, f"{p['rate']:,.0f}", f"{p['offered_events_per_s']:,.0f}",
                         f"{1000 * p['p50_s']:.1f}", f"{1000 * p['p99_s']:.1f}", "yes" if p["ok"] else "no",
                         "" if p.get("cpu_ms_per_event") is None else f"{p['cpu_ms_per_event']:.3f}"))
    for kind, p in (res.get("client_floor") or {}).items():   # one probe each, no search
        rows.append((f"bare {kind} forwarder (no Faust)", f"{p['rate']:,.0f}", f"{p['offered_events_per_s']:,.0f}",
                     f"{1000 * p['p50_s']:.1f}", f"{1000 * p['p99_s']:.1f}", "", f"{p['cpu_ms_per_event']:.3f}"))
    text += _md_table(("consumer", "rate", "offered events/s", "p50 ms", "p99 ms", "within target",
                       "process CPU ms/event"), rows)
    text += "\nCapacity: " + ", ".join(f"{name} {c['events_per_s']:,.0f} events/s" for name, c in blocks) + ".\n"
    return text


def format_headline(res: dict[str, Any]) -> str:
    return "\n" + readme_table(res)


def _f(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


# =========================================================================== small helpers


def _summ(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "values": []}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size),
            "values": [float(x) for x in v]}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds in a ``/proc`` ``stat`` file (0.0 once it is gone)."""
    try:
        raw = stat.read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of a process so far, by thread id."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    return {int(t.name): _stat_cpu_s(t / "stat") for t in tasks}


def _rss(pid: int) -> Optional[int]:
    return _proc_status(pid).get("VmRSS")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for mod in ("torch", "faust", "aiokafka", "redis"):
        try:
            from importlib.metadata import version
            versions[mod] = version({"faust": "faust-streaming"}.get(mod, mod))
        except Exception:
            versions[mod] = "?"
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": mem, "os": platform.platform(terse=True),
            "python": platform.python_version(), **versions, "loadavg_start": _loadavg()}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = ["BenchConfig", "run_bench", "headline", "HEADLINE_KEYS", "TARGETS", "summarize_pyspy",
           "stage_scaling", "stage_quality", "update_readme"]
