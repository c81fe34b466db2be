"""Publishing on the record from the read side: the one place it reaches the publish side.

A replay is an ordinary publish that must get a producer span and an audit row in the same
table as its original. The read side imports neither the hooks nor the sink's writer thread, so
that ``audit.lost`` in a web process loads neither; :func:`publishing` is the deliberate
exception: it imports the instrumentor inside its body, only when a replay actually sends.

A replay's row must hold a trace id and its span the link to the original, also from a plain
``celery -A proj audit replay`` (no ``opentelemetry-instrument``, no SDK set up in code). When
the process has no SDK tracer provider (the API's proxy or no-op one), the sends get one of
their own, built from the standard environment (:func:`_replay_tracer_provider`), and it is
flushed and shut down when they are done. The global provider is never set: in a process that
chose no tracing (a web process calling :func:`~otel_celery_publish.audit.replay`), nothing
else starts recording.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from otel_celery_publish.audit._db import AuditError, first_line, safe_url
from otel_celery_publish.config import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

FLUSH_TIMEOUT_S = 10.0
# opentelemetry-instrumentation-celery, which our instrumentor switches off while it is on.
OFFICIAL = "opentelemetry.instrumentation.celery"
#: ``service.name`` of the replays' spans when neither ``OTEL_SERVICE_NAME`` nor
#: ``OTEL_RESOURCE_ATTRIBUTES`` names one (the SDK would say ``unknown_service``).
REPLAY_SERVICE = "celery-audit-replay"
# The SDK's extension point for span exporters (what OTEL_TRACES_EXPORTER names), and the
# entry point each OTLP protocol selects for the name "otlp": as opentelemetry-instrument
# picks them, gRPC when no protocol is set.
EXPORTERS = "opentelemetry_traces_exporter"
OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


@contextlib.contextmanager
def publishing(settings: Settings) -> Iterator[None]:
    """Sends in the block get a producer span and a durable audit row in ``settings``' table.

    When the process is instrumented already (``opentelemetry-instrument celery ...``, or the app
    instruments itself), the block uses that, as it is, after checking that it records into
    the same table; its writer is flushed afterwards. Otherwise the process is instrumented for
    the block only (``durability="sync"``; spans through the global tracer provider, or, when
    that is not an SDK one, through :func:`_replay_tracer_provider`'s) and restored afterwards:
    our signal receivers disconnected, the writer flushed and closed, our own tracer provider
    flushed and shut down, and opentelemetry-instrumentation-celery, which we switch off while
    we are on, instrumented again if it was (with its defaults: the keyword arguments it was
    first instrumented with are its own).
    """
    # Imported here, not at the top: see the module docstring.
    from otel_celery_publish.instrumentor import CeleryPublishInstrumentor  # noqa: PLC0415

    ours = CeleryPublishInstrumentor()
    if ours.is_instrumented_by_opentelemetry:
        _same_table(ours.writer.settings, settings)
        try:
            yield
        finally:
            ours.writer.flush(FLUSH_TIMEOUT_S)
        return
    provider = _replay_tracer_provider()
    official = _official()
    official_was_on = official is not None and official.is_instrumented_by_opentelemetry
    try:
        ours.instrument(settings=settings, durability="sync", tracer_provider=provider)
        try:
            yield
        finally:
            ours.uninstrument()
            if official_was_on and not official.is_instrumented_by_opentelemetry:
                official.instrument()
    finally:
        if provider is not None:
            # Bounded by the exporters' own timeouts (OTEL_EXPORTER_OTLP_TIMEOUT) when the
            # collector does not answer; the spans are best effort, the rows are not.
            provider.force_flush(int(FLUSH_TIMEOUT_S * 1000))
            provider.shutdown()


def _replay_tracer_provider() -> TracerProvider | None:
    """A tracer provider for the replay's sends, or None when the process has an SDK one.

    Built from the standard environment as ``opentelemetry-instrument`` would build it, but
    for these sends only (the SDK's own configurator sets the global providers, for metrics
    and logs too): the resource from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, the
    sampler from ``OTEL_TRACES_SAMPLER``, a BatchSpanProcessor per exporter of
    :func:`_span_exporters`. With no exporter configured it still records, so the new row gets
    its trace id and span id and the span its link, exported nowhere.
    """
    if not isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    ):
        return None
    # Imported here: the read side loads the SDK only when a replay sends without one.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: REPLAY_SERVICE}))
    exporters = _span_exporters()
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _span_exporters() -> list[SpanExporter]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (comma-separated entry point names
    of the SDK's ``opentelemetry_traces_exporter`` group; ``otlp`` is OTLP over
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``).

    Unset, it is ``otlp`` when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), else none: a plain CLI run on a machine with no
    collector must not wait for one on localhost. Each exporter reads its own variables
    (endpoint, headers, timeout, compression) as the SDK documents them.
    """
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names and any(
        os.environ.get(f"OTEL_EXPORTER_OTLP{part}ENDPOINT", "").strip()
        for part in ("_", "_TRACES_")
    ):
        names = "otlp"
    if not names or names.lower() == "none":
        return []
    exporters: list[SpanExporter] = []
    try:
        for name in (n.strip() for n in names.split(",")):
            exporters.append(_span_exporter(name))
    except AuditError:
        for built in exporters:  # their sessions and threads: the admin's process lives on
            built.shutdown()
        raise
    return exporters


def _span_exporter(name: str) -> SpanExporter:
    entry = OTLP_BY_PROTOCOL.get(_otlp_protocol()) if name == "otlp" else name
    found = list(entry_points(group=EXPORTERS, name=entry or ""))
    if not found:
        raise AuditError(
            f"OTEL_TRACES_EXPORTER names {name!r}"
            + (f" over protocol {_otlp_protocol()!r}" if name == "otlp" else "")
            + ": no such span exporter is installed"
        )
    try:
        exporter: SpanExporter = found[0].load()()
    except Exception as exc:  # the exporter's own import or its reading of its variables
        raise AuditError(
            f"OTEL_TRACES_EXPORTER {name!r}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return exporter


def _otlp_protocol() -> str:
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if value := os.environ.get(variable, "").strip():
            return value
    return "grpc"


def _same_table(active: Settings, wanted: Settings) -> None:
    if (active.audit_url, active.table_name) != (wanted.audit_url, wanted.table_name):
        raise AuditError(
            "this process is already instrumented with another audit table "
            f"({active.table_name!r} at {safe_url(active.audit_url)}): replays would be "
            "recorded there, not next to their originals"
        )


def _official() -> Any:
    """The official Celery instrumentor, if its module is loaded (if not, nobody turned it on)."""
    module = sys.modules.get(OFFICIAL)
    return None if module is None else module.CeleryInstrumentor()
