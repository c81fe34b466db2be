"""Fixtures: a fresh PostgreSQL database, an OTLP/HTTP receiver, a broker (Redis, or RabbitMQ
for the tests that ask for it), real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu
import kombu.pools
import pytest
import redis
from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from otel_celery_publish import CeleryPublishInstrumentor, _guard
from otel_celery_publish.hooks import _celery
from otel_celery_publish.schema.table import audit_table
from tests.app import app
from tests.otlp_receiver import Receiver, serve, wait_for
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("OCP_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BROKER = os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9")
RABBITMQ = os.environ.get("OCP_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(autouse=True)
def internal_errors() -> Iterator[list[tuple[str, BaseException]]]:
    """Errors our guard swallowed in this process fail the test (unless the test takes them)."""
    caught: list[tuple[str, BaseException]] = []
    _guard.on_internal_error = lambda where, exc: caught.append((where, exc))
    yield caught
    _guard.on_internal_error = None
    unexpected = [c for c in caught if not getattr(c[1], "_ocp_expected", False)]
    assert not unexpected, f"internal errors swallowed by the guard: {unexpected}"


@pytest.fixture(scope="session", autouse=True)
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every writer of this session, workers included, spools under a directory of its own."""
    path = tmp_path_factory.mktemp("spool")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_CELERY_PUBLISH_SPOOL_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of our own for this test session, dropped at the end."""
    name = f"ocp_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def audit_rows(engine: Engine, task_id: str) -> list[dict[str, Any]]:
    table = audit_table()
    with engine.connect() as conn:
        result = conn.execute(
            table.select().where(table.c.task_id == task_id).order_by(table.c.published_at)
        )
        return [dict(r._mapping) for r in result]


def wait_row(
    engine: Engine, task_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    try:
        return wait_for(
            lambda: (rows := audit_rows(engine, task_id)) and done(rows) and rows,
            timeout,
            f"audit rows of {task_id}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {audit_rows(engine, task_id)}") from None


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = serve(rec)
    rec.endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield rec
    server.shutdown()


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> str:
    return f"ocp-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


@dataclass
class Broker:
    """The broker of one test: its URL, its ``messaging.system`` and the queues to delete."""

    name: str
    url: str
    system: str
    queues: list[str]

    def delete_queues(self) -> None:
        """Delete every queue the test used, with its messages (and on RabbitMQ the direct
        exchange Celery declared for it)."""
        if self.name == "redis":
            redis.Redis.from_url(self.url).delete(*self.queues)
            return
        with kombu.Connection(self.url) as conn:
            channel = conn.default_channel
            for queue in self.queues:
                # RabbitMQ answers ok for a queue or exchange that does not exist.
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def use_broker(url: str) -> None:
    """Point the in-process publisher app (``tests.app.app``) at ``url``.

    Its broker connections live in kombu's pools, keyed by URL, and the app caches the pool it
    took from them (``app._pool``, ``app.amqp._producer_pool``): reset all three so the next
    publish opens a connection to ``url``. Our hooks cache ``messaging.system`` per app, read
    once because broker URLs do not change in a running application; this one does.
    """
    kombu.pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.broker_url = url
    _celery.app_facts.cache_clear()


@pytest.fixture
def broker(request: pytest.FixtureRequest, queue_name: str) -> Iterator[Broker]:
    """The test's broker: Redis unless parametrized ``indirect`` with ``"rabbitmq"``. Workers
    started by ``start_worker`` and this process's publishes use it; the test's queue (and any
    name it adds to ``queues``) is deleted at the end, after the workers stopped."""
    name = getattr(request, "param", "redis")
    url = {"redis": BROKER, "rabbitmq": RABBITMQ}[name]
    # The semconv's messaging.system for each, written out: not derived by the code under test.
    found = Broker(name, url, {"redis": "redis", "rabbitmq": "rabbitmq"}[name], [queue_name])
    if url != BROKER:
        use_broker(url)
    try:
        yield found
    finally:
        try:
            found.delete_queues()
        finally:
            if url != BROKER:
                use_broker(BROKER)


#: ``@both_brokers`` runs a test once on Redis and once on RabbitMQ.
both_brokers = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)


@dataclass
class Publisher:
    exporter: InMemorySpanExporter
    instrumentor: CeleryPublishInstrumentor

    def spans(self, name: str) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def publisher(pg_url: str) -> Iterator[Publisher]:
    """This test process as an instrumented publisher writing to the session's PostgreSQL."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(tracer_provider=provider, audit_url=pg_url, flush_interval=0.05)
    yield Publisher(exporter, instrumentor)
    instrumentor.uninstrument()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    nodename: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        """The pids of the worker's pool processes (prefork), from /proc."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return children

    def kill_all(self) -> None:
        """SIGKILL the whole worker, main process and pool children at once (its own process
        group), as the OOM killer or a lost machine would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _ping(nodename: str, broker: str = BROKER) -> bool:
    if broker == app.conf.broker_url:
        control = app
    else:
        control = Celery("ocp_ping", broker=broker, set_as_current=False)
    try:
        replies = control.control.ping(destination=[nodename], timeout=0.5)
    finally:
        if control is not app:
            control.close()
    return any(nodename in r for r in replies)


