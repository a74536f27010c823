"""Fixtures for integration tests: where the broker and Redis come from, and per-test isolation.

One switch, ``TAGGER_TEST_SERVICES``:

    embedded  tansu (memory storage) started by ``stream.tools.stack`` + the Redis at TAGGER_REDIS
              (default 127.0.0.1:6379) or a started redis-server.   Default without Docker.
    docker    Testcontainers ``apache/kafka`` (KRaft) and ``redis``.   Default when a Docker
              engine answers.
    given     TAGGER_KAFKA / TAGGER_REDIS (and the TAGGER_KAFKA_* security variables) as set.

Services start once per session, only when a test asks for them. If they cannot be started
the tests fail with the reason; they are never skipped. No test mocks Kafka or Redis.

``redis_cluster_url`` starts a real three-node Redis Cluster from the machine's redis-server
(``stream.tools.stack.local_redis_cluster``) for the tests that need one, whatever the mode.

Isolation: ``settings_factory`` gives each test its own topics, consumer group (app_id) and
Redis key prefix; ``redis_client`` deletes that prefix afterwards. ``faust_worker`` runs a
Faust app module as a real worker subprocess and stops it with SIGTERM at teardown.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from stream.settings import Settings, kafka_client_kwargs
from stream.errors import StackError
from stream.preflight import wait_for_kafka
from stream.tools.processes import WorkerProcess, free_port, run_sync
from stream.tools.stack import EMBEDDED_SESSION_TIMEOUT_S, embedded_stack, ensure_topics

SERVICES_ENV = "TAGGER_TEST_SERVICES"
MODES = ("embedded", "docker", "given")
KAFKA_IMAGE = "apache/kafka:3.9.0"
REDIS_IMAGE = "redis:7"
# Apache Kafka rejects session timeouts under group.min.session.timeout.ms (6 s by default).
KAFKA_SESSION_TIMEOUT_S = 6.0
REPO_ROOT = Path(__file__).resolve().parents[1]


# The modules that take longest (``tagger chaos --quick`` ~5 min, ``tagger bench --quick``
# ~2.5 min), run first: ``make test`` runs two workers (pytest-xdist, ``--dist loadfile``:
# a module's tests stay on one worker, so its module fixtures run once), and a long module
# that starts last would leave one worker idle while the other finishes it.
SLOW_FIRST = ("tests/stream/test_chaos.py", "tests/stream/test_bench.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        try:
            path = Path(item.path).resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:   # a test file outside the repository
            return len(SLOW_FIRST)
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)   # stable: the order within and among the other modules is kept


@dataclass(frozen=True)
class Services:
    mode: str
    kafka: str  # bootstrap host:port
    redis: str  # URL
    base: Settings  # connection settings every test's Settings start from


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, daemon down: all mean "no Docker here"
        return False


def _mode() -> str:
    mode = os.environ.get(SERVICES_ENV, "").strip().lower()
    if not mode:
        return "docker" if _docker_answers() else "embedded"
    if mode not in MODES:
        pytest.fail(f"{SERVICES_ENV}={mode!r}: expected one of {', '.join(MODES)}",
                    pytrace=False)
    return mode


def _docker_services():
    """Start Kafka (KRaft, one node) and Redis containers; yields (kafka, redis_url)."""
    from testcontainers.community.redis import RedisContainer
    from testcontainers.core.container import DockerContainer

    with RedisContainer(REDIS_IMAGE) as redis_c:
        host = redis_c.get_container_host_ip()
        redis_url = f"redis://{host}:{redis_c.get_exposed_port(6379)}/0"
        # The broker must advertise the address the tests dial, so bind a known host port.
        port = free_port()
        kafka_c = (DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port).with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{host}:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_NUM_PARTITIONS="4"))
        with kafka_c:
            bootstrap = f"{host}:{port}"
            wait_for_kafka(bootstrap, timeout_s=120)
            yield bootstrap, redis_url


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Services:
    mode = _mode()
    started, error = False, None
    try:
        if mode == "given":
            missing = [v for v in ("TAGGER_KAFKA", "TAGGER_REDIS") if not os.environ.get(v)]
            if missing:
                raise RuntimeError(f"{SERVICES_ENV}=given needs {' and '.join(missing)} set")
            env = dict(os.environ)
            env.setdefault("TAGGER_KAFKA_SESSION_TIMEOUT_S", str(KAFKA_SESSION_TIMEOUT_S))
            base = Settings.from_env(env)
            wait_for_kafka(base, timeout_s=30)
            _check_redis(base.redis_url)
            started = True
            yield Services(mode, base.kafka, base.redis_url, base)
        elif mode == "docker":
            for kafka, redis_url in _docker_services():
                started = True
                yield Services(mode, kafka, redis_url, Settings(
                    kafka=kafka, redis_url=redis_url,
                    kafka_session_timeout_s=KAFKA_SESSION_TIMEOUT_S))
        else:
            with embedded_stack(tmp_path_factory.mktemp("stack")) as info:
                started = True
                yield Services(mode, info["kafka"], info["redis"], Settings(
                    kafka=info["kafka"], redis_url=info["redis"],
                    kafka_session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S))
    except Exception as exc:
        if started:  # a teardown problem, not a start-up one
            raise
        error = (f"test services ({mode}) are not available: {exc}\n"
                 f"Choose them with {SERVICES_ENV}=embedded|docker|given (given uses "
                 f"TAGGER_KAFKA and TAGGER_REDIS).")
    if error:  # outside the except block, so the report is this message alone
        pytest.fail(error, pytrace=False)


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory) -> str:
    """A real Redis Cluster (three masters, no replicas) on loopback, started from the machine's
    ``redis-server`` and ``redis-cli --cluster create`` for this test session and torn down
    after it: ``redis+cluster://127.0.0.1:<port>``. Fails (never skips) without them."""
    from stream.tools.stack import local_redis_cluster

    try:
        cluster = local_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
        info = cluster.__enter__()
    except Exception as exc:
        pytest.fail(f"could not start a local Redis Cluster: {exc}", pytrace=False)
    try:
        yield info["url"]
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kafka_bootstrap(services) -> str:
    return services.kafka


