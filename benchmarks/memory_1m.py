"""Memory over a million publishes: does the plugin's footprint stay flat in spool mode?

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres``, an
existing database ``test``; no broker needed)::

    .venv/bin/python benchmarks/memory_1m.py [--n 1000000] [--json out.json]

One process publishes ``--n`` tasks with ``apply_async`` (after ``--warmup`` unmeasured ones),
instrumented with ``durability="spool"`` (``--durability`` to try another mode), auditing into a
fresh PostgreSQL database that is up the whole time, so the background thread ships the spool
while we publish, as in production. Spans go through a real SDK ``TracerProvider`` and
``BatchSpanProcessor`` into an exporter that drops them.

The broker is ``benchnull://``: kombu's in-memory transport with the final enqueue removed.
Every publish runs through Celery and kombu in full (signals, serialization, ``basic_publish``,
exchange routing); only the message is dropped instead of queued, so a million messages do not
pile up in this process and the memory measured is the publisher's and the plugin's alone.
(A real broker would add its client's buffers, the same with or without the plugin.)

RSS is read from ``/proc/self/statm`` (no psutil) right after a ``gc.collect()``: once after the
warm-up (the baseline: connections, caches, prepared statements, the first spool segment and the
thread are all there), every ``--sample-every`` publishes, and at the end *before* flushing
(steady state, the spool thread still working), then again after the writer has caught up. The
target (issue #3) is RSS growth < 10 MB from the baseline to the end over 1M publishes. The
peak (``ru_maxrss``) and the spool backlog (bytes appended but not yet shipped) at each sample
are printed too: a growing backlog is disk, not memory, but says whether shipping keeps up.

``--mode bare`` runs the same loop without the plugin: the control for Celery's own growth.

Verified at the end: the audit table holds one row per publish (warm-up included) with
``sent_at`` set, no spool segment is left after ``uninstrument()``, no internal error was
swallowed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    DroppingExporter,
    add_pg_args,
    environment_info,
    max_rss_bytes,
    pg_scalar,
    print_targets,
    register_null_transport,
    rss_bytes,
    target,
    temp_database,
)
from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_publish import CeleryPublishInstrumentor, _guard
from otel_celery_publish.sink.spool import SUFFIX

TASK_NAME = "bench.noop"
TABLE = "celery_publish_audit"
GROWTH_LIMIT_MB = 10.0
MB = 1 << 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="measured publishes")
    parser.add_argument("--warmup", type=int, default=50_000, help="publishes before baseline")
    parser.add_argument("--sample-every", type=int, default=100_000)
    parser.add_argument("--mode", choices=("plugin", "bare"), default="plugin")
    parser.add_argument("--durability", choices=("spool", "async", "sync"), default="spool")
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write results to this file")
    add_pg_args(parser)
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.sample_every < 1:
        parser.error("--n and --sample-every must be >= 1, --warmup >= 0")
    return args


def backlog(writer: Any) -> int | None:
    """Spool bytes appended but not shipped yet (private attributes: benchmark only)."""
    spool = getattr(writer, "_spool", None)
    if spool is None:
        return None
    return int(spool.size - spool.shipped)


def sample(label: str, done: int, started: float, writer: Any) -> dict[str, Any]:
    gc.collect()
    point = {
        "label": label,
        "publishes": done,
        "elapsed_s": time.monotonic() - started,
        "rss_bytes": rss_bytes(),
        "max_rss_bytes": max_rss_bytes(),
        "spool_backlog_bytes": backlog(writer) if writer is not None else None,
    }
    print(
        f"{label:>12} {done:>9} {point['elapsed_s']:>8.1f}s rss {point['rss_bytes'] / MB:8.2f} MiB"
        f"  peak {point['max_rss_bytes'] / MB:8.2f} MiB  backlog "
        + (
            "-"
            if point["spool_backlog_bytes"] is None
            else f"{point['spool_backlog_bytes'] / MB:.1f} MiB"
        ),
        file=sys.stderr,
        flush=True,
    )
    return point


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 - one linear script
    args = parse_args(argv)
    wall_start = time.monotonic()
    internal_errors: list[str] = []
    _guard.on_internal_error = lambda where, exc: internal_errors.append(f"{where}: {exc!r}")
    app = Celery("memory_1m_bench", broker=register_null_transport(), set_as_current=True)
    app.conf.update(task_ignore_result=True, task_serializer="json")

    @app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
    def noop(x: int, y: int) -> None:
        return None

    exporter = DroppingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    instrumentor = CeleryPublishInstrumentor()
    samples: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="memory_1m_") as tmp,
        temp_database(args, "bench_memory") as db,
    ):
        spool_dir = Path(tmp) / "spool"
        writer = None
        if args.mode == "plugin":
            instrumentor.instrument(
                tracer_provider=provider,
                audit_url=db.url,
                durability=args.durability,
                spool_dir=str(spool_dir),
                flush_interval=args.flush_interval,
            )
            writer = instrumentor.writer
        publish = noop.apply_async
        print(
            f"memory_1m: mode={args.mode} durability={args.durability} n={args.n} "
            f"warmup={args.warmup}",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        for i in range(args.warmup):
            publish(args=(i, 2))
        if writer is not None:
            writer.flush(60.0)
        samples.append(sample("baseline", 0, started, writer))
        started = time.monotonic()
        for i in range(1, args.n + 1):
            publish(args=(i, 2))
            if i % args.sample_every == 0 and i != args.n:
                samples.append(sample("progress", i, started, writer))
        publish_s = time.monotonic() - started
        samples.append(sample("end", args.n, started, writer))
        flush_s = 0.0
        flushed = True
        if writer is not None:
            flush_started = time.monotonic()
            flushed = writer.flush(600.0)
            flush_s = time.monotonic() - flush_started
            samples.append(sample("after flush", args.n, started, writer))
        provider.force_flush(30_000)
        correctness: dict[str, Any] = {"flushed": flushed}
        if writer is not None:
            instrumentor.uninstrument()
            rows, sent = pg_scalar(
                db.conninfo, f"SELECT ARRAY[count(*), count(sent_at)] FROM {TABLE}"
            )
            left = sorted(p.name for p in spool_dir.rglob(f"*{SUFFIX}"))
            expected = args.warmup + args.n
            correctness |= {
                "publishes": expected,
                "audit_rows": rows,
                "rows_with_sent_at": sent,
                "spool_segments_left": len(left),
                "spans_exported": exporter.names.get(f"send {TASK_NAME}", 0),
                "internal_errors": internal_errors[:20],
            }
            correctness["complete"] = (
                flushed and rows == sent == expected and not left and not internal_errors
            )
        else:
            correctness["complete"] = True
        provider.shutdown()
    wall = time.monotonic() - wall_start

    base, end = samples[0], next(s for s in samples if s["label"] == "end")
    growth_mb = (end["rss_bytes"] - base["rss_bytes"]) / MB
    summary = {
        "rss_baseline_mib": base["rss_bytes"] / MB,
        "rss_end_mib": end["rss_bytes"] / MB,
        "rss_growth_mb": growth_mb,
        "rss_after_flush_mib": samples[-1]["rss_bytes"] / MB,
        "peak_rss_mib": max_rss_bytes() / MB,
        "publish_s": publish_s,
        "publishes_per_s": args.n / publish_s,
        "us_per_publish": publish_s / args.n * 1e6,
        "flush_s": flush_s,
    }
    targets = []
    if args.mode == "plugin":
        targets.append(
            target(
                f"RSS growth over {args.n:,} publishes ({args.durability})",
                growth_mb,
                GROWTH_LIMIT_MB,
                at_most=True,
                unit=" MiB",
            )
        )

    print()
    print(f"{'sample':>12} {'publishes':>10} {'elapsed s':>10} {'RSS MiB':>9} {'backlog MiB':>12}")
    for s in samples:
        b = s["spool_backlog_bytes"]
        print(
            f"{s['label']:>12} {s['publishes']:>10} {s['elapsed_s']:>10.1f} "
            f"{s['rss_bytes'] / MB:>9.2f} {'-' if b is None else f'{b / MB:.1f}':>12}"
        )
    print()
    print(
        f"RSS baseline {summary['rss_baseline_mib']:.2f} MiB, end {summary['rss_end_mib']:.2f} "
        f"MiB, growth {growth_mb:+.2f} MiB; after flush {summary['rss_after_flush_mib']:.2f} MiB; "
        f"peak {summary['peak_rss_mib']:.2f} MiB"
    )
    print(
        f"{args.n:,} publishes in {publish_s:.1f}s ({summary['publishes_per_s']:,.0f}/s, "
        f"{summary['us_per_publish']:.0f} us each); final flush {flush_s:.1f}s"
    )
    print(f"correctness: {correctness}")
    if targets:
        print()
        print_targets(targets)
    print(f"\nwall time {wall:.1f}s")
    if args.json is not None:
        report = {
            "benchmark": "memory_1m",
            "config": {
                "n": args.n,
                "warmup": args.warmup,
                "sample_every": args.sample_every,
                "mode": args.mode,
                "durability": args.durability,
                "flush_interval": args.flush_interval,
                "broker": "benchnull:// (kombu memory transport, messages dropped)",
                **environment_info(),
            },
            "summary": summary,
            "samples": samples,
            "targets": targets,
            "correctness": correctness,
            "ok": correctness["complete"],
            "wall_s": wall,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if correctness["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
