"""Read label records from tagger.labels in a consumer group with aiokafka."""
import asyncio
import json
import os
import sys

from aiokafka import AIOKafkaConsumer


async def main(stop_after):
    consumer = AIOKafkaConsumer(
        os.environ.get("TAGGER_OUTPUT_TOPIC", "tagger.labels"),
        bootstrap_servers=os.environ.get("TAGGER_KAFKA", "127.0.0.1:9092"),
        group_id=os.environ.get("LABELS_GROUP", "my-downstream-app"),
        auto_offset_reset="earliest",
        session_timeout_ms=6000,   # a new member waits half of it for partitions on the embedded broker
    )
    await consumer.start()
    finals = 0
    try:
        async for msg in consumer:
            label = json.loads(msg.value)
            if label["final"]:   # the last record of its (session_id, event_id)
                finals += 1
                print(label["session_id"], label["seq"], label["step_name"] or "(abstained)",
                      f"{label['confidence']:.2f}", flush=True)
                if stop_after is not None and finals >= stop_after:
                    break
    finally:
        await consumer.stop()   # commits the offsets and leaves the group


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))   # final labels; default: until Ctrl-C
