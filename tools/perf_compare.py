"""Before/after measurements of the worker's cost, for changes that ``tagger bench`` alone
cannot attribute (its figures move by more between runs than most single changes gain).

    python tools/perf_compare.py paced --tree before=/tmp/base --tree after=. --rate 700 --repeats 3
    python tools/perf_compare.py parts --batch 10
    python tools/perf_compare.py step --arch bilstm
    python tools/perf_compare.py send

``paced`` starts one embedded stack (tansu + Redis), then alternates workers whose code comes
from each source tree (a ``git worktree`` of the old commit, say), each fed ``--seconds`` of
fresh sessions at ``--rate`` events/s; it prints first-label latency p50/p95/p99 and the
worker's CPU time per event (user + system, all threads, from /proc) and, for a worker, its
events per batch (its ``tagger_batch_events`` histogram). A tree given as
``name=path:WAIT`` runs with ``TAGGER_BATCH_WAIT_MS=WAIT``; ``name=faust`` or
``name=faust-batched`` runs the bare Faust agents of ``stream.tools.bench_apps`` instead, as a
floor, and ``name=aiokafka`` or ``name=librdkafka`` its bare forwarders on that client (no
Faust), the floor below that.
Alternating trees on one stack cancels most of the machine's drift; quote medians.

``step`` times ``Tagger.step`` rounds of 1, 10 and 64 sessions for a default-size model on
random inputs (no data, no training): the model's share of a live batch.

``interleave --tree before=PATH`` times the served model's ``step`` (default: ``--full``'s
mixture) with the model code of another source tree and of this one, round by round on the
same events (the other tree's ``trainer/model.py`` loaded beside this one, the same weights),
so that both sides see the same machine load: the robust before/after for a model-step change
on a busy machine, where whole-worker runs move by more than the change. It also prints the
largest logit difference between the two.

``paced --phases`` runs workers at debug level and prints where a batch's wall time went
(the model step, queueing records, the acks, the Redis save; ``tagger bench``'s
``batch_phases``). ``paced --threads`` also prints each worker's CPU per event by thread (the
main thread is named; the others by thread id: in a worker the consumer thread Faust starts
comes before the model's executor thread, which ``--profile``'s py-spy files name).

``send`` times aiokafka's per-record ``send`` against its batch API (``create_batch``,
``send_batch``) on the embedded broker: the event loop's CPU per label record.

``parts`` runs the worker's per-batch steps in-process (no Kafka): parse, tag, encode label
records, snapshot, write through to the machine's Redis, and prints the thread CPU time per
event of each; ``--by-step`` also splits the tagging (the model step, each member's parts,
feature derivation and encoding). Both use the bench's generated pool and its quick BiLSTM (trained on first use
under ``runs/perf``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.tools import bench as B  # noqa: E402  (the repository root goes on the path first)


def _fixtures(out: Path, full: bool = False) -> tuple[B.BenchConfig, Path, Path]:
    """The bench's generated pool and served model: quick mode's small BiLSTM, or with
    ``full`` the default one a full ``tagger bench`` serves (trained on first use)."""
    cfg = B.BenchConfig.for_mode(not full, out)
    for sub in ("logs", "models", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pool = B._generated(out / "data", cfg.pool_sessions, cfg.seed, "pool")
    return cfg, pool, B._train_served_model(cfg, out, print)


def paced(args: argparse.Namespace) -> None:
    from stream.settings import Settings
    from stream.tools.processes import free_port
    from stream.tools.stack import embedded_stack, ensure_topics
    from trainer.artifacts import promote
    out = Path(args.out)
    cfg, pool, model_dir = _fixtures(out, args.full)
    cfg = dataclasses.replace(cfg, load_seconds=args.seconds)
    trees = dict(t.split("=", 1) for t in args.tree)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with ExitStack() as stack:
        info = stack.enter_context(embedded_stack(timeout_s=60))
        base = Settings(kafka=info["kafka"], redis_url=info["redis"], kafka_session_timeout_s=3.0, web_port=0)
        artifacts = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        promote(model_dir, artifacts)
        h = B._Harness(cfg, base, "perf", "tagger-perf:", artifacts, out, pool, print)
        stack.callback(h.close)
        stack.callback(B._delete_redis_prefix, base.redis_url, "tagger-perf:")
        for r in range(args.repeats):
            for name, spec in trees.items():
                path, _, wait = spec.partition(":")
                s = dataclasses.replace(h._settings(name), web_port=free_port(),
                                        batch_wait_ms=float(wait) if wait else base.batch_wait_ms)
                ensure_topics(s)
                bare = path.startswith("faust") or path in B.CLIENT_FORWARDERS  # forwards input as it came
                if path in B.CLIENT_FORWARDERS:
                    proc = h._start(s, f"perf-{name}-{r}", module="stream.tools.bench_apps", args=[path])
                    proc.wait_logged("[^Worker]: Ready", 120)
                elif path.startswith("faust"):
                    app = "batched" if path == "faust-batched" else "passthrough"
                    proc = h._start(s, f"perf-{name}-{r}", app=f"stream.tools.bench_apps:{app}",
                                    args=["--without-web", "-l", "info"])
                    proc.wait_logged("[^Worker]: Ready", 120)
                else:
                    B.REPO_ROOT = Path(path).resolve()  # the worker imports this tree's code
                    # a tree from before the top-level CLI (tagger/cli.py) runs `python -m trainer.cli`
                    module = "tagger.cli" if (B.REPO_ROOT / "tagger" / "cli.py").exists() else "trainer.cli"
                    proc = h._start(s, f"perf-{name}-{r}", module=module, verbose=args.phases)
                    proc.wait_ready(120)
                time.sleep(2.0)
                spy = _sampler(proc.proc.pid, out / "profiles" / f"{name}-{r}.txt") if args.profile else None
                c0, t0 = B._cpu_s(proc.proc.pid), B._thread_cpu_s(proc.proc.pid)
                b0 = None if bare else _batches(s)
                _, run, _ = h._paced(s, proc, {}, args.rate, f"{name}{r}", worker=not bare)
                run["cpu_ms_per_event"] = 1000 * (B._cpu_s(proc.proc.pid) - c0) / run["events"]
                if b0 is not None:  # the worker's own count: batches handed to the model
                    b1 = _batches(s)
                    run["events_per_batch"] = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)
                    run["batches_per_s"] = (b1[1] - b0[1]) / args.seconds
                    print(f"{name} run {r + 1}: {run['events_per_batch']:.1f} events per batch, "
                          f"{run['batches_per_s']:.0f} batches/s")
                if args.threads:  # the busiest threads (the main thread's id is the pid)
                    t1 = B._thread_cpu_s(proc.proc.pid)
                    per = sorted(((t1[t] - t0.get(t, 0.0), t) for t in t1), reverse=True)[:4]
                    print(f"{name} run {r + 1} CPU ms/event by thread: " + ", ".join(
                        f"{'main' if t == proc.proc.pid else t} {1000 * c / run['events']:.3f}" for c, t in per))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                proc.stop()
                if args.phases and not bare:   # the worker's log is complete now
                    b = B.batch_phases(proc.log.read_text(errors="replace"))
                    if b:
                        print(f"{name} run {r + 1}: batch median {b['batch_ms_median']:.1f} ms; "
                              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["share"].items()))
                runs[name].append(run)
                print(f"{name} run {r + 1}: p50 {1000 * run['p50_s']:.0f} p95 {1000 * run['p95_s']:.0f} "
                      f"p99 {1000 * run['p99_s']:.0f} ms, CPU {run['cpu_ms_per_event']:.3f} ms/event", flush=True)
    print(f"medians over {args.repeats} runs at {args.rate:g} events/s:")
    for name, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("p50_s", "p95_s", "p99_s", "cpu_ms_per_event")}
        print(f"  {name:12s} p50 {1000 * med['p50_s']:.0f} p95 {1000 * med['p95_s']:.0f} p99 {1000 * med['p99_s']:.0f} ms"
              f"  CPU {med['cpu_ms_per_event']:.3f} ms/event")


def _batches(s) -> tuple[float, float]:
    """The worker's ``tagger_batch_events`` histogram: (events, batches) so far."""
    return B._metric(s, "tagger_batch_events_sum"), B._metric(s, "tagger_batch_events_count")


