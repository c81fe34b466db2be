"""The layout holds: the hot path loads neither the read side nor click, Alembic or Sentry;
imports run one way (signal -> hooks -> rows -> sink -> database; the read side beside, never
reaching back); instrument() cycles add no process hooks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import create_engine, text

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish import instrumentor as instrumentor_mod
from otel_celery_publish.schema import migrate

PACKAGE = "otel_celery_publish"
SRC = Path(__file__).resolve().parent.parent / "src"
TABLE = "celery_publish_audit"
# Never loaded by the hot path (click: celery loads it itself, see HOT_PATH).
WATCHED = ("alembic", "sentry_sdk")

# -- what instrument() loads -----------------------------------------------------------------

# Records the import statements our modules run (the importer is the module whose globals the
# statement runs in): celery itself imports click (celery.exceptions), so for click "not in
# sys.modules" cannot hold, but "never imported by us" can.
HOT_PATH = """
import builtins, json, sys

ours_imported = set()  # the top-level packages our modules' import statements name
_import = builtins.__import__


def spy(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if importer.startswith("otel_celery_publish") and not level:
        ours_imported.add(name.split(".")[0])
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = spy

from celery import Celery
from celery.contrib.testing.worker import start_worker
from opentelemetry.sdk.trace import TracerProvider

from otel_celery_publish import CeleryPublishInstrumentor

url, spool = sys.argv[1:]
app = Celery("layout", broker="memory://", backend="cache+memory://", set_as_current=True)


@app.task(name="layout.add")
def add(x, y):
    return x + y


instrumentor = CeleryPublishInstrumentor()
instrumentor.instrument(tracer_provider=TracerProvider(), audit_url=url, spool_dir=spool)
result = add.delay(1, 2)
published = sorted(sys.modules)  # a web process: instrumented, one publish
with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
    assert result.get(timeout=30) == 3  # a worker: received, started, finished
assert instrumentor.writer.flush(10)
instrumentor.uninstrument()
print(json.dumps({
    "published": published,
    "worked": sorted(sys.modules),
    "ours_imported": sorted(ours_imported),
    "task_id": result.id,
}))
"""


def _forbidden_on_the_hot_path(modules: list[str]) -> list[str]:
    read_side = (f"{PACKAGE}.audit", f"{PACKAGE}.cli")
    return [m for m in modules if m.startswith(read_side) or m.split(".")[0] in WATCHED]


@pytest.fixture(scope="module")
def hot_path(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a fresh process holds after instrument(), a publish, and the task run by an
    in-process worker (solo pool, memory broker) against an already migrated SQLite table."""
    tmp = tmp_path_factory.mktemp("hot_path")
    url = f"sqlite:///{tmp / 'audit.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine, TABLE)  # here, so the writer finds it at head and skips Alembic
    done = subprocess.run(
        [sys.executable, "-c", HOT_PATH, url, str(tmp / "spool")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    with engine.connect() as conn:
        result["row"] = dict(
            conn.execute(text(f"SELECT received_at, started_at, finished_at, outcome FROM {TABLE}"))
            .one()
            ._mapping
        )
    engine.dispose()
    return result


def test_the_hot_path_loads_neither_the_read_side_nor_alembic_nor_sentry(
    hot_path: dict[str, Any],
) -> None:
    """instrument(), a publish and a worker's run of the task load nothing of audit/ or cli/,
    no Alembic (the table is at head) and no sentry-sdk (the host did not import it)."""
    row = hot_path["row"]
    assert row["outcome"] == "succeeded" and None not in row.values(), "worker hooks did not run"
    for phase in ("published", "worked"):
        forbidden = _forbidden_on_the_hot_path(hot_path[phase])
        assert forbidden == [], f"{phase}: {forbidden}"
    ours = [m for m in hot_path["worked"] if m == PACKAGE or m.startswith(PACKAGE + ".")]
    print("otel_celery_publish modules on the hot path:", " ".join(ours))


def test_our_hot_path_modules_never_import_click_alembic_or_sentry(
    hot_path: dict[str, Any],
) -> None:
    """No import statement our modules ran on the hot path named click, Alembic or sentry-sdk
    (celery imports click itself, so its presence in sys.modules says nothing about us)."""
    assert {"celery", "sqlalchemy"} <= set(hot_path["ours_imported"]), "the spy saw nothing"
    assert {"click", *WATCHED} & set(hot_path["ours_imported"]) == set()


READ_SIDE = """
import sys
import otel_celery_publish.audit
print(" ".join(sorted(m for m in sys.modules if m.startswith("otel_celery_publish"))))
"""


def test_the_read_side_loads_neither_the_hooks_nor_the_writer() -> None:
    """Importing the read API (what ``celery audit`` and audit.lost() in a web process load)
    brings in no hook, no instrumentor and not the writer's thread."""
    done = subprocess.run(
        [sys.executable, "-c", READ_SIDE], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = done.stdout.split()
    back_up = [
        m
        for m in loaded
        if m.startswith((f"{PACKAGE}.hooks", f"{PACKAGE}.cli"))
        or m in (f"{PACKAGE}.instrumentor", f"{PACKAGE}.sink.writer")
    ]
    assert back_up == [], back_up


PRELOAD = """
import sys
from otel_celery_publish import CeleryPublishInstrumentor, instrumentor
before = set(instrumentor.LAZY_EXPORTER_IMPORTS) & set(sys.modules)
CeleryPublishInstrumentor().instrument(audit_url=sys.argv[1], spool_dir=sys.argv[2])
missing = set(instrumentor.LAZY_EXPORTER_IMPORTS) - set(sys.modules)
print(sorted(before), sorted(missing))
"""


def test_instrument_imports_what_exporter_threads_import_lazily(tmp_path: Path) -> None:
    """instrument() imports, before any fork, the modules the OTLP/HTTP exporters' threads
    import on first use (requests' netrc): a pool child forked mid-import would hang on it."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD, url, str(tmp_path / "spool")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.split("\n")[-2] == "[] []", done.stdout


# -- import direction, read from the source --------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _root_exports() -> dict[str, str]:
    """The root package's public names and the module each comes from (importing the name
    imports that module, eagerly or through the package's ``__getattr__``)."""
    tree = ast.parse((SRC / PACKAGE / "__init__.py").read_text())
    return {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE)
        for alias in node.names
    }


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module of ours) for every import in the file, lazy ones inside functions too."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    exports = _root_exports()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _is_module(full):
                    yield node.lineno, full
                elif base == PACKAGE and alias.name in exports:
                    yield node.lineno, exports[alias.name]
                else:
                    yield node.lineno, base


def _within(module: str, *areas: str) -> bool:
    return any(module == f"{PACKAGE}.{a}" or module.startswith(f"{PACKAGE}.{a}.") for a in areas)


# (importer, imported) pairs that break a rule on purpose, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    (f"{PACKAGE}.audit._publishing", f"{PACKAGE}.instrumentor"): (
        "a replay is a publish on the record: it instruments the process for the sends if it "
        "is not already; imported inside publishing(), only when a replay sends"
    ),
    (f"{PACKAGE}.contrib.django.apps", f"{PACKAGE}.instrumentor"): (
        "at django.setup() the Django app re-instruments an instrumentation set up before "
        "Django's settings existed (opentelemetry-instrument); imported inside reinstrument()"
    ),
}


