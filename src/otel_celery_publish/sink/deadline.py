"""Client-side deadlines on the audit database, for the writer's connections.

A database that accepts connections but never answers (a hung server, a route black-holed after
the handshake) is invisible to the kernel's timeouts: it acknowledges what we send. So every
wait of the writer on the audit database has a client-side deadline (:class:`DeadlineExceeded`
when it passes; the connection is then closed and dropped, its protocol state is unknown):

* a thread sets its deadline with :func:`bounded` (or, on the ``sync`` publish's hot path, by
  writing :data:`thread_deadline` directly): the monotonic time its database work must end by,
  and a bound on each single operation;
* PostgreSQL's waits go through psycopg's ``Connection.wait``, which takes a timeout: the
  :func:`pg_connection_class` subclass passes it what is left of the thread's deadline (or its
  own per-operation bound), connecting included;
* a dropped connection's server session may live on, holding the row locks of half a batch: the
  next connection terminates it (see :func:`bound_connections`).

The deadlines themselves (``db_timeout`` per sync publish, longer for the shipping thread's
batches and for migrations) are set by :mod:`.database`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, event

logger = logging.getLogger("otel_celery_publish")

# Our sessions' name on the server, unless the URL gives one: what _terminate looks for.
APPLICATION_NAME = "otel-celery-publish"
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s) "
    "AND application_name = current_setting('application_name') AND pid <> pg_backend_pid()"
)


class ThreadDeadline(threading.local):
    """Per thread: ``at``, the monotonic time its current database work must end by (None: no
    deadline), and ``op``, a per-operation bound overriding the connection's own. Class-level
    defaults: reading a missing attribute would raise and catch, ~0.5 us per wait."""

    at: float | None = None
    op: float | None = None


#: The calling thread's deadline, read by every wait of a :func:`pg_connection_class` connection.
thread_deadline = ThreadDeadline()


class DeadlineExceeded(Exception):
    """The audit database did not answer (or the sync connection was not free) in time."""


@contextlib.contextmanager
def bounded(at: float | None = None, op: float | None = None) -> Iterator[None]:
    """Within the block, database waits of this thread end by ``at`` (the earlier of it and an
    enclosing deadline) and each takes at most ``op`` seconds."""
    saved = thread_deadline.at, thread_deadline.op
    if at is not None and saved[0] is not None:
        at = min(at, saved[0])
    thread_deadline.at = saved[0] if at is None else at
    thread_deadline.op = saved[1] if op is None else op
    try:
        yield
    finally:
        thread_deadline.at, thread_deadline.op = saved


_PG_CONNECTION: Any = None


def pg_connection_class() -> Any:
    """A psycopg ``Connection`` whose every wait ends by the thread's deadline (or its own
    per-operation bound), built on first use: psycopg is an optional dependency."""
    global _PG_CONNECTION  # noqa: PLW0603 - one class per process, created lazily
    if _PG_CONNECTION is not None:
        return _PG_CONNECTION
    import psycopg  # noqa: PLC0415 - only with PostgreSQL (the optional extra)
    from psycopg import errors  # noqa: PLC0415

    wait_timeout = errors._WaitTimeout  # what psycopg's wait functions raise on their timeout
    base_wait = psycopg.Connection.wait
    monotonic = time.monotonic

    class AuditDeadline(psycopg.OperationalError, DeadlineExceeded):
        """Our deadline passed; an OperationalError so SQLAlchemy treats it as a disconnect."""

    class BoundedConnection(psycopg.Connection[Any]):
        op_timeout = 30.0
        # The engine's list of backends we abandoned (see bound_connections).
        abandoned: list[int] | None = None

        @classmethod
        def _connect_gen(cls, conninfo: str = "") -> Any:
            # libpq's connect_timeout is whole seconds, 2 at least; psycopg's wait_conn wakes
            # us every 0.1 s whatever it waits for, so this checks our deadline as often.
            gen = super()._connect_gen(conninfo)
            at = thread_deadline.at
            try:
                item = next(gen)
                while True:
                    if at is not None and time.monotonic() >= at:
                        gen.close()  # frees the half-open PGconn: its socket is closed
                        raise AuditDeadline("audit database: no connection within the deadline")
                    item = gen.send((yield item))
            except StopIteration as stop:
                return stop.value

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            # On every round trip of the sync publish: kept to a few attribute reads.
            limit = thread_deadline.op or self.op_timeout
            at = thread_deadline.at
            if at is not None:
                left = at - monotonic()
                if left < limit:
                    limit = left if left > 0.0 else 0.0
            if timeout is not None and timeout <= limit:
                return base_wait(self, gen, interval, timeout)  # the caller's is stricter
            try:
                return base_wait(self, gen, interval, limit)
            except wait_timeout:
                # Mid-protocol: the connection cannot be reused. Closed, SQLAlchemy sees a
                # disconnect and invalidates it (and the rest of its pool). Its server side
                # may live on (see bound_connections): remember it.
                if self.abandoned is not None and self.pgconn.backend_pid:
                    self.abandoned.append(self.pgconn.backend_pid)
                self.close()
                raise AuditDeadline(f"audit database did not answer within {limit:.2f}s") from None

    _PG_CONNECTION = BoundedConnection
    return BoundedConnection


def bound_connections(engine: Engine, connect_timeout: float, op_timeout: float) -> None:
    """Make ``engine`` connect through :func:`pg_connection_class` with these bounds.

    A connection we abandon at its deadline may have delivered half a batch: the server ran
    some of its upserts and waits for the rest (and the final Sync) in an open transaction,
    holding those rows' locks; on a black-holed route it notices only by TCP keepalive, hours
    later. Every retry of those rows would wait for those locks. So the next connection that
    succeeds terminates the backends we abandoned - only sessions of our own application name
    (a reused pid is then at worst another audit session, whose write is retried).
    """
    connection_class = pg_connection_class()
    abandoned: list[int] = []

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        # The engine's dict: copied, not changed. Autocommit from the start, as the engine
        # sets it anyway, so _terminate's statement opens no transaction.
        params = {"application_name": APPLICATION_NAME, **cparams, "autocommit": True}
        with bounded(at=time.monotonic() + connect_timeout):
            conn = connection_class.connect(*cargs, **params)
            conn.op_timeout = op_timeout
            conn.abandoned = abandoned
            if abandoned:
                _terminate(conn, abandoned)
        return conn


def _terminate(conn: Any, abandoned: list[int]) -> None:
    pids = abandoned[:]
    del abandoned[: len(pids)]
    try:
        conn.execute(_TERMINATE, (pids,)).close()
    except Exception as exc:
        if conn.closed:
            raise  # this connection failed too: an outage, reported by the caller
        # No right to (pg_signal_backend): the server's keepalive will, eventually.
        logger.warning("otel-celery-publish: could not end abandoned audit sessions: %r", exc)
