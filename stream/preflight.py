"""Checks ``tagger worker`` runs before Faust starts, and the probes they use.

The usual start-up mistakes (the web port taken, no broker at ``TAGGER_KAFKA``, no current
model) otherwise surface as 30-40-line Faust tracebacks with exit 1. Found here first, each is
one ``StreamError``/``ArtifactError`` line, which the CLI prints as ``error:`` with exit 2 like
every other command. A Redis that does not answer is only a warning: the worker runs without
it (sessions stay in memory) and reports it on ``/readyz``.

The probes (``wait_for_kafka``, ``wait_until``, ``run_sync``) are public: the embedded stack
and the tests wait for a broker with the same code (``stream.tools.processes`` re-exports
them beside its process helpers).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from stream.errors import StackError, StreamError
from stream.settings import Settings, kafka_client_kwargs
from trainer.errors import ArtifactError

log = logging.getLogger("tagger.worker")


def check_web_port(settings: Settings) -> None:
    """The worker's web server (``/metrics``, ``/healthz``, ``/readyz``) can bind its port."""
    if settings.web_port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in settings.metrics_host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds it
        try:
            s.bind((settings.metrics_host, settings.web_port))
        except OSError as exc:
            why = "is in use (another worker?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise StreamError(f"TAGGER_WEB_PORT: port {settings.web_port} on {settings.metrics_host} {why}; "
                              f"set TAGGER_WEB_PORT to a free port, or 0 to turn the web server off") from None


def check_model(artifacts_dir: Path) -> str:
    """A current model exists, loads, and labels an event through the live path; its version."""
    from stream.model_holder import smoke_check
    from trainer.artifacts import POINTER, load_artifact

    root = Path(artifacts_dir)
    if not (root / POINTER).is_file():
        raise ArtifactError(f"no current model in {root.resolve()} (TAGGER_ARTIFACTS): train one and "
                            f"run `tagger promote MODEL_DIR`, or run `tagger demo`, which trains one")
    lm = load_artifact(root)
    smoke_check(lm)
    return lm.version


def check_broker(settings: Settings, timeout_s: float) -> None:
    """A Kafka broker answers a metadata request at ``TAGGER_KAFKA`` within ``timeout_s``."""
    first = min(timeout_s, 3.0)
    try:
        try:
            wait_for_kafka(settings, timeout_s=first)
        except StackError:
            if timeout_s <= first:
                raise
            # say why nothing happens for a while (a broker that is still starting, or none)
            print(f"waiting up to {timeout_s - first:g} s more for a Kafka broker at {settings.kafka} "
                  f"(TAGGER_KAFKA) ...", file=sys.stderr, flush=True)
            wait_for_kafka(settings, timeout_s=timeout_s - first)
    except StackError as exc:
        raise StreamError(f"no Kafka broker answers at {settings.kafka} (TAGGER_KAFKA) within "
                          f"{timeout_s:g} s; start one (`eval \"$(tagger stack up)\"`) or set TAGGER_KAFKA"
                          f"{_last_error(exc)}") from None


def check_redis(settings: Settings) -> None:
    from stream.redis_client import answers
    from stream.settings import redact_url
    if not answers(settings.redis_url):
        log.warning("no Redis answers at %s (TAGGER_REDIS): sessions stay in this worker's memory "
                    "until it does (/readyz reports it)", redact_url(settings.redis_url))


def check_worker(settings: Settings, *, broker_timeout_s: float) -> str:
    """Every check; returns the version of the model that will be served. The port is checked
    last, right before Faust binds it, to keep the window small in which a second worker
    started at the same moment can take it (then Faust's own error is all there is)."""
    version = check_model(settings.artifacts_dir)
    check_broker(settings, broker_timeout_s)
    check_redis(settings)
    check_web_port(settings)
    return version


def _last_error(exc: Exception) -> str:
    text = str(exc)
    marker = "(last error: "
    return f" (last error: {text.split(marker, 1)[1].split(chr(10))[0]}" if marker in text else ""


def wait_for_kafka(target: Settings | str, timeout_s: float = 30.0,
                   process: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    """Block until the broker answers a metadata request, else raise ``StackError``."""
    kwargs = kafka_client_kwargs(target) if isinstance(target, Settings) else {
        "bootstrap_servers": target}

    async def probe():
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(request_timeout_ms=2000, **kwargs)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()

    def check():
        # A plain TCP connect first: aiokafka logs every refused connection at ERROR level,
        # which would litter `tagger stack up` output while the broker is still starting.
        host, _, port = kwargs["bootstrap_servers"].split(",")[0].strip().rpartition(":")
        socket.create_connection((host, int(port)), timeout=2).close()
        run_sync(probe())

    wait_until(check, f"Kafka at {kwargs['bootstrap_servers']}", timeout_s, process, log)


def wait_until(check: Callable[[], Any], what: str, timeout_s: float,
               process: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    """Call ``check`` every 0.1 s until it returns without raising; ``StackError`` (with the
    tail of ``log``) when ``timeout_s`` passes or ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode} during start-up"
                             f"{log_tail(log)}")
        try:
            check()
            return
        except Exception as exc:  # not up yet: connection refused, timeout, ...
            last = exc
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout_s:.0f} s "
                             f"(last error: {last!r}){log_tail(log)}")
        time.sleep(0.1)


def log_tail(log: Optional[Path], lines: int = 15) -> str:
    """The last ``lines`` of a log file, headed, for an error message ("" without one)."""
    if log is None or not Path(log).exists():
        return ""
    tail = Path(log).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(tail)


def run_sync(coro):
    """Run a coroutine to completion from sync code, even when a loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")
