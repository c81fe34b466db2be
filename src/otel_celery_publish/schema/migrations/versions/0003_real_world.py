"""The real world: which app and broker published an attempt, the beat entry that scheduled it,
who replayed it, when the watchdog gave up on it (dead-lettered); and point lookups of a
workflow (``show <group id | root id>``).

The two indexes are partial: ``group_id`` only where a task is a group or chord member, and
``root_id`` only where a task is not its own root (chains, callbacks, nested publishes). A table
without canvas pays nothing for them; on a large PostgreSQL table creating each is one scan.
A frozen copy of the schema at this revision: never edit it, add a revision instead.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _new_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("app", sa.String(255)),
        sa.Column("broker", sa.String(255)),
        sa.Column("periodic_task", sa.String(255)),
        sa.Column("replayed_by", sa.String(255)),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True)),
    ]


def _indexes(name: str) -> list[tuple[str, str, sa.ColumnElement[bool]]]:
    col = sa.column
    in_workflow = sa.and_(col("root_id").is_not(None), col("root_id") != col("task_id"))
    return [
        (f"ix_{name}_group_id", "group_id", col("group_id").is_not(None)),
        (f"ix_{name}_root_id", "root_id", in_workflow),
    ]


def upgrade() -> None:
    name: str = context.config.attributes["table_name"]
    existing_columns: set[str] = set()
    existing_indexes: set[str] = set()
    if not context.is_offline_mode():
        inspector = sa.inspect(op.get_bind())
        existing_columns = {c["name"] for c in inspector.get_columns(name)}
        existing_indexes = {str(i["name"]) for i in inspector.get_indexes(name)}
    for column in _new_columns():
        if column.name not in existing_columns:
            op.add_column(name, column)
    for index, column_name, where in _indexes(name):
        if index not in existing_indexes:
            op.create_index(index, name, [column_name], postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    name: str = context.config.attributes["table_name"]
    for index, _column, _where in _indexes(name):
        op.drop_index(index, table_name=name)
    for column in _new_columns():
        op.drop_column(name, column.name)
