"""``tagger`` subcommands of the live service: worker, promote, stack, publish, tail, demo.

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


def cmd_worker(args) -> int:
    import faust

    from stream.app import create_app
    from stream.settings import Settings
    settings = Settings.from_env()
    if args.artifacts:
        settings = dataclasses.replace(settings, artifacts_dir=Path(args.artifacts))
    logging.getLogger("tagger").info("starting worker with %s", settings.redacted())
    app = create_app(settings)
    worker = faust.Worker(app, loglevel="DEBUG" if args.verbose else "INFO", quiet=True,
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
    from stream.stack import format_env, stack_down, stack_status, stack_up
    if args.action == "up":
        info = stack_up(args.state_dir)
        print(f"stack {'already ' if info.get('already_running') else ''}running: Kafka-compatible broker "
              f"{info['kafka']}, Redis {info['redis']}", file=sys.stderr)
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
    from stream.publisher import replay
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
    from stream.tail import tail
    settings = Settings.from_env()
    security = {k: v for k, v in kafka_client_kwargs(settings).items() if k != "bootstrap_servers"}
    try:
        asyncio.run(tail(settings.kafka, settings.output_topic, json_lines=args.json, security=security,
                         from_beginning=args.from_beginning, limit=args.limit))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args) -> int:
    from stream.demo import run_demo
    summary = run_demo(sessions=args.sessions, json_out=args.json, rate=args.rate,
                       quiet=args.quiet or not sys.stdout.isatty(), workdir=Path(args.workdir))
    return 0 if summary.get("events_without_final", 1) == 0 else 1


def register(sub) -> None:
    w = sub.add_parser("worker", help="run the live tagging worker (Faust) against TAGGER_KAFKA / TAGGER_REDIS")
    w.add_argument("--artifacts", help="artifacts folder with the `current` pointer (default TAGGER_ARTIFACTS)")
    w.set_defaults(func=cmd_worker)

    p = sub.add_parser("promote", help="make a trained model the current one; running workers hot-swap to it")
    p.add_argument("model", help="artifact folder")
    p.add_argument("--artifacts", help="artifacts root (default TAGGER_ARTIFACTS or ./artifacts)")
    p.set_defaults(func=cmd_promote)

    s = sub.add_parser("stack", help="start/stop the embedded Kafka-compatible broker and Redis")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--state-dir", help="where pids and logs go (default .tagger/ or TAGGER_STATE_DIR)")
    s.set_defaults(func=cmd_stack)

    pb = sub.add_parser("publish", help="replay a log into the events topic as desktop agents would")
    pb.add_argument("--data", required=True)
    pb.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pb.add_argument("--sessions", type=int, help="only the first K sessions")
    pb.add_argument("--no-end", action="store_true", help="do not send session_end after each session")
    pb.set_defaults(func=cmd_publish)

    t = sub.add_parser("tail", help="show label records as they arrive, revisions included")
    t.add_argument("--json", action="store_true", help="raw JSON lines")
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--limit", type=int)
    t.set_defaults(func=cmd_tail)

    d = sub.add_parser("demo", help="the whole product on this machine: stack, model, worker, live labels, summary")
    d.add_argument("--sessions", type=int, default=60, help="held-out sessions to replay")
    d.add_argument("--rate", type=float, default=150.0, help="events per second to publish")
    d.add_argument("--json", help="write the summary as JSON here")
    d.add_argument("--workdir", default="runs/demo", help="where generated data and logs go")
    d.set_defaults(func=cmd_demo)
