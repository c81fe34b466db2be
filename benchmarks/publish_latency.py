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
``plugin-{sync,spool,async}-{pg,sqlite}``
    ``CeleryPublishInstrumentor`` with ``durability=`` sync, spool or async, auditing into a
    PostgreSQL database the script creates (and drops WITH (FORCE) at the end), or into
    ``sqlite:///<tmpdir>/<mode>.db`` (WAL, synchronous=NORMAL). Every plugin mode has a table (or
    SQLite file) and a fresh ``spool_dir`` of its own under the run's temporary directory, so the
    correctness counts are per mode and no mode adopts another's spool. ``sync`` sends the row's
    upsert before the message goes to the broker and reads its result (committed) after, before
    ``apply_async`` returns; ``spool`` appends it to a local spool file; ``async``
    queues it in memory. The "sent" update and the spool are shipped off-thread in batches
    every ``--flush-interval`` seconds, *during* the timed loop, as in production.
``plugin-spool-sidecar-pg``
    ``spool`` with the host's sidecar shipper: a ``celery audit ship --follow`` process started
    for the whole run on this mode's spool directory, so the publishing process only appends
    (its writer thread stands down while the sidecar holds the lock).
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
* ``plugin-sync-pg p50 / floor-raw-pg p50`` compares the plugin with the cheapest synchronous
  commit done one after the other (insert, then publish). The floor makes no span, so about
  ``otel-official``'s ``+p50`` is the span; the plugin goes below 1.0 because its database round
  trip overlaps the broker's (the upsert is sent first, its result read after the send).
  ``plugin-spool-* / otel-official`` is the cost of the audit row on top of a span-only
  instrumentation.
* ``targets`` marks the issue #12 targets PASS/FAIL on the ratios of this run: spool mode
  (with and without the sidecar) p50 <= otel-official's, p50 <= 1.10x bare (stretch), p99 <=
  1.5x bare; sync mode on PostgreSQL p50 <= 1.25x the floor. ``--fail-on-target`` makes a
  FAIL the exit status 2.
* The correctness section counts rows in every audit table against the publishes made (measured
  plus warm-up): every publish exactly once (rows == distinct task ids == publishes), and, after
  waiting (with a deadline) for the batched "sent" updates, ``sent_at`` set on every row; spool
  segments left behind after each plugin mode was closed; exported spans; internal errors the
  plugin swallowed; audit connections left open on PostgreSQL. The exit status is 1 when any of
  those is off, so the numbers are never read alone.

``--json`` writes the configuration, every mode's statistics (per round too) and raw samples,
the ratios, the targets and the correctness section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from _common import (
    APP_NAME,
    DroppingExporter,
    add_pg_args,
    environment_info,
    percentile,
    print_targets,
    target,
    temp_database,
    wait_until,
)
from celery import Celery, signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from sqlalchemy import BigInteger, DateTime, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import otel_celery_publish
from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.sink.sidecar import SidecarProbe
from otel_celery_publish.sink.spool import target_dir

TASK_NAME = "bench.noop"
AUDIT_THREAD_NAME = "otel-celery-publish-audit"
SPOOL_SUFFIX = ".seg"
SIDECAR_APP = "publish_latency_sidecar"
PLUGIN_MODES = {
    # name: (durability, database)
    "plugin-sync-pg": ("sync", "pg"),
    "plugin-spool-pg": ("spool", "pg"),
    # spool, with the host's sidecar shipper (``audit ship --follow``) running beside it
    "plugin-spool-sidecar-pg": ("spool", "pg"),
    "plugin-async-pg": ("async", "pg"),
    "plugin-sync-sqlite": ("sync", "sqlite"),
    "plugin-spool-sqlite": ("spool", "sqlite"),
    "plugin-async-sqlite": ("async", "sqlite"),
}
MODE_NAMES = ("bare", "otel-official", *PLUGIN_MODES, "naive-sqlalchemy-pg", "floor-raw-pg")
RATIOS = (
    ("plugin-sync-pg", "floor-raw-pg"),
    ("plugin-sync-pg", "naive-sqlalchemy-pg"),
    ("naive-sqlalchemy-pg", "floor-raw-pg"),
    ("plugin-spool-pg", "otel-official"),
    ("plugin-spool-sidecar-pg", "otel-official"),
    ("plugin-async-pg", "otel-official"),
    ("plugin-spool-sqlite", "otel-official"),
)
SPOOL_STRETCH_X = 1.10  # issue #12 stretch: spool mode p50 <= 1.10x bare
SPOOL_P99_X = 1.5  # issue #12: spool mode p99 <= 1.5x bare
SYNC_FLOOR_LIMIT_X = 1.25  # issue #12: sync mode on PostgreSQL <= 1.25x the raw-driver floor

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


