"""Audit table at production size: how fast are ``audit lost`` and ``audit stats``?

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres`` and an
existing database ``test``)::

    .venv/bin/python benchmarks/audit_scale.py [--rows 10000000] [--days 30] [--repeat 7]

The script creates a database of its own (``ocp_bench_<hex>``, dropped WITH (FORCE) at the end
unless ``--keep``), creates the audit table with the package's migrations
(``otel_celery_publish.schema.migrate.upgrade``), and loads ``--rows`` rows with ``COPY`` (the
secondary indexes are dropped for the load and re-created from the same ``schema.py``
definitions afterwards, then ``VACUUM ANALYZE`` and a ``CHECKPOINT``).

The rows look like a busy deployment: publishes evenly spread over ``--days`` days ending now
(10M over 30 days is ~14,000 an hour), 20 task names on 5 queues, realistic lifecycle gaps
(log-normal broker waits and run times), ~97% succeeded, 2% failed, 1% retried or revoked. One
row in 10,007 is stuck (in turn: never sent, never received, received and never started, started
and never finished) and the rows of the last two minutes are still in flight.

Measured, ``--repeat`` times each (min / median / max, milliseconds):

* ``lost (API call)``: ``otel_celery_publish.audit.lost(since=1 day, older_than=10 min)`` as
  the CLI calls it: engine, connection, schema check, query, dispose;
* ``lost (query)``: the same SELECT on a warm connection;
* ``stats (API call)`` / ``stats (query)``: ``audit.stats(since=1 hour)``, its three SELECTs.

Targets (issue #4): ``lost`` over the last day <= 50 ms, ``stats --since 1h`` <= 1 s, judged on
the API-call medians. An API call creates its engine and connection (~6 ms on loopback) and
checks the schema revision (~4 ms) before its query: that is what a CLI invocation pays. Then
``EXPLAIN (ANALYZE, BUFFERS)`` of every query is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.dialects import postgresql

from otel_celery_publish import audit
from otel_celery_publish.audit import _db, _lost, _stats
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import make_engine

TABLE = "celery_publish_audit"
COLUMNS = (
    "publish_id", "task_id", "task_name", "published_at", "attempt", "queue", "exchange",
    "routing_key", "payload", "content_type", "content_encoding", "payload_redacted", "options",
    "args_repr", "kwargs_repr", "publisher_host", "publisher_pid", "trace_id", "span_id",
    "sent_at", "received_at", "started_at", "finished_at", "outcome", "worker", "runtime_s",
)  # fmt: skip
STUCK_EVERY = 10_007
IN_FLIGHT_S = 120.0
PATTERNS = 8192
CHUNK = 50_000
NULL = "\\N"
TARGETS_MS = {"lost (API call)": 50.0, "stats (API call)": 1000.0}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=float, default=30.0, help="time span of the rows")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    parser.add_argument(
        "--admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a database to connect to for CREATE/DROP DATABASE",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def bench_database(admin_url: str, keep: bool) -> Iterator[str]:
    """A new database for this run; dropped at the end unless ``keep``."""
    name = f"ocp_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)).as_string())
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            with admin.connect() as conn:
                conn.exec_driver_sql(drop.as_string())
        admin.dispose()


# -- data -----------------------------------------------------------------------------------


_minute_prefix: dict[int, str] = {}


def iso(epoch: float) -> str:
    """PostgreSQL timestamptz text for ``epoch``; the 'YYYY-MM-DD HH:MM:' part is cached."""
    minute = int(epoch // 60)
    prefix = _minute_prefix.get(minute)
    if prefix is None:
        prefix = time.strftime("%Y-%m-%d %H:%M:", time.gmtime(minute * 60))
        _minute_prefix[minute] = prefix
    return f"{prefix}{epoch - minute * 60:09.6f}+00"


def lifecycle_patterns(rng: random.Random) -> list[tuple[Any, ...]]:
    """(task, queue, worker, sent, received, started, run, outcome) offsets in seconds."""
    tasks = [f"proj.tasks.task_{n:02d}" for n in range(20)]
    outcomes = ["succeeded"] * 970 + ["failed"] * 20 + ["retried"] * 8 + ["revoked"] * 2
    patterns = []
    for _ in range(PATTERNS):
        task = rng.choice(tasks)
        sent = rng.uniform(0.0003, 0.002)
        received = sent + rng.lognormvariate(math.log(0.004), 1.2)
        started = received + rng.lognormvariate(math.log(0.0005), 1.0)
        run = rng.lognormvariate(math.log(0.05), 1.5)
        patterns.append(
            (task, f"queue-{hash(task) % 5}", f"worker-{rng.randrange(8)}@host", sent, received,
             started, run, rng.choice(outcomes))
        )  # fmt: skip
    return patterns


def lines(start: int, stop: int, first: float, step: float, end: float, patterns: list[Any]) -> str:
    """COPY text rows ``start``..``stop`` (row i published at ``first + i * step``)."""
    out = []
    for i in range(start, stop):
        task, queue, worker, sent, received, started, run, outcome = patterns[i % PATTERNS]
        published = first + i * step
        times: list[float | None] = [published + sent, published + received]
        times += [published + started, published + started + run]
        runtime: float | None = run
        if i % STUCK_EVERY == 0:
            stage = (i // STUCK_EVERY) % 4  # 0: not sent, 1: not received, 2, 3: not started/...
            times[stage:] = [None] * (4 - stage)
            runtime, outcome = None, None
        elif published > end - IN_FLIGHT_S:
            times[3], runtime, outcome = None, None, None
        stamps = [NULL if t is None else iso(t) for t in times]
        out.append(
            f"{i:08x}-0000-4000-8000-{i:012x}\t{i:08x}-1111-4000-8000-{i:012x}\t{task}\t"
            f"{iso(published)}\t0\t{queue}\t\t{queue}\t\\\\x5b5b322c335d2c7b7d2c7b7d5d\t"
            f'application/json\tutf-8\tf\t{{"serializer": "json"}}\t(2, 3)\t{{}}\tweb-1\t'
            f"4242\t{i:032x}\t{i:016x}\t{stamps[0]}\t{stamps[1]}\t{stamps[2]}\t{stamps[3]}\t"
            f"{outcome or NULL}\t{worker}\t{NULL if runtime is None else f'{runtime:.6f}'}\n"
        )
    return "".join(out)


def load(engine: Engine, rows: int, days: float, seed: int) -> float:
    """Migrate, COPY ``rows`` rows, rebuild indexes, VACUUM ANALYZE; return "now" (epoch)."""
    upgrade(engine, TABLE)
    table = audit_table(TABLE)
    end = time.time()
    step = days * 86400 / rows
    first = end - rows * step
    patterns = lifecycle_patterns(random.Random(seed))
    with engine.connect() as conn:
        for index in table.indexes:
            index.drop(conn)
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(TABLE), sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    )
    started = time.monotonic()
    raw = psycopg.connect(engine.url.render_as_string(hide_password=False).replace("+psycopg", ""))
    with raw, raw.cursor() as cur, cur.copy(copy) as stream:
        for chunk in range(0, rows, CHUNK):
            stream.write(lines(chunk, min(rows, chunk + CHUNK), first, step, end, patterns))
            if chunk and chunk % 1_000_000 == 0:
                print(f"  copied {chunk:,} rows ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"  COPY of {rows:,} rows: {time.monotonic() - started:.1f} s", flush=True)
    started = time.monotonic()
    with engine.connect() as conn:
        for index in table.indexes:
            index.create(conn)
    print(f"  indexes rebuilt: {time.monotonic() - started:.1f} s", flush=True)
    raw = psycopg.connect(
        engine.url.render_as_string(hide_password=False).replace("+psycopg", ""), autocommit=True
    )
    with raw:
        raw.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))
        # Flush the load's dirty pages now, so no checkpoint competes with the measurements.
        raw.execute("CHECKPOINT")
    return end


# -- measurements ---------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Run ``fn`` once to warm up, then ``repeat`` times; milliseconds per run and last result."""
    result = fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, result


