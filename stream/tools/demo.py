"""``tagger demo``: the whole product on one machine, end to end.

Brings up the embedded stack (or uses ``TAGGER_KAFKA`` / ``TAGGER_REDIS`` when they answer),
trains a small model on generated logs if no model is current, starts a worker, replays
held-out sessions as desktop agents would, shows labels and revisions as they arrive, and
ends with a summary: throughput, end-to-end latency, first- and final-label accuracy against
the truth, coverage, and whether every event got exactly one final label. Ctrl-C (or any
error) stops the worker and the stack it started: nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

DEMO_TRAIN_SESSIONS = 800
WATCH_SESSIONS = 3
# Without a terminal (CI logs, `| tee`, a container) there are no progress bars: a plain line
# at least this often instead, so a long phase does not look hung.
PROGRESS_S = 5.0


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


@contextlib.contextmanager
def _heartbeat(what: str, enabled: bool, every_s: float = PROGRESS_S) -> Iterator[None]:
    """Print ``  <what>: N s elapsed`` every ``every_s`` seconds while the block runs."""
    if not enabled:
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            print(f"  {what}: {time.monotonic() - start:.0f} s elapsed", flush=True)

    thread = threading.Thread(target=beat, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def ensure_model(artifacts: Path, workdir: Path, quiet: bool, live: bool = True,
                 train_sessions: int = DEMO_TRAIN_SESSIONS) -> str:
    """The current model, or a freshly trained small one promoted as current."""
    from trainer.artifacts import load_artifact, promote
    from trainer.errors import ArtifactError
    try:
        lm = load_artifact(artifacts)
        if lm.kind == "neural" and lm.lookahead is not None:
            _say(f"using the current model {lm.version} ({lm.path})", quiet)
            return lm.version
    except ArtifactError:
        pass
    from trainer.config import from_dict
    from trainer.generate import generate
    from trainer.train import train
    data = workdir / f"train_{train_sessions}.csv"
    if not data.exists():
        generate(train_sessions, 7, data)
    cfg = from_dict({"train": {"epochs": 12, "patience": 3}})
    out = artifacts / f"demo-{cfg.model.arch}"
    _say(f"no current model in {artifacts}: training a {cfg.model.arch} model on {train_sessions} "
         f"generated sessions -> {out}", quiet)
    with _heartbeat("training", enabled=not quiet and not live):
        train(data, out, cfg, progress=live and not quiet and sys.stderr.isatty(),
              echo=lambda m: _say(m, quiet))
    promote(out, artifacts)
    return load_artifact(artifacts).version


async def _watch(bootstrap: str, topic: str, published: dict, expected: int, quiet: bool,
                 timeout_s: float, started: asyncio.Event, live: bool = True) -> dict[str, Any]:
    """Consume label records until every expected event has its final record. The records of
    the first few sessions are kept (``history``) and, on a terminal, shown as they arrive."""
    from aiokafka import AIOKafkaConsumer

    from stream.settings import FETCH_MAX_WAIT_MS
    from stream.tools.tail import format_label
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    await consumer.start()
    started.set()
    first: dict = {}
    final: dict = {}   # (session, event) -> number of final records
    last: dict = {}    # (session, event) -> its final record
    latency: list[float] = []
    records = revisions = 0
    label_of: dict = {}    # (session_id, event_id) -> the label it shows now (None: abstained)
    watch: list[str] = []
    history: dict[str, list[dict]] = {}   # watched session -> its records in arrival order
    shown: dict = {}                      # (session, event) -> its previous record, for ↻
    status_every = 2.0 if live else PROGRESS_S
    last_status = time.monotonic()
    deadline = time.monotonic() + timeout_s
    t_first = t_last = None
    try:
        while time.monotonic() < deadline and (not expected or len(final) < expected):
            batch = await consumer.getmany(timeout_ms=500)
            now = time.time()
            for msgs in batch.values():
                for m in msgs:
                    r = json.loads(m.value)
                    key = (r["session_id"], r["event_id"])
                    records += 1
                    t_first = t_first or now
                    t_last = now
                    if r["revision"] == 0 and key not in first:
                        first[key] = r
                        if key in published:
                            latency.append(now - published[key])
                    elif key in label_of and r["step_name"] != label_of[key]:
                        revisions += 1          # a changed label, before or at finality
                    label_of[key] = r["step_name"]
                    if r["final"]:
                        final[key] = final.get(key, 0) + 1
                        last.setdefault(key, r)
                    sid = r["session_id"]
                    if sid not in watch and len(watch) < WATCH_SESSIONS:
                        watch.append(sid)
                    if sid in watch:
                        history.setdefault(sid, []).append(r)
                        if live and not quiet:
                            print("  " + format_label(r, previous=shown.get(key)), flush=True)
                        shown[key] = r
            if not quiet and time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                print(f"  … {len(first)} events labelled, {len(final)} final, "
                      f"{revisions} revisions", flush=True)
    finally:
        await consumer.stop()
    return {"first": first, "finals": final, "last": last, "latency": latency, "records": records,
            "revisions": revisions, "t_first": t_first, "t_last": t_last, "history": history}


async def _publish(frame, bootstrap: str, topic: str, rate: float, published: dict) -> dict[str, Any]:
    """Replay sessions interleaved in time order at ``rate`` events/s, noting when each event
    went out (the start of its end-to-end latency)."""
    from stream.tools.publisher import EventPublisher, replay_messages
    messages, truth = replay_messages(frame)
    loop = asyncio.get_running_loop()
    sent = 0
    async with EventPublisher(bootstrap, topic) as pub:
        start = loop.time()
        for msg in messages:
            is_event = msg.get("type") != "session_end"
            if is_event:
                delay = start + sent / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
            msg["published_at"] = time.time()
            await pub.publish(msg)
            if is_event:
                published[(str(msg["session_id"]), str(msg["event_id"]))] = msg["published_at"]
        await pub.flush()
        seconds = loop.time() - start
    return {"events": sent, "sessions": frame["session_id"].nunique(), "seconds": seconds, "truth": truth}


def run_demo(*, sessions: int = 60, json_out: Optional[str] = None, rate: float = 150.0, quiet: bool = False,
             workdir: Path = Path("runs/demo"), live: Optional[bool] = None,
             train_sessions: int = DEMO_TRAIN_SESSIONS) -> dict[str, Any]:
    """``live``: a terminal is watching (progress bars, each label as it arrives); else
    (default when stdout is not a terminal) plain progress lines every ``PROGRESS_S``.
    ``quiet`` prints nothing but the summary."""
    from stream.settings import Settings
    from stream.tools.processes import WorkerProcess, free_port
    from stream.tools.stack import embedded_stack, stack_env
    from trainer.generate import generate

    live = sys.stdout.isatty() if live is None else live
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env_settings = Settings.from_env()
    artifacts = Path(env_settings.artifacts_dir).resolve()
    _say(f"demo folder: {workdir} (generated data, worker log, summary, plots); models: {artifacts} "
         f"(TAGGER_ARTIFACTS)", quiet)
    version = ensure_model(artifacts, workdir, quiet, live, train_sessions)
    heldout = workdir / f"heldout_{sessions}.csv"
    if not heldout.exists():
        generate(sessions, 8, heldout)  # a different seed from the training data: unseen sessions

    with ExitStack() as stack:
        if "TAGGER_KAFKA" in os.environ:
            kafka, redis_env = env_settings.kafka, {}
            _say(f"using the broker at {kafka}", quiet)
        else:
            info = stack.enter_context(embedded_stack(timeout_s=60))
            redis_env = stack_env(info)
            kafka = info["kafka"]
            _say(f"embedded stack up: broker {kafka}, Redis {info['redis']}", quiet)
        run_id = uuid.uuid4().hex[:8]
        port = free_port()
        env = {**os.environ, **redis_env, "TAGGER_ARTIFACTS": str(artifacts), "TAGGER_WEB_PORT": str(port),
               "TAGGER_APP_ID": f"tagger-demo-{run_id}", "TAGGER_REDIS_PREFIX": f"tagger:demo:{run_id}:",
               "TAGGER_INPUT_TOPIC": f"demo-{run_id}.events", "TAGGER_OUTPUT_TOPIC": f"demo-{run_id}.labels",
               "TAGGER_DLQ_TOPIC": f"demo-{run_id}.events.dlq", "TAGGER_INACTIVITY_S": "30"}
        settings = Settings.from_env(env)
        log = workdir / "worker.log"
        _say(f"starting the worker (model {version}); log: {log}", quiet)
        # the whole environment (TAGGER_* included) and this directory, as `tagger worker` gets them
        proc = WorkerProcess.start(settings, log, full_env=env, cwd=Path.cwd())
        stack.callback(proc.stop)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        with _heartbeat("waiting for the worker to join its consumer group", enabled=not quiet and not live):
            proc.wait_ready(90.0)
        _say(f"worker ready; metrics at {metrics_url}", quiet)

        async def main() -> tuple[dict, dict]:
            started = asyncio.Event()
            from trainer.loading import read_events
            frame, _ = read_events(heldout)
            published: dict = {}
            watcher = asyncio.create_task(_watch(kafka, settings.output_topic, published, len(frame),
                                                 quiet, timeout_s=120 + len(frame) / max(rate, 1), started=started,
                                                 live=live))
            await started.wait()
            shown = (f"; labels of the first {WATCH_SESSIONS} sessions shown live (↻ = label changed, "
                     f"✓ = final):" if live else "")
            _say(f"replaying {sessions} held-out sessions ({len(frame)} events) at {rate:.0f} events/s{shown}",
                 quiet)
            pub = await _publish(frame, kafka, settings.input_topic, rate, published)
            return pub, await watcher

        pub, seen = asyncio.run(main())
        truth = pub.get("truth", {})
        summary = _summary(pub, seen, truth, metrics_url, version)
        try:
            import urllib.request
            with urllib.request.urlopen(metrics_url, timeout=2) as r:
                (workdir / "metrics.txt").write_bytes(r.read())
        except OSError:
            pass
    summary["plots"] = [str(p) for p in _plots(seen, truth, workdir)]
    summary["folder"] = str(workdir)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, quiet)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(summary, indent=2))
    return summary


def _plots(seen: dict, truth: dict, out: Path) -> list[Path]:
    """The latency histogram and the timelines of the watched sessions, into ``out``."""
    from trainer.loading import parse_timestamp
    from trainer.report import plot_latency_histogram, session_timeline, write_timelines
    paths = []
    if seen["latency"]:
        paths.append(plot_latency_histogram(seen["latency"], out / "latency.png"))
    histories = {}
    for sid, records in seen["history"].items():
        by_seq: dict[int, dict] = {}
        for r in records:
            by_seq.setdefault(int(r["seq"]), r)
        n = max(by_seq) + 1
        times = []
        for i in range(n):
            try:
                times.append(parse_timestamp(by_seq[i]["timestamp"]) if i in by_seq else float("nan"))
            except ValueError:
                times.append(float(i))
        times = [t if t == t else (times[i - 1] if i else 0.0) for i, t in enumerate(times)]
        names = [by_seq[i]["event_name"] if i in by_seq else "" for i in range(n)]
        gold = [truth.get((sid, by_seq[i]["event_id"])) if i in by_seq else None for i in range(n)]
        emissions = [(int(r["seq"]), None if r["abstained"] else r["step_name"]) for r in records]
        histories[sid] = session_timeline(times, names, emissions, gold)
    paths += write_timelines(histories, out, k=WATCH_SESSIONS)
    return paths


def _summary(pub: dict, seen: dict, truth: dict, metrics_url: str, version: str) -> dict[str, Any]:
    events = pub["events"]
    finals = seen["finals"]
    keys = list(truth)
    missing = [k for k in keys if k not in finals]
    doubled = [k for k, v in finals.items() if v > 1]
    first_ok = [seen["first"].get(k, {}).get("step_name") == truth[k] for k in keys]
    final_ok = [seen["last"].get(k, {}).get("step_name") == truth[k] for k in keys]
    labelled = [not seen["last"][k]["abstained"] for k in keys if k in seen["last"]]
    lat = np.asarray(seen["latency"]) if seen["latency"] else np.asarray([np.nan])
    span = (seen["t_last"] - seen["t_first"]) if seen["t_first"] and seen["t_last"] else float("nan")
    return {
        "events": events, "sessions": pub["sessions"], "model_version": version,
        "final_records": int(sum(finals.values())), "events_without_final": len(missing),
        "events_with_several_finals": len(doubled), "label_records": seen["records"],
        "revisions": seen["revisions"],
        "first_accuracy": float(np.mean(first_ok)) if keys else None,
        "final_accuracy": float(np.mean(final_ok)) if keys else None,
        "coverage": float(np.mean(labelled)) if labelled else None,
        "events_per_s": round(events / max(span, pub["seconds"], 1e-9), 1),
        "publish_seconds": round(pub["seconds"], 2),
        "latency_p50_s": float(np.nanpercentile(lat, 50)), "latency_p99_s": float(np.nanpercentile(lat, 99)),
        "metrics_url": metrics_url,
    }


def _print_summary(s: dict, quiet: bool) -> None:
    print("\n=== demo summary ===")
    print(f"events {s['events']} in {s['sessions']} sessions | final records {s['final_records']} | "
          f"events without a final {s['events_without_final']} | revisions {s['revisions']}")
    print(f"first-label accuracy {s['first_accuracy']:.3f} | final-label accuracy {s['final_accuracy']:.3f} | "
          f"coverage {s['coverage']:.3f}")
    print(f"throughput {s['events_per_s']:.0f} events/s (publishing paced) | latency p50 "
          f"{1000 * s['latency_p50_s']:.1f} ms, p99 {1000 * s['latency_p99_s']:.1f} ms")
    print(f"metrics were at {s['metrics_url']}; model {s['model_version']}")
    print(f"in {s['folder']}: summary.json, metrics.txt, worker.log"
          + (", plots " + ", ".join(Path(p).name for p in s["plots"]) if s.get("plots") else ""))
