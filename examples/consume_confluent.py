"""Read label records from tagger.labels in a consumer group with confluent-kafka."""
import json
import os
import sys

from confluent_kafka import Consumer

consumer = Consumer({
    "bootstrap.servers": os.environ.get("TAGGER_KAFKA", "127.0.0.1:9092"),
    "group.id": os.environ.get("LABELS_GROUP", "my-downstream-app"),
    "auto.offset.reset": "earliest",
    # A new group member waits half of this for its partitions on the embedded broker
    # (librdkafka's default 45 s: ~23 s). 6 s is the least Apache Kafka accepts by default.
    "session.timeout.ms": 6000,
})
consumer.subscribe([os.environ.get("TAGGER_OUTPUT_TOPIC", "tagger.labels")])
stop_after = int(sys.argv[1]) if len(sys.argv) > 1 else None   # final labels; default: until Ctrl-C
finals = 0
try:
    while stop_after is None or finals < stop_after:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        label = json.loads(msg.value())
        # Several records per event (first label, revisions); the one with final=true is the
        # last. Keep the latest record per (session_id, event_id).
        if label["final"]:
            finals += 1
            print(label["session_id"], label["seq"], label["step_name"] or "(abstained)",
                  f"{label['confidence']:.2f}", flush=True)
finally:
    consumer.close()   # commits the offsets and leaves the group
