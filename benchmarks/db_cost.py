"""What one task costs PostgreSQL: WAL, dead tuples, HOT updates and bytes, per lifecycle phase.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres`` and an
existing database ``test``)::

    .venv/bin/python benchmarks/db_cost.py [--n 20000] [--batch 200] [--fillfactors 100]

The rows are the library's own: ``--n`` real ``apply_async`` publishes of ``bench.add(2, 3)``
through Celery (a broker that drops the messages) with the publish hook connected, so each row
and ``sent`` update is what ``before_task_publish`` / ``after_task_publish`` build; the worker's
updates are :mod:`otel_celery_publish.rows`' ``received``, ``started`` and ``finished``, as the
worker hooks build them. They go through the library's write statements, in phases:

* ``publish``: one :meth:`Database.insert_now` per task (sync mode: a prepared single-row upsert
  on the warm raw connection, one commit each);
* ``sent``, ``received``, ``started``, ``finished``: :meth:`Database.upsert` in batches of
  ``--batch`` rows, as a writer's shipping thread ships what one ``flush_interval`` gathered
  (a batch of 100 rows or more goes through COPY and one ``INSERT ... SELECT ... ON CONFLICT``).

Each table gets every phase in turn, into a scratch database that is dropped at the end:

* ``audit``: the audit table as the package's migrations create it;
* ``audit ff=<F>``: the same table, then ``ALTER TABLE ... SET (fillfactor = F)`` before any
  row, for each ``--fillfactors`` value that differs from the migrated one;
* ``floor``: the cheapest durable record of a publish at all, a 4-column table (``publish_id``
  primary key, ``task_id``, ``task_name``, ``published_at``), one prepared INSERT per task.

Per phase and task: WAL bytes (``pg_wal_lsn_diff`` of ``pg_current_wal_lsn()`` around the phase;
with ``pg_walinspect`` the records are also read back, attributed to this database, and split
into full-page images and record types), updates, HOT updates and new dead tuples
(``pg_stat_user_tables``, read once the writing connections are closed, which flushes their
statistics), and the growth of the heap and of its indexes. Ratios are against the floor's
insert. A ``CHECKPOINT`` comes first, so a phase's full-page images are those of its first touch
of each page since then (what a checkpoint cycle costs once per page); WAL is cluster-wide, so
with other load on the server the ``pg_walinspect`` figure (this database only) is the one to
read. Autovacuum is switched off on the measured tables, so dead tuples are counted, not raced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    APP_NAME,
    add_pg_args,
    environment_info,
    register_null_transport,
    temp_database,
    wait_until,
)
from celery import Celery
from celery.signals import after_task_publish, before_task_publish
from opentelemetry.sdk.trace import TracerProvider

from otel_celery_publish import rows
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks.publish import PublishHooks
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import Database, make_engine
from otel_celery_publish.sink.records import Record

PHASES = ("publish", "sent", "received", "started", "finished")
FLOOR = "floor"
FLOOR_DDL = (
    "CREATE TABLE {t} (publish_id varchar(36) PRIMARY KEY, task_id varchar(255) NOT NULL, "
    "task_name varchar(255) NOT NULL, published_at timestamptz NOT NULL)"
)
FLOOR_INSERT = (
    "INSERT INTO {t} (publish_id, task_id, task_name, published_at) VALUES (%s, %s, %s, %s)"
)
WORKER = "celery@bench-worker"
STATS_DEADLINE_S = 30.0


# -- the rows -------------------------------------------------------------------------------


class _Captured:
    """Stands in for the audit writer: keeps what the publish hook hands it."""

    def __init__(self) -> None:
        self.publishes: list[rows.PublishRow] = []
        self.sent: dict[str, rows.Sent] = {}

    def record_publish(self, row: rows.PublishRow) -> None:
        self.publishes.append(row)

    def record_update(self, update: rows.Sent, *, best_effort: bool = False) -> None:
        self.sent[update["publish_id"]] = update


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's writes, in the order its lifecycle makes them."""

    publish: Record
    sent: Record
    received: Record
    started: Record
    finished: Record

    def phase(self, name: str) -> Record:
        return getattr(self, name)  # type: ignore[no-any-return]


