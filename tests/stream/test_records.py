"""The topic contracts: what parse_event accepts and rejects, label records, DLQ payloads."""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stream.records import (CONTRACT_FIELDS, LABEL_FIELDS, EventIn, InvalidEvent, TS_MAX, TS_MIN,
                            dlq_record, encode_label, iso_utc, label_record, load_schema,
                            parse_event, schema_check, schema_validator, validate_label)
from stream.errors import StreamError
from trainer.loading import derive_event_id, read_events

REASONS = {"empty", "too_large", "invalid_utf8", "invalid_json", "not_object", "missing_field",
           "wrong_type", "bad_timestamp", "timestamp_out_of_range"}
MS_MIN, MS_MAX = int(TS_MIN * 1000), int(TS_MAX * 1000) - 1
# Compile the event schema (both the fast check and jsonschema's validator, used to explain a
# failure) up front: on a loaded machine the first compile alone can pass hypothesis' 200 ms
# per-example deadline, which then reports a flaky failure.
schema_check("event")
schema_validator("event").is_valid({})


def enc(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def reject(raw, **kw) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, **kw)
    return info.value


# ------------------------------------------------------------------------------ strategies

json_scalars = (st.none() | st.booleans() | st.integers() | st.text()
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
names = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
epoch_ms = st.integers(MS_MIN, MS_MAX)


@st.composite
def iso_timestamps(draw) -> str:
    ms = draw(epoch_ms)
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    style = draw(st.sampled_from(["Z", "+00:00", "naive", "space"]))
    text = dt.isoformat(timespec="milliseconds").replace("+00:00", "")
    if style == "space":
        text = text.replace("T", " ")
    return text + ("" if style in ("naive", "space") else style)


@st.composite
def valid_events(draw) -> dict:
    obj = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in CONTRACT_FIELDS),
                               json_values, max_size=4))
    obj["session_id"] = draw(names | st.integers())
    obj["timestamp"] = draw(iso_timestamps() | epoch_ms | epoch_ms.map(str))
    obj["event_name"] = draw(names)
    if draw(st.booleans()):
        obj["event_id"] = draw(names | st.integers())
    if draw(st.booleans()):
        obj["type"] = "event"
    return obj


# wrong-ish values for each contract field, to mix into otherwise plausible messages
contract_values = {
    "session_id": json_values | names,
    "timestamp": json_values | iso_timestamps() | epoch_ms | st.text(max_size=30),
    "event_name": json_values | names,
    "event_id": json_values | names,
    "type": json_values | st.sampled_from(["event", "session_end"]),
}
plausible = st.fixed_dictionaries({}, optional=contract_values)


# ------------------------------------------------------------------------------ fuzzing

def _parse_or_reason(raw: bytes):
    try:
        return parse_event(raw)
    except InvalidEvent as exc:
        assert exc.reason in REASONS, exc.reason
        assert exc.detail and str(exc).startswith(exc.reason)
        assert exc.field is None or exc.field in CONTRACT_FIELDS or exc.reason == "invalid_utf8"
        return exc


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_invalid_event(raw):
    _parse_or_reason(raw)


@settings(max_examples=400)
@given(json_values)
def test_random_json_raises_only_invalid_event(value):
    _parse_or_reason(enc(value))


@settings(max_examples=600)
@given(plausible)
def test_wrong_types_and_missing_fields_raise_only_invalid_event(obj):
    got = _parse_or_reason(enc(obj))
    if isinstance(got, EventIn):   # whatever got through honours the contract
        assert got.session_id.strip() and got.session_id == got.session_id.strip()
        assert got.type in ("event", "session_end")
        assert got.event_id
        if got.type == "event":
            assert got.event_name.strip() and TS_MIN <= got.ts < TS_MAX
        assert got.fields == obj


