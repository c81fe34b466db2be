"""``celery -A <app> audit ...`` in the app layouts users have (tasks in ``include=``, in the
``imports`` setting, autodiscovered from packages; the app given as ``proj`` or
``proj.celery:app``), against real, uninstrumented workers and real result backends, and a
replay from a plain CLI that still records its trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.audit import AuditError, _publishing
from otel_celery_publish.config import Settings
from tests.audit_support import ago, cli, migrated, one_line_error, row, seed, stored, validated
from tests.conftest import BIN, BROKER, ROOT
from tests.otlp_receiver import Receiver, wait_for

LAYOUTS = Path(__file__).resolve().parent / "layouts"
# The OTLP span kind on the wire (opentelemetry.proto.trace.v1.Span.SpanKind).
SPAN_KIND_PRODUCER = 4


@dataclass
class Audited:
    """This test process publishing on the record into a table of its own."""

    settings: Settings
    exporter: InMemorySpanExporter

    def env(self) -> dict[str, str]:
        return {
            "OTEL_CELERY_PUBLISH_AUDIT_URL": self.settings.audit_url,
            "OTEL_CELERY_PUBLISH_TABLE_NAME": self.settings.table_name,
        }


@pytest.fixture
def audited(pg_url: str) -> Iterator[Audited]:
    """Publishes from this process get a row in a fresh table and a span in memory."""
    settings = migrated(pg_url, f"audit_{uuid.uuid4().hex[:10]}")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(tracer_provider=provider, settings=settings, flush_interval=0.05)
    yield Audited(settings, exporter)
    instrumentor.uninstrument()


@pytest.fixture
def queues(queue_name: str) -> Iterator[tuple[str, str]]:
    """A queue a worker consumes and one nobody does; both deleted from Redis afterwards."""
    names = (f"{queue_name}-work", f"{queue_name}-stranded")
    yield names
    redis.Redis.from_url(BROKER).delete(*names)


def project_env(backend: str | None = None, **extra: str) -> dict[str, str]:
    """A subprocess in the layouts' directory: no OpenTelemetry set up from the environment
    (every ``OTEL_*`` of this process dropped, our own settings aside)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") or k.startswith("OTEL_CELERY_PUBLISH_")
    }
    return {
        **env,
        "PYTHONPATH": str(LAYOUTS),
        "OCP_BROKER_URL": BROKER,
        "OCP_RESULT_BACKEND": backend or "",
        **extra,
    }


