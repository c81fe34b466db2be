"""Worker throughput: how many no-op tasks per second does a worker drain, bare vs the plugin?

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with trust
auth for ``postgres`` and an existing database ``test``)::

    .venv/bin/python benchmarks/worker_throughput.py [--n 5000] [--rounds 3] [--json out.json]

This file is also the Celery app the measured workers run (``celery -A worker_throughput
worker``, with this directory on ``PYTHONPATH``); it instruments itself at import only when the
environment says so (``WT_MODE``).

Per block (one pool, one mode):

1. Pre-publish ``--n`` ``bench.noop()`` tasks and one ``bench.done(key)`` sentinel to a fresh
   Redis queue. In ``plugin`` blocks this process publishes instrumented (``durability="async"``,
   flushed and uninstrumented before the worker starts), so the messages carry the plugin's
   headers and the publish rows exist; in ``otel-official`` blocks it publishes with
   opentelemetry-instrumentation-celery; in ``bare`` blocks nothing is instrumented.
2. Start a real ``celery worker`` (``-P solo``, or ``-P prefork -c 2``; ``-l WARNING``, no
   gossip/mingle/heartbeat, default prefetch) consuming only an empty queue, and wait until it
   answers ``ping``: imports, pool start-up and broker connection are not measured.
3. **Timed:** ``control.add_consumer(<the queue>)``, then wait for the sentinel. The sentinel
   writes its ``time.time()`` to Redis when it runs; the block's time is from just before
   ``add_consumer`` to that value. FIFO order makes the sentinel the last task (under prefork the
   other child may still be finishing one last no-op: one task in ``--n``). The no-op does no I/O,
   so there is no per-task counter to dilute the difference between the modes.
4. ``plugin`` only: also wait until the audit table shows ``finished_at`` on all ``n + 1`` rows
   (polled every 50 ms): ``audit tasks/s`` counts the batched lifecycle writes' lag too (they
   ship every ``flush_interval``, 1 s by default).
5. Check the worker's own count (``inspect().stats()['total']``: ``n`` no-ops and one sentinel),
   stop it with SIGTERM (warm shutdown, which flushes the plugin), count the ``process`` spans
   the receiver got, and delete the queue.

The plugin worker: ``CeleryPublishInstrumentor().instrument()`` from the environment
(``OTEL_CELERY_PUBLISH_AUDIT_URL`` = a PostgreSQL database created for the run, a table and
``spool_dir`` per block, ``--durability``, default ``sync``: the worker's lifecycle writes are
batched from memory in every mode except ``spool``), with an SDK ``TracerProvider`` +
``BatchSpanProcessor`` and a ``MeterProvider``. Spans and metrics go, by default
(``--exporter otlp``), over OTLP/HTTP protobuf (the exporter the README recommends for prefork)
to a dummy receiver in this process that reads each request and answers 200 (bodies kept to count
spans after the block): serialization and HTTP cost what they cost in production.
``--exporter none`` drops spans in-process instead (and keeps metrics in memory), which isolates
the instrumentation from the export.

The ``otel-official`` worker (a reference point, not a target) runs
opentelemetry-instrumentation-celery with the same SDK setup: one consumer span per task, no
queue-wait spans, no database.

``--base-src DIR`` adds a ``plugin-base`` mode: the same plugin block, but the worker imports
the plugin from ``DIR`` (e.g. ``/tmp/base/src``, a checkout of the code before a change, put
first on the worker's ``PYTHONPATH``), so before and after are measured interleaved in one run.

Blocks are interleaved: each round runs every (pool, mode) block once, shuffled (``--seed``).
Reported per pool and mode: tasks/s per round, the median, the ratio of medians to ``bare``, and
the per-round paired ratios; then per pool the plugin's median over the official
instrumentation's and over bare. The targets (issue #12), judged on the medians of the worker's
tasks/s (step 3) of at least 3 rounds: plugin >= official and plugin >= 0.85x bare. ``audit
tasks/s`` (step 4) is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _common import (
    APP_NAME,
    DroppingExporter,
    add_pg_args,
    environment_info,
    print_targets,
    target,
    temp_database,
    wait_until,
)
from celery import Celery, signals

HERE = Path(__file__).resolve().parent
BROKER = os.environ.get("WT_BROKER", "redis://127.0.0.1:6379/12")
NOOP = "bench.noop"
DONE = "bench.done"
TARGET_X = 0.85
POOLS = {"solo": ("solo", 1), "prefork": ("prefork", 2)}
MODES = ("bare", "otel-official", "plugin", "plugin-base")
PLUGIN_MODES = {"plugin", "plugin-base"}

app = Celery("worker_throughput_bench", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
_redis: Any = None


@app.task(name=NOOP)  # type: ignore[untyped-decorator]
def noop() -> None:
    return None


@app.task(name=DONE)  # type: ignore[untyped-decorator]
def done(key: str) -> None:
    """The sentinel: the last message of a block, stamps the time it ran."""
    global _redis  # noqa: PLW0603 - one client per worker process, made lazily after fork
    if _redis is None:
        import redis  # noqa: PLC0415

        _redis = redis.Redis.from_url(BROKER)
    _redis.set(key, repr(time.time()))


def _instrument_worker(mode: str) -> None:
    """In an instrumented worker (``WT_MODE``): the SDK and the plugin or the official
    instrumentation, configured in code."""
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import (  # noqa: PLC0415
        InMemoryMetricReader,
        MetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter  # noqa: PLC0415

    from otel_celery_publish import CeleryPublishInstrumentor  # noqa: PLC0415

    resource = Resource.create({"service.name": "worker-throughput-bench"})
    reader: MetricReader
    exporter: SpanExporter
    if os.environ.get("WT_EXPORTER") == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    else:
        exporter = DroppingExporter()
        reader = InMemoryMetricReader()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    if mode == "plugin":
        CeleryPublishInstrumentor().instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider
        )
    else:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415

        CeleryInstrumentor().instrument(  # type: ignore[no-untyped-call]
            tracer_provider=tracer_provider, meter_provider=meter_provider
        )

        # Pool children leave with os._exit: flush their spans first, as the plugin does.
        def flush(**_: Any) -> None:
            tracer_provider.force_flush(5000)

        signals.worker_process_shutdown.connect(flush, weak=False)


if os.environ.get("WT_MODE") in {"plugin", "otel-official"}:
    _instrument_worker(os.environ["WT_MODE"])


# -- the dummy OTLP receiver ---------------------------------------------------------------------


@dataclass
class Receiver:
    """Answers every POST with 200 and keeps the bodies, decoded only after a block."""

    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> list[tuple[str, bytes]]:
        with self.lock:
            out, self.bodies = self.bodies, []
        return out


@contextlib.contextmanager
def receiver_server() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            with receiver.lock:
                receiver.bodies.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def span_names(bodies: Sequence[tuple[str, bytes]]) -> Counter[str]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )

    names: Counter[str] = Counter()
    for path, body in bodies:
        if path.endswith("/v1/traces"):
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    names.update(s.name for s in ss.spans)
    return names


# -- one block -----------------------------------------------------------------------------------


@dataclass
class Run:
    """What every block needs: the run's database, temp dir, Redis, receiver, publisher."""

    args: argparse.Namespace
    db_url: str
    db_conninfo: str
    tmp: Path
    redis: Any
    receiver: Receiver | None
    endpoint: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