@settings(max_examples=300)
@given(valid_events())
def test_every_valid_message_round_trips(obj):
    ev = parse_event(enc(obj))
    assert ev.fields == obj
    assert ev.session_id == (obj["session_id"].strip() if isinstance(obj["session_id"], str)
                             else str(obj["session_id"]))
    assert ev.timestamp == str(obj["timestamp"])
    assert ev.event_name == obj["event_name"].strip()
    assert ev.type == "event"
    if "event_id" in obj:
        assert ev.event_id == str(obj["event_id"]).strip()
    else:
        assert ev.event_id == derive_event_id(ev.session_id, ev.timestamp, ev.event_name, 0)
    # what we accepted, re-encoded, is accepted again as the same event (redelivery)
    assert parse_event(json.dumps(ev.fields, ensure_ascii=False).encode()) == ev
    row = ev.as_row()
    assert row["_ts"] == ev.ts and row["session_id"] == ev.session_id and "type" not in row


@settings(max_examples=500)
@given(plausible | json_values)
def test_compiled_schema_check_agrees_with_jsonschema(obj):
    assert schema_check("event")(obj) == schema_validator("event").is_valid(obj)


def test_huge_messages_are_rejected_before_parsing():
    big = enc({"session_id": "s", "timestamp": MS_MIN, "event_name": "e", "text": "x" * 2_000_000})
    assert reject(big).reason == "too_large"
    assert reject(b"[" * 2_000_000).reason == "too_large"
    # the limit is inclusive and adjustable
    small = enc({"session_id": "s", "timestamp": MS_MIN, "event_name": "e"})
    assert parse_event(small, max_bytes=len(small)).session_id == "s"
    assert reject(small, max_bytes=len(small) - 1).reason == "too_large"
    # deep nesting within the limit is bad JSON, not a crash
    assert reject(b"[" * 500_000 + b"]" * 500_000).reason == "invalid_json"


# ------------------------------------------------------------------------------ reason codes

GOOD = {"session_id": "s1", "timestamp": "2024-03-01T12:00:00Z", "event_name": "Read: x in y"}


@pytest.mark.parametrize("raw, reason, field", [
    (b"\xff\xfe{}", "invalid_utf8", None),
    (b'{"session_id": "\\ud800", "timestamp": 1, "event_name": "e"}', "invalid_utf8", "session_id"),
    (b'{"session_id": "s1", "timestamp": ', "invalid_json", None),
    (b'{"session_id": "s1", "timestamp": NaN, "event_name": "e"}', "invalid_json", None),
    (b"", "empty", None),
    (b" \n\t ", "empty", None),
    (b'["s1", "2024-03-01T12:00:00Z", "e"]', "not_object", None),
    (b'"hello"', "not_object", None),
    (enc({"timestamp": GOOD["timestamp"], "event_name": "e"}), "missing_field", "session_id"),
    (enc({"session_id": "s1", "event_name": "e"}), "missing_field", "timestamp"),
    (enc({"session_id": "s1", "timestamp": GOOD["timestamp"]}), "missing_field", "event_name"),
    (enc({"event_name": 5}), "missing_field", "session_id"),          # missing beats wrong type
    (enc({**GOOD, "session_id": True}), "wrong_type", "session_id"),
    (enc({**GOOD, "session_id": "  "}), "wrong_type", "session_id"),
    (enc({**GOOD, "session_id": ["s1"]}), "wrong_type", "session_id"),
    (enc({**GOOD, "session_id": 1.5}), "wrong_type", "session_id"),
    (enc({**GOOD, "event_name": ""}), "wrong_type", "event_name"),
    (enc({**GOOD, "event_name": 12}), "wrong_type", "event_name"),
    (enc({**GOOD, "timestamp": None}), "wrong_type", "timestamp"),
    (enc({**GOOD, "timestamp": False}), "wrong_type", "timestamp"),
    (enc({**GOOD, "event_id": ""}), "wrong_type", "event_id"),
    (enc({**GOOD, "event_id": {"id": 1}}), "wrong_type", "event_id"),
    (enc({**GOOD, "type": "end"}), "wrong_type", "type"),
    (enc({"session_id": "s1", "type": "sessionEnd"}), "wrong_type", "type"),   # not "missing"
    (enc({**GOOD, "timestamp": "yesterday"}), "bad_timestamp", "timestamp"),
    (enc({**GOOD, "timestamp": "2024-13-01T00:00:00"}), "bad_timestamp", "timestamp"),
    (enc({**GOOD, "timestamp": "12345"}), "bad_timestamp", "timestamp"),
    (b'{"session_id": "s1", "timestamp": 1e400, "event_name": "e"}', "bad_timestamp", "timestamp"),
    (enc({**GOOD, "timestamp": 1709294400}), "timestamp_out_of_range", "timestamp"),  # seconds
    (enc({**GOOD, "timestamp": "1899-12-31T00:00:00Z"}), "timestamp_out_of_range", "timestamp"),
    (enc({**GOOD, "timestamp": "2100-01-01T00:00:00Z"}), "timestamp_out_of_range", "timestamp"),
    (enc({**GOOD, "timestamp": 10 ** 400}), "timestamp_out_of_range", "timestamp"),
])
def test_each_reason_names_the_field(raw, reason, field):
    exc = reject(raw)
    assert (exc.reason, exc.field) == (reason, field), str(exc)
    assert isinstance(exc, StreamError)
    if field:
        assert repr(field) in str(exc)


