"""The local spool: audit records that must survive this process before they reach the database.

Layout: ``<spool_dir>/<target>/`` where ``target`` is a hash of the audit database URL (password
left out) and table, so two apps with different audit databases never ship each other's rows.
Each process appends to a segment of its own, ``<host>-<pid>-<random>.seg``, and holds an
exclusive ``flock`` on it for as long as it lives. The kernel drops that lock when the process
dies, SIGKILL included, so a segment nobody holds belongs to a dead process: whoever finds it
first (any process starting with the same spool directory, or ``celery audit drain``) ships it
and deletes it (:func:`adopt_orphans`). Shipping a record twice is harmless: every write is an
idempotent upsert.

Each record is one frame (:mod:`.records`), written before the message goes to the broker. The
directories are checked as :mod:`.directories` says, each time a segment is created and each
time orphans are adopted; a directory failing a check raises :class:`SpoolRefused` (the writer
then keeps its records in memory and reports it). Segments are created ``0600`` with
``O_NOFOLLOW`` and checked with ``fstat``. A segment found while adopting that is not a regular
file of ours is refused and left alone; one whose records are not audit rows, or whose framing
is broken before its end (a bad CRC, an absurd length), ships the records it can and is renamed
``<name>.bad`` for a human to look at, so it is never retried.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy.engine import make_url

from otel_celery_publish._guard import report
from otel_celery_publish.sink.directories import SpoolRefused, file_problem, open_dir
from otel_celery_publish.sink.records import CorruptRecord, Record, encode, to_ship

logger = logging.getLogger("otel_celery_publish")

SUFFIX = ".seg"
BAD_SUFFIX = ".bad"
# A refused spool directory is checked again after this long, not on every publish.
RECHECK_REFUSED_S = 5.0


def target_dir(spool_dir: str, audit_url: str, table_name: str) -> str:
    """The spool directory for one audit database and table."""
    safe_url = make_url(audit_url).render_as_string(hide_password=True)
    digest = hashlib.sha256(f"{safe_url}\0{table_name}".encode()).hexdigest()[:16]
    return os.path.join(spool_dir, digest)


# -- this process's segment ----------------------------------------------------------------


class SpoolFull(Exception):
    """The segment reached ``spool_max_bytes``; the record was not written."""


class Spool:
    """This process's segment: appended to by publishing threads, shipped by the writer thread."""

    def __init__(self, directory: str, *, fsync: bool, max_bytes: int) -> None:
        self.directory = directory
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._dirfd = -1  # the checked directory, held with the segment
        self._name = ""
        self._path = ""
        self._refused: tuple[float, str] | None = None  # (until, why): no check per publish
        self.size = 0  # bytes written to the current segment
        self.shipped = 0  # bytes of it already in the database

    def append(self, row: Record) -> None:
        """Write one record and hand it to the OS (and the disk, with ``spool_fsync``)."""
        frame = encode(row)
        with self._lock:
            if self.size + len(frame) > self._max_bytes:
                raise SpoolFull(
                    f"spool segment {self._path} is full ({self.size} bytes, spool_max_bytes="
                    f"{self._max_bytes}): audit record {row.get('publish_id')} not spooled"
                )
            fd = self._fd if self._fd is not None else self._open()
            written = os.write(fd, frame)
            if written != len(frame):
                # Disk full mid-record: cut the torn tail so later records stay readable.
                os.ftruncate(fd, self.size)
                raise OSError(f"short write to spool segment {self._path} (disk full?)")
            if self._fsync:
                os.fsync(fd)
            self.size += written

    def pending(self) -> bool:
        return self.size > self.shipped

    def ship(self, ship: Callable[[list[Record]], None], rotate_at: int) -> int:
        """Ship what was appended since the last call; delete the segment once it is large and
        fully shipped (the next append starts a new one). Returns the records shipped."""
        with self._lock:
            fd, end = self._fd, self.size
        if fd is None:
            return 0
        done = ship_range(fd, self.shipped, end, ship, self._reached)
        if done.skipped:
            # We wrote these records ourselves: a row our own code builds fails check_row.
            report(
                "audit spool read",
                CorruptRecord(
                    f"{done.skipped} record(s) of spool segment {self._path} skipped: {done.first}"
                ),
            )
        with self._lock:
            if self.shipped < end:
                # Only a damaged file (or another writer) breaks the framing of our own segment;
                # later records cannot be found in it: keep it aside, start a new one.
                bad = self._set_aside()
                exc = SpoolRefused(
                    f"spool segment {self._path} is damaged ({done.corrupt}): moved to {bad}"
                )
                report("audit spool damaged", exc, str(exc))
            elif self.shipped == self.size >= rotate_at:
                self._drop()
        return done.shipped

    def _reached(self, offset: int) -> None:
        self.shipped = offset

    def close(self, *, delete: bool) -> None:
        """Release the segment; ``delete`` only when everything in it reached the database."""
        with self._lock:
            if self._fd is not None and delete:
                self._drop()
            elif self._fd is not None:
                self._release()

    def rotate(self) -> None:
        """Release the segment without deleting it (a sidecar finishes it); the next append
        starts a new one."""
        with self._lock:
            if self._fd is not None:
                self._release()
            self.size = self.shipped = 0

    def forget(self) -> None:
        """In a forked child: drop the parent's segment without touching it (its lock and file
        stay the parent's: closing our copy of the descriptor releases nothing)."""
        if self._fd is not None:
            self._release()
        self.size = self.shipped = 0

    def _open(self) -> int:
        if self._refused is not None and time.monotonic() < self._refused[0]:
            raise SpoolRefused(self._refused[1])
        try:
            dirfd = open_dir(self.directory, create=True)
        except SpoolRefused as exc:
            self._refused = (time.monotonic() + RECHECK_REFUSED_S, str(exc))
            raise
        assert dirfd is not None
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        path = os.path.join(self.directory, name)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)
        except BaseException:
            os.close(dirfd)
            raise
        try:
            problem = file_problem(os.fstat(fd))
            if problem:
                raise SpoolRefused(f"spool segment {path} {problem}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            os.close(dirfd)
            raise
        self._fd, self._dirfd, self._name, self._path = fd, dirfd, name, path
        self.size = self.shipped = 0
        return fd

    def _drop(self) -> None:
        # Unlinked before the lock goes, so nobody adopts what we already shipped.
        os.unlink(self._name, dir_fd=self._dirfd)
        self._release()
        self.size = self.shipped = 0

    def _set_aside(self) -> str:
        bad = self._path + BAD_SUFFIX
        os.rename(
            self._name, self._name + BAD_SUFFIX, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd
        )
        self._release()
        self.size = self.shipped = 0
        return bad

    def _release(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        os.close(self._dirfd)
        self._fd, self._dirfd = None, -1


# -- dead processes' segments --------------------------------------------------------------


def adopt_orphans(directory: str, ship: Callable[[list[Record]], None]) -> int:
    """Ship and delete the segments of dead processes in ``directory``; return records shipped.

    A segment whose lock we cannot take is alive (or being adopted by someone else): skipped.
    If shipping fails the segment stays for the next attempt. A directory failing the checks
    raises :class:`SpoolRefused`; a segment failing them is refused alone (see the module
    docstring) and the others are still shipped.
    """
    dirfd = open_dir(directory, create=False)
    if dirfd is None:
        return 0
    try:
        names = sorted(n for n in os.listdir(dirfd) if n.endswith(SUFFIX))
        return sum(_adopt(dirfd, os.path.join(directory, name), name, ship) for name in names)
    finally:
        os.close(dirfd)


def _adopt(dirfd: int, path: str, name: str, ship: Callable[[list[Record]], None]) -> int:
    fd = -1
    try:
        problem = file_problem(os.stat(name, dir_fd=dirfd, follow_symlinks=False))
        if not problem:
            # O_NONBLOCK: a FIFO swapped in after the stat must not hang us on open.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        return 0  # adopted and deleted by someone else
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        problem = "is a symbolic link"
    if fd < 0:
        return _refuse(path, str(problem))
    try:
        st = os.fstat(fd)
        problem = file_problem(st)
        if problem:
            return _refuse(path, problem)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino != st.st_ino:
            return 0  # adopted and deleted by someone else while we opened it
        return finish_segment(fd, dirfd, path, name, ship)
    except (BlockingIOError, FileNotFoundError):
        return 0
    finally:
        os.close(fd)


class Shipped(NamedTuple):
    """What :func:`ship_range` did."""

    shipped: int  # records shipped
    offset: int  # how far the file was read
    skipped: int  # complete records that are not audit rows
    first: str  # why the first skipped one was
    corrupt: str | None  # broken framing at ``offset``: nothing after it can be read

    def damage(self) -> str:
        """What is wrong with the file, or ``""``."""
        why = f"{self.skipped} record(s) that are not audit rows ({self.first})"
        parts = [why] if self.skipped else []
        parts += [f"{self.corrupt} at byte {self.offset}"] if self.corrupt else []
        return " and ".join(parts)


def ship_range(
    fd: int, start: int, end: int, ship: Callable[[list[Record]], None],
    reached: Callable[[int], None] = lambda offset: None,
) -> Shipped:  # fmt: skip
    """Ship the audit rows of ``fd[start:end]`` in batches; ``reached(offset)`` after each one
    (if ``ship`` raises, what was shipped before stays shipped)."""
    count = skipped = 0
    first = ""
    offset, corrupt = start, None
    for batch, offset in to_ship(fd, start, end):
        if batch.rows:
            ship(batch.rows)
            count += len(batch.rows)
        reached(offset)
        first = first or (batch.refused[0] if batch.refused else "")
        skipped += len(batch.refused)
        corrupt = batch.corrupt
    return Shipped(count, offset, skipped, first, corrupt)


def finish_segment(
    fd: int, dirfd: int, path: str, name: str, ship: Callable[[list[Record]], None], *,
    start: int = 0,
) -> int:  # fmt: skip
    """A segment nobody appends to any more (its owner dead, or it rotated it away): ship it
    from ``start`` and delete it, or rename it ``.bad`` if damaged; return the records shipped."""
    end = os.fstat(fd).st_size
    done = ship_range(fd, start, end, ship)
    damage = done.damage()
    if damage:
        os.rename(name, name + BAD_SUFFIX, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        exc = SpoolRefused(
            f"spool segment {path} holds {damage}: shipped the {done.shipped} readable record(s) "
            f"and moved it to {path}{BAD_SUFFIX}"
        )
        report("audit spool: damaged segment", exc, str(exc))
        return done.shipped
    if done.offset < end:
        logger.warning(
            "otel-celery-publish: spool segment %s ends with %d unreadable bytes (a "
            "process killed mid-write; that publish never reached the broker)",
            path,
            end - done.offset,
        )
    os.unlink(name, dir_fd=dirfd)
    return done.shipped


def _refuse(path: str, problem: str) -> int:
    exc = SpoolRefused(f"spool segment {path} {problem}: not adopted, left as it is")
    report("audit spool: segment refused", exc, str(exc))
    return 0
