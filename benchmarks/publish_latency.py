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

The task is published through ``apply_async`` of a registered task rather than ``send_task`` by
name: for a task name this process has not registered, opentelemetry-instrumentation-celery opens
and activates a span in ``before_task_publish`` that ``after_task_publish`` never ends, so the
``otel-official`` mode would leak spans and attached contexts and not be a fair baseline.

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
  possible synchronous commit; the closer to 1.0, the less the plugin's own code costs.
* The correctness section counts rows in every audit table against the publishes made (measured
  plus warm-up), waits (with a deadline) for the plugin's batched "sent" updates, counts exported
  spans, internal errors the plugin swallowed, and audit connections left open on PostgreSQL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
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
from collections.abc import Callable, Sequence
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

    def __init__(self) -> None:
        self.publishes = 0  # every publish made while this mode was on, warm-ups included

    def enter(self) -> None:
        return None

    def exit(self) -> None:
        return None


class OfficialMode(Mode):
    name = "otel-official"

    def __init__(self, tracer_provider: TracerProvider) -> None:
        super().__init__()
        self._tracer_provider = tracer_provider

    def enter(self) -> None:
        CeleryInstrumentor().instrument(tracer_provider=self._tracer_provider)

    def exit(self) -> None:
        CeleryInstrumentor().uninstrument()


class PluginMode(Mode):
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
        self.engine = create_engine(
            sqlalchemy_url, connect_args={"application_name": APP_NAME}, pool_pre_ping=False
        )
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
    row = conn.execute(f"SELECT count(*) FROM {table}{where}").fetchone()  # noqa: S608
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
        rows = db.execute(f"SELECT count(*), count(sent_at) FROM {PLUGIN_TABLE}").fetchone()  # noqa: S608
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