def test_too_large_is_checked_first():
    assert reject(b"\xff" * 20, max_bytes=10).reason == "too_large"


def test_session_end_needs_only_the_session():
    ev = parse_event(enc({"session_id": 7, "type": "session_end"}))
    assert (ev.session_id, ev.type, ev.timestamp, ev.ts, ev.event_name) == ("7", "session_end", "", 0.0, "")
    assert ev.is_session_end
    assert parse_event(enc({"session_id": 7, "type": "session_end"})).event_id == ev.event_id
    with_ts = parse_event(enc({"session_id": "7", "type": "session_end", "timestamp": MS_MIN}))
    assert with_ts.ts == TS_MIN
    # a timestamp, when given, must still be good
    bad = reject(enc({"session_id": "7", "type": "session_end", "timestamp": "soon"}))
    assert (bad.reason, bad.field) == ("bad_timestamp", "timestamp")


def test_session_end_accepts_blank_or_null_fields_a_client_always_sends():
    """A client that fills every field sends "" or null on its end marker: not a dead letter."""
    for blank in ("", "  ", None):
        ev = parse_event(enc({"session_id": "7", "type": "session_end", "event_name": blank,
                              "timestamp": blank, "event_id": blank}))
        assert (ev.type, ev.event_name, ev.timestamp, ev.ts) == ("session_end", "", "", 0.0)
    # the same blank name on a regular event is still refused, naming the field
    bad = reject(enc({**GOOD, "event_name": ""}))
    assert (bad.reason, bad.field) == ("wrong_type", "event_name")
    # and a marker's field of the wrong kind is refused too
    assert reject(enc({"session_id": "7", "type": "session_end", "event_name": 5})).field == "event_name"


def test_empty_messages_have_their_own_reason():
    assert reject(None).reason == "empty"
    assert "tombstone" in str(reject(None))
    assert "0 bytes" in str(reject(b""))


def test_values_are_normalised_like_read_events():
    ev = parse_event(enc({**GOOD, "session_id": " 42 ", "event_name": "  Read  ", "event_id": 9}))
    assert (ev.session_id, ev.event_name, ev.event_id) == ("42", "Read", "9")
    assert parse_event(enc({**GOOD, "session_id": 42})).session_id == "42"
    assert parse_event(enc({**GOOD, "session_id": 42.0})).session_id == "42"   # JSON integer
    assert parse_event("\ufeff".encode() + enc(GOOD)).session_id == "s1"        # BOM tolerated
    ms = parse_event(enc({**GOOD, "timestamp": 1709294400123.0}))
    assert ms.timestamp == "1709294400123"


# ------------------------------------------------------------------------------ timestamps, ids

