"""The monitoring stack against the real thing: a Prometheus scraping a worker at work.

A real worker (the embedded broker and the test Redis) labels generated traffic that keeps
flowing for the whole test; a few malformed messages go to the DLQ and one bad artifact is
promoted (and refused) so that every series the dashboard and the alerts use exists. A real
Prometheus (Debian's binary, its own port and data folder) scrapes the worker every second
with the worker job and the alert rules of monitoring/prometheus.yml. Then every query of
every dashboard panel runs through Prometheus' HTTP API and must return data, and every
alert expression must run; an alert that is (rightly) not firing must still find the series
it watches.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from stream.tools.publisher import replay
from stream.tools.processes import free_port
from stream.tools.processes import metric_value as parse_metric
from tests.helpers import make_log, serving_root
from tests.monitoring.files import (ALERTS_YML, PROMETHEUS_YML, WORKER_JOB, alert_rules,
                                    dashboard_targets, grafana_to_promql, load_yaml, selectors)
from tests.monitoring.test_dockerfile import final_stage
from trainer.artifacts import POINTER, promote

TRAFFIC_RATE = 120.0  # events/s: steady load for a small worker on a shared CI machine
WARMUP_S = 25         # scraped seconds before the queries run (their windows are 20 s)


def prometheus_config(worker_port: int) -> dict:
    """monitoring/prometheus.yml with the worker job pointed at the test worker."""
    cfg = load_yaml(PROMETHEUS_YML)
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ALERTS_YML)]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == WORKER_JOB)
    job.pop("dns_sd_configs")  # compose finds replicas by DNS; here there is one, known
    job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
    job["scrape_timeout"] = "1s"
    cfg["scrape_configs"] = [job]
    return cfg


class Traffic(threading.Thread):
    """Publishes generated sessions at ``rate`` events/s (with session ends) in a thread of
    its own; leaving the ``with`` block cancels it, so no producer outlives the broker."""

    def __init__(self, settings, data, rate):
        super().__init__(daemon=True)
        self.settings, self.data, self.rate = settings, data, rate
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(replay(data, settings.kafka, settings.input_topic, rate=rate))

    def run(self):
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.loop.close()

    def __enter__(self) -> "Traffic":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.is_alive():
            self.loop.call_soon_threadsafe(self.task.cancel)
            self.join(20)


def send_raw(settings, values: list[bytes]) -> None:
    """Messages the publisher would refuse: they can only end in the DLQ."""
    async def send():
        from aiokafka import AIOKafkaProducer
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
        await producer.start()
        try:
            for i, value in enumerate(values):
                await producer.send_and_wait(settings.input_topic, value, key=f"bad-{i}".encode())
        finally:
            await producer.stop()
    asyncio.run(send())


def metric_value(port: int, selector: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return parse_metric(resp.read().decode(), selector)


def wait_for(check, what: str, timeout_s: float, worker) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout_s:.0f} s\n{worker.log_text()[-3000:]}",
                        pytrace=False)
        time.sleep(0.25)


def finite_values(answer: dict) -> list[float]:
    out = []
    for item in answer["data"]["result"]:
        value = float(item["value"][1])
        if not math.isnan(value):
            out.append(value)
    return out


@pytest.mark.integration
def test_dashboard_and_alert_queries_on_a_live_worker(settings_factory, faust_worker, tiny_model,
                                                      prometheus_server, tmp_path):
    root = serving_root(tmp_path, tiny_model)
    port = free_port()
    settings = settings_factory(artifacts_dir=root, web_port=port)
    worker = faust_worker(settings)
    worker.wait_ready()

    prom = prometheus_server(prometheus_config(port))
    with Traffic(settings, make_log(tmp_path, 500, 23, "traffic.csv"), TRAFFIC_RATE) as traffic:
        # Malformed input: DLQ series by reason.
        send_raw(settings, [b"{not json", b'{"session_id": "s-1"}', b"\xff\xfe", b"[1, 2, 3]"])
        wait_for(lambda: (metric_value(port, "tagger_events_total{result=\"invalid\"}") or 0) >= 4,
                 "4 messages in the DLQ", 30, worker)

        # A corrupt artifact made current: the worker refuses it and keeps serving.
        bad = tmp_path / "bad-model"
        shutil.copytree(tiny_model, bad)
        with open(bad / "weights.pt", "ab") as f:
            f.write(b"tampered")
        (root / (POINTER + ".tmp")).write_text(f"{bad.resolve()}\n")
        os.replace(root / (POINTER + ".tmp"), root / POINTER)
        wait_for(lambda: metric_value(port, 'tagger_model_swaps_total{result="rejected"}') == 1,
                 "the rejected swap", 30, worker)
        swap_alert = next(r["expr"] for r in alert_rules() if r["alert"] == "TaggerModelSwapRejected")
        wait_for(lambda: bool(prom.query(swap_alert)["data"]["result"]),
                 "TaggerModelSwapRejected firing while the refused model is current", 30, worker)
        promote(tiny_model, root)  # and back to a good one: an ok swap between two batches
        wait_for(lambda: (metric_value(port, 'tagger_model_swaps_total{result="ok"}') or 0) >= 1,
                 "the swap back to the good model", 30, worker)
        wait_for(lambda: not prom.query(swap_alert)["data"]["result"],
                 "TaggerModelSwapRejected cleared by the good promote", 30, worker)

        # Enough scrapes for every window, while traffic still flows.
        def scraped_s() -> float:
            values = finite_values(prom.query(f'count_over_time(up{{job="{WORKER_JOB}"}}[2m])'))
            return values[0] if values else 0.0

        wait_for(lambda: scraped_s() >= WARMUP_S, f"{WARMUP_S} s of scrapes", 60, worker)
        assert traffic.is_alive(), f"traffic ended before the queries ({traffic.error!r}); slow it down"
        assert prom.query(f'up{{job="{WORKER_JOB}"}} == 1')["data"]["result"], "the worker is scraped"

        # ---- every dashboard query returns data
        empty, failed = [], []
        for panel, target in dashboard_targets():
            expr = grafana_to_promql(target["expr"])
            answer = prom.query(expr)
            if answer.get("status") != "success":
                failed.append(f"{panel['title']}: {expr}: {answer.get('error')}")
            elif not finite_values(answer):
                empty.append(f"{panel['title']}: {expr}")
        assert not failed, "dashboard queries Prometheus rejects:\n" + "\n".join(failed)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # ---- every alert expression runs; quiet ones still see the series they watch
        for rule in alert_rules():
            answer = prom.query(rule["expr"])
            assert answer.get("status") == "success", f"{rule['alert']}: {answer.get('error')}"
            if not answer["data"]["result"]:
                for sel in selectors(rule["expr"]):
                    found = prom.query(f"count({sel})")
                    assert found["status"] == "success" and found["data"]["result"], (
                        f"{rule['alert']} watches {sel}, which has no series")
        firing = {r["alert"]: prom.query(r["expr"])["data"]["result"] for r in alert_rules()}
        assert not firing["TaggerWorkerDown"] and not firing["TaggerNoWorkers"], "the worker is up"
        assert not firing["TaggerModelSwapRejected"], "a good model is current again"

        # Prometheus itself loaded the same rules and evaluates them without errors.
        groups = prom.api("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in alert_rules()}
        wait_for(lambda: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                             for g in prom.api("/api/v1/rules")["data"]["groups"] for r in g["rules"]),
                 "every rule evaluated healthy", 10, worker)

        # The image's health check command answers against this worker.
        health = next(rest for op, rest in final_stage() if op == "HEALTHCHECK")
        argv = json.loads(health.split("CMD", 1)[1].strip())
        assert argv[0] == "python"
        res = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "TAGGER_WEB_PORT": str(port)})
        assert res.returncode == 0, res.stderr

        assert traffic.error is None, traffic.error
