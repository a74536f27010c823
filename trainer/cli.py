"""The ``tagger`` command line: the public surface of the offline and live tools.

Offline commands live here; live-service commands (worker, stack, publish, tail, demo,
promote, bench, chaos) are registered by ``stream.cli`` so that ``trainer`` never imports
``stream`` at module level. Every ``TaggerError`` becomes a one-line message and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.errors import TaggerError


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def cmd_generate(args) -> int:
    from trainer.generate import generate
    stats = generate(args.sessions, args.seed, args.out, images_dir=args.images,
                     progress=_progress(args), profile=args.profile)
    print(f"wrote {stats['events']} events in {stats['sessions']} sessions to {stats['path']}")
    for name, n in sorted(stats["steps"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:7d}  {name}")
    return 0


def cmd_train(args) -> int:
    from trainer.config import load_config
    from trainer.train import train
    cfg = load_config(args.config)
    overrides = {}
    if args.arch:
        overrides["model"] = {"arch": args.arch}
    if args.epochs:
        overrides["train"] = {"epochs": args.epochs}
    if overrides:
        cfg = cfg.replace(**overrides)
    train(args.data, args.out, cfg, progress=_progress(args), skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_evaluate(args) -> int:
    from trainer.evaluate import evaluate
    from trainer.report import format_summary
    res = evaluate(args.model, args.data, args.json, streaming=args.streaming,
                   skip_bad_rows=args.skip_bad_rows, progress=_progress(args))
    print(f"{res['events']} events in {res['sessions']} sessions, model {res['model_version']}")
    summary = {"offline": res["offline"], "classification": res["details"]["classification"]}
    if "streaming" in res:
        summary["streaming"] = res["streaming"]
    print(format_summary(summary))
    if args.json:
        print(f"report written to {args.json}")
    return 0


def cmd_predict(args) -> int:
    from trainer.evaluate import predict
    out = predict(args.model, args.data, args.out, skip_bad_rows=args.skip_bad_rows)
    print(f"labelled {len(out)} events ({int(out['abstained'].sum())} abstained) -> {args.out}")
    return 0


def cmd_cv(args) -> int:
    from trainer.config import load_config
    from trainer.cv import cross_validate, format_table, write_report
    cfg = load_config(args.config)
    if args.epochs:
        cfg = cfg.replace(train={"epochs": args.epochs})
    report = cross_validate(args.data, cfg, folds=args.folds, archs=args.arch, seed=args.seed,
                            workdir=args.keep, streaming=not args.no_streaming)
    write_report(report, args.json)
    print(format_table(report))
    print(f"report written to {args.json}")
    return 0


DESCRIPTION = """\
Label every desktop event with the step of the task it belongs to: live, from a Kafka topic
(worker), and offline from CSV/Parquet logs (train, evaluate, predict)."""

EPILOG = """\
a first hour:
  tagger demo                                   everything on this machine, with a summary
  tagger generate --sessions 600 --seed 1 --out runs/train.csv
  tagger generate --sessions 300 --seed 2 --out runs/test.csv
  tagger train    --data runs/train.csv --out artifacts/m1
  tagger evaluate --model artifacts/m1 --data runs/test.csv --json runs/eval.json --streaming
  tagger promote  artifacts/m1 && eval "$(tagger stack up)" && tagger worker

`tagger COMMAND --help` explains each command. Errors are one line on stderr and exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of descriptions and shows each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and "(default" not in text and action.option_strings and action.nargs != 0
                and not any(default is x for x in (None, False, True, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tagger")
    except PackageNotFoundError:  # run from a source tree without an install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagger", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"tagger {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or live output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="write realistic generated task-mining logs")
    g.add_argument("--profile", choices=("default", "window-focus"), default="default",
                   help="default: the seed's back-office task-mining process; window-focus: "
                        "one office worker's window-focus log, a session per working day, "
                        "labelled with 28 job activities")
    g.add_argument("--sessions", type=_non_negative,
                   help="sessions to write (default 1000; window-focus: working days, default 20)")
    g.add_argument("--seed", type=_non_negative, default=0,
                   help="random seed: the same seed writes the same bytes; each seed has its own "
                        "session ids, so logs of different seeds can be published together")
    g.add_argument("--out", required=True, help="CSV file to write")
    g.add_argument("--images", help="also render one screenshot per event into this folder "
                                    "(default profile only)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train, calibrate and score a model; write an artifact folder")
    t.add_argument("--data", required=True, help="training CSV or Parquet (label column step_name)")
    t.add_argument("--out", required=True, help="artifact folder to write")
    t.add_argument("--config", help="YAML config (data/model/train sections)")
    t.add_argument("--arch", help="override model.arch (bilstm, transformer, ht_transformer, tcn, bilstm_attn, logreg, crf)")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and report them")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a model on a labelled log")
    e.add_argument("--model", required=True, help="artifact folder written by `tagger train`")
    e.add_argument("--data", required=True, help="labelled CSV or Parquet (label column step_name)")
    e.add_argument("--json", help="write the report as JSON here (plots in <name>_plots/ beside it)")
    e.add_argument("--streaming", action="store_true",
                   help="also replay sessions event by event through the live tagging code "
                        "(adds the streaming metrics and session timeline plots)")
    e.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and report them")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="label a log with a model (batch inference)")
    pr.add_argument("--model", required=True, help="artifact folder written by `tagger train`")
    pr.add_argument("--data", required=True, help="CSV or Parquet of events (no label needed)")
    pr.add_argument("--out", required=True, help="CSV to write: one row per event with "
                                                 "pred_step_name, pred_confidence, abstained, ...")
    pr.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and report them")
    pr.set_defaults(func=cmd_predict)

    c = sub.add_parser("cv", help="cross-validate by session against the CRF references",
                       description="Fold the log by session; train each architecture on the other "
                                   "folds (as `train` does), label the held-out fold offline and "
                                   "live; pool every fold's predictions and compare them, fold by "
                                   "fold, with a CRF over each event +-2 and a causal CRF.")
    c.add_argument("--data", required=True, help="labelled CSV or Parquet log")
    c.add_argument("--json", required=True, help="write the report as JSON here")
    c.add_argument("--config", help="YAML config (data/model/train sections)")
    c.add_argument("--folds", type=int, default=5, help="number of session folds (default: 5)")
    c.add_argument("--arch", action="append",
                   help="architecture to test (repeatable; default: the config's model.arch)")
    c.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    c.add_argument("--epochs", type=int, help="override train.epochs")
    c.add_argument("--keep", help="keep each fold's artifacts in this folder (default: a temporary one)")
    c.add_argument("--no-streaming", action="store_true", help="skip the live replay of each fold")
    c.set_defaults(func=cmd_cv)

    from stream.cli import register  # the live side ships in the same distribution
    register(sub)
    summaries = {a.dest: a.help for a in sub._choices_actions}  # noqa: SLF001 - argparse keeps them only here
    for name, sp in sub.choices.items():
        sp.formatter_class = HelpFormatter
        summary = summaries.get(name) or ""
        sp.description = sp.description or (summary[:1].upper() + summary[1:]) or None
        # -q/-v also after the command; SUPPRESS keeps a value given before it
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or live output")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("aiokafka", "faust", "mode", "sentence_transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except TaggerError as exc:
        print(f"tagger {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tagger ... | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
