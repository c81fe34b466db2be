"""Helpers shared by the benchmark scripts in this directory (not part of the library).

The scripts run as ``python benchmarks/<name>.py``, so this directory is on ``sys.path`` and they
import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import memory as kombu_memory
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

# Our own connections carry this name, so whatever else is connected to a benchmark database
# belongs to the code under test.
APP_NAME = "otel_celery_publish_bench"
NULL_BROKER_URL = "benchnull://"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- PostgreSQL ----------------------------------------------------------------------------------


def add_pg_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--pg-admin-db", default="test", help="database to CREATE DATABASE from")


@dataclass(frozen=True)
class Database:
    """A throw-away PostgreSQL database: libpq conninfo and SQLAlchemy URL."""

    name: str
    conninfo: str
    url: str


def database_named(args: argparse.Namespace, name: str) -> Database:
    """Where database ``name`` is (or will be) on the benchmark's server."""
    server = f"host={args.pg_host} port={args.pg_port} user={args.pg_user}"
    return Database(
        name=name,
        conninfo=f"{server} dbname={name}",
        url=f"postgresql+psycopg://{args.pg_user}@{args.pg_host}:{args.pg_port}/{name}",
    )


def fresh_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def temp_database(args: argparse.Namespace, prefix: str = "bench") -> Iterator[Database]:
    """Create a fresh database, yield it, drop it WITH (FORCE) whatever happens."""
    with created_database(args, fresh_name(prefix)) as db:
        yield db


@contextlib.contextmanager
def created_database(args: argparse.Namespace, name: str) -> Iterator[Database]:
    """Create database ``name`` (which must not exist), yield it, drop it WITH (FORCE)."""
    server = f"host={args.pg_host} port={args.pg_port} user={args.pg_user}"
    with psycopg.connect(
        f"{server} dbname={args.pg_admin_db}", autocommit=True, application_name=APP_NAME
    ) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield database_named(args, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_scalar(conninfo: str, sql: str, params: Sequence[Any] = ()) -> Any:
    with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
        row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


# -- statistics and verdicts ---------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def target(
    name: str, value: float | None, limit: float, *, at_most: bool, unit: str = "x"
) -> dict[str, Any]:
    """One issue target: ``value`` against ``limit``; ``at_most`` says which side passes."""
    if value is None or math.isnan(value):
        verdict = "n/a"
    elif at_most:
        verdict = "PASS" if value <= limit else "FAIL"
    else:
        verdict = "PASS" if value >= limit else "FAIL"
    return {
        "target": name,
        "value": value,
        "limit": limit,
        "rule": f"{'<=' if at_most else '>='} {limit:g}{unit}",
        "verdict": verdict,
    }


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    print("targets:")
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        note = f"; {t['note']}" if t.get("note") else ""
        print(f"  [{t['verdict']:>4}] {t['target']}: {value} (target {t['rule']}{note})")


def environment_info() -> dict[str, Any]:
    import celery  # noqa: PLC0415 - only for the version string
    import kombu  # noqa: PLC0415
    import sqlalchemy  # noqa: PLC0415

    import otel_celery_publish  # noqa: PLC0415

    return {
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "otel_celery_publish": otel_celery_publish.__version__,
    }


def git_state() -> str:
    """The commit the library was measured at, ``+dirty`` when src/ has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def wait_until(check: Callable[[], bool], deadline_s: float, every_s: float = 0.05) -> bool:
    """Poll ``check`` until it holds or ``deadline_s`` passes; True if it held."""
    deadline = time.monotonic() + deadline_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


# -- memory --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``, no psutil)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- a broker that drops every message -----------------------------------------------------------


class NullChannel(kombu_memory.Channel):
    """kombu's in-memory channel, except that published messages are dropped, not queued.

    Every publish still goes through Celery and kombu in full (signals, serialization,
    ``basic_publish``, exchange routing); only the final enqueue is skipped, so a million
    publishes do not keep a million messages in this process's memory.
    """

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        return None

    def _put_fanout(self, exchange: str, message: Any, routing_key: Any = None, **kw: Any) -> None:
        return None

    def _size(self, queue: str) -> int:
        return 0


class NullTransport(kombu_memory.Transport):
    Channel = NullChannel
    driver_type = driver_name = "benchnull"


def register_null_transport() -> str:
    """Make ``benchnull://`` resolvable by kombu in this process; return the broker URL."""
    TRANSPORT_ALIASES["benchnull"] = f"{__name__}:NullTransport"
    return NULL_BROKER_URL


# -- telemetry -----------------------------------------------------------------------------------


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