def audit_cli(
    app: str, *args: str, env: dict[str, str], cwd: Path = LAYOUTS
) -> subprocess.CompletedProcess[str]:
    """``celery -A app audit ARGS`` (no ``-A`` if ``app`` is empty) run from ``cwd``, as an
    operator runs it from the project's directory."""
    return subprocess.run(
        [str(BIN / "celery"), *(["-A", app] if app else []), "audit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def start_project_worker(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``celery -A app worker`` for a layout, not instrumented (the workers ``--check-results``
    is for); stopped at teardown. Returns the worker's log file."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(app: str, queue: str, env: dict[str, str]) -> Path:
        log = tmp_path / f"worker-{len(procs)}.log"
        cmd = [str(BIN / "celery"), "-A", app, "worker", "-P", "solo", "-Q", queue]
        cmd += ["-n", f"ocp-{uuid.uuid4().hex[:8]}@localhost", "-l", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=LAYOUTS,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return log

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def finished(backend: str, task_ids: list[str], log: Path) -> dict[str, Any]:
    """Wait until the result backend holds a result for each task id; their results."""
    client = Celery("ocp_layout_results", broker=BROKER, backend=backend, set_as_current=False)
    try:
        results = [client.AsyncResult(task_id) for task_id in task_ids]
        try:
            wait_for(lambda: all(r.state == "SUCCESS" for r in results), 30, "results")
        except AssertionError:
            raise AssertionError(log.read_text(errors="replace")) from None
        return {r.id: r.result for r in results}
    finally:
        client.close()


LAYOUT_CASES = [
    pytest.param("include_app.app", "include_app.tasks.add", "redis", id="include"),
    pytest.param("imports_app.celery_app", "imports_app.jobs.add", "redis", id="imports"),
    pytest.param("proj", "proj.orders.tasks.add", "redis", id="autodiscover-package"),
    pytest.param("proj.celery:app", "billing.total", "redis", id="autodiscover-module-app"),
    pytest.param("include_app.app", "include_app.tasks.add", "postgresql", id="db-postgresql"),
    pytest.param("include_app.app", "include_app.tasks.add", "sqlite", id="db-sqlite"),
]


def result_backend(kind: str, pg_url: str, tmp_path: Path) -> str:
    """Redis, or Celery's SQLAlchemy database backend on PostgreSQL (psycopg 3) or SQLite."""
    if kind == "postgresql":
        return "db+" + pg_url
    if kind == "sqlite":
        return f"db+sqlite:///{tmp_path / 'results.db'}"
    return BROKER


@pytest.mark.parametrize(("app", "task", "backend_kind"), LAYOUT_CASES)
def test_check_results_and_replay_in_each_layout(
    audited: Audited,
    queues: tuple[str, str],
    start_project_worker: Callable[..., Path],
    pg_url: str,
    tmp_path: Path,
    app: str,
    task: str,
    backend_kind: str,
) -> None:
    """A worker of the layout's app finished two tasks, a third is stranded: ``lost
    --check-results`` keeps exactly the stranded one, and ``replay`` sends it (the CLI sees
    the tasks its task modules define) to the worker, which runs it."""
    work, stranded = queues
    backend = result_backend(backend_kind, pg_url, tmp_path)
    env = project_env(backend, **audited.env())
    log = start_project_worker(app, work, env)
    client = Celery("ocp_layout_client", broker=BROKER, set_as_current=False)
    done = [client.send_task(task, (n, 1), queue=work).id for n in (1, 2)]
    lost_id = client.send_task(task, (6, 7), queue=stranded).id
    client.close()
    assert finished(backend, done, log) == {done[0]: 2, done[1]: 3}
    for task_id in [*done, lost_id]:
        wait_for(lambda t=task_id: stored(audited.settings, task_id=t)[0]["sent_at"], 10)

    everything = audit_cli(app, "lost", "--older-than", "0s", "--json", env=env)
    assert everything.returncode == 0, everything.stderr
    assert {t["task_id"] for t in validated("lost", everything.stdout)} == {*done, lost_id}
    checked = audit_cli(app, "lost", "--older-than", "0s", "--check-results", "--json", env=env)
    assert checked.returncode == 0, checked.stderr
    kept = [(t["task_id"], t["result_state"]) for t in validated("lost", checked.stdout)]
    assert kept == [(lost_id, "PENDING")]

    replayed = audit_cli(app, "replay", lost_id, "--queue", work, "--yes", "--json", env=env)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    [result] = validated("replay", replayed.stdout)["results"]
    assert result["status"] == "sent", result
    assert finished(backend, [result["new_task_id"]], log) == {result["new_task_id"]: 13}
    [original] = stored(audited.settings, task_id=lost_id)
    [again] = stored(audited.settings, task_id=result["new_task_id"])
    assert (again["replay_of"], again["task_name"]) == (original["publish_id"], task)


@pytest.mark.parametrize("found_by", ["include", "autodiscover"])
def test_a_task_module_that_fails_to_import(audited: Audited, found_by: str) -> None:
    """replay and --check-results: one ``Error:`` line naming the module and its cause, exit
    1; a command that reads only the table still works, with one warning line."""
    env = project_env(BROKER, OCP_BROKEN_BY=found_by, **audited.env())
    cause = "broken.pkg.tasks: ModuleNotFoundError: No module named 'ocp_not_installed'"
    for args in (["replay", "any-task-id", "--yes"], ["lost", "--check-results"]):
        failed = audit_cli("broken.app", *args, env=env)
        one_line_error(failed.stderr, failed.returncode, cause)
        assert failed.stdout == ""
    table_only = audit_cli("broken.app", "lost", "--json", env=env)
    assert table_only.returncode == 0, table_only.stderr
    assert validated("lost", table_only.stdout) == []
    [warning] = table_only.stderr.splitlines()
    assert warning.startswith("Warning: ") and cause in warning


def test_the_table_commands_need_no_app(audited: Audited) -> None:
    """Without ``-A``, the commands that read only the audit table work as before; the ones
    that publish or read results say they need ``-A`` (celery would otherwise hand them its
    default app, on amqp://localhost, that knows none of the project's tasks)."""
    env = project_env(**audited.env())
    env.pop("CELERY_APP", None)
    found = audit_cli("", "lost", "--json", env=env)
    assert (found.returncode, found.stderr) == (0, "")
    assert validated("lost", found.stdout) == []
    for args in (["replay", f"no-app-{uuid.uuid4().hex}", "--yes"], ["lost", "--check-results"]):
        refused = audit_cli("", *args, env=env)
        one_line_error(refused.stderr, refused.returncode, "celery -A proj audit")
        assert refused.stdout == ""


@pytest.mark.parametrize("exported", [True, False], ids=["otlp", "no-exporter"])
def test_plain_cli_replay_records_its_trace(
    audited: Audited, receiver: Receiver, queues: tuple[str, str], exported: bool
) -> None:
    """``celery -A tests.app audit replay`` without opentelemetry-instrument or an SDK in
    code: the new row gets a trace id and span id, and with an OTLP endpoint in the
    environment the collector gets the producer span, linked to the original span."""
    stranded, rerouted = queues
    client = Celery("ocp_layout_client", broker=BROKER, set_as_current=False)
    task_id = client.send_task("tests.add", (2, 3), queue=stranded).id
    client.close()
    [original] = wait_for(lambda: stored(audited.settings, task_id=task_id), 10)
    telemetry = {
        "OTEL_SERVICE_NAME": f"ocp-replay-{uuid.uuid4().hex[:6]}",
        # Silences the warning that the official instrumentation is installed and kept off.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "celery",
    }
    if exported:
        telemetry |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # type: ignore[attr-defined]
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    env = project_env(PYTHONPATH=str(ROOT), **audited.env(), **telemetry)
    replayed = audit_cli(
        "tests.app", "replay", task_id, "--queue", rerouted, "--yes", "--json", env=env, cwd=ROOT
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stderr == ""
    [result] = json.loads(replayed.stdout)["results"]
    [again] = stored(audited.settings, task_id=result["new_task_id"])
    assert again["replay_of"] == original["publish_id"]
    assert len(again["trace_id"] or "") == 32 and int(again["trace_id"], 16) != 0, again
    assert len(again["span_id"] or "") == 16 and int(again["span_id"], 16) != 0, again
    assert again["trace_id"] != original["trace_id"]
    if not exported:
        return
    # The CLI flushed before it exited: the span is there already, no waiting.
    [span] = receiver.find(lambda s: s.span_id == again["span_id"])
    assert (span.trace_id, span.kind, span.service) == (
        again["trace_id"], SPAN_KIND_PRODUCER, telemetry["OTEL_SERVICE_NAME"],
    )  # fmt: skip
    assert span.links == [(original["trace_id"], original["span_id"])]
    [first] = [s for s in audited.exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert f"{first.context.span_id:016x}" == original["span_id"]


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("rpc://", "needs a result backend that stores results; rpc:// does not"),
        ("nosuch://somewhere", "result backend error: No module named 'nosuch'"),
        ("redis://127.0.0.1:1/0", "result backend error: Error 111 connecting to 127.0.0.1:1"),
    ],
    ids=["rpc", "unknown-scheme", "unreachable"],
)
def test_check_results_with_a_backend_it_cannot_read(
    tmp_path: Path, backend: str, expected: str
) -> None:
    """rpc:// (results only their publisher sees), an unknown scheme, a backend that does not
    answer: one ``Error:`` line, exit 1, before any table is printed."""
    settings = migrated(f"sqlite:///{tmp_path / 'audit.db'}")
    seed(settings, row(sent_at=ago(20)))
    app = Celery("ocp_backend", broker=BROKER, backend=backend, set_as_current=False)
    try:
        result = cli("lost", "--check-results", settings=settings, app_=app)
    finally:
        app.close()
    one_line_error(result.stderr, result.exit_code, expected)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["grpc"]),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ["http"],
        ),
        ({"OTEL_TRACES_EXPORTER": "console,otlp_proto_http"}, ["console", "http"]),
    ],
    ids=["nothing", "none", "endpoint", "traces-protocol-wins", "list"],
)
def test_replay_exporters_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: list[str]
) -> None:
    """The replay's own span exporters follow OTEL_TRACES_EXPORTER and the OTLP protocol
    variables; with neither an exporter nor an endpoint named, there is none."""
    for name in list(os.environ):
        if name.startswith("OTEL_") and not name.startswith("OTEL_CELERY_PUBLISH_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    kinds = {
        ConsoleSpanExporter: "console",
        GrpcSpanExporter: "grpc",
        HttpSpanExporter: "http",
    }
    exporters = _publishing._span_exporters()
    try:
        assert [kinds[type(e)] for e in exporters] == expected
    finally:
        for exporter in exporters:
            exporter.shutdown()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin_json"}, "names 'zipkin_json': no such span exporter"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "names 'otlp' over protocol 'http/json': no such span exporter",
        ),
    ],
)
def test_replay_refuses_an_exporter_it_cannot_build(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    """An exporter name or OTLP protocol nothing installed provides: an AuditError saying so."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AuditError, match=expected):
        _publishing._span_exporters()


def test_exporters_built_before_one_that_fails_are_shut_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_TRACES_EXPORTER=otlp_proto_http,zipkin_json: the HTTP exporter already built (its
    session) is shut down when the second cannot be, not left to a long-lived process."""
    shut: list[object] = []

    def shutdown(self: HttpSpanExporter) -> None:
        shut.append(self)

    monkeypatch.setattr(HttpSpanExporter, "shutdown", shutdown)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp_proto_http,zipkin_json")
    with pytest.raises(AuditError, match="names 'zipkin_json'"):
        _publishing._span_exporters()
    assert [type(e) for e in shut] == [HttpSpanExporter]
