"""Publishing events to ``tagger.events`` the way desktop agents do, and replaying logs.

Owns the producer side of the input contract: :class:`EventPublisher` checks every event
with :func:`stream.records.parse_event` before it leaves the process (garbage is refused
here, with :class:`stream.records.InvalidEvent`, instead of landing in the DLQ), keys it by
``session_id`` so a session stays on one partition and in order, and sends it as compact
JSON. :func:`replay` turns a labelled or unlabelled log into a live-looking stream: sessions
interleaved in time order, optionally paced, the truth kept back from the tagger.

``security`` is passed to ``aiokafka.AIOKafkaProducer`` as keyword arguments, e.g.
``stream.settings.kafka_client_kwargs(settings)`` or ``{"security_protocol": "SASL_SSL",
"sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": ..., "sasl_plain_password": ...,
"ssl_context": ...}`` (a ``bootstrap_servers`` key in it is ignored: ``bootstrap`` wins).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stream.records import InvalidEvent, parse_event
from stream.errors import ConfigError, StreamError
from trainer.loading import LABEL, read_events

DEFAULT_TOPIC = "tagger.events"


def _encode(event: dict) -> bytes:
    try:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:   # not JSON-serialisable, NaN, circular
        raise InvalidEvent("invalid_json", f"the event cannot be encoded as JSON: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent("invalid_utf8", f"the event holds text that is not valid Unicode: "
                           f"{exc.reason}") from None


class EventPublisher:
    """An async context manager that publishes contract-valid events.

    ``publish`` returns once the event is queued (batched for ``linger_ms``); ``flush``
    waits for every queued event to be acknowledged and raises :class:`StreamError` if any
    was not.
    """

    def __init__(self, bootstrap: str, topic: str = DEFAULT_TOPIC, *,
                 security: dict | None = None, linger_ms: int = 5,
                 client_id: str = "tagger-publisher"):
        self.bootstrap, self.topic = bootstrap, topic
        self._config = dict(linger_ms=linger_ms, acks="all", client_id=client_id)
        # security may be stream.settings.kafka_client_kwargs(...), which names the bootstrap too
        self._config.update(security or {})
        self._config["bootstrap_servers"] = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._pending: set[asyncio.Future] = set()
        self._failure: BaseException | None = None

    async def __aenter__(self) -> "EventPublisher":
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            await self.stop()

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._config)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise StreamError(f"cannot connect to Kafka at {self.bootstrap}: {exc}") from exc
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def publish(self, event: dict) -> None:
        """Validate ``event`` against the input contract and queue it, keyed by session."""
        value = _encode(event)
        parsed = parse_event(value)   # raises InvalidEvent: nothing invalid leaves the process
        await self._send(parsed.session_id, value)

    async def end_session(self, session_id: str | int, *, timestamp: str | int | None = None,
                          **extra: Any) -> None:
        """Publish the ``session_end`` message that finalises a session's labels."""
        event: dict[str, Any] = {"session_id": session_id, "type": "session_end", **extra}
        if timestamp is not None:
            event["timestamp"] = timestamp
        await self.publish(event)

    async def flush(self) -> None:
        """Wait until every queued event is acknowledged by the broker."""
        if self._producer is not None:
            await self._producer.flush()
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._failure is not None:
            exc, self._failure = self._failure, None
            raise StreamError(f"publishing to {self.topic!r} at {self.bootstrap} failed: {exc}") from exc

    async def _send(self, session_id: str, value: bytes) -> None:
        if self._producer is None:
            raise StreamError("the publisher is not started: use `async with EventPublisher(...)`")
        try:
            fut = await self._producer.send(self.topic, value=value, key=session_id.encode("utf-8"))
        except KafkaError as exc:
            raise StreamError(f"cannot publish to {self.topic!r} at {self.bootstrap}: {exc}") from exc
        self._pending.add(fut)
        fut.add_done_callback(self._delivered)

    def _delivered(self, fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None and self._failure is None:
            self._failure = fut.exception()


# ------------------------------------------------------------------------------ replay

def _plain(value: Any) -> Any:
    """A frame cell as a JSON value (CSV cells are strings already; Parquet ones may not be)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    return str(value)


def replay_messages(frame: pd.DataFrame, *, sessions: int | None = None,
                    end_sessions: bool = True) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """The messages a replay publishes, in order, and the truth kept back from them.

    ``frame`` is ``read_events``' canonical frame. Sessions are interleaved by timestamp (ties:
    the session seen first in the file, then the session's own order); each event carries the
    contract fields and the file's other columns, but never ``step_name``, ``seq`` or the
    loader's ``_`` columns. With ``end_sessions`` a session's ``session_end`` follows its last
    event at once.
    """
    order = pd.factorize(frame["session_id"])[0]
    if sessions is not None:
        frame, order = frame[order < sessions], order[order < sessions]
    frame = frame.assign(_session_order=order).sort_values(
        ["_ts", "_session_order", "seq"], kind="stable")
    columns = [c for c in frame.columns if not c.startswith("_") and c not in ("seq", LABEL)]
    last_seq = frame.groupby("session_id", sort=False)["seq"].max().to_dict()
    truth: dict[tuple[str, str], str] = {}
    has_truth = LABEL in frame.columns
    messages: list[dict] = []
    for row in frame.to_dict("records"):
        messages.append({c: _plain(row[c]) for c in columns})
        if has_truth and str(row[LABEL]).strip():
            truth[(row["session_id"], row["event_id"])] = str(row[LABEL]).strip()
        if end_sessions and row["seq"] == last_seq[row["session_id"]]:
            messages.append({"session_id": row["session_id"], "type": "session_end",
                             "timestamp": row["timestamp"]})
    return messages, truth


async def replay(csv_path: str | Path, bootstrap: str, topic: str = DEFAULT_TOPIC, *,
                 rate: float | None = None, sessions: int | None = None,
                 end_sessions: bool = True, progress: bool = False,
                 security: dict | None = None) -> dict:
    """Publish a log (CSV or Parquet) as live agents would; returns what was sent.

    Wall-clock gaps are compressed: with ``rate`` the events go out at that many per second
    overall (``session_end`` messages are not counted and not paced), without it as fast as
    the producer takes them. Each message gets ``published_at`` (epoch seconds) so the
    tagger can measure end-to-end latency.

    Returns ``{"events": n, "sessions": k, "seconds": s}`` plus ``"truth":
    {(session_id, event_id): step_name}`` when the file has a ``step_name`` column.
    """
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be a positive number of events per second; got {rate!r}")
    frame, _ = await asyncio.to_thread(read_events, csv_path, require_label=False)
    messages, truth = replay_messages(frame, sessions=sessions, end_sessions=end_sessions)
    n_events = sum(1 for m in messages if m.get("type") != "session_end")
    n_sessions = len({m["session_id"] for m in messages})
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_events, unit="ev", desc=f"replay → {topic}", file=sys.stderr)
    loop = asyncio.get_running_loop()
    sent = 0
    async with EventPublisher(bootstrap, topic, security=security) as pub:
        start = loop.time()
        for msg in messages:
            is_event = msg.get("type") != "session_end"
            if rate is not None and is_event:
                delay = start + sent / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            msg["published_at"] = time.time()
            await pub.publish(msg)
            if is_event:
                sent += 1
                if bar is not None:
                    bar.update(1)
        await pub.flush()
        seconds = loop.time() - start
    if bar is not None:
        bar.close()
    result: dict[str, Any] = {"events": n_events, "sessions": n_sessions, "seconds": seconds}
    if LABEL in frame.columns:
        result["truth"] = truth
    return result