@dataclass
class PluginTarget:
    """Where one plugin mode writes: its database, table and spool directory."""

    durability: str
    database: str  # "pg" or "sqlite"
    audit_url: str
    table: str
    spool_dir: Path
    sqlite_path: Path | None = None


class PluginMode(Mode):
    receivers = 1

    def __init__(
        self, name: str, where: PluginTarget, tracer_provider: TracerProvider, flush_interval: float
    ) -> None:
        super().__init__()
        self.name = name
        self.where = where
        self._tracer_provider = tracer_provider
        self._flush_interval = flush_interval
        self.flush_failures = 0
        self.threads_alive_at_return = 0  # close() returned before its thread ended
        self.threads_left_running = 0  # ... and it was still alive 5 s later

    def enter(self) -> None:
        CeleryPublishInstrumentor().instrument(
            tracer_provider=self._tracer_provider,
            audit_url=self.where.audit_url,
            durability=self.where.durability,
            table_name=self.where.table,
            spool_dir=str(self.where.spool_dir),
            flush_interval=self._flush_interval,
        )

    def exit(self) -> None:
        instrumentor = CeleryPublishInstrumentor()
        writer = getattr(instrumentor, "writer", None)
        # uninstrument() flushes too but drops the result; flush first to know it worked.
        if writer is not None and not writer.flush(10.0):
            self.flush_failures += 1
        instrumentor.uninstrument()
        alive = [t for t in threading.enumerate() if t.name == AUDIT_THREAD_NAME]
        if alive:
            # close() signals "flushed" just before the thread deletes its spool and exits.
            self.threads_alive_at_return += 1
            for thread in alive:
                thread.join(5.0)
            if any(t.is_alive() for t in alive):
                self.threads_left_running += 1


