"""The Grafana dashboard of the tagger workers, as code.

``python monitoring/grafana/build_dashboard.py`` rewrites ``dashboards/tagger.json``, the file
Grafana's provisioning loads; tests/monitoring checks that the two agree and runs every query
of it against a Prometheus scraping a live worker. Edit the panels here, not in the JSON.

Every query selects ``job="tagger-worker"`` (the scrape job of monitoring/prometheus.yml) and
``instance=~"$instance"`` (the worker picker; "All" is ``.*``). Rates use
``$__rate_interval``, which Grafana derives from the datasource's scrape interval.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "tagger.json"
UID = "tagger-workers"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="tagger-worker", instance=~"$instance"'
RI = "$__rate_interval"


def rate(metric: str, extra: str = "", by: str = "", window: str = RI) -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    agg = f"sum by ({by}) " if by else "sum"
    return f"{agg}(rate({metric}{{{sel}}}[{window}]))"


def quantile(q: float, metric: str, by: str = "", window: str = RI) -> str:
    keys = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{{{SEL}}}[{window}])))"


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"


def coverage(window: str = RI, by: str = "") -> str:
    return ratio(rate("tagger_final_labels_total", 'outcome="labelled"', by, window),
                 rate("tagger_final_labels_total", "", by, window))


def per(metric: str, legend: str, by: str = "instance", agg: str = "sum") -> dict:
    """The target of one gauge or counter, aggregated by ``by`` (default: per worker)."""
    return target(f"{agg} by ({by}) ({metric}{{{SEL}}})", legend)


def target(expr: str, legend: str = "", **extra) -> dict:
    return {"expr": expr, "legendFormat": legend or "__auto", "range": True, "instant": False,
            **extra}


class Layout:
    """Places panels left to right in rows of 24 grid units and numbers them."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0

    def numbered(self) -> list[dict]:
        for i, p in enumerate(self.panels, 1):
            p["id"] = i
            for ref, t in zip("ABCDEFGH", p.get("targets", [])):
                t["refId"] = ref
                t["datasource"] = DS
        return self.panels


def timeseries(title: str, description: str, targets: list[dict], unit: str = "short", *,
               stack: bool = False, bars: bool = False, minimum: float | None = 0,
               maximum: float | None = None) -> dict:
    defaults: dict = {"unit": unit, "custom": {
        "drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 30 if bars else 10,
        "showPoints": "never", "spanNulls": True,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"}}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, description: str, expr: str, unit: str = "short", *,
         thresholds: list[tuple[float | None, str]] | None = None, legend: str = "") -> dict:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, legend)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto",
                        "justifyMode": "auto", "orientation": "auto"}}


def table(title: str, description: str, expr: str) -> dict:
    return {"type": "table", "title": title, "description": description, "datasource": DS,
            "targets": [{"expr": expr, "format": "table", "instant": True, "range": False,
                         "legendFormat": "__auto"}],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showHeader": True},
            "transformations": [{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True,
                                  "service": True},
                "renameByName": {"instance": "worker", "version": "model version"}}}]}


