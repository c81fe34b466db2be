"""CeleryPublishInstrumentor: wires the pieces and connects/disconnects signals, nothing else."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Collection
from typing import Any

from celery import signals
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from sqlalchemy.engine import make_url

from otel_celery_publish import _guard
from otel_celery_publish._guard import guard
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks.canvas import CanvasHooks
from otel_celery_publish.hooks.publish import PublishHooks
from otel_celery_publish.hooks.worker import WorkerHooks
from otel_celery_publish.package import _instruments
from otel_celery_publish.sink.heartbeat import Heartbeat
from otel_celery_publish.sink.writer import AuditWriter
from otel_celery_publish.version import __version__

logger = logging.getLogger("otel_celery_publish")
SCHEMA_URL = "https://opentelemetry.io/schemas/1.30.0"
FLUSH_TIMEOUT_S = 5.0
_said_official = False
_process_hooks_registered = False


def _register_process_hooks() -> None:
    """Once per process, however often we are instrumented and uninstrumented."""
    global _process_hooks_registered  # noqa: PLW0603 - one registration per process
    if not _process_hooks_registered:
        _process_hooks_registered = True
        os.register_at_fork(after_in_child=_reinit_metric_export_locks)
        _preload_lazy_imports()


# Imported lazily by the OTLP/HTTP exporters' threads: ``requests`` imports ``netrc`` on its
# first request (requests.utils.get_netrc_auth).
LAZY_EXPORTER_IMPORTS = ("netrc",)


def _preload_lazy_imports() -> None:
    """Import now, on the instrumenting thread, what exporter threads import on first use.

    A fork while another thread is inside an import hands the child that module's import lock,
    held by a thread the child does not have: the child's first import of it blocks forever. A
    prefork worker's main process exports its first metrics while its pool forks; a child that
    inherited the lock mid-``import netrc`` never exports a span (seen in 3 runs of 6 of the
    prefork RabbitMQ trace test). Instrumenting happens before any fork, so the import is done
    by then; our own threads follow the same rule (:func:`.sink.database.preload_driver`).
    """
    for name in LAZY_EXPORTER_IMPORTS:
        importlib.import_module(name)


def _reinit_metric_export_locks() -> None:
    """After fork: give the SDK's periodic metric readers a fresh export lock.

    A reader forked while its thread was exporting hands the child a lock that nobody will ever
    release: the child's metrics never export and its shutdown flush hangs
    (opentelemetry-python#3307, open). Prefork pool children hit it in a few percent of forks.
    The SDK's own at-fork handling restarts the reader's thread and renews the provider's locks,
    not the reader's ``_export_lock`` (checked in 1.45.2 and on its main branch, August 2026).
    Both are private (the provider class's registry of readers, each reader's lock), so this is
    the one place that touches them; it goes when the SDK renews the lock itself. Nothing is
    imported here (an import in a fork child can hang on a lock the parent held): without the
    SDK's metrics loaded there are no readers.
    """
    sdk_metrics = sys.modules.get("opentelemetry.sdk.metrics")
    provider_class = getattr(sdk_metrics, "MeterProvider", None)
    for reader in list(getattr(provider_class, "_all_metric_readers", ())):
        if hasattr(reader, "_export_lock"):
            reader._export_lock = threading.Lock()


def _set_official_instrumented(official: Any, on: bool) -> None:
    """Set opentelemetry-instrumentation-celery's instrumented flag (a private attribute).

    There is no public way to keep another instrumentor off:
    ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` only steers ``opentelemetry-instrument``'s loader
    (and a user's own ``instrument()`` call ignores it), ``is_instrumented_by_opentelemetry`` is
    read-only. With the flag set, its ``instrument()`` is a no-op (BaseInstrumentor checks it
    first); :meth:`CeleryPublishInstrumentor._uninstrument` clears it again. This is the only
    place that writes it.
    """
    official._is_instrumented_by_opentelemetry = on


def supersede_official() -> Any:
    """Keep opentelemetry-instrumentation-celery off while we are on; return it (or None).

    Both connect the same signals: two producer and two consumer spans per task, and a second
    traceparent injected over ours. Everything it records we record too, so it goes. If it is
    already active we uninstrument it; either way we set its instrumented flag, which makes its
    own ``instrument()`` a no-op: that covers ``opentelemetry-instrument`` loading it after us
    and its documented setup inside ``worker_process_init``.
    """
    try:
        # Optional: only present when the user also installed the official instrumentation.
        from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415
    except ImportError:
        return None
    official = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    was_active = official.is_instrumented_by_opentelemetry
    if was_active:
        official.uninstrument()
    _set_official_instrumented(official, True)
    global _said_official  # noqa: PLW0603 - once per process, however often we are toggled
    disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    if not _said_official and (
        was_active or "celery" not in {name.strip() for name in disabled.split(",")}
    ):
        _said_official = True
        logger.warning(
            "otel-celery-publish: opentelemetry-instrumentation-celery is installed; it is kept "
            "off while otel-celery-publish is on (no duplicate spans, one context injection). "
            "Set OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=celery to silence this."
        )
    return official


class CeleryPublishInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Producer span + durable audit row per publish; consumer and queue-wait spans per task.

    ``instrument()`` without arguments reads ``OTEL_CELERY_PUBLISH_*`` like
    ``opentelemetry-instrument`` does. Keywords:

    - ``tracer_provider``, ``meter_provider``: as for every instrumentor;
    - ``audit_url``, ``durability``, ``use_links``, ``redact_keys`` and every other field of
      :class:`~otel_celery_publish.config.Settings`: override the environment (None is no
      keyword);
    - ``settings=Settings(...)``: use these settings instead of the environment (which is then
      not read); field keywords given with it override it, so
      ``instrument(settings=base, durability="async")`` is ``base`` in async mode.

    A keyword that is none of these raises :class:`TypeError` naming it; a bad value raises
    :class:`~otel_celery_publish.config.SettingsError`. Either way nothing is connected.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        settings = Settings.resolve(**kwargs)
        # What our Sentry events and log lines must never show, wherever it turns up.
        _guard.configure(redact_keys=settings.redact_keys, urls=[settings.audit_url])
        self._tracer_provider = kwargs.get("tracer_provider")
        self._meter_provider = kwargs.get("meter_provider")
        tracer = trace.get_tracer(
            "otel_celery_publish", __version__, self._tracer_provider, schema_url=SCHEMA_URL
        )
        meter = metrics.get_meter(
            "otel_celery_publish", __version__, self._meter_provider, schema_url=SCHEMA_URL
        )
        _register_process_hooks()
        self.writer = AuditWriter(settings, meter)
        self.writer.start()
        self.heartbeat = Heartbeat(settings)
        publish = PublishHooks(tracer, self.writer, settings)
        worker = WorkerHooks(tracer, meter, self.writer, settings, self.heartbeat)
        self._receivers: list[tuple[Any, Any]] = [
            (signals.before_task_publish, publish.before_publish),
            (signals.after_task_publish, publish.after_publish),
            (signals.task_received, worker.on_received),
            (signals.task_prerun, worker.on_prerun),
            (signals.task_failure, worker.on_failure),
            (signals.task_retry, worker.on_retry),
            (signals.task_postrun, worker.on_postrun),
            (signals.task_revoked, worker.on_revoked),
            (signals.task_rejected, worker.on_rejected),
            (signals.task_unknown, worker.on_unknown),
            (signals.worker_init, self._on_worker_start),
            (signals.worker_ready, self._on_worker_start),
            (signals.worker_process_shutdown, self._on_shutdown),
            (signals.worker_shutdown, self._on_shutdown),
            (signals.worker_shutdown, self._on_worker_stop),
        ]
        for signal, receiver in self._receivers:
            signal.connect(receiver, weak=False)
        self._canvas = CanvasHooks(tracer)
        with guard("canvas install"):  # without it, a group is several traces, as before us
            self._canvas.install()
        self._official = supersede_official()
        logger.info(
            "otel-celery-publish: instrumented; audit rows go to %s, table %s, durability %s",
            make_url(settings.audit_url).render_as_string(hide_password=True),
            settings.table_name,
            settings.durability,
        )

    def _uninstrument(self, **kwargs: Any) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers = []
        self._canvas.uninstall()
        self.heartbeat.stop(FLUSH_TIMEOUT_S)
        self.writer.close(FLUSH_TIMEOUT_S)
        if self._official is not None:
            _set_official_instrumented(self._official, False)

    def _on_worker_start(self, sender: Any = None, **_: Any) -> None:
        """The worker's main process, before its pool forks (``worker_init``), or once it is
        up if we were instrumented after that (``worker_ready``): start its heartbeat."""
        with guard("worker heartbeat start"):
            self.heartbeat.start(str(getattr(sender, "hostname", None) or "unknown"))

    def _on_worker_stop(self, **_: Any) -> None:
        """After a warm shutdown finished its tasks: mark this worker instance stopped."""
        with guard("worker heartbeat stop"):
            self.heartbeat.stop(FLUSH_TIMEOUT_S)

    def _on_shutdown(self, **_: Any) -> None:
        """Ship rows (and delete the shipped spool) and flush telemetry: pool children leave
        with os._exit, atexit never runs."""
        with guard("shutdown flush"):
            self.writer.close(FLUSH_TIMEOUT_S)
            # In a daemon thread, bounded: the SDK's metric reader can fork with its export lock
            # held, and force_flush's own timeout does not cover taking it
            # (opentelemetry-python#3307): a pool child would hang its worker's shutdown.
            flusher = threading.Thread(
                target=self._flush_providers, name="otel-celery-publish-flush", daemon=True
            )
            flusher.start()
            flusher.join(FLUSH_TIMEOUT_S)

    def _flush_providers(self) -> None:
        for provider in (
            self._tracer_provider or trace.get_tracer_provider(),
            self._meter_provider or metrics.get_meter_provider(),
        ):
            force_flush = getattr(provider, "force_flush", None)
            if force_flush is not None:
                with guard("shutdown flush"):
                    force_flush(int(FLUSH_TIMEOUT_S * 1000))