class SidecarPluginMode(PluginMode):
    """``spool`` with a sidecar shipper process on the mode's spool directory, for the run."""

    def __init__(
        self, name: str, where: PluginTarget, tracer_provider: TracerProvider, flush_interval: float
    ) -> None:
        super().__init__(name, where, tracer_provider, flush_interval)
        env = {
            **os.environ,
            "OTEL_CELERY_PUBLISH_AUDIT_URL": where.audit_url,
            "OTEL_CELERY_PUBLISH_TABLE_NAME": where.table,
            "OTEL_CELERY_PUBLISH_SPOOL_DIR": str(where.spool_dir),
        }
        celery = Path(sys.executable).with_name("celery")
        self._proc = subprocess.Popen(
            [str(celery), "audit", "ship", "--follow", "--interval", str(flush_interval)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        probe = SidecarProbe(target_dir(str(where.spool_dir), where.audit_url, where.table))
        if not wait_until(probe.present, 30.0):
            raise RuntimeError("the sidecar shipper did not take its lock within 30 s")
        probe.forget()

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(30)


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
    round_p99_ns: list[float] = field(default_factory=list)


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
            res = results[mode.name]
            res.samples_ns.extend(block)
            res.round_p50_ns.append(statistics.median(block))
            res.round_p99_ns.append(percentile(sorted(block), 99))
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
            "p999_us": percentile(values, 99.9) / 1e3,
            "max_us": values[-1] / 1e3,
            "mean_us": statistics.fmean(values) / 1e3,
            "round_p50_us": [v / 1e3 for v in res.round_p50_ns],
            "round_p99_us": [v / 1e3 for v in res.round_p99_ns],
        }
    bare = stats.get("bare")
    for row in stats.values():
        if bare is not None:
            row["p50_vs_bare"] = row["p50_us"] / bare["p50_us"]
            row["p99_vs_bare"] = row["p99_us"] / bare["p99_us"]
            row["added_p50_us"] = row["p50_us"] - bare["p50_us"]
    return stats


def ratio(stats: dict[str, dict[str, Any]], a: str, b: str, key: str = "p50_us") -> float | None:
    if a in stats and b in stats:
        return float(stats[a][key] / stats[b][key])
    return None


def evaluate_targets(stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, judged on p50 ratios; the p99 ratio rides along for the reader."""
    out = []
    for name in ("plugin-spool-pg", "plugin-spool-sidecar-pg"):
        if name not in stats or "bare" not in stats:
            continue
        if "otel-official" in stats:
            out.append(
                target(
                    f"{name} p50 / otel-official p50",
                    ratio(stats, name, "otel-official"),
                    1.0,
                    at_most=True,
                )
            )
        out.append(
            target(
                f"{name} p50 / bare p50 (stretch)",
                ratio(stats, name, "bare"),
                SPOOL_STRETCH_X,
                at_most=True,
            )
        )
        out.append(
            target(
                f"{name} p99 / bare p99",
                ratio(stats, name, "bare", "p99_us"),
                SPOOL_P99_X,
                at_most=True,
            )
        )
    if "plugin-sync-pg" in stats and "floor-raw-pg" in stats:
        t = target(
            "plugin-sync-pg p50 / floor-raw-pg p50",
            ratio(stats, "plugin-sync-pg", "floor-raw-pg"),
            SYNC_FLOOR_LIMIT_X,
            at_most=True,
        )
        t["p99_ratio"] = ratio(stats, "plugin-sync-pg", "floor-raw-pg", "p99_us")
        t["note"] = f"p99 ratio {t['p99_ratio']:.2f}"
        out.append(t)
    return out


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
    for a, b in RATIOS:
        p50, p99 = ratio(stats, a, b), ratio(stats, a, b, "p99_us")
        if p50 is not None and p99 is not None:
            print(f"{a} / {b}: p50 {p50:.2f}, p99 {p99:.2f}")


# -- correctness checks --------------------------------------------------------------------------


def pg_counts(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    return int(row[0]) if row else 0


PLUGIN_COUNTS = "SELECT count(*), count(DISTINCT task_id), count(sent_at) FROM {table}"


def check_plugin(
    mode: PluginMode, conn: psycopg.Connection[Any], deadline_s: float
) -> dict[str, Any]:
    """Every publish exactly once, ``sent_at`` set (batched) on each, no spool left behind."""
    where = mode.where
    expected = mode.publishes
    counts = (0, 0, 0)

    def read() -> tuple[int, int, int]:
        sql = PLUGIN_COUNTS.format(table=f'"{where.table}"')
        if where.sqlite_path is not None:
            with contextlib.closing(sqlite3.connect(where.sqlite_path)) as db:
                return tuple(db.execute(sql).fetchone())  # type: ignore[return-value]
        row = conn.execute(sql).fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    def done() -> bool:
        nonlocal counts
        counts = read()
        return counts[0] >= expected and counts[2] >= expected

    started = time.monotonic()
    complete = wait_until(done, deadline_s)
    rows, distinct, sent = counts
    segments = sorted(p.name for p in where.spool_dir.rglob(f"*{SPOOL_SUFFIX}"))
    return {
        "durability": where.durability,
        "publishes": expected,
        "audit_rows": rows,
        "distinct_task_ids": distinct,
        "rows_with_sent_at": sent,
        "spool_segments_left": len(segments),
        "complete": complete and rows == distinct == sent == expected and not segments,
        "waited_s": round(time.monotonic() - started, 2),
    }


def other_connections(conn: psycopg.Connection[Any], dbname: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
        "AND application_name NOT IN (%s, %s)",
        (dbname, APP_NAME, SIDECAR_APP),
    ).fetchone()
    return int(row[0]) if row else 0


def collect_correctness(
    modes: Sequence[Mode],
    exporter: DroppingExporter,
    conninfo: str,
    dbname: str,
    internal_errors: list[str],
    rounds: int,
) -> dict[str, Any]:
    """Everything that must hold for the latency numbers to mean anything."""
    by_name = {mode.name: mode for mode in modes}
    plugin_modes = [m for m in modes if isinstance(m, PluginMode)]
    out: dict[str, Any] = {}
    with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
        for mode in plugin_modes:
            out[mode.name] = check_plugin(mode, conn, deadline_s=15.0)
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
        out["plugin_threads_alive_when_uninstrument_returned"] = sum(
            m.threads_alive_at_return for m in plugin_modes
        )
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
    results: dict[str, ModeSamples],
    stats: dict[str, dict[str, Any]],
    targets: list[dict[str, Any]],
    correctness: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    return {
        "benchmark": "publish_latency",
        "config": {
            "n": args.n,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "seed": seed,
            "modes": args.modes,
            "gc_disabled_in_timed_loops": args.disable_gc,
            "flush_interval": args.flush_interval,
            "broker": args.broker,
            "pg_latency_ms": args.pg_latency_ms,
            **environment_info(),
        },
        "modes": stats,
        "ratios": {
            f"{a}/{b}": {"p50": ratio(stats, a, b), "p99": ratio(stats, a, b, "p99_us")}
            for a, b in RATIOS
        },
        "targets": targets,
        "correctness": correctness,
        "ok": correctness_ok(correctness, internal_errors=correctness["plugin_internal_errors"]),
        "wall_s": wall_s,
        "samples_ns": {name: res.samples_ns for name, res in results.items()},
    }


def correctness_ok(correctness: dict[str, Any], internal_errors: Sequence[str]) -> bool:
    complete = all(v.get("complete", True) for v in correctness.values() if isinstance(v, dict))
    return (
        complete
        and not internal_errors
        and not correctness["plugin_flush_failures"]
        and not correctness["plugin_threads_left_after_uninstrument"]
        and not correctness["pg_connections_left_by_plugin"]
    )


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="measured publishes per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured publishes per block")
    parser.add_argument("--json", type=Path, help="also write results to this file")
    parser.add_argument("--seed", type=int, help="seed for the per-round mode order")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/11")
    add_pg_args(parser)
    parser.add_argument(
        "--pg-latency-ms",
        type=float,
        default=0.0,
        help="reach PostgreSQL through latency_proxy.py adding this one-way delay (a remote "
        "database: 0.5 is a typical same-zone link)",
    )
    parser.add_argument("--flush-interval", type=float, default=1.0, help="plugin batch interval")
    parser.add_argument("--disable-gc", action="store_true", help="gc off in every timed loop")
    parser.add_argument(
        "--fail-on-target", action="store_true", help="exit status 2 when a target is missed"
    )
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
    tmpdir: Path
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
        temp_database(args, "bench_publish") as db,
    ):
        try:
            yield Environment(
                dbname=db.name,
                conninfo=db.conninfo,
                pg_url=db.url,
                tmpdir=Path(tmpdir),
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


def plugin_target(env: Environment, name: str) -> PluginTarget:
    durability, database = PLUGIN_MODES[name]
    slug = name.replace("-", "_")
    spool_dir = env.tmpdir / "spool" / name
    if database == "pg":
        # The sidecar's connections (and that mode's writer's) go by a name of their own: the
        # sidecar still runs when the connections left behind are counted.
        url = f"{env.pg_url}?application_name={SIDECAR_APP}" if "sidecar" in name else env.pg_url
        return PluginTarget(durability, database, url, f"audit_{slug}", spool_dir)
    path = env.tmpdir / f"{name}.db"
    return PluginTarget(
        durability, database, f"sqlite:///{path}", f"audit_{slug}", spool_dir, sqlite_path=path
    )


def make_modes(
    env: Environment, args: argparse.Namespace, stack: contextlib.ExitStack
) -> list[Mode]:
    """The selected modes, in MODE_NAMES order; their connections close with ``stack``."""
    factories: dict[str, Callable[[], Mode]] = {
        "bare": Mode,
        "otel-official": lambda: OfficialMode(env.tracer_provider),
        "naive-sqlalchemy-pg": lambda: NaiveSQLAlchemyMode(env.pg_url),
        "floor-raw-pg": lambda: FloorMode(env.conninfo),
    }
    modes = []
    for name in MODE_NAMES:
        if name not in args.modes:
            continue
        if name in PLUGIN_MODES:
            kind = SidecarPluginMode if "sidecar" in name else PluginMode
            mode: Mode = kind(
                name, plugin_target(env, name), env.tracer_provider, args.flush_interval
            )
        else:
            mode = factories[name]()
        stack.callback(mode.close)
        modes.append(mode)
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as proxy:
        if args.pg_latency_ms > 0:
            args.pg_port = proxy.enter_context(latency_proxy(args))
        return run(args)


@contextlib.contextmanager
def latency_proxy(args: argparse.Namespace) -> Iterator[int]:
    """Start ``latency_proxy.py`` in front of PostgreSQL; yield its port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("latency_proxy.py")),
            f"--target={args.pg_host}:{args.pg_port}",
            f"--delay-ms={args.pg_latency_ms}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def run(args: argparse.Namespace) -> int:
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
        results = {m.name: results[m.name] for m in modes}
        stats = summarize(results)
        env.tracer_provider.force_flush(10_000)
        correctness = collect_correctness(
            modes, env.exporter, env.conninfo, env.dbname, internal_errors, args.rounds
        )
    wall = time.monotonic() - wall_start
    targets = evaluate_targets(stats)

    print()
    print_table(stats)
    print()
    print_targets(targets)
    print()
    print("correctness (publishes include warm-ups):")
    for key, value in correctness.items():
        print(f"  {key}: {value}")
    print(f"\nwall time {wall:.1f}s")
    if args.json is not None:
        report = build_report(args, seed, results, stats, targets, correctness, wall)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not correctness_ok(correctness, internal_errors):
        return 1
    if args.fail_on_target and any(t["verdict"] == "FAIL" for t in targets):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