def _sampler(pid: int, raw: Path) -> subprocess.Popen:
    """py-spy on ``pid`` (every thread on CPU, 250 Hz), raw collapsed stacks into ``raw``; read
    them with ``python tools/perf_compare.py top FILE``. Its own CPU is another process's, so
    the worker's CPU per event is unaffected (the machine's load is not)."""
    import shutil
    raw.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
                             "--rate", "250", "--threads", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


def top(args: argparse.Namespace) -> None:
    """The busiest threads and functions of raw py-spy profiles (several files: summed)."""
    import re
    text = "\n".join(Path(f).read_text(errors="replace") for f in args.files)
    # frames of another source tree (a worktree of the old commit) read as this one's
    text = re.sub(r"\(/[^();]*?/(stream|trainer|tagger)/", r"(\1/", text)
    summ = B.summarize_pyspy(text, top=args.top)
    print(f"{summ['samples']} busy samples ({summ['idle_samples']} idle)")
    for title, key in (("threads", "threads"), ("self", "self"), ("inclusive (project code)", "inclusive")):
        print(f"-- {title}")
        for row in summ[key]:
            print(f"  {row['percent']:5.1f}%  {row['function']}")


def parts(args: argparse.Namespace) -> None:
    import torch

    from stream.records import encode_label, parse_event
    from stream.session_store import RedisSessionStore
    from stream.tagging import LiveTagger
    from trainer.artifacts import load_artifact
    torch.set_num_threads(1)
    _, pool, model_dir = _fixtures(Path(args.out), args.full)
    msgs = B._stage_messages(B._template(pool), args.events, "parts")
    raws = [B._kv(m)[1] for m in msgs]
    tagger = LiveTagger(load_artifact(model_dir))
    inner = _time_model_parts(tagger) if args.by_step else None
    prefix = "tagger-perf-parts:"
    cost = dict.fromkeys(("parse", "tag", "encode", "snapshot", "save"), 0.0)
    counts = {"events": 0, "records": 0}

    async def run() -> None:
        store = RedisSessionStore(args.redis, prefix=prefix)
        clock = time.thread_time
        try:
            for i in range(0, len(raws), args.batch):
                t0 = clock()
                events = [parse_event(r) for r in raws[i:i + args.batch]]
                t1 = clock()
                batch = tagger.process(events, [0] * len(events))
                t2 = clock()
                for rec in batch.records:
                    encode_label(rec)
                t3 = clock()
                snaps = [tagger.snapshot(sid) for sid in batch.touched if sid in tagger.sessions]
                t4 = clock()
                await store.save(snaps, tagger.window_size)
                t5 = clock()
                tagger.drop(batch.closed)
                for k, dt in zip(cost, np.diff([t0, t1, t2, t3, t4, t5])):
                    cost[k] += dt
                counts["events"] += batch.accepted
                counts["records"] += len(batch.records)
        finally:
            await store.close()
        B._delete_redis_prefix(args.redis, prefix)

    asyncio.run(run())
    n = counts["events"]
    print(f"batch {args.batch}: {n} events, {counts['records'] / n:.2f} label records per event; thread CPU per event: "
          + ", ".join(f"{k} {1e6 * v / n:.0f} µs" for k, v in cost.items()) + f"; total {1e6 * sum(cost.values()) / n:.0f} µs")
    if inner is not None:
        print("inside tag (thread CPU per event; nested: a member's step holds its parts):")
        for k, v in sorted(inner.items(), key=lambda kv: -kv[1]):
            print(f"  {k:28s} {1e6 * v / n:6.1f} µs")


