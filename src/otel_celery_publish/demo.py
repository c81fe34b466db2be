"""``make demo``: the whole story on embedded defaults - no Docker, no servers.

A worker process and this publisher share a kombu *filesystem* broker in a temporary directory,
the audit table is SQLite, and every process writes its spans to JSON-lines files that this
script reads back and draws as timelines. It publishes a few tasks (success, countdown, failure,
retry, one routed to a queue nobody consumes), draws each trace, then runs the real
``celery -A otel_celery_publish.demo audit ...`` commands: ``lost`` finds the stranded task,
``replay`` re-sends it to the consumed queue, where it succeeds, ``stats`` reports latency
percentiles and ``show`` the history of the replayed task. It ends with the commands to try next
on the run's own database, ready to paste.

The demo keeps opentelemetry-instrumentation-celery (which the dev extras install) off with
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=celery``, for itself and its worker: otherwise its first
line would be our warning that the official instrumentation is installed and kept off, about
something the reader did not do.

Run: ``python -m otel_celery_publish.demo`` (set ``OTEL_EXPORTER_OTLP_ENDPOINT`` to also export
over OTLP/HTTP to a collector).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from sqlalchemy import create_engine, select

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.timeline import Bar, render

DEMO_DIR = Path(os.environ.get("OCP_DEMO_DIR") or tempfile.gettempdir()) / "otel-celery-demo"
QUEUE, NOBODY = "demo", "nobody-consumes-this"
DISABLED = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"


def _make_app() -> Celery:
    broker_dir = DEMO_DIR / "broker"
    app = Celery("demo", broker="filesystem://", set_as_current=True)
    app.conf.update(
        broker_transport_options={
            "data_folder_in": str(broker_dir),
            "data_folder_out": str(broker_dir),
            "control_folder": str(broker_dir / "control"),
            "processed_folder": str(DEMO_DIR / "processed"),
            "store_processed": False,
            "polling_interval": 0.05,
        },
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
    )
    return app


app = _make_app()


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo.charge")
def charge(customer: str, card_token: str) -> None:
    raise RuntimeError(f"card declined for {customer}")


@app.task(name="demo.flaky", bind=True, max_retries=2)
def flaky(self: Any) -> str:
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("upstream timeout"), countdown=0.2)
    return "ok on retry"


def _span_file(role: str) -> IO[str]:
    return (DEMO_DIR / f"spans-{role}-{os.getpid()}.jsonl").open("a", buffering=1)


def setup_tracing(role: str) -> TracerProvider:
    """Spans to a local JSON-lines file (and to OTLP when an endpoint is configured)."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"demo-{role}"}))
    exporter = ConsoleSpanExporter(
        out=_span_file(role), formatter=lambda s: s.to_json(indent=None) + "\n"
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def audit_url() -> str:
    return f"sqlite:///{DEMO_DIR / 'audit.db'}"


if os.environ.get("OCP_DEMO_ROLE") == "worker":
    # The worker process imports this module via ``celery -A``: instrument it there.
    CeleryPublishInstrumentor().instrument(
        tracer_provider=setup_tracing("worker"), audit_url=audit_url(), flush_interval=0.1
    )
elif os.environ.get("OCP_DEMO_ROLE") == "cli":
    # ``audit replay`` instruments itself with the global provider: record its spans too.
    trace.set_tracer_provider(setup_tracing("cli"))


def _load_spans() -> list[dict[str, Any]]:
    spans = []
    for path in sorted(DEMO_DIR.glob("spans-*.jsonl")):
        spans += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return spans


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def span_bars(spans: list[dict[str, Any]]) -> Iterator[Bar]:
    """One trace's spans as timeline bars, depth-first in start order (a Jaeger waterfall)."""
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: _ts(s["start_time"])):
        parent = span.get("parent_id")
        children.setdefault(parent if parent in ids else None, []).append(span)

    def walk(span: dict[str, Any], depth: int) -> Iterator[Bar]:
        links = " (linked to the original trace)" if span.get("links") else ""
        yield Bar(
            span["name"],
            _ts(span["start_time"]),
            _ts(span["end_time"]),
            depth,
            error=span["status"]["status_code"] == "ERROR",
            note=f"[{span['resource']['attributes'].get('service.name', '')}]{links}",
        )
        yield from _split(span, depth + 1)
        for child in children.get(span["context"]["span_id"], []):
            yield from walk(child, depth + 1)

    for root in children.get(None, []):
        yield from walk(root, 0)


def _split(span: dict[str, Any], depth: int) -> Iterator[Bar]:
    """A queue-wait span's ``received`` event drawn as its broker-wait and worker-wait parts."""
    received = [e for e in span.get("events", ()) if e["name"] == "received"]
    if not span["name"].startswith("queue wait ") or not received:
        return
    task = span["name"].removeprefix("queue wait ")
    mark = _ts(received[0]["timestamp"])
    start, end = _ts(span["start_time"]), _ts(span["end_time"])
    yield Bar(f"· broker wait {task}", start, mark, depth, note="(received event)")
    yield Bar(f"· worker wait {task}", mark, end, depth)


def _rows() -> list[Any]:
    table = audit_table()
    engine = create_engine(audit_url())
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table).order_by(table.c.published_at)))
    finally:
        engine.dispose()


def _poll(what: str, check: Callable[[], Any], timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.1)  # polling the audit table with a deadline
    return result


