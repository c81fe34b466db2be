"""What a publish captures: the audit row built from ``before_task_publish``'s arguments.

Pure functions only: no I/O, no clock, no globals, so they are tested without a broker.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict

from celery.utils.saferepr import saferepr
from kombu import serialization
from typing_extensions import NotRequired

from otel_celery_publish import headers as hdr
from otel_celery_publish.schema.table import RecordedLostReason

logger = logging.getLogger("otel_celery_publish")

REDACTED = "***"


# -- the row contracts: what the hooks hand to the sink ----------------------------------------
# Every write of a row is an upsert keyed by ``publish_id`` that sets only the columns it
# carries, so these commute: a worker's update may land before the publish row it updates.


class RowKey(TypedDict):
    """The columns every write carries: the key, and what a row must have to exist at all."""

    publish_id: str
    task_id: str
    task_name: str
    published_at: dt.datetime


class PublishRow(RowKey):
    """The whole row for one publish attempt, written before the message goes to the broker."""

    attempt: int
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    queue: str | None
    exchange: str
    routing_key: str | None
    priority: int | None
    eta: dt.datetime | None
    expires: dt.datetime | None
    payload: bytes | None
    content_type: str | None
    content_encoding: str | None
    payload_redacted: bool
    options: dict[str, Any]
    args_repr: str
    kwargs_repr: str
    publisher_host: str
    publisher_pid: int
    trace_id: str | None
    span_id: str | None
    error: str | None
    replay_of: str | None


class Sent(RowKey):
    """``after_task_publish``: the broker took the message."""

    sent_at: dt.datetime


class Received(RowKey):
    """``task_received``, in the worker's main process."""

    received_at: dt.datetime
    worker: str
    worker_instance: str | None
    acks_late: bool


class Started(RowKey):
    """``task_prerun``. A redelivered message reopens the attempt: what an earlier delivery
    recorded as its end is cleared (the ``finished`` columns set to None)."""

    started_at: dt.datetime
    worker: str
    worker_instance: str | None
    finished_at: NotRequired[None]
    outcome: NotRequired[None]
    runtime_s: NotRequired[None]
    exception_type: NotRequired[None]
    exception_message: NotRequired[None]
    lost_reason: NotRequired[None]


class Finished(RowKey):
    """The attempt's end: ``task_postrun`` in the child, or an outcome the main process decided
    (revoked, rejected, unknown task, pool child lost)."""

    finished_at: dt.datetime
    outcome: str
    runtime_s: float | None
    exception_type: str | None
    exception_message: str | None
    lost_reason: RecordedLostReason | None


#: A lifecycle update: a partial row the sink merges into the publish row.
Update = Sent | Received | Started | Finished
# Celery's own protocol-2 headers: everything else in the headers is the user's (or a tracer's).
CELERY_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
        "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
        "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", "headers",
    }
)  # fmt: skip
_MAX_DEPTH = 8


def is_sensitive(name: str, keys: frozenset[str]) -> bool:
    """True when any configured key occurs in ``name``, case-insensitively ("token" masks
    "card_token"): redacting a little too much beats leaking a secret under a longer name.
    A ``-`` counts as ``_``, so "api_key" masks the ``X-Api-Key`` header too."""
    return bool(keys) and _matcher(keys)(name.lower().replace("-", "_")) is not None


@functools.lru_cache(maxsize=16)
def _matcher(keys: frozenset[str]) -> Callable[[str], re.Match[str] | None]:
    """One regex search for all keys: faster than a loop of ``in`` on every name we check."""
    return re.compile("|".join(re.escape(key.replace("-", "_")) for key in sorted(keys))).search


def redact(value: Any, keys: frozenset[str], _depth: int = 0) -> tuple[Any, bool]:
    """Copy ``value`` with mapping entries whose key is sensitive (:func:`is_sensitive`) masked.

    Returns the copy and whether anything was masked. Containers are only copied when needed;
    a tuple (namedtuples included) comes back as a plain tuple. Containers nested deeper than we
    look are masked whole rather than passed through unread.
    """
    if not keys:
        return value, False
    if _depth > _MAX_DEPTH:
        return (REDACTED, True) if isinstance(value, (Mapping, list, tuple)) else (value, False)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        hit = False
        for k, v in value.items():
            if isinstance(k, str) and is_sensitive(k, keys):
                out[k], hit = REDACTED, True
            else:
                out[k], sub = redact(v, keys, _depth + 1)
                hit = hit or sub
        return (out, True) if hit else (value, False)
    if isinstance(value, (list, tuple)):
        items = [redact(v, keys, _depth + 1) for v in value]
        if not any(sub for _, sub in items):
            return value, False
        copied = [v for v, _ in items]
        return (tuple(copied) if isinstance(value, tuple) else copied), True
    return value, False


def redact_args(
    args: Sequence[Any], arg_names: Sequence[str], keys: frozenset[str]
) -> tuple[Sequence[Any], bool]:
    """Mask positional args whose parameter name is sensitive, then recurse into the rest."""
    out: list[Any] = []
    hit = False
    for i, arg in enumerate(args):
        if i < len(arg_names) and is_sensitive(arg_names[i], keys):
            out.append(REDACTED)
            hit = True
        else:
            value, sub = redact(arg, keys)
            out.append(value)
            hit = hit or sub
    return (tuple(out), True) if hit else (args, False)