def captured_publishes(n: int) -> tuple[list[rows.PublishRow], dict[str, rows.Sent]]:
    """``n`` rows and sent updates from real ``apply_async`` calls through the publish hook."""
    broker = register_null_transport()
    app = Celery("db_cost_bench", broker=broker, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_serializer="json")

    @app.task(name="bench.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    settings = Settings.from_env(environ={}, audit_url="sqlite://")
    captured = _Captured()
    hooks = PublishHooks(TracerProvider().get_tracer("db_cost"), captured, settings)  # type: ignore[arg-type]
    before_task_publish.connect(hooks.before_publish, weak=False)
    after_task_publish.connect(hooks.after_publish, weak=False)
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                add.apply_async((2, 3), producer=producer)
    finally:
        before_task_publish.disconnect(hooks.before_publish)
        after_task_publish.disconnect(hooks.after_publish)
    if len(captured.publishes) != n or len(captured.sent) != n:
        raise RuntimeError("the publish hook missed publishes")
    return captured.publishes, captured.sent


def tasks(n: int) -> list[Task]:
    """Every write of ``n`` tasks: the hook's rows, the worker hooks' updates."""
    publishes, sent = captured_publishes(n)
    instance = str(uuid.uuid4())
    out = []
    for row in publishes:
        key: rows.RowKey = {
            "publish_id": row["publish_id"],
            "task_id": row["task_id"],
            "task_name": row["task_name"],
            "published_at": row["published_at"],
        }
        at = row["published_at"].timestamp()
        out.append(
            Task(
                publish=dict(row),
                sent=dict(sent[row["publish_id"]]),
                received=dict(rows.received(key, at + 0.004, WORKER, instance, acks_late=False)),
                started=dict(rows.started(key, at + 0.005, WORKER, instance, redelivered=False)),
                finished=dict(rows.finished(key, at + 0.055, "succeeded", runtime_s=0.05)),
            )
        )
    return out


# -- measuring ------------------------------------------------------------------------------


@dataclasses.dataclass
class Counters:
    """What PostgreSQL says about one table at one moment."""

    lsn: str
    inserts: int
    updates: int
    hot: int
    dead: int
    heap: int
    indexes: dict[str, int]


class Server:
    """An observing connection to the scratch database (never one of the measured writers)."""

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME)
        self.db_oid = self.scalar("SELECT oid FROM pg_database WHERE datname = current_database()")
        self.slot = f"db_cost_{uuid.uuid4().hex[:12]}"
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            # A checkpoint (ours or another client's) would recycle the segments before they
            # are read back: a temporary slot keeps them, and goes with this connection.
            self.conn.execute(
                "SELECT pg_create_physical_replication_slot(%s, true, true)", (self.slot,)
            )
            self.walinspect = True
        except psycopg.Error as exc:
            print(f"pg_walinspect unavailable ({exc}): WAL is the whole server's", file=sys.stderr)
            self.walinspect = False

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None

    def counters(self, table: str) -> Counters:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        ins, upd, hot, dead = self.conn.execute(
            "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup FROM pg_stat_user_tables "
            "WHERE relname = %s",
            (table,),
        ).fetchone() or (0, 0, 0, 0)
        indexes = dict(
            self.conn.execute(
                "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                "WHERE relname = %s",
                (table,),
            ).fetchall()
        )
        return Counters(
            lsn=self.scalar("SELECT pg_current_wal_lsn()::text"),
            inserts=ins,
            updates=upd,
            hot=hot,
            dead=dead,
            heap=self.scalar("SELECT pg_relation_size(%s)", (table,)),
            indexes=indexes,
        )

    def settled(self, table: str, inserts: int, updates: int) -> Counters:
        """The counters once the table's statistics show ``inserts`` and ``updates`` (closed
        backends flush theirs as they exit: poll with a deadline)."""
        box: list[Counters] = []

        def arrived() -> bool:
            box[:] = [self.counters(table)]
            return box[0].inserts >= inserts and box[0].updates >= updates

        if not wait_until(arrived, STATS_DEADLINE_S, 0.1):
            raise RuntimeError(f"statistics of {table} never showed {inserts} ins/{updates} upd")
        return box[0]

    def wal(self, start: str, end: str) -> dict[str, Any]:
        """WAL between two LSNs: the server's total and, with pg_walinspect, this database's."""
        total = int(self.scalar("SELECT pg_wal_lsn_diff(%s, %s)", (end, start)))
        if not self.walinspect:
            return {"total": total}
        wait_until(
            lambda: (
                self.scalar("SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), %s)", (end,)) >= 0
            ),
            10.0,
        )
        ours = f"rel [0-9]+/{self.db_oid}/"
        found = self.conn.execute(
            "WITH r AS (SELECT * FROM pg_get_wal_records_info(%s, %s)), "
            "x AS (SELECT DISTINCT xid FROM r WHERE block_ref ~ %s AND xid <> '0') "
            "SELECT resource_manager || '/' || split_part(record_type, ' ', 1), count(*), "
            "sum(record_length), sum(fpi_length) FROM r "
            "WHERE block_ref ~ %s OR xid IN (SELECT xid FROM x) GROUP BY 1",
            (start, end, ours, ours),
        ).fetchall()
        self.conn.execute("SELECT pg_replication_slot_advance(%s, %s)", (self.slot, end))
        kinds = {kind: {"records": c, "bytes": int(b), "fpi": int(f)} for kind, c, b, f in found}
        return {
            "total": total,
            "ours": sum(k["bytes"] for k in kinds.values()),
            "fpi": sum(k["fpi"] for k in kinds.values()),
            "kinds": kinds,
        }