def _time_model_parts(tagger) -> dict[str, float]:
    """Thread CPU seconds spent in each part of ``LiveTagger.process`` (the model's step and
    its members' parts, feature derivation and encoding), by wrapping them in this process."""
    import functools

    import stream.tagging as T
    import trainer.model as M
    spent: dict[str, float] = {}

    def wrap(owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        spent[label] = 0.0

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.thread_time() - t
        setattr(owner, attr, timed)

    wrap(M.Mixture, "step", "Mixture.step")
    wrap(M.Tagger, "step", "Tagger.step (each member)")
    wrap(M.LookaheadLSTM, "step", "LookaheadLSTM.step")
    wrap(M.ChainBank, "step", "ChainBank.step")
    wrap(M.EventEmbedder, "forward", "EventEmbedder.forward")
    wrap(M.WideBank, "step", "WideBank.step")
    wrap(T, "derive", "derive")
    wrap(type(tagger.loaded.encoder), "encode_derived", "encode_derived")
    return spent


def step(args: argparse.Namespace) -> None:
    import torch

    from trainer.config import ModelConfig
    from trainer.model import Tagger
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # hidden 128, 2 layers: the sizes this comparison has always measured (the old ModelArgs defaults)
    model = Tagger(ModelConfig(n_labels=8, n_events=500, n_tokens=800, cat_sizes=(10, 20, 30, 40), n_nums=13,
                               arch=args.arch, hidden_dim=128, num_layers=2)).eval()
    for b in (1, 10, 64):
        states = [model.init_state() for _ in range(b)]
        events = {"event": torch.randint(1, 500, (b, 1)), "tokens": torch.randint(0, 800, (b, 1, 8)),
                  "cats": torch.randint(0, 10, (b, 1, 4)), "nums": torch.randn(b, 1, 13),
                  "text": torch.zeros(b, 1, 0), "image": torch.zeros(b, 1, 0, dtype=torch.uint8)}
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            states, _ = model.step(states, events)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[args.rounds // 5:])  # past the first rounds' growing buffers
        print(f"{args.arch}, {b:2d} sessions per round: {1000 * med:.2f} ms per round, {1e6 * med / b:.0f} µs/event")


def interleave(args: argparse.Namespace) -> None:
    import importlib.util

    import torch

    from stream.records import parse_event
    from stream.tagging import LiveTagger, step_batch
    from trainer.artifacts import load_artifact
    from trainer.features import EventContext, derive
    torch.set_num_threads(1)
    name, _, path = args.tree.partition("=")
    spec = importlib.util.spec_from_file_location("_other_model", Path(path) / "trainer" / "model.py")
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses in the module look themselves up there
    spec.loader.exec_module(other)
    _, pool, model_dir = _fixtures(Path(args.out), args.full)
    loaded = load_artifact(model_dir)
    mine = loaded.model
    theirs = other.build_model(other.checkpoint_args(loaded.manifest["model_args"])).eval()
    theirs.load_state_dict(mine.state_dict())
    live, enc = LiveTagger(loaded), loaded.encoder
    events = [e for e in (parse_event(B._kv(m)[1]) for m in B._stage_messages(B._template(pool), args.events, "ilv"))
              if e.type != "session_end"]
    rounds, cur = [], []   # arrival order; a round holds distinct sessions, at most --batch
    for ev in events:
        if len(cur) == args.batch or any(e.session_id == ev.session_id for e in cur):
            rounds.append(cur)
            cur = []
        cur.append(ev)
    rounds.append(cur)
    ctxs: dict[str, Any] = {}
    states: dict[str, dict] = {name: {}, "this tree": {}}
    times: dict[str, list[float]] = {name: [], "this tree": []}
    worst = 0.0
    with torch.inference_mode():
        for i, rnd in enumerate(rounds):
            derived = []
            for ev in rnd:
                d, ctxs[ev.session_id] = derive(live._raw(ev), ctxs.get(ev.session_id) or EventContext(start_ts=ev.ts),
                                                enc.data, enc.auto_cols)
                derived.append(d)
            x = step_batch(enc.encode_derived(derived, loaded.base_dir), mine)
            sides = [(name, theirs), ("this tree", mine)]
            outs = {}
            for side, model in (sides if i % 2 else sides[::-1]):   # alternate who goes first
                st = states[side]
                t0 = time.perf_counter()
                new, out = model.step([st.get(e.session_id) or model.init_state() for e in rnd], x)
                times[side].append(time.perf_counter() - t0)
                st.update((e.session_id, s) for e, s in zip(rnd, new))
                outs[side] = out
            worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(outs[name], outs["this tree"])))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(rounds)} rounds of up to {args.batch} sessions ({args.events} events), model.step median: "
          + ", ".join(f"{k} {1e6 * v:.0f} µs" for k, v in med.items())
          + f"; this tree / {name}: {med['this tree'] / med[name]:.3f}; largest logit difference {worst:.1e}")


