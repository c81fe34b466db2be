"""Publish latency: what does otel-celery-publish add to ``apply_async``?

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with trust
auth for user ``postgres`` and an existing database ``test``)::

    .venv/bin/python benchmarks/publish_latency.py [--n 2000] [--rounds 5] [--json out.json]

Every sample is one ``noop.apply_async(args=(1, 2), queue=<unique queue>)`` of a registered no-op
task ``bench.noop``, timed with ``time.perf_counter_ns``. Nobody consumes the queue; its Redis key
is deleted after every measured block (outside the timing) and at the end. Spans go through a real
SDK ``TracerProvider`` and ``BatchSpanProcessor`` into an exporter that drops them, so span
creation, attributes, context injection and the processor's queue cost what they cost in
production, without export I/O.

The task is registered in this process and published with ``apply_async``, as application code
usually does, so every instrumentation resolves the task object rather than only its name.

Modes (all publish the same message to the same broker):

``bare``
    Celery alone, no receivers on the publish signals.
``otel-official``
    opentelemetry-instrumentation-celery only: a PRODUCER span, no database.
``plugin-sync-pg``
    ``CeleryPublishInstrumentor`` with ``audit_url`` pointing at a PostgreSQL database the script
    creates (and drops WITH (FORCE) at the end): producer span plus a synchronously committed
    audit row before the message goes to the broker; the "sent" update is batched off-thread.
``plugin-sync-sqlite``
    The same with ``sqlite:///<tmpdir>/audit.db`` (WAL, synchronous=NORMAL).
``naive-sqlalchemy-pg``
    No library: a ``before_task_publish`` receiver doing what applications hand-roll today, a
    SQLAlchemy ORM ``Session`` per publish (from a ``sessionmaker`` over a warm pool) adding one
    row (task_id, task_name, argsrepr, kwargsrepr, created_at) and committing, same database.
``floor-raw-pg``
    The physical floor for "commit a row before publishing": one single-row INSERT over one warm
    autocommit psycopg connection with a server-side prepared statement (``prepare=True``).

Method: each round runs every mode once, in an order shuffled per round (``--seed``), so machine
noise (this is meant for small, noisy CI boxes) hits all modes alike. Per mode and round: enable
the mode, publish ``--warmup`` unmeasured messages (connections, caches, prepared statements,
table creation), ``gc.collect()``, publish ``--n`` measured messages, disable the mode. Switching
away from a plugin mode flushes the audit writer and uninstruments it, which stops its background
thread, so no mode runs alongside another mode's leftovers. The garbage collector stays enabled
during the timed loop (allocation-heavy modes pay their real GC cost) unless ``--disable-gc`` is
given, which then applies to every mode alike.

Reading the output:

* ``p50/p90/p99/mean`` are over all rounds' samples pooled (``rounds * n`` per mode), in
  microseconds. ``+p50`` is the median added to one publish compared with ``bare``.
* ``p50/bare`` and ``p99/bare`` are the mode's percentile divided by bare's same percentile.
* ``p50 rounds`` is the lowest and highest per-round median: if these ranges of two modes
  overlap, the noise on this machine is as big as the difference between them.
* ``plugin-sync-pg p50 / floor-raw-pg p50`` says how close the plugin gets to the cheapest
  possible synchronous commit; the closer to 1.0, the less the plugin's own code costs. The floor
  makes no span, so about ``otel-official``'s ``+p50`` of that gap is the span, the rest is the
  plugin's row building and database path. ``plugin-sync-pg / naive-sqlalchemy-pg`` compares it
  with the hand-rolled ORM insert it replaces.
* The correctness section counts rows in every audit table against the publishes made (measured
  plus warm-up), waits (with a deadline) for the plugin's batched "sent" updates, counts exported
  spans, internal errors the plugin swallowed, and audit connections left open on PostgreSQL.
  The exit status is 1 when any of those counts is off, so the numbers are never read alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import psycopg
import redis
import sqlalchemy
from celery import Celery, signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from sqlalchemy import BigInteger, DateTime, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import otel_celery_publish
from otel_celery_publish import CeleryPublishInstrumentor

TASK_NAME = "bench.noop"
PLUGIN_TABLE = "celery_publish_audit"
AUDIT_THREAD_NAME = "otel-celery-publish-audit"
# Our own connections carry this name, so whatever else is still connected to the benchmark
# database at the end belongs to the plugin.
APP_NAME = "publish_latency_bench"
MODE_NAMES = (
    "bare",
    "otel-official",
    "plugin-sync-pg",
    "plugin-sync-sqlite",
    "naive-sqlalchemy-pg",
    "floor-raw-pg",
)

# -- telemetry ----------------------------------------------------------------------------------


class DroppingExporter(SpanExporter):
    """Accepts every batch and keeps only a count of span names."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.names.update(span.name for span in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


