"""``tagger bench --quick`` end to end: every headline figure is produced, and the report and
plots are written. No timing is asserted: the figures depend on the machine."""

from __future__ import annotations

import json
import math

import pytest

from stream.tools.bench import HEADLINE_KEYS, batch_phases, summarize_pyspy, update_readme
from tagger.cli import main


@pytest.mark.integration
def test_quick_bench_writes_every_headline_figure_report_and_plots(tmp_path, redis_url, monkeypatch):
    # The bench starts its own embedded broker; point it at the test session's Redis.
    monkeypatch.setenv("TAGGER_REDIS", redis_url)
    out, headline = tmp_path / "bench", tmp_path / "headline.json"
    assert main(["bench", "--quick", "--json", str(headline), "--out", str(out)]) == 0

    figures = json.loads(headline.read_text())
    for key in HEADLINE_KEYS:
        value = figures.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    # capacity at p99 <= 50 ms: 0 is a possible answer on a busy machine, never a missing one
    for key in ("capacity_events_per_s_at_p99_50ms", "faust_capacity_events_per_s_at_p99_50ms"):
        assert isinstance(figures[key], (int, float)) and 0 <= figures[key] < 1e6, (key, figures[key])
    cpu = figures["worker_cpu_ms_per_event_at_500"]
    assert isinstance(cpu, float) and 0 < cpu < 1000, cpu
    assert figures["capacity_window_s"] == 4.0  # --quick says its window is short
    assert figures["quick"] is True
    assert set(figures["targets"]) == {"worker_vs_faust", "latency_p99_s_at_50pct", "cost_ratio_pos1000_pos10",
                                       "capacity_vs_faust", "worker_cpu_ms_per_event_at_500"}

    report = (out / "report.md").read_text()
    for section in ("## Headline", "## Throughput", "## Capacity at a latency target", "## Latency under load", "## Scaling with session length",
                    "## Memory", "## Label quality"):
        assert section in report
    for plot in ("latency_cdf.png", "throughput_vs_load.png", "cost_vs_position.png",
                 "risk_coverage_generated.png"):
        assert (out / plot).stat().st_size > 1000, plot
    results = json.loads((out / "results.json").read_text())
    for kind in ("worker", "faust"):
        probes = results["capacity"][kind]["probes"]
        assert probes[0]["rate"] == 500.0 and 1 <= len(probes) <= 3
        assert results["capacity"][kind]["events_per_s"] == max([p["rate"] for p in probes if p["ok"]], default=0)
    assert set(results["quality"]["generated"]["models"]) == {"bilstm", "transformer", "logreg"}
    assert all("error" not in m for m in results["quality"]["generated"]["models"].values())
    # the Kafka clients' own floor: each bare forwarder passed every paced event through
    for kind in ("aiokafka", "librdkafka"):
        floor = results["client_floor"][kind]
        assert floor["rate"] == 500.0 and floor["labelled"] == floor["events"] > 0, (kind, floor)
        assert 0 < figures[f"{kind}_cpu_ms_per_event_at_500"] < 1000
    assert "bare librdkafka forwarder (no Faust)" in report
    assert results["headline"] == figures
    assert (out / "readme_table.md").read_text().startswith("`tagger bench --quick")


def test_pyspy_summary_counts_busy_samples_per_thread_and_function():
    raw = "\n".join([
        "thread (1): MainThread;run (asyncio/base_events.py:1);_handle (stream/app.py:10) 30",
        "thread (2): tagger-model_0;_worker (concurrent/futures/thread.py:3);process (stream/tagging.py:5);"
        "step (trainer/model.py:7) 60",
        "thread (1): MainThread;run (asyncio/base_events.py:1);select (selectors.py:4) 10",
    ])
    s = summarize_pyspy(raw)
    assert s["samples"] == 90 and s["idle_samples"] == 10
    assert s["threads"][0] == {"function": "tagger-model_0", "samples": 60, "percent": 66.7}
    assert s["self"][0]["function"] == "step (trainer/model.py)"
    inclusive = {r["function"]: r["percent"] for r in s["inclusive"]}
    assert inclusive == {"step (trainer/model.py)": 66.7, "process (stream/tagging.py)": 66.7,
                         "_handle (stream/app.py)": 33.3}


def test_batch_phases_split_the_batch_time():
    log = ("phases: model 30.0 queue 5.0 ack 5.0 save 4.0 ms (10 records)\nbatch of 8 in 50.0 ms\n"
           "phases: model 10.0 queue 0.0 ack 0.0 save 2.0 ms (2 records)\nbatch of 2 in 10.0 ms\n")
    b = batch_phases(log)
    assert b["batches"] == 2 and b["events_max"] == 8
    assert b["share"]["model (executor)"] == pytest.approx(40 / 60, abs=1e-3)
    assert b["share"]["Redis save"] == pytest.approx(6 / 60, abs=1e-3)
    assert sum(b["share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_readme_table_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nrest\n")
    assert update_readme(readme, "| new |\n")
    assert readme.read_text() == "intro\n<!-- bench:begin -->\n| new |\n<!-- bench:end -->\nrest\n"
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| new |\n") and plain.read_text() == "no markers\n"
