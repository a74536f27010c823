"""Prometheus configuration and alert rules, checked by Prometheus' own tool.

``promtool check config`` and ``check rules`` validate monitoring/prometheus.yml and
alerts.yml; ``promtool test rules`` runs alerts.test.yml, which fires every alert on
synthetic series (and shows it quiet on healthy ones). The tests here also make sure no
alert goes untested, every alert is documented, and the rules only use the worker's metrics.
"""

from __future__ import annotations

import re
import subprocess

from stream.metrics import Metrics
from tests.monitoring.conftest import require_binary
from tests.monitoring.files import (ALERTS_TEST_YML, ALERTS_YML, MONITORING, PRODUCTION_MD,
                                    PROMETHEUS_YML, REPO, WORKER_JOB, alert_rules, load_yaml,
                                    metric_family, selectors)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=MONITORING,
                          capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_config_and_the_rules_it_loads():
    res = promtool("check", "config", PROMETHEUS_YML.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 1 rule files found" in res.stdout + res.stderr
    res = promtool("check", "rules", ALERTS_YML.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout + res.stderr


def test_promtool_unit_tests_fire_every_alert():
    res = promtool("test", "rules", ALERTS_TEST_YML.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr

    # Every alert appears in a test case that expects it to fire, and one that expects quiet.
    fired, quiet = set(), set()
    for case in load_yaml(ALERTS_TEST_YML)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), f"alerts never shown firing: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never shown quiet: {sorted(names - quiet)}"


def test_the_issue_alerts_are_all_there():
    names = {r["alert"] for r in alert_rules()}
    for required in ("TaggerWorkerDown", "TaggerConsumerLagGrowing", "TaggerLatencyP99High",
                     "TaggerCoverageDropping", "TaggerDeadLetterRate", "TaggerModelSwapRejected"):
        assert required in names


def test_prometheus_scrapes_every_worker_replica_through_dns():
    cfg = load_yaml(PROMETHEUS_YML)
    assert cfg["rule_files"] == [ALERTS_YML.name]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == WORKER_JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["names"] == ["worker"], "one target per replica of `worker`"


def test_every_alert_is_documented_and_labelled():
    doc = PRODUCTION_MD.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, flags=re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        page, _, anchor = ann["runbook"].partition("#")
        assert page == str(PRODUCTION_MD.relative_to(REPO)), rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in PRODUCTION.md"
        assert f"`{rule['alert']}`" in doc or rule["alert"] in doc


def test_rules_select_the_worker_job_and_its_real_metrics():
    families = {m.name for m in Metrics.create().registry.collect()}
    for rule in alert_rules():
        sels = selectors(rule["expr"])
        assert sels, rule["alert"]
        for sel in sels:
            name = sel.split("{")[0]
            assert f'job="{WORKER_JOB}"' in sel, f"{rule['alert']}: {sel} is not limited to the workers"
            assert name == "up" or metric_family(name) in families, (
                f"{rule['alert']}: {name} is not a metric of stream/metrics.py")