def worker_telemetry_env(pg_url: str, receiver: Receiver) -> dict[str, str]:
    """A worker subprocess's environment: audit rows to ``pg_url``, spans and metrics over
    OTLP/HTTP to the in-test ``receiver``, both shipped quickly."""
    return {
        "OTEL_CELERY_PUBLISH_AUDIT_URL": pg_url,
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # type: ignore[attr-defined]
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }


@pytest.fixture
def start_worker(
    pg_url: str, receiver: Receiver, queue_name: str, tmp_path: Path, broker: Broker
) -> Iterator[Callable[..., Worker]]:
    """Start ``celery -A tests.app worker`` processes on the test's broker; stopped (warm
    shutdown) at teardown."""
    workers: list[Worker] = []

    def start(
        pool: str = "solo",
        concurrency: int = 1,
        auto: bool = False,
        env: dict[str, str] | None = None,
        queue: str | None = None,
    ) -> Worker:
        """A worker on ``queue`` (default: the test's); ``env`` may set ``OCP_BROKER_URL``."""
        nodename = f"ocp-{uuid.uuid4().hex[:8]}@localhost"
        log = tmp_path / f"{nodename}.log"
        cmd = [str(BIN / "celery"), "-A", "tests.app", "worker", "-P", pool]
        cmd += ["-c", str(concurrency), "-Q", queue or queue_name, "-n", nodename, "-l", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if auto:
            cmd = [str(BIN / "opentelemetry-instrument"), *cmd]
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OCP_BROKER_URL": broker.url,
            "OCP_QUEUE": queue or queue_name,
            "OCP_SETUP_SDK": "0" if auto else "1",
            "OTEL_SERVICE_NAME": "ocp-test-worker",
            **worker_telemetry_env(pg_url, receiver),
            **(env or {}),
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(proc, nodename, log)
        workers.append(worker)
        try:
            url = full_env["OCP_BROKER_URL"]
            wait_for(
                lambda: proc.poll() is not None or _ping(nodename, url),
                60,
                f"worker {nodename}",
            )
        except AssertionError:
            raise AssertionError(f"worker did not answer ping:\n{worker.output()}") from None
        assert proc.poll() is None, f"worker exited:\n{worker.output()}"
        return worker

    yield start
    for worker in workers:
        stop_worker(worker.proc)
    for worker in workers:
        assert "otel-celery-publish internal error" not in worker.output(), worker.output()


def stop_worker(proc: subprocess.Popen[Any]) -> None:
    """A warm shutdown (SIGTERM) within 30 s, else SIGKILL of its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A loopback TCP proxy in front of PostgreSQL: the database's faults on demand."""
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def drain_queue(queue_name: str) -> Iterator[None]:
    """Delete the test's Redis queue afterwards (messages published with no worker)."""
    yield
    app.connection_for_write().default_channel.client.delete(queue_name)