def _audit(*args: str) -> str:
    """Run ``celery -A otel_celery_publish.demo audit ARGS`` for real; echo and return stdout."""
    cmd = ["celery", "-A", "otel_celery_publish.demo", "audit", *args]
    print(f"\n$ {' '.join(cmd)}")
    env = {**os.environ, "OCP_DEMO_ROLE": "cli", "OCP_DEMO_DIR": str(DEMO_DIR.parent),
           "OTEL_CELERY_PUBLISH_AUDIT_URL": audit_url()}  # fmt: skip
    argv = [sys.executable, "-m", *cmd]
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
    print(done.stdout.rstrip() or done.stderr.rstrip())
    if done.returncode:
        raise RuntimeError(f"demo: {' '.join(cmd)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _official_celery_instrumentation_off() -> None:
    """Add ``celery`` to ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` for this process and the ones
    it starts: the documented way to say the official instrumentation is off on purpose, which
    silences ``supersede_official``'s warning (see the module docstring)."""
    names = [n.strip() for n in os.environ.get(DISABLED, "").split(",") if n.strip()]
    if "celery" not in names:
        os.environ[DISABLED] = ",".join([*names, "celery"])


def celery_command() -> str:
    """This environment's ``celery`` as the reader's shell reaches it: ``celery`` when it is the
    one on PATH, else its path (``make demo`` runs ``.venv/bin/python`` without activating)."""
    mine = Path(sys.executable).parent / "celery"
    if not mine.is_file():
        return f"{shlex.quote(sys.executable)} -m celery"
    on_path = shutil.which("celery")
    if on_path and Path(on_path).resolve() == mine.resolve():
        return "celery"
    try:
        return shlex.quote(str(mine.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(mine))


def next_steps(stranded: str, failed: str) -> list[str]:
    """What to try after the demo: the lines it prints last. The indented ones are commands on
    this run's database that work as pasted (a test runs each); the rest point to the docs."""
    audit = f"{celery_command()} -A otel_celery_publish.demo audit"
    url = f"--audit-url {shlex.quote(audit_url())}"
    return [
        "Next steps: try the audit commands on this run's database (paste them as they are):",
        f"    {audit} lost --older-than 0s {url}",
        f"    {audit} show {stranded} {url}",
        f"    {audit} stats --since 1h {url}",
        f"    {audit} replay {failed} --dry-run {url}",
        "  lost: nothing is stuck now; show: the stranded task and its replay; stats: the",
        "  last hour; replay --dry-run: what re-sending the declined charge would send (nothing",
        "  is sent).",
        'On PostgreSQL and Redis: in your project, README.md "Use it in your project"',
        "  (OTEL_CELERY_PUBLISH_AUDIT_URL=postgresql+psycopg://...,",
        "  opentelemetry-instrument celery -A proj worker); with Docker, make stack-up &&",
        "  make verify-stack runs a worker and a producer on PostgreSQL and Redis, with Jaeger",
        "  and Grafana (docs/deploy.md).",
        'Every audit command, its options and its JSON: README.md "Operations", docs/audit.md.',
    ]


def _show_trace(row: Any, spans: list[dict[str, Any]]) -> None:
    trace_spans = [s for s in spans if s["context"]["trace_id"] == "0x" + row.trace_id]
    print(f"\ntrace {row.trace_id}  {row.task_name}[{row.task_id[:8]}]")
    print("\n".join(render(span_bars(trace_spans), width=40, label_width=30)))


def main() -> int:
    _official_celery_instrumentation_off()  # before our instrument() and the worker's
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    (DEMO_DIR / "broker").mkdir(parents=True)
    (DEMO_DIR / "processed").mkdir()
    env = {**os.environ, "OCP_DEMO_ROLE": "worker", "OCP_DEMO_DIR": str(DEMO_DIR.parent)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "otel_celery_publish.demo", "worker",
         "-P", "solo", "-Q", QUEUE, "-l", "WARNING", "--without-heartbeat"],
        env=env, stdout=subprocess.DEVNULL, stderr=(DEMO_DIR / "worker.log").open("wb"),
    )  # fmt: skip
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(
        tracer_provider=setup_tracing("publisher"), audit_url=audit_url(), flush_interval=0.1
    )
    try:
        print("1. publishing 5 tasks to a worker process over an embedded filesystem broker:")
        print("   a success, a countdown, a failure, a retry, and one to a queue nobody consumes")
        failed = charge.delay("ada", card_token="tok_secret").id
        consumed = [
            add.delay(2, 3).id,
            add.apply_async((4, 5), countdown=0.5).id,
            failed,
            flaky.delay().id,
        ]
        stranded = add.apply_async((6, 7), queue=NOBODY).id
        instrumentor.writer.flush()

        def finished() -> bool:
            done = {r.task_id for r in _rows() if r.outcome in {"succeeded", "failed"}}
            return set(consumed) <= done

        _poll("the consumed tasks to finish", finished)
        print("\n2. each trace as a timeline: publish, queue wait (broker, worker), run")
        spans = _load_spans()
        shown = set()
        for row in _rows():  # a retry continues its first attempt's trace: draw it once
            if row.task_id in consumed and row.trace_id not in shown:
                shown.add(row.trace_id)
                _show_trace(row, spans)

        print("\n3. the operations side: find the stranded task, replay it, check, measure")
        _audit("lost", "--older-than", "0s")
        _audit("replay", stranded, "--queue", QUEUE, "--yes")
        [replayed] = _poll(
            "the replay to succeed",
            lambda: [r for r in _rows() if r.replay_of and r.outcome == "succeeded"],
        )
        _audit("lost", "--older-than", "0s")
        _audit("stats", "--since", "1h")
        _audit("show", replayed.task_id)
        _show_trace(replayed, _load_spans())
    finally:
        instrumentor.uninstrument()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    print("\ndemo finished: every task reached an outcome; the stranded one was found, "
          "replayed and ran.\n")  # fmt: skip
    print("\n".join(next_steps(stranded, failed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
