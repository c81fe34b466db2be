"""The sidecar shipper: one process per host ships every spool segment of a spool directory, so
the publishing processes only append (``celery -A proj audit ship --follow``).

Shipping in the publishing process costs the host's publishes: the shipping thread's decoding
and database writes hold the GIL that a publish returning from the broker waits for. A sidecar
takes that work to another process.

The protocol is one lock file per spool directory, ``shipper.lock``:

* the sidecar holds an exclusive ``flock`` on it for as long as it runs (a second sidecar waits,
  polling, and takes over when the first one stops or dies: the kernel drops the lock of a
  killed process);
* each writer's thread probes it once per cycle (a shared ``flock``, at once released). While a
  sidecar holds it, the thread stands down: what it keeps in memory goes to its spool segment
  instead of the database, it ships nothing and adopts nothing, and it rotates its segment once
  large (releases it; the sidecar ships the rest and deletes it). ``flush()`` and ``close()``
  still ship everything themselves, so their promise does not depend on the sidecar.

The sidecar ships live segments as they grow (complete records only: a torn tail is a write in
progress) and finishes and deletes released and dead processes' segments. Shipping a record
twice (a writer's ``flush()`` beside the sidecar, a sidecar restarted) stores it once: every write
is an idempotent upsert.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable

from opentelemetry import metrics

from otel_celery_publish._guard import report
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import Database
from otel_celery_publish.sink.directories import SpoolRefused, file_problem, open_dir
from otel_celery_publish.sink.instruments import instruments
from otel_celery_publish.sink.quarantine import Quarantine
from otel_celery_publish.sink.records import Record
from otel_celery_publish.sink.shipping import ship_isolating
from otel_celery_publish.sink.spool import SUFFIX, finish_segment, ship_range, target_dir

logger = logging.getLogger("otel_celery_publish")

LOCK_NAME = "shipper.lock"
# The longest wait between two failed shipping attempts, the sidecar's and the writer's.
RETRY_BACKOFF_MAX_S = 30.0
Ship = Callable[[list[Record]], None]


def _open_lock(directory: str, *, create: bool) -> int | None:
    """The directory's lock file, after the spool's directory checks; created ``0600`` by the
    sidecar, None for a writer when there is none (so no sidecar either)."""
    dirfd = open_dir(directory, create=create)
    if dirfd is None:
        return None
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dirfd)
    problem = file_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise SpoolRefused(f"{os.path.join(directory, LOCK_NAME)} {problem}")
    return fd


class SidecarProbe:
    """A writer's view of the lock: is a sidecar shipping this directory now?"""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._fd = -1

    def present(self) -> bool:
        """True while a sidecar holds the lock. Never raises: a directory we cannot use means
        no sidecar (the writer then ships itself, and reports what is wrong with the spool)."""
        try:
            if self._fd < 0:
                fd = _open_lock(self._directory, create=False)
                if fd is None:
                    return False
                self._fd = fd
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except (OSError, SpoolRefused):
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def forget(self) -> None:
        """In a forked child, or when closing: drop the descriptor (we never hold the lock)."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def running(settings: Settings | None = None) -> bool:
    """Whether a sidecar ships the spool directory of ``settings`` (default: the environment's)
    now: the compose stack's healthcheck."""
    settings = settings or Settings.from_env()
    probe = SidecarProbe(target_dir(settings.spool_dir, settings.audit_url, settings.table_name))
    try:
        return probe.present()
    finally:
        probe.forget()


class Sidecar:
    """The shipping side of the lock: :meth:`acquire` it, then :meth:`cycle` every interval."""

    def __init__(self, directory: str, ship: Ship) -> None:
        self.directory = directory
        self._ship = ship
        self._lock_fd = -1
        # Live segments: name -> (inode, bytes already shipped).
        self._offsets: dict[str, tuple[int, int]] = {}

    def acquire(self) -> bool:
        """Take the lock if no other sidecar holds it; True when this one is the shipper."""
        if self._lock_fd < 0:
            fd = _open_lock(self.directory, create=True)
            assert fd is not None
            self._lock_fd = fd
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
        self._lock_fd = -1

    def cycle(self) -> int:
        """Ship what every segment holds beyond what was shipped; return the records shipped."""
        dirfd = open_dir(self.directory, create=True)
        assert dirfd is not None
        try:
            names = sorted(n for n in os.listdir(dirfd) if n.endswith(SUFFIX))
            for gone in set(self._offsets) - set(names):
                del self._offsets[gone]
            return sum(self._segment(dirfd, name) for name in names)
        finally:
            os.close(dirfd)

    def _segment(self, dirfd: int, name: str) -> int:
        path = os.path.join(self.directory, name)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except FileNotFoundError:
            return 0  # its owner rotated it away after shipping it itself
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return _refuse(path, "is a symbolic link")
        try:
            st = os.fstat(fd)
            problem = file_problem(st)
            if problem:
                return _refuse(path, problem)
            ino, start = self._offsets.get(name, (st.st_ino, 0))
            if ino != st.st_ino:
                start = 0
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # live: its owner appends to it
                done = ship_range(fd, start, st.st_size, self._ship)
                self._offsets[name] = (st.st_ino, done.offset)
                if done.damage():
                    report(
                        "audit spool damaged",
                        SpoolRefused(f"spool segment {path} holds {done.damage()}"),
                    )
                return done.shipped
            return self._finish(dirfd, name, path, fd, start)
        finally:
            os.close(fd)

    def _finish(self, dirfd: int, name: str, path: str, fd: int, start: int) -> int:
        """A segment released (rotated) or left by a dead process: ship the rest, delete it."""
        if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return 0  # finished by someone else while we opened it
        self._offsets.pop(name, None)
        return finish_segment(fd, dirfd, path, name, self._ship, start=start)


def shipper(settings: Settings, directory: str) -> tuple[Ship, Callable[[], None]]:
    """``(ship, close)``: a batch writer into ``settings``' table outside the writer's thread,
    quarantining what the database refuses even repaired (as the writer does)."""
    table = audit_table(settings.table_name)
    db = Database(settings, table)
    store = Quarantine(
        directory, instruments(metrics.get_meter("otel_celery_publish")).quarantined.add
    )
    return (lambda rows: ship_isolating(db.upsert, rows, table, store.refuse)), db.dispose


def run(settings: Settings, *, follow: bool, interval: float, stop: threading.Event) -> int:
    """Ship the spool directory of ``settings``: one cycle, or (``follow``) one every
    ``interval`` seconds until ``stop``, standing by while another sidecar holds the lock.
    Returns the records shipped. A failed cycle (the database down) is reported and retried
    from where it stopped, after a wait that doubles with each failure in a row up to
    :data:`RETRY_BACKOFF_MAX_S` (the sidecars of every host do not hammer a struggling
    database); a refused record is repaired or quarantined as in the writer."""
    directory = target_dir(settings.spool_dir, settings.audit_url, settings.table_name)
    ship, close = shipper(settings, directory)
    sidecar = Sidecar(directory, ship)
    total, standing_by = 0, False
    wait = interval
    try:
        while True:
            if sidecar.acquire():
                if standing_by:
                    logger.info("otel-celery-publish: now shipping %s", directory)
                standing_by = False
                try:
                    total += sidecar.cycle()
                    wait = interval
                except Exception as exc:
                    if not follow:
                        raise
                    wait = min(wait * 2, max(interval, RETRY_BACKOFF_MAX_S))
                    report(
                        "audit sidecar",
                        exc,
                        f"shipping {directory} failed ({exc!r}); retrying in {wait:g} s",
                    )
            elif not standing_by:
                standing_by = True
                logger.info(
                    "otel-celery-publish: another sidecar ships %s; %s",
                    directory,
                    "standing by" if follow else "nothing to do",
                )
            if not follow or stop.wait(wait):
                return total
    finally:
        sidecar.release()
        close()


def _refuse(path: str, problem: str) -> int:
    exc = SpoolRefused(f"spool segment {path} {problem}: not shipped, left as it is")
    report("audit spool: segment refused", exc, str(exc))
    return 0