@dataclasses.dataclass
class Phase:
    table: str
    phase: str
    n: int
    seconds: float
    wal_total: float  # bytes per task, whole server
    wal_ours: float | None  # bytes per task, this database (pg_walinspect)
    fpi: float | None  # of which full-page images
    updates: float  # per task
    hot: float
    dead: float
    heap: float  # bytes per task the heap grew
    indexes: float  # bytes per task the indexes grew
    kinds: dict[str, dict[str, float]]


def measure(
    server: Server, table: str, phase: str, n: int, run: Any, expect: tuple[int, int]
) -> Phase:
    before = server.counters(table)
    started = time.perf_counter()
    run()
    took = time.perf_counter() - started
    after = server.settled(table, before.inserts + expect[0], before.updates + expect[1])
    wal = server.wal(before.lsn, after.lsn)
    kinds = {
        kind: {"records": v["records"] / n, "bytes": v["bytes"] / n}
        for kind, v in sorted(wal.get("kinds", {}).items(), key=lambda kv: -kv[1]["bytes"])
    }
    return Phase(
        table=table,
        phase=phase,
        n=n,
        seconds=took,
        wal_total=wal["total"] / n,
        wal_ours=wal["ours"] / n if "ours" in wal else None,
        fpi=wal["fpi"] / n if "fpi" in wal else None,
        updates=(after.updates - before.updates) / n,
        hot=(after.hot - before.hot) / n,
        dead=(after.dead - before.dead) / n,
        heap=(after.heap - before.heap) / n,
        indexes=(sum(after.indexes.values()) - sum(before.indexes.values())) / n,
        kinds=kinds,
    )


# -- the runs -------------------------------------------------------------------------------


def run_audit(
    server: Server, url: str, label: str, name: str, work: list[Task], batch: int,
    fillfactor: int | None, spool: Path,
) -> list[Phase]:  # fmt: skip
    """Every phase into a freshly migrated audit table called ``name``."""
    engine = make_engine(url)
    try:
        upgrade(engine, name)
    finally:
        engine.dispose()
    server.conn.execute(f'ALTER TABLE "{name}" SET (autovacuum_enabled = off)')
    if fillfactor is not None:
        server.conn.execute(f'ALTER TABLE "{name}" SET (fillfactor = {int(fillfactor)})')
    settings = Settings.from_env(
        environ={}, audit_url=url, table_name=name, spool_dir=str(spool / name)
    )
    table = audit_table(name)
    n = len(work)
    results = []
    for phase in PHASES:
        db = Database(settings, table)
        db.engine()  # connect (and check the schema) before the phase, not in it
        if phase == "publish":

            def run(db: Database = db) -> None:
                for task in work:
                    db.insert_now(task.publish)
                db.dispose()  # closing the backend flushes its statistics

            expect = (n, 0)
        else:

            def run(db: Database = db, phase: str = phase) -> None:
                for at in range(0, n, batch):
                    db.upsert([t.phase(phase) for t in work[at : at + batch]])
                db.dispose()

            expect = (0, n)
        try:
            result = measure(server, name, phase, n, run, expect)
        finally:
            db.dispose()
        result.table = label
        results.append(result)
        print(f"  {label:<14} {phase:<9} {result.seconds:6.1f} s", flush=True)
    return results


def run_floor(server: Server, conninfo: str, work: list[Task]) -> Phase:
    """One prepared 4-column INSERT per task on a warm autocommit connection."""
    table = "floor_publish"
    server.conn.execute(FLOOR_DDL.format(t=table))
    server.conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    insert = FLOOR_INSERT.format(t=table)
    conn = psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME)

    def run() -> None:
        for task in work:
            row = task.publish
            params = (row["publish_id"], row["task_id"], row["task_name"], row["published_at"])
            conn.execute(insert, params, prepare=True)
        conn.close()

    try:
        result = measure(server, table, "publish", len(work), run, (len(work), 0))
    finally:
        conn.close()
    result.table = FLOOR
    print(f"  {FLOOR:<14} publish   {result.seconds:6.1f} s", flush=True)
    return result


