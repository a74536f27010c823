"""``tagger`` subcommands of the trainer: generate, train, evaluate, predict, cv.

``register(sub, replay=...)`` adds them to the top-level parser (``tagger.cli``). The live
replay behind ``evaluate --streaming`` and ``cv`` lives in ``stream``, which ``trainer`` never
imports; ``tagger.cli`` passes it in as ``replay`` (a ``trainer.evaluate.StreamingReplay``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from trainer.evaluate import StreamingReplay


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def writable(path: str | None, option: str, *, folder: bool = False) -> None:
    """Raise a ConfigError naming ``option`` unless ``path`` can be written (a file, or with
    ``folder`` a folder): checked before the work, so that a mistyped path fails at once
    instead of with a traceback after a long run. Nothing is created here."""
    if path is None:
        return
    from pathlib import Path
    from trainer.errors import ConfigError
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise ConfigError(f"{option} {path}: is a file; name a folder")
        if not folder and p.is_dir():
            raise ConfigError(f"{option} {path}: is a folder; name a file")
        if not os.access(p, os.W_OK | (os.X_OK if folder else 0)):
            raise ConfigError(f"{option} {path}: not writable")
        return
    above = p.parent
    while not above.exists():              # ends at "." or the root, which exist
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{option} {path}: {above} is a file, so no folder can be made there")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {above}")


def cmd_generate(args) -> int:
    from trainer.generate import generate
    writable(args.out, "--out")
    writable(args.images, "--images", folder=True)
    stats = generate(args.sessions, args.seed, args.out, images_dir=args.images,
                     progress=_progress(args), profile=args.profile)
    print(f"wrote {stats['events']} events in {stats['sessions']} sessions to {stats['path']}")
    for name, n in sorted(stats["steps"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:7d}  {name}")
    return 0


def cmd_train(args) -> int:
    from trainer.config import load_config
    from trainer.train import train
    writable(args.out, "--out", folder=True)
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
    writable(args.json, "--json")
    res = evaluate(args.model, args.data, args.json, streaming=args.replay if args.streaming else None,
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
    writable(args.out, "--out")
    out = predict(args.model, args.data, args.out, skip_bad_rows=args.skip_bad_rows)
    print(f"labelled {len(out)} events ({int(out['abstained'].sum())} abstained) -> {args.out}")
    return 0


def cmd_cv(args) -> int:
    from trainer.config import load_config
    from trainer.cv import cross_validate, format_labels, format_table, write_report
    writable(args.json, "--json")
    writable(args.predictions, "--predictions")
    writable(args.keep, "--keep", folder=True)
    cfg = load_config(args.config)
    if args.epochs:
        cfg = cfg.replace(train={"epochs": args.epochs})
    report = cross_validate(args.data, cfg, folds=args.folds, archs=args.arch, seed=args.seed,
                            workdir=args.keep, streaming=None if args.no_streaming else args.replay,
                            predictions=args.predictions)
    write_report(report, args.json)
    print(format_table(report))
    if labels := format_labels(report):
        print(f"\n{labels}")
    print(f"report written to {args.json}"
          + (f"; every event's predictions to {args.predictions}" if args.predictions else ""))
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def register(sub, *, replay: Optional["StreamingReplay"] = None) -> None:
    """Add the trainer's subcommands to ``sub``; ``replay`` runs ``evaluate --streaming`` and
    the live replay of each ``cv`` fold (without it, ``--streaming`` is refused)."""
    g = sub.add_parser("generate", help="write realistic generated task-mining logs")
    g.add_argument("--profile", choices=("default", "window-focus", "window-focus-hard"), default="default",
                   help="default: the seed's back-office task-mining process; window-focus: "
                        "one office worker's window-focus log, a session per working day, "
                        "labelled with 28 job activities; window-focus-hard: the same with "
                        "titles that say less about the activity")
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
    e.set_defaults(func=cmd_evaluate, replay=replay)

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
    c.add_argument("--predictions", help="write every event's pooled predictions here (CSV: its fold, the "
                                         "event, a column per row of the table; NAME.first and "
                                         "NAME.covered for models)")
    c.set_defaults(func=cmd_cv, replay=replay)
