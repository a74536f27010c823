"""The ``tagger`` command line: the trainer's and the live service's subcommands in one parser.

This is the only module that imports both ``trainer`` and ``stream``: ``trainer.cli`` and
``stream.cli`` each register their own subcommands, and the live replay that
``evaluate --streaming`` and ``cv`` run (``stream.tools.replay``) is handed to the trainer's
commands from here. Every ``TaggerError`` becomes a one-line message and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.errors import TaggerError

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


def streaming_replay(*args, **kwargs):
    """``stream.tools.replay.streaming_evaluation``, imported on first use (it loads torch and
    the live tagger; ``tagger --help`` should not)."""
    from stream.tools.replay import streaming_evaluation
    return streaming_evaluation(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("tagger")
    except PackageNotFoundError:  # run from a source tree without an install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    import stream.cli
    import trainer.cli

    p = argparse.ArgumentParser(prog="tagger", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"tagger {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or live output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trainer.cli.register(sub, replay=streaming_replay)
    stream.cli.register(sub)
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
