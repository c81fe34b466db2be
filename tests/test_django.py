"""The Django app (otel_celery_publish.contrib.django) in a real Django project laid out as
Celery's "First steps with Django" (tests/django_project): Django's settings as a layer of our
settings, ``manage.py migrate``, real workers (under ``opentelemetry-instrument`` and
instrumented in code), ``delay_on_commit`` and ``transaction.atomic()``, the admin and its
replay action, and the ``celery -A proj audit`` commands.

Django's settings are process-global and this pytest process runs every other test: every
Django-side step runs in a process of its own (``manage.py``, ``tests/django_project/steps.py``,
the workers, the CLI). The settings layer's unit tests give config.py a stand-in
``django.conf`` module for the length of one test (``monkeypatch``), never Django itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, insert, select, text

from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.contrib.django._layer import django_database_url
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import audit_table
from tests.audit_support import ago, row
from tests.conftest import BIN, BROKER, ROOT, Worker, _ping, stop_worker
from tests.otlp_receiver import wait_for

PROJECT = ROOT / "tests" / "django_project"
APP = "otel_celery_publish.contrib.django"
CHANGELIST = "/admin/otel_celery_publish/publishattempt/"

# -- the settings layer (config.py), with a stand-in django.conf -----------------------------


class FakeDjangoSettings:
    """What config.py reads of ``django.conf.settings``: ``configured`` and attributes."""

    def __init__(self, configured: bool = True, **values: Any) -> None:
        self.configured = configured
        self.__dict__.update(values)


PG_DATABASE = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "shop",
    "USER": "app",
    "PASSWORD": "p@ss/w:rd",
    "HOST": "db.internal",
    "PORT": "6432",
    "OPTIONS": {"sslmode": "require", "pool": True},
}


@pytest.fixture
def django_conf(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a stand-in ``django.conf`` for one test; returns a function that sets it up."""

    def configure(
        ours: Any = None,
        *,
        installed: bool = True,
        configured: bool = True,
        databases: dict[str, Any] | None = None,
    ) -> FakeDjangoSettings:
        values: dict[str, Any] = {
            "INSTALLED_APPS": ["django.contrib.admin", *([APP] if installed else [])],
            "DATABASES": {"default": PG_DATABASE} if databases is None else databases,
        }
        if ours is not None:
            values["OTEL_CELERY_PUBLISH"] = ours
        settings = FakeDjangoSettings(configured, **values)
        module = types.ModuleType("django.conf")
        module.settings = settings  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "django.conf", module)
        return settings

    return configure


def test_django_settings_sit_between_the_environment_and_the_defaults(django_conf: Any) -> None:
    """Keyword > OTEL_CELERY_PUBLISH_* variable > Django's OTEL_CELERY_PUBLISH > default, per
    setting; the audit URL is derived from DATABASES["default"] when nothing else gives one."""
    django_conf({"DURABILITY": "spool", "TRACE_URL": "http://j/{trace_id}", "TABLE_NAME": "dj"})
    from_django = Settings.from_env(environ={})
    assert from_django.durability == "spool"
    assert from_django.trace_url == "http://j/{trace_id}"
    assert from_django.table_name == "dj"
    assert from_django.flush_interval == Settings().flush_interval  # the default
    assert from_django.audit_url == (
        "postgresql+psycopg://app:p%40ss%2Fw%3Ard@db.internal:6432/shop?sslmode=require"
    )
    environ = {
        "OTEL_CELERY_PUBLISH_DURABILITY": "async",
        "OTEL_CELERY_PUBLISH_AUDIT_URL": "sqlite://",
    }
    from_env = Settings.from_env(environ=environ)
    assert (from_env.durability, from_env.audit_url, from_env.table_name) == (
        "async",
        "sqlite://",
        "dj",
    )
    from_keyword = Settings.from_env(environ=environ, durability="sync", table_name="kw")
    assert (from_keyword.durability, from_keyword.table_name) == ("sync", "kw")


