"""Other Kafka clients against a real worker: librdkafka (confluent-kafka) publishes the events
and a librdkafka consumer group reads the labels; the README's client examples run as written.

The embedded broker needs librdkafka >= 2.2 (2.0.2 and 2.1.x fail its ApiVersion handshake with
"Read underflow"), so the wheel's bundled librdkafka is checked first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import confluent_kafka   # a test dependency (pyproject.toml, extra "test")
import pytest

from stream.tools.publisher import replay_messages
from stream.records import LABEL_FIELDS, validate_label
from tests.helpers import serving_root
from trainer.loading import read_events


REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
WAIT_S = 180   # generous: a consumer-group rebalance on a loaded CI machine takes tens of seconds


def test_bundled_librdkafka_is_new_enough_for_the_embedded_broker():
    version, _ = confluent_kafka.libversion()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (2, 2), version


def test_readme_shows_the_examples_as_they_are():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    for name in ("publish_confluent.py", "consume_confluent.py", "consume_aiokafka.py"):
        assert (EXAMPLES / name).read_text(encoding="utf-8") in blocks, f"README shows another {name}"


def _final_records(consumer, expected: set, deadline: float) -> dict:
    """Poll a confluent-kafka consumer until every expected event has a final record."""
    by_event: dict = defaultdict(list)
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        record = json.loads(msg.value())
        assert msg.key().decode() == record["session_id"]   # key = session_id, as the contract says
        by_event[(record["session_id"], record["event_id"])].append(record)
        if expected <= {k for k, recs in by_event.items() if recs[-1]["final"]}:
            break
    return by_event


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_librdkafka_producer_and_consumer_group_around_a_real_worker(
        tmp_path, settings_factory, faust_worker, tiny_model, heldout_log):
    from confluent_kafka import Consumer, Producer
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), inactivity_s=30)
    worker = faust_worker(settings)
    worker.wait_ready()

    # A desktop agent written against librdkafka publishes 6 sessions, each with its end marker.
    frame, _ = read_events(heldout_log, require_label=False)
    messages, _ = replay_messages(frame, sessions=6)
    events = {(str(m["session_id"]), str(m["event_id"])) for m in messages if m.get("type") != "session_end"}
    producer = Producer({"bootstrap.servers": settings.kafka, "acks": "all"})
    for m in messages:
        producer.produce(settings.input_topic, key=str(m["session_id"]), value=json.dumps(m))
    assert producer.flush(30) == 0

    # A downstream service reads the labels in its own consumer group.
    consumer = Consumer({"bootstrap.servers": settings.kafka, "group.id": f"downstream-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "enable.auto.commit": False})
    consumer.subscribe([settings.output_topic])
    try:
        by_event = _final_records(consumer, events, time.monotonic() + WAIT_S)
        consumer.commit(asynchronous=False)   # the group's offsets are accepted by the broker
    finally:
        consumer.close()

    done = {k for k, recs in by_event.items() if recs[-1]["final"]}
    assert events <= done, f"{len(events - done)} events without a final label\n{worker.log_text()[-3000:]}"
    for key, recs in by_event.items():
        for r in recs:
            validate_label(r)
            assert list(r) == list(LABEL_FIELDS)
        assert [r["revision"] for r in recs] == list(range(len(recs))), key   # one partition per session
        assert sum(r["final"] for r in recs) == 1, key


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_readme_client_examples_work_against_a_worker(tmp_path, settings_factory, faust_worker, tiny_model):
    settings = settings_factory(artifacts_dir=serving_root(tmp_path, tiny_model), inactivity_s=30)
    worker = faust_worker(settings)
    worker.wait_ready()
    env = {**os.environ, "TAGGER_KAFKA": settings.kafka, "TAGGER_INPUT_TOPIC": settings.input_topic,
           "TAGGER_OUTPUT_TOPIC": settings.output_topic}

    def run(script: str, *args: str, group: str = "") -> list[str]:
        res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                             timeout=WAIT_S, env={**env, "LABELS_GROUP": group} if group else env)
        assert res.returncode == 0, f"{script}: {res.stderr[-2000:]}\n{worker.log_text()[-2000:]}"
        return res.stdout.splitlines()

    (published,) = run("publish_confluent.py")
    session = re.search(r"session (\S+)", published).group(1)
    for consumer in ("consume_confluent.py", "consume_aiokafka.py"):
        lines = run(consumer, "4", group=f"{consumer}-{uuid.uuid4().hex[:8]}")
        assert len(lines) == 4 and all(line.split()[0] == session for line in lines), lines
        assert sorted(int(line.split()[1]) for line in lines) == [0, 1, 2, 3], lines
