"""Fixtures for the monitoring tests: a trained model and a real Prometheus server.

``prometheus_server(config)`` starts Debian's ``prometheus`` binary (``.ci/run`` installs it)
on a free loopback port with its own config file and data folder, waits until it is ready and
stops it at teardown. It never uses a Prometheus that may already run on the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from stream.tools.processes import die_with_parent, free_port, stop_process


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: install Debian's prometheus package "
                    f"(apt-get install -y prometheus; .ci/run does it)", pytrace=False)
    return path


@dataclass
class PrometheusServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> dict:
        """``/api/v1/query``; returns the JSON answer (errors come back as status "error")."""
        try:
            return self.api("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def prometheus_server(tmp_path) -> Callable[[dict], PrometheusServer]:
    """``start(config: dict) -> PrometheusServer``; the config is written as YAML."""
    binary = require_binary("prometheus")
    started: list[PrometheusServer] = []

    def start(config: dict, timeout_s: float = 30.0) -> PrometheusServer:
        folder = tmp_path / f"prometheus-{len(started) + 1}"
        (folder / "data").mkdir(parents=True)
        cfg = folder / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log = folder / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
                 "--storage.tsdb.retention.time=1h", "--log.level=info"],
                cwd=folder, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent())
        server = PrometheusServer(f"http://127.0.0.1:{port}", proc, log)
        started.append(server)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{server.log_text()[-3000:]}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {timeout_s:.0f} s:\n{server.log_text()[-3000:]}",
                            pytrace=False)
            time.sleep(0.2)

    yield start
    for server in started:
        stop_process(server.proc, 15)
