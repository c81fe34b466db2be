"""The audit table: one row per publish attempt (a retry or a replay is a new row).

The migrations in ``schema/migrations`` create exactly this table (a test compares them); change
it here *and* add a revision there.

Indexes lead with ``published_at`` wherever a query scans a time range (``lost``, ``stats``,
``prune``), so the table can be range-partitioned by it. ``lost`` reads a partial index holding
only unfinished, unreplayed rows: at steady state a tiny fraction of the table, so finding them
over a day costs the same with ten thousand rows as with ten million. ``task_id`` and
``replay_of`` are point lookups (``show``, ``replay``, a retry's or replay's earlier rows).
Rows the worker finished but whose work was not done (``lost_reason``: the pool child running it
died, the message was discarded) stay in that partial index until they are replayed.

``<table>_workers`` holds one row per worker instance (one boot of a worker's main process): its
heartbeat, so ``lost`` can tell a task still running on a live worker from one whose worker died.
It stays small: one row per worker boot, deleted by ``prune`` once last seen before its cutoff.

On PostgreSQL the audit table's pages are filled to :data:`FILLFACTOR` percent at insert: the
room left lets the lifecycle updates (sent, received, started) be HOT updates, on the row's own
page with no new index entries (migration 0004; the figures are in ``docs/scaling.md``).
"""

from __future__ import annotations

from typing import Literal, get_args

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    or_,
)

#: Why ``lost`` lists an attempt: one vocabulary for the SQL, the API, the CLI and the JSON schema.
LostReason = Literal[
    "not_sent",
    "not_received",
    "expired",
    "not_started",
    "not_finished",
    "worker_dead",
    "worker_lost",
    "discarded",
    "returned",
]
#: The reasons a worker writes into the row's ``lost_reason`` column (the others are derived).
RecordedLostReason = Literal["worker_lost", "discarded"]

#: Each ``reason`` :func:`lost` gives, in words (the CLI's table shows these).
LOST_REASONS: dict[LostReason, str] = {
    "not_sent": "publish did not complete",
    "not_received": "sent, never received",
    "expired": "expired, never received",
    "not_started": "received, never started",
    "not_finished": "started, never finished",
    "worker_dead": "its worker died (heartbeat stopped)",
    "worker_lost": "its pool process died running it",
    "discarded": "discarded by the worker",
    "returned": "returned to the broker at shutdown, never received again",
}
assert set(LOST_REASONS) == set(get_args(LostReason))

metadata = MetaData()

#: Heap fillfactor of the audit table on PostgreSQL (percent of each page filled by inserts).
FILLFACTOR = 70


def audit_table(name: str = "celery_publish_audit", meta: MetaData = metadata) -> Table:
    """Define (or return the already defined) audit table called ``name``."""
    if name in meta.tables:
        return meta.tables[name]
    ts = DateTime(timezone=True)
    table = Table(
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
        # Set on the original by ``audit replay``: when, and the task id of the replay.
        Column("replayed_at", ts),
        Column("replayed_as", String(255)),
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
        # The worker instance (``<table>_workers.instance_id``) that last received or started
        # this attempt, and whether its task acks late (then a dead worker's broker redelivers).
        Column("worker_instance", String(36)),
        Column("acks_late", Boolean),
        # Set with the outcome when the worker knows the work was not done: ``worker_lost`` (the
        # pool child died running it), ``discarded`` (unregistered task, rejected message).
        Column("lost_reason", String(32)),
        # Which Celery app (``app.main``) and broker (URL without credentials) published it: a
        # process may hold several apps publishing to different brokers.
        Column("app", String(255)),
        Column("broker", String(255)),
        # The celery beat schedule entry that published it, if beat did.
        Column("periodic_task", String(255)),
        # Who replayed it (set with ``replayed_at``): ``user@host`` from the CLI or the API,
        # ``django:<username>`` from the admin.
        Column("replayed_by", String(255)),
        # Set by ``audit watch`` when a task used up its automatic replays: it is never replayed
        # automatically again (a person still can).
        Column("dead_lettered_at", ts),
        Index(f"ix_{name}_published_at", "published_at"),
        Index(f"ix_{name}_task_id", "task_id"),
        postgresql_with={"fillfactor": FILLFACTOR},
    )
    c = table.c
    unfinished = unfinished_predicate(table)
    Index(
        f"ix_{name}_unfinished",
        c.published_at,
        postgresql_where=unfinished,
        sqlite_where=unfinished,
    )
    # ``show <group id | root id>``: members of a group or chord, and every task of a workflow
    # but its root. Partial, so a table without canvas pays nothing for them.
    members = c.group_id.is_not(None)
    Index(f"ix_{name}_group_id", c.group_id, postgresql_where=members, sqlite_where=members)
    in_workflow = and_(c.root_id.is_not(None), c.root_id != c.task_id)
    Index(f"ix_{name}_root_id", c.root_id, postgresql_where=in_workflow, sqlite_where=in_workflow)
    replays = c.replay_of.is_not(None)
    Index(f"ix_{name}_replay_of", c.replay_of, postgresql_where=replays, sqlite_where=replays)
    return table


def unfinished_predicate(table: Table) -> ColumnElement[bool]:
    """The predicate of ``ix_<table>_unfinished``: what ``lost`` reads. ``lost`` repeats it
    verbatim in its WHERE clause, so PostgreSQL can prove the partial index applies."""
    c = table.c
    return and_(c.replayed_at.is_(None), or_(c.finished_at.is_(None), c.lost_reason.is_not(None)))


def workers_table(audit_name: str = "celery_publish_audit", meta: MetaData = metadata) -> Table:
    """Define (or return) the heartbeat table of audit table ``audit_name``: one row per
    worker instance, upserted by its main process every ``heartbeat_interval`` seconds."""
    name = f"{audit_name}_workers"
    if name in meta.tables:
        return meta.tables[name]
    ts = DateTime(timezone=True)
    return Table(
        name,
        meta,
        # Random per boot of a worker's main process (nodename and pid repeat across restarts).
        Column("instance_id", String(36), primary_key=True),
        Column("nodename", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", ts, nullable=False),
        Column("heartbeat_at", ts, nullable=False),
        # heartbeat_at + 2 intervals, by the worker's clock: after it, the instance is dead.
        Column("expires_at", ts, nullable=False),
        Column("interval_s", Float, nullable=False),
        # Set by a clean shutdown (``worker_shutdown``): the instance is gone, not dead.
        Column("stopped_at", ts),
    )
