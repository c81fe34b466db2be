"""The audit table: one row per publish attempt (a retry or a replay is a new row)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()


def audit_table(name: str = "celery_publish_audit", meta: MetaData = metadata) -> Table:
    """Define (or return the already defined) audit table called ``name``."""
    if name in meta.tables:
        return meta.tables[name]
    ts = DateTime(timezone=True)
    return Table(
        name,
        meta,
        # Our own id for this publish attempt, carried in the message headers: the worker's
        # lifecycle updates find the row by it, and shipping a record twice stores it once.
        Column("publish_id", String(36), primary_key=True),
        Column("task_id", String(255), nullable=False),
        Column("task_name", String(255), nullable=False),
        Column("published_at", ts, nullable=False),
        Column("attempt", Integer),
        Column("root_id", String(255)),
        Column("parent_id", String(255)),
        Column("group_id", String(255)),
        Column("queue", String(255)),
        Column("exchange", String(255)),
        Column("routing_key", String(255)),
        Column("priority", Integer),
        Column("eta", ts),
        Column("expires", ts),
        # The real message body (args, kwargs, embed) as the task's serializer encodes it.
        Column("payload", LargeBinary),
        Column("content_type", String(128)),
        Column("content_encoding", String(64)),
        Column("payload_redacted", Boolean),
        # Publish options needed to re-send: custom headers, time limits, shadow, ignore_result...
        Column("options", JSON),
        Column("args_repr", Text),
        Column("kwargs_repr", Text),
        Column("publisher_host", String(255)),
        Column("publisher_pid", Integer),
        Column("trace_id", String(32)),
        Column("span_id", String(16)),
        Column("error", Text),
        # A replay is a new row pointing at the attempt it re-sent.
        Column("replay_of", String(36)),
        # Lifecycle, written through the batched path.
        Column("sent_at", ts),
        Column("received_at", ts),
        Column("started_at", ts),
        Column("finished_at", ts),
        Column("outcome", String(16)),
        Column("worker", String(255)),
        Column("runtime_s", Float),
        Column("exception_type", String(255)),
        Column("exception_message", Text),
        Index(f"ix_{name}_published_at", "published_at"),
        Index(f"ix_{name}_task_id", "task_id"),
    )
