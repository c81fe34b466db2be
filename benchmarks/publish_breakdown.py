"""Where a publish's added time goes: our hooks stage by stage, beside the official instrumentation.

Run from the repository root (no broker or database needed)::

    .venv/bin/python benchmarks/publish_breakdown.py [--n 5000] [--rounds 5] [--json out.json]
    .venv/bin/python benchmarks/publish_breakdown.py --instructions --n 1000

``publish_latency.py`` says how much a mode adds to ``apply_async``; this says what that is made
of, with the network out of the way: Celery publishes ``bench.noop`` through ``benchnull://``
(kombu's in-memory transport minus the queue, see ``_common``), so every microsecond measured
is CPU. Three modes, in an order shuffled per round: ``bare``; ``otel-official``
(opentelemetry-instrumentation-celery); ``plugin-spool`` (``durability="spool"`` into SQLite,
the shipping thread idle during the measured block: flushed after the warm-up, its interval an
hour). Spans go through a real SDK ``BatchSpanProcessor`` into an exporter that drops them.

Each mode and round times ``--n`` publishes twice: plain (the mode's added time per publish,
against bare's in the same round), then with timers around the stages (a few hundred ns each):

* ``hooks``: the publish signal receivers, ``before_task_publish`` plus ``after_task_publish``
  (for the official instrumentation, its two). The rest of the added time is outside them:
  Celery's signal dispatch, the larger message (our headers), the span processor's thread.
* Within our hooks: ``span`` (the SDK's ``start_span`` and ``end``), ``inject`` (our headers
  and the propagator's), ``row`` (building the audit row: payload encoding, reprs, options,
  redaction), ``record`` (the durable write: framing and the spool append), ``other`` (the
  rest: the publishing app and serializer, ids, the open-publish map, the "sent" update).

Figures are per publish, medians over rounds, in microseconds; the ratios compare our added
time and our hooks with the official instrumentation's. Times inflate two- to threefold in this
loop compared with each stage alone (caches: the whole of Celery runs between two calls), so
compare the rows with each other, not with a micro-benchmark. ``--json`` writes every round.

``--instructions`` counts instead of timing (needs valgrind): each mode runs under callgrind
twice, with ``--n`` publishes and with none, and the difference divided by ``--n`` is what one
publish costs in CPU instructions (every thread of the process; not the kernel's share). A
count does not move with what else the machine is doing, so it shows a change's effect where
timings on these machines cannot; ``--n 1000`` takes about four minutes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import DroppingExporter, environment_info, register_null_transport
from celery import Celery
from opentelemetry.instrumentation import celery as official
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.hooks import publish
from otel_celery_publish.sink.writer import AuditWriter

MODES = ("bare", "otel-official", "plugin-spool")
# stage -> the functions timed as that stage: (owner, attribute)
OUR_STAGES: dict[str, list[tuple[Any, str]]] = {
    "hooks": [(publish.PublishHooks, "before_publish"), (publish.PublishHooks, "after_publish")],
    "span": [(sdk_trace.Tracer, "start_span"), (sdk_trace.Span, "end")],
    "inject": [(publish, "_stamp")],
    "row": [(publish.rows, "publish_row")],
    "record": [(AuditWriter, "begin_publish")],
}
OFFICIAL_STAGES: dict[str, list[tuple[Any, str]]] = {
    "hooks": [
        (official.CeleryInstrumentor, "_trace_before_publish"),
        (official.CeleryInstrumentor, "_trace_after_publish"),
    ],
    "span": OUR_STAGES["span"],
}
STAGES = {"otel-official": OFFICIAL_STAGES, "plugin-spool": OUR_STAGES}


@contextlib.contextmanager
def timed(
    stages: dict[str, list[tuple[Any, str]]], spent: collections.Counter[str]
) -> Iterator[None]:
    """Wrap every stage's functions so that their time adds up in ``spent`` (ns)."""
    saved = []
    for stage, targets in stages.items():
        for owner, name in targets:
            original = owner.__dict__[name]
            saved.append((owner, name, original))

            def wrapper(*a: Any, _f: Any = original, _s: str = stage, **k: Any) -> Any:
                started = time.perf_counter_ns()
                try:
                    return _f(*a, **k)
                finally:
                    spent[_s] += time.perf_counter_ns() - started

            setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def enable(mode: str, provider: TracerProvider, tmp: str) -> Callable[[], None]:
    """Switch ``mode`` on; return what switches it off."""
    if mode == "otel-official":
        official.CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        return official.CeleryInstrumentor().uninstrument  # type: ignore[no-untyped-call,no-any-return]
    if mode == "plugin-spool":
        ours = CeleryPublishInstrumentor()
        ours.instrument(
            tracer_provider=provider,
            audit_url=f"sqlite:///{tmp}/audit.db",
            durability="spool",
            spool_dir=f"{tmp}/spool",
            flush_interval=3600.0,
        )
        return ours.uninstrument
    return lambda: None


def warm_up(mode: str, one: Callable[[], None], n: int) -> None:
    for _ in range(n):
        one()
    if mode == "plugin-spool":
        CeleryPublishInstrumentor().writer.flush()  # the shipping thread stays idle from here on


def block(
    mode: str, one: Callable[[], None], provider: TracerProvider, tmp: str, args: argparse.Namespace
) -> float:
    """Switch ``mode`` on, warm up, time ``args.n`` publishes (mean us), switch it off."""
    off = enable(mode, provider, tmp)
    try:
        warm_up(mode, one, args.warmup)
        gc.collect()
        started = time.perf_counter_ns()
        for _ in range(args.n):
            one()
        return (time.perf_counter_ns() - started) / args.n / 1000
    finally:
        off()


