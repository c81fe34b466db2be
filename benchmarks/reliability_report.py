"""Run the fault, bad-input and security suite and write its results table into
docs/RELIABILITY.md (between the ``results`` markers): one row per case, named by the test's
docstring, grouped by the class of failure it proves we handle.

    .venv/bin/python benchmarks/reliability_report.py        # = make reliability

Exit code: pytest's (0 when every case passed).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"
# Test module -> the class of failure (issue #9's sections) its cases prove.
CLASSES = {
    "test_faults_db": "1. publish never held by the database",
    "test_durability": "1. publish never held by the database",
    "test_full_disk": "1. publish never held by the database",
    "test_bad_records": "2. one bad record never stalls the others",
    "test_liveness": "3. lost tells running from dead",
    "test_rabbitmq": "3. lost tells running from dead",
    "test_security": "4. security",
    "test_sentry": "4. security",
    "test_spool": "4. security",
    "test_properties": "6. property-based",
    "test_config": "5. configuration and CLI inputs",
    "test_cli_inputs": "5. configuration and CLI inputs",
}
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Collector:
    """A pytest plugin that keeps each case's docstring and outcome."""

    docs: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            function = getattr(item, "function", None)
            doc = ((function.__doc__ if function else None) or item.name).strip()
            self.docs[item.nodeid] = " ".join(doc.split())

    def pytest_runtest_logreport(self, report: Any) -> None:
        # A case fails if any phase (setup, call, teardown) failed; it passed if its call did.
        counts = report.when == "call" or report.outcome != "passed"
        if counts and self.outcomes.get(report.nodeid) in (None, "passed"):
            self.outcomes[report.nodeid] = report.outcome


def table(collector: Collector) -> str:
    rows: dict[tuple[str, str], list[str]] = {}
    for nodeid, doc in collector.docs.items():
        module = Path(nodeid.split("::")[0]).stem
        cls = CLASSES.get(module, module)
        rows.setdefault((cls, doc), []).append(collector.outcomes.get(nodeid, "not run"))
    lines = ["| class | case | runs | result |", "| --- | --- | --- | --- |"]
    for (cls, doc), outcomes in sorted(rows.items()):
        passed = outcomes.count("passed")
        result = "pass" if passed == len(outcomes) else f"**FAIL** ({len(outcomes) - passed})"
        lines.append(f"| {cls} | {doc.replace('|', '/')} | {len(outcomes)} | {result} |")
    total = sum(len(o) for o in rows.values())
    failed = sum(1 for o in collector.outcomes.values() if o != "passed")
    lines.append("")
    lines.append(f"{total} runs of {len(rows)} cases, {failed} failed.")
    return "\n".join(lines)


def main() -> int:
    files = [str(p) for m in CLASSES if (p := ROOT / "tests" / f"{m}.py").exists()]
    collector = Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *files, *sys.argv[1:]], [collector])
    text = DOC.read_text()
    section = f"{START}\n{table(collector)}\n{END}"
    DOC.write_text(re.sub(f"{START}.*?{END}", lambda _: section, text, flags=re.S))
    print(f"results table written to {DOC.relative_to(ROOT)}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
