"""``tagger`` subcommands of the live service: worker, promote, stack, publish, tail, demo,
bench, chaos. ``register(sub)`` adds them to the top-level parser (``tagger.cli``); the tools
behind them (``stream.tools``) are imported only when their command runs.

Connection settings come from the environment (``TAGGER_KAFKA``, ``TAGGER_REDIS``, ...; see
``stream.settings``), so ``eval "$(tagger stack up)"`` followed by any of these works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from pathlib import Path

from trainer.cli import writable


def cmd_worker(args) -> int:
    from stream.preflight import check_worker
    from stream.settings import Settings
    settings = Settings.from_env()
    if args.artifacts:
        settings = dataclasses.replace(settings, artifacts_dir=Path(args.artifacts))
    # port taken, no broker, no model: one error line and exit 2 here, not a Faust traceback
    version = check_worker(settings, broker_timeout_s=settings.kafka_wait_s)

    from stream.app import create_app
    log = logging.getLogger("tagger")
    log.info("starting worker with %s", settings.redacted())
    web = (f"http://{settings.metrics_host}:{settings.web_port}/metrics, /healthz, /readyz"
           if settings.web_port else "off (TAGGER_WEB_PORT=0)")
    log.info("model %s from %s; web server %s", version, settings.artifacts_dir, web)
    app = create_app(settings)
    from stream.stopping import bounded_stop_worker_class
    worker = bounded_stop_worker_class()(app, loglevel="DEBUG" if args.verbose else "INFO", quiet=True,
                                redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def cmd_promote(args) -> int:
    from stream.settings import Settings
    from trainer.artifacts import load_artifact, promote
    root = Path(args.artifacts) if args.artifacts else Settings.from_env().artifacts_dir
    target = promote(args.model, root)
    lm = load_artifact(target)
    print(f"promoted {lm.version} ({target}) as the current model in {root}; running workers "
          f"pick it up within seconds")
    return 0


def cmd_stack(args) -> int:
    from stream.tools.stack import format_env, stack_down, stack_status, stack_up
    if args.action == "up":
        info = stack_up(args.state_dir)
        print(f"stack {'already ' if info.get('already_running') else ''}running: Kafka-compatible broker "
              f"{info['kafka']}, Redis {info['redis']}; state in {info['state_dir']}", file=sys.stderr)
        # Where a user's own consumer group would first sit waiting (README: Publishing and consuming)
        print("note: on this broker a new consumer-group member gets its partitions only after half "
              "its session timeout (librdkafka's default 45 s: ~23 s); set session.timeout.ms=6000 "
              "(aiokafka: session_timeout_ms=6000) for ~3 s. librdkafka clients need version >= 2.2.",
              file=sys.stderr)
        sys.stdout.write(format_env(info))
    elif args.action == "down":
        info = stack_down(args.state_dir)
        print(json.dumps(info, default=str), file=sys.stderr)
    else:
        info = stack_status(args.state_dir)
        print(json.dumps(info, indent=2, default=str))
        return 0 if info["status"] == "running" else 1
    return 0


def cmd_publish(args) -> int:
    from stream.tools.publisher import replay
    from stream.settings import Settings, kafka_client_kwargs
    settings = Settings.from_env()
    security = {k: v for k, v in kafka_client_kwargs(settings).items() if k != "bootstrap_servers"}
    res = asyncio.run(replay(args.data, settings.kafka, settings.input_topic, rate=args.rate,
                             sessions=args.sessions, end_sessions=not args.no_end, security=security,
                             progress=not args.quiet and sys.stderr.isatty()))
    print(f"published {res['events']} events in {res['sessions']} sessions in {res['seconds']:.1f}s "
          f"to {settings.input_topic}")
    return 0


def cmd_tail(args) -> int:
    from stream.settings import Settings, kafka_client_kwargs
    from stream.tools.tail import tail
    settings = Settings.from_env()
    security = {k: v for k, v in kafka_client_kwargs(settings).items() if k != "bootstrap_servers"}
    try:
        asyncio.run(tail(settings.kafka, settings.output_topic, json_lines=args.json, security=security,
                         from_beginning=args.from_beginning, limit=args.limit))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args) -> int:
    from stream.tools.demo import run_demo
    writable(args.json, "--json")
    writable(args.workdir, "--workdir", folder=True)
    summary = run_demo(sessions=args.sessions, json_out=args.json, rate=args.rate, quiet=args.quiet,
                       live=sys.stdout.isatty(), workdir=Path(args.workdir),
                       train_sessions=args.train_sessions)
    return 0 if summary.get("events_without_final", 1) == 0 else 1


def cmd_bench(args) -> int:
    from stream.tools.bench import BenchConfig, run_bench
    writable(args.json, "--json")
    writable(args.out, "--out", folder=True)
    out = Path(args.out or ("runs/bench-quick" if args.quick else "runs/bench"))
    cfg = BenchConfig.for_mode(args.quick, out, model=Path(args.model) if args.model else None,
                               repeats=args.repeats, events=args.events, profile=args.profile,
                               quality=not args.no_quality,
                               real_data=None if args.quick or args.no_real_data else Path(args.real_data))
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if k in ("quick", "json", "out", "model", "repeats", "events", "no_quality", "no_real_data",
                      "profile", "readme") and v not in (None, False)]
    run_bench(cfg, json_out=args.json, readme=args.readme, command=" ".join(["tagger bench", *flags]))
    return 0


def cmd_chaos(args) -> int:
    from stream.tools.chaos import FAULTS, ChaosConfig, format_report, run_chaos, scale_run
    writable(args.json, "--json")
    writable(args.workdir, "--workdir", folder=True)
    for noisy in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)  # the broker pause makes them shout

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.scale:
        rows = scale_run(workdir=Path(args.workdir), model=args.model, sessions=args.sessions or 80,
                         progress=say)
        for r in rows:
            print(f"{r['workers']} worker(s), {r['partitions']} partitions: {r['events']} events in "
                  f"{r['seconds']:.1f} s = {r['events_per_s']:.0f} events/s (all final: {r['all_final']})")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"scale": rows}, indent=2))
        return 0
    if args.soak:
        from stream.tools.chaos import soak_run
        res = soak_run(args.soak, workdir=Path(args.workdir), model=args.model, progress=say)
        print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"soak": res}, indent=2))
        return 0 if res["worker_alive"] else 1
    cfg = ChaosConfig.quick() if args.quick else ChaosConfig()
    if args.sessions:
        cfg = dataclasses.replace(cfg, sessions=args.sessions)
    faults = [f.strip() for f in args.faults.split(",")] if args.faults else list(FAULTS)
    reports = run_chaos(cfg, workdir=Path(args.workdir), model=args.model, faults=faults, progress=say)
    print(format_report(reports))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "faults": {r.fault: r.as_dict() for r in reports}},
            indent=2, default=str))
    return 0 if all(r.ok for r in reports) else 1


def register(sub) -> None:
    w = sub.add_parser("worker", help="run the live tagging worker (Faust) against TAGGER_KAFKA / TAGGER_REDIS",
                       description="""\
