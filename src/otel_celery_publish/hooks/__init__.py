"""The hot path: Celery signal receivers that open spans and hand rows to the sink.

``publish`` (producer side), ``worker`` (consumer side), ``_outcomes`` (how a task's run ended:
pure functions over the worker signals' arguments), ``pending`` (the bounded maps that carry
state from one signal to the next) and ``_celery`` (what we read from Celery's internals). Hooks
are thin: guard, gather, hand off to :mod:`otel_celery_publish.rows` (which builds what the sink
writes); they never import the read side, click or Alembic.
"""
