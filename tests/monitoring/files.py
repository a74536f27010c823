"""Readers for the deployment files under test: monitoring/, docker-compose.yml, Dockerfile.

Small parsers shared by the tests: the dashboard's queries, the alert rules, the metric
selectors inside a PromQL expression, and Docker Compose's variable interpolation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Mapping

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
ALERTS_TEST_YML = MONITORING / "alerts.test.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD_JSON = GRAFANA / "dashboards" / "tagger.json"
COMPOSE_YML = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PRODUCTION_MD = MONITORING / "PRODUCTION.md"
WORKER_JOB = "tagger-worker"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))


def dashboard_targets() -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of every panel, rows' nested panels included."""
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for panel in walk(dashboard()["panels"]):
        for t in panel.get("targets", []):
            yield panel, t


def grafana_to_promql(expr: str, rate_interval: str = "20s") -> str:
    """The query Grafana would send with every worker selected ("All" is ``.*``)."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
            .replace("$__range", "5m").replace("$instance", ".*"))


# --------------------------------------------------------------------------- alerts

def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]
            if "alert" in rule]


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def selectors(expr: str) -> list[str]:
    """The metric selectors (``name{matchers}``) of a PromQL expression, in order, unique."""
    seen = []
    for name, matchers in _SELECTOR.findall(expr):
        sel = f"{name}{{{matchers}}}"
        if sel not in seen:
            seen.append(sel)
    return seen


def metric_family(name: str) -> str:
    """``tagger_events_total`` -> ``tagger_events``; histogram series -> the histogram."""
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- compose

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: Mapping[str, str]):
    """Docker Compose's interpolation of ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}`` and ``$$`` (a literal ``$``), applied to every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            if not env.get(name):
                raise KeyError(f"{name} is required: {default}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Every ``${VAR...}`` the compose file reads from the environment, with its default."""
    out: dict[str, str | None] = {}
    for m in _VAR.finditer(text.replace("$$", "")):
        name = m.group(1) or m.group(4)
        out.setdefault(name, m.group(3) if m.group(2) else None)
    return out


def compose(env: Mapping[str, str] | None = None) -> dict:
    """docker-compose.yml as Compose sees it: anchors merged, variables interpolated."""
    return interpolate(load_yaml(COMPOSE_YML), env or {})


def env_list(environment) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list) as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def mounts(service: dict) -> dict[str, str]:
    """A service's ``volumes`` (short syntax) as {container path: source}; a source is a named
    volume, or a host path starting with ``.`` or ``/``."""
    out = {}
    for item in service.get("volumes", []):
        parts = item.split(":")
        source, target = parts[0], parts[1]
        out[target] = source
    return out


def shell_script(service: dict) -> str | None:
    """The script of a ``sh -c SCRIPT`` / ``bash -c SCRIPT`` command, if the service has one."""
    entry = service.get("entrypoint") or []
    cmd = service.get("command") or []
    argv = (entry if isinstance(entry, list) else [entry]) + (cmd if isinstance(cmd, list) else [cmd])
    for i, arg in enumerate(argv[:-1]):
        if arg == "-c" and i > 0 and Path(argv[i - 1]).name in ("sh", "bash"):
            return argv[i + 1]
    return None
