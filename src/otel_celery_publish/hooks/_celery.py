"""Small, cached facts about the Celery app and its tasks that hooks need on every call."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, NamedTuple

from celery import current_app
from kombu.utils.url import url_to_parts

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


class AppFacts(NamedTuple):
    system: str  # the semconv messaging.system
    serializer: str  # the app's default task serializer
    name: str | None  # app.main
    broker: str | None  # the broker URL(s) without credentials
    server_address: str | None  # the (first) broker's host and port, for the span
    server_port: int | None


@functools.lru_cache(maxsize=16)
def app_facts(app: Any) -> AppFacts:
    """What a row and a span say about the publishing app, read once per app: ``app.conf``
    lookups go through a chain of mappings and would cost microseconds on every publish."""
    url = app.conf.broker_write_url  # what publishing connects to; it falls back to broker_url
    urls = [u for u in (url.split(";") if isinstance(url, str) else url or ()) if u]
    parts = [_parts(u) for u in urls]
    broker = ";".join(_without_credentials(u, p) for u, p in zip(urls, parts, strict=True))
    first = parts[0] if parts else None
    return AppFacts(
        system=messaging_system(urls[0] if urls else None),
        serializer=str(app.conf.task_serializer),
        name=str(app.main) if app.main else None,
        broker=broker[:255] or None,
        server_address=first.hostname if first is not None else None,
        server_port=first.port if first is not None else None,
    )


def _parts(url: str) -> Any:
    """kombu's reading of ``url``, or None when it may have read a secret as the address.

    An unquoted ``/``, ``?`` or ``#`` in a password ends the netloc early:
    ``amqp://guest:5672/s3@h//`` parses as host "guest", port 5672, path "s3@h//" (or fails
    when the port is not digits). So trust the parts only if the credentials' ``@`` is inside
    the netloc and the host is what follows the last ``@`` (a ``#`` in a broker URL is never a
    fragment Celery uses: it is taken for part of a secret).
    """
    try:
        parts = url_to_parts(url)
    except ValueError:  # e.g. a port that is not digits
        return None
    if "#" in url:
        return None
    if "@" in url:
        rest = url.split("://", 1)[-1]
        netloc = rest.split("/", 1)[0].split("?", 1)[0]
        after = url.rsplit("@", 1)[1].lower().removeprefix("[")
        if "@" not in netloc or not after.startswith((parts.hostname or "").lower()):
            return None
    return parts


def _without_credentials(url: str, parts: Any) -> str:
    """``scheme://host:port/vhost``: never the user or password (a URL we cannot parse is
    just its scheme)."""
    if parts is None:
        return url.split("://", 1)[0] + "://"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    vhost = f"/{parts.path}" if parts.path else ""  # kombu strips the path's leading slash
    return f"{parts.scheme}://{host}{port}{vhost}"


def app_system(app: Any) -> str:
    return app_facts(app).system


_BEAT_HEADER = "celery_beat_task"  # celery beat marks what it sends (Celery 5.5+)
_DJANGO_BEAT_HEADER = "periodic_task_name"  # django-celery-beat's entry name


def periodic_task(headers: Any) -> str | None:
    """The beat schedule entry that sends this publish, if beat does.

    django-celery-beat names it in a header. Celery's own beat only marks the message
    (``celery_beat_task``); the entry is a local of ``Scheduler.apply_async`` a few frames up
    (looked for only on marked messages: beat sends a few per minute).
    """
    named = headers.get(_DJANGO_BEAT_HEADER)
    if isinstance(named, str) and named:
        return named[:255]
    if not headers.get(_BEAT_HEADER):
        return None
    beat = sys.modules.get("celery.beat")
    scheduler = getattr(beat, "Scheduler", None)
    if scheduler is None:
        return None
    frame: Any = sys._getframe(1)
    for _ in range(_MAX_BEAT_DEPTH):
        if frame is None:
            break
        found = frame.f_locals
        if frame.f_code.co_name == "apply_async" and isinstance(found.get("self"), scheduler):
            name = getattr(found.get("entry"), "name", None)
            return str(name)[:255] if name else None
        frame = frame.f_back
    return None


def registered_task(app: Any, name: str) -> Any:
    """The task object if this process knows it, without finalizing the app as ``app.tasks``
    would (a task proxy used for apply_async has already registered itself in ``_tasks``)."""
    return app._tasks.get(name)


def task_serializer(app: Any, name: str, per_call: str | None = None) -> str:
    """The serializer the message is encoded with: the per-call one (``apply_async(serializer=
    ...)``, from :func:`sending_call`), else the task's own, else the app default."""
    task = registered_task(app, name)
    return str(per_call or getattr(task, "serializer", None) or app_facts(app).serializer)


_SENDER = "send_task_message"
_MAX_DEPTH = 8
_MAX_BEAT_DEPTH = 16


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


def workflow_attributes(task_id: Any, root_id: Any, group_id: Any) -> dict[str, str]:
    """Where a task sits in a workflow (chain, group, chord, nested publish), on the producer
    and the consumer span alike: its root task's id (also the semconv conversation id) unless
    it is its own root, and its group's id if it is a group or chord member."""
    attributes: dict[str, str] = {}
    if root_id and root_id != task_id:
        attributes["messaging.message.conversation_id"] = str(root_id)
        attributes["celery.task.root_id"] = str(root_id)
    if group_id:
        attributes["celery.task.group_id"] = str(group_id)
    return attributes
