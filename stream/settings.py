"""Service settings: read once from the environment at the entry point, then passed down.

``Settings.from_env()`` parses ``TAGGER_*`` variables into a frozen dataclass; every bad value
is a ``ConfigError`` that names the variable. ``faust_broker_settings`` and
``kafka_client_kwargs`` turn it into keyword arguments for ``faust.App`` and for plain aiokafka
clients, credentials included. The Faust timings are tuned on the embedded tansu broker and
work unchanged on Apache Kafka (see the comments there for the measurements).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from stream.redis_client import check_url as check_redis_url
from trainer.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

# tansu answers a fetch only when fetch_max_wait expires, not when data arrives (measured: a
# record waits about half of it on average). Faust hard-codes 1500 ms, which puts ~0.4 s
# (p90 0.7 s) on every hop. The worker's consumer uses TAGGER_FETCH_MAX_WAIT_MS (this
# default): at 50 ms the input hop alone took ~30 ms of a 50 ms p99 budget on tansu (batches
# came every ~31 ms), at 20 ms ~10 ms (docs/performance.md). Apache Kafka long-polls
# properly, so there the value only bounds how often an idle worker polls (50 times a second
# at 20 ms; raise it to poll less).
FETCH_MAX_WAIT_MS = 20
# The faust transport scheme that applies Settings.fetch_max_wait_ms (registered by
# faust_broker_settings, which also sets _fetch_max_wait_ms).
TRANSPORT_SCHEME = "tagger-kafka"
_fetch_max_wait_ms = FETCH_MAX_WAIT_MS


def _var(env: str, default: Any, parse=str):
    return field(default=default, metadata={"env": env, "parse": parse})


def _flag(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off, any case."""
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class Settings:
    kafka: str = _var("TAGGER_KAFKA", "127.0.0.1:9092")  # host:port[,host:port...]
    # one server (redis://, rediss://, unix://) or a Redis Cluster (redis+cluster://host:port)
    redis_url: str = _var("TAGGER_REDIS", "redis://127.0.0.1:6379/0")
    redis_prefix: str = _var("TAGGER_REDIS_PREFIX", "tagger:")  # every Redis key starts so
    input_topic: str = _var("TAGGER_INPUT_TOPIC", "tagger.events")
    output_topic: str = _var("TAGGER_OUTPUT_TOPIC", "tagger.labels")
    dlq_topic: str = _var("TAGGER_DLQ_TOPIC", "tagger.events.dlq")
    app_id: str = _var("TAGGER_APP_ID", "tagger-worker")  # also the consumer group
    partitions: int = _var("TAGGER_PARTITIONS", 4, int)
    artifacts_dir: Path = _var("TAGGER_ARTIFACTS", Path("artifacts"), Path)
    metrics_host: str = _var("TAGGER_METRICS_HOST", "127.0.0.1")
    web_port: int = _var("TAGGER_WEB_PORT", 6066, int)  # Faust's web server; 0 = off
    session_ttl_s: int = _var("TAGGER_SESSION_TTL_S", 3600, int)
    inactivity_s: int = _var("TAGGER_INACTIVITY_S", 300, int)
    max_message_bytes: int = _var("TAGGER_MAX_MESSAGE_BYTES", 1_000_000, int)
    max_events_per_session: int = _var("TAGGER_MAX_EVENTS_PER_SESSION", 100_000, int)
    # sessions a worker keeps in memory; beyond it the least recently seen are read back from
    # Redis when they return
    max_sessions_in_memory: int = _var("TAGGER_MAX_SESSIONS_IN_MEMORY", 50_000, int)
    # event ids (redelivery dedupe) held in memory over all sessions; beyond it the least
    # recently seen sessions are evicted too
    max_event_ids_in_memory: int = _var("TAGGER_MAX_EVENT_IDS_IN_MEMORY", 2_000_000, int)
    # events of a session arriving out of timestamp order within this many seconds are put
    # back in order before labelling (at the cost of holding first labels that long); 0 = off
    lateness_s: float = _var("TAGGER_LATENESS_S", 0.0, float)
    # The agent takes input in batches of up to batch_max messages; a batch is handed over once
    # its oldest event has waited batch_wait_ms for others to join it (stream/batching.py).
    # Events that arrive while a batch is tagged have waited by the time it is done and form
    # the next batch at once; 0 hands over whatever has arrived as soon as anything has (the
    # smallest batches, the most CPU per event). See docs/operations.md.
    batch_max: int = _var("TAGGER_BATCH_MAX", 500, int)
    batch_wait_ms: float = _var("TAGGER_BATCH_WAIT_MS", 5.0, float)
    # Tag the next batch while this one's label records await their acks and its sessions
    # are saved (each batch's input is acknowledged only once both are done); off: one batch
    # at a time, end to end. See docs/performance.md.
    overlap: bool = _var("TAGGER_OVERLAP", True, _flag)
    # The worker consumer's fetch_max_wait (see FETCH_MAX_WAIT_MS above): on a broker that
    # answers fetches only when it expires (tansu) a floor on every label's latency; on Apache
    # Kafka how often an idle worker polls.
    fetch_max_wait_ms: int = _var("TAGGER_FETCH_MAX_WAIT_MS", FETCH_MAX_WAIT_MS, int)
    # Consumer-group session timeout. tansu holds every JoinGroup for half of it, so it sets
    # how long a worker takes to start and a rebalance to finish; Apache Kafka rejects
    # values under its group.min.session.timeout.ms (6 s by default).
    kafka_session_timeout_s: float = _var("TAGGER_KAFKA_SESSION_TIMEOUT_S", 10.0, float)
    # How long `tagger worker` waits at start-up for the broker to answer before it gives up
    # with one error line (exit 2): a broker that is still starting gets this long.
    kafka_wait_s: float = _var("TAGGER_KAFKA_WAIT_S", 30.0, float)
    security_protocol: str = _var("TAGGER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    sasl_mechanism: str = _var("TAGGER_KAFKA_SASL_MECHANISM", "PLAIN")
    sasl_username: Optional[str] = _var("TAGGER_KAFKA_SASL_USERNAME", None)
    sasl_password: Optional[str] = _var("TAGGER_KAFKA_SASL_PASSWORD", None)
    ssl_cafile: Optional[str] = _var("TAGGER_KAFKA_SSL_CAFILE", None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Parse the ``TAGGER_*`` variables of ``env``; unset or empty ones take the default."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if not raw:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError:
                kind = {int: "an integer", float: "a number", _flag: "on or off (1/0, true/false)"}.get(f.metadata["parse"], "a value")
                raise ConfigError(f"{f.metadata['env']}: expected {kind}, got {raw!r}") from None
        return cls(**values)

    def __post_init__(self):
        def check(ok: bool, name: str, expected: str):
            if not ok:
                var = _ENV_OF[name]
                raise ConfigError(f"{var}: expected {expected}, got {getattr(self, name)!r}")

        check(all(_is_host_port(hp) for hp in self.kafka.split(",")), "kafka",
              "host:port[,host:port...] with ports 1-65535")
        problem = check_redis_url(self.redis_url)
        if problem:  # never echo the URL: it may carry a password
            raise ConfigError(f"TAGGER_REDIS: {problem}")
        for name in ("input_topic", "output_topic", "dlq_topic"):
            check(bool(_TOPIC.match(getattr(self, name))), name,
                  "a Kafka topic name (letters, digits, '.', '_', '-')")
        check(len({self.input_topic, self.output_topic, self.dlq_topic}) == 3, "dlq_topic",
              "input, output and DLQ topics to differ")
        check(bool(_TOPIC.match(self.app_id)), "app_id", "letters, digits, '.', '_', '-'")
        check(0 <= self.web_port <= 65535, "web_port", "a port 0-65535 (0 = off)")
        for name in ("partitions", "session_ttl_s", "inactivity_s",
                     "max_message_bytes", "max_events_per_session", "max_sessions_in_memory",
                     "max_event_ids_in_memory"):
            check(getattr(self, name) >= 1, name, "an integer >= 1")
        if self.session_ttl_s <= self.inactivity_s + 60:
            # a session's keys must outlive its inactivity timeout (plus a sweep or two), or
            # an idle session expires from Redis before anyone finalises it
            raise ConfigError(f"TAGGER_SESSION_TTL_S: expected more than TAGGER_INACTIVITY_S + 60 s "
                              f"({self.inactivity_s + 60}), got {self.session_ttl_s}")
        check(0.0 <= self.lateness_s <= 3600.0, "lateness_s", "seconds between 0 and 3600")
        check(1 <= self.batch_max <= 100_000, "batch_max", "an integer between 1 and 100000")
        check(0.0 <= self.batch_wait_ms <= 1000.0, "batch_wait_ms", "milliseconds between 0 and 1000")
        check(1 <= self.fetch_max_wait_ms <= 10_000, "fetch_max_wait_ms", "milliseconds between 1 and 10000")
        check(1.0 <= self.kafka_session_timeout_s <= 300.0, "kafka_session_timeout_s",
              "seconds between 1 and 300")
        check(0.5 <= self.kafka_wait_s <= 3600.0, "kafka_wait_s", "seconds between 0.5 and 3600")
        check(self.security_protocol in SECURITY_PROTOCOLS, "security_protocol",
              " or ".join(SECURITY_PROTOCOLS))
        if self.security_protocol.startswith("SASL_"):
            check(self.sasl_mechanism in SASL_MECHANISMS, "sasl_mechanism",
                  " or ".join(SASL_MECHANISMS))
            for name in ("sasl_username", "sasl_password"):
                check(bool(getattr(self, name)), name, f"a value with {self.security_protocol}")
        if self.ssl_cafile is not None:
            check(Path(self.ssl_cafile).is_file(), "ssl_cafile", "an existing CA bundle file")

    def to_env(self) -> dict[str, str]:
        """The environment that ``from_env`` turns back into these settings (for subprocesses)."""
        return {_ENV_OF[k]: str(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    def redacted(self) -> dict[str, Any]:
        """The settings for logging, with passwords (also inside the Redis URL) hidden."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        if self.sasl_password:
            out["sasl_password"] = "***"
        out["redis_url"] = redact_url(self.redis_url)
        return out


_ENV_OF = {f.name: f.metadata["env"] for f in dataclasses.fields(Settings)}


def _is_host_port(text: str) -> bool:
    host, sep, port = text.strip().rpartition(":")
    return bool(host) and bool(sep) and port.isdigit() and 1 <= int(port) <= 65535


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0?password=x`` -> ``redis://user:***@host/0?password=***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_pw, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_pw else netloc
    query = urlencode([(k, "***" if k.lower() == "password" else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _ssl_context(settings: Settings) -> Optional[ssl.SSLContext]:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ssl_cafile)


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka's producer, consumer and admin client (auth included)."""
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka,
                              "security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        kwargs.update(sasl_mechanism=settings.sasl_mechanism,
                      sasl_plain_username=settings.sasl_username,
                      sasl_plain_password=settings.sasl_password)
    context = _ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def faust_broker_settings(settings: Settings, *, datadir: str | Path | None = None) -> dict:
    """Keyword arguments for ``faust.App(settings.app_id, **...)``: broker, auth, timings.

    Measured on tansu 0.6 with faust-streaming 0.15 / aiokafka 0.14 (2 CPUs), session 3 s:
    worker start to first record ~3 s (Faust defaults: ~32 s); a second worker joining or one
    leaving pauses the affected partitions ~1-3 s; SIGTERM exits cleanly in ~1.2 s.
    """
    import faust  # deferred: the CLI reads settings without paying for the Faust import

    _register_transport()
    global _fetch_max_wait_ms
    _fetch_max_wait_ms = settings.fetch_max_wait_ms  # one app per process: read by the consumer thread
    session = settings.kafka_session_timeout_s
    credentials = None
    context = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        credentials = faust.SASLCredentials(username=settings.sasl_username,
                                            password=settings.sasl_password,
                                            mechanism=settings.sasl_mechanism,
                                            ssl_context=context)
    elif context is not None:
        credentials = faust.SSLCredentials(context)  # SSLCredentials() alone cannot build one
    kwargs = {
        "broker": [f"{TRANSPORT_SCHEME}://{hp.strip()}" for hp in settings.kafka.split(",")],
        "broker_credentials": credentials,
        # Faust's default session is 60 s, and tansu waits half the session before answering
        # a JoinGroup: 30 s to start. Heartbeats are how members learn of a rebalance, so
        # keep them frequent; the rebalance timeout bounds how long the group waits for a
        # member to finish its in-flight events and rejoin.
        "broker_session_timeout": session,
        "broker_heartbeat_interval": round(max(0.2, session / 6), 2),
        "broker_rebalance_timeout": max(10.0, 2 * session),
        # Offsets committed every 0.5 s instead of 2.8 s: a rebalance then replays ~1 record
        # instead of ~30 per moved partition (processing stays at-least-once).
        "broker_commit_interval": 0.5,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.partitions,
        "store": "memory://",  # sessions live in Redis, not in Faust tables
        "web_enabled": settings.web_port != 0,
        "web_port": settings.web_port or 6066,
        "web_bind": settings.metrics_host,
    }
    if datadir is not None:  # Faust otherwise creates ./<app_id>-data in the working directory
        kwargs["datadir"] = str(datadir)
    return kwargs


def _register_transport() -> None:
    from faust.transport import drivers

    drivers.TRANSPORTS.aliases[TRANSPORT_SCHEME] = f"{__name__}:FastFetchTransport"


def __getattr__(name: str):
    # Built on first use so that importing settings does not import Faust.
    if name == "FastFetchTransport":
        return _fast_fetch_transport()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _fast_fetch_transport():
    """Faust's aiokafka transport with the worker consumer's fetch_max_wait lowered."""
    from faust.transport.drivers import aiokafka as driver

    class _ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = _fetch_max_wait_ms  # read by start(); no public knob
            return consumer

    class _Consumer(driver.Consumer):
        def _new_consumer_thread(self):
            return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class FastFetchTransport(driver.Transport):
        Consumer = _Consumer

    return FastFetchTransport
