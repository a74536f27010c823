"""docker-compose.yml, checked structurally (no Docker engine runs here).

The file is read the way Compose reads it (YAML anchors and merge keys, ``${VAR:-default}``
interpolation, ``$$`` escapes) and checked for what would break a ``docker compose up``:
every referenced service, file, volume and port exists; the worker's environment parses with
``Settings.from_env`` and agrees with Kafka's listener, the Redis service, the artifacts mount
and the port Prometheus scrapes; start-up order uses health checks; the shell scripts parse;
and the scripts of model-init and the trainer run for real against a local ``tagger``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stream.settings import Settings
from tests.monitoring.files import (COMPOSE_YML, PROMETHEUS_YML, REPO, compose,
                                    compose_variables, env_list, load_yaml, mounts, shell_script)

SETTINGS_VARS = {f.metadata["env"] for f in dataclasses.fields(Settings)}
ONE_SHOT = ("topics", "model-init")


@pytest.fixture(scope="module")
def svcs() -> dict:
    """docker-compose.yml's services, as Compose reads them with an empty environment."""
    return compose()["services"]


def _port(hostport: str) -> int:
    return int(str(hostport).rsplit(":", 1)[1])


def _healthcheck_cmd(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test[1:]) if isinstance(test, list) else test


# ------------------------------------------------------------------------------ services

