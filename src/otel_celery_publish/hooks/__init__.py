"""The hot path: Celery signal receivers that open spans and hand rows to the sink.

``publish`` (producer side), ``worker`` (consumer side), ``pending`` (the bounded maps that carry
state from one signal to the next) and ``_celery`` (what we read from Celery's internals). Hooks
are thin: guard, gather, hand off; they never import the read side, click or Alembic.
"""
