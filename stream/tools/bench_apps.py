"""Baseline Faust apps for ``tagger bench``: what a worker costs when it does no tagging.

``faust -A stream.tools.bench_apps:passthrough worker --without-web`` runs a bare agent that
forwards every input message unchanged (``stream.events()`` and ``topic.send``, the
idiomatic Faust way); ``stream.tools.bench_apps:batched`` forwards with the worker's own batch
loop (``stream.batching.age_bounded_batches`` with the settings' ``batch_max`` and ``batch_wait_ms``, raw producer
sends, acks awaited per batch), so the gap between it and the worker is the cost of tagging.
``python -m stream.tools.bench_apps worker [aiokafka|librdkafka]`` runs no Faust at all: one
group consumer and producer (aiokafka's, or confluent-kafka's over librdkafka) forwarding each
fetched batch, awaiting its acks, then committing: the floor of what a Python worker on that
client costs per event (``tools/perf_compare.py paced --tree NAME=aiokafka``, ``NAME=librdkafka``;
``tagger bench``'s client floor). The librdkafka one reads no TLS or SASL settings: it is for
the embedded, plaintext stack.

Both read ``Settings.from_env()`` (``TAGGER_KAFKA``, ``TAGGER_APP_ID``,
``TAGGER_INPUT_TOPIC``, ``TAGGER_OUTPUT_TOPIC``, ``TAGGER_PARTITIONS``,
``TAGGER_KAFKA_SESSION_TIMEOUT_S``) and get the worker's broker tuning from
``faust_broker_settings``, so the comparison is on equal terms. The apps are built on first
attribute access, as ``stream.app`` does, so importing this module starts nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.batching import age_bounded_batches
from stream.settings import Settings, faust_broker_settings, kafka_client_kwargs

if TYPE_CHECKING:
    import faust


def create_passthrough(settings: Settings, *, batched: bool = False) -> faust.App:
    """A Faust app whose one agent copies ``input_topic`` to ``output_topic``."""
    import faust  # deferred: `tagger bench` imports this module for its names alone

    datadir = Path(tempfile.gettempdir()) / f"tagger-faust-{settings.app_id}"
    app = faust.App(settings.app_id, **faust_broker_settings(settings, datadir=datadir))
    src = app.topic(settings.input_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw", partitions=settings.partitions)
    dst = app.topic(settings.output_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw", partitions=settings.partitions)

    if batched:
        @app.agent(src)
        async def forward(stream):
            async for batch in age_bounded_batches(stream, settings.batch_max, settings.batch_wait_ms / 1000):
                producer, out = app.producer, settings.output_topic
                futs = [await producer.send(out, ev.message.key, ev.message.value, None, None, None)
                        for ev in batch]
                await asyncio.gather(*futs)
    else:
        @app.agent(src)
        async def forward(stream):
            async for event in stream.events():
                await dst.send(key=event.message.key, value=event.message.value)

    return app


async def forward_fetched(consumer: Any, producer: Any, topic: str, max_records: int) -> int:
    """One round of a bare aiokafka consume -> produce loop: fetch up to ``max_records``, send
    each to ``topic`` with its key, await every ack; returns how many were forwarded."""
    batch = await consumer.getmany(timeout_ms=200, max_records=max_records)
    acks = [await producer.send(topic, value=m.value, key=m.key) for msgs in batch.values() for m in msgs]
    await asyncio.gather(*acks)
    return len(acks)


async def aiokafka_forward(settings: Settings) -> None:
    """Copy ``input_topic`` to ``output_topic`` with aiokafka alone, in the consumer group
    ``app_id``: fetch a batch, send each record, await the acks, commit. Logs Faust's ready
    line once it holds partitions, so the bench harness waits for it as for a Faust app."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    kw = kafka_client_kwargs(settings)
    session_ms = int(settings.kafka_session_timeout_s * 1000)
    consumer = AIOKafkaConsumer(settings.input_topic, group_id=settings.app_id, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=settings.fetch_max_wait_ms,
                                session_timeout_ms=session_ms, heartbeat_interval_ms=session_ms // 3, **kw)
    producer = AIOKafkaProducer(acks="all", **kw)
    await consumer.start()
    await producer.start()
    ready = False
    try:
        while True:
            n = await forward_fetched(consumer, producer, settings.output_topic, settings.batch_max)
            if not ready and consumer.assignment():
                print("[^Worker]: Ready", flush=True)
                ready = True
            if n:
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


def librdkafka_forward(settings: Settings) -> None:
    """``aiokafka_forward`` with confluent-kafka's consumer and producer (librdkafka fetches
    and batches in its own threads): wait for a record, take up to ``batch_max`` of those
    already fetched, produce each, flush (every ack in), commit synchronously."""
    from confluent_kafka import Consumer, Producer
    session_ms = int(settings.kafka_session_timeout_s * 1000)
    consumer = Consumer({"bootstrap.servers": settings.kafka, "group.id": settings.app_id,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "fetch.wait.max.ms": settings.fetch_max_wait_ms, "session.timeout.ms": session_ms,
                         "heartbeat.interval.ms": session_ms // 3})
    producer = Producer({"bootstrap.servers": settings.kafka, "acks": "all", "linger.ms": 1})
    consumer.subscribe([settings.input_topic])
    ready = False
    try:
        while True:
            # wait for one record, then take what has already arrived: consume(n, timeout)
            # alone would wait for n records or the whole timeout
            first = consumer.poll(0.2)
            msgs = [] if first is None else [first, *consumer.consume(settings.batch_max - 1, timeout=0)]
            if not ready and consumer.assignment():
                print("[^Worker]: Ready", flush=True)
                ready = True
            for m in msgs:
                if m.error() is None:
                    producer.produce(settings.output_topic, value=m.value(), key=m.key())
            if msgs:
                producer.flush()
                consumer.commit(asynchronous=False)
    finally:
        producer.flush(10)
        consumer.close()


def __getattr__(name: str):
    # `faust -A stream.tools.bench_apps:passthrough` looks the attribute up after import.
    if name in ("passthrough", "batched"):
        app = create_passthrough(Settings.from_env(), batched=name == "batched")
        globals()[name] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the forwarders on a Kafka client alone, by the name `worker CLIENT` takes
CLIENT_FORWARDERS = {"aiokafka": lambda s: asyncio.run(aiokafka_forward(s)), "librdkafka": librdkafka_forward}


if __name__ == "__main__":  # `python -m stream.tools.bench_apps worker CLIENT`, as the harness starts a worker
    import sys
    client = sys.argv[2] if len(sys.argv) > 2 else "aiokafka"
    if sys.argv[1:2] != ["worker"] or client not in CLIENT_FORWARDERS:
        sys.exit(f"usage: python -m stream.tools.bench_apps worker [{'|'.join(CLIENT_FORWARDERS)}]")
    CLIENT_FORWARDERS[client](Settings.from_env())
