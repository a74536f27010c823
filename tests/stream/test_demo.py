"""``tagger demo`` run headless, as CI or `| tee` would: progress lines, not silence, and the
pictures in its folder.

One real run: a small model is trained (no model is current), a worker starts on the test
broker and Redis, a few held-out sessions are replayed, and the summary is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from stream.tools.demo import PROGRESS_S

REPO_ROOT = Path(__file__).resolve().parents[2]
SLACK_S = 4.0   # a loaded CI machine may print a heartbeat late


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_headless_demo_prints_progress_and_writes_its_pictures(tmp_path, services):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGGER_")}
    env.update(services.base.to_env())   # the test broker and Redis
    env.update(PYTHONPATH=str(REPO_ROOT), TAGGER_ARTIFACTS=str(tmp_path / "artifacts"))
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagger.cli", "demo", "--sessions", "4", "--train-sessions", "40",
         "--rate", "100", "--workdir", str(workdir), "--json", str(tmp_path / "summary.json")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []   # (when it arrived, line)
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    err = proc.stderr.read()
    assert proc.wait(540) == 0, err[-3000:]
    reader.join()
    text = "".join(line for _, line in lines)

    # plain lines for a log: no carriage returns, no terminal escapes
    assert "\r" not in text and "\x1b[" not in text
    # where it writes is said up front
    assert f"demo folder: {workdir}" in text and str(tmp_path / "artifacts") in text
    # from the start of training until the worker is ready, a line at least every PROGRESS_S
    start = next(i for i, (_, line) in enumerate(lines) if "training a" in line)
    end = next(i for i, (_, line) in enumerate(lines) if "worker ready" in line)
    gaps = [b[0] - a[0] for a, b in zip(lines[start:end], lines[start + 1:end + 1])]
    assert max(gaps) <= PROGRESS_S + SLACK_S, (max(gaps), text[-2000:])
    if lines[end][0] - lines[start][0] > 2 * PROGRESS_S:
        assert re.search(r"training: \d+ s elapsed", text), text

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["events_without_final"] == 0
    # labels that changed between the first and the final record are counted as revisions
    # (under the stable policy that happens at finality, in the final record itself)
    if summary["first_accuracy"] != summary["final_accuracy"]:
        assert summary["revisions"] > 0
    assert json.loads((workdir / "summary.json").read_text()) == summary
    names = {Path(p).name for p in summary["plots"]}
    assert "latency.png" in names and any("timeline" in n for n in names), names
    for name in names:
        with Image.open(workdir / name) as im:
            assert im.format == "PNG" and im.width > 400
