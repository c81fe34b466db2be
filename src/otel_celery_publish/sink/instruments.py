"""The sink's metrics, created once per meter however many writers use it.

The SDK keeps the first instrument of a name per meter and hands that one back to every later
create: a second ``create_observable_gauge`` of the same name is not registered, so its
callbacks are silently dropped (opentelemetry-sdk ``Meter.create_observable_gauge`` only creates
the instrument ``if not status.already_registered``). So each meter gets one
:class:`SinkInstruments`, shared by every writer (and ``celery audit drain``) on it, whose
single backlog gauge reports the writers watched on it that are still alive.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol

from opentelemetry import metrics

BACKLOG_DESCRIPTION = "Bytes in this process's spool not yet shipped to the audit database"
_lock = threading.Lock()  # guards _by_meter and each SinkInstruments' gauge


def _reset_lock() -> None:
    global _lock  # noqa: PLW0603 - a parent thread may have held it at fork time
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock)  # once per process, at import


class Backlogged(Protocol):
    def backlog(self) -> int:
        """Bytes of this process's spool not yet shipped to the audit database."""
        ...


class SinkInstruments:
    """The counters of one meter, and its backlog gauge (registered with the first writer)."""

    def __init__(self, meter: metrics.Meter) -> None:
        # Weakly: this is the value of a dict keyed weakly by the meter (a test's meter
        # provider must not live forever because a writer once used it).
        self._meter = weakref.ref(meter)
        self._writers: weakref.WeakSet[Backlogged] = weakref.WeakSet()
        self._gauge: metrics.ObservableGauge | None = None
        self.fallbacks = meter.create_counter(
            "celery.audit.fallback",
            unit="{record}",
            description="Publish rows the sync path could not commit and spooled instead",
        )
        self.overflow = meter.create_counter(
            "celery.audit.spool.overflow",
            unit="{record}",
            description="Records the spool refused (spool_max_bytes reached); kept in memory",
        )
        self.dropped = meter.create_counter(
            "celery.audit.dropped",
            unit="{record}",
            description="Audit records lost: spool full or unwritable and memory queue full",
        )
        self.quarantined = meter.create_counter(
            "celery.audit.quarantined",
            unit="{record}",
            description="Audit records the database refused even repaired; kept in the quarantine",
        )

    def watch(self, writer: Backlogged) -> None:
        """Count ``writer``'s backlog in the gauge for as long as it lives."""
        with _lock:
            self._writers.add(writer)
            meter = self._meter()
            if self._gauge is None and meter is not None:
                # Only with a writer: a gauge registered by ``audit drain`` first would report
                # nothing and take the name.
                self._gauge = meter.create_observable_gauge(
                    "celery.audit.spool.backlog",
                    callbacks=[self._observe_backlog],
                    unit="By",
                    description=BACKLOG_DESCRIPTION,
                )

    def _observe_backlog(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(sum(writer.backlog() for writer in list(self._writers)))]


_by_meter: weakref.WeakKeyDictionary[metrics.Meter, SinkInstruments] = weakref.WeakKeyDictionary()


def instruments(meter: metrics.Meter) -> SinkInstruments:
    """The sink's instruments on ``meter``, created on first use."""
    with _lock:
        found = _by_meter.get(meter)
        if found is None:
            found = _by_meter[meter] = SinkInstruments(meter)
        return found
