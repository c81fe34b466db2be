"""A hostile local user and crafted spool files: nothing planted is shipped, nothing of ours is
deleted, and every refusal names the path and the reason.

The hostile user is real: a forked child that has become ``nobody`` (uid 65534) plants files in
a sticky, world-writable directory (our stand-in for ``/tmp``). Where a file must be another
user's *inside* a directory of ours (which nobody else can write to), root hands it over with
``chown``, as it would be after a process of that user wrote it there.
"""

from __future__ import annotations

import datetime
import os
import pickle
import stat
import struct
import traceback
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from otel_celery_publish import Settings, rows
from otel_celery_publish.sink import spool as spool_mod
from otel_celery_publish.sink.directories import SpoolRefused
from otel_celery_publish.sink.records import HEADER, MAX_RECORD, CorruptRecord, check_row, encode
from otel_celery_publish.sink.spool import BAD_SUFFIX, Spool, adopt_orphans, target_dir
from otel_celery_publish.sink.writer import AuditWriter
from tests.app import add
from tests.conftest import Publisher, audit_rows

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")

NOBODY = 65534
NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)
URL_TABLE = ("sqlite:///unused.db", "celery_publish_audit")


def _row(publish_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "publish_id": publish_id,
        "task_id": publish_id,
        "task_name": "t",
        "published_at": NOW,
        **extra,
    }


def _frame(data: bytes) -> bytes:
    """``data`` framed as a spool record with a valid length and CRC."""
    return HEADER.pack(len(data), zlib.crc32(data)) + data


def as_user(uid: int, directory: Path, plant: Callable[[int], None]) -> None:
    """Run ``plant(dirfd)`` in a forked child that has become ``uid``; ``dirfd`` is
    ``directory``, opened before the switch (the child needs no way in from ``/``)."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            plant(dirfd)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(dirfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the hostile child failed to plant"


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A directory like ``/tmp``: root's, world-writable, sticky."""
    path = tmp_path / "tmp"
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.fixture
def expect_reports(internal_errors: list[Any]) -> Iterator[list[tuple[str, BaseException]]]:
    """The refusals our code reports are the behaviour under test, not failures."""
    yield internal_errors
    for _where, exc in internal_errors:
        exc._ocp_expected = True  # type: ignore[attr-defined]


def _plant_tree(spool_parent: str, target_name: str, segment: bytes) -> Callable[[int], None]:
    """A plant() making ``<spool_parent>/spool/<target>/forged.seg``, all of it open to anyone."""

    def plant(dirfd: int) -> None:
        os.mkdir(spool_parent, 0o777, dir_fd=dirfd)
        base = os.open(spool_parent, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirfd)
        os.mkdir("spool", 0o777, dir_fd=base)
        spool = os.open("spool", os.O_RDONLY | os.O_DIRECTORY, dir_fd=base)
        os.mkdir(target_name, 0o777, dir_fd=spool)
        target = os.open(target_name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=spool)
        fd = os.open("dead-1-x.seg", os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=target)
        os.write(fd, segment)
        for opened in (fd, target, spool, base):
            os.fchmod(opened, 0o777 if opened != fd else 0o666)
            os.close(opened)

    return plant


@needs_root
def test_a_spool_tree_planted_by_another_user_is_refused(
    shared_tmp: Path, expect_reports: list[Any]
) -> None:
    """A spool tree another user made in /tmp before us (the default spool when the home is not
    writable) is refused by name: their forged row is not shipped, their file is not deleted."""
    spool_dir = shared_tmp / f"otel-celery-publish-{os.geteuid()}" / "spool"
    target = target_dir(str(spool_dir), *URL_TABLE)
    forged = encode(_row("forged"))
    as_user(NOBODY, shared_tmp, _plant_tree(spool_dir.parent.name, Path(target).name, forged))
    shipped: list[Any] = []
    with pytest.raises(SpoolRefused, match=f"{spool_dir.parent}.* belongs to uid {NOBODY}"):
        adopt_orphans(target, shipped.extend)
    with pytest.raises(SpoolRefused, match=f"{spool_dir.parent}.* belongs to uid {NOBODY}"):
        Spool(target, fsync=False, max_bytes=1 << 20).append(_row("mine"))
    assert shipped == []
    assert (Path(target) / "dead-1-x.seg").read_bytes() == forged


