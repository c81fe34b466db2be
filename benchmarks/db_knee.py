"""How far one PostgreSQL goes: sync-mode publishers side by side, until throughput stops growing.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres`` and an
existing database ``test``)::

    .venv/bin/python benchmarks/db_knee.py [--procs 1,2,4,8] [--seconds 15] [--fillfactors 100]

Each level starts ``P`` processes at once against a freshly migrated audit table in a scratch
database (dropped at the end). A process is one publisher and the worker side of its tasks, on
the library's own write paths, with no broker:

* its publisher's :class:`AuditWriter`: one :meth:`Database.insert_now` per task (what sync mode
  does before each message goes to the broker: a prepared single-row upsert, one commit), timed,
  and the ``sent`` update, shipped by the writer's thread every ``--flush-interval``;
* a second writer for the worker's main process (``received``) and a third for its pool child
  (``started`` and ``finished``, merged when they fall in one flush interval, as for short tasks).

So every task costs the database what it costs in production: one synchronous commit and four
lifecycle updates in batches; each process holds four connections (sync, and one per shipping
thread). Processes publish as fast as they can (closed loop) for ``--warmup`` + ``--seconds``;
only the measured window counts. Printed per level: tasks/s in total and per process, the sync
insert's p50/p99, and where the CPU went (the publisher processes, the PostgreSQL backends of the
scratch database, and the whole machine from ``/proc/stat``). At the end every row must be there
and finished (the writers' last flush), else the run fails.

On a 2-core box the publishers and PostgreSQL share the same cores: the knee found is the
box's, not PostgreSQL's. ``--fillfactors`` repeats each level on a table altered to each
listed heap fillfactor (alternating with the migrated table, so noise hits both alike).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import statistics
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
    percentile,
    temp_database,
)
from db_cost import tasks

from otel_celery_publish import rows
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.sink.database import make_engine
from otel_celery_publish.sink.writer import AuditWriter

TICKS = os.sysconf("SC_CLK_TCK")
WORKER = "celery@bench-worker"


# -- one publisher process ------------------------------------------------------------------


def writer(url: str, table: str, spool: Path, role: str, flush_interval: float) -> AuditWriter:
    settings = Settings.from_env(
        environ={},
        audit_url=url,
        table_name=table,
        durability="sync",
        flush_interval=flush_interval,
        spool_dir=str(spool / role),
    )
    return AuditWriter(settings)


def publisher(
    url: str, table: str, spool: str, flush_interval: float, start_at: float, warmup: float,
    seconds: float, ready: Any, out: Any,
) -> None:  # fmt: skip
    """Publish as fast as possible from ``start_at`` for ``warmup + seconds``; report to ``out``."""
    template = tasks(1)[0].publish
    instance = str(uuid.uuid4())
    path = Path(spool) / str(os.getpid())
    pub = writer(url, table, path, "publisher", flush_interval)
    main = writer(url, table, path, "worker-main", flush_interval)
    child = writer(url, table, path, "worker-child", flush_interval)
    for w in (pub, main, child):
        w.start()
    # A warm sync connection and prepared statement, as a publisher has after its first task.
    one_task(template, instance, pub, main, child)
    ready.put(os.getpid())
    time.sleep(max(0.0, start_at - time.time()))
    measure_from = time.monotonic() + warmup
    stop = measure_from + seconds
    latencies: list[float] = []
    errors = done = 0
    cpu_start: float | None = None
    while (now := time.monotonic()) < stop:
        if cpu_start is None and now >= measure_from:
            cpu_start = sum(os.times()[:2])
        try:
            took = one_task(template, instance, pub, main, child)
        except Exception:
            errors += 1
            continue
        if now >= measure_from:
            latencies.append(took)
            done += 1
    cpu = sum(os.times()[:2]) - (cpu_start or 0.0)
    flushed = all(w.close(timeout=60) for w in (pub, main, child))
    out.put(
        {"pid": os.getpid(), "done": done, "errors": errors, "latencies": latencies,
         "cpu_s": cpu, "flushed": flushed}
    )  # fmt: skip


def one_task(
    template: dict[str, Any], instance: str, pub: AuditWriter, main: AuditWriter,
    child: AuditWriter,
) -> float:  # fmt: skip
    """One task's writes: the sync insert (timed, returned in seconds), then its updates."""
    task_id = str(uuid.uuid4())
    at = time.time()
    row = dict(
        template,
        publish_id=f"{random.getrandbits(128):032x}",
        task_id=task_id,
        root_id=task_id,
        published_at=rows.epoch_to_dt(at),
    )
    key: rows.RowKey = {
        "publish_id": row["publish_id"],
        "task_id": task_id,
        "task_name": row["task_name"],
        "published_at": row["published_at"],
    }
    started = time.perf_counter()
    pub.db.insert_now(row)
    took = time.perf_counter() - started
    pub.record_update(rows.sent(key, at), best_effort=True)
    main.record_update(rows.received(key, at + 0.004, WORKER, instance, acks_late=False))
    child.record_update(rows.started(key, at + 0.005, WORKER, instance, redelivered=False))
    child.record_update(rows.finished(key, at + 0.055, "succeeded", runtime_s=0.05))
    return took