Run the live tagging worker: reads tagger.events, writes tagger.labels (and tagger.events.dlq),
serves /metrics, /healthz and /readyz on http://TAGGER_METRICS_HOST:TAGGER_WEB_PORT
(default 127.0.0.1:6066). Settings come from TAGGER_* variables (see the README). Before it
starts it checks the web port is free, a current model loads, and the broker answers
(within TAGGER_KAFKA_WAIT_S, default 30 s); each failure is one error line, exit 2.""")
    w.add_argument("--artifacts", help="artifacts folder with the `current` pointer (default TAGGER_ARTIFACTS, "
                                       "else ./artifacts)")
    w.set_defaults(func=cmd_worker)

    p = sub.add_parser("promote", help="make a trained model the current one; running workers hot-swap to it")
    p.add_argument("model", help="artifact folder")
    p.add_argument("--artifacts", help="artifacts root (default TAGGER_ARTIFACTS or ./artifacts)")
    p.set_defaults(func=cmd_promote)

    s = sub.add_parser("stack", help="start/stop the embedded Kafka-compatible broker and Redis",
                       description="""\
The embedded local stack: a Kafka-compatible broker (tansu, in memory) and a Redis (the one at
TAGGER_REDIS if it answers, else a redis-server it starts). One stack per user: its state
(pids, ports, logs) lives in one folder whatever the working directory.