@settings(max_examples=300)
@given(epoch_ms, st.sampled_from(["Z", "+00:00", "", "+05:30", "-08:00"]))
def test_epoch_ms_and_iso_give_the_same_ts(ms, offset):
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    if offset not in ("Z", ""):
        dt = dt.astimezone(datetime.strptime(offset, "%z").tzinfo)
        iso = dt.isoformat(timespec="milliseconds")
    else:
        iso = dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + offset
    a = parse_event(enc({**GOOD, "timestamp": iso})).ts
    b = parse_event(enc({**GOOD, "timestamp": ms})).ts
    c = parse_event(enc({**GOOD, "timestamp": str(ms)})).ts
    assert a == b == c == ms / 1000


@given(names, st.one_of(iso_timestamps(), epoch_ms.map(str)), names)
def test_derived_event_ids_are_deterministic(session, ts, name):
    obj = {"session_id": session, "timestamp": ts, "event_name": name, "text": "a"}
    one = parse_event(enc(obj)).event_id
    # same content (key order, extra fields do not matter) -> same id; other content differs
    again = parse_event(enc({"text": "b", **{k: obj[k] for k in reversed(list(obj))}})).event_id
    assert one == again == derive_event_id(session.strip(), ts, name.strip(), 0)
    assert parse_event(enc({**obj, "event_name": name + "!"})).event_id != one


def test_ids_match_the_trainer_for_the_same_log(tmp_path):
    """Serving derives the ids the offline loader derives: one event, one id, anywhere."""
    path = tmp_path / "log.csv"
    path.write_text("session_id,timestamp,event_name,target_app\n"
                    "a,2024-03-01T12:00:00Z,Read: x,excel\n"
                    "a,1709294401000,Write: y,word\n"
                    "b,2024-03-01 12:00:02+01:00,Read: x,excel\n", encoding="utf-8")
    frame, _ = read_events(path, require_label=False)
    for row in frame.to_dict("records"):
        ev = parse_event(enc({k: row[k] for k in ("session_id", "timestamp", "event_name", "target_app")}))
        assert (ev.event_id, ev.ts) == (row["event_id"], row["_ts"])


# ------------------------------------------------------------------------------ output records

def _label(**over):
    args = dict(session_id="s1", event_id="e1", seq=0, timestamp="2024-03-01T12:00:00Z",
                event_name="Read: x", step_name="Paperwork", confidence=0.91, abstained=False,
                revision=0, final=False, model_version="v3", emitted_at=1709294400.1234)
    args.update(over)
    return label_record(**args)


def test_label_records_hold_the_contract_fields_in_order():
    rec = _label()
    assert tuple(rec) == LABEL_FIELDS
    assert rec["emitted_at"] == "2024-03-01T12:00:00.123Z"
    validate_label(rec)
    assert json.loads(encode_label(rec)) == rec
    assert b" " not in encode_label(_label(event_name="x"))   # compact


@settings(max_examples=200)
@given(st.builds(
    _label, session_id=names | st.integers(), event_id=names, seq=st.integers(0, 10 ** 6),
    step_name=names, confidence=st.floats(0, 1), abstained=st.booleans(),
    revision=st.integers(0, 50), final=st.booleans(), model_version=names,
    emitted_at=st.floats(TS_MIN, TS_MAX - 1)))
def test_label_records_validate_against_the_schema(rec):
    validate_label(rec)
    assert (rec["step_name"] is None) == rec["abstained"]
    assert json.loads(encode_label(rec).decode("utf-8")) == rec


def test_encoded_labels_refuse_a_non_finite_confidence_and_survive_lone_surrogates():
    rec = _label()
    with pytest.raises(ValueError, match="not finite"):
        encode_label({**rec, "confidence": float("nan")})
    odd = {**rec, "event_name": "Read: \ud800 x"}  # a lone surrogate from a JSON escape
    assert json.loads(encode_label(odd)) == odd


def test_label_schema_rejects_what_the_contract_forbids():
    good = _label()
    for broken, field in [({k: v for k, v in good.items() if k != "final"}, "final"),
                          ({**good, "extra": 1}, None),
                          ({**good, "confidence": 1.5}, "confidence"),
                          ({**good, "seq": -1}, "seq"),
                          ({**good, "abstained": True}, None),   # abstained needs step_name null
                          ({**good, "emitted_at": "2024-03-01T12:00:00+00:00"}, "emitted_at")]:
        with pytest.raises(ValueError) as info:
            validate_label(broken)
        assert field is None or repr(field) in str(info.value)


