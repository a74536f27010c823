"""``tagger worker`` start-up mistakes: one ``error:`` line and exit 2, like every other command.

Each case runs the real command in a subprocess, as a user would, and checks what they see:
the exit status, a single stderr line naming what is wrong and where, and no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import serving_root
from stream.tools.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    child = {k: v for k, v in os.environ.items() if not k.startswith("TAGGER_")}
    child.update(PYTHONPATH=str(REPO_ROOT), TAGGER_KAFKA_WAIT_S="2", **env)
    return subprocess.run([sys.executable, "-m", "tagger.cli", "worker"], cwd=tmp_path, env=child,
                          capture_output=True, text=True, timeout=120)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("tagger worker: error: ")
    return lines[0]


def test_no_current_model(tmp_path):
    empty = tmp_path / "artifacts"
    line = one_error_line(run_worker(tmp_path, TAGGER_ARTIFACTS=str(empty), TAGGER_WEB_PORT="0"))
    assert "no current model" in line and str(empty) in line and "tagger promote" in line


@pytest.mark.integration
def test_web_port_in_use(tmp_path, tiny_model, services):
    with socket.socket() as taken:   # another worker (or anything) holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run_worker(tmp_path, TAGGER_WEB_PORT=str(port), TAGGER_KAFKA=services.kafka,
                                         TAGGER_ARTIFACTS=str(serving_root(tmp_path, tiny_model))))
    assert f"port {port}" in line and "in use" in line and "TAGGER_WEB_PORT" in line


def test_no_broker(tmp_path, tiny_model):
    nobody = free_port()  # nothing listens here
    line = one_error_line(run_worker(tmp_path, TAGGER_KAFKA=f"127.0.0.1:{nobody}", TAGGER_WEB_PORT="0",
                                     TAGGER_ARTIFACTS=str(serving_root(tmp_path, tiny_model))))
    assert f"127.0.0.1:{nobody}" in line and "TAGGER_KAFKA" in line