def _is(module: str, *names: str) -> bool:
    return module in {f"{PACKAGE}.{n}" for n in names}


# (rule, breaks(importer, imported)): the direction of the data flow, as imports.
RULES: list[tuple[str, Callable[[str, str], bool]]] = [
    (
        "schema/ imports nothing of ours but config",
        lambda a, b: _within(a, "schema") and not (_within(b, "schema") or _is(b, "config")),
    ),
    (
        "rows, headers and timing import nothing of hooks/, sink/, audit/, cli/",
        lambda a, b: (
            _is(a, "rows", "headers", "timing") and _within(b, "hooks", "sink", "audit", "cli")
        ),
    ),
    (
        "sink/ imports nothing of hooks/, audit/, cli/",
        lambda a, b: _within(a, "sink") and _within(b, "hooks", "audit", "cli"),
    ),
    (
        "hooks/ imports nothing of audit/, cli/",
        lambda a, b: _within(a, "hooks") and _within(b, "audit", "cli"),
    ),
    (
        "audit/ imports nothing of hooks/, cli/, sink.writer or the instrumentor",
        lambda a, b: (
            _within(a, "audit")
            and (_within(b, "hooks", "cli") or _is(b, "sink.writer", "instrumentor"))
        ),
    ),
    (
        "nothing outside cli/ and demo.py imports cli/",
        lambda a, b: _within(b, "cli") and not (_within(a, "cli") or _is(a, "demo")),
    ),
    (
        "only the public API (and the demo) imports the instrumentor",
        lambda a, b: _is(b, "instrumentor") and not (a == PACKAGE or _is(a, "demo")),
    ),
]