@pytest.fixture(scope="session")
def redis_url(services) -> str:
    return services.redis


@pytest.fixture
def test_namespace(request) -> str:
    """A name unique to this test run: readable test name plus a random tail."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_prefix(test_namespace) -> str:
    """Every Redis key this test writes starts with this (it is ``Settings.redis_prefix``)."""
    return f"tagger-test:{test_namespace}:"


@pytest.fixture
def settings_factory(services, test_namespace, redis_prefix, redis_client):
    """``make(suffix="", create_topics=True, **overrides) -> Settings`` for this test.

    Calls with the same ``suffix`` return the same topics and group (two workers of one app);
    another suffix gives another set. Topics are created with ``partitions`` first.
    """
    created: list[str] = []

    def make(suffix: str = "", *, create_topics: bool = True, **overrides) -> Settings:
        ns = f"{test_namespace}-{suffix}" if suffix else test_namespace
        values = dict(
            input_topic=f"tagger.events.{ns}",
            output_topic=f"tagger.labels.{ns}",
            dlq_topic=f"tagger.events.dlq.{ns}",
            app_id=f"tagger-test-{ns}",
            redis_prefix=redis_prefix,
            web_port=0,  # parallel workers must not fight over fixed ports
        )
        values.update(overrides)  # a test's own choices win
        settings = dataclasses.replace(services.base, **values)
        if create_topics:
            ensure_topics(settings)
            created.extend([settings.input_topic, settings.output_topic, settings.dlq_topic])
        return settings

    yield make
    if created:
        _delete_topics(services.base, sorted(set(created)))


def _delete_topics(settings: Settings, topics: list[str]) -> None:
    async def delete():
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
        await admin.start()
        try:
            await admin.delete_topics(topics)
        finally:
            await admin.close()

    try:
        run_sync(delete())
    except Exception:  # best effort: names are unique, a leftover topic harms no one
        pass


@pytest.fixture
def redis_client(redis_url, redis_prefix):
    """A client on the test Redis; afterwards every key under ``redis_prefix`` is deleted."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# --------------------------------------------------------------------------- Faust workers


class FaustWorker(WorkerProcess):
    """A ``faust -A <app> worker`` subprocess (``stream.tools.processes``); see ``faust_worker``."""

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Block until Faust logs ``[^Worker]: Ready`` (partitions assigned); returns seconds."""
        try:
            return self.wait_logged("[^Worker]: Ready", timeout_s)
        except StackError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def faust_worker(tmp_path) -> Callable[..., FaustWorker]:
    """``start(settings, app="stream.app", env=None) -> FaustWorker`` running a real worker.

    The worker gets ``settings.to_env()`` as its environment, runs in its own directory
    (Faust writes ``<app_id>-data/`` into the working directory) and logs to a file whose
    tail is printed at teardown (shown when the test fails).
    """
    workers: list[FaustWorker] = []

    def start(settings: Settings, app: str = "stream.app",
              env: Optional[dict[str, str]] = None) -> FaustWorker:
        workdir = tmp_path / f"worker-{len(workers) + 1}"
        workdir.mkdir()
        # `faust worker` overrides web_enabled from its own --with-web flag (default on), so
        # web_port=0 must be said on the command line too.
        web = (["--without-web"] if settings.web_port == 0
               else ["--web-port", str(settings.web_port)])
        worker = FaustWorker.start(settings, workdir / "worker.log", app=app,
                                   args=["-l", "info", *web], cwd=workdir, env=env)
        workers.append(worker)
        return worker

    yield start
    for i, worker in enumerate(workers, 1):
        code = worker.stop()
        tail = "\n".join(worker.log_text().splitlines()[-30:])
        print(f"--- worker {i} exited with {code}; last log lines ---\n{tail}")


# ----------------------------------------------------------------- trained models and logs


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="session")
def tiny_model(gen_dir):
    """A small model (lookahead 3; ``auto`` over the default's candidates, so a mixture with
    a member weighed on arrival only) trained on generated logs, shared by every test package."""
    from tests.helpers import DEFAULT_ARCHS, make_log, train_tiny
    return train_tiny(make_log(gen_dir, 150, 11), gen_dir / "model_a", model=DEFAULT_ARCHS)


@pytest.fixture(scope="session")
def tiny_model_b(gen_dir):
    """A second model with different weights and lookahead, for hot-swap tests."""
    from tests.helpers import DEFAULT_ARCHS, make_log, train_tiny
    return train_tiny(make_log(gen_dir, 150, 12), gen_dir / "model_b",
                      model={"lookahead": 2, "hidden_dim": 48, **DEFAULT_ARCHS})


@pytest.fixture(scope="session")
def tiny_model_relabelled(gen_dir):
    """Model A's recipe on the same log with one step merged into another and one renamed:
    a retrain with one step removed and one added (a shorter, shifted label list)."""
    from stream.tools.chaos import relabelled_log
    from tests.helpers import DEFAULT_ARCHS, make_log, train_tiny
    log = relabelled_log(make_log(gen_dir, 150, 11), gen_dir / "gen_150_11_relabelled.csv")
    return train_tiny(log, gen_dir / "model_relabelled", model=DEFAULT_ARCHS)


@pytest.fixture(scope="session")
def heldout_log(gen_dir):
    from tests.helpers import make_log
    return make_log(gen_dir, 40, 99, "heldout.csv")