def test_django_settings_count_only_when_configured_with_our_app(
    django_conf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without our app in INSTALLED_APPS, or before Django's settings are configured, Django's
    settings are not read; without django.conf imported, config.py does not import it."""
    django_conf({"DURABILITY": "spool"}, installed=False)
    assert Settings.from_env(environ={}).durability == "sync"
    django_conf({"DURABILITY": "spool"}, configured=False)
    assert Settings.from_env(environ={}).durability == "sync"
    django_conf({"DURABILITY": "spool"}).INSTALLED_APPS = [f"{APP}.apps.OtelCeleryPublishConfig"]
    assert Settings.from_env(environ={}).durability == "spool"
    monkeypatch.delitem(sys.modules, "django.conf")
    assert Settings.from_env(environ={}).durability == "sync"
    assert "django.conf" not in sys.modules


@pytest.mark.parametrize(
    ("database", "url"),
    [
        (
            {"ENGINE": "django.db.backends.postgresql", "NAME": "shop", "HOST": "/run/pg"},
            "postgresql+psycopg:///shop?host=%2Frun%2Fpg",
        ),
        (
            {"ENGINE": "django.contrib.gis.db.backends.postgis", "NAME": "geo", "HOST": "h"},
            "postgresql+psycopg://h/geo",
        ),
        (
            {"ENGINE": "django.db.backends.sqlite3", "NAME": Path("/srv/db.sqlite3")},
            "sqlite:////srv/db.sqlite3",
        ),
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}, "sqlite:///db.sqlite3"),
    ],
)
def test_database_urls_are_derived_from_django_databases(
    database: dict[str, Any], url: str
) -> None:
    """Unix sockets, PostGIS and SQLite paths (absolute, relative, a Path) map to our URLs."""
    assert django_database_url(database) == url
    Settings(audit_url=url)  # and the result is a valid audit URL


def test_the_database_alias_setting_picks_another_database(django_conf: Any) -> None:
    """OTEL_CELERY_PUBLISH["DATABASE"] names the DATABASES alias the URL is derived from."""
    audit_db = {"ENGINE": "django.db.backends.postgresql", "NAME": "audit", "HOST": "a"}
    django_conf({"DATABASE": "audit"}, databases={"default": PG_DATABASE, "audit": audit_db})
    assert Settings.from_env(environ={}).audit_url == "postgresql+psycopg://a/audit"


@pytest.mark.parametrize(
    ("ours", "databases", "expected"),
    [
        (
            {},
            {"default": {"ENGINE": "django.db.backends.mysql", "NAME": "x", "PASSWORD": "s3cret"}},
            "Django setting DATABASES['default'] must be a PostgreSQL or SQLite database; or "
            "set OTEL_CELERY_PUBLISH_AUDIT_URL",
        ),
        (
            {},
            {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            "must be an SQLite file, not in memory",
        ),
        (
            {},
            {"default": {**PG_DATABASE, "PASSWORD": "s3cret", "PORT": "five"}},
            "DATABASES['default'] must have a numeric PORT",
        ),
        ({"DATABASE": "nope"}, None, "OTEL_CELERY_PUBLISH['DATABASE'] must name a database"),
        ({"DURABILTY": "spool"}, None, "(did you mean 'DURABILITY'?)"),
        ({"DURABILITY": "fast"}, None, "OTEL_CELERY_PUBLISH['DURABILITY'] must be one of"),
        (["DURABILITY"], None, "Django setting OTEL_CELERY_PUBLISH must be a dict"),
    ],
)
def test_bad_django_settings_are_refused_naming_the_setting(
    django_conf: Any, ours: Any, databases: dict[str, Any] | None, expected: str
) -> None:
    """A bad value, an unknown key or a database we cannot write to is one SettingsError
    naming the Django setting, without the database password."""
    django_conf(ours, databases=databases)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ={})
    assert expected in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_an_explicit_audit_url_needs_no_usable_django_database(django_conf: Any) -> None:
    """A MySQL project that sets OTEL_CELERY_PUBLISH_AUDIT_URL is fine: DATABASES is not read."""
    django_conf({}, databases={"default": {"ENGINE": "django.db.backends.mysql"}})
    environ = {"OTEL_CELERY_PUBLISH_AUDIT_URL": "sqlite:///a.db"}
    assert Settings.from_env(environ=environ).audit_url == "sqlite:///a.db"


def test_settings_read_before_django_are_refreshed_once_it_is_configured(
    django_conf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refreshed() resolves settings from_env built without Django again, keywords and
    variables keeping precedence; settings built with Django, or directly, stay as they are."""
    monkeypatch.delitem(sys.modules, "django.conf", raising=False)
    environ = {"OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.5"}
    early = Settings.from_env(environ=environ, table_name="kw", durability=None)
    assert early.refreshed() == early  # Django still not configured
    django_conf({"DURABILITY": "spool", "FLUSH_INTERVAL": 3, "TABLE_NAME": "dj"})
    late = early.refreshed()
    assert (late.durability, late.flush_interval, late.table_name) == ("spool", 0.5, "kw")
    assert late.audit_url.startswith("postgresql+psycopg://app:")
    assert late.refreshed() is late
    direct = Settings(durability="async")
    assert direct.refreshed() is direct


# -- the project: manage.py, steps.py, workers, the CLI -------------------------------------


@dataclass
class DjangoProject:
    """tests/django_project with a fresh audit table, run from a directory of the test's own."""

    env: dict[str, str]
    cwd: Path
    table: str
    queue: str
    engine: Engine
    first_migrate: str = ""
    workers: list[Worker] = field(default_factory=list)

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd),
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.run(sys.executable, str(PROJECT / "manage.py"), *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def step(
        self, name: str, auto: bool = False, env: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """Run steps.py NAME; ``auto``: under opentelemetry-instrument, else instrumented in
        proj/celery.py (before Django is set up, either way)."""
        cmd = [sys.executable, str(PROJECT / "steps.py"), name, json.dumps(kwargs)]
        if auto:
            cmd = [str(BIN / "opentelemetry-instrument"), *cmd]
        done = self.run(*cmd, env={"OCP_INSTRUMENT_IN_CODE": "0" if auto else "1", **(env or {})})
        assert done.returncode == 0, done.stderr[-6000:]
        assert "otel-celery-publish internal error" not in done.stderr, done.stderr[-6000:]
        return json.loads(done.stdout.splitlines()[-1])

    def celery(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run(str(BIN / "celery"), "-A", "proj", *args, env=env)

    def start_worker(self, *, auto: bool, pool: str = "solo", queue: str | None = None) -> Worker:
        """``[opentelemetry-instrument] celery -A proj worker``; ``auto=False``: instrumented
        in proj/celery.py instead."""
        nodename = f"ocp-dj-{uuid.uuid4().hex[:8]}@localhost"
        log = self.cwd / f"{nodename}.log"
        cmd = [str(BIN / "celery"), "-A", "proj", "worker", "-P", pool, "-c", "1"]
        cmd += ["-Q", queue or self.queue, "-n", nodename, "-l", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if auto:
            cmd = [str(BIN / "opentelemetry-instrument"), *cmd]
        env = {**self.env, "OCP_INSTRUMENT_IN_CODE": "0" if auto else "1"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        worker = Worker(proc, nodename, log)
        self.workers.append(worker)
        try:
            wait_for(lambda: proc.poll() is not None or _ping(nodename), 60, f"worker {nodename}")
        except AssertionError:
            raise AssertionError(f"worker did not answer ping:\n{worker.output()}") from None
        assert proc.poll() is None, f"worker exited:\n{worker.output()}"
        return worker

    def rows(self, task_id: str) -> list[dict[str, Any]]:
        table = audit_table(self.table)
        stmt = select(table).where(table.c.task_id == task_id).order_by(table.c.published_at)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def wait_rows(self, task_id: str, done: Any, timeout: float = 30) -> list[dict[str, Any]]:
        try:
            return wait_for(
                lambda: (rows := self.rows(task_id)) and done(rows) and rows, timeout, task_id
            )
        except AssertionError as exc:
            logs = "\n".join(w.output()[-3000:] for w in self.workers)
            raise AssertionError(f"{exc}; rows: {self.rows(task_id)}\n{logs}") from None

    def seed(self, **fields: Any) -> dict[str, Any]:
        """Insert one complete row (tests.audit_support.row) into the test's table."""
        table = audit_table(self.table)
        full = row(**fields)
        with self.engine.begin() as conn:
            conn.execute(insert(table), [{c.name: full.get(c.name) for c in table.columns}])
        return full

    def result_status(self, task_id: str) -> tuple[str, str] | None:
        """django-celery-results' (status, result) of ``task_id``, if stored."""
        with self.engine.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT status, result FROM django_celery_results_taskresult WHERE task_id = :t"
                ),
                {"t": task_id},
            ).first()
        return None if found is None else (found[0], found[1])


@pytest.fixture
def project(pg: Engine, pg_url: str, tmp_path: Path, queue_name: str) -> Iterator[DjangoProject]:
    """The Django project on the session's PostgreSQL database, a fresh audit table created by
    ``manage.py migrate``; workers stopped and the test's queues deleted at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_CELERY_PUBLISH_")}
    env.update(
        {
            "PYTHONPATH": str(PROJECT),
            "DJANGO_SETTINGS_MODULE": "proj.settings",
            "OCP_DJANGO_DB": pg_url.rsplit("/", 1)[1],
            "OCP_BROKER_URL": BROKER,
            "OCP_QUEUE": queue_name,
            "OTEL_CELERY_PUBLISH_TABLE_NAME": f"dj_{uuid.uuid4().hex[:10]}",
            "OTEL_CELERY_PUBLISH_SPOOL_DIR": os.environ["OTEL_CELERY_PUBLISH_SPOOL_DIR"],
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "celery",
        }
    )
    found = DjangoProject(env, tmp_path, env["OTEL_CELERY_PUBLISH_TABLE_NAME"], queue_name, pg)
    found.first_migrate = found.manage("migrate").stdout
    try:
        yield found
    finally:
        for worker in found.workers:
            stop_worker(worker.proc)
        redis.Redis.from_url(BROKER).delete(queue_name, f"{queue_name}-dead")
        for worker in found.workers:
            assert "otel-celery-publish internal error" not in worker.output(), worker.output()


def test_migrate_creates_the_audit_table_and_again_is_a_no_op(project: DjangoProject) -> None:
    """``manage.py migrate`` runs our Alembic migrations on Django's database (the table named
    by the environment, which wins over Django's TABLE_NAME); a second run changes nothing;
    Django records no migration of ours (the table stays ours)."""
    assert f"Audit table '{project.table}'" in project.first_migrate
    assert f"created (revision none -> {migrate.HEAD})" in project.first_migrate
    with project.engine.connect() as conn:
        assert migrate.current(conn, project.table) == migrate.HEAD
        ours = conn.execute(
            text("SELECT count(*) FROM django_migrations WHERE app = 'otel_celery_publish'")
        ).scalar()
    assert ours == 0
    again = project.manage("migrate").stdout
    assert "Audit table" not in again and "No migrations to apply." in again


def test_migrate_upgrades_an_older_audit_table(project: DjangoProject) -> None:
    """A table at an older revision (a package upgrade) is brought to head by ``migrate``."""
    config = Config()
    config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
    with project.engine.begin() as conn:
        config.attributes.update(table_name=project.table, connection=conn, dialect_name=None)
        command.downgrade(config, "0002")
    done = project.manage("migrate").stdout
    assert f"upgraded (revision 0002 -> {migrate.HEAD})" in done, done
    with project.engine.connect() as conn:
        assert migrate.current(conn, project.table) == migrate.HEAD


def test_a_worker_under_opentelemetry_instrument_records_into_djangos_database(
    project: DjangoProject,
) -> None:
    """``opentelemetry-instrument celery -A proj worker`` and an ``opentelemetry-instrument``
    publisher: instrumented before Django was set up, both end up with Django's settings (the
    URL of DATABASES["default"], FLUSH_INTERVAL and TRACE_URL from OTEL_CELERY_PUBLISH); the
    row lands in Django's database and django-db stores the result."""
    worker = project.start_worker(auto=True)
    task_id = f"dj-auto-{uuid.uuid4()}"
    seen = project.step(
        "publish", auto=True, task="shop.add", args=[2, 3], task_id=task_id, queue=project.queue
    )
    assert seen["instrumented"] and seen["row_before_commit"]
    database = project.env["OCP_DJANGO_DB"]
    assert seen["settings"] == {
        "audit_url": f"127.0.0.1:5432/{database}",
        "table_name": project.table,
        "flush_interval": 0.1,
        "trace_url": "http://jaeger.example:16686/trace/{trace_id}",
    }
    [done] = project.wait_rows(task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert done["worker"] == worker.nodename
    assert done["trace_id"] and done["sent_at"] and done["received_at"] and done["started_at"]
    assert done["task_name"] == "shop.add" and done["queue"] == project.queue
    assert wait_for(lambda: project.result_status(task_id), 10, "django-db result") == (
        "SUCCESS",
        "5",
    )


def test_keywords_and_variables_keep_precedence_when_django_is_set_up(
    project: DjangoProject,
) -> None:
    """Instrumented in proj/celery.py with ``flush_interval=2.5``, before Django: after
    ``django.setup()`` the keyword still beats Django's FLUSH_INTERVAL, a variable beats
    Django's TRACE_URL and TABLE_NAME, and the rest comes from Django (the URL, DURABILITY's
    default stays)."""
    task_id = f"dj-precedence-{uuid.uuid4()}"
    env = {
        "OCP_INSTRUMENT_KWARGS": json.dumps({"flush_interval": 2.5}),
        "OTEL_CELERY_PUBLISH_TRACE_URL": "http://from-env/{trace_id}",
    }
    seen = project.step(
        "publish", env=env, task="shop.add", args=[1, 2], task_id=task_id, queue=project.queue
    )
    assert seen["settings"] == {
        "audit_url": f"127.0.0.1:5432/{project.env['OCP_DJANGO_DB']}",
        "table_name": project.table,
        "flush_interval": 2.5,
        "trace_url": "http://from-env/{trace_id}",
    }
    assert seen["row_before_commit"]


def test_a_bad_setting_stops_django_at_startup_naming_it(project: DjangoProject) -> None:
    """A bad OTEL_CELERY_PUBLISH_* value in a Django process is ImproperlyConfigured at
    ``django.setup()``, one line naming the variable."""
    done = project.run(
        sys.executable, str(PROJECT / "manage.py"), "check",
        env={"OTEL_CELERY_PUBLISH_DURABILITY": "fast"},
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        "ImproperlyConfigured: otel-celery-publish: OTEL_CELERY_PUBLISH_DURABILITY must be one "
        "of sync, spool, async; got 'fast'"
    ) in done.stderr


def test_delay_on_commit_publishes_at_the_commit_and_not_on_rollback(
    project: DjangoProject,
) -> None:
    """``apply_async_on_commit`` inside ``atomic()``: no row until the commit, then the row and
    the message (the prefork worker, instrumented in proj/celery.py, finds the committed
    order); rolled back, nothing is published and no row is ever written."""
    project.start_worker(auto=False, pool="prefork")
    rolled_back = f"dj-oncommit-rb-{uuid.uuid4()}"
    seen = project.step(
        "publish",
        task="shop.mark_paid",
        args=[],
        task_id=rolled_back,
        queue=project.queue,
        mode="on_commit_rollback",
    )
    assert seen == {**seen, "row_before_commit": False, "rolled_back": True, "row_after": False}
    committed = f"dj-oncommit-{uuid.uuid4()}"
    seen = project.step(
        "publish",
        task="shop.mark_paid",
        args=[],
        task_id=committed,
        queue=project.queue,
        mode="on_commit",
    )
    assert (seen["row_before_commit"], seen["row_after"]) == (False, True)
    project.wait_rows(committed, lambda rows: rows[0]["outcome"] == "succeeded")
    assert wait_for(lambda: project.result_status(committed), 10, "result") == ("SUCCESS", "true")
    assert project.rows(rolled_back) == []
    assert project.result_status(rolled_back) is None


def test_delay_inside_a_rolled_back_atomic_block_is_sent_and_its_row_stays(
    project: DjangoProject,
) -> None:
    """A plain ``apply_async`` inside ``atomic()`` publishes at once: with sync durability the
    row is committed on our own connection (another connection sees it while Django's
    transaction is still open), so after the rollback the row still says sent, and the worker
    runs the task, which finds no order."""
    project.start_worker(auto=False)
    task_id = f"dj-atomic-{uuid.uuid4()}"
    seen = project.step(
        "publish",
        task="shop.mark_paid",
        args=[],
        task_id=task_id,
        queue=project.queue,
        mode="atomic_rollback",
    )
    assert (seen["row_before_commit"], seen["rolled_back"], seen["row_after"]) == (True, True, True)
    [done] = project.wait_rows(task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert done["sent_at"] is not None
    assert wait_for(lambda: project.result_status(task_id), 10, "result") == ("SUCCESS", "false")


def _admin(
    project: DjangoProject, *requests: dict[str, Any], user: str | None = None, **kw: Any
) -> list[dict[str, Any]]:
    result = project.step(
        "client", user=user or f"ops-{uuid.uuid4().hex[:6]}", requests=list(requests), **kw
    )
    return result["responses"]


def test_the_admin_lists_filters_searches_and_shows_a_task(project: DjangoProject) -> None:
    """The read-only admin (a superuser, Django's test client): the changelist shows a task
    run by a real worker; the outcome, queue, task-name and lost filters and the task-id
    search select the right rows; the detail page has the timeline, the trace link and the
    history; nothing can be added, changed or deleted; the model has every column."""
    project.start_worker(auto=False)
    task_id = f"dj-admin-{uuid.uuid4()}"
    project.step(
        "publish", auto=True, task="shop.add", args=[4, 5], task_id=task_id, queue=project.queue
    )
    [done] = project.wait_rows(task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    stuck = project.seed(
        task_id=f"dj-stuck-{uuid.uuid4()}", task_name="shop.add", queue="nobody-consumes",
        published_at=ago(21), sent_at=ago(21),
    )  # fmt: skip
    member = project.seed(task_id=f"dj-member-{uuid.uuid4()}", root_id=f"dj-root-{uuid.uuid4()}")
    dead = project.seed(
        task_id=f"dj-dead-{uuid.uuid4()}", published_at=ago(30), sent_at=ago(30),
        dead_lettered_at=ago(5),
    )  # fmt: skip
    replayed = project.seed(
        task_id=f"dj-replayed-{uuid.uuid4()}", sent_at=ago(21), replayed_at=ago(3),
    )  # fmt: skip
    replayed_then_done = project.seed(
        task_id=f"dj-late-{uuid.uuid4()}", sent_at=ago(21), replayed_at=ago(3),
        outcome="succeeded", finished_at=ago(2),
    )  # fmt: skip
    pages = _admin(
        project,
        {"path": CHANGELIST},
        {"path": f"{CHANGELIST}?outcome=succeeded"},
        {"path": f"{CHANGELIST}?outcome=unfinished"},
        {"path": f"{CHANGELIST}?queue={project.queue}"},
        {"path": f"{CHANGELIST}?task_name=shop.add&lost=any"},
        {"path": f"{CHANGELIST}?lost=worker_lost"},
        {"path": f"{CHANGELIST}?q={task_id}"},
        {"path": f"{CHANGELIST}?q={member['root_id']}"},
        {"path": f"{CHANGELIST}{done['publish_id']}/change/"},
        {"path": f"{CHANGELIST}add/"},
        {"path": f"{CHANGELIST}{done['publish_id']}/delete/"},
        {"path": f"{CHANGELIST}?outcome=dead-lettered"},
        {"path": f"{CHANGELIST}?outcome=replayed"},
        {"path": f"{CHANGELIST}?_facets=True&queue={project.queue}"},
    )
    assert [p["status"] for p in pages] == [200] * 9 + [403, 403, 200, 200, 200]
    assert dead["task_id"] in pages[11]["html"] and stuck["task_id"] not in pages[11]["html"]
    # Status and filter agree: dead-lettered is not unfinished, an outcome wins over a replay.
    assert dead["task_id"] not in pages[2]["html"] and replayed["task_id"] not in pages[2]["html"]
    assert replayed["task_id"] in pages[12]["html"]
    assert replayed_then_done["task_id"] not in pages[12]["html"]
    assert replayed_then_done["task_id"] in pages[1]["html"]
    # The queue and task-name filters offer the last day's values (a link per value).
    assert f"?queue={project.queue}" in pages[0]["html"]
    assert "?task_name=shop.add" in pages[0]["html"]
    # No page scans the table: DISTINCT only over a published_at range with a LIMIT (no date
    # hierarchy, no SELECT DISTINCT queue), COUNT only over a LIMIT subquery (the paginator),
    # no facet counts even when asked for.
    for page in pages:
        for sql in page["queries"]:
            if project.table not in sql:
                continue
            if "DISTINCT" in sql:
                assert '"published_at" >=' in sql and "LIMIT 100" in sql, sql
            if "COUNT(" in sql:
                assert "LIMIT 10001" in sql and "FILTER" not in sql, sql
    assert any("LIMIT 10001" in sql for sql in pages[0]["queries"])
    listed = [(task_id in p["html"], stuck["task_id"] in p["html"]) for p in pages[:7]]
    assert listed == [
        (True, True),  # everything
        (True, False),  # succeeded
        (False, True),  # unfinished
        (True, False),  # the worker's queue
        (False, True),  # lost now, any reason
        (False, False),  # lost because its pool process died: none
        (True, False),  # search by task id
    ]
    assert member["task_id"] in pages[7]["html"] and task_id not in pages[7]["html"]
    assert "lost: sent, never received" in pages[4]["html"]
    assert "unfinished: on the broker" in pages[0]["html"]
    detail = pages[8]["html"]
    for expected in ("broker wait", "worker wait", "End to end", "this attempt", "succeeded"):
        assert expected in detail, expected
    assert f'href="http://jaeger.example:16686/trace/{done["trace_id"]}"' in detail
    assert 'name="_save"' not in detail and "deletelink" not in detail
    columns = project.step("model_columns")
    assert columns["db_table"] == project.table
    assert columns["columns"] == sorted(audit_table(project.table).c.keys())


def test_the_admin_lost_filter_searches_within_the_queue_filter(project: DjangoProject) -> None:
    """Behind more lost tasks of another queue than the lost filter lists (LOST_LIMIT, 1000),
    a queue's own lost task is still found: the queue filter narrows audit.lost's search, it
    is not applied to the oldest thousand of every queue."""
    table = audit_table(project.table)
    crowd = [
        row(task_id=f"dj-crowd-{uuid.uuid4()}", queue="crowded", published_at=ago(60),
            sent_at=ago(60))
        for _ in range(1000)
    ]  # fmt: skip
    with project.engine.begin() as conn:
        conn.execute(insert(table), [{c.name: r.get(c.name) for c in table.columns} for r in crowd])
    rare = project.seed(
        task_id=f"dj-rare-{uuid.uuid4()}", queue="rare", published_at=ago(30), sent_at=ago(30)
    )
    crowded, rare_page = _admin(
        project,
        {"path": f"{CHANGELIST}?lost=any"},
        {"path": f"{CHANGELIST}?queue=rare&lost=any"},
    )
    assert crowded["status"] == rare_page["status"] == 200
    assert rare["task_id"] not in crowded["html"] and "Only the oldest 1000" in crowded["html"]
    assert rare["task_id"] in rare_page["html"]
    assert "lost: sent, never received" in rare_page["html"]


def test_the_admin_replay_action_replays_a_lost_task_and_records_the_user(
    project: DjangoProject,
) -> None:
    """ "Replay selected tasks" shows the plan, then sends a task stranded on a queue nobody
    consumes to the worker's queue: the replay runs, the original row records
    ``django:<username>``; replaying it again is refused with the CLI's reason; a staff user
    without the replay permission is not offered the action."""
    project.start_worker(auto=False)
    task_id = f"dj-replay-{uuid.uuid4()}"
    dead = f"{project.queue}-dead"
    project.step("publish", task="shop.add", args=[20, 22], task_id=task_id, queue=dead)
    [original] = project.wait_rows(task_id, lambda rows: rows[0]["sent_at"] is not None)
    user = f"ops-{uuid.uuid4().hex[:6]}"
    action = {"action": "replay_selected", "_selected_action": [original["publish_id"]]}
    plan, sent, again = _admin(
        project,
        {"method": "post", "path": CHANGELIST, "data": action},
        {"method": "post", "path": CHANGELIST, "follow": True,
         "data": {**action, "replay_queue": project.queue, "confirm": "yes"}},
        {"method": "post", "path": CHANGELIST, "follow": True,
         "data": {**action, "confirm": "yes"}},
        user=user,
    )  # fmt: skip
    assert (
        plan["status"] == 200 and "send (new task id)" in plan["html"] and task_id in plan["html"]
    )
    assert sent["status"] == 200, sent["html"][-2000:]
    [message] = sent["messages"]
    assert (
        message.startswith(f"Replayed shop.add[{task_id}] as ")
        and f"(queue {project.queue})" in message
    )
    new_task_id = message.split(" as ", 1)[1].split()[0]
    [replayed] = project.wait_rows(new_task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert replayed["replay_of"] == original["publish_id"] and replayed["queue"] == project.queue
    [after] = project.rows(task_id)
    assert after["replayed_by"] == f"django:{user}" and after["replayed_as"] == new_task_id
    refused = f"it was already replayed as {new_task_id}; --force replays it again"
    assert again["messages"] == [f"Refused shop.add[{task_id}]: {refused}"]
    [staff_page] = _admin(
        project, {"path": CHANGELIST}, staff_perms=["otel_celery_publish.view_publishattempt"]
    )
    assert staff_page["status"] == 200 and task_id in staff_page["html"]
    assert "replay_selected" not in staff_page["html"]


def test_the_admin_caps_its_count_and_refuses_to_replay_more_than_500_tasks(
    project: DjangoProject,
) -> None:
    """With 10,001 rows the changelist says "10,000+" (the paginator stopped counting). A
    replay of more than 500 tasks (checked boxes, or "select all" across the pages) is refused
    with a message pointing at the CLI, before any plan: the confirmation form would post a
    field per task, past Django's DATA_UPLOAD_MAX_NUMBER_FIELDS (a 400)."""
    table = audit_table(project.table)
    rows = [row(task_id=f"dj-bulk-{uuid.uuid4()}", sent_at=ago(21)) for _ in range(10_001)]
    with project.engine.begin() as conn:
        conn.execute(insert(table), [{c.name: r.get(c.name) for c in table.columns} for r in rows])
    ids = [r["publish_id"] for r in rows[:501]]
    page, across, checked, fine = _admin(
        project,
        {"path": CHANGELIST},
        {"method": "post", "path": CHANGELIST, "follow": True,
         "data": {"action": "replay_selected", "select_across": "1", "_selected_action": ids[:1]}},
        {"method": "post", "path": CHANGELIST, "follow": True,
         "data": {"action": "replay_selected", "_selected_action": ids}},
        {"method": "post", "path": CHANGELIST,
         "data": {"action": "replay_selected", "_selected_action": ids[:500]}},
    )  # fmt: skip
    refusal = (
        "Select at most 500 tasks to replay; for more, use `celery -A proj audit replay --lost`."
    )
    assert page["status"] == 200 and "10,000+ published tasks" in page["html"]
    assert (across["status"], across["messages"]) == (200, [refusal])
    assert (checked["status"], checked["messages"]) == (200, [refusal])
    assert fine["status"] == 200 and 'id="replay-plan"' in fine["html"]
    assert "of 500 selected task(s) would be sent again" in fine["html"]


def test_the_cli_replays_a_task_registered_only_in_a_django_apps_tasks_module(
    project: DjangoProject,
) -> None:
    """``celery -A proj audit replay`` with no OTEL_CELERY_PUBLISH_AUDIT_URL: the command sets
    Django up (so it reads Django's database) and imports the autodiscovered shop/tasks.py (so
    shop.add is registered) before planning the replay."""
    project.start_worker(auto=False)
    task_id = f"dj-cli-{uuid.uuid4()}"
    project.step(
        "publish", task="shop.add", args=[1, 1], task_id=task_id, queue=f"{project.queue}-dead"
    )
    project.wait_rows(task_id, lambda rows: rows[0]["sent_at"] is not None)
    done = project.celery("audit", "replay", task_id, "--queue", project.queue, "--yes", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["status"] == "sent", result
    project.wait_rows(result["new_task_id"], lambda rows: rows[0]["outcome"] == "succeeded")


def test_audit_lost_check_results_reads_the_django_db_result_backend(
    project: DjangoProject,
) -> None:
    """``celery -A proj audit lost --check-results`` with ``CELERY_RESULT_BACKEND =
    "django-db"``: an attempt the result backend saw succeed is dropped, one it never saw is
    kept with its state PENDING."""
    finished = project.seed(
        task_id=f"dj-seen-{uuid.uuid4()}", published_at=ago(30), sent_at=ago(30)
    )
    lost = project.seed(task_id=f"dj-unseen-{uuid.uuid4()}", published_at=ago(30), sent_at=ago(30))
    project.step("store_result", task_id=finished["task_id"], status="SUCCESS")
    done = project.celery("audit", "lost", "--check-results", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = {t["task_id"]: t for t in json.loads(done.stdout)}
    assert finished["task_id"] not in found
    assert found[lost["task_id"]]["result_state"] == "PENDING"