def send(args: argparse.Namespace) -> None:
    """Event-loop CPU per label record of aiokafka's per-record ``send`` (what Faust's
    producer wraps, and the worker's flush uses) against its batch API (``create_batch`` per
    partition, one ``send_batch`` each), both awaiting every ack, on the embedded broker."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    from stream.tools.stack import embedded_stack
    value = json.dumps({"session_id": "perf-send-0000000000", "event_id": "e-000000", "label": "Look Up "
                        "Customer Account", "confidence": 0.93, "abstained": False, "revision": 0,
                        "final": False, "model_version": "20261204-204105-0868e8d5"}).encode()
    keys = [f"perf-send-{i}".encode() for i in range(64)]
    topic = "perf-send-labels"

    async def run(bootstrap: str) -> dict[str, list[float]]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for _ in range(100):  # the topic is auto-created by the first send
                try:
                    await producer.send_and_wait(topic, value, key=keys[0])
                    break
                except Exception:  # noqa: BLE001 - not there yet
                    await asyncio.sleep(0.2)
            parts = sorted(producer._metadata.partitions_for_topic(topic))  # noqa: SLF001
            partitioner = DefaultPartitioner()

            async def per_record() -> None:
                futs = [await producer.send(topic, value, key=keys[i % len(keys)]) for i in range(args.records)]
                for f in futs:
                    await f

            async def batched() -> None:
                builders: dict[int, Any] = {}
                for i in range(args.records):
                    key = keys[i % len(keys)]
                    part = partitioner(key, parts, parts)
                    b = builders.get(part) or builders.setdefault(part, producer.create_batch())
                    if b.append(key=key, value=value, timestamp=None) is None:
                        raise RuntimeError("a flush outgrew one batch; use fewer --records")
                futs = []
                for part, b in builders.items():
                    b.close()
                    futs.append(await producer.send_batch(b, topic, partition=part))
                for f in futs:
                    await f

            out: dict[str, list[float]] = {"send per record": [], "send_batch per partition": []}
            for _ in range(args.repeats):
                for name, fn in zip(out, (per_record, batched)):
                    c0 = time.thread_time()
                    for _ in range(args.flushes):
                        await fn()
                    out[name].append(1e6 * (time.thread_time() - c0) / (args.flushes * args.records))
            return out
        finally:
            await producer.stop()

    with embedded_stack(timeout_s=60) as info:
        res = asyncio.run(run(info["kafka"]))
    print(f"{args.records} records a flush over {len(keys)} keys, {args.flushes} flushes, {args.repeats} repeats:")
    for name, xs in res.items():
        print(f"  {name:26s} {statistics.median(xs):5.1f} µs CPU per record (median; "
              + ", ".join(f"{x:.1f}" for x in xs) + ")")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "perf"), help="pool, model and logs")
    ap.add_argument("--full", action="store_true", help="serve the default model of a full bench "
                    "(and its pool), not quick mode's small one")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("paced", help="latency and CPU per event of workers from several source trees")
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH[:BATCH_WAIT_MS], NAME=faust, "
                   "NAME=faust-batched, NAME=aiokafka, NAME=librdkafka; repeat the option")
    p.add_argument("--rate", type=float, default=700.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--threads", action="store_true", help="print the CPU per event of the busiest "
                   "threads (ids; with --profile, py-spy's files name them)")
    p.add_argument("--phases", action="store_true", help="run workers at debug level and print where "
                   "their batches' time went (model, queueing, acks, Redis save)")
    p.add_argument("--profile", action="store_true", help="sample each worker with py-spy into OUT/profiles/")
    t = sub.add_parser("top", help="summarise raw py-spy profiles (from paced --profile)")
    t.add_argument("files", nargs="+")
    t.add_argument("--top", type=int, default=25)
    q = sub.add_parser("parts", help="in-process CPU per event of each step of a batch")
    q.add_argument("--batch", type=int, default=10)
    q.add_argument("--events", type=int, default=6000)
    q.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    q.add_argument("--by-step", action="store_true", help="also time the parts of the model step")
    r = sub.add_parser("step", help="Tagger.step time per round of a default-size model")
    r.add_argument("--arch", default="bilstm")
    r.add_argument("--rounds", type=int, default=60)
    i = sub.add_parser("interleave", help="the served model's step with another tree's model code and "
                       "this tree's, round by round on the same events")
    i.add_argument("--tree", required=True, help="NAME=PATH of the other source tree (a git worktree)")
    i.add_argument("--batch", type=int, default=3, help="sessions per round")
    i.add_argument("--events", type=int, default=3000)
    o = sub.add_parser("send", help="CPU per label record: aiokafka's send against its batch API")
    o.add_argument("--records", type=int, default=25, help="records per flush (a batch's output)")
    o.add_argument("--flushes", type=int, default=200)
    o.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args(argv)
    {"paced": paced, "parts": parts, "step": step, "top": top, "interleave": interleave,
     "send": send}[args.cmd](args)


if __name__ == "__main__":
    main()