@needs_root
def test_the_writer_keeps_rows_in_memory_when_the_spool_is_refused(
    shared_tmp: Path, tmp_path: Path, expect_reports: list[Any]
) -> None:
    """With a planted spool, a spool-mode writer still gets our rows to the database (through
    memory, reported) and never the forged one."""
    spool_dir = shared_tmp / "planted" / "spool"
    url = f"sqlite:///{tmp_path}/audit.db"
    target = target_dir(str(spool_dir), url, "celery_publish_audit")
    as_user(NOBODY, shared_tmp, _plant_tree("planted", Path(target).name, encode(_row("forged"))))
    writer = AuditWriter(
        Settings(audit_url=url, durability="spool", spool_dir=str(spool_dir), flush_interval=3600)
    )
    try:
        writer.record_publish(_row("mine"))
        writer.flush(10)
    finally:
        writer.close(10)
    refusals = [exc for _, exc in expect_reports if isinstance(exc, SpoolRefused)]
    assert refusals, "the refusal is reported"
    assert f"belongs to uid {NOBODY}" in str(refusals[0])
    engine = create_engine(url)
    try:
        assert inspect(engine).has_table("celery_publish_audit")
        with engine.connect() as conn:
            ids = conn.execute(text("SELECT publish_id FROM celery_publish_audit")).scalars()
            assert sorted(ids) == ["mine"]
    finally:
        engine.dispose()
    assert (Path(target) / "dead-1-x.seg").exists()