def _violation(importer: str, imported: str) -> str | None:
    """The rule ``importer`` importing ``imported`` breaks, if any."""
    return next((rule for rule, breaks in RULES if breaks(importer, imported)), None)


def _violations() -> tuple[list[str], set[tuple[str, str]]]:
    """Every import that breaks a rule, and the listed exceptions actually used."""
    found, excused = [], set()
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        importer = _module_name(path)
        for line, imported in _imports(path):
            rule = _violation(importer, imported)
            if rule is None:
                continue
            if (importer, imported) in EXCEPTIONS:
                excused.add((importer, imported))
            else:
                found.append(f"{path.relative_to(SRC)}:{line} imports {imported}: {rule}")
    return found, excused


def test_imports_run_one_way() -> None:
    """No module of ours imports against the flow (signal -> hooks -> rows -> sink ->
    database, the read side beside), but for the exceptions listed with their reason, each
    of which is still needed."""
    found, excused = _violations()
    assert found == [], "\n".join(found)
    assert excused == set(EXCEPTIONS), f"stale exceptions: {set(EXCEPTIONS) - excused}"


def test_the_import_reader_sees_every_kind_of_import() -> None:
    """The checker resolves absolute, relative, from-package and re-exported imports (a
    checker that saw none would pass everything)."""
    imports = {imported for _, imported in _imports(SRC / PACKAGE / "instrumentor.py")}
    assert {f"{PACKAGE}.hooks.publish", f"{PACKAGE}._guard", f"{PACKAGE}.config"} <= imports
    assert _root_exports()["CeleryPublishInstrumentor"] == f"{PACKAGE}.instrumentor"
    assert _violation(f"{PACKAGE}.audit._lost", f"{PACKAGE}.sink.writer") is not None
    assert _violation(f"{PACKAGE}.sink.writer", f"{PACKAGE}.rows") is None


# -- process-wide side effects of instrument() -----------------------------------------------


def test_instrument_cycles_add_no_process_hooks_and_keep_the_backlog_gauge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second instrument() after uninstrument() registers no at-fork or atexit hook, and
    the spool backlog gauge still reports (the SDK keeps the first callback of a name)."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = CeleryPublishInstrumentor()
    keywords = {
        "tracer_provider": TracerProvider(),
        "meter_provider": meter_provider,
        "audit_url": f"sqlite:///{tmp_path / 'audit.db'}",
        "spool_dir": str(tmp_path / "spool"),
    }
    instrumentor.instrument(**keywords)
    instrumentor.uninstrument()
    registered: list[Any] = []
    monkeypatch.setattr("os.register_at_fork", lambda **hooks: registered.append(hooks))
    monkeypatch.setattr("atexit.register", lambda *args, **_: registered.append(args))
    instrumentor.instrument(**keywords)
    try:
        assert registered == []
        data = reader.get_metrics_data()
        names = [
            metric.name
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
        ]
        assert "celery.audit.spool.backlog" in names, names
    finally:
        instrumentor.uninstrument()
        meter_provider.shutdown()


class _NullExporter(MetricExporter):
    def __init__(self) -> None:
        super().__init__()

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **_: Any) -> Any:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **_: Any) -> None:
        pass


def test_a_reader_forked_mid_export_can_export_in_the_child() -> None:
    """A periodic metric reader whose export lock is held at fork time (its thread was
    exporting) gets a free one in the child (opentelemetry-python#3307)."""
    reader = PeriodicExportingMetricReader(_NullExporter(), export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    instrumentor_mod._register_process_hooks()
    reader._export_lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: only lock operations, then leave without cleanup
            os._exit(0 if reader._export_lock.acquire(timeout=5) else 1)
    finally:
        reader._export_lock.release()
    _, status = os.waitpid(pid, 0)
    provider.shutdown()
    assert os.waitstatus_to_exitcode(status) == 0
