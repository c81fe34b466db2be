"""Small, cached facts about the Celery app and its tasks that hooks need on every call."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

from celery import current_app

# messaging.system values from the semantic conventions, by kombu transport scheme.
_SYSTEMS = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
    "librabbitmq": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "sentinel": "redis",
    "sqs": "aws_sqs",
    "kafka": "kafka",
    "gcpubsub": "gcp_pubsub",
    "azureservicebus": "servicebus",
}


@functools.lru_cache(maxsize=32)
def messaging_system(broker_url: str | None) -> str:
    """The semconv ``messaging.system`` for a broker URL (the broker, never ``celery``)."""
    scheme = (broker_url or "amqp").split("://", 1)[0].split("+", 1)[0].lower()
    return _SYSTEMS.get(scheme, scheme)


@functools.lru_cache(maxsize=16)
def _app_facts(app: Any) -> tuple[str, str]:
    """``(messaging.system, default serializer)`` of an app, read once: ``app.conf`` lookups
    go through a chain of mappings and would cost microseconds on every publish."""
    url = app.conf.broker_url
    return messaging_system(url if isinstance(url, str) else None), str(app.conf.task_serializer)


def app_system(app: Any) -> str:
    return _app_facts(app)[0]


def publishing_app() -> Any:
    """The app doing the publish. Publish signals do not carry it; Celery's current app does."""
    return current_app._get_current_object()


def registered_task(app: Any, name: str) -> Any:
    """The task object if this process knows it, without finalizing the app as ``app.tasks``
    would (a task proxy used for apply_async has already registered itself in ``_tasks``)."""
    return app._tasks.get(name)


def task_serializer(app: Any, name: str) -> str:
    """The serializer the message is encoded with: the per-call one (``apply_async(serializer=
    ...)``, :func:`call_serializer`), else the task's own, else the app default."""
    task = registered_task(app, name)
    return str(call_serializer() or getattr(task, "serializer", None) or _app_facts(app)[1])


_SENDER = "send_task_message"
_MAX_DEPTH = 8


def call_serializer() -> str | None:
    """The ``serializer`` argument of the ``send_task_message`` call this publish signal comes
    from, if the caller gave one.

    ``before_task_publish`` does not carry it (Celery passes it to kombu only), yet without it a
    row of ``apply_async(serializer="pickle")`` would be encoded with the task's serializer:
    wrong, or not encodable at all. So read it from the sending frame, a few frames up (our
    hook, ``Signal.send``, Celery's sender); None if the stack is not Celery's.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame.f_code.co_name == _SENDER and frame.f_code.co_filename.endswith("amqp.py"):
            value = frame.f_locals.get("serializer")
            return value if isinstance(value, str) and value else None
        if frame.f_back is None:
            return None
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=1024)
def _arg_names(run: Any) -> tuple[str, ...]:
    try:
        params = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return ()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in positional)


def arg_names(app: Any, name: str) -> tuple[str, ...]:
    """Positional parameter names of a registered task (to redact sensitive positional args)."""
    run = getattr(registered_task(app, name), "run", None)
    return _arg_names(run) if run is not None else ()