@needs_root
def test_a_spool_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    """The directory holding the segments must be ours, even when everything above is."""
    target = tmp_path / "spool" / "t"
    target.mkdir(parents=True, mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(SpoolRefused, match=f"{target} belongs to uid {NOBODY}"):
        Spool(str(target), fsync=False, max_bytes=1 << 20).append(_row("a"))
    with pytest.raises(SpoolRefused, match=f"{target} belongs to uid {NOBODY}"):
        adopt_orphans(str(target), lambda rows: None)


def test_a_spool_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    """Our own segment directory with group or other permissions is refused, not used."""
    target = tmp_path / "t"
    target.mkdir(mode=0o700)
    target.chmod(0o750)
    with pytest.raises(SpoolRefused, match=r"mode 0750: it must be 0700"):
        Spool(str(target), fsync=False, max_bytes=1 << 20).append(_row("a"))


def test_a_symlinked_spool_directory_is_refused(tmp_path: Path) -> None:
    """A segment directory that is a symbolic link is refused, even one pointing at our own
    0700 directory, and nothing is written through it."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(SpoolRefused, match=f"{link} is a symbolic link"):
        Spool(str(link), fsync=False, max_bytes=1 << 20).append(_row("a"))
    with pytest.raises(SpoolRefused, match="symbolic link"):
        adopt_orphans(str(link), lambda rows: None)
    assert os.listdir(real) == []


@needs_root
def test_a_symlink_another_user_planted_above_the_spool_is_refused(
    shared_tmp: Path, tmp_path: Path
) -> None:
    """A link in /tmp owned by another user could be swapped at any time: not followed, even
    to a directory of ours; a link of our own is followed."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    as_user(NOBODY, shared_tmp, lambda dirfd: os.symlink(str(mine), "theirs", dir_fd=dirfd))
    with pytest.raises(SpoolRefused, match=f"{shared_tmp / 'theirs'} .*symbolic link owned by"):
        Spool(str(shared_tmp / "theirs" / "t"), fsync=False, max_bytes=1 << 20).append(_row("a"))
    (shared_tmp / "ours").symlink_to(mine)
    spool = Spool(str(shared_tmp / "ours" / "t"), fsync=False, max_bytes=1 << 20)
    spool.append(_row("a"))
    spool.close(delete=True)
    assert (mine / "t").is_dir()


@pytest.mark.parametrize(
    ("mode", "refused"),
    [(0o777, True), (0o775, True), (0o1777, False), (0o755, False)],
    ids=["world-writable", "group-writable", "sticky", "plain"],
)
def test_a_parent_others_can_write_needs_the_sticky_bit(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    """A directory above the spool that others may write to is refused unless sticky (/tmp)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    parent.chmod(mode)
    spool = Spool(str(parent / "spool" / "t"), fsync=False, max_bytes=1 << 20)
    if refused:
        with pytest.raises(SpoolRefused, match=f"{parent} above the spool has mode {mode:04o}"):
            spool.append(_row("a"))
    else:
        spool.append(_row("a"))
        spool.close(delete=True)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_what_we_create_is_0700_and_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Directories we create are 0700 and segments 0600 under any umask (a loose one must not
    open them, a strict one must not lock us out)."""
    previous = os.umask(umask)
    try:
        spool = Spool(str(tmp_path / "a" / "b" / "t"), fsync=False, max_bytes=1 << 20)
        spool.append(_row("a"))
    finally:
        os.umask(previous)
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "t"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    [segment] = (tmp_path / "a" / "b" / "t").iterdir()
    assert stat.S_IMODE(segment.stat().st_mode) & 0o077 == 0
    spool.close(delete=True)


@needs_root
def test_a_segment_another_user_owns_is_not_adopted(
    tmp_path: Path, expect_reports: list[Any]
) -> None:
    """A segment owned by another uid is neither shipped nor deleted; ours next to it is."""
    (tmp_path / "theirs-1-x.seg").write_bytes(encode(_row("forged")))
    os.chown(tmp_path / "theirs-1-x.seg", NOBODY, NOBODY)
    (tmp_path / "ours-2-y.seg").write_bytes(encode(_row("mine")))
    shipped: list[dict[str, Any]] = []
    assert adopt_orphans(str(tmp_path), shipped.extend) == 1
    assert shipped == [_row("mine")]
    assert os.listdir(tmp_path) == ["theirs-1-x.seg"]
    [(where, exc)] = expect_reports
    assert where == "audit spool: segment refused"
    assert f"theirs-1-x.seg belongs to uid {NOBODY}" in str(exc)


def test_crafted_segments_are_refused_one_by_one_in_bounded_memory(
    tmp_path: Path, expect_reports: list[Any]
) -> None:
    """Bad pickles, wrong shapes, a 4 GiB length prefix, a FIFO, a directory and a symlink
    named *.seg are each refused; the good segment among them ships; memory stays small;
    damaged segments are set aside as .bad and not read again."""
    good = [_row("g1"), _row("g2", options={"headers": {"tenant": "acme"}})]
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    wrong_shapes = [
        {"publish_id": "x", "not_a_column": 1},
        {"publish_id": "x", "task_name": 5},
        {"publish_id": "x", "attempt": True},
        {"task_id": "no publish id"},
        ["a", "list"],
        {"publish_id": "x", "options": {"deep": deep}},
    ]
    files = {
        "a-good.seg": b"".join(encode(r) for r in good),
        "b-garbage.seg": _frame(b"\x80\x05not a pickle at all"),
        "c-code.seg": _frame(pickle.dumps(os.system)),
        "d-shape.seg": b"".join(_frame(pickle.dumps(r)) for r in wrong_shapes),
        "e-huge.seg": struct.pack("<II", 0xFFFFFFFF, 0) + b"x" * 64,
        "f-crc.seg": encode(_row("c1")) + b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"y" * 16,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # Sparse, so the 4 GiB the prefix claims really are there to be read: they never are.
    os.truncate(tmp_path / "e-huge.seg", 0xFFFFFFFF + 2 * HEADER.size)
    os.mkfifo(tmp_path / "g-fifo.seg")
    (tmp_path / "h-dir.seg").mkdir()
    (tmp_path / "i-link.seg").symlink_to(tmp_path / "a-good.seg")
    shipped: list[dict[str, Any]] = []
    tracemalloc.start()
    try:
        count = adopt_orphans(str(tmp_path), shipped.extend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 3
    assert shipped == [*good, _row("c1")]
    assert peak < 2 << 20, f"peak {peak} bytes"
    assert sorted(os.listdir(tmp_path)) == [
        f"b-garbage.seg{BAD_SUFFIX}",
        f"c-code.seg{BAD_SUFFIX}",
        f"d-shape.seg{BAD_SUFFIX}",
        f"e-huge.seg{BAD_SUFFIX}",
        f"f-crc.seg{BAD_SUFFIX}",
        "g-fifo.seg",
        "h-dir.seg",
        "i-link.seg",
    ]
    reasons = "\n".join(str(exc) for _, exc in expect_reports)
    assert f"a record length of {0xFFFFFFFF} bytes" in reasons
    assert "posix.system is not part of an audit row" in reasons
    assert "6 record(s) that are not audit rows" in reasons
    assert "a record whose CRC does not match" in reasons
    assert "g-fifo.seg is not a regular file" in reasons
    assert "h-dir.seg is not a regular file" in reasons
    assert "i-link.seg is a symbolic link" in reasons
    expect_reports_before = len(expect_reports)
    assert adopt_orphans(str(tmp_path), shipped.extend) == 0
    again = "\n".join(str(exc) for _, exc in expect_reports[expect_reports_before:])
    assert BAD_SUFFIX not in again, "set-aside segments are not read again"


def test_a_length_prefix_is_never_trusted_beyond_max_record() -> None:
    """Writing a record above MAX_RECORD is refused up front (we never write what we would not
    read back)."""
    with pytest.raises(ValueError, match="record limit"):
        encode(_row("big", payload=b"\0" * (MAX_RECORD + 1)))


def test_a_damaged_segment_of_our_own_is_set_aside(
    tmp_path: Path, expect_reports: list[Any]
) -> None:
    """If our live segment's framing breaks, what precedes it ships, the file is kept as .bad
    and the next record starts a fresh segment instead of stalling shipping forever."""
    spool = Spool(str(tmp_path), fsync=False, max_bytes=1 << 20)
    spool.append(_row("a"))
    spool.append(_row("b"))
    [name] = os.listdir(tmp_path)
    first = len(encode(_row("a")))
    fd = os.open(tmp_path / name, os.O_WRONLY)
    os.pwrite(fd, b"\xff", first + HEADER.size + 5)
    os.close(fd)
    shipped: list[dict[str, Any]] = []
    assert spool.ship(shipped.extend, rotate_at=1 << 30) == 1
    assert shipped == [_row("a")]
    assert os.listdir(tmp_path) == [name + BAD_SUFFIX]
    assert [where for where, _ in expect_reports] == ["audit spool damaged"]
    spool.append(_row("c"))
    assert spool.ship(shipped.extend, rotate_at=1 << 30) == 1
    assert shipped[-1] == _row("c")
    spool.close(delete=True)


def test_rows_our_code_builds_pass_the_shape_check() -> None:
    """The publish row and the lifecycle updates we write are all audit rows to check_row."""
    facts = rows.PublishFacts(
        publish_id="0123456789abcdef0123456789abcdef",
        task_id="t1",
        task_name="tests.add",
        body=([1, "x"], {"token": "t", "n": 1.5}, {"callbacks": None}),
        headers={
            "id": "t1",
            "retries": 1,
            "eta": "2026-11-24T12:00:00",
            "timelimit": (10, 5),
            "Authorization": "Bearer x",
            "tenant": {"id": 3, "tags": ("a", "b")},
        },
        properties={"delivery_mode": 2, "priority": 3},
        exchange="",
        routing_key="q",
        published_at=NOW.timestamp(),
        serializer="json",
        arg_names=("a", "b"),
        exclude_headers=(),
        host="h",
        pid=1,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )
    policy = rows.RowPolicy(
        redact_keys=frozenset({"token", "authorization"}),
        redact_payload=True,
        repr_maxsize=100,
        max_payload_bytes=1000,
    )
    row = rows.publish_row(facts, policy)
    check_row(row)
    at = NOW.timestamp()
    for built in (
        rows.sent(row, at),
        rows.received(row, at, "w@h", None, acks_late=True),
        rows.started(row, at, "w@h", "0123", redelivered=True),
        rows.finished(row, at, "failed", runtime_s=0.5, lost_reason="worker_lost"),
    ):
        check_row(built)
    update = _row("p", received_at=NOW, worker="w@h", outcome="failed", runtime_s=0.5)
    check_row({**update, "exception_type": "ValueError", "exception_message": None})
    with pytest.raises(CorruptRecord, match="column runtime_s cannot hold a str"):
        check_row({**update, "runtime_s": "0.5"})


def _row_with_headers(headers: dict[str, Any]) -> rows.PublishRow:
    facts = rows.PublishFacts(
        publish_id="p1",
        task_id="t1",
        task_name="tests.add",
        body=([1, 2], {}, {}),
        headers={"id": "t1", "task": "tests.add", **headers},
        properties={},
        exchange="",
        routing_key="q",
        published_at=NOW.timestamp(),
        serializer="json",
        arg_names=("a", "b"),
        exclude_headers=(),
        host="h",
        pid=1,
        trace_id=None,
        span_id=None,
    )
    policy = rows.RowPolicy(
        redact_keys=frozenset({"authorization", "api_key", "token"}),
        redact_payload=False,
        repr_maxsize=100,
        max_payload_bytes=1000,
    )
    return rows.publish_row(facts, policy)


def test_credential_headers_are_masked_in_the_row_and_the_row_says_so() -> None:
    """Custom headers named like a credential (Authorization, X-Api-Key, a nested token) are
    stored as *** and the row is marked headers_redacted; the other headers stay replayable."""
    row = _row_with_headers(
        {
            "Authorization": "Bearer s3cr3t",
            "X-Api-Key": "k-123",
            "tenant": "acme",
            "meta": {"token": "t0k", "n": 1},
        }
    )
    assert row["options"]["headers"] == {
        "Authorization": "***",
        "X-Api-Key": "***",
        "tenant": "acme",
        "meta": {"token": "***", "n": 1},
    }
    assert row["options"]["headers_redacted"] is True
    assert "s3cr3t" not in repr(row) and "k-123" not in repr(row) and "t0k" not in repr(row)


def test_plain_headers_are_stored_as_sent_without_the_mark() -> None:
    """Without a sensitive header name nothing is masked and the row carries no mark."""
    row = _row_with_headers({"tenant": "acme", "trace": {"depth": [1, 2]}})
    assert row["options"]["headers"] == {"tenant": "acme", "trace": {"depth": [1, 2]}}
    assert "headers_redacted" not in row["options"]


def test_a_real_publish_stores_credential_headers_masked(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """apply_async(headers={"Authorization": ...}) against real Redis and PostgreSQL leaves the
    header masked in the committed row."""
    result = add.apply_async(
        (1, 2), queue=queue_name, headers={"Authorization": "Bearer s3cr3t", "tenant": "acme"}
    )
    [row] = audit_rows(pg, result.id)
    stored = row["options"]["headers"]
    assert (stored["Authorization"], stored["tenant"]) == ("***", "acme")
    assert row["options"]["headers_redacted"] is True
    assert "s3cr3t" not in repr(row)


def test_a_refused_spool_is_not_checked_again_on_every_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a refusal, appends fail fast with the same reason for RECHECK_REFUSED_S (no
    directory walk per publish); once it has passed, the directory is checked again."""
    target = tmp_path / "t"
    target.mkdir(mode=0o700)
    target.chmod(0o777)
    walks: list[str] = []
    real_open_dir = spool_mod.open_dir

    def counting(path: str, *, create: bool) -> int | None:
        walks.append(path)
        return real_open_dir(path, create=create)

    monkeypatch.setattr(spool_mod, "open_dir", counting)
    spool = Spool(str(target), fsync=False, max_bytes=1 << 20)
    for _ in range(3):
        with pytest.raises(SpoolRefused, match="mode 0777"):
            spool.append(_row("a"))
    assert len(walks) == 1
    monkeypatch.setattr(spool_mod, "RECHECK_REFUSED_S", 0.0)
    spool = Spool(str(target), fsync=False, max_bytes=1 << 20)
    with pytest.raises(SpoolRefused, match="mode 0777"):
        spool.append(_row("a"))
    target.chmod(0o700)
    spool.append(_row("a"))
    assert len(walks) == 3
    spool.close(delete=True)
