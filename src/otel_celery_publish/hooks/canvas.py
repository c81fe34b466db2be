"""Canvas: a group or chord published in one call reads as one trace.

Each publish's PRODUCER span is a child of the span current when it is sent. Chains, ``link``
and ``link_error`` callbacks, retries and chord callbacks are sent by the worker from inside the
previous task's process span (our worker hooks keep it current from prerun to postrun), so they
join its trace by themselves. A **group** is different: ``group.apply_async`` sends its members
in a loop (``group._apply_tasks``), and so does a **chord** for its header (``_chord.run``,
which also sends ``celery.chord_unlock`` first on backends without native chords); ``chunks``
is a group of ``celery.starmap`` tasks. Called where no span is current (a script, a cron job,
a shell), every member would be the root of a trace of its own, and the chord callback would
join whichever header task finished last.

So while we are instrumented, ``group.apply_async`` and ``_chord.run`` are wrapped (``wrapt``, as
the OpenTelemetry contrib instrumentations do): when no span is current and the call will
publish (not eager), the call runs inside one INTERNAL span, ``apply group <first task>`` or
``apply chord <callback>``, and every member's producer span is its child. Its attributes:
``celery.canvas.primitive`` (``group``/``chord``), ``celery.task.group_id``,
``celery.group.size`` (the members sent), and for a chord ``celery.chord.callback.id`` /
``celery.chord.callback.name``. A workflow is then sampled as one trace, kept or dropped whole.
Where a span is current (a web request, a task on a worker) the members are its children
already: nothing is added. The chord callback stays where Celery sends it from: a child of the
process span of the header task that finished last (or of ``celery.chord_unlock``'s), now in
the chord's one trace; it carries the chord's group id (``celery.task.group_id``: Celery sends
the body with its header's group id and no ``group_index``).

The wrapper never changes what the canvas call receives or returns and never catches its
exceptions (an error leaves the span with the exception's type, then propagates unchanged); if
our own code fails, the call runs as without us (the guard reports it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import wrapt
from celery import canvas
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_celery_publish import headers as hdr
from otel_celery_publish._guard import guard

# (owner, method): what Celery calls to send a group's members and a chord's header.
WRAPPED = ((canvas.group, "apply_async"), (canvas._chord, "run"))
# How deep into nested chains/groups we look for the first task's name (never a generator).
_MAX_NAME_DEPTH = 8


def _task_name(sig: Any) -> str | None:
    """The name of the first real task of ``sig`` (a signature or its dict), looking into
    chains, groups and chords written as lists; None where only a generator would tell."""
    for _ in range(_MAX_NAME_DEPTH):
        if not isinstance(sig, Mapping):
            return None
        name = sig.get("task")
        kwargs = sig.get("kwargs") or {}
        if name == "celery.chord":
            sig = kwargs.get("body")
        elif name in ("celery.chain", "celery.group"):
            tasks = kwargs.get("tasks")
            if not isinstance(tasks, (list, tuple)) or not tasks:
                return None
            sig = tasks[0]
        else:
            return hdr.as_text(name) if name else None
    return None


def _members(tasks: Any) -> Any:
    return tasks.tasks if isinstance(tasks, canvas.group) else tasks


def _first_name(tasks: Any) -> str | None:
    members = _members(tasks)
    if isinstance(members, (list, tuple)) and members:
        return _task_name(members[0])
    return None


class CanvasHooks:
    """Wraps the canvas calls that send many tasks at once; :meth:`install` / :meth:`uninstall`
    follow the instrumentor."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def install(self) -> None:
        wrapt.wrap_function_wrapper(canvas.group, "apply_async", self._group)
        wrapt.wrap_function_wrapper(canvas._chord, "run", self._chord)

    @staticmethod
    def uninstall() -> None:
        for owner, method in WRAPPED:
            unwrap(owner, method)

    def _group(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        span = None
        with guard("canvas group"):
            if _wanted(instance):
                name = _first_name(instance)
                span = self._tracer.start_span(
                    f"apply group {name}" if name else "apply group",
                    kind=SpanKind.INTERNAL,
                    attributes={"celery.canvas.primitive": "group"},
                )
        return _call_in(span, _group_facts, wrapped, args, kwargs)

    def _chord(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        span = None
        with guard("canvas chord"):
            if _wanted(instance):
                # _chord.run(header, body, partial_args, ...): apply_async passes them by position.
                name = _task_name(args[1] if len(args) > 1 else kwargs.get("body"))
                attributes = {"celery.canvas.primitive": "chord"}
                if name:
                    attributes["celery.chord.callback.name"] = name
                span = self._tracer.start_span(
                    f"apply chord {name}" if name else "apply chord",
                    kind=SpanKind.INTERNAL,
                    attributes=attributes,
                )
        return _call_in(span, _chord_facts, wrapped, args, kwargs)


def _wanted(instance: Any) -> bool:
    """A span only where nothing is current (else the members are its children already), only
    when the call will publish (an eager canvas sends nothing), never while suppressed."""
    if trace.get_current_span().get_span_context().is_valid:
        return False
    if not is_instrumentation_enabled():
        return False
    return not instance.app.conf.task_always_eager


def _call_in(
    span: trace.Span | None,
    facts: Callable[[Any], dict[str, Any]],
    wrapped: Callable[..., Any],
    args: Any,
    kwargs: Any,
) -> Any:
    """``wrapped(*args, **kwargs)`` with ``span`` current; its result and its exceptions are
    the caller's, untouched. Without a span (not wanted, or our code failed): a plain call."""
    token = None
    if span is not None:
        with guard("canvas span start"):
            token = otel_context.attach(trace.set_span_in_context(span))
        if token is None:  # attach failed: the call must not run inside a span nobody ends
            with guard("canvas span end"):
                span.end()
            span = None
    if span is None:
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        with guard("canvas span end"):
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            span.set_attribute("error.type", type(exc).__qualname__)
        raise
    else:
        with guard("canvas span end"):
            span.set_attributes(facts(result))
        return result
    finally:
        with guard("canvas span end"):
            try:
                otel_context.detach(token)  # type: ignore[arg-type]
            finally:
                span.end()


def _group_facts(result: Any) -> dict[str, Any]:
    """From the GroupResult ``group.apply_async`` returns: its id and the members sent."""
    return _result_facts(result)


def _chord_facts(result: Any) -> dict[str, Any]:
    """From the callback's AsyncResult ``_chord.run`` returns; its parent is the header's."""
    facts = _result_facts(getattr(result, "parent", None))
    callback_id = getattr(result, "id", None)
    if callback_id:
        facts["celery.chord.callback.id"] = hdr.as_text(callback_id)
    return facts


def _result_facts(group_result: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    group_id = getattr(group_result, "id", None)
    if group_id:
        facts["celery.task.group_id"] = hdr.as_text(group_id)
    results = getattr(group_result, "results", None)
    if isinstance(results, list):
        facts["celery.group.size"] = len(results)
    return facts