# -- the report -----------------------------------------------------------------------------


def wal_of(p: Phase) -> float:
    return p.wal_ours if p.wal_ours is not None else p.wal_total


def print_report(results: list[Phase], floor: Phase) -> None:
    base = wal_of(floor)
    print(f"\nper task ({floor.n:,} tasks; WAL = this database's records, incl. full-page images)")
    print(
        f"{'table':<14} {'phase':<9} {'WAL B':>8} {'FPI B':>7} {'x floor':>8} {'upd':>5} "
        f"{'HOT':>5} {'dead':>5} {'heap B':>7} {'index B':>8} {'server WAL B':>13}"
    )
    for label in dict.fromkeys(p.table for p in results):
        mine = [p for p in results if p.table == label]
        total = Phase(
            label, "TOTAL", floor.n, sum(m.seconds for m in mine),
            sum(m.wal_total for m in mine), sum(wal_of(m) for m in mine),
            sum(m.fpi or 0 for m in mine), sum(m.updates for m in mine),
            sum(m.hot for m in mine), sum(m.dead for m in mine),
            sum(m.heap for m in mine), sum(m.indexes for m in mine), {},
        )  # fmt: skip
        for p in [*mine, total]:
            print(
                f"{p.table:<14} {p.phase:<9} {wal_of(p):8.0f} {p.fpi or 0:7.0f} "
                f"{wal_of(p) / base:8.2f} {p.updates:5.2f} {p.hot:5.2f} {p.dead:5.2f} "
                f"{p.heap:7.0f} {p.indexes:8.0f} {p.wal_total:13.0f}"
            )
    p = floor
    print(
        f"{FLOOR:<14} {'publish':<9} {wal_of(p):8.0f} {p.fpi or 0:7.0f} {1:8.2f} {0:5.2f} "
        f"{0:5.2f} {0:5.2f} {p.heap:7.0f} {p.indexes:8.0f} {p.wal_total:13.0f}"
    )
    if floor.kinds:
        print("\nWAL records per task, by kind (records x bytes):")
        for p in [*results, floor]:
            top = ", ".join(
                f"{k} {v['records']:.2f}x{v['bytes'] / max(v['records'], 1e-9):.0f}"
                for k, v in list(p.kinds.items())[:6]
            )
            print(f"  {p.table:<14} {p.phase:<9} {top}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=20_000, help="tasks")
    parser.add_argument(
        "--batch", type=int, default=200, help="rows per lifecycle batch (one flush_interval)"
    )
    parser.add_argument(
        "--fillfactors",
        default="100",
        help="comma-separated heap fillfactors to compare with the migrated table",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    add_pg_args(parser)
    return parser.parse_args(argv)


@contextlib.contextmanager
def scratch(args: argparse.Namespace) -> Iterator[tuple[Any, Server]]:
    with temp_database(args, "db_cost") as db:
        server = Server(db.conninfo)
        try:
            yield db, server
        finally:
            server.conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fillfactors = [int(f) for f in args.fillfactors.split(",") if f.strip()]
    print(f"building {args.n:,} tasks through the publish hook ...", flush=True)
    work = tasks(args.n)
    with scratch(args) as (db, server), tempfile.TemporaryDirectory() as spool:
        server.conn.execute("CHECKPOINT")
        migrated = run_audit(
            server, db.url, "audit", "audit_migrated", work, args.batch, None, Path(spool)
        )
        ff = server.scalar(
            "SELECT coalesce((SELECT option_value FROM pg_options_to_table(reloptions) "
            "WHERE option_name = 'fillfactor'), '100') FROM pg_class WHERE relname = %s",
            ("audit_migrated",),
        )
        for p in migrated:
            p.table = f"audit ff={ff}"
        results = list(migrated)
        for fillfactor in fillfactors:
            if str(fillfactor) == ff:
                continue
            results += run_audit(
                server, db.url, f"audit ff={fillfactor}", f"audit_ff{fillfactor}", work,
                args.batch, fillfactor, Path(spool),
            )  # fmt: skip
        floor = run_floor(server, db.conninfo, work)
    print_report(results, floor)
    ok = all(p.updates > 0.99 for p in results if p.phase != "publish")
    if args.json is not None:
        report = {
            "benchmark": "db_cost",
            "environment": environment_info(),
            "config": {"n": args.n, "batch": args.batch, "fillfactors": fillfactors},
            "phases": [dataclasses.asdict(p) for p in [*results, floor]],
            "targets": [],
            "ok": ok,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