# -- the parent -----------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / TICKS, sum(fields) / TICKS


def backend_cpu(conn: psycopg.Connection[Any], dbname: str) -> dict[int, float]:
    """CPU seconds so far of each backend connected to ``dbname`` (same host)."""
    pids = [
        r[0]
        for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
    ]
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            found[pid] = (float(parts[11]) + float(parts[12])) / TICKS
    return found


@dataclasses.dataclass
class Level:
    table: str
    procs: int
    tasks_per_s: float
    per_proc: float
    p50_ms: float
    p99_ms: float
    errors: int
    publisher_cpu: float  # cores busy in the publisher processes
    postgres_cpu: float  # cores busy in this database's backends
    machine_cpu: float  # cores busy on the whole machine
    rows_ok: bool


def run_level(
    db: Any, label: str, table: str, procs: int, fillfactor: int | None, args: argparse.Namespace
) -> Level:
    engine = make_engine(db.url)
    try:
        upgrade(engine, table)
    finally:
        engine.dispose()
    admin = psycopg.connect(db.conninfo, autocommit=True, application_name=APP_NAME)
    if fillfactor is not None:
        admin.execute(f'ALTER TABLE "{table}" SET (fillfactor = {int(fillfactor)})')
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    start_at = time.time() + 5.0 + procs  # after every child imported and connected
    with tempfile.TemporaryDirectory() as spool:
        timing = (args.flush_interval, start_at, args.warmup, args.seconds)
        children = [
            ctx.Process(
                target=publisher,
                args=(db.url, table, spool, *timing, ready, out),
            )
            for _ in range(procs)
        ]
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=60)
        if time.time() > start_at:
            raise RuntimeError("publishers took too long to start; raise the start delay")
        time.sleep(max(0.0, start_at + args.warmup - time.time()))
        pg_before, machine_before = backend_cpu(admin, db.name), machine_cpu()
        time.sleep(args.seconds)
        pg_after, machine_after = backend_cpu(admin, db.name), machine_cpu()
        results = [out.get(timeout=120 + args.seconds) for _ in children]
        for child in children:
            child.join(60)
    total, finished = admin.execute(
        f'SELECT count(*), count(finished_at) FROM "{table}"'
    ).fetchone() or (0, 0)
    admin.close()
    published = sum(r["done"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    machine = (machine_after[0] - machine_before[0]) / args.seconds
    # A backend that connected during the window (a pool growing) counts from zero.
    postgres = sum(pg_after[p] - pg_before.get(p, 0.0) for p in pg_after) / args.seconds
    # Every task published (warm-up and measured) has its row, finished: nothing was lost.
    rows_ok = all(r["flushed"] for r in results) and total == finished and total >= published
    return Level(
        table=label,
        procs=procs,
        tasks_per_s=published / args.seconds,
        per_proc=published / args.seconds / procs,
        p50_ms=percentile(latencies, 50) * 1000 if latencies else float("nan"),
        p99_ms=percentile(latencies, 99) * 1000 if latencies else float("nan"),
        errors=sum(r["errors"] for r in results),
        publisher_cpu=sum(r["cpu_s"] for r in results) / args.seconds,
        postgres_cpu=postgres,
        machine_cpu=machine,
        rows_ok=rows_ok,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--procs", default="1,2,4,8", help="publisher processes per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every level, alternating the tables"
    )
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument(
        "--fillfactors", default="", help="comma-separated heap fillfactors to compare with"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    add_pg_args(parser)
    return parser.parse_args(argv)


def medians(levels: list[Level]) -> list[Level]:
    """One level per table and process count: the median of its rounds, field by field."""
    grouped: dict[tuple[str, int], list[Level]] = {}
    for lv in levels:
        grouped.setdefault((lv.table, lv.procs), []).append(lv)
    out = []
    for (table, procs), found in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        values = {
            f.name: statistics.median(getattr(lv, f.name) for lv in found)
            for f in dataclasses.fields(Level)
            if f.name not in ("table", "procs", "rows_ok")
        }
        out.append(
            Level(table=table, procs=procs, rows_ok=all(lv.rows_ok for lv in found), **values)
        )
    return out


def print_levels(levels: list[Level]) -> None:
    cores = os.cpu_count()
    print(
        f"\nmedians of the rounds; {cores} cores; CPU columns are cores busy "
        "(the publishers and PostgreSQL share them)"
    )
    print(
        f"{'table':<14} {'procs':>5} {'tasks/s':>8} {'per proc':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'pub cpu':>7} {'pg cpu':>7} {'box cpu':>7} rows"
    )
    for lv in levels:
        print(
            f"{lv.table:<14} {lv.procs:>5} {lv.tasks_per_s:8.0f} {lv.per_proc:8.0f} "
            f"{lv.p50_ms:7.2f} {lv.p99_ms:7.2f} {lv.errors:>6} {lv.publisher_cpu:7.2f} "
            f"{lv.postgres_cpu:7.2f} {lv.machine_cpu:7.2f} {'ok' if lv.rows_ok else 'MISSING'}"
        )


@contextlib.contextmanager
def scratch(args: argparse.Namespace) -> Iterator[Any]:
    with temp_database(args, "db_knee") as db:
        yield db


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels_p = [int(p) for p in args.procs.split(",") if p.strip()]
    variants: list[tuple[str, int | None]] = [("audit", None)]
    variants += [(f"audit ff={f}", int(f)) for f in args.fillfactors.split(",") if f.strip()]
    levels = []
    with scratch(args) as db:
        for round_ in range(args.rounds):
            for procs in levels_p:
                order = variants if round_ % 2 == 0 else variants[::-1]
                for label, fillfactor in order:
                    table = f"knee_{round_}_{procs}_{fillfactor or 'm'}"
                    level = run_level(db, label, table, procs, fillfactor, args)
                    print(
                        f"  round {round_ + 1}: {label:<14} {procs} procs: "
                        f"{level.tasks_per_s:.0f} tasks/s, p50 {level.p50_ms:.2f} ms, "
                        f"p99 {level.p99_ms:.2f} ms",
                        flush=True,
                    )
                    levels.append(level)
    print_levels(medians(levels))
    ok = all(lv.rows_ok and lv.errors == 0 for lv in levels)
    if args.json is not None:
        report = {
            "benchmark": "db_knee",
            "environment": environment_info(),
            "config": {k: str(v) for k, v in vars(args).items()},
            "levels": [dataclasses.asdict(lv) for lv in levels],
            "targets": [],
            "ok": ok,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
