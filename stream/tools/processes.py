"""Child processes for the tools and the tests: one worker launcher, one way to stop a child.

    WorkerProcess.start(settings, log)   a `tagger worker` subprocess (or `faust -A APP worker`)
    worker_env(settings)                 the environment a worker child gets
    stop_process(proc)                   SIGTERM, wait, then SIGKILL of its process group
    metric_value(text, 'name{k="v"}')    one sample of a /metrics page (0.0 when absent)
    free_port()                          a free loopback TCP port
    die_with_parent()                    a preexec_fn: the child gets SIGTERM when we die (Linux)
    wait_until(check, what, timeout_s)   poll until ``check`` passes (from ``stream.preflight``)
    run_sync(coro)                       run a coroutine from sync code (from ``stream.preflight``)

``tagger demo``, ``tagger bench``, ``tagger chaos`` and the test fixtures start their workers
here, so each child is started, waited for and stopped the same way: its own process group
(Ctrl-C in a terminal reaches the parent, which decides the shutdown order), killed with its
parent on Linux, stopped with SIGTERM (Faust's clean shutdown, ~1-2 s) and then SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from stream.errors import StackError
from stream.preflight import run_sync, wait_until
from stream.settings import Settings

__all__ = ["WorkerProcess", "worker_env", "stop_process", "free_port", "die_with_parent",
           "wait_until", "run_sync", "http_get", "metric_value", "REPO_ROOT"]

# The source tree this module runs from: children import the same code (a git worktree or a
# checkout that is not installed) through PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread dies (Linux; else None).

    Used for every process a test or a tool starts, so that a killed parent leaves nothing.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no imports in the child

    def hook():
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> Optional[int]:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL its process group (a child started with
    ``start_new_session``) or the process alone. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
    return proc.returncode


def kill_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGKILL the process group ``proc`` leads (the process alone if it leads none)."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait(wait_s)


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """(status, body) of ``GET http://127.0.0.1:PORT/PATH``; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def metric_value(text: str, selector: str) -> float:
    """The value of the sample ``selector`` (``name`` or ``name{label="value",...}``, labels
    exactly as exported) in Prometheus text ``text``; 0.0 when it is not there. Parsed with
    ``prometheus_client.parser``."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = selector.partition("{")
    want = {}
    if rest:
        # the selector's labels, read by the same parser as a one-line exposition
        (family,) = text_string_to_metric_families(f"x{{{rest} 0\n")
        want = family.samples[0].labels
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == want:
                return float(sample.value)
    return 0.0


def worker_env(settings: Settings, env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment without its own ``TAGGER_*`` variables, then ``settings``
    as variables, ``PYTHONPATH`` starting with this source tree, then ``env``."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("TAGGER_")}
    child.update(settings.to_env())
    child["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [child.get("PYTHONPATH")])])
    child.update(env or {})
    return child


class WorkerProcess:
    """One worker subprocess with its log file and web port (``settings.web_port``)."""

    def __init__(self, proc: subprocess.Popen, log: Path, port: int = 0,
                 workdir: Optional[Path] = None):
        self.proc, self.log, self.port = proc, log, port
        self._own_workdir = workdir   # removed by stop()
        self.started = time.time()

    @classmethod
    def start(cls, settings: Settings, log: Path, *, app: Optional[str] = None,
              args: Sequence[str] = (), verbose: bool = False, module: str = "tagger.cli",
              cwd: Optional[Path] = None,
              env: Optional[dict[str, str]] = None, full_env: Optional[dict[str, str]] = None,
              append: bool = False) -> "WorkerProcess":
        """Start ``tagger [-v] worker`` (``python -m MODULE``; or, with ``app``,
        ``faust -A APP worker ARGS``).

        The child gets ``worker_env(settings, env)`` (or exactly ``full_env``), runs in ``cwd``
        (Faust writes ``<app_id>-data/`` there; default: a fresh temporary folder, removed by
        ``stop``) and writes stdout and stderr to ``log`` (``append``: after what is there)."""
        if app is None:
            cmd = [sys.executable, "-m", module, *(["-v"] if verbose else []), "worker", *args]
        else:
            cmd = [sys.executable, "-m", "faust", "-A", app, "worker", *args]
        own = None
        if cwd is None:
            import tempfile
            cwd = own = Path(tempfile.mkdtemp(prefix="tagger-worker-"))
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab" if append else "wb") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=full_env if full_env is not None else worker_env(settings, env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent())
        return cls(proc, log, settings.web_port, own)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def metrics(self) -> str:
        """The worker's ``/metrics`` text ("" when it does not answer)."""
        status, body = http_get(self.port, "/metrics")
        return body.decode(errors="replace") if status == 200 else ""

    def ready(self) -> bool:
        return http_get(self.port, "/readyz", 1.0)[0] == 200

    def wait_ready(self, timeout_s: float = 90.0) -> float:
        """Until ``/readyz`` answers 200 (model loaded, partitions assigned, Redis up); seconds
        taken. ``StackError`` with the log's tail if it exits or times out first."""
        return self._wait(self.ready, "ready (/readyz)", timeout_s)

    def wait_logged(self, text: str, timeout_s: float = 60.0) -> float:
        """Until ``text`` appears in the log (Faust's ``[^Worker]: Ready``: partitions assigned)."""
        return self._wait(lambda: text in self.log_text(), f"ready ({text!r} in its log)", timeout_s)

    def _wait(self, check, what: str, timeout_s: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if check():
                return time.monotonic() - start
            if not self.alive:
                raise StackError(f"worker exited with {self.proc.returncode} before it was {what}:\n"
                                 f"{self.tail()}")
            time.sleep(0.1)
        raise StackError(f"worker not {what} after {timeout_s:.0f} s:\n{self.tail()}")

    def kill9(self) -> None:
        kill_group(self.proc)

    def stop(self, timeout_s: float = 20.0) -> Optional[int]:
        """SIGTERM, then SIGKILL of its process group after ``timeout_s``; its exit code."""
        code = stop_process(self.proc, timeout_s)
        if self._own_workdir is not None:
            shutil.rmtree(self._own_workdir, ignore_errors=True)
        return code
