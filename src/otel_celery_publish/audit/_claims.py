"""Replay bookkeeping in the audit table: which rows to re-send, and who re-sends them.

A replay claims the original row (``replayed_at``, ``replayed_as``) before its send and releases
it if the send fails, so two operators replaying at once send a task once. A row also counts as
replayed when a row whose ``replay_of`` points at it reached the broker (:func:`replay_sent`), in
case the claim's update was lost; ``lost`` leaves such rows out with the same predicate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, exists, or_, select, update

from otel_celery_publish.audit import _db
from otel_celery_publish.audit._db import TableAccess, utc


def latest_attempts(db: TableAccess, task_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The newest attempt (by attempt number, then publish time) of each task id found."""
    t = db.table
    latest: dict[str, Row[Any]] = {}
    for row in db.rows(select(t).where(t.c.task_id.in_(set(task_ids)))):
        best = latest.get(row.task_id)
        if best is None or _attempt_order(row) > _attempt_order(best):
            latest[row.task_id] = row
    return latest


def _attempt_order(row: Row[Any]) -> tuple[int, dt.datetime]:
    return row.attempt or 0, utc(row.published_at)  # type: ignore[return-value]


def rows_by_publish_id(db: TableAccess, publish_ids: Sequence[str]) -> dict[str, Row[Any]]:
    t = db.table
    return {r.publish_id: r for r in db.rows(select(t).where(t.c.publish_id.in_(publish_ids)))}


def replay_sent(table: Table, publish_id: Any) -> ColumnElement[bool]:
    """Some row replays ``publish_id`` and reached the broker. Normally the original's
    ``replayed_at`` says so too; this also holds when that update was lost, while the row of a
    replay whose send raised (written before the send, never sent) does not count."""
    replay = table.alias("replay")
    reached = or_(replay.c.sent_at.is_not(None), replay.c.received_at.is_not(None))
    return exists().where(replay.c.replay_of == publish_id, reached)


def replayed_by_row(db: TableAccess, publish_ids: Iterable[str]) -> set[str]:
    """Which of ``publish_ids`` have a replay that reached the broker (:func:`replay_sent`)."""
    t = db.table
    stmt = select(t.c.publish_id).where(
        t.c.publish_id.in_(set(publish_ids)), replay_sent(t, t.c.publish_id)
    )
    return {r.publish_id for r in db.rows(stmt)}


def claim_replay(
    db: TableAccess, publish_id: str, new_task_id: str, *, force: bool,
    replayed_by: str | None = None, original: Any = None,
) -> bool:  # fmt: skip
    """Mark ``publish_id`` replayed as ``new_task_id`` by ``replayed_by`` before sending; False
    if another replay got there first (so two operators replaying at once send it once), or,
    given the ``original`` row the plan was made from, if a worker received, started or
    finished the attempt since (it is no longer lost: re-sending would run it twice)."""
    t = db.table
    stmt = update(t).where(t.c.publish_id == publish_id)
    if not force:
        stmt = stmt.where(t.c.replayed_at.is_(None), ~replay_sent(t, publish_id))
        for edge in ("received_at", "started_at", "finished_at"):
            if original is not None and getattr(original, edge) is None:
                stmt = stmt.where(t.c[edge].is_(None))
    claim = {"replayed_at": _db.now_utc(), "replayed_as": new_task_id, "replayed_by": replayed_by}
    return db.run(stmt.values(**claim)) == 1


def release_replay(db: TableAccess, original: Row[Any], new_task_id: str) -> None:
    """Undo :func:`claim_replay` after the send failed: restore what the row said before."""
    t = db.table
    db.run(
        update(t)
        .where(t.c.publish_id == original.publish_id, t.c.replayed_as == new_task_id)
        .values(
            replayed_at=original.replayed_at,
            replayed_as=original.replayed_as,
            replayed_by=original.replayed_by,
        )
    )
