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


def registered_task(app: Any, name: str) -> Any:
    """The task object if this process knows it, without finalizing the app as ``app.tasks``
    would (a task proxy used for apply_async has already registered itself in ``_tasks``)."""
    return app._tasks.get(name)


def task_serializer(app: Any, name: str, per_call: str | None = None) -> str:
    """The serializer the message is encoded with: the per-call one (``apply_async(serializer=
    ...)``, from :func:`sending_call`), else the task's own, else the app default."""
    task = registered_task(app, name)
    return str(per_call or getattr(task, "serializer", None) or _app_facts(app)[1])


_SENDER = "send_task_message"
_MAX_DEPTH = 8


def sending_call() -> tuple[Any, str | None]:
    """``(app, serializer)`` of the ``send_task_message`` call this publish signal comes from:
    the app that really publishes and the per-call serializer, if the caller gave one.

    ``before_task_publish`` carries neither (Celery hands the serializer to kombu only), yet
    Celery's current app is not always the publishing one (several apps in a process), and a
    row of ``apply_async(serializer="pickle")`` encoded with the task's serializer would be
    wrong or not encodable at all. So read both from Celery's sending frame, a few frames up
    (our hook, ``Signal.send``, the sender: its closure holds ``amqp``, whose ``app`` it is);
    fall back to the current app when the stack is not Celery's.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        code = frame.f_code
        if code.co_name == _SENDER and code.co_filename.endswith("amqp.py"):
            found = frame.f_locals
            app = getattr(found.get("amqp"), "app", None)
            serializer = found.get("serializer")
            return (
                app if app is not None else current_app._get_current_object(),
                serializer if isinstance(serializer, str) and serializer else None,
            )
        if frame.f_back is None:
            break
        frame = frame.f_back
    return current_app._get_current_object(), None


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
