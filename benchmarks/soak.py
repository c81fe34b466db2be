"""Soak: mixed publish + worker load for ``--duration`` with a database hang and an outage in
the middle. Not part of CI (10 minutes by default); ``make soak``.

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432)::

    .venv/bin/python benchmarks/soak.py [--duration 600] [--rate 100] [--mode sync]

Setup: a fresh PostgreSQL database behind a loopback TCP proxy (``tests/tcp_proxy.py``); a real
``celery -A tests.app worker`` (prefork, 2 children) and this process's publisher threads both
audit through the proxy. The publisher sends ``tests.add`` at ``--rate`` per second for the
whole run. At 30 % of the run the proxy **hangs** (accepts, forwards nothing, open connections
stall) for ``--hang-for`` seconds; at 60 % it **resets** (refuses and cuts every connection) for
``--outage-for`` seconds. Then publishing stops and the run waits (bounded) until every
published task's row is finished in the audit table.

Reported: publish latency p50 / p99 / max over the run and inside each fault window (the
promise: no publish held longer than ``DB_TIMEOUT`` plus a small constant); rows lost (published
task ids with no row: must be 0), rows duplicated, rows not finished; publisher and worker RSS at
start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import add_pg_args, percentile, pg_scalar, temp_database, wait_until  # noqa: E402
from tests.tcp_proxy import TcpProxy  # noqa: E402

BROKER = os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_worker(url: str, queue: str, spool: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": BROKER,
        "OCP_QUEUE": queue,
        "OCP_SETUP_SDK": "1",
        "OTEL_CELERY_PUBLISH_AUDIT_URL": url,
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": spool,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: export fails fast
        "OTEL_BSP_EXPORT_TIMEOUT": "100",
    }
    cmd = [sys.executable, "-m", "celery", "-A", "tests.app", "worker", "-P", "prefork", "-c", "2"]
    cmd += ["-Q", queue, "-n", f"soak-{uuid.uuid4().hex[:6]}@localhost", "-l", "WARNING"]
    cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stats(latencies: list[float]) -> dict[str, float | int]:
    ordered = sorted(latencies)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(ordered, 50) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


def main() -> int:  # noqa: PLR0915 - one linear scenario, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=100.0, help="publishes per second")
    parser.add_argument("--hang-for", type=float, default=30.0)
    parser.add_argument("--outage-for", type=float, default=30.0)
    parser.add_argument("--mode", default="sync", choices=["sync", "spool", "async"])
    parser.add_argument("--db-timeout", type=float, default=2.0)
    parser.add_argument("--json", help="also write the results here")
    add_pg_args(parser)
    args = parser.parse_args()

    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from tests.app import add, app  # noqa: PLC0415

    from otel_celery_publish import CeleryPublishInstrumentor  # noqa: PLC0415

    queue = f"soak-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue
    work = Path(tempfile.mkdtemp(prefix="ocp-soak-"))
    with temp_database(args, "soak") as db:
        proxy = TcpProxy((args.pg_host, args.pg_port)).start()
        url = db.url.replace(f"{args.pg_host}:{args.pg_port}", f"127.0.0.1:{proxy.port}")
        instrumentor = CeleryPublishInstrumentor()
        instrumentor.instrument(
            tracer_provider=TracerProvider(),
            audit_url=url,
            durability=args.mode,
            db_timeout=args.db_timeout,
            spool_dir=str(work / "spool"),
        )
        worker = start_worker(url, queue, str(work / "spool"), work / "worker.log")
        if not wait_until(lambda: bool(app.control.ping(timeout=0.5)), 60, 0.5):
            print((work / "worker.log").read_text(), file=sys.stderr)
            return 1
        windows = {
            "hang": (0.3 * args.duration, 0.3 * args.duration + args.hang_for),
            "outage": (0.6 * args.duration, 0.6 * args.duration + args.outage_for),
        }
        samples: list[tuple[float, float]] = []  # (offset since start, latency)
        task_ids: list[str] = []
        stop = threading.Event()
        rss = {"publisher_start": rss_of(os.getpid()), "worker_start": rss_of(worker.pid)}
        t0 = time.monotonic()

        def publish() -> None:
            interval = 1.0 / args.rate
            next_at = time.monotonic()
            while not stop.is_set():
                began = time.monotonic()
                result = add.apply_async((1, 2), queue=queue)
                samples.append((began - t0, time.monotonic() - began))
                task_ids.append(result.id)
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))  # pacing, not synchronisation

        def faults() -> None:
            for name, (begin, end) in sorted(windows.items(), key=lambda w: w[1][0]):
                if stop.wait(max(0.0, t0 + begin - time.monotonic())):
                    return
                print(f"{time.monotonic() - t0:7.1f}s  {name} starts", flush=True)
                proxy.hang() if name == "hang" else proxy.stop()
                if stop.wait(max(0.0, t0 + end - time.monotonic())):
                    return
                proxy.heal() if name == "hang" else proxy.start()
                print(f"{time.monotonic() - t0:7.1f}s  {name} ends", flush=True)

        threads = [threading.Thread(target=publish), threading.Thread(target=faults)]
        for thread in threads:
            thread.start()
        stop.wait(args.duration)
        stop.set()
        for thread in threads:
            thread.join()
        published = len(task_ids)
        print(f"published {published}; waiting for every row to finish", flush=True)
        instrumentor.writer.flush(30)

        def finished() -> int:
            return int(
                pg_scalar(
                    db.conninfo,
                    "SELECT count(*) FROM celery_publish_audit WHERE finished_at IS NOT NULL",
                )
            )

        wait_until(lambda: finished() >= published, 180, 1.0)
        rss["publisher_end"] = rss_of(os.getpid())
        rss["worker_end"] = rss_of(worker.pid)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        instrumentor.uninstrument()
        rows = pg_scalar(db.conninfo, "SELECT count(*) FROM celery_publish_audit")
        distinct = pg_scalar(
            db.conninfo, "SELECT count(DISTINCT task_id) FROM celery_publish_audit"
        )
        unfinished = pg_scalar(
            db.conninfo, "SELECT count(*) FROM celery_publish_audit WHERE finished_at IS NULL"
        )
        proxy.stop()
    result: dict[str, Any] = {
        "duration_s": args.duration,
        "rate": args.rate,
        "mode": args.mode,
        "db_timeout_s": args.db_timeout,
        "published": published,
        "rows_lost": published - int(distinct),
        "rows_duplicated": int(rows) - int(distinct),
        "rows_unfinished": int(unfinished),
        "latency_all": stats([lat for _, lat in samples]),
        **{
            f"latency_{name}": stats([lat for at, lat in samples if begin <= at < end])
            for name, (begin, end) in windows.items()
        },
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["rows_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