def test_the_services_of_the_issue(svcs):
    assert {"kafka", "topics", "redis", "worker", "prometheus", "grafana", "trainer",
            "publisher", "model-init"} <= set(svcs)
    kafka = svcs["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_list(kafka["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, one node"
    assert not any("zookeeper" in k.lower() for k in env)
    assert svcs["trainer"]["profiles"] == ["trainer"]
    assert svcs["publisher"]["profiles"] == ["demo"]
    for name, svc in svcs.items():  # the core stack starts with a plain `docker compose up`
        if name not in ("trainer", "publisher"):
            assert "profiles" not in svc, name


def test_third_party_images_are_pinned(svcs):
    for name, svc in svcs.items():
        image = svc["image"]
        if "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_the_worker_scales(svcs):
    worker = svcs["worker"]
    # --scale worker=N needs no fixed container name and no fixed host port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["tagger", "worker"]
    assert worker["build"]["context"] == "." and (REPO / worker["build"]["dockerfile"]).is_file()
    env = env_list(worker["environment"])
    assert env["TAGGER_APP_ID"], "one consumer group for all replicas"


def test_depends_on_uses_conditions_that_can_be_met(svcs):
    for name, svc in svcs.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            target = svcs[dep]
            if cond == "service_healthy":
                assert "healthcheck" in target and not target["healthcheck"].get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no health check")
            else:
                assert cond == "service_completed_successfully", f"{name} -> {dep}: {cond}"
                assert target.get("restart") == "no", f"{dep} must be a one-shot service"
    worker = svcs["worker"]["depends_on"]
    assert worker["kafka"]["condition"] == worker["redis"]["condition"] == "service_healthy"
    for one_shot in ONE_SHOT:
        assert worker[one_shot]["condition"] == "service_completed_successfully"


def test_long_running_services_have_health_checks(svcs):
    for name in ("kafka", "redis", "worker", "prometheus", "grafana"):
        hc = svcs[name]["healthcheck"]
        assert not hc.get("disable") and hc["test"], name
    assert "/healthz" in _healthcheck_cmd(svcs["worker"])
    for name in ("trainer", "publisher", "model-init"):  # our image's /healthz check does not apply
        assert svcs[name]["healthcheck"] == {"disable": True}, name


# ------------------------------------------------------------------------------ settings

def test_worker_environment_is_the_worker_settings(svcs):
    worker = svcs["worker"]
    env = env_list(worker["environment"])
    unknown = {k for k in env if k.startswith("TAGGER_")} - SETTINGS_VARS
    assert not unknown, f"not worker settings (stream/settings.py): {sorted(unknown)}"
    settings = Settings.from_env(env)  # parses and validates, as the worker will

    # Kafka: the worker dials the broker's INTERNAL listener, as advertised
    kafka = env_list(svcs["kafka"]["environment"])
    advertised = dict(l.split("://") for l in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(l.split("://") for l in kafka["KAFKA_LISTENERS"].split(","))
    assert settings.kafka == advertised[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    host, port = settings.kafka.rsplit(":", 1)
    assert host in svcs and _port(listeners[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]]) == int(port)
    # Redis: the redis service, persisted
    assert settings.redis_url.startswith("redis://redis:6379/")
    redis_cmd = " ".join(svcs["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and mounts(svcs["redis"])["/data"] == "redis-data"
    # artifacts: the named volume, where TAGGER_ARTIFACTS points (and the image's default)
    assert mounts(worker)[str(settings.artifacts_dir)] == "artifacts"
    assert str(settings.artifacts_dir) == "/app/artifacts"
    # the web server: every replica reachable on the port Prometheus scrapes
    assert settings.metrics_host == "0.0.0.0"
    assert str(settings.web_port) in [str(p) for p in worker["expose"]]
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == "tagger-worker")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == settings.web_port
    assert f":{settings.web_port}/healthz" in _healthcheck_cmd(worker)


def test_every_tagger_service_gets_the_same_connection_settings(svcs):
    worker = env_list(svcs["worker"]["environment"])
    for name in ("model-init", "trainer", "publisher"):
        env = env_list(svcs[name]["environment"])
        for key, value in worker.items():
            assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, worker has {value!r}"
        Settings.from_env(env)
    for name in ("model-init", "trainer"):
        assert mounts(svcs[name])["/app/artifacts"] == "artifacts"


def test_environment_overrides_reach_the_worker():
    env = {"TAGGER_KAFKA": "broker-a:9092,broker-b:9092", "TAGGER_REDIS": "rediss://:pw@cache:6380/1",
           "TAGGER_PARTITIONS": "24", "TAGGER_INPUT_TOPIC": "prod.events"}
    svc = compose(env)["services"]
    settings = Settings.from_env(env_list(svc["worker"]["environment"]))
    assert (settings.kafka, settings.redis_url, settings.partitions, settings.input_topic) == (
        "broker-a:9092,broker-b:9092", "rediss://:pw@cache:6380/1", 24, "prod.events")
    topics = env_list(svc["topics"]["environment"])
    assert (topics["PARTITIONS"], topics["INPUT_TOPIC"]) == ("24", "prod.events")


def test_every_variable_has_a_default_or_is_optional():
    variables = compose_variables(COMPOSE_YML.read_text())
    assert variables, "the file reads its settings from the environment"
    missing = [name for name, default in variables.items() if default is None]
    assert not missing, f"variables without a default: {missing}"
    doc = (REPO / "monitoring" / "PRODUCTION.md").read_text()
    undocumented = [name for name in variables if name not in SETTINGS_VARS and f"`{name}`" not in doc]
    assert not undocumented, f"not documented in monitoring/PRODUCTION.md: {undocumented}"


# ------------------------------------------------------------------------------ topics

def test_topics_are_created_with_the_worker_partition_count(svcs):
    topics = svcs["topics"]
    env = env_list(topics["environment"])
    worker = Settings.from_env(env_list(svcs["worker"]["environment"]))
    assert int(env["PARTITIONS"]) == worker.partitions >= 6, "room to scale out"
    assert 1 <= int(env["DLQ_PARTITIONS"]) <= worker.partitions
    assert (env["INPUT_TOPIC"], env["OUTPUT_TOPIC"], env["DLQ_TOPIC"]) == (
        worker.input_topic, worker.output_topic, worker.dlq_topic)
    assert env["BOOTSTRAP"] == worker.kafka
    script = shell_script(topics)
    for var in ("INPUT_TOPIC", "OUTPUT_TOPIC", "DLQ_TOPIC"):
        assert f'create "${var}"' in script
    assert "--if-not-exists" in script, "re-running `docker compose up` must not fail"


# ------------------------------------------------------------------------------ files, volumes, ports

def test_every_referenced_file_and_volume_exists(svcs):
    declared = set(compose()["volumes"])
    used = set()
    for name, svc in svcs.items():
        for target, source in mounts(svc).items():
            if source.startswith((".", "/")):
                if source == "./runs":  # the trainer's data folder (TAGGER_DATA_DIR), user input
                    assert name == "trainer"
                    continue
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {declared - used}"
    for name, target in (("redis", "/data"), ("prometheus", "/prometheus"),
                         ("grafana", "/var/lib/grafana"), ("worker", "/app/artifacts"),
                         ("kafka", "/var/lib/kafka/data")):
        assert mounts(svcs[name])[target] in declared, f"{name}: {target} not on a named volume"


def test_prometheus_loads_the_repository_config(svcs):
    prom = svcs["prometheus"]
    m = mounts(prom)
    flags = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    config_path = flags["--config.file"]
    assert m[config_path] == "./monitoring/prometheus.yml"
    config_dir = str(Path(config_path).parent)
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert m[f"{config_dir}/{rule_file}"] == f"./monitoring/{rule_file}"
    assert flags["--storage.tsdb.path"] == "/prometheus"


def test_published_ports_are_unique_and_match_what_listens(svcs):
    listening = {"kafka": 9094, "prometheus": 9090, "grafana": 3000}
    host_ports = []
    for name, svc in svcs.items():
        for mapping in svc.get("ports", []):
            host, container = str(mapping).rsplit(":", 1)
            host_ports.append(host)
            assert int(container) == listening[name], f"{name} publishes {mapping}"
    assert len(host_ports) == len(set(host_ports))
    kafka = env_list(svcs["kafka"]["environment"])
    assert "HOST://localhost:9094" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    datasource = load_yaml(REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == f"http://prometheus:{listening['prometheus']}"


# ------------------------------------------------------------------------------ scripts

@pytest.mark.parametrize("name", ["topics", "model-init", "trainer", "publisher"])
def test_shell_scripts_parse(svcs, name):
    script = shell_script(svcs[name])
    assert script, f"{name} has no sh -c script"
    shell = "bash" if svcs[name].get("entrypoint", [""])[0].endswith("bash") else "sh"
    res = subprocess.run([shutil.which(shell) or shell, "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "$$" not in script  # Compose turned every $$ into $


def _run_script(service: dict, env: dict, tmp_path: Path, timeout: float):
    """Run a service's script here, with the container paths mapped into tmp_path."""
    script = shell_script(service).replace("/app/artifacts", str(tmp_path / "artifacts"))
    script = script.replace("/data/", str(tmp_path / "data") + "/").replace("/tmp/", str(tmp_path) + "/")
    full = {**os.environ, **env_list(service["environment"]), **env,
            "TAGGER_ARTIFACTS": str(tmp_path / "artifacts"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    full = {k: v.replace("/app/artifacts", str(tmp_path / "artifacts")).replace(
        "/data/", str(tmp_path / "data") + "/") for k, v in full.items()}
    return subprocess.run(["sh", "-c", script], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_model_init_trains_once_then_skips(svcs, tmp_path):
    env = {"BOOTSTRAP_SESSIONS": "40", "BOOTSTRAP_EPOCHS": "1"}
    first = _run_script(svcs["model-init"], env, tmp_path, 300)
    assert first.returncode == 0, first.stdout + first.stderr
    pointer = tmp_path / "artifacts" / "current"
    assert pointer.read_text().strip().startswith("bootstrap-")
    second = _run_script(svcs["model-init"], env, tmp_path, 60)
    assert second.returncode == 0 and "current model:" in second.stdout
    assert len(list((tmp_path / "artifacts").glob("bootstrap-*"))) == 1


@pytest.mark.slow
def test_trainer_trains_evaluates_and_promotes_a_good_enough_model(svcs, tmp_path):
    from tests.helpers import make_log
    (tmp_path / "data").mkdir()
    make_log(tmp_path / "data", 60, 3, "train.csv")
    make_log(tmp_path / "data", 12, 4, "test.csv")
    trainer = svcs["trainer"]
    res = _run_script(trainer, {"MODEL_NAME": "m2", "TRAIN_ARGS": "--epochs 1",
                                "PROMOTE_MIN_SELECTIVE_ACCURACY": "0", "PROMOTE_MIN_COVERAGE": "0"},
                      tmp_path, 600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "artifacts" / "current").read_text().strip() == "m2"
    report = tmp_path / "artifacts" / "m2" / "evaluation" / "report.json"
    assert "streaming" in json.loads(report.read_text()), "evaluated with the streaming replay"

    # The promotion gate (the script's Python part) refuses a model under either minimum.
    script = shell_script(trainer)
    gate = script[script.index("<<'PY'\n") + 7: script.index("\nPY\n")]
    for minimums in ({"PROMOTE_MIN_SELECTIVE_ACCURACY": "1.01", "PROMOTE_MIN_COVERAGE": "0"},
                     {"PROMOTE_MIN_SELECTIVE_ACCURACY": "0", "PROMOTE_MIN_COVERAGE": "1.01"}):
        refused = subprocess.run([sys.executable, "-c", gate, str(report)], capture_output=True,
                                 text=True, env={**os.environ, **minimums})
        assert refused.returncode != 0 and "not promoted" in refused.stderr, refused.stderr
    passed = subprocess.run([sys.executable, "-c", gate, str(report)], capture_output=True, text=True,
                            env={**os.environ, "PROMOTE_MIN_SELECTIVE_ACCURACY": "0",
                                 "PROMOTE_MIN_COVERAGE": "0"})
    assert passed.returncode == 0, passed.stderr


@pytest.mark.integration
def test_demo_publisher_sends_fresh_sessions_every_round(svcs, settings_factory, tmp_path):
    """The `demo` profile's loop, run here against the test broker for two rounds."""
    import signal

    from stream.tools.processes import die_with_parent

    settings = settings_factory()
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    publisher = svcs["publisher"]
    script = shell_script(publisher).replace("/tmp/", f"{tmp_path}/")
    env = {**os.environ, **env_list(publisher["environment"]), **settings.to_env(),
           "DEMO_SESSIONS": "3", "DEMO_RATE": "2000",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "publisher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent())
    try:
        def two_full_rounds(rounds):
            return all(len(rounds.get(f"{host}-{n}", ())) >= 3 for n in (1, 2))

        sessions = _read_sessions(settings, until=two_full_rounds, timeout_s=120)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    rounds = _by_round(sessions)
    assert {f"{host}-1", f"{host}-2"} <= set(rounds), (rounds, log.read_text()[-2000:])
    # Each round publishes DEMO_SESSIONS sessions under its own prefix, so no id repeats.
    assert len(rounds[f"{host}-1"]) == 3 and len(rounds[f"{host}-2"]) == 3, rounds


def _by_round(sessions: set[str]) -> dict[str, set[str]]:
    rounds: dict[str, set[str]] = {}
    for sid in sessions:
        rounds.setdefault(sid.rsplit("-", 1)[0], set()).add(sid)
    return rounds


def _read_sessions(settings: Settings, until, timeout_s: float) -> set[str]:
    """Session ids on the input topic, read until `until(sessions by round)` holds."""
    import asyncio
    import time

    async def read():
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(settings.input_topic, auto_offset_reset="earliest",
                                    bootstrap_servers=settings.kafka)
        await consumer.start()
        seen: set[str] = set()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    seen.update(json.loads(m.value)["session_id"] for m in msgs)
                if until(_by_round(seen)):
                    break
        finally:
            await consumer.stop()
        return seen

    return asyncio.run(read())
