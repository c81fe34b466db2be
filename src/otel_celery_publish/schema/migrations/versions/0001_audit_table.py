"""The audit table as ``schema/table.py`` defines it, or adopt one created without Alembic.

Before migrations existed the writer created the table with ``table.create(checkfirst=True)``;
such a table is adopted: whatever columns and indexes it lacks are added, nothing is rewritten.
A frozen copy of the schema at this revision: never edit it, add a revision instead.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column[object]]:
    ts = sa.DateTime(timezone=True)
    return [
        sa.Column("publish_id", sa.String(36), primary_key=True),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("published_at", ts, nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("root_id", sa.String(255)),
        sa.Column("parent_id", sa.String(255)),
        sa.Column("group_id", sa.String(255)),
        sa.Column("queue", sa.String(255)),
        sa.Column("exchange", sa.String(255)),
        sa.Column("routing_key", sa.String(255)),
        sa.Column("priority", sa.Integer),
        sa.Column("eta", ts),
        sa.Column("expires", ts),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("content_type", sa.String(128)),
        sa.Column("content_encoding", sa.String(64)),
        sa.Column("payload_redacted", sa.Boolean),
        sa.Column("options", sa.JSON),
        sa.Column("args_repr", sa.Text),
        sa.Column("kwargs_repr", sa.Text),
        sa.Column("publisher_host", sa.String(255)),
        sa.Column("publisher_pid", sa.Integer),
        sa.Column("trace_id", sa.String(32)),
        sa.Column("span_id", sa.String(16)),
        sa.Column("error", sa.Text),
        sa.Column("replay_of", sa.String(36)),
        sa.Column("replayed_at", ts),
        sa.Column("replayed_as", sa.String(255)),
        sa.Column("sent_at", ts),
        sa.Column("received_at", ts),
        sa.Column("started_at", ts),
        sa.Column("finished_at", ts),
        sa.Column("outcome", sa.String(16)),
        sa.Column("worker", sa.String(255)),
        sa.Column("runtime_s", sa.Float),
        sa.Column("exception_type", sa.String(255)),
        sa.Column("exception_message", sa.Text),
    ]


def _indexes(name: str) -> list[tuple[str, str, sa.ColumnElement[bool] | None]]:
    """(index name, column, partial-index predicate)."""
    col = sa.column
    return [
        (f"ix_{name}_published_at", "published_at", None),
        (f"ix_{name}_task_id", "task_id", None),
        (
            f"ix_{name}_unfinished",
            "published_at",
            sa.and_(col("finished_at").is_(None), col("replayed_at").is_(None)),
        ),
        (f"ix_{name}_replay_of", "replay_of", col("replay_of").is_not(None)),
    ]


def upgrade() -> None:
    name: str = context.config.attributes["table_name"]
    existing_columns: set[str] = set()
    existing_indexes: set[str] = set()
    if not context.is_offline_mode():
        inspector = sa.inspect(op.get_bind())
        if inspector.has_table(name):
            existing_columns = {c["name"] for c in inspector.get_columns(name)}
            existing_indexes = {str(i["name"]) for i in inspector.get_indexes(name)}
    if not existing_columns:
        op.create_table(name, *_columns())
    else:
        for column in _columns():
            if column.name not in existing_columns:
                op.add_column(name, column)
    for index, column_name, where in _indexes(name):
        if index not in existing_indexes:
            op.create_index(index, name, [column_name], postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    op.drop_table(context.config.attributes["table_name"])