def build_app(broker: str) -> tuple[Celery, Any]:
    app = Celery("publish_latency_bench", broker=broker, set_as_current=True)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
    )

    @app.task(name=TASK_NAME)
    def noop(x: int, y: int) -> None:
        return None

    return app, noop


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 - one linear script
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    wall_start = time.monotonic()

    internal_errors: list[str] = []
    guard = getattr(otel_celery_publish, "_guard", None)
    if guard is not None and hasattr(guard, "on_internal_error"):
        guard.on_internal_error = lambda where, exc: internal_errors.append(f"{where}: {exc!r}")

    admin_conninfo = (
        f"host={args.pg_host} port={args.pg_port} user={args.pg_user} dbname={args.pg_admin_db}"
    )
    dbname = f"bench_{uuid.uuid4().hex[:12]}"
    conninfo = f"host={args.pg_host} port={args.pg_port} user={args.pg_user} dbname={dbname}"
    pg_url = f"postgresql+psycopg://{args.pg_user}@{args.pg_host}:{args.pg_port}/{dbname}"
    queue_name = f"bench.publish_latency.{uuid.uuid4().hex[:12]}"

    app, noop = build_app(args.broker)
    redis_client = redis.Redis.from_url(args.broker)

    def drop_queue() -> None:
        redis_client.delete(queue_name)

    def publish() -> Any:
        return noop.apply_async(args=(1, 2), queue=queue_name)

    exporter = DroppingExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    tmpdir = tempfile.TemporaryDirectory(prefix="publish_latency_")
    sqlite_path = Path(tmpdir.name) / "audit.db"

    with psycopg.connect(admin_conninfo, autocommit=True, application_name=APP_NAME) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    naive: NaiveSQLAlchemyMode | None = None
    floor: FloorMode | None = None
    try:
        naive = NaiveSQLAlchemyMode(pg_url)
        floor = FloorMode(conninfo)
        plugin_pg = PluginMode("plugin-sync-pg", pg_url, tracer_provider, args.flush_interval)
        plugin_sqlite = PluginMode(
            "plugin-sync-sqlite", f"sqlite:///{sqlite_path}", tracer_provider, args.flush_interval
        )
        all_modes: dict[str, Mode] = {
            "bare": Mode(),
            "otel-official": OfficialMode(tracer_provider),
            "plugin-sync-pg": plugin_pg,
            "plugin-sync-sqlite": plugin_sqlite,
            "naive-sqlalchemy-pg": naive,
            "floor-raw-pg": floor,
        }
        modes = [all_modes[name] for name in MODE_NAMES if name in args.modes]

        # Connect the producer pool to Redis before anything is measured.
        for _ in range(max(args.warmup, 50)):
            publish()
        drop_queue()

        print(
            f"publish_latency: n={args.n} rounds={args.rounds} warmup={args.warmup} seed={seed} "
            f"gc={'off' if args.disable_gc else 'on'} in timed loops; modes={len(modes)}",
            file=sys.stderr,
            flush=True,
        )
        results = run_rounds(modes, publish, drop_queue, args, rng)
        stats = summarize({m.name: results[m.name] for m in modes})

        # -- correctness
        tracer_provider.force_flush(10_000)
        correctness: dict[str, Any] = {}
        with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as check:
            if plugin_pg in modes:
                correctness["plugin-sync-pg"] = check_plugin_pg(
                    check, plugin_pg.publishes, deadline_s=15.0
                )
            for mode, table in ((naive, "naive_audit"), (floor, "floor_audit")):
                if mode in modes:
                    rows = pg_counts(check, table)
                    correctness[mode.name] = {
                        "publishes": mode.publishes,
                        "audit_rows": rows,
                        "complete": rows == mode.publishes,
                    }
            if plugin_sqlite in modes:
                correctness["plugin-sync-sqlite"] = check_sqlite(
                    sqlite_path, plugin_sqlite.publishes
                )
            plugin_modes = [m for m in (plugin_pg, plugin_sqlite) if m in modes]
            official = all_modes["otel-official"]
            correctness["spans_exported"] = dict(exporter.names)
            correctness["spans_expected"] = {
                f"send {TASK_NAME}": sum(m.publishes for m in plugin_modes),
                f"apply_async/{TASK_NAME}": official.publishes if official in modes else 0,
            }
            correctness["plugin_flush_failures"] = sum(m.flush_failures for m in plugin_modes)
            correctness["plugin_threads_left_after_uninstrument"] = sum(
                m.threads_left_running for m in plugin_modes
            )
            correctness["plugin_internal_errors"] = internal_errors[:20]
            correctness["plugin_internal_error_count"] = len(internal_errors)
            correctness["plugin_instrument_cycles"] = args.rounds if plugin_modes else 0
            correctness["pg_connections_left_by_plugin"] = other_connections(check, dbname)

        print()
        print_table(stats)
        print()
        print("correctness (publishes include warm-ups):")
        for key, value in correctness.items():
            print(f"  {key}: {value}")
        wall = time.monotonic() - wall_start
        print(f"\nwall time {wall:.1f}s")

        if args.json is not None:
            report = {
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
                    "plugin-sync-pg/floor-raw-pg p50": ratio(
                        stats, "plugin-sync-pg", "floor-raw-pg"
                    ),
                    "plugin-sync-pg/naive-sqlalchemy-pg p50": ratio(
                        stats, "plugin-sync-pg", "naive-sqlalchemy-pg"
                    ),
                },
                "correctness": correctness,
                "wall_s": wall,
            }
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
        ok = all(v.get("complete", True) for v in correctness.values() if isinstance(v, dict))
        return 0 if ok and not internal_errors else 1
    finally:
        CeleryInstrumentor().uninstrument()
        CeleryPublishInstrumentor().uninstrument()
        drop_queue()
        redis_client.delete(f"_kombu.binding.{queue_name}")
        redis_client.close()
        if naive is not None:
            naive.close()
        if floor is not None:
            floor.close()
        tracer_provider.shutdown()
        app.close()
        with psycopg.connect(admin_conninfo, autocommit=True, application_name=APP_NAME) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        tmpdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
