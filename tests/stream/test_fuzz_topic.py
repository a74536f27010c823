"""Garbage on the input topic, mixed with valid traffic, through a real worker.

One worker (real broker, real Redis) with small limits — message size, events per session,
sessions in memory — and a lateness window gets: generated sessions (some never ended),
hypothesis-made messages (contract fields dropped, retyped or perturbed, plus random extra
fields), raw random bytes, invalid UTF-8 and JSON, wrong types, missing fields, a message
over the size limit, a session over the event limit, timestamps far in the past and future,
duplicate event ids and a session whose events arrive out of order. What a consumer sees:

- every invalid message is in the DLQ, once, at its source partition/offset, with the reason
  ``parse_event`` gives it (or ``session_too_long``) and its original bytes (for a message
  too big to fit a dead letter under the broker's size limit, its head and its sha256);
- every valid event has exactly one final record, nothing follows it, and no other event
  gets a label; positions (``seq``) stay contiguous although sessions were evicted from
  memory and read back from Redis;
- events out of order within the lateness window are labelled in timestamp order;
- the worker never crashes or restarts.

The expected outcome of each message comes from ``stream.records.parse_event`` (unit-tested
against the JSON Schema in test_records.py) plus the per-session duplicate/limit rules of
the tagging loop, replayed over the messages in publication order.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import random
import time
from collections import Counter, defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from stream.app import DLQ_MAX_ORIGINAL_BYTES
from stream.tools.publisher import replay_messages
from stream.records import InvalidEvent, parse_event
from stream.settings import FETCH_MAX_WAIT_MS, kafka_client_kwargs
from stream.tools.processes import free_port
from trainer.artifacts import promote
from trainer.loading import read_events

pytestmark = pytest.mark.integration

MAX_BYTES = 16_384
MAX_EVENTS = 25
MAX_SESSIONS = 6
LATENESS_S = 3.0
BASE_TS = 1_716_199_200  # 2024-05-20T10:00:00Z

json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


@st.composite
def fuzzed_message(draw, n: int) -> bytes:
    """A plausible event for session ``hyp-<n>``, then perturbed: each contract field may be
    dropped or replaced by any JSON value; extra fields are any JSON; or the whole message is
    another JSON value, random text or random bytes."""
    shape = draw(st.sampled_from(["event"] * 6 + ["json", "text", "bytes"]))
    if shape == "json":
        return json.dumps(draw(json_values)).encode()
    if shape == "text":
        return draw(st.text(max_size=60)).encode("utf-8", "surrogatepass")
    if shape == "bytes":
        return draw(st.binary(min_size=1, max_size=120))
    obj = {"session_id": f"hyp-{n}", "event_id": f"h{n}",
           "timestamp": draw(st.sampled_from([
               f"2024-05-20T10:{n % 60:02d}:00Z", (BASE_TS + n) * 1000, str((BASE_TS + n) * 1000),
               "2024-05-20 15:00:00+05:00", "1991-03-01T00:00:00Z", "2099-12-31T23:59:59Z"])),
           "event_name": draw(st.sampled_from(["Read: 4695744561 . A543 . in sharepoint",
                                               "Action*: Context in Terminal", "Write: x in outlook"])),
           "target_app": "sharepoint"}
    for name in ("session_id", "event_id", "timestamp", "event_name", "type"):
        how = draw(st.sampled_from(["keep"] * 5 + ["drop", "any", "text"]))
        if how == "drop":
            obj.pop(name, None)
        elif how == "any":
            obj[name] = draw(json_values)
        elif how == "text":
            obj[name] = draw(st.text(max_size=12))
    obj.update(draw(st.dictionaries(st.sampled_from(["text", "group_id", "target_app", "duration_s",
                                                     "image", "published_at", "extra"]),
                                    json_values, max_size=3)))
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def hypothesis_corpus(count: int) -> list[bytes]:
    """``count`` fuzzed messages, the same on every run (derandomized, no example database)."""
    out: list[bytes] = []

    @hsettings(max_examples=count, derandomize=True, database=None, deadline=None,
               suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        out.append(data.draw(fuzzed_message(len(out))))

    collect()
    return out[:count]


def _event(sid: str, eid: str, ts: float, name: str = "Read: 4695744561 . A543 . in sharepoint",
           **extra) -> bytes:
    return json.dumps({"session_id": sid, "event_id": eid, "timestamp": int(ts * 1000),
                       "event_name": name, "target_app": "sharepoint", **extra}).encode()


def build_corpus(heldout_log, rng: random.Random) -> tuple[list[tuple[bytes | None, bytes]], list[bytes]]:
    """``(messages, ooo_eids)``: (key, value) pairs in publication order, and the event ids of
    the out-of-order session in timestamp order."""
    frame, _ = read_events(heldout_log, require_label=False)
    msgs, _ = replay_messages(frame, sessions=8)
    order = {sid: i for i, sid in enumerate(dict.fromkeys(m["session_id"] for m in msgs))}
    msgs = [m for m in msgs if not (m.get("type") == "session_end" and order[m["session_id"]] % 2)]
    valid = [(str(m["session_id"]).encode(), json.dumps(m).encode()) for m in msgs]

    bad: list[tuple[bytes | None, bytes]] = []
    key = b"fuzz"
    bad += [(key, v) for v in [
        b'{"session_id": "b1", "timestamp": "2024-05-20T10:00:00Z", "event_name": ',  # truncated
        b'{"session_id": "b2", "timestamp": "2024-05-20T10:00:00Z", "event_name": "Read: \xff\xfe"}',
        b'\xc3\x28\xa0\xa1', b"", b"null", b"[]", b'"a string"', b"42", b"NaN",
        b'{"session_id": "b3", "timestamp": NaN, "event_name": "x"}',
        b'{"session_id": "b4", "timestamp": "2024-05-20T10:00:00Z", "event_name": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"session_id": ["b5"], "timestamp": "2024-05-20T10:00:00Z", "event_name": "x"}).encode(),
        json.dumps({"session_id": "b6", "timestamp": True, "event_name": "x"}).encode(),
        json.dumps({"session_id": "b7", "timestamp": "2024-05-20T10:00:00Z", "event_name": 42}).encode(),
        json.dumps({"session_id": "b8", "timestamp": "2024-05-20T10:00:00Z"}).encode(),
        json.dumps({"timestamp": "2024-05-20T10:00:00Z", "event_name": "x"}).encode(),
        json.dumps({"session_id": "b9", "type": "start", "timestamp": "2024-05-20T10:00:00Z",
                    "event_name": "x"}).encode(),
        json.dumps({"session_id": "b10", "timestamp": "yesterday", "event_name": "x"}).encode(),
        _event("b11", "e", 86_400.0),                         # 1970: far in the past
        json.dumps({"session_id": "b12", "timestamp": "2500-01-01T00:00:00Z", "event_name": "x"}).encode(),
        json.dumps({"session_id": "b13", "timestamp": BASE_TS, "event_name": "x"}).encode(),  # seconds
        _event("b14", "e", BASE_TS, text="x" * (MAX_BYTES + 100)),  # over the size limit
        _event("b15", "e", BASE_TS, text="y" * 900_000),  # its dead letter must still fit the broker
    ]]
    bad += [(rng.choice([None, b"raw"]), rng.randbytes(rng.randint(1, 300))) for _ in range(30)]
    bad += [(None, v) for v in hypothesis_corpus(150)]

    extra: list[tuple[bytes | None, bytes]] = []
    # far but valid timestamps: labelled like any other
    extra += [(b"fuzz-old", _event("fuzz-old", "o1", 662_774_400)),       # 1991-01-01
              (b"fuzz-future", _event("fuzz-future", "f1", 4_102_444_000))]  # 2099-12-31
    # a session over the event limit: its last events go to the DLQ as session_too_long
    extra += [(b"fuzz-long", _event("fuzz-long", f"l{i}", BASE_TS + 5 * i)) for i in range(MAX_EVENTS + 10)]
    extra += [(b"fuzz-long", json.dumps({"session_id": "fuzz-long", "type": "session_end"}).encode())]

    # out of order within the lateness window: pairs swapped (2 s apart, window 3 s), then one
    # event 60 s late (beyond the window: labelled on arrival, never dropped)
    ts = [BASE_TS + 2 * i for i in range(12)]
    ooo_order = [i ^ 1 for i in range(12)]
    ooo = [(b"fuzz-ooo", _event("fuzz-ooo", f"q{i}", ts[i])) for i in ooo_order]
    ooo += [(b"fuzz-ooo", _event("fuzz-ooo", "q-late", BASE_TS - 60))]
    ooo += [(b"fuzz-ooo", json.dumps({"session_id": "fuzz-ooo", "type": "session_end"}).encode())]
    ooo_eids = [f"q{i}" for i in range(12)]

    # interleave everything at random, keeping each group's own order
    groups = [list(valid), bad, extra, ooo]
    rng.shuffle(bad)
    out: list[tuple[bytes | None, bytes]] = []
    while any(groups):
        g = rng.choice([g for g in groups if g])
        out.append(g.pop(0))
    # duplicates: some valid events again, later on (same bytes, same event id)
    dupes = [m for m in out if m[0] and m[0].isdigit() and b'"session_end"' not in m[1]][:: 9][:6]
    out += dupes
    return out, [e.encode() for e in ooo_eids]


def expected_outcomes(messages):
    """``(dlq_reasons, valid_keys)``: the DLQ reason per message index, and the (session_id,
    event_id) of every event that must get a final — replaying the worker's rules in order."""
    reasons: dict[int, str] = {}
    valid: set[tuple[str, str]] = set()
    ids: dict[str, set[str]] = defaultdict(set)
    for i, (_, value) in enumerate(messages):
        try:
            e = parse_event(value, max_bytes=MAX_BYTES)
        except InvalidEvent as exc:
            reasons[i] = exc.reason
            continue
        if e.type == "session_end" or e.event_id in ids[e.session_id]:
            continue
        if len(ids[e.session_id]) >= MAX_EVENTS:
            reasons[i] = "session_too_long"
            continue
        ids[e.session_id].add(e.event_id)
        valid.add((e.session_id, e.event_id))
    return reasons, valid


