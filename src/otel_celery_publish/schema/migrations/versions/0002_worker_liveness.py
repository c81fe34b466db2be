"""Worker liveness: the ``<table>_workers`` heartbeat table, the columns that tie an attempt to
the worker instance holding it, and ``lost_reason`` in the partial index ``lost`` reads.

``ix_<table>_unfinished`` is rebuilt with its wider predicate (finished rows whose work was lost
stay in it); on a large PostgreSQL table that is one scan of the table, once. A table adopted
by 0001 from today's writer already has all of it: only what is missing is added.
A frozen copy of the schema at this revision: never edit it, add a revision instead.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _new_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("worker_instance", sa.String(36)),
        sa.Column("acks_late", sa.Boolean),
        sa.Column("lost_reason", sa.String(32)),
    ]


def _workers_columns() -> list[sa.Column[object]]:
    ts = sa.DateTime(timezone=True)
    return [
        sa.Column("instance_id", sa.String(36), primary_key=True),
        sa.Column("nodename", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("heartbeat_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("interval_s", sa.Float, nullable=False),
        sa.Column("stopped_at", ts),
    ]


def _unfinished() -> sa.ColumnElement[bool]:
    col = sa.column
    return sa.and_(
        col("replayed_at").is_(None),
        sa.or_(col("finished_at").is_(None), col("lost_reason").is_not(None)),
    )


def upgrade() -> None:
    name: str = context.config.attributes["table_name"]
    workers = f"{name}_workers"
    index = f"ix_{name}_unfinished"
    existing_columns: set[str] = set()
    index_is_current = has_workers = False
    if not context.is_offline_mode():
        inspector = sa.inspect(op.get_bind())
        existing_columns = {c["name"] for c in inspector.get_columns(name)}
        for found in inspector.get_indexes(name):
            if found["name"] == index:
                options = found.get("dialect_options", {})
                index_is_current = any("lost_reason" in str(w) for w in options.values())
        has_workers = inspector.has_table(workers)
    for column in _new_columns():
        if column.name not in existing_columns:
            op.add_column(name, column)
    if not index_is_current:
        op.drop_index(index, table_name=name)
        where = _unfinished()
        op.create_index(index, name, ["published_at"], postgresql_where=where, sqlite_where=where)
    if not has_workers:
        op.create_table(workers, *_workers_columns())


def downgrade() -> None:
    name: str = context.config.attributes["table_name"]
    op.drop_table(f"{name}_workers")
    index = f"ix_{name}_unfinished"
    op.drop_index(index, table_name=name)
    col = sa.column
    where = sa.and_(col("finished_at").is_(None), col("replayed_at").is_(None))
    op.create_index(index, name, ["published_at"], postgresql_where=where, sqlite_where=where)
    for column in _new_columns():
        op.drop_column(name, column.name)