def publisher() -> tuple[Callable[[], None], TracerProvider]:
    """A publish of ``bench.noop`` onto ``benchnull://``, and the tracer provider to use."""
    app = Celery("publish_breakdown", broker=register_null_transport(), set_as_current=True)
    app.conf.task_ignore_result = True

    @app.task(name="bench.noop")  # type: ignore[untyped-decorator]
    def noop(a: int, b: int) -> None:
        return None

    def one() -> None:
        noop.apply_async(args=(1, 2), queue="bench")

    provider = TracerProvider()
    # A queue that never fills: a publisher that never releases the GIL (no broker I/O here)
    # starves the processor's thread, and a full queue logs a warning per span.
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter(), max_queue_size=1 << 20))
    return one, provider


def run(args: argparse.Namespace) -> dict[str, Any]:
    one, provider = publisher()
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(1, args.rounds + 1):
            order = list(MODES)
            rng.shuffle(order)
            result: dict[str, Any] = {"round": number, "order": order}
            for mode in order:
                total = block(mode, one, provider, tmp, args)
                spent: collections.Counter[str] = collections.Counter()
                # Installed before instrumenting: the signals hold the functions they were given.
                with timed(STAGES.get(mode, {}), spent):
                    timed_total = block(mode, one, provider, tmp, args)
                result[mode] = {
                    "us": total,
                    "timed_us": timed_total,
                    **{stage: ns / args.n / 1000 for stage, ns in spent.items()},
                }
            rounds.append(result)
            print(f"round {number}/{args.rounds}: {', '.join(order)}", flush=True)
    return summarize(rounds)


def child(args: argparse.Namespace) -> None:
    """Under callgrind: ``args.child``'s warm-up, then ``args.n`` publishes, then exit at once
    (nothing after the loop may cost more with more publishes)."""
    one, provider = publisher()
    enable(args.child, provider, args.tmp)
    warm_up(args.child, one, args.warmup)
    for _ in range(args.n):
        one()
    sys.stdout.flush()
    os._exit(0)


def instructions(args: argparse.Namespace) -> dict[str, Any]:
    """CPU instructions per publish per mode: callgrind's count of a run with ``--n``
    publishes minus one with none (start-up and warm-up cancel out). A count, not a time: the
    same on a busy machine as on an idle one, so a change's effect shows without noise."""
    per: dict[str, float] = {}
    for mode in MODES:
        counted = []
        for n in (0, args.n):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
                cmd += [sys.executable, __file__, "--child", mode, "--n", str(n), "--tmp", tmp]
                cmd += ["--warmup", str(args.warmup)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            found = re.search(r"Collected : (\d+)", done.stderr)
            if found is None:
                raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr}")
            counted.append(int(found[1]))
        per[mode] = (counted[1] - counted[0]) / args.n
        print(f"{mode}: {per[mode]:,.0f} instructions per publish", flush=True)
    added = {mode: per[mode] - per["bare"] for mode in MODES[1:]}
    return {
        "instructions_per_publish": per,
        "added": added,
        "ratios": {"added / official added": added["plugin-spool"] / added["otel-official"]},
    }


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[mode].get(key, 0.0) for r in rounds)

    def added(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] - r["bare"]["us"] for r in rounds)

    ours, theirs = "plugin-spool", "otel-official"
    table: dict[str, dict[str, float]] = {}
    for mode in (theirs, ours):
        hooks, with_timers = med(mode, "hooks"), added(mode, "timed_us")
        row = {"added": added(mode, "us"), "hooks": hooks, "outside hooks": with_timers - hooks}
        if mode == ours:
            parts = {s: med(mode, s) for s in ("span", "inject", "row", "record")}
            row |= parts | {"other": hooks - sum(parts.values())}
        else:
            row["span"] = med(mode, "span")
        table[mode] = row
    return {
        "bare_us": statistics.median(r["bare"]["us"] for r in rounds),
        "stages_us": table,
        "ratios": {
            "added / official added": table[ours]["added"] / table[theirs]["added"],
            "hooks / official hooks": table[ours]["hooks"] / table[theirs]["hooks"],
            "hooks without row and record / official hooks": (
                table[ours]["hooks"] - table[ours]["row"] - table[ours]["record"]
            )
            / table[theirs]["hooks"],
        },
        "rounds": list(rounds),
    }


def report(summary: dict[str, Any]) -> None:
    print(f"\nbare publish: {summary['bare_us']:.1f} us (in-memory broker)")
    print(f"{'us per publish':<16}" + "".join(f"{s:>15}" for s in summary["stages_us"]))
    stages = list(summary["stages_us"]["plugin-spool"])
    for stage in stages:
        cells = (summary["stages_us"][m].get(stage) for m in summary["stages_us"])
        print(f"{stage:<16}" + "".join("" if c is None else f"{c:>15.1f}" for c in cells))
    print()
    print_ratios(summary)


def print_ratios(summary: dict[str, Any]) -> None:
    for name, value in summary["ratios"].items():
        print(f"plugin-spool {name}: {value:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=5000, help="publishes per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write results to this file")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count CPU instructions per publish under valgrind's callgrind instead of timing",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one callgrind run
    parser.add_argument("--tmp", help=argparse.SUPPRESS)  # the child's directory
    args = parser.parse_args(argv)
    if args.child:
        child(args)
    if args.instructions:
        summary = instructions(args)
        print_ratios(summary)
    else:
        summary = run(args)
        report(summary)
    if args.json:
        data = {"config": vars(args) | {"json": str(args.json)}, "environment": environment_info()}
        args.json.write_text(json.dumps(data | summary | {"ok": True, "targets": []}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
