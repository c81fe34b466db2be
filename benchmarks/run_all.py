"""Run every write-path benchmark, one after another, and print one table of targets.

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with trust
auth for ``postgres`` and an existing database ``test``)::

    .venv/bin/python benchmarks/run_all.py [--quick] [--only a,b] [--out DIR]

The benchmarks run sequentially, never side by side (each one is the machine's only load), each
in its own process with ``--json``; their own output is streamed as it comes. Full size takes
about 20 minutes on a 2-core machine; ``--quick`` shrinks every benchmark to a smoke test of a
minute or two (its figures are not worth quoting). JSON reports go to ``--out`` (default: a new
temporary directory, printed at the end), ``summary.json`` there gathers the targets.

Exit status: 1 if any benchmark's correctness checks failed (or it crashed); 2 with
``--fail-on-target`` if every check passed but a target was missed; else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import git_state

HERE = Path(__file__).resolve().parent
# name: (script, full-size arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "publish_latency": (
        "publish_latency.py",
        [],
        ["--n", "300", "--rounds", "2", "--warmup", "50"],
    ),
    "publish_breakdown": (
        "publish_breakdown.py",
        [],
        ["--n", "1000", "--rounds", "2", "--warmup", "100"],
    ),
    "worker_throughput": (
        "worker_throughput.py",
        [],
        ["--n", "1000", "--rounds", "1"],
    ),
    "spool_drain": (
        "spool_drain.py",
        [],
        ["--publishes", "10000", "--rounds", "1"],
    ),
    "memory_1m": (
        "memory_1m.py",
        [],
        ["--n", "50000", "--warmup", "5000", "--sample-every", "10000"],
    ),
    "db_cost": (
        "db_cost.py",
        [],
        ["--n", "2000"],
    ),
    "db_knee": (
        "db_knee.py",
        [],
        ["--procs", "1,2", "--seconds", "3", "--warmup", "1"],
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, help="directory for the JSON reports")
    parser.add_argument("--fail-on-target", action="store_true")
    args = parser.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(unknown)}; choose from {list(BENCHMARKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="otel_celery_publish_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    print(f"otel-celery-publish at {git_state()}", flush=True)
    for name in args.only:
        script, full, quick = BENCHMARKS[name]
        report = out / f"{name}.json"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        cmd += ["--json", str(report)]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        rc = subprocess.call(cmd)
        took = time.monotonic() - started
        data = json.loads(report.read_text()) if report.exists() else {}
        results[name] = {
            "exit_code": rc,
            "wall_s": took,
            "ok": rc in (0, 2) and bool(data.get("ok", False)),
            "targets": data.get("targets", []),
            "report": str(report) if data else None,
        }

    print("\n=== summary" + (" (--quick: smoke-test sizes, figures not meaningful)" * args.quick))
    print(f"otel-celery-publish at {git_state()}")
    print(f"{'benchmark':<18} {'exit':>4} {'checks':>6} {'wall s':>8}  targets")
    for name, res in results.items():
        verdicts = "; ".join(
            f"[{t['verdict']}] {t['target']} = {t['value']:.3f} ({t['rule']})"
            for t in res["targets"]
            if t["value"] is not None
        )
        checks = "ok" if res["ok"] else "FAILED"
        print(f"{name:<18} {res['exit_code']:>4} {checks:>6} {res['wall_s']:>8.1f}  {verdicts}")
    summary = {"git": git_state(), "quick": args.quick, "benchmarks": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreports in {out}")
    if not all(r["ok"] for r in results.values()):
        return 1
    missed = any(t["verdict"] == "FAIL" for r in results.values() for t in r["targets"])
    return 2 if args.fail_on_target and missed else 0


if __name__ == "__main__":
    sys.exit(main())
