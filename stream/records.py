"""The topic contracts in code: input events, output labels and dead letters.

Owns the wire formats of ``tagger.events`` (parsed and validated by :func:`parse_event`),
``tagger.labels`` (built by :func:`label_record`, serialised by :func:`encode_label`) and
``tagger.events.dlq`` (:func:`dlq_record`). The JSON Schemas shipped next to this module
(``schemas/event.schema.json``, ``schemas/label.schema.json``) are the structural half of the
contracts; this module adds what a schema cannot say (timestamps parse and lie in 1990..2100,
text is valid Unicode) and normalises values the way ``trainer.loading.read_events`` does, so
an event read from a CSV and the same event read from Kafka look alike to the model.

Validation order, and the DLQ reason code for each failure::

    empty (no value, or zero bytes) -> too_large -> invalid_utf8 -> empty (only whitespace)
      -> invalid_json -> not_object -> missing_field -> wrong_type -> bad_timestamp
      -> timestamp_out_of_range -> key_mismatch (``check_key``: the message key must be the
         session_id, or one session would be split over partitions and workers)

The worker adds two reasons of its own after these: ``session_too_long`` and
``processing_error`` (``stream.app``). The structural checks run ``fastjsonschema`` on the
hot path and ``jsonschema`` only to word a failure (:func:`schema_check`).

(A wrong ``type`` value is reported before a missing field, since which fields are required
depends on it; a lone UTF-16 surrogate escape such as ``"\\ud800"`` is ``invalid_utf8``, found
after parsing because the raw bytes themselves are valid UTF-8.)
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass, field as dc_field
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Callable, Mapping

import orjson

from stream.errors import LabelContractError, StreamError
from trainer.loading import derive_event_id, parse_timestamp

MAX_BYTES = 1_000_000
TS_MIN = 631_152_000.0     # 1990-01-01T00:00:00Z
TS_MAX = 4_102_444_800.0   # 2100-01-01T00:00:00Z
CONTRACT_FIELDS = ("session_id", "timestamp", "event_name", "event_id", "type")
LABEL_FIELDS = ("session_id", "event_id", "seq", "timestamp", "event_name", "step_name",
                "confidence", "abstained", "revision", "final", "model_version", "emitted_at")
DLQ_TEXT_CHARS = 2000

_EXPECTED = {
    "session_id": "a non-blank string or an integer",
    "timestamp": "an ISO 8601 string or epoch milliseconds (an integer or a string of digits)",
    "event_name": "a non-blank string",
    "event_id": "a non-blank string or an integer",
    "type": "'event' or 'session_end'",
}


class InvalidEvent(StreamError):
    """A message on the events topic breaks the input contract; it belongs in the DLQ.

    ``reason`` is a short machine-readable code (see the module docstring), ``detail`` a
    sentence for people, ``field`` the offending field or None.
    """

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.field = reason, detail, field


@dataclass(frozen=True)
class EventIn:
    """One accepted input message, normalised.

    ``session_end`` messages need only ``session_id``: without a timestamp they carry
    ``timestamp=""`` and ``ts=0.0`` (earlier than any real event, so ``max(session_max, ts)``
    keeps the session's current maximum), and without an event name ``event_name=""``.
    """

    session_id: str     # ints accepted on the wire, normalised to str; stripped like read_events
    event_id: str       # given (stripped; ints as str), else derive_event_id(session_id, timestamp, event_name, 0)
    timestamp: str      # as received (epoch ms rendered as its digits)
    ts: float           # seconds since the epoch, UTC
    event_name: str     # stripped like read_events
    type: str           # "event" | "session_end"
    fields: dict = dc_field(hash=False)   # the whole original JSON object

    @property
    def is_session_end(self) -> bool:
        return self.type == "session_end"

    def as_row(self) -> dict:
        """The event as a row of the canonical frame of ``read_events`` (without ``seq``):
        every original field, with the contract fields normalised and ``_ts`` added."""
        row = dict(self.fields)
        row.update(session_id=self.session_id, event_id=self.event_id, timestamp=self.timestamp,
                   event_name=self.event_name, _ts=self.ts)
        row.pop("type", None)
        return row


# ------------------------------------------------------------------------------ schemas

_validators: dict[str, Any] = {}
_checks: dict[str, Callable[[Any], bool]] = {}


def load_schema(name: str) -> dict:
    """A shipped schema (``"event"`` or ``"label"``) as a dict, read from package data."""
    text = resources.files("stream").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


def schema_validator(name: str):
    """The shipped schema's ``jsonschema`` validator, compiled once per process on first use."""
    v = _validators.get(name)
    if v is None:
        from jsonschema import Draft202012Validator
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        v = _validators[name] = Draft202012Validator(
            schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return v


def schema_check(name: str) -> Callable[[Any], bool]:
    """A fast yes/no check with exactly the schema's meaning, compiled once on first use.

    ``jsonschema``'s ``is_valid`` costs ~60 µs per event message here, twice the whole
    per-message budget, so the hot path runs the schema compiled to Python code by
    ``fastjsonschema`` (a few µs) and asks ``jsonschema`` only to explain a failure (the DLQ
    reason and detail, :func:`_schema_failure`). ``use_default=False``: the check must not
    write the schema's defaults into the message. tests/stream/test_records.py checks the two
    agree on random documents.
    """
    check = _checks.get(name)
    if check is None:
        schema = load_schema(name)
        schema_validator(name)   # check_schema: a broken schema fails here, not on a message
        check = _checks[name] = _compile(schema)
    return check


def _compile(schema: dict) -> Callable[[Any], bool]:
    """``fastjsonschema`` as a predicate. Its generated code decides an ``if`` by raising and
    catching an exception when the ``if`` fails, which for the event schema is every regular
    event (``if`` = "type is session_end"): that alone doubled the check's cost. So a top-level
    ``if`` of the shape ``{"properties": {K: {"const": "text"}}, "required": [K]}`` is decided
    here (``x.get(K) == "text"``, exactly what it says; a non-object satisfies it vacuously) and
    picks one of two compiled schemas, the rest with ``then`` or with ``else``; any other
    schema is compiled whole."""
    import fastjsonschema

    invalid = fastjsonschema.JsonSchemaValueException

    def predicate(sub: dict) -> Callable[[Any], bool]:
        validate = fastjsonschema.compile(sub, use_default=False)

        def check(x: Any) -> bool:
            try:
                validate(x)
            except invalid:
                return False
            return True
        return check

    cond = schema.get("if")
    props = cond.get("properties") if isinstance(cond, dict) else None
    if (not isinstance(props, dict) or len(props) != 1 or set(cond) != {"properties", "required"}
            or cond["required"] != list(props)):
        return predicate(schema)
    (key, sub), = props.items()
    if not (isinstance(sub, dict) and set(sub) == {"const"} and isinstance(sub["const"], str)):
        return predicate(schema)
    want = sub["const"]
    rest = {k: v for k, v in schema.items() if k not in ("if", "then", "else")}
    then = predicate({**rest, "allOf": [schema.get("then", True)]})
    else_ = predicate({**rest, "allOf": [schema.get("else", True)]})

    def check(x: Any) -> bool:
        if type(x) is not dict:
            return then(x)
        v = x.get(key)
        return then(x) if type(v) is str and v == want else else_(x)
    return check


# ------------------------------------------------------------------------------ input

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all messages: json.loads(text, parse_constant=...) would build one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


MAX_JSON_DEPTH = 64   # deeper nesting is refused as invalid_json, whatever the call stack


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``limit`` (strings skipped). The
    decoder's own RecursionError depends on how deep the caller's stack already is, so the
    same message could be ``invalid_json`` in the worker and ``not_object`` elsewhere."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _describe(value: Any) -> str:
    """A short, safe description of a JSON value for an error message."""
    if isinstance(value, dict):   # no repr: it may be deep or huge
        return f"an object with {len(value)} keys"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    kind = "null" if value is None else "boolean" if isinstance(value, bool) else type(value).__name__
    shown = repr(value[:60] if isinstance(value, str) else value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _schema_failure(obj: dict) -> InvalidEvent:
    """The most useful single complaint among the schema's errors, naming the field."""
    best: tuple[int, int, InvalidEvent] | None = None
    for err in schema_validator("event").iter_errors(obj):
        if err.validator == "required":
            missing = [f for f in err.validator_value if f not in obj]
            name = min(missing, key=CONTRACT_FIELDS.index) if missing else None
            what = " (type 'session_end' needs only session_id)" if name != "session_id" else ""
            cand = (1, InvalidEvent("missing_field", f"field {name!r} is required{what}", name))
        else:
            name = str(err.path[0]) if err.path else None
            if name in _EXPECTED:
                cand = (0 if name == "type" else 2, InvalidEvent(
                    "wrong_type", f"field {name!r} must be {_EXPECTED[name]}; got "
                    f"{_describe(obj.get(name))}", name))
            else:   # not reachable with the shipped schema; kept so a schema edit cannot crash us
                cand = (3, InvalidEvent("wrong_type", err.message, name))
        key = (cand[0], CONTRACT_FIELDS.index(name) if name in CONTRACT_FIELDS else 99)
        if best is None or key < best[:2]:
            best = (*key, cand[1])
    assert best is not None
    return best[2]


def _surrogate_field(obj: dict) -> str | None:
    """The first top-level field whose value holds a lone surrogate (cannot be UTF-8)."""
    for k, v in obj.items():
        try:
            json.dumps({k: v}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return k
        except RecursionError:   # only for a caller already near the recursion limit: depth is checked first
            continue
    return None


def _timestamp_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))     # 1.7e12 and 1700000000000 are one timestamp, one event id
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def _given(value: Any) -> bool:
    """Present with content: not None and not a blank string."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def parse_event(raw: bytes, *, max_bytes: int = MAX_BYTES) -> EventIn:
    """Validate and normalise one message value. Raises only :class:`InvalidEvent`."""
    if raw is None:
        raise InvalidEvent("empty", "the message has no value (a tombstone)")
    if not raw:
        raise InvalidEvent("empty", "the message value is empty (0 bytes)")
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent("invalid_utf8", f"text is not valid Unicode: {exc.reason}") from None
    if len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"message is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("invalid_utf8", f"not UTF-8: byte {exc.start}: {exc.reason}") from None
    if text.startswith("\ufeff"):   # RFC 8259 lets parsers ignore a byte order mark
        text = text[1:]
    if not text.strip():   # its own reason: usually a client bug, not a JSON syntax slip
        raise InvalidEvent("empty", f"the message value holds only whitespace ({len(raw)} bytes)")
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        raise InvalidEvent("invalid_json", f"not JSON: nested too deeply (over {MAX_JSON_DEPTH} levels)")
    try:
        obj = _DECODER.decode(text)
    except RecursionError:   # nesting is checked above; this is for a caller near the recursion limit
        raise InvalidEvent("invalid_json", "not JSON: nested too deeply") from None
    except ValueError as exc:   # JSONDecodeError, NaN/Infinity, integers over the digit limit
        raise InvalidEvent("invalid_json", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"the message must be a JSON object; got {_describe(obj)}")
    if "\\u" in text:   # only an escape can smuggle in a lone surrogate; skip the check otherwise
        bad = _surrogate_field(obj)
        if bad is not None:
            raise InvalidEvent("invalid_utf8", f"field {bad!r} holds a lone UTF-16 surrogate "
                               "escape, which is not valid Unicode", bad)
    if not schema_check("event")(obj):
        raise _schema_failure(obj)

    sid = obj["session_id"]
    session_id = sid.strip() if isinstance(sid, str) else str(int(sid))   # 7.0 is the integer 7
    kind = obj.get("type", "event")
    # On a session_end marker the other contract fields may be absent, null or blank (a client
    # that always sends every field); the schema has already checked this for regular events.
    event_name = obj["event_name"].strip() if isinstance(obj.get("event_name"), str) else ""
    if _given(obj.get("timestamp")):
        raw_ts = obj["timestamp"]
        timestamp = _timestamp_text(raw_ts)
        try:
            # parse_timestamp hands numbers to numpy, which cannot take ints beyond int64
            ts = math.inf if type(raw_ts) is int and abs(raw_ts) >= 10 ** 16 else parse_timestamp(raw_ts)
        except OverflowError:
            ts = math.inf
        except ValueError as exc:
            raise InvalidEvent("bad_timestamp", f"field 'timestamp': {exc}", "timestamp") from None
        if not TS_MIN <= ts < TS_MAX:
            raise InvalidEvent("timestamp_out_of_range", f"field 'timestamp' {timestamp[:60]!r} is "
                               "outside 1990-01-01..2100-01-01 UTC (epoch milliseconds, not seconds?)",
                               "timestamp")
    else:   # only a session_end may omit it (the schema checked)
        timestamp, ts = "", 0.0
    eid = obj.get("event_id")
    if not _given(eid):
        event_id = derive_event_id(session_id, timestamp, event_name, 0)
    else:
        event_id = eid.strip() if isinstance(eid, str) else str(int(eid))
    return EventIn(session_id, event_id, timestamp, ts, event_name, kind, obj)


# ------------------------------------------------------------------------------ output

def check_key(key: bytes | str | None, event: EventIn) -> None:
    """The input contract keys every message by its ``session_id`` (Kafka partitions by key,
    and a session must stay on one partition, so on one worker). Raises ``InvalidEvent``
    (reason ``key_mismatch``) for a message without a key or with another one."""
    if key is None:
        raise InvalidEvent("key_mismatch", f"the message has no key; it must be the session_id "
                           f"{event.session_id[:100]!r}", "session_id")
    if isinstance(key, (bytes, bytearray)):
        try:
            text = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            text = None
    else:
        text = str(key)
    if text is None or text.strip() != event.session_id:
        shown = text[:100] if text is not None else bytes(key)[:100]
        raise InvalidEvent("key_mismatch", f"the message key {shown!r} is not the session_id "
                           f"{event.session_id[:100]!r}", "session_id")


def iso_utc(epoch_s: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``: ``2024-03-01T12:00:00.123Z``. None = now."""
    if epoch_s is None:
        epoch_s = time.time()
    dt = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def label_record(*, session_id, event_id, seq, timestamp, event_name, step_name, confidence,
                 abstained, revision, final, model_version, emitted_at=None) -> dict:
    """One ``tagger.labels`` record, fields in contract order and coerced to contract types.

    ``step_name`` is forced to None when ``abstained`` (the contract); ``emitted_at`` may be
    epoch seconds, an aware datetime, an ISO string already in contract form, or None (now).
    """
    abstained = bool(abstained)
    if not abstained and step_name is None:
        raise LabelContractError("a label that is not abstained needs a step_name")
    confidence = float(confidence)
    if not 0.0 <= confidence <= 1.0:   # also rejects NaN
        raise LabelContractError(f"confidence must lie in [0, 1]; got {confidence!r}")
    if isinstance(emitted_at, datetime):
        emitted_at = iso_utc(emitted_at.timestamp())
    elif emitted_at is None or isinstance(emitted_at, (int, float)):
        emitted_at = iso_utc(emitted_at)
    return {
        "session_id": str(session_id),
        "event_id": str(event_id),
        "seq": int(seq),
        "timestamp": str(timestamp),
        "event_name": str(event_name),
        "step_name": None if abstained else str(step_name),
        "confidence": confidence,
        "abstained": abstained,
        "revision": int(revision),
        "final": bool(final),
        "model_version": str(model_version),
        "emitted_at": str(emitted_at),
    }


def validate_label(record: Mapping[str, Any]) -> None:
    """Raise ``LabelContractError`` (a ValueError), naming the field, if ``record`` breaks
    ``label.schema.json``."""
    errors = sorted(schema_validator("label").iter_errors(dict(record)), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = f"field {err.path[0]!r}: " if err.path else ""
        raise LabelContractError(f"label record breaks the contract: {where}{err.message}")


def _dumps(obj: Any) -> bytes:
    # orjson: ~0.2 µs for a label record against ~4 µs for json.dumps (two or more records per
    # event). It writes NaN as null where json refuses it, so callers with floats check them.
    try:
        return orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):  # a lone surrogate, a huge int, a non-str key
        pass
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: escape it rather than fail the worker
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def encode_label(record: dict) -> bytes:
    """Compact JSON, UTF-8. A non-finite confidence is refused (``LabelContractError``), as the
    schema does."""
    conf = record.get("confidence")
    if isinstance(conf, float) and not math.isfinite(conf):
        raise LabelContractError(f"label record for event {record.get('event_id')!r}: confidence {conf!r} is not finite")
    return _dumps(record)


_DEFAULT_DETAIL = {
    "empty": "the message has no value", "too_large": "message too large",
    "invalid_utf8": "not UTF-8", "invalid_json": "not JSON",
    "not_object": "not a JSON object", "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type", "bad_timestamp": "unparseable timestamp",
    "timestamp_out_of_range": "timestamp outside 1990..2100",
    "key_mismatch": "the message key is not the session_id",
}


def dlq_record(raw: bytes | None, reason: str, field: str | None, topic: str, partition: int,
               offset: int, key: bytes | None, *, detail: str | None = None,
               dlq_at: float | None = None) -> bytes:
    """The ``tagger.events.dlq`` value for a rejected message.

    Holds the original bytes exactly (base64), a readable preview, why, and where it came
    from — and nothing else: no headers, settings or credentials. Pass an
    :class:`InvalidEvent`'s ``reason``, ``field`` and ``detail``; other failures may use
    their own reason code.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogatepass")
    payload = {
        "original": None if raw is None else base64.b64encode(bytes(raw)).decode("ascii"),
        "original_text": None if raw is None else
        bytes(raw[:DLQ_TEXT_CHARS * 4]).decode("utf-8", errors="replace")[:DLQ_TEXT_CHARS],
        "reason": str(reason),
        "detail": detail if detail is not None else _DEFAULT_DETAIL.get(reason, str(reason)),
        "field": field,
        "source": {"topic": topic, "partition": int(partition), "offset": int(offset)},
        "key": None if key is None else base64.b64encode(bytes(key)).decode("ascii"),
        "dlq_at": iso_utc(dlq_at),
    }
    return _dumps(payload)
