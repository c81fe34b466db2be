"""The row contracts the hooks hand to the sink, and how a publish becomes its audit row.

* The contracts: :class:`PublishRow` (the whole row of one publish attempt) and the lifecycle
  updates :class:`Sent`, :class:`Received`, :class:`Started`, :class:`Finished` (partial rows
  keyed by :class:`RowKey`), each built by its function here (:func:`sent`, :func:`received`,
  :func:`started`, :func:`finished`) so no hook spells a column name.
* The publish row: :func:`publish_row` from the facts of one publish (:class:`PublishFacts`) under
  the settings that shape every row (:class:`RowPolicy`): payload encoding, redaction of
  sensitive names (:mod:`.redaction`, :func:`custom_headers`), storable options (:func:`storable`).

Pure functions only: no I/O, no clock, no globals, so they are tested without a broker.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from celery.utils.saferepr import saferepr
from kombu import serialization
from kombu.utils import json as kombu_json
from typing_extensions import NotRequired

from otel_celery_publish import headers as hdr
from otel_celery_publish.redaction import REDACTED, is_sensitive, redact, redact_args
from otel_celery_publish.schema.table import RecordedLostReason

if TYPE_CHECKING:
    from otel_celery_publish.config import Settings

logger = logging.getLogger("otel_celery_publish")


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
    """The whole row for one publish attempt, written (sent, or spooled) before the message goes
    to the broker."""

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
    app: str | None
    broker: str | None
    periodic_task: str | None


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


# -- building the lifecycle updates (times are epoch seconds, from the process that saw them) --


def sent(key: RowKey, at: float) -> Sent:
    return {**key, "sent_at": epoch_to_dt(at)}


def received(
    key: RowKey, at: float, worker: str, worker_instance: str | None, *, acks_late: bool
) -> Received:
    return {
        **key,
        "received_at": epoch_to_dt(at),
        "worker": worker,
        "worker_instance": worker_instance,
        "acks_late": acks_late,
    }


def started(
    key: RowKey, at: float, worker: str, worker_instance: str | None, *, redelivered: bool
) -> Started:
    """The start of a run. A ``redelivered`` one reopens the attempt: the end an earlier
    delivery recorded no longer holds (acks_on_timeout=False, Reject(requeue=True), a visibility
    timeout). The clearing goes with the start, from the process that records the end, so the
    two arrive in order."""
    # The key by name, not ``**key``: mypy cannot tell that a ** item lacks the optional keys.
    update: Started = {
        "publish_id": key["publish_id"],
        "task_id": key["task_id"],
        "task_name": key["task_name"],
        "published_at": key["published_at"],
        "started_at": epoch_to_dt(at),
        "worker": worker,
        "worker_instance": worker_instance,
    }
    if redelivered:
        update |= {
            "finished_at": None,
            "outcome": None,
            "runtime_s": None,
            "exception_type": None,
            "exception_message": None,
            "lost_reason": None,
        }
    return update


def finished(
    key: RowKey, at: float, outcome: str, *, runtime_s: float | None = None,
    exception_type: str | None = None, exception_message: str | None = None,
    lost_reason: RecordedLostReason | None = None,
) -> Finished:  # fmt: skip
    return {
        **key,
        "finished_at": epoch_to_dt(at),
        "outcome": outcome,
        "runtime_s": runtime_s,
        "exception_type": exception_type,
        "exception_message": exception_message,
        "lost_reason": lost_reason,
    }


# Celery's own protocol-2 headers: everything else in the headers is the user's (or a tracer's).
CELERY_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
        "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
        "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", "headers",
    }
)  # fmt: skip


def epoch_to_dt(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


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


def storable(value: Any) -> Any:
    """``value`` if it is plain JSON data, else its repr (options must always be storable)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
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
        content_type, encoding, data = _dumps(body, serializer)
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


_JSON = kombu_json.JSONEncoder()


def _dumps(body: Any, serializer: str) -> tuple[str, str, str | bytes]:
    """``kombu.serialization.dumps``, with kombu's own ``json`` (unless replaced) through one
    encoder object: the same text, in half the time (kombu builds an encoder per call)."""
    codec = serialization.registry._encoders.get(serializer) if serializer == "json" else None
    if codec is not None and codec.encoder is kombu_json.dumps:
        return codec.content_type, codec.content_encoding, _JSON.encode(body)
    return serialization.dumps(body, serializer=serializer)  # type: ignore[no-untyped-call,no-any-return]


def custom_headers(
    headers: Mapping[str, Any], exclude: Iterable[str], keys: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], bool]:
    """The headers the user added (``apply_async(headers=...)``), for a faithful re-send, with
    sensitive names masked as :func:`redact` does (an ``Authorization`` header, a nested
    ``token``); and whether anything was masked."""
    names = headers.keys() - CELERY_HEADERS  # in C: most publishes have none of the user's
    names.difference_update(exclude)
    found: dict[str, Any] = {}
    hit = False
    for name, raw in headers.items() if names else ():
        if name not in names:
            continue
        value, masked = storable(raw), False
        if keys and isinstance(name, str) and is_sensitive(name, keys):
            value, masked = REDACTED, True
        elif isinstance(value, (dict, list)):  # storable's own types: no ABC checks per header
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