def build() -> dict:
    L = Layout()
    latency = "tagger_end_to_end_latency_seconds"

    L.row("Overview")
    L.add(stat("Workers up", "Worker replicas answering Prometheus scrapes.",
               f'sum(up{{{SEL}}})', thresholds=[(None, "red"), (1, "green")]), 4, 4)
    L.add(stat("Events labelled / s", "Accepted input events per second, all workers.",
               rate("tagger_events_total", 'result="accepted"', window="5m"), "ops"), 4, 4)
    L.add(stat("p99 end-to-end latency", "Publication to first label record, last 5 minutes "
               "(alert above 0.5 s).", quantile(0.99, latency, window="5m"), "s",
               thresholds=[(None, "green"), (0.25, "orange"), (0.5, "red")]), 4, 4)
    L.add(stat("Coverage", "Share of final labels that name a step (the rest abstain), last "
               "5 minutes.", coverage("5m"), "percentunit",
               thresholds=[(None, "red"), (0.5, "orange"), (0.8, "green")]), 4, 4)
    L.add(stat("Consumer lag", "Messages on tagger.events not yet labelled, all partitions.",
               f"sum(tagger_consumer_lag_messages{{{SEL}}})", thresholds=[(None, "green"), (1000, "red")]),
          4, 4)
    L.add(stat("DLQ messages / s", "Messages sent to tagger.events.dlq per second, last 5 minutes.",
               rate("tagger_dlq_total", window="5m"), "ops",
               thresholds=[(None, "green"), (0.01, "orange")]), 4, 4)

    L.row("Throughput")
    L.add(timeseries("Input messages / s by result",
                     "accepted: labelled; duplicate: redelivered, already labelled; invalid: sent "
                     "to the DLQ; session_end: end-of-session markers.",
                     [target(rate("tagger_events_total", by="result"), "{{result}}")], "ops",
                     stack=True), 12, 8)
    L.add(timeseries("Label records / s by kind",
                     "first: an event's first label; revision: a changed label; final: the last "
                     "record of an event.",
                     [target(rate("tagger_label_records_total", by="kind"), "{{kind}}")], "ops"),
          12, 8)

    L.row("Latency")
    L.add(timeseries("End-to-end latency", "From an event's publication (published_at) to its "
                     "first label record being produced, from the histogram.",
                     [target(quantile(q, latency), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)],
                     "s"), 12, 8)
    L.add(timeseries("Model time per event", "Model compute per event (batch time / events).",
                     [target(quantile(q, "tagger_inference_seconds"), f"p{round(q * 100)}")
                      for q in (0.5, 0.99)], "s"), 12, 8)

    L.row("Model quality")
    L.add(timeseries("Coverage and abstention rate",
                     "Share of final labels that name a step, and that abstain.",
                     [target(coverage(), "coverage"),
                      target(ratio(rate("tagger_final_labels_total", 'outcome="abstained"'),
                                   rate("tagger_final_labels_total")), "abstention rate")],
                     "percentunit", maximum=1), 12, 8)
    L.add(timeseries("Revision rate", "Revisions per first label: how often a shown label is "
                     "changed as later events arrive.",
                     [target(ratio(rate("tagger_label_records_total", 'kind="revision"'),
                                   rate("tagger_label_records_total", 'kind="first"')),
                             "revisions per event")], "percentunit"), 12, 8)

    L.row("Dead letters")
    L.add(timeseries("DLQ messages / s by reason", "Messages rejected to tagger.events.dlq, by "
                     "reason code.",
                     [target(rate("tagger_dlq_total", by="reason"), "{{reason}}")], "ops",
                     stack=True), 12, 8)
    L.add(timeseries("DLQ share of input", "Rejected messages over all input messages "
                     "(alert above 1 %).",
                     [target(ratio(rate("tagger_dlq_total"), rate("tagger_events_total")),
                             "DLQ share")], "percentunit"), 12, 8)

    L.row("Sessions and model")
    L.add(timeseries("Open sessions", "Sessions held open (not yet ended or timed out).",
                     [target(f"sum(tagger_open_sessions{{{SEL}}})", "all workers")]), 8, 8)
    L.add(table("Model version per worker", "The model each worker serves now.",
                f"tagger_model_info{{{SEL}}} == 1"), 8, 8)
    L.add(timeseries("Model swaps since worker start", "Hot-swap attempts after start-up by "
                     "result: ok (swapped) and rejected (artifact refused; old model kept); the "
                     "initial load is not counted. 'refused model current' is 1 while "
                     "artifacts/current names a model the worker refused (alert "
                     "TaggerModelSwapRejected).",
                     [per("tagger_model_swaps_total", "{{instance}} {{result}}", by="instance, result"),
                      per("tagger_model_current_rejected", "{{instance}} refused model current", agg="max")]), 8, 8)

    L.row("Consumer lag")
    L.add(timeseries("Lag per partition", "Messages behind the end of each tagger.events "
                     "partition (log end offset minus the committed offset).",
                     [per("tagger_consumer_lag_messages", "partition {{partition}}", by="partition")]), 12, 8)
    L.add(timeseries("Lag per worker", "The lag of the partitions each worker holds.",
                     [per("tagger_consumer_lag_messages", "{{instance}}")]),
          12, 8)

    L.row("Per worker")
    L.add(timeseries("Events / s per worker", "Accepted events per second, by worker.",
                     [target(rate("tagger_events_total", 'result="accepted"', by="instance"),
                             "{{instance}}")], "ops", stack=True), 8, 8)
    L.add(timeseries("p99 latency per worker", "End-to-end p99 by worker.",
                     [target(quantile(0.99, latency, by="instance"), "{{instance}}")], "s"), 8, 8)
    L.add(timeseries("Coverage per worker", "Share of each worker's recent final labels "
                     "(last 2000) that name a step.",
                     [target(f"tagger_coverage_ratio{{{SEL}}}", "{{instance}}")], "percentunit",
                     maximum=1), 8, 8)
    L.add(timeseries("Assigned partitions per worker", "tagger.events partitions each worker "
                     "holds; changes show rebalances.",
                     [per("tagger_assigned_partitions", "{{instance}}")]), 8, 8)
    L.add(timeseries("Open sessions per worker", "Sessions each worker holds in memory.",
                     [per("tagger_open_sessions", "{{instance}}")]),
          8, 8)
    L.add(timeseries("Events per batch per worker", "Mean events per processed batch; larger "
                     "batches mean the worker is busier.",
                     [target(f"sum by (instance) (rate(tagger_batch_events_sum{{{SEL}}}[{RI}]))"
                             f" / sum by (instance) (rate(tagger_batch_events_count{{{SEL}}}[{RI}]))",
                             "{{instance}}")]), 8, 8)

    L.row("Dependencies and timers")
    L.add(timeseries("Dependencies up", "1 while each worker reaches the broker (a metadata "
                     "request in the last few seconds) and Redis (PING and the last write-through); "
                     "what /readyz reports.",
                     [per("tagger_dependency_up", "{{instance}} {{dependency}}", by="instance, dependency", agg="min")], maximum=1), 6, 8)
    L.add(timeseries("Infrastructure errors / s", "Failed Redis or Kafka operations, retried "
                     "or held in memory (never dead-lettered).",
                     [target(rate("tagger_infrastructure_errors_total", by="instance, component"),
                             "{{instance}} {{component}}")], "ops"), 6, 8)
    L.add(timeseries("Timers", "Seconds since each periodic task (sweep, model poll, broker "
                     "probe) last completed, and the exceptions they caught and survived.",
                     [target(f"time() - max by (instance, timer) "
                             f"(tagger_timer_last_run_timestamp_seconds{{{SEL}}})",
                             "{{instance}} {{timer}} age"),
                      target(f"sum by (instance, timer) (increase(tagger_timer_errors_total{{{SEL}}}[{RI}]))",
                             "{{instance}} {{timer}} errors")], "s"), 6, 8)
    L.add(timeseries("Duplicate runs", "Input events in a row dropped as already seen, and the "
                     "runs long enough to be suspicious (a session store that outlived its broker); "
                     "label records not sent again because a stopped worker's unacknowledged copy "
                     "was found on the label topic (records in doubt).",
                     [per("tagger_duplicate_run_events", "{{instance}} current run", agg="max"),
                      per("tagger_duplicate_runs_total", "{{instance}} suspicious runs"),
                      per("tagger_label_repeats_suppressed_total", "{{instance}} repeats not sent")]), 6, 8)

    L.row("Worker process")
    L.add(timeseries("Memory per worker", "Resident memory (RSS) and virtual memory of each "
                     "worker process.",
                     [per("process_resident_memory_bytes", "{{instance}} resident"),
                      per("process_virtual_memory_bytes", "{{instance}} virtual")], "bytes"), 8, 8)
    L.add(timeseries("CPU per worker", "CPU seconds per second used by each worker process "
                     "(1 = one core busy).",
                     [target(f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))",
                             "{{instance}}")]), 8, 8)
    L.add(timeseries("Open files per worker", "Open file descriptors (sockets included) as a "
                     "share of the process limit.",
                     [target(f"sum by (instance) (process_open_fds{{{SEL}}}) / sum by (instance) "
                             f"(process_max_fds{{{SEL}}})", "{{instance}}")], "percentunit"), 4, 8)
    L.add(stat("Youngest worker uptime", "Time since the most recent worker process start "
               "(a restart resets it).",
               f"time() - max(process_start_time_seconds{{{SEL}}})", "s"), 4, 8)

    return {
        "uid": UID,
        "title": "Tagger workers",
        "description": "Throughput, latency, coverage, revisions, DLQ, sessions, model and "
                       "consumer lag of the streaming event tagger.",
        "tags": ["tagger"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {"text": "Prometheus", "value": "prometheus"},
             "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "instance", "label": "Worker", "type": "query", "datasource": DS,
             "query": {"query": 'label_values(up{job="tagger-worker"}, instance)',
                       "refId": "instance"},
             "definition": 'label_values(up{job="tagger-worker"}, instance)',
             "includeAll": True, "allValue": ".*", "multi": True,
             "current": {"text": ["All"], "value": ["$__all"]},
             "refresh": 2, "sort": 1, "hide": 0, "regex": "", "options": []},
        ]},
        "panels": L.numbered(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
