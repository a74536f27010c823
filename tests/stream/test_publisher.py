"""Publishing and tailing against a real broker: what agents send is what the tagger gets."""

from __future__ import annotations

import asyncio
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream.tools.publisher import EventPublisher, replay, replay_messages
from stream.records import InvalidEvent, encode_label, label_record, parse_event
from stream.tools.tail import format_label, tail
from trainer.loading import read_events

# Three sessions, interleaved in time, rows deliberately out of order inside a session,
# mixed timestamp styles, an extra feature column and the truth column.
LOG = """session_id,timestamp,event_name,target_app,step_name
A,2024-03-01T09:00:00Z,Read: ticket 1 in outlook,outlook,Look Up Customer Account
B,2024-03-01T09:00:01Z,Read: ticket 2 in outlook,outlook,Look Up Customer Account
A,2024-03-01T09:00:05Z,Action*: F6 in Terminal,terminal,Paperwork
7,1709283602000,Click: Open in excel,excel,Additional Fees
B,2024-03-01T10:00:03+01:00,Write: note in word,word,Paperwork
A,2024-03-01T09:00:03Z,Write: 123 . A543 in sharepoint,sharepoint,Look Up Customer Account
7,2024-03-01T09:00:04Z,Click: Save in excel,excel,Additional Fees
B,2024-03-01T09:00:09Z,Read: total in excel,excel,Additional Fees
7,1709283600500,Read: file in explorer,explorer,Paperwork
"""


@pytest.fixture
def log_path(tmp_path) -> Path:
    path = tmp_path / "log.csv"
    path.write_text(LOG, encoding="utf-8")
    return path


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _consume(settings, topic: str, n: int, timeout_s: float = 30.0) -> list:
    from stream.settings import kafka_client_kwargs
    consumer = AIOKafkaConsumer(topic, **{**kafka_client_kwargs(settings), "group_id": None,
                                          "auto_offset_reset": "earliest"})
    await consumer.start()
    got: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(got) < n and loop.time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
    finally:
        await consumer.stop()
    return got


# ------------------------------------------------------------------------------ no broker

def test_replay_interleaves_sessions_in_time_and_hides_the_truth(log_path):
    frame, _ = read_events(log_path, require_label=False)
    messages, truth = replay_messages(frame)
    events = [m for m in messages if m.get("type") != "session_end"]
    assert len(events) == len(frame) == len(truth) == 9
    ts = [parse_event(json.dumps(m).encode()).ts for m in events]
    assert ts == sorted(ts)                                  # one merged, timed stream
    assert [m["session_id"] for m in events[:3]] == ["A", "7", "B"]
    for m in messages:
        assert not {"step_name", "seq"} & set(m) and not any(k.startswith("_") for k in m)
    for m in events:
        assert set(m) == {"session_id", "timestamp", "event_name", "target_app", "event_id"}
    # each session_end comes straight after its session's last event
    for i, m in enumerate(messages):
        if m.get("type") == "session_end":
            assert messages[i - 1]["session_id"] == m["session_id"]
            assert all(x["session_id"] != m["session_id"] for x in messages[i + 1:])
    assert truth[("7", frame.loc[(frame.session_id == "7") & (frame.seq == 0), "event_id"].item())] == "Paperwork"

    first_two, _ = replay_messages(frame, sessions=2, end_sessions=False)
    assert {m["session_id"] for m in first_two} == {"A", "B"}   # first two by first appearance
    assert all(m.get("type") != "session_end" for m in first_two)


# ------------------------------------------------------------------------------ real broker

