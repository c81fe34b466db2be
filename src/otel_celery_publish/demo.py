"""``make demo``: the whole story on embedded defaults - no Docker, no servers.

A worker process and this publisher share a kombu *filesystem* broker in a temporary directory,
the audit table is SQLite, and both processes write their spans to JSON-lines files that this
script reads back and draws as timelines. It publishes a few tasks (success, countdown, failure,
retry, one routed to a queue nobody consumes) and prints the audit rows and each trace.

Run: ``python -m otel_celery_publish.demo`` (set ``OTEL_EXPORTER_OTLP_ENDPOINT`` to also export
over OTLP/HTTP to a collector).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from celery import Celery
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from sqlalchemy import create_engine, select

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.audit.schema import audit_table

DEMO_DIR = Path(os.environ.get("OCP_DEMO_DIR") or tempfile.gettempdir()) / "otel-celery-demo"
QUEUE, NOBODY = "demo", "nobody-consumes-this"


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


def _load_spans() -> list[dict[str, Any]]:
    spans = []
    for path in sorted(DEMO_DIR.glob("spans-*.jsonl")):
        spans += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return spans


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def timeline(spans: list[dict[str, Any]], width: int = 48) -> str:
    """Draw one trace's spans as a tree of bars to scale, like a Jaeger waterfall."""
    t0 = min(_ts(s["start_time"]) for s in spans)
    t1 = max(_ts(s["end_time"]) for s in spans)
    scale = width / max(t1 - t0, 1e-6)
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: _ts(s["start_time"])):
        parent = span.get("parent_id")
        children.setdefault(parent if parent in ids else None, []).append(span)
    lines: list[str] = []

    def draw(span: dict[str, Any], depth: int) -> None:
        start, end = _ts(span["start_time"]), _ts(span["end_time"])
        bar = " " * int((start - t0) * scale) + "█" * max(1, int((end - start) * scale))
        error = " ✗" if span["status"]["status_code"] == "ERROR" else ""
        label = ("  " * depth + span["name"])[:34]
        lines.append(f"  {label:<34} {bar} {(end - start) * 1000:.1f} ms{error}")
        for child in children.get(span["context"]["span_id"], []):
            draw(child, depth + 1)

    for root in children.get(None, []):
        draw(root, 0)
    return "\n".join(lines)


def _wait_finished(engine: Any, task_ids: list[str], timeout: float) -> list[Any]:
    table = audit_table()
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            rows = conn.execute(select(table).order_by(table.c.published_at)).all()
        done = {r.task_id for r in rows if r.outcome in {"succeeded", "failed"}}
        if set(task_ids) <= done or time.monotonic() > deadline:
            return list(rows)
        time.sleep(0.1)  # polling the audit table with a deadline


def _seconds(a: Any, b: Any) -> str:
    return f"{(b - a).total_seconds() * 1000:7.1f}" if a and b else "      -"


def main() -> int:
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
        print("publishing 5 tasks to a worker process over an embedded filesystem broker...")
        consumed = [
            add.delay(2, 3).id,
            add.apply_async((4, 5), countdown=0.5).id,
            charge.delay("ada", card_token="tok_secret").id,
            flaky.delay().id,
        ]
        lost = add.apply_async((6, 7), queue=NOBODY).id
        rows = _wait_finished(create_engine(audit_url()), consumed, timeout=40)
    finally:
        instrumentor.uninstrument()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

    print(
        "\naudit rows (times in ms: broker wait = received - published, run = finished - started)"
    )
    print(f"  {'task':<11} {'attempt':>7} {'queue':<20} {'outcome':<10} {'broker':>7} "
          f"{'worker':>7} {'run':>7}  kwargs")  # fmt: skip
    for r in rows:
        outcome = r.outcome or ("sent, never received" if r.sent_at else "not sent")
        print(
            f"  {r.task_name:<11} {r.attempt:>7} {r.queue[:20]:<20} {outcome:<10} "
            f"{_seconds(r.published_at, r.received_at)} {_seconds(r.received_at, r.started_at)} "
            f"{_seconds(r.started_at, r.finished_at)}  {r.kwargs_repr}"
        )
    spans = _load_spans()
    for r in rows:
        if r.task_id in consumed[:3] or r.attempt:
            trace = [s for s in spans if s["context"]["trace_id"] == "0x" + r.trace_id]
            print(f"\ntrace {r.trace_id}  ({r.task_name}, {r.outcome})\n{timeline(trace)}")
    print(f"\nstranded: {lost} was published to {NOBODY!r}, which no worker consumes: "
          "its row says sent, never received.")  # fmt: skip
    ok = all(r.outcome for r in rows if r.task_id in consumed)
    print("\ndemo finished:", "all consumed tasks reached an outcome" if ok else "TIMED OUT")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
