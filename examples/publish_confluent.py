"""Publish one session of desktop events to tagger.events with confluent-kafka (librdkafka >= 2.2)."""
import json
import os
import time
import uuid

from confluent_kafka import Producer

producer = Producer({"bootstrap.servers": os.environ.get("TAGGER_KAFKA", "127.0.0.1:9092")})
topic = os.environ.get("TAGGER_INPUT_TOPIC", "tagger.events")
session = f"agent-7-{uuid.uuid4().hex[:8]}"
names = ["Action*: IBBR - IBS Customer Master File Inquiry in ibbr-global.dhl",
         "Write: 234871236 in ibbr-global.dhl",
         "Read: 224 RIVER DR in ibbr-global.dhl",
         "Write: 7305623734 in ibbr-global.dhl"]
for i, name in enumerate(names):
    event = {"session_id": session, "event_id": i, "timestamp": int(time.time() * 1000),
             "event_name": name, "target_app": "ibbr-global.dhl"}
    producer.produce(topic, key=session, value=json.dumps(event))   # key = session_id
# the end marker makes every label final now (else after TAGGER_INACTIVITY_S)
producer.produce(topic, key=session, value=json.dumps({"session_id": session, "type": "session_end"}))
producer.flush(10)
print(f"published {len(names)} events of session {session}")