def test_label_record_enforces_abstention_and_confidence():
    rec = _label(abstained=True, step_name="Paperwork", confidence=0.2)
    assert rec["step_name"] is None and rec["confidence"] == 0.2
    with pytest.raises(ValueError):
        _label(step_name=None)
    with pytest.raises(ValueError):
        _label(confidence=math.nan)
    assert _label(emitted_at="2024-03-01T12:00:00.000Z")["emitted_at"] == "2024-03-01T12:00:00.000Z"
    aware = datetime(2024, 3, 1, 13, 0, tzinfo=datetime.strptime("+01:00", "%z").tzinfo)
    assert _label(emitted_at=aware)["emitted_at"] == "2024-03-01T12:00:00.000Z"


def test_iso_utc_has_milliseconds_and_z():
    assert iso_utc(0.0005) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1709294400.999) == "2024-03-01T12:00:00.999Z"
    assert iso_utc().endswith("Z")


# ------------------------------------------------------------------------------ dead letters

DLQ_KEYS = {"original", "original_text", "reason", "detail", "field", "source", "key", "dlq_at"}


@settings(max_examples=200)
@given(st.binary(max_size=5000), st.none() | st.binary(max_size=50))
def test_dlq_payload_holds_the_original_bytes_exactly_and_nothing_else(raw, key):
    try:
        parse_event(raw)
        reason, field, detail = "processing_error", None, "the tagger failed"
    except InvalidEvent as exc:
        reason, field, detail = exc.reason, exc.field, exc.detail
    out = json.loads(dlq_record(raw, reason, field, "tagger.events", 3, 1234, key, detail=detail))
    assert set(out) == DLQ_KEYS
    assert base64.b64decode(out["original"], validate=True) == raw
    assert out["key"] is None if key is None else base64.b64decode(out["key"]) == key
    assert out["original_text"] == raw.decode("utf-8", errors="replace")[:2000]
    assert (out["reason"], out["field"], out["detail"]) == (reason, field, detail)
    assert out["source"] == {"topic": "tagger.events", "partition": 3, "offset": 1234}
    assert datetime.fromisoformat(out["dlq_at"].replace("Z", "+00:00")).tzinfo is not None


def test_dlq_for_a_rejected_event():
    raw = enc({"session_id": "s1", "event_name": "e"})
    exc = reject(raw)
    out = json.loads(dlq_record(raw, exc.reason, exc.field, "tagger.events", 0, 7, b"s1"))
    assert (out["reason"], out["field"]) == ("missing_field", "timestamp")
    assert out["original_text"] == raw.decode()
    assert json.loads(dlq_record(None, "invalid_json", None, "t", 0, 1, None))["original"] is None


def test_schemas_ship_as_package_data():
    for name in ("event", "label"):
        schema = load_schema(name)
        assert schema["$schema"].endswith("2020-12/schema")
    assert set(load_schema("label")["required"]) == set(LABEL_FIELDS)


def test_deep_nesting_is_invalid_json_at_any_call_depth():
    """The decoder's RecursionError depends on the caller's stack: the worker and a client
    replaying its rules once disagreed on a deeply nested array (invalid_json vs not_object)."""
    import sys

    from stream.records import MAX_JSON_DEPTH, InvalidEvent, parse_event

    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)

    def at_depth(n):
        if n:
            return at_depth(n - 1)
        with pytest.raises(InvalidEvent) as exc:
            parse_event(deep)
        return exc.value.reason

    assert {at_depth(0), at_depth(sys.getrecursionlimit() // 2)} == {"invalid_json"}
    shallow = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    with pytest.raises(InvalidEvent) as exc:
        parse_event(shallow)
    assert exc.value.reason == "not_object"
    # brackets inside strings are not nesting
    with pytest.raises(InvalidEvent) as exc:
        parse_event(b'{"event_name": "' + b"[" * 200 + b'"}')
    assert exc.value.reason == "missing_field"
