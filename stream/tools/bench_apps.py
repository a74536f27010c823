"""Baseline Faust apps for ``tagger bench``: what a worker costs when it does no tagging.

``faust -A stream.tools.bench_apps:passthrough worker --without-web`` runs a bare agent that
forwards every input message unchanged (``stream.events()`` and ``topic.send``, the
idiomatic Faust way); ``stream.tools.bench_apps:batched`` forwards with the worker's own batch
loop (``stream.batching.age_bounded_batches`` with the settings' ``batch_max`` and ``batch_wait_ms``, raw producer
sends, acks awaited per batch), so the gap between it and the worker is the cost of tagging.

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

import faust

from stream.batching import age_bounded_batches
from stream.settings import Settings, faust_broker_settings


def create_passthrough(settings: Settings, *, batched: bool = False) -> faust.App:
    """A Faust app whose one agent copies ``input_topic`` to ``output_topic``."""
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


def __getattr__(name: str):
    # `faust -A stream.tools.bench_apps:passthrough` looks the attribute up after import.
    if name in ("passthrough", "batched"):
        app = create_passthrough(Settings.from_env(), batched=name == "batched")
        globals()[name] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
