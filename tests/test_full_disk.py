"""A full disk under the spool (a 64 KiB tmpfs) while the database is down: publishes go on,
records wait in memory, and every row arrives once the database is back."""

from __future__ import annotations

import errno
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine, make_url

from tests.app import app, login
from tests.conftest import audit_rows
from tests.otlp_receiver import wait_for
from tests.tcp_proxy import TcpProxy
from tests.test_durability import _counts, _expect_reported, _instrument


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 64 KiB tmpfs, ours and 0700, unmounted afterwards."""
    mount_point = Path(tempfile.mkdtemp(prefix="ocp-full-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
        check=True,
        timeout=10,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=10)
        mount_point.rmdir()


@pytest.mark.parametrize("mode", ["sync", "spool"])
def test_full_spool_disk_keeps_records_in_memory_and_loses_none(
    mode: str,
    tiny_disk: Path,
    pg_url: str,
    pg: Engine,
    queue_name: str,
    internal_errors: list[Any],
) -> None:
    """With the database down and the spool's disk full, every publish returns, the host sees
    no error, and every row reaches the database exactly once when it is back."""
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    instrumentor = _instrument(url, mode, tiny_disk, db_timeout=0.5)
    writer = instrumentor.writer
    ids: list[str] = []
    slowest = 0.0
    try:
        assert writer.flush(10)
        proxy.stop()
        padding = "x" * 1500  # ~1.6 KiB a record: the 64 KiB disk is full after a few dozen
        for i in range(120):
            started = time.monotonic()
            ids.append(login.apply_async((f"u{i}", "pw"), {"pad": padding}, queue=queue_name).id)
            slowest = max(slowest, time.monotonic() - started)
        assert not writer.flush(2), "nothing can reach the database during the outage"
        _expect_reported(internal_errors)
        full = [exc for where, exc in internal_errors if "spool" in where]
        # The disk really filled: the spool said so (ENOSPC, or its own short-write error).
        assert any(
            getattr(exc, "errno", None) == errno.ENOSPC or "disk full" in str(exc) for exc in full
        ), internal_errors
        proxy.start()
        wait_for(lambda: writer.flush(2), 30, "the memory backlog to ship after recovery")
    finally:
        instrumentor.uninstrument()
        proxy.stop()
        app.connection_for_write().default_channel.client.delete(queue_name)
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    assert all(r["payload"] for task_id in ids for r in audit_rows(pg, task_id))
    assert slowest < 1.0, f"a publish was blocked for {slowest:.2f}s (db_timeout 0.5s)"