def epoch_to_dt(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


def iso_to_dt(value: Any) -> dt.datetime | None:
    """Celery's ISO-8601 eta/expires header as an aware datetime (naive means UTC)."""
    if not value:
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def jsonable(value: Any) -> Any:
    """``value`` if it is plain JSON data, else its repr (options must always be storable)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return saferepr(value, 256)


def split_body(body: Any) -> tuple[Sequence[Any], Mapping[str, Any], Mapping[str, Any]]:
    """``(args, kwargs, embed)`` of a protocol-2 tuple body or a protocol-1 dict body."""
    if isinstance(body, (tuple, list)) and len(body) == 3:
        return body[0] or (), body[1] or {}, body[2] or {}
    if isinstance(body, Mapping):
        return body.get("args") or (), body.get("kwargs") or {}, {}
    return (), {}, {}


def encode_payload(
    body: Any, serializer: str, max_bytes: int
) -> tuple[bytes | None, str | None, str | None, str | None]:
    """Serialize the body as the message will be: ``(data, content_type, encoding, error)``."""
    try:
        content_type, encoding, data = serialization.dumps(  # type: ignore[no-untyped-call]
            body, serializer=serializer
        )
    except Exception as exc:
        # The publish itself will raise the same error to the host; the row keeps the reason.
        return None, None, None, f"payload not serializable with {serializer!r}: {exc!r}"
    raw = data.encode(encoding or "utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        return (
            None,
            content_type,
            encoding,
            (f"payload of {len(raw)} bytes exceeds max_payload_bytes={max_bytes}; reprs only"),
        )
    return raw, content_type, encoding, None


def custom_headers(
    headers: Mapping[str, Any], exclude: Iterable[str], keys: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], bool]:
    """The headers the user added (``apply_async(headers=...)``), for a faithful re-send, with
    sensitive names masked as :func:`redact` does (an ``Authorization`` header, a nested
    ``token``); and whether anything was masked."""
    skip = CELERY_HEADERS.union(exclude)
    found: dict[str, Any] = {}
    hit = False
    for name, raw in headers.items():
        if name in skip:
            continue
        value, masked = jsonable(raw), False
        if keys and isinstance(name, str) and is_sensitive(name, keys):
            value, masked = REDACTED, True
        elif isinstance(value, (dict, list)):  # jsonable's own types: no ABC checks per header
            value, masked = redact(value, keys, 1)
        found[name] = value
        hit = hit or masked
    return found, hit


def _repr(celerys: Any, redacted: bool, value: Any, maxsize: int) -> str:
    """Celery's own ``argsrepr``/``kwargsrepr`` header when nothing needed masking (it is the
    same saferepr, cut at ``argsrepr_maxsize``, or the caller's deliberate override), else ours
    of the masked value. Saves a second repr of the arguments on every publish."""
    if isinstance(celerys, str) and not redacted:
        return celerys
    # saferepr closes what it cut ("...]}"), a few characters past maxsize: bound it exactly.
    return hdr.as_text(saferepr(value, maxsize), maxsize)


def publish_row(
    *,
    publish_id: str,
    task_id: str,
    task_name: str,
    body: Any,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    exchange: Any,
    routing_key: str | None,
    published_at: float,
    serializer: str,
    arg_names: Sequence[str],
    redact_keys: frozenset[str],
    redact_payload: bool,
    repr_maxsize: int,
    max_payload_bytes: int,
    exclude_headers: Iterable[str],
    host: str,
    pid: int,
    trace_id: str | None,
    span_id: str | None,
    replay_of: str | None = None,
) -> dict[str, Any]:
    """The audit row for one publish attempt, as column -> value."""
    args, kwargs, embed = split_body(body)
    safe_args, args_hit = redact_args(args, arg_names, redact_keys)
    safe_kwargs, kwargs_hit = redact(kwargs, redact_keys)
    redacted = args_hit or kwargs_hit
    stored_body = body
    if redact_payload and redacted:
        stored_body = (
            {**body, "args": list(safe_args), "kwargs": safe_kwargs}
            if isinstance(body, Mapping)
            else (list(safe_args), safe_kwargs, embed)
        )
    payload, content_type, encoding, error = encode_payload(
        stored_body, serializer, max_payload_bytes
    )
    if error:
        logger.warning("otel-celery-publish: task %s[%s]: %s", task_name, headers.get("id"), error)
    timelimit = headers.get("timelimit") or (None, None)
    user_headers, headers_hit = custom_headers(headers, exclude_headers, redact_keys)
    options = {
        "serializer": serializer,
        "shadow": headers.get("shadow"),
        "time_limit": timelimit[0],
        "soft_time_limit": timelimit[1],
        "ignore_result": headers.get("ignore_result"),
        "group_index": headers.get("group_index"),
        "delivery_mode": properties.get("delivery_mode"),
        "headers": user_headers,
        # A masked header is stored (and would be re-sent by ``audit replay``) as "***".
        "headers_redacted": headers_hit or None,
    }
    return {
        "publish_id": publish_id,
        "task_id": task_id,
        "task_name": task_name,
        "published_at": epoch_to_dt(published_at),
        "attempt": headers.get("retries") or 0,
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "group_id": headers.get("group"),
        "queue": routing_key,
        "exchange": getattr(exchange, "name", exchange) or "",
        "routing_key": routing_key,
        "priority": properties.get("priority"),
        "eta": iso_to_dt(headers.get("eta")),
        "expires": iso_to_dt(headers.get("expires")),
        "payload": payload,
        "content_type": content_type,
        "content_encoding": encoding,
        "payload_redacted": bool(redact_payload and redacted),
        "options": {k: v for k, v in options.items() if v not in (None, {})},
        "args_repr": _repr(headers.get("argsrepr"), args_hit, safe_args, repr_maxsize),
        "kwargs_repr": _repr(headers.get("kwargsrepr"), kwargs_hit, safe_kwargs, repr_maxsize),
        "publisher_host": host,
        "publisher_pid": pid,
        "trace_id": trace_id,
        "span_id": span_id,
        "error": error,
        "replay_of": replay_of,
    }
