"""Faults, lock-down and scale-out, as an operator would check them.

- ``tagger chaos --quick --json`` (the real CLI, in a subprocess, on its own embedded broker
  so pausing that broker disturbs no other test) runs every fault once; each test below
  reads that report: no valid event without a final label, duplicates only exact repeats,
  no DLQ traffic, a recovery time, and what is specific to the fault (the group rebalanced,
  the booby-trapped model was refused without being unpickled, ...).
- A worker locked down the way docs/operations.md says (Redis AUTH, SASL credentials set)
  never shows a password in its log, its HTTP endpoints or its dead letters.
- Settings from the environment build TLS/SASL clients; the Redis keys of a session share
  one Redis Cluster hash slot.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream.settings import Settings, faust_broker_settings, kafka_client_kwargs
from stream.tools.chaos import FAULTS, REPORT_FIELDS, RedisServer
from stream.tools.processes import WorkerProcess, free_port, http_get
from trainer.artifacts import promote
from trainer.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, tiny_model):
    """``tagger chaos --quick --json OUT``: (report, exit code, stdout)."""
    folder = tmp_path_factory.mktemp("chaos")
    out = folder / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGGER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tagger.cli", "chaos", "--quick", "--json", str(out),
         "--model", str(tiny_model), "--workdir", str(folder / "work")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(f"tagger chaos --quick took {time.monotonic() - started:.0f} s\n{proc.stdout}\n"
          f"{proc.stderr[-3000:]}")
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()), proc.returncode, proc.stdout, folder / "work"


@pytest.mark.integration
def test_chaos_cli_reports_every_fault(chaos):
    report, code, stdout, _ = chaos
    assert list(report["faults"]) == list(FAULTS)
    for name, fault in report["faults"].items():
        assert fault["error"] is None, f"{name}: {fault['error']}"
        for f in REPORT_FIELDS:
            assert f in fault, (name, f)
        assert all(isinstance(fault[f], int) for f in REPORT_FIELDS if f != "recovery_s")
        assert isinstance(fault["recovery_s"], float) and fault["recovery_s"] >= 0, (name, fault)
        assert name in stdout
    assert code == (0 if all(f["ok"] for f in report["faults"].values()) else 1)


@pytest.mark.integration
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_leaves_no_valid_event_without_its_final_label(chaos, fault):
    r = chaos[0]["faults"][fault]
    d = r["details"]
    assert r["error"] is None, r["error"]
    assert r["events_in"] > 100
    assert r["events_without_final"] == 0, d
    assert r["final_out"] == r["events_in"]
    # the traffic is valid: only the deliberately mis-keyed messages may be dead letters
    assert r["dlq"] == (d["mismatched_sent"] if fault == "key_mismatch" else 0)
    assert r["accepted_in_dlq"] == 0 and r["labels_outside_label_set"] == 0
    assert d["timers_alive"], d["timer_age_s"]
    # repeats after a crash are allowed, but only as exact repeats of one history per event
    assert r["conflicting_duplicates"] == 0 and r["several_finals"] == 0
    assert r["records_after_final"] == 0 and r["seq_conflicts"] == 0
    assert "sessions_on_several_partitions" not in d
    assert r["recovery_s"] is not None
    if fault == "kill9":
        assert d["killed"] == 3 and len(d["recovery_each_s"]) == 3
    elif fault == "two_workers":
        assert sum(d["partitions_before_kill"]) == 4 and min(d["partitions_before_kill"]) >= 1
        assert d["rebalance_s"] > 0 and sum(d["partitions_after_rejoin"]) == 4
        assert min(d["partitions_after_rejoin"]) >= 1, "the returning worker got no partition"
    elif fault == "redis_restart":
        assert d["worker_survived_redis"] and not d["ready_while_down"]
        assert d["store_rebuilt_from_memory"], "Redis was not rebuilt from memory after its restart"
        assert len(d["recovery_each_s"]) == 2  # the Redis restart, then the worker crash
    elif fault == "broker_pause":
        assert d["paused_s"] > d["session_timeout_s"] and d["worker_survived"]
    elif fault == "bad_artifact":
        assert d["rejected"] == 3 and d["rejections_logged"] == 3
        assert d["versions_served"] == [d["old_version"]]
        assert d["pickle_executed"] is False
    elif fault == "label_set_change":
        assert d["removed"] and d["added"] and len(d["versions_served"]) == 2
        assert d["processing_errors"] == 0
    elif fault == "redis_acl":
        assert d["redis_errors_while_denied"] > 0 and not d["ready_while_denied"]
    elif fault == "redis_oom":
        assert d["redis_errors_while_full"] > 0
    elif fault == "bad_manifest":
        assert d["rejected"] == 1 and d["swapped"] >= 1
    elif fault == "broker_outage":
        assert d["not_ready_after_s"] is not None and d["not_ready_after_s"] <= 6.0
        assert d["sigterm_exit_s"] <= 12.0 and d["ready_again_after_s"] < 60
    elif fault == "key_mismatch":
        assert d["dlq_reasons"] == ["key_mismatch"]
    assert r["ok"], d


@pytest.mark.integration
@pytest.mark.parametrize("fault", FAULTS)
def test_raw_label_records_of_each_fault_keep_the_contract(chaos, fault):
    """The same verdict from the raw records the fault's consumer saw (``labels.jsonl``) and the
    events it published, without ``chaos.summarise``: every published event has one final
    record (exact repeats allowed), nothing follows it, revisions count up from 0."""
    work = chaos[3] / fault
    published = {(str(s), str(e)) for s, e, _ in json.loads((work / "published.json").read_text())["published"]}
    records = [json.loads(line) for line in (work / "labels.jsonl").read_text().splitlines()]
    history: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        same = {k: v for k, v in r.items() if k not in ("arrived", "partition", "emitted_at", "confidence")}
        got = history.setdefault((r["session_id"], r["event_id"]), {}).setdefault(r["revision"], same)
        assert got == same, f"two different records for one revision: {got} vs {same}"
    assert published <= set(history), f"{len(published - set(history))} events without a record"
    for key in published:
        revs = history[key]
        assert sorted(revs) == list(range(len(revs))), (key, sorted(revs))
        finals = [n for n, r in revs.items() if r["final"]]
        assert finals == [max(revs)], (key, revs)   # one final, and it is the last revision


# --------------------------------------------------------------------------- security


def _slot(key: bytes) -> int:
    """The Redis Cluster hash slot of a key (redis-py's own CRC16 of its hash tag)."""
    from redis.crc import key_slot
    return key_slot(key)


def _label(sid, eid, rev, *, final, step="A", seq=0, version="v1", conf=0.9):
    return {"session_id": sid, "event_id": eid, "seq": seq, "timestamp": "t", "event_name": "e",
            "step_name": step, "confidence": conf, "abstained": step is None, "revision": rev,
            "final": final, "model_version": version, "emitted_at": "x"}


def test_summarise_grades_hand_built_traffic():
    """``chaos.summarise`` on records whose verdict is known by construction."""
    from stream.tools.chaos import summarise
    keys = [("s1", "0"), ("s1", "1"), ("s2", "0")]
    published = {("s1", "0"): 100.0, ("s1", "1"): 101.0, ("s2", "0"): 102.0}
    labels = [
        (100.5, 0, _label("s1", "0", 0, final=False)),
        (101.5, 0, _label("s1", "0", 1, final=True, step="B")),
        (101.6, 0, _label("s1", "0", 1, final=True, step="B")),            # an exact repeat
        (101.7, 0, _label("s1", "1", 0, final=True, seq=1)),
        (103.0, 1, _label("s2", "0", 0, final=False, step="Z")),          # Z: not in v1's labels
    ]
    letter = {"original": base64.b64encode(json.dumps({"session_id": "s2", "event_id": "0"}).encode()).decode()}
    rep = summarise("kill9", keys, published, labels, [letter], marks=[100.2],
                    label_sets={"v1": {"A", "B"}})
    assert (rep.events_in, rep.records, rep.final_out, rep.events_without_final) == (3, 5, 2, 1)
    assert (rep.duplicates, rep.conflicting_duplicates, rep.dlq, rep.accepted_in_dlq) == (1, 0, 1, 1)
    assert rep.several_finals == rep.records_after_final == rep.seq_conflicts == 0
    assert rep.labels_outside_label_set == 1
    assert rep.recovery_s == 1.0             # s2/0, published at 102, first labelled at 103
    assert not rep.ok

    bad = [
        (100.5, 0, _label("s1", "0", 0, final=True)),
        (100.6, 0, _label("s1", "0", 0, final=True, step="B")),           # same revision, other label
        (100.7, 0, _label("s1", "0", 1, final=True)),                     # a second final, after the first
        (100.8, 1, _label("s1", "1", 0, final=True, seq=0)),              # seq 0 claimed twice; partition 1
    ]
    rep = summarise("two_workers", keys[:2], published, bad, [], marks=[])
    assert rep.conflicting_duplicates == 1 and rep.several_finals == 1 and rep.records_after_final == 0
    assert rep.seq_conflicts == 1 and rep.recovery_s is None
    assert rep.details["sessions_on_several_partitions"] == 1 and not rep.ok

    clean = [(100.5, 0, _label("s1", "0", 0, final=True)), (101.5, 0, _label("s1", "1", 0, final=True, seq=1))]
    rep = summarise("kill9", keys[:2], published, clean, [], marks=[100.0])
    assert rep.ok and rep.final_out == 2 and rep.recovery_s == 0.5


def test_cluster_slot_function_matches_redis():
    # reference values from the Redis Cluster specification / CLUSTER KEYSLOT
    assert _slot(b"123456789") == 12739
    assert _slot(b"foo") == 12182 and _slot(b"{user1000}.following") == _slot(b"{user1000}.followers")


@pytest.mark.integration
def test_locked_down_worker_keeps_secrets_out_of_logs_endpoints_and_dead_letters(
        tmp_path, settings_factory, tiny_model, heldout_log):
    """Redis with AUTH, SASL credentials configured: the worker works, and neither password
    shows up in its log (which prints its settings at start), its HTTP endpoints or the DLQ.
    The session keys it writes are Redis Cluster safe (one hash slot per session)."""
    import redis as redis_lib

    from stream.tools.publisher import EventPublisher, replay_messages
    from trainer.loading import read_events

    redis_pw, sasl_pw = f"redis-{uuid.uuid4().hex}", f"sasl-{uuid.uuid4().hex}"
    server = RedisServer(tmp_path / "redis", password=redis_pw)
    server.start()
    try:
        root = tmp_path / "artifacts"
        promote(tiny_model, root)
        # PLAINTEXT: the embedded broker speaks no SASL, but the credentials are configured
        # and go through the same settings, logging and client code.
        settings = settings_factory(artifacts_dir=root.resolve(), redis_url=server.url,
                                    sasl_username="tagger", sasl_password=sasl_pw, inactivity_s=4)
        settings = dataclasses.replace(settings, web_port=free_port())
        assert redis_pw not in json.dumps(settings.redacted()) and sasl_pw not in json.dumps(settings.redacted())
        worker = WorkerProcess.start(settings, tmp_path / "worker.log", cwd=tmp_path)
        try:
            worker.wait_ready(120)  # readiness includes an authenticated Redis PING
            frame, _ = read_events(heldout_log, require_label=False)
            messages, _ = replay_messages(frame, sessions=2)
            keys = {(m["session_id"], m["event_id"]) for m in messages if m.get("type") != "session_end"}
            bad = json.dumps({"session_id": "s", "timestamp": "nope", "event_name": "x"}).encode()

            async def main():
                from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

                async with EventPublisher(settings.kafka, settings.input_topic,
                                          security=kafka_client_kwargs(settings)) as pub:
                    for m in messages:
                        await pub.publish(m)
                raw = AIOKafkaProducer(**kafka_client_kwargs(settings))  # the publisher would refuse it
                await raw.start()
                try:
                    await raw.send_and_wait(settings.input_topic, bad, key=b"s")
                finally:
                    await raw.stop()
                consumer = AIOKafkaConsumer(settings.output_topic, settings.dlq_topic, group_id=None,
                                            auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                            **kafka_client_kwargs(settings))
                await consumer.start()
                labels, letters = [], []
                try:
                    deadline = time.monotonic() + 90
                    while time.monotonic() < deadline:
                        for tp, batch in (await consumer.getmany(timeout_ms=200)).items():
                            for msg in batch:
                                (letters if tp.topic == settings.dlq_topic else labels).append(msg.value)
                        finals = {(r["session_id"], r["event_id"]) for r in map(json.loads, labels)
                                  if r["final"]}
                        if keys <= finals and letters:
                            break
                finally:
                    await consumer.stop()
                return labels, letters

            labels, letters = asyncio.run(main())
            finals = {(r["session_id"], r["event_id"]) for r in map(json.loads, labels) if r["final"]}
            assert keys <= finals, "the locked-down worker did not label the traffic"
            endpoints = b"".join(http_get(settings.web_port, p)[1] for p in ("/metrics", "/readyz", "/healthz"))
        finally:
            worker.stop()
        log_text = worker.log_text()
        assert "starting worker with" in log_text and "***" in log_text
        for secret in (redis_pw, sasl_pw):
            assert secret not in log_text, "a password is in the worker log"
            assert secret.encode() not in endpoints
            assert all(secret.encode() not in v for v in letters + labels)

        assert len(letters) == 1
        letter = json.loads(letters[0])
        assert set(letter) == {"original", "original_text", "reason", "detail", "field", "source", "key",
                               "dlq_at"}
        assert base64.b64decode(letter["original"]) == bad and letter["reason"] == "bad_timestamp"
        metadata = json.dumps({k: v for k, v in letter.items() if k not in ("original", "original_text")})
        for leak in (settings.kafka, "redis://", str(server.port), "sasl", "password", str(root)):
            assert leak not in metadata, leak

        # Redis Cluster: every key of a session carries the session as its hash tag
        client = redis_lib.Redis.from_url(server.url)
        try:
            written = list(client.scan_iter(match=f"{settings.redis_prefix}s:*"))
        finally:
            client.close()
        by_session: dict[bytes, set[int]] = {}
        for k in written:
            tag = k[k.index(b"{") + 1:k.index(b"}")]
            by_session.setdefault(tag, set()).add(_slot(k))
        assert {s.encode() for s, _ in keys} <= set(by_session)
        assert all(len(slots) == 1 for slots in by_session.values()), by_session
    finally:
        server.kill()


def test_security_settings_from_the_environment(tmp_path):
    import certifi

    env = {"TAGGER_KAFKA": "kafka-1.example:9093,kafka-2.example:9093",
           "TAGGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TAGGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "TAGGER_KAFKA_SASL_USERNAME": "tagger", "TAGGER_KAFKA_SASL_PASSWORD": "k-secret",
           "TAGGER_KAFKA_SSL_CAFILE": certifi.where(),
           "TAGGER_REDIS": "rediss://:r-secret@redis.example:6380/0",
           "TAGGER_METRICS_HOST": "0.0.0.0"}
    s = Settings.from_env(env)
    kw = kafka_client_kwargs(s)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "tagger" and kw["sasl_plain_password"] == "k-secret"
    assert kw["ssl_context"].verify_mode.name == "CERT_REQUIRED" and kw["ssl_context"].check_hostname
    faust_kw = faust_broker_settings(s)
    assert faust_kw["broker_credentials"] is not None and faust_kw["web_bind"] == "0.0.0.0"
    shown = json.dumps(s.redacted())
    assert "k-secret" not in shown and "r-secret" not in shown
    assert s.redacted()["redis_url"] == "rediss://:***@redis.example:6380/0"
    assert Settings.from_env(env).to_env()["TAGGER_REDIS"] == env["TAGGER_REDIS"]  # for subprocesses

    ssl_only = Settings.from_env({"TAGGER_KAFKA_SECURITY_PROTOCOL": "SSL",
                                  "TAGGER_KAFKA_SSL_CAFILE": certifi.where()})
    assert "ssl_context" in kafka_client_kwargs(ssl_only) and "sasl_mechanism" not in kafka_client_kwargs(ssl_only)
    with pytest.raises(ConfigError, match="TAGGER_KAFKA_SASL_PASSWORD"):
        Settings.from_env({"TAGGER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TAGGER_KAFKA_SASL_USERNAME": "u"})
    with pytest.raises(ConfigError, match="TAGGER_KAFKA_SSL_CAFILE"):
        Settings.from_env({"TAGGER_KAFKA_SECURITY_PROTOCOL": "SSL",
                           "TAGGER_KAFKA_SSL_CAFILE": str(tmp_path / "missing.pem")})


def test_every_bad_artifact_of_the_drill_is_refused_whatever_the_architecture(tmp_path, tiny_model):
    """The ``bad_artifact`` fault promotes three broken models; each must be rejected by the
    worker's holder (the default ``model.arch: auto`` gives a Mixture, whose top-level
    arguments are not the ones its weights depend on)."""
    from stream.tools.chaos import bad_artifacts, point_at
    from stream.metrics import Metrics
    from stream.model_holder import ModelHolder

    root = tmp_path / "artifacts"
    promote(tiny_model, root)
    metrics = Metrics.create()
    holder = ModelHolder(root, on_event=lambda result, version, detail: metrics.model_event(result, version))
    holder.load_initial()
    bad = bad_artifacts(tiny_model, tmp_path / "bad")
    for k, path in enumerate(bad.values(), 1):
        point_at(root, path)
        assert holder.poll() is False
        assert metrics.model_swaps.labels(result="rejected")._value.get() == k, path.name
    assert not (tmp_path / "bad" / "PWNED").exists()