def explain(db: _db.TableAccess, label: str, stmt: Any) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) with the statement's parameters bound by the driver."""
    compiled = stmt.compile(dialect=postgresql.psycopg.dialect())
    with db.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), dict(compiled.params)
        ).scalars()
        print(f"\n-- EXPLAIN {label}\n" + "\n".join(plan))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_database(args.admin_url, args.keep) as url:
        engine = make_engine(url)
        print(f"loading {args.rows:,} rows over {args.days:g} days into {url} ...", flush=True)
        end = load(engine, args.rows, args.days, args.seed)
        now = dt.datetime.fromtimestamp(end, dt.timezone.utc)
        settings = Settings.from_env(environ={}, audit_url=url, table_name=TABLE)
        day, hour = dt.timedelta(days=1), dt.timedelta(hours=1)
        lost_args = {"since": day, "older_than": dt.timedelta(minutes=10), "now": now}
        results: dict[str, list[float]] = {}
        with _db.open_db(settings) as db:
            t = db.table
            total, unfinished = db.rows(
                select(func.count(), func.count().filter(t.c.finished_at.is_(None)))
            )[0]
            size = db.rows(select(func.pg_size_pretty(func.pg_total_relation_size(TABLE))))[0][0]
            print(f"\n{total:,} rows ({unfinished:,} unfinished), table + indexes {size}")
            lost_stmt = _lost.lost_query(db, until=None, **lost_args).limit(100)
            stats_stmts = _stats.queries(db, now - hour, now)
            results["lost (query)"], found = timed(lambda: db.rows(lost_stmt), args.repeat)
            results["stats (query)"], _ = timed(
                lambda: [db.rows(s) for s in stats_stmts.values()], args.repeat
            )
        results["lost (API call)"], _ = timed(
            lambda: audit.lost(settings=settings, **lost_args), args.repeat
        )
        results["stats (API call)"], summary = timed(
            lambda: audit.stats(settings=settings, since=hour, now=now), args.repeat
        )
        print(f"lost over the last day: {len(found)} task(s); stats over the last hour: "
              f"{summary.count:,} attempt(s) in {len(summary.groups)} group(s)\n")  # fmt: skip
        print(f"{'measurement':<20} {'min':>9} {'median':>9} {'max':>9}   target")
        ok = True
        for label, samples in results.items():
            target = TARGETS_MS.get(label)
            verdict = ""
            if target is not None:
                passed = statistics.median(samples) <= target
                ok = ok and passed
                verdict = f"<= {target:g} ms {'PASS' if passed else 'FAIL'}"
            print(
                f"{label:<20} {min(samples):9.2f} {statistics.median(samples):9.2f} "
                f"{max(samples):9.2f}   {verdict}"
            )
        with _db.open_db(settings) as db:
            explain(db, "lost (last day)", lost_stmt)
            for name, stmt in stats_stmts.items():
                explain(db, f"stats {name} (last hour)", stmt)
            with db.engine.connect() as conn:
                print("\n-- indexes")
                for name, idx_size in conn.execute(
                    text(
                        "SELECT indexrelname, pg_size_pretty(pg_relation_size(indexrelid)) "
                        "FROM pg_stat_user_indexes WHERE relname = :t ORDER BY indexrelname"
                    ),
                    {"t": TABLE},
                ):
                    print(f"   {name}: {idx_size}")
        engine.dispose()
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