actions:
  up      start it (or report the running one); prints `export TAGGER_KAFKA=...` lines,
          so `eval "$(tagger stack up)"` points this shell's tagger commands at it
  down    stop what `up` started (a Redis it found running is left alone); logs are kept
  status  print its state as JSON; exit 0 when running, 1 otherwise""")
    s.add_argument("action", choices=["up", "down", "status"], help="up, down or status (see above)")
    s.add_argument("--state-dir", help="where pids, ports and logs go (default: TAGGER_STATE_DIR, "
                                       "else $XDG_STATE_HOME/tagger, else ~/.local/state/tagger)")
    s.set_defaults(func=cmd_stack)

    pb = sub.add_parser("publish", help="replay a log into the events topic as desktop agents would")
    pb.add_argument("--data", required=True, help="CSV or Parquet of events (a step_name column is not sent)")
    pb.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pb.add_argument("--sessions", type=int, help="only the first K sessions")
    pb.add_argument("--no-end", action="store_true", help="do not send session_end after each session")
    pb.set_defaults(func=cmd_publish)

    t = sub.add_parser("tail", help="show label records as they arrive, revisions included")
    t.add_argument("--json", action="store_true", help="raw JSON lines")
    t.add_argument("--from-beginning", action="store_true",
                   help="start at the oldest record on the topic (default: only new ones)")
    t.add_argument("--limit", type=int, help="stop after this many records (default: run until Ctrl-C)")
    t.set_defaults(func=cmd_tail)

    d = sub.add_parser("demo", help="the whole product on this machine: stack, model, worker, live labels, summary")
    d.add_argument("--sessions", type=int, default=60, help="held-out sessions to replay")
    d.add_argument("--rate", type=float, default=150.0, help="events per second to publish")
    d.add_argument("--json", help="also write the summary as JSON here (it is always in the demo folder)")
    d.add_argument("--train-sessions", type=int, default=800,
                   help="generated sessions to train on when no model is current")
    d.add_argument("--workdir", default="runs/demo",
                   help="where generated data, the worker log, the summary plots and a copy of "
                        "the metrics go (relative to the current directory); the trained model goes "
                        "to TAGGER_ARTIFACTS (default ./artifacts)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("chaos", help="kill workers, restart Redis, pause the broker, promote bad models "
                                     "mid-stream; report what was lost (nothing, we hope)")
    c.add_argument("--quick", action="store_true", help="a short version of every fault (a few minutes)")
    c.add_argument("--json", help="write the per-fault report here")
    c.add_argument("--faults", help="comma-separated subset of kill9,two_workers,redis_restart,"
                                    "broker_pause,bad_artifact,label_set_change,redis_acl,redis_oom,"
                                    "bad_manifest,broker_outage,key_mismatch (default: all), or "
                                    "cluster_two_workers (two_workers on a local Redis Cluster; not in "
                                    "the default set)")
    c.add_argument("--model", help="model folder to serve (default: the current one, else a small "
                                   "one trained on generated logs)")
    c.add_argument("--sessions", type=int, help="generated sessions per fault (or for --scale)")
    c.add_argument("--soak", type=float, metavar="MINUTES",
                   help="instead: run one worker for MINUTES at ~1,000 new sessions a minute and report "
                        "its RSS and the Redis keys every minute")
    c.add_argument("--scale", action="store_true", help="instead: measure throughput with 1 and 2 workers")
    c.add_argument("--workdir", default="runs/chaos", help="where logs, generated data and models go")
    c.set_defaults(func=cmd_chaos)

    b = sub.add_parser("bench", help="throughput, latency, scaling, memory and label quality beside baselines")
    b.add_argument("--quick", action="store_true", help="a short run (1 repeat, small sizes; same JSON keys)")
    b.add_argument("--json", help="write the headline figures as JSON here")
    b.add_argument("--out", help="results folder (default runs/bench, or runs/bench-quick)")
    b.add_argument("--model", help="artifact folder the worker serves (default: train a BiLSTM)")
    b.add_argument("--repeats", type=int, help="repeats per throughput/latency/scaling figure (default 3; quick 1)")
    b.add_argument("--events", type=int, help="messages pre-filled per worker / Faust throughput run")
    b.add_argument("--real-data", default="../shared/data", help="folder of <name>.train.csv/.test.csv real logs")
    b.add_argument("--no-real-data", action="store_true", help="label quality on generated logs only")
    b.add_argument("--no-quality", action="store_true", help="skip the label-quality stage")
    b.add_argument("--profile", action="store_true", help="sample the worker with py-spy in one extra run")
    b.add_argument("--readme", help="rewrite the table between <!-- bench:begin/end --> markers in this file")
    b.set_defaults(func=cmd_bench)
