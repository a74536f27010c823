"""Watching ``tagger.labels``: label records as they are emitted, revisions made visible.

Owns the human (and ``jq``) view of the output topic. Pretty mode prints one line per
record::

    s-0042        #  7  Read: 4695744561 . A543 . in shar…  Look Up Customer Account  0.93  r2 ↻  ✓ FINAL
    s-0042        #  8  Action*: Context in Terminal        — abstained —             0.41  r0

JSON mode prints each record as one JSON line, nothing else on stdout. The consumer joins no
group (so it never steals partitions from, or commits offsets for, anyone) and is stopped on
the way out however :func:`tail` ends: ``limit`` reached, ``idle_s`` without records, or
cancellation (Ctrl-C under ``asyncio.run``; ``python -m stream.tools.tail`` exits quietly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from stream.errors import StreamError

DEFAULT_TOPIC = "tagger.labels"

_UNICODE_MARKS = {"revised": "↻", "final": "✓ FINAL", "abstained": "— abstained —", "more": "…"}
_ASCII_MARKS = {"revised": "~", "final": "* FINAL", "abstained": "-- abstained --", "more": "~"}


def _marks(out: TextIO) -> dict[str, str]:
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        "".join(_UNICODE_MARKS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII_MARKS
    return _UNICODE_MARKS


def _fit(text: str, width: int, more: str) -> str:
    text = " ".join(str(text).split())   # one line, whatever the event name holds
    return text if len(text) <= width else text[: width - len(more)] + more


def _shown(record: dict) -> tuple:
    return (None if record.get("abstained") else record.get("step_name"), bool(record.get("abstained")))


def label_changed(record: dict, previous: dict | None) -> bool:
    """Whether ``record`` changes what its event shows. A non-final revision always does (the
    contract emits one only then); a final may repeat the shown label, so it counts as a change
    only against a known ``previous`` record of the same event that showed something else."""
    if int(record.get("revision", 0)) <= 0:
        return False
    if not record.get("final"):
        return True
    return previous is not None and _shown(previous) != _shown(record)


def format_label(record: dict, marks: dict[str, str] = _UNICODE_MARKS,
                 previous: dict | None = None) -> str:
    """One pretty line for a label record; ``previous`` is the event's last record seen, if
    any (``↻`` marks a record that changed the label, not a final that only confirms it)."""
    step = record.get("step_name")
    shown_step = marks["abstained"] if record.get("abstained") or step is None else step
    rev = int(record.get("revision", 0))
    rev_mark = f"r{rev} {marks['revised']}" if label_changed(record, previous) else f"r{rev}"
    try:
        conf = f"{float(record.get('confidence')):.2f}"
    except (TypeError, ValueError):
        conf = " ?  "
    line = (f"{_fit(record.get('session_id', '?'), 12, marks['more']):<12}  "
            f"#{record.get('seq', '?'):>4}  "
            f"{_fit(record.get('event_name', ''), 36, marks['more']):<36}  "
            f"{_fit(shown_step, 28, marks['more']):<28}  {conf}  {rev_mark:<5}")
    if record.get("final"):
        line += f"  {marks['final']}"
    return line.rstrip()


async def tail(bootstrap: str, topic: str = DEFAULT_TOPIC, *, json_lines: bool = False,
               from_beginning: bool = False, limit: int | None = None, out: TextIO = sys.stdout,
               security: dict | None = None, idle_s: float | None = None) -> int:
    """Print label records from ``topic`` until ``limit`` records, ``idle_s`` seconds without
    one, or cancellation. Returns how many records were shown."""
    config: dict[str, Any] = {"client_id": "tagger-tail", **(security or {})}
    config.update(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                  auto_offset_reset="earliest" if from_beginning else "latest")
    consumer = AIOKafkaConsumer(topic, **config)
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise StreamError(f"cannot connect to Kafka at {bootstrap}: {exc}") from exc
    marks = _marks(out)
    shown = 0
    last: dict[tuple, dict] = {}   # (session, event) -> its latest record, until its final
    try:
        while limit is None or shown < limit:
            batch = await consumer.getmany(timeout_ms=int(1000 * idle_s) if idle_s else 1000,
                                           max_records=None if limit is None else limit - shown)
            if not batch:
                if idle_s:
                    break
                continue
            for tp, messages in sorted(batch.items(), key=lambda kv: kv[0].partition):
                for msg in messages:
                    _show(msg.value, out, json_lines, marks, last)
                    shown += 1
            out.flush()
    finally:
        await consumer.stop()
    return shown


def _show(value: bytes | None, out: TextIO, json_lines: bool, marks: dict[str, str],
          last: dict[tuple, dict]) -> None:
    try:
        record: Any = json.loads(value) if value is not None else None
    except ValueError:
        record = None
    if json_lines:
        if isinstance(record, dict):
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:   # stdout stays pure JSON lines; say so on stderr
            print(f"tail: skipped a record that is not a JSON object: {_preview(value)}", file=sys.stderr)
        return
    if isinstance(record, dict):
        key = (record.get("session_id"), record.get("event_id"))
        out.write(format_label(record, marks, last.get(key)) + "\n")
        if record.get("final"):
            last.pop(key, None)
        else:
            last[key] = record
    else:
        out.write(f"?? not a label record: {_preview(value)}\n")


def _preview(value: bytes | None) -> str:
    return "(no value)" if value is None else repr(value[:80])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.tools.tail", description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("TAGGER_KAFKA", "127.0.0.1:9092"))
    ap.add_argument("--topic", default=DEFAULT_TOPIC)
    ap.add_argument("--json", action="store_true", help="print raw records as JSON lines")
    ap.add_argument("--from-beginning", action="store_true")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args(argv)
    try:
        asyncio.run(tail(args.bootstrap, args.topic, json_lines=args.json,
                         from_beginning=args.from_beginning, limit=args.limit))
    except KeyboardInterrupt:
        return 130
    except StreamError as exc:
        print(f"tail: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
