"""The audit table's operations: find lost tasks, replay them, report latency.

``celery -A proj audit <command>`` is a thin layer over these functions (docs/audit.md has the
command reference and the JSON shapes). Every function takes ``settings`` (default:
``Settings.from_env()``, i.e. ``OTEL_CELERY_PUBLISH_AUDIT_URL``, ``..._TABLE_NAME``...) and
raises :class:`AuditError` (one line, no driver noise) for an unreachable database
(:class:`DatabaseUnavailable`), a table that is not migrated (:class:`SchemaNotMigrated`) or an
unknown task id (:class:`UnknownTask`). Functions that take ``app`` need its task modules loaded
(the CLI does it, as a worker does; from your own code call ``app.loader.import_default_modules()``
first). Times are aware UTC datetimes::

    lost(*, settings, older_than=10m, since=1d, until, task (glob), queue, limit=100, now)
        -> list[LostTask]             stuck attempts, each with a ``reason``
    check_results(app, tasks) -> list[LostTask]
                                      drop those the result backend saw finish
    replay(app, task_ids, *, publish_ids, policy=Policy(...), dry_run, rate, settings)
        -> ReplayReport               re-publish through the app, on the record (through
                                      the process's instrumentation, else one set up for
                                      the sends and undone after)
    plan_replay(app, task_ids, *, publish_ids, policy, settings, now) -> list[Planned]
    send_replay(app, planned, *, settings, rate, on_done) -> ReplayReport
                                      the two steps of replay(), to confirm in between
    stats(*, settings, since=1h, until, task, queue, slowest=10, now) -> Stats
                                      latency percentiles computed in the database
    show(task_id, *, settings) -> TaskHistory
                                      every attempt and replay of one task; each
                                      ``Attempt.waits`` has its edges and waits
    workflow(id, *, settings) -> Workflow
                                      every task of a group, a chord (header and
                                      callback) or a root id's tree, by publish time
    prune(*, older_than, settings, batch_size=5000, now) -> PruneResult
                                      retention, in short batches
    migrate_schema(*, settings) -> Migration
                                      create/adopt/upgrade the table (Alembic)
    drain(*, settings) -> int         ship the local spool now
    ship(*, settings, follow, interval=0.5, stop) -> int
                                      the sidecar shipper: every segment, live ones too
    quarantined(*, settings) -> list[QuarantinedRecord]
                                      records the database refused, kept on disk
    Watchdog(app, *, settings, meter_provider, check_results, since=1d, limit=100)
        .run_once(*, dry_run, now) -> WatchReport
        .run_forever(interval, *, dry_run, stop)
                                      ``audit watch``: replay lost tasks by policy
                                      (AUTOREPLAY, task option audit_autoreplay)
    register_watch_task(app, name=WATCH_TASK, **options) -> Task
    watch_once(app, *, dry_run) -> WatchReport
                                      the same as a periodic task for a beat schedule

Schema upgrades for code that already holds an engine (the writer):
:func:`otel_celery_publish.schema.migrate.upgrade`.

Where it lives: ``_db`` (the errors, the clock, the table access every operation opens),
``_lost``, ``_show``, ``_stats``, ``_replay`` (with ``_claims``, its bookkeeping in the table,
and ``_publishing``, the one place the read side loads the instrumentation: only while a replay
sends), ``_watch`` (the watchdog: ``_lost`` then ``_replay``, by policy) and ``_maintenance``
(prune, migrate, drain, ship, quarantine). The waits' edges are defined once, in
:mod:`otel_celery_publish.timing`; this package imports ``schema`` and the sink's database,
spool and quarantine modules, never the hooks or the writer's thread.
"""

from otel_celery_publish.audit._db import (
    AuditError,
    DatabaseUnavailable,
    SchemaNotMigrated,
    UnknownTask,
)
from otel_celery_publish.audit._lost import LostTask, check_results, lost
from otel_celery_publish.audit._maintenance import (
    Migration,
    PruneResult,
    drain,
    migrate_schema,
    prune,
    quarantined,
    ship,
)
from otel_celery_publish.audit._replay import (
    Planned,
    Policy,
    ReplayReport,
    ReplayResult,
    plan_replay,
    replay,
    send_replay,
)
from otel_celery_publish.audit._show import (
    Attempt,
    TaskHistory,
    Workflow,
    WorkflowTask,
    WorkflowTotals,
    show,
    workflow,
)
from otel_celery_publish.audit._stats import (
    Distribution,
    GroupStats,
    Minute,
    QueueStats,
    SlowTask,
    Stats,
    stats,
)
from otel_celery_publish.audit._watch import (
    WATCH_TASK,
    WatchAction,
    Watchdog,
    WatchReport,
    register_watch_task,
    watch_once,
)
from otel_celery_publish.sink.quarantine import QuarantinedRecord

__all__ = [
    "WATCH_TASK",
    "Attempt",
    "AuditError",
    "DatabaseUnavailable",
    "Distribution",
    "GroupStats",
    "LostTask",
    "Migration",
    "Minute",
    "Planned",
    "Policy",
    "PruneResult",
    "QuarantinedRecord",
    "QueueStats",
    "ReplayReport",
    "ReplayResult",
    "SchemaNotMigrated",
    "SlowTask",
    "Stats",
    "TaskHistory",
    "UnknownTask",
    "WatchAction",
    "WatchReport",
    "Watchdog",
    "Workflow",
    "WorkflowTask",
    "WorkflowTotals",
    "check_results",
    "drain",
    "lost",
    "migrate_schema",
    "plan_replay",
    "prune",
    "quarantined",
    "register_watch_task",
    "replay",
    "send_replay",
    "ship",
    "show",
    "stats",
    "watch_once",
    "workflow",
]