@pytest.mark.integration
@pytest.mark.timeout(180)
def test_replay_publishes_what_agents_would(settings_factory, log_path):
    from stream.settings import kafka_client_kwargs
    settings = settings_factory()
    result = _run(replay(log_path, settings.kafka, settings.input_topic,
                         security=kafka_client_kwargs(settings)))
    assert (result["events"], result["sessions"]) == (9, 3)
    assert set(result["truth"].values()) == {"Look Up Customer Account", "Paperwork", "Additional Fees"}

    got = _run(_consume(settings, settings.input_topic, 9 + 3))
    assert len(got) == 12
    frame, _ = read_events(log_path, require_label=False)
    by_session: dict[str, list] = defaultdict(list)
    partitions: dict[str, set] = defaultdict(set)
    for msg in sorted(got, key=lambda m: (m.partition, m.offset)):
        payload = json.loads(msg.value)
        ev = parse_event(msg.value)                            # the tagger will accept it
        assert msg.key == ev.session_id.encode()              # keyed by its session
        assert "step_name" not in payload                      # never the truth
        assert isinstance(payload["published_at"], float)
        by_session[ev.session_id].append(ev)
        partitions[ev.session_id].add(msg.partition)
    assert all(len(p) == 1 for p in partitions.values())       # a session stays on one partition
    for sid, evs in by_session.items():
        expected = frame[frame.session_id == sid].sort_values("seq")
        assert [e.event_id for e in evs[:-1]] == expected["event_id"].tolist()   # time order
        assert [e.ts for e in evs[:-1]] == expected["_ts"].tolist()
        assert evs[-1].is_session_end and sum(e.is_session_end for e in evs) == 1
        for e in evs[:-1]:
            assert result["truth"][(sid, e.event_id)] == frame.loc[
                frame.event_id == e.event_id, "step_name"].item()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_rate_paces_the_replay(settings_factory, log_path):
    settings = settings_factory()
    result = _run(replay(log_path, settings.kafka, settings.input_topic, rate=40.0,
                         end_sessions=False))
    assert result["seconds"] >= 8 / 40.0                       # 9 events: 8 gaps of 25 ms
    assert len(_run(_consume(settings, settings.input_topic, 9))) == 9


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_publisher_refuses_invalid_events_and_sends_nothing(settings_factory):
    settings = settings_factory()

    async def go():
        async with EventPublisher(settings.kafka, settings.input_topic) as pub:
            with pytest.raises(InvalidEvent) as missing:
                await pub.publish({"session_id": "s", "event_name": "Read: x"})
            with pytest.raises(InvalidEvent) as late:
                await pub.publish({"session_id": "s", "timestamp": 1_700_000_000,  # seconds
                                   "event_name": "Read: x"})
            with pytest.raises(InvalidEvent) as nan:
                await pub.publish({"session_id": "s", "timestamp": 1_700_000_000_000,
                                   "event_name": "Read: x", "duration": float("nan")})
            await pub.publish({"session_id": 12, "timestamp": 1_700_000_000_000, "event_name": "ok"})
            await pub.end_session(12)
        return missing.value, late.value, nan.value

    missing, late, nan = _run(go())
    assert (missing.reason, missing.field) == ("missing_field", "timestamp")
    assert late.reason == "timestamp_out_of_range"
    assert nan.reason == "invalid_json"
    got = _run(_consume(settings, settings.input_topic, 2))
    assert [(m.key, parse_event(m.value).type) for m in got] == [(b"12", "event"), (b"12", "session_end")]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_tail_shows_records_revisions_and_finals(settings_factory):
    from stream.settings import kafka_client_kwargs
    settings = settings_factory()
    common = dict(session_id="s-1", event_id="e1", seq=0, timestamp="2024-03-01T09:00:00Z",
                  event_name="Read: ticket 1 in outlook", confidence=0.8, model_version="v1",
                  emitted_at=1709283600.0)
    records = [label_record(**common, step_name=None, abstained=True, revision=0, final=False),
               label_record(**common, step_name="Paperwork", abstained=False, revision=1, final=False),
               label_record(**common, step_name="Paperwork", abstained=False, revision=2, final=True)]

    async def go():
        producer = AIOKafkaProducer(**kafka_client_kwargs(settings))
        await producer.start()
        try:
            for r in records:
                await producer.send_and_wait(settings.output_topic, encode_label(r), key=b"s-1")
        finally:
            await producer.stop()
        pretty, raw = io.StringIO(), io.StringIO()
        n1 = await tail(settings.kafka, settings.output_topic, from_beginning=True, limit=3, out=pretty)
        n2 = await tail(settings.kafka, settings.output_topic, from_beginning=True, limit=3,
                        out=raw, json_lines=True)
        return n1, n2, pretty.getvalue().splitlines(), raw.getvalue().splitlines()

    n1, n2, pretty, raw = _run(go())
    assert n1 == n2 == 3
    assert "— abstained —" in pretty[0] and "↻" not in pretty[0]
    assert "r1 ↻" in pretty[1] and "✓" not in pretty[1]
    # the final confirms Paperwork: no revision mark on it
    assert "r2" in pretty[2] and "↻" not in pretty[2] and "✓ FINAL" in pretty[2] and "Paperwork" in pretty[2]
    assert [json.loads(line) for line in raw] == records


def test_a_final_is_marked_revised_only_when_it_changes_the_label():
    common = dict(session_id="s", event_id="e", seq=0, timestamp="t", event_name="Read: x",
                  confidence=0.9, model_version="v", emitted_at=0.0)
    first = label_record(**common, step_name="Paperwork", abstained=False, revision=0, final=False)
    same = label_record(**common, step_name="Paperwork", abstained=False, revision=1, final=True)
    other = label_record(**common, step_name="Additional Fees", abstained=False, revision=1, final=True)
    gone = label_record(**common, step_name=None, abstained=True, revision=1, final=True)
    assert "↻" not in format_label(same, previous=first)
    assert "r1 ↻" in format_label(other, previous=first)
    assert "r1 ↻" in format_label(gone, previous=first)
    assert "↻" not in format_label(same)   # nothing seen before it: no claim of a change


def test_pretty_lines_truncate_long_names():
    rec = label_record(session_id="s", event_id="e", seq=3, timestamp="t", event_name="x" * 500,
                       step_name="Look Up Customer Account", confidence=0.5, abstained=False,
                       revision=0, final=False, model_version="v", emitted_at=0.0)
    line = format_label(rec)
    assert len(line) < 120 and "…" in line and "\n" not in format_label({**rec, "event_name": "a\nb"})
