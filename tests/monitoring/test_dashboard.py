"""The Grafana dashboard and its provisioning, as Grafana would load them.

The queries themselves run against a live worker in test_live_prometheus.py; here: the JSON
is what build_dashboard.py generates, every panel Grafana needs is well formed, the issue's
views are all there, and the provisioning files point where docker-compose.yml mounts them.
"""

from __future__ import annotations

import importlib.util
import json

from stream.metrics import Metrics
from tests.monitoring.files import (DASHBOARD_JSON, GRAFANA, WORKER_JOB, compose, dashboard,
                                    dashboard_targets, load_yaml, metric_family, mounts,
                                    selectors)


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_the_generated_one():
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == _builder().render(), (
        "monitoring/grafana/dashboards/tagger.json is stale: run "
        "`python monitoring/grafana/build_dashboard.py`")


def test_panels_are_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "table"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], f"{p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    # no two panels overlap
    cells = set()
    for p in d["panels"]:
        pos = p["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance"]


def test_queries_use_the_worker_metrics_and_the_worker_picker():
    families = {m.name for m in Metrics.create().registry.collect()}
    used = set()
    for panel, t in dashboard_targets():
        sels = selectors(t["expr"])
        assert sels, f"{panel['title']}: no metric in {t['expr']}"
        for sel in sels:
            assert f'job="{WORKER_JOB}"' in sel and 'instance=~"$instance"' in sel, (
                f"{panel['title']}: {sel} ignores the job or the worker picker")
            name = sel.split("{")[0]
            assert name == "up" or metric_family(name) in families, f"{panel['title']}: {name}"
            used.add(metric_family(name))
    # every metric the worker exports is on the dashboard somewhere
    assert families - used == set(), f"metrics not shown: {sorted(families - used)}"


def test_the_issue_views_are_on_the_dashboard():
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"])
             for panel in dashboard()["panels"] if panel["type"] != "row"}
    text = " ".join(exprs.values())
    for q in ("0.5", "0.95", "0.99"):  # p50/p95/p99 from the histogram
        assert f"histogram_quantile({q}, sum by (le) (rate(tagger_end_to_end_latency_seconds_bucket" in text
    for needle in ("tagger_events_total", 'outcome="labelled"', 'outcome="abstained"',
                   'kind="revision"', "tagger_dlq_total", "tagger_open_sessions",
                   "tagger_model_info", "tagger_model_swaps_total", "sum by (partition) (tagger_consumer_lag_messages",
                   "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                   "tagger_model_current_rejected",
                   "sum by (instance)"):
        assert needle in text, needle
    per_worker = [title for title, e in exprs.items() if "per worker" in title]
    assert len(per_worker) >= 4, per_worker


def test_provisioning_matches_the_compose_mounts():
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"

    dash = load_yaml(GRAFANA / "provisioning" / "dashboards" / "tagger.yml")
    assert dash["apiVersion"] == 1
    (provider,) = dash["providers"]
    assert provider["type"] == "file"

    grafana = compose()["services"]["grafana"]
    assert mounts(grafana)["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    assert mounts(grafana)[provider["options"]["path"]] == "./monitoring/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD_JSON.name}"
    json.loads(DASHBOARD_JSON.read_text())  # the file Grafana loads is valid JSON