# -- hand-written audit baselines ---------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class NaiveAudit(Base):
    """The audit model an application would write itself."""

    __tablename__ = "naive_audit"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(255))
    task_name: Mapped[str] = mapped_column(String(255))
    argsrepr: Mapped[str | None] = mapped_column(Text)
    kwargsrepr: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


FLOOR_DDL = """
CREATE TABLE IF NOT EXISTS floor_audit (
    id bigserial PRIMARY KEY,
    task_id varchar(255) NOT NULL,
    task_name varchar(255) NOT NULL,
    argsrepr text,
    kwargsrepr text,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
FLOOR_INSERT = (
    "INSERT INTO floor_audit (task_id, task_name, argsrepr, kwargsrepr) VALUES (%s, %s, %s, %s)"
)


# -- modes ---------------------------------------------------------------------------------------


class Mode:
    """One way of publishing; ``enter``/``exit`` switch it on and off around each block."""

    name = "bare"
    # before_task_publish receivers expected while the mode is on: catches a mode that is
    # silently not active, or another mode's receiver left connected.
    receivers = 0

    def __init__(self) -> None:
        self.publishes = 0  # every publish made while this mode was on, warm-ups included

    def enter(self) -> None:
        return None

    def exit(self) -> None:
        return None

    def close(self) -> None:
        return None


class OfficialMode(Mode):
    name = "otel-official"
    receivers = 1

    def __init__(self, tracer_provider: TracerProvider) -> None:
        super().__init__()
        self._tracer_provider = tracer_provider

    def enter(self) -> None:
        official = CeleryInstrumentor()  # type: ignore[no-untyped-call]
        if official.is_instrumented_by_opentelemetry:
            # instrument() would be a silent no-op and this mode would measure bare Celery.
            raise RuntimeError("CeleryInstrumentor is already flagged as instrumented")
        official.instrument(tracer_provider=self._tracer_provider)

    def exit(self) -> None:
        CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]


class PluginMode(Mode):
    receivers = 1

    def __init__(
        self, name: str, audit_url: str, tracer_provider: TracerProvider, flush_interval: float
    ) -> None:
        super().__init__()
        self.name = name
        self.audit_url = audit_url
        self._tracer_provider = tracer_provider
        self._flush_interval = flush_interval
        self.flush_failures = 0
        self.threads_left_running = 0

    def enter(self) -> None:
        CeleryPublishInstrumentor().instrument(
            tracer_provider=self._tracer_provider,
            audit_url=self.audit_url,
            flush_interval=self._flush_interval,
        )

    def exit(self) -> None:
        instrumentor = CeleryPublishInstrumentor()
        writer = getattr(instrumentor, "writer", None)
        # uninstrument() flushes too but drops the result; flush first to know it worked.
        if writer is not None and not writer.flush(10.0):
            self.flush_failures += 1
        instrumentor.uninstrument()
        if any(t.name == AUDIT_THREAD_NAME for t in threading.enumerate()):
            self.threads_left_running += 1


class SignalMode(Mode):
    """A mode that is a ``before_task_publish`` receiver, connected only while the mode is on."""

    receivers = 1

    def on_publish(
        self, sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        raise NotImplementedError

    def enter(self) -> None:
        signals.before_task_publish.connect(self.on_publish, weak=False)

    def exit(self) -> None:
        signals.before_task_publish.disconnect(self.on_publish)


class NaiveSQLAlchemyMode(SignalMode):
    name = "naive-sqlalchemy-pg"

    def __init__(self, sqlalchemy_url: str) -> None:
        super().__init__()
        self.engine = create_engine(sqlalchemy_url, connect_args={"application_name": APP_NAME})
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine)

    def on_publish(
        self, sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        headers = headers or {}
        with self._sessions() as session:
            session.add(
                NaiveAudit(
                    task_id=str(headers.get("id")),
                    task_name=str(sender),
                    argsrepr=headers.get("argsrepr"),
                    kwargsrepr=headers.get("kwargsrepr"),
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
            )
            session.commit()

    def close(self) -> None:
        self.engine.dispose()


class FloorMode(SignalMode):
    name = "floor-raw-pg"

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self.conn = psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME)
        self.conn.execute(FLOOR_DDL)

    def on_publish(
        self, sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        headers = headers or {}
        self.conn.execute(
            FLOOR_INSERT,
            (
                str(headers.get("id")),
                str(sender),
                headers.get("argsrepr"),
                headers.get("kwargsrepr"),
            ),
            prepare=True,
        )

    def close(self) -> None:
        self.conn.close()


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class ModeSamples:
    samples_ns: list[int] = field(default_factory=list)
    round_p50_ns: list[float] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def timed_block(publish: Callable[[], Any], n: int, disable_gc: bool) -> list[int]:
    """``n`` publishes, each timed alone; the loop itself is the same for every mode."""
    out = [0] * n
    clock = time.perf_counter_ns
    gc.collect()
    if disable_gc:
        gc.disable()
    try:
        for i in range(n):
            start = clock()
            publish()
            out[i] = clock() - start
    finally:
        if disable_gc:
            gc.enable()
    return out


def run_rounds(
    modes: Sequence[Mode],
    publish: Callable[[], Any],
    drop_queue: Callable[[], None],
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, ModeSamples]:
    results = {mode.name: ModeSamples() for mode in modes}
    for round_no in range(1, args.rounds + 1):
        order = list(modes)
        rng.shuffle(order)
        started = time.monotonic()
        for mode in order:
            mode.enter()
            try:
                connected = len(signals.before_task_publish.receivers)
                if connected != mode.receivers:
                    raise RuntimeError(
                        f"{mode.name}: {connected} before_task_publish receivers connected, "
                        f"expected {mode.receivers}"
                    )
                for _ in range(args.warmup):
                    publish()
                mode.publishes += args.warmup
                block = timed_block(publish, args.n, args.disable_gc)
                mode.publishes += args.n
            finally:
                mode.exit()
            drop_queue()
            results[mode.name].samples_ns.extend(block)
            results[mode.name].round_p50_ns.append(statistics.median(block))
        print(
            f"round {round_no}/{args.rounds} ({time.monotonic() - started:.1f}s): "
            + ", ".join(m.name for m in order),
            file=sys.stderr,
            flush=True,
        )
    return results


def summarize(results: dict[str, ModeSamples]) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    for name, res in results.items():
        values = sorted(res.samples_ns)
        stats[name] = {
            "samples": len(values),
            "p50_us": percentile(values, 50) / 1e3,
            "p90_us": percentile(values, 90) / 1e3,
            "p99_us": percentile(values, 99) / 1e3,
            "mean_us": statistics.fmean(values) / 1e3,
            "round_p50_us": [v / 1e3 for v in res.round_p50_ns],
        }
    bare = stats.get("bare")
    for row in stats.values():
        if bare is not None:
            row["p50_vs_bare"] = row["p50_us"] / bare["p50_us"]
            row["p99_vs_bare"] = row["p99_us"] / bare["p99_us"]
            row["added_p50_us"] = row["p50_us"] - bare["p50_us"]
    return stats


def ratio(stats: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a in stats and b in stats:
        return float(stats[a]["p50_us"] / stats[b]["p50_us"])
    return None


def print_table(stats: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'mode':<20} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'mean us':>8} "
        f"{'+p50 us':>8} {'p50/bare':>8} {'p99/bare':>8}   p50 rounds (min..max us)"
    )
    print(header)
    print("-" * len(header))
    for name, row in stats.items():
        rounds = row["round_p50_us"]
        print(
            f"{name:<20} {row['p50_us']:>8.1f} {row['p90_us']:>8.1f} {row['p99_us']:>8.1f} "
            f"{row['mean_us']:>8.1f} {row.get('added_p50_us', math.nan):>8.1f} "
            f"{row.get('p50_vs_bare', math.nan):>8.2f} {row.get('p99_vs_bare', math.nan):>8.2f}"
            f"   {min(rounds):.1f}..{max(rounds):.1f}"
        )
    print()
    for a, b in (
        ("plugin-sync-pg", "floor-raw-pg"),
        ("plugin-sync-pg", "naive-sqlalchemy-pg"),
        ("naive-sqlalchemy-pg", "floor-raw-pg"),
    ):
        value = ratio(stats, a, b)
        if value is not None:
            print(f"{a} p50 / {b} p50 = {value:.2f}")


# -- correctness checks --------------------------------------------------------------------------


def pg_counts(conn: psycopg.Connection[Any], table: str, extra: str = "") -> int:
    where = f" WHERE {extra}" if extra else ""
    row = conn.execute(f"SELECT count(*) FROM {table}{where}").fetchone()
    return int(row[0]) if row else 0


def wait_until(check: Callable[[], bool], deadline_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + deadline_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


def check_plugin_pg(
    conn: psycopg.Connection[Any], expected: int, deadline_s: float
) -> dict[str, Any]:
    """Rows (synchronous) and "sent" updates (batched) against the publishes made."""
    counts = {"rows": 0, "sent": 0}

    def done() -> bool:
        counts["rows"] = pg_counts(conn, PLUGIN_TABLE)
        counts["sent"] = pg_counts(conn, PLUGIN_TABLE, "sent_at IS NOT NULL")
        return counts["rows"] >= expected and counts["sent"] >= expected

    started = time.monotonic()
    complete = wait_until(done, deadline_s)
    return {
        "publishes": expected,
        "audit_rows": counts["rows"],
        "rows_with_sent_at": counts["sent"],
        "complete": complete and counts["rows"] == expected == counts["sent"],
        "waited_s": round(time.monotonic() - started, 2),
    }


def check_sqlite(path: Path, expected: int) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        rows = db.execute(f"SELECT count(*), count(sent_at) FROM {PLUGIN_TABLE}").fetchone()
    return {
        "publishes": expected,
        "audit_rows": rows[0],
        "rows_with_sent_at": rows[1],
        "complete": rows[0] == expected == rows[1],
    }


def other_connections(conn: psycopg.Connection[Any], dbname: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name <> %s",
        (dbname, APP_NAME),
    ).fetchone()
    return int(row[0]) if row else 0


def collect_correctness(
    modes: Sequence[Mode],
    exporter: DroppingExporter,
    conninfo: str,
    dbname: str,
    sqlite_path: Path,
    internal_errors: list[str],
    rounds: int,
) -> dict[str, Any]:
    """Everything that must hold for the latency numbers to mean anything."""
    by_name = {mode.name: mode for mode in modes}
    plugin_modes = [m for m in modes if isinstance(m, PluginMode)]
    out: dict[str, Any] = {}
    with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
        if "plugin-sync-pg" in by_name:
            out["plugin-sync-pg"] = check_plugin_pg(
                conn, by_name["plugin-sync-pg"].publishes, deadline_s=15.0
            )
        if "plugin-sync-sqlite" in by_name:
            out["plugin-sync-sqlite"] = check_sqlite(
                sqlite_path, by_name["plugin-sync-sqlite"].publishes
            )
        for name, table in (
            ("naive-sqlalchemy-pg", "naive_audit"),
            ("floor-raw-pg", "floor_audit"),
        ):
            if name in by_name:
                rows = pg_counts(conn, table)
                publishes = by_name[name].publishes
                out[name] = {
                    "publishes": publishes,
                    "audit_rows": rows,
                    "complete": rows == publishes,
                }
        official = by_name.get("otel-official")
        expected = {
            f"send {TASK_NAME}": sum(m.publishes for m in plugin_modes),
            f"apply_async/{TASK_NAME}": official.publishes if official is not None else 0,
        }
        exported = dict(exporter.names)
        out["spans"] = {
            "exported": exported,
            "expected": expected,
            "complete": all(exported.get(k, 0) == v for k, v in expected.items()),
        }
        out["plugin_instrument_cycles"] = rounds * len(plugin_modes)
        out["plugin_flush_failures"] = sum(m.flush_failures for m in plugin_modes)
        out["plugin_threads_left_after_uninstrument"] = sum(
            m.threads_left_running for m in plugin_modes
        )
        out["plugin_internal_error_count"] = len(internal_errors)
        out["plugin_internal_errors"] = internal_errors[:20]
        out["pg_connections_left_by_plugin"] = other_connections(conn, dbname)
    return out


def build_report(
    args: argparse.Namespace,
    seed: int,
    stats: dict[str, dict[str, Any]],
    correctness: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    return {
        "config": {
            "n": args.n,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "seed": seed,
            "gc_disabled_in_timed_loops": args.disable_gc,
            "flush_interval": args.flush_interval,
            "broker": args.broker,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "celery": celery.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            "psycopg": psycopg.__version__,
            "otel_celery_publish": otel_celery_publish.__version__,
        },
        "modes": stats,
        "ratios": {
            f"{a}/{b} p50": ratio(stats, a, b)
            for a, b in (
                ("plugin-sync-pg", "floor-raw-pg"),
                ("plugin-sync-pg", "naive-sqlalchemy-pg"),
                ("naive-sqlalchemy-pg", "floor-raw-pg"),
            )
        },
        "correctness": correctness,
        "wall_s": wall_s,
    }


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="measured publishes per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured publishes per block")
    parser.add_argument("--json", type=Path, help="also write results to this file")
    parser.add_argument("--seed", type=int, help="seed for the per-round mode order")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--pg-admin-db", default="test", help="database to CREATE DATABASE from")
    parser.add_argument("--flush-interval", type=float, default=1.0, help="plugin batch interval")
    parser.add_argument("--disable-gc", action="store_true", help="gc off in every timed loop")
    parser.add_argument(
        "--modes",
        default=",".join(MODE_NAMES),
        help=f"comma-separated subset of: {', '.join(MODE_NAMES)}",
    )
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODE_NAMES))
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    if args.n < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--n and --rounds must be >= 1, --warmup >= 0")
    return args


@dataclass
class Environment:
    """Everything the run needs, created by :func:`environment` and torn down by it."""

    dbname: str
    conninfo: str
    pg_url: str
    sqlite_path: Path
    queue_name: str
    publish: Callable[[], Any]
    drop_queue: Callable[[], None]
    exporter: DroppingExporter
    tracer_provider: TracerProvider


def build_app(broker: str) -> tuple[Celery, Any]:
    app = Celery("publish_latency_bench", broker=broker, set_as_current=True)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
    )

    @app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
    def noop(x: int, y: int) -> None:
        return None

    return app, noop


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Environment]:
    """Celery app, Redis queue, tracer provider, a fresh PostgreSQL database and a temp dir."""
    pg = f"host={args.pg_host} port={args.pg_port} user={args.pg_user}"
    admin_conninfo = f"{pg} dbname={args.pg_admin_db}"
    dbname = f"bench_{uuid.uuid4().hex[:12]}"
    pg_hostport = f"{args.pg_host}:{args.pg_port}"
    queue_name = f"bench.publish_latency.{uuid.uuid4().hex[:12]}"
    app, noop = build_app(args.broker)
    redis_client = redis.Redis.from_url(args.broker)
    tracer_provider = TracerProvider()
    exporter = DroppingExporter()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

    def publish() -> Any:
        return noop.apply_async(args=(1, 2), queue=queue_name)

    def drop_queue() -> None:
        redis_client.delete(queue_name)

    with (
        tempfile.TemporaryDirectory(prefix="publish_latency_") as tmpdir,
        psycopg.connect(admin_conninfo, autocommit=True, application_name=APP_NAME) as admin,
    ):
        admin.execute(f'CREATE DATABASE "{dbname}"')
        try:
            yield Environment(
                dbname=dbname,
                conninfo=f"{pg} dbname={dbname}",
                pg_url=f"postgresql+psycopg://{args.pg_user}@{pg_hostport}/{dbname}",
                sqlite_path=Path(tmpdir) / "audit.db",
                queue_name=queue_name,
                publish=publish,
                drop_queue=drop_queue,
                exporter=exporter,
                tracer_provider=tracer_provider,
            )
        finally:
            official = CeleryInstrumentor()  # type: ignore[no-untyped-call]
            for instrumentor in (CeleryPublishInstrumentor(), official):
                if instrumentor.is_instrumented_by_opentelemetry:
                    instrumentor.uninstrument()
            # The queue list plus kombu's binding key(s) for it; the name is unique to this run.
            leftovers = list(redis_client.scan_iter(match=f"*{queue_name}*"))
            if leftovers:
                redis_client.delete(*leftovers)
            redis_client.close()
            tracer_provider.shutdown()
            app.close()
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def make_modes(
    env: Environment, args: argparse.Namespace, stack: contextlib.ExitStack
) -> list[Mode]:
    """The selected modes, in MODE_NAMES order; their connections close with ``stack``."""
    factories: dict[str, Callable[[], Mode]] = {
        "bare": Mode,
        "otel-official": lambda: OfficialMode(env.tracer_provider),
        "plugin-sync-pg": lambda: PluginMode(
            "plugin-sync-pg", env.pg_url, env.tracer_provider, args.flush_interval
        ),
        "plugin-sync-sqlite": lambda: PluginMode(
            "plugin-sync-sqlite",
            f"sqlite:///{env.sqlite_path}",
            env.tracer_provider,
            args.flush_interval,
        ),
        "naive-sqlalchemy-pg": lambda: NaiveSQLAlchemyMode(env.pg_url),
        "floor-raw-pg": lambda: FloorMode(env.conninfo),
    }
    modes = []
    for name in MODE_NAMES:
        if name in args.modes:
            mode = factories[name]()
            stack.callback(mode.close)
            modes.append(mode)
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    wall_start = time.monotonic()
    # The plugin warns on every instrument() that the official instrumentation is installed and
    # kept off; this script toggles it every round, so keep that one notice out of the output.
    logging.getLogger("otel_celery_publish").addFilter(
        lambda record: "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS" not in record.getMessage()
    )
    # Errors the plugin swallows would make its numbers meaningless: collect them (private hook).
    internal_errors: list[str] = []
    guard = getattr(otel_celery_publish, "_guard", None)
    if guard is not None and hasattr(guard, "on_internal_error"):
        guard.on_internal_error = lambda where, exc: internal_errors.append(f"{where}: {exc!r}")

    with environment(args) as env, contextlib.ExitStack() as stack:
        modes = make_modes(env, args, stack)
        for _ in range(max(args.warmup, 50)):  # connect the producer pool before measuring
            env.publish()
        env.drop_queue()
        print(
            f"publish_latency: n={args.n} rounds={args.rounds} warmup={args.warmup} seed={seed} "
            f"gc={'off' if args.disable_gc else 'on'} in timed loops; "
            f"modes={','.join(m.name for m in modes)}",
            file=sys.stderr,
            flush=True,
        )
        results = run_rounds(modes, env.publish, env.drop_queue, args, random.Random(seed))
        stats = summarize({m.name: results[m.name] for m in modes})
        env.tracer_provider.force_flush(10_000)
        correctness = collect_correctness(
            modes,
            env.exporter,
            env.conninfo,
            env.dbname,
            env.sqlite_path,
            internal_errors,
            args.rounds,
        )
    wall = time.monotonic() - wall_start

    print()
    print_table(stats)
    print()
    print("correctness (publishes include warm-ups):")
    for key, value in correctness.items():
        print(f"  {key}: {value}")
    print(f"\nwall time {wall:.1f}s")
    if args.json is not None:
        report = build_report(args, seed, stats, correctness, wall)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    ok = all(v.get("complete", True) for v in correctness.values() if isinstance(v, dict))
    return 0 if ok and not internal_errors and not correctness["plugin_flush_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