def publish_block(run: Run, queue: str, key: str, mode: str, table: str) -> float:
    """Pre-publish n no-ops and the sentinel; return the seconds it took (not measured)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    from otel_celery_publish import CeleryPublishInstrumentor  # noqa: PLC0415

    instrumentor = CeleryPublishInstrumentor()
    official = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    if mode == "otel-official":
        official.instrument(tracer_provider=provider)
    if mode in PLUGIN_MODES:
        instrumentor.instrument(
            tracer_provider=provider,
            audit_url=run.db_url,
            table_name=table,
            durability="async",
            spool_dir=str(run.tmp / "spool" / "publisher"),
        )
    started = time.monotonic()
    try:
        for _ in range(run.args.n):
            noop.apply_async(queue=queue)
        done.apply_async(args=(key,), queue=queue)
    finally:
        if mode == "otel-official":
            official.uninstrument()
        if mode in PLUGIN_MODES:
            if not instrumentor.writer.flush(60.0):
                raise RuntimeError("publisher's audit writer did not flush")
            instrumentor.uninstrument()
        provider.shutdown()
    return time.monotonic() - started


def ping(node: str) -> bool:
    return any(node in reply for reply in app.control.ping(destination=[node], timeout=0.5))


def audit_counts(conninfo: str, table: str) -> tuple[int, int, int]:
    import psycopg  # noqa: PLC0415

    sql = (
        f'SELECT count(*), count(finished_at), count(*) FILTER (WHERE outcome = %s) FROM "{table}"'
    )
    with psycopg.connect(conninfo, autocommit=True, application_name=APP_NAME) as conn:
        try:
            row = conn.execute(sql, ("succeeded",)).fetchone()  # type: ignore[arg-type]
        except psycopg.errors.UndefinedTable:
            return (0, 0, 0)
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


def start_worker(
    run: Run, pool: str, mode: str, idle_queue: str, node: str, table: str, log: Path
) -> subprocess.Popen[bytes]:
    pool_name, concurrency = POOLS[pool]
    path = [str(HERE), os.environ.get("PYTHONPATH", "")]
    if mode == "plugin-base":
        path.insert(1, str(run.args.base_src))
    cmd = [sys.executable, "-m", "celery", "-A", "worker_throughput", "worker"]
    cmd += ["-P", pool_name, "-c", str(concurrency), "-Q", idle_queue, "-n", node, "-l", "WARNING"]
    cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "WT_BROKER": BROKER,
        "WT_MODE": "plugin" if mode in PLUGIN_MODES else mode,
        "WT_EXPORTER": run.args.exporter,
        "OTEL_CELERY_PUBLISH_AUDIT_URL": run.db_url,
        "OTEL_CELERY_PUBLISH_TABLE_NAME": table,
        "OTEL_CELERY_PUBLISH_DURABILITY": run.args.durability,
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": str(run.tmp / "spool" / node),
        "OTEL_EXPORTER_OTLP_ENDPOINT": run.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SDK_DISABLED": "false",
    }
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=HERE)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_block(run: Run, pool: str, mode: str, round_no: int) -> dict[str, Any]:  # noqa: PLR0915
    n = run.args.n
    tag = f"{run.run_id}.{round_no}.{pool}.{mode}"
    queue, idle_queue = f"bench.wt.{tag}", f"bench.wt.idle.{tag}"
    key = f"bench.wt.done.{tag}"
    node = f"wt-{pool}-{mode}-{round_no}-{run.run_id}@localhost"
    table = f"audit_{pool}_{mode.replace('-', '_')}_{round_no}"
    log = run.tmp / f"{node}.log"
    result: dict[str, Any] = {"round": round_no, "pool": pool, "mode": mode, "n": n}
    result["publish_s"] = publish_block(run, queue, key, mode, table)
    if mode in PLUGIN_MODES:
        rows = audit_counts(run.db_conninfo, table)[0]
        if rows != n + 1:
            raise RuntimeError(f"{tag}: {rows} publish rows before the worker, want {n + 1}")
    if run.receiver is not None:
        run.receiver.take()
    launched = time.monotonic()
    proc = start_worker(run, pool, mode, idle_queue, node, table, log)
    try:
        if not wait_until(lambda: proc.poll() is not None or ping(node), 120, 0.2):
            raise RuntimeError(f"{tag}: worker did not answer ping")
        if proc.poll() is not None:
            raise RuntimeError(f"{tag}: worker exited:\n{log.read_text(errors='replace')}")
        result["startup_s"] = time.monotonic() - launched
        t0 = time.time()
        app.control.add_consumer(queue, destination=[node], reply=True, timeout=5.0)
        deadline = max(120.0, n / 100)
        if not wait_until(lambda: run.redis.get(key) is not None, deadline, 0.005):
            raise RuntimeError(f"{tag}: sentinel never ran:\n{log.read_text(errors='replace')}")
        t_done = float(run.redis.get(key))
        result["seconds"] = t_done - t0
        result["tasks_per_s"] = (n + 1) / result["seconds"]
        if mode in PLUGIN_MODES:
            counts = (0, 0, 0)

            def audited() -> bool:
                nonlocal counts
                counts = audit_counts(run.db_conninfo, table)
                return counts[1] >= n + 1

            complete = wait_until(audited, 60.0, 0.05)
            t_audit = time.time()
            result["audit_seconds"] = t_audit - t0
            result["audit_tasks_per_s"] = (n + 1) / result["audit_seconds"]
            result["audit_rows"], result["audit_finished"], result["audit_succeeded"] = counts
            result["audit_complete"] = complete and counts == (n + 1, n + 1, n + 1)
        stats = app.control.inspect(destination=[node], timeout=5.0).stats() or {}
        result["worker_total"] = dict(stats.get(node, {}).get("total", {}))
    finally:
        stop_worker(proc)
        leftovers = list(run.redis.scan_iter(match=f"*{tag}*"))
        if leftovers:
            run.redis.delete(*leftovers)
    output = log.read_text(errors="replace")
    result["internal_errors_logged"] = output.count("otel-celery-publish internal error")
    result["worker_exit_code"] = proc.returncode
    if run.receiver is not None and mode != "bare":
        names = span_names(run.receiver.take())
        consumer_span = f"process {NOOP}" if mode in PLUGIN_MODES else f"run/{NOOP}"
        result["process_spans_received"] = names.get(consumer_span, 0)
        result["spans_received"] = sum(names.values())
    ok = result["worker_total"] == {NOOP: n, DONE: 1} and not result["internal_errors_logged"]
    if mode in PLUGIN_MODES:
        ok = ok and result["audit_complete"]
        result["spans_per_task"] = result.get("spans_received", 0) / (n + 1)
    result["complete"] = ok
    if not ok:
        result["worker_log_tail"] = output[-3000:]
    return result


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=5_000, help="no-op tasks per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pools", default="solo,prefork", help="comma-separated: solo,prefork")
    parser.add_argument(
        "--modes",
        default="bare,otel-official,plugin",
        help=f"comma-separated: {','.join(MODES)} (plugin-base: with --base-src)",
    )
    parser.add_argument("--durability", choices=("sync", "spool", "async"), default="sync")
    parser.add_argument("--exporter", choices=("otlp", "none"), default="otlp")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--base-src",
        type=Path,
        help="also run plugin-base: the worker imports the plugin from this src dir (before)",
    )
    parser.add_argument("--json", type=Path, help="also write results to this file")
    add_pg_args(parser)
    args = parser.parse_args(argv)
    args.pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    if set(args.pools) - set(POOLS) or not args.pools:
        parser.error(f"--pools: choose from {', '.join(POOLS)}")
    args.modes = [m for m in MODES if m in {m.strip() for m in args.modes.split(",")}]
    if args.base_src is not None and "plugin-base" not in args.modes:
        args.modes.append("plugin-base")
    if "plugin-base" in args.modes and not (args.base_src / "otel_celery_publish").is_dir():
        parser.error("plugin-base needs --base-src, a directory holding otel_celery_publish/")
    if not {"bare", "plugin"} <= set(args.modes):
        parser.error(f"--modes: bare and plugin at least, from {', '.join(MODES)}")
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be >= 1")
    return args


def summarize(
    blocks: Sequence[dict[str, Any]], pools: Sequence[str], modes: Sequence[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pool in pools:
        per: dict[str, Any] = {}
        for mode in modes:
            mine = [b for b in blocks if b["pool"] == pool and b["mode"] == mode]
            rates = [b["tasks_per_s"] for b in mine]
            per[mode] = {"tasks_per_s": rates, "median_tasks_per_s": statistics.median(rates)}
            if mode in PLUGIN_MODES:
                audit = [b["audit_tasks_per_s"] for b in mine]
                per[mode]["audit_tasks_per_s"] = audit
                per[mode]["median_audit_tasks_per_s"] = statistics.median(audit)
        bare, plugin = per["bare"], per["plugin"]
        by_round = {(b["round"], b["mode"]): b["tasks_per_s"] for b in blocks if b["pool"] == pool}
        rounds = sorted({r for r, _ in by_round})
        for mode in modes:
            per[mode]["vs_bare"] = per[mode]["median_tasks_per_s"] / bare["median_tasks_per_s"]
            per[mode]["paired_round_ratios_vs_bare"] = [
                by_round[r, mode] / by_round[r, "bare"] for r in rounds
            ]
        per["plugin_vs_bare"] = plugin["vs_bare"]
        if "otel-official" in per:
            official = per["otel-official"]["median_tasks_per_s"]
            for mode in PLUGIN_MODES & set(modes):
                per[mode]["vs_official"] = per[mode]["median_tasks_per_s"] / official
            per["plugin_vs_official"] = plugin["vs_official"]
        per["plugin_audit_vs_bare"] = (
            plugin["median_audit_tasks_per_s"] / bare["median_tasks_per_s"]
        )
        out[pool] = per
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import redis  # noqa: PLC0415

    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    wall_start = time.monotonic()
    blocks: list[dict[str, Any]] = []
    client = redis.Redis.from_url(BROKER)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="worker_tp_")))
        db = stack.enter_context(temp_database(args, "bench_worker"))
        receiver, endpoint = None, "http://127.0.0.1:9"
        if args.exporter == "otlp":
            receiver, endpoint = stack.enter_context(receiver_server())
        run = Run(args, db.url, db.conninfo, tmp, client, receiver, endpoint)
        print(
            f"worker_throughput: n={args.n} rounds={args.rounds} pools={','.join(args.pools)} "
            f"durability={args.durability} exporter={args.exporter} seed={seed}",
            file=sys.stderr,
            flush=True,
        )
        for round_no in range(1, args.rounds + 1):
            order = [(p, m) for p in args.pools for m in args.modes]
            rng.shuffle(order)
            for pool, mode in order:
                block = run_block(run, pool, mode, round_no)
                blocks.append(block)
                extra = (
                    f", audit {block['audit_tasks_per_s']:,.0f}/s" if mode in PLUGIN_MODES else ""
                )
                print(
                    f"round {round_no} {pool:<8} {mode:<13} {block['tasks_per_s']:>8,.0f} tasks/s"
                    f"{extra} (publish {block['publish_s']:.1f}s, start {block['startup_s']:.1f}s,"
                    f" ok={block['complete']})",
                    file=sys.stderr,
                    flush=True,
                )
    client.close()
    wall = time.monotonic() - wall_start
    summary = summarize(blocks, args.pools, args.modes)
    targets = []
    for pool in args.pools:
        t = target(
            f"{pool}: plugin tasks/s / bare tasks/s (medians)",
            summary[pool]["plugin_vs_bare"],
            TARGET_X,
            at_most=False,
        )
        t["note"] = f"audit-complete {summary[pool]['plugin_audit_vs_bare']:.2f}x"
        targets.append(t)
        if "plugin_vs_official" in summary[pool]:
            targets.append(
                target(
                    f"{pool}: plugin tasks/s / official tasks/s (medians)",
                    summary[pool]["plugin_vs_official"],
                    1.0,
                    at_most=False,
                )
            )

    print_report(args, summary, blocks, targets)
    bad = [b for b in blocks if not b["complete"]]
    print(f"wall time {wall:.1f}s")
    if args.json is not None:
        report = {
            "benchmark": "worker_throughput",
            "config": {
                "n": args.n,
                "rounds": args.rounds,
                "pools": {p: POOLS[p] for p in args.pools},
                "modes": args.modes,
                "durability": args.durability,
                "exporter": args.exporter,
                "seed": seed,
                "broker": BROKER,
                **environment_info(),
            },
            "summary": summary,
            "blocks": blocks,
            "targets": targets,
            "ok": not bad,
            "wall_s": wall,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if not bad else 1


def print_report(
    args: argparse.Namespace,
    summary: dict[str, Any],
    blocks: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
) -> None:
    print()
    header = (
        f"{'pool':<8} {'mode':<13} {'tasks/s per round':<22} {'median':>7} {'vs bare':>7} "
        f"{'paired vs bare':<20} {'audit tasks/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for pool in args.pools:
        per = summary[pool]
        for mode in args.modes:
            row = per[mode]
            rates = " ".join(f"{r:,.0f}" for r in row["tasks_per_s"])
            paired = " ".join(f"{r:.2f}" for r in row["paired_round_ratios_vs_bare"])
            audit = f"{row['median_audit_tasks_per_s']:,.0f}" if mode in PLUGIN_MODES else "-"
            print(
                f"{pool:<8} {mode:<13} {rates:<22} {row['median_tasks_per_s']:>7,.0f} "
                f"{row['vs_bare']:>7.3f} {paired:<20} {audit:>13}"
            )
    print()
    for pool in args.pools:
        per = summary[pool]
        for mode in args.modes:
            if mode in PLUGIN_MODES:
                official = per[mode].get("vs_official")
                vs_official = f"{official:.3f}" if official is not None else "n/a"
                vs_bare, rounds = per[mode]["vs_bare"], len(per[mode]["tasks_per_s"])
                print(
                    f"{pool:<8} {mode:<12} / official {vs_official}   / bare {vs_bare:.3f}"
                    f"   (medians of {rounds} rounds)"
                )
    print()
    print_targets(targets)
    bad = [b for b in blocks if not b["complete"]]
    spans = [
        (b["pool"], b["mode"], b["round"], b.get("process_spans_received"), args.n)
        for b in blocks
        if "process_spans_received" in b
    ]
    per_task = sorted(
        {(b["mode"], round(b["spans_per_task"], 2)) for b in blocks if "spans_per_task" in b}
    )
    if per_task:
        print("spans exported per task: " + ", ".join(f"{m} {k}" for m, k in per_task))
    if spans:
        print("\nconsumer spans received / tasks (pool mode round): " + ", ".join(
            f"{p} {m} r{r}: {got}/{n}" for p, m, r, got, n in spans
        ))  # fmt: skip
    print(f"\nblocks complete: {len(blocks) - len(bad)}/{len(blocks)}")
    for b in bad:
        shown = {k: v for k, v in b.items() if k != "worker_log_tail"}
        print(f"  INCOMPLETE {b['pool']} {b['mode']} round {b['round']}: {shown}")
        print(b.get("worker_log_tail", ""))


if __name__ == "__main__":
    sys.exit(main())
