"""The Dockerfile and .dockerignore, checked without a Docker engine.

The instructions are parsed (continuation lines joined, ``ARG`` defaults substituted) and
checked for what the issue asks of the image: Python 3.11 slim, CPU-only PyTorch, the package
installed from this repository, a non-root user, a health check on ``/healthz``, ``tagger
worker`` by default, and settings that match the worker's and docker-compose.yml's. Every
``COPY`` source must exist and survive .dockerignore. The health check command itself runs
against a live worker in test_live_prometheus.py.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex

import pytest

from stream.settings import Settings
from tests.monitoring.files import DOCKERFILE, DOCKERIGNORE, REPO, compose, mounts

SETTINGS_VARS = {f.metadata["env"] for f in dataclasses.fields(Settings)}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out, args = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        rest = rest.strip()
        if op.upper() == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        out.append((op.upper(), rest))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def env_of(stage) -> dict[str, str]:
    env = {}
    for op, rest in stage:
        if op == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def ignored(path: str) -> bool:
    """Whether .dockerignore excludes ``path`` (Docker's rules: last match wins, ``!`` re-includes)."""
    verdict = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.replace("**/", "")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates):
            verdict = not negate
    return verdict


def test_python_311_slim_multi_stage():
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    assert any(op == "COPY" and rest.startswith("--from=build") for op, rest in final_stage())


def test_cpu_torch_then_the_package():
    runs = [rest for op, rest in instructions() if op == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    pinned = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"torch=={pinned}" in runs[torch], "the image's torch must satisfy pyproject.toml's pin"
    package = next(i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r))
    assert torch < package, "CPU torch must be installed before `pip install .` resolves torch"


def test_non_root_user_healthcheck_and_worker_command():
    stage = final_stage()
    users = [rest for op, rest in stage if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    health = [rest for op, rest in stage if op == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "TAGGER_WEB_PORT" in health[0]
    cmd = [rest for op, rest in stage if op == "CMD"][-1]
    assert json.loads(cmd) == ["tagger", "worker"]
    exposed = [rest for op, rest in stage if op == "EXPOSE"]
    assert exposed == [env_of(stage)["TAGGER_WEB_PORT"]]


def test_image_settings_are_worker_settings_and_match_compose():
    env = env_of(final_stage())
    tagger = {k: v for k, v in env.items() if k.startswith("TAGGER_")}
    assert set(tagger) <= SETTINGS_VARS, set(tagger) - SETTINGS_VARS
    settings = Settings.from_env(tagger)
    assert settings.metrics_host == "0.0.0.0", "reachable from outside the container"
    worker = compose()["services"]["worker"]
    assert mounts(worker)[str(settings.artifacts_dir)] == "artifacts"
    assert str(settings.web_port) == worker["environment"]["TAGGER_WEB_PORT"]


def test_copy_sources_exist_and_are_not_ignored():
    copies = [rest for op, rest in instructions() if op == "COPY" and not rest.startswith("--from")]
    assert copies
    for rest in copies:
        sources = rest.split()[:-1]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "tests/conftest.py", "runs/x.csv",
                                  "artifacts/current", "stream/__pycache__/app.cpython-311.pyc",
                                  "tagger-demo-1234-data/x"])
def test_dockerignore_keeps_local_state_out(path):
    assert ignored(path)


def test_the_package_sources_go_in():
    for path in ("pyproject.toml", "README.md", "stream/app.py", "stream/schemas", "trainer/cli.py",
                 "tagger/cli.py", "stream/tools/stack.py"):
        assert not ignored(path), path