def _key_for(value: bytes, key: bytes | None) -> bytes | None:
    """Valid events are keyed by their session, as the contract says; garbage keeps its key."""
    try:
        return parse_event(value, max_bytes=MAX_BYTES).session_id.encode()
    except InvalidEvent:
        return key


def test_fuzzed_input_topic_every_bad_message_dead_lettered_every_valid_event_final(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log):
    root = tmp_path / "artifacts"
    promote(tiny_model, root)
    settings = settings_factory(artifacts_dir=root.resolve(), inactivity_s=4, lateness_s=LATENESS_S,
                                max_message_bytes=MAX_BYTES, max_events_per_session=MAX_EVENTS,
                                max_sessions_in_memory=MAX_SESSIONS)
    port = free_port()
    settings = dataclasses.replace(settings, web_port=port)
    messages, ooo_eids = build_corpus(heldout_log, random.Random(20240520))
    messages = [(_key_for(v, k), v) for k, v in messages]
    reasons, valid = expected_outcomes(messages)
    assert len(reasons) >= 150 and len(valid) >= 100, (len(reasons), len(valid))
    assert {"invalid_utf8", "invalid_json", "not_object", "missing_field", "wrong_type", "bad_timestamp",
            "timestamp_out_of_range", "too_large", "session_too_long"} <= set(reasons.values())
    worker = faust_worker(settings)
    worker.wait_ready()

    async def main():
        producer = AIOKafkaProducer(acks="all", max_request_size=2 ** 20,
                                    **kafka_client_kwargs(settings))
        await producer.start()
        try:
            futs = [await producer.send(settings.input_topic, v, key=k) for k, v in messages]
            where = [(md.partition, md.offset) for md in await asyncio.gather(*futs)]
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(settings.output_topic, settings.dlq_topic, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                    **kafka_client_kwargs(settings))
        await consumer.start()
        labels, letters = [], []
        try:
            deadline = time.monotonic() + 120
            settle_until = None
            while time.monotonic() < (settle_until or deadline):
                for tp, batch in (await consumer.getmany(timeout_ms=200)).items():
                    for m in batch:
                        (letters if tp.topic == settings.dlq_topic else labels).append(
                            (m.partition, json.loads(m.value)))
                done = {(r["session_id"], r["event_id"]) for _, r in labels if r["final"]}
                if settle_until is None and valid <= done and len(letters) >= len(reasons):
                    settle_until = time.monotonic() + 2.0  # anything extra would show up now
        finally:
            await consumer.stop()
        return where, labels, letters

    where, labels, letters = asyncio.run(main())
    print(f"{len(messages)} messages: {len(valid)} valid events, {len(reasons)} invalid "
          f"({dict(Counter(reasons.values()))}); read {len(labels)} label records, {len(letters)} dead letters")

    # every invalid message in the DLQ, once, where it came from, with its reason and bytes
    by_source = defaultdict(list)
    for _, d in letters:
        by_source[(d["source"]["partition"], d["source"]["offset"])].append(d)
    assert all(len(v) == 1 for v in by_source.values()), "a message was dead-lettered twice"
    expected_sources = {where[i]: (reason, messages[i][1]) for i, reason in reasons.items()}
    assert set(by_source) == set(expected_sources), (
        f"missing from the DLQ: {[expected_sources[s][0] for s in set(expected_sources) - set(by_source)][:10]}; "
        f"dead-lettered but valid: {len(set(by_source) - set(expected_sources))}")
    for src, (reason, value) in expected_sources.items():
        d = by_source[src][0]
        assert d["reason"] == reason, (reason, d)
        if len(value) <= DLQ_MAX_ORIGINAL_BYTES:
            assert base64.b64decode(d["original"]) == value
        else:  # a dead letter must fit the broker: the head, and the hash of the whole
            assert base64.b64decode(d["original"]) == value[:DLQ_MAX_ORIGINAL_BYTES]
            assert hashlib.sha256(value).hexdigest() in d["detail"]
        assert d["source"]["topic"] == settings.input_topic and d["detail"]

    # every valid event: exactly one final, last; nothing for anything else
    by_event = defaultdict(list)
    for part, r in labels:
        by_event[(r["session_id"], r["event_id"])].append((part, r))
    assert set(by_event) == valid, (f"unlabelled: {sorted(valid - set(by_event))[:5]}; "
                                    f"labelled but invalid: {sorted(set(by_event) - valid)[:5]}")
    for key, recs in by_event.items():
        rs = [r for _, r in recs]
        assert [r["revision"] for r in rs] == list(range(len(rs))), (key, rs)
        assert [r["final"] for r in rs] == [False] * (len(rs) - 1) + [True], (key, rs)
        assert len({r["seq"] for r in rs}) == 1
    # one session, one partition: what keeps a session's events in order for one worker
    parts = defaultdict(set)
    for part, r in labels:
        parts[r["session_id"]].add(part)
    assert all(len(p) == 1 for p in parts.values())

    # positions stay contiguous for the generated sessions (evicted and read back from Redis)
    seqs = defaultdict(set)
    for (sid, _), recs in by_event.items():
        seqs[sid].add(recs[0][1]["seq"])
    for sid in {k[0] for k in valid if k[0].isdigit()}:
        assert seqs[sid] == set(range(len(seqs[sid]))), (sid, sorted(seqs[sid]))

    # The lateness window put the swapped events back in timestamp order. The event 60 s late
    # is beyond it, so it is labelled on arrival: after q0..q9 (released by then) and before
    # q10, q11 (still held, within the window of the newest timestamp, until session_end).
    seq_of = {r["event_id"]: r["seq"] for _, r in labels if r["session_id"] == "fuzz-ooo"}
    by_seq = sorted(seq_of, key=seq_of.get)
    assert by_seq == [e.decode() for e in ooo_eids[:10]] + ["q-late"] + [e.decode() for e in ooo_eids[10:]]
    # the session over the limit kept its first MAX_EVENTS events
    assert {e for s, e in valid if s == "fuzz-long"} == {f"l{i}" for i in range(MAX_EVENTS)}

    # the worker never fell over, and its metrics agree
    assert worker.proc.poll() is None, "the worker died"
    log_text = worker.log_text()
    assert "Traceback" not in log_text and "crashed" not in log_text.lower()
    assert log_text.count("[^Worker]: Ready") == 1, "the worker restarted"
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    dlq_total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("tagger_dlq_total{"))
    assert dlq_total == len(reasons)