# -- building the publish row ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RowPolicy:
    """The settings that shape every publish row, read once when instrumenting."""

    redact_keys: frozenset[str]
    redact_payload: bool
    repr_maxsize: int
    max_payload_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RowPolicy:
        return cls(
            redact_keys=settings.redact_keys,
            redact_payload=settings.redact_payload,
            repr_maxsize=settings.repr_maxsize,
            max_payload_bytes=settings.max_payload_bytes,
        )


@dataclasses.dataclass(slots=True, kw_only=True)
class PublishFacts:
    """What one publish is: ``before_task_publish``'s arguments and what the hook added.

    Built on every publish, so the cheapest typed record: with slots and not frozen (a frozen
    dataclass's ``__init__`` costs ~3 µs more per publish, a NamedTuple's fields are slower to
    read). Treat it as read-only.
    """

    publish_id: str
    task_id: str
    task_name: str
    body: Any
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    exchange: Any  # a kombu Exchange or its name
    routing_key: str | None
    published_at: float  # epoch seconds
    serializer: str
    # Positional parameter names of the task, to mask sensitive positional args.
    arg_names: Sequence[str]
    # Header names that are not the user's (ours, the propagator's): kept out of the options.
    exclude_headers: Iterable[str]
    host: str
    pid: int
    trace_id: str | None
    span_id: str | None
    replay_of: str | None = None
    # The publishing app's ``main`` and broker URL without credentials (:mod:`.hooks._celery`).
    app: str | None = None
    broker: str | None = None
    # The celery beat schedule entry that published it.
    periodic_task: str | None = None


def publish_row(facts: PublishFacts, policy: RowPolicy) -> PublishRow:
    """The audit row of one publish attempt."""
    body, headers, keys = facts.body, facts.headers, policy.redact_keys
    args, kwargs, embed = split_body(body)
    safe_args, args_hit = redact_args(args, facts.arg_names, keys)
    safe_kwargs, kwargs_hit = redact(kwargs, keys)
    redacted = args_hit or kwargs_hit
    stored_body = body
    if policy.redact_payload and redacted:
        stored_body = (
            {**body, "args": list(safe_args), "kwargs": safe_kwargs}
            if isinstance(body, Mapping)
            else (list(safe_args), safe_kwargs, embed)
        )
    payload, content_type, encoding, error = encode_payload(
        stored_body, facts.serializer, policy.max_payload_bytes
    )
    if error:
        logger.warning(
            "otel-celery-publish: task %s[%s]: %s", facts.task_name, headers.get("id"), error
        )
    maxsize = policy.repr_maxsize
    return {
        "publish_id": facts.publish_id,
        "task_id": facts.task_id,
        "task_name": facts.task_name,
        "published_at": epoch_to_dt(facts.published_at),
        "attempt": headers.get("retries") or 0,
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "group_id": headers.get("group"),
        "queue": facts.routing_key,
        "exchange": getattr(facts.exchange, "name", facts.exchange) or "",
        "routing_key": facts.routing_key,
        "priority": facts.properties.get("priority"),
        "eta": iso_to_dt(headers.get("eta")),
        "expires": iso_to_dt(headers.get("expires")),
        "payload": payload,
        "content_type": content_type,
        "content_encoding": encoding,
        "payload_redacted": bool(policy.redact_payload and redacted),
        "options": _options(facts, keys),
        "args_repr": _repr(headers.get("argsrepr"), args_hit, safe_args, maxsize),
        "kwargs_repr": _repr(headers.get("kwargsrepr"), kwargs_hit, safe_kwargs, maxsize),
        "publisher_host": facts.host,
        "publisher_pid": facts.pid,
        "trace_id": facts.trace_id,
        "span_id": facts.span_id,
        "error": error,
        "replay_of": facts.replay_of,
        "app": facts.app,
        "broker": facts.broker,
        "periodic_task": facts.periodic_task,
    }


def _options(facts: PublishFacts, keys: frozenset[str]) -> dict[str, Any]:
    """The publish options ``audit replay`` needs to re-send the message as it was sent."""
    headers = facts.headers
    timelimit = headers.get("timelimit") or (None, None)
    user_headers, headers_hit = custom_headers(headers, facts.exclude_headers, keys)
    options = {
        "serializer": facts.serializer,
        "shadow": headers.get("shadow"),
        "time_limit": timelimit[0],
        "soft_time_limit": timelimit[1],
        "ignore_result": headers.get("ignore_result"),
        "group_index": headers.get("group_index"),
        "delivery_mode": facts.properties.get("delivery_mode"),
        "headers": user_headers,
        # A masked header is stored (and would be re-sent by ``audit replay``) as "***".
        "headers_redacted": headers_hit or None,
    }
    return {k: v for k, v in options.items() if v not in (None, {})}
