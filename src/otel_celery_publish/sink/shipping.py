"""Shipping batches so that one refused record never stalls the others.

Refusals. A record the database refuses (see :mod:`.quarantine`) must not stall the records
behind it: a refused batch is repaired and retried, then split in halves until the refused
records stand alone; those are quarantined on disk, counted and reported.

:func:`drain_spool` ships dead processes' spools now (``celery audit drain``), without the
writer's thread.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator

from opentelemetry import metrics
from sqlalchemy import Table

from otel_celery_publish._guard import report
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import Database
from otel_celery_publish.sink.instruments import instruments
from otel_celery_publish.sink.quarantine import Quarantine, is_refusal, reason_of, repair
from otel_celery_publish.sink.records import Record
from otel_celery_publish.sink.spool import adopt_orphans, target_dir


def ship_isolating(
    write: Callable[[list[Record]], None],
    rows: list[Record],
    table: Table,
    refused: Callable[[Record, BaseException], None],
    *,
    error: BaseException | None = None,
) -> None:
    """``write(rows)``; if the database refuses the data (not an outage: that raises), repair
    the rows and retry, then split the batch until each refused record stands alone and hand
    it to ``refused``. One bad record costs about 2 log2(len(rows)) extra statements, only when
    it occurs; ``error`` is a refusal already met by the caller's own first attempt."""
    if error is None:
        try:
            write(rows)
            return
        except Exception as exc:
            if not is_refusal(exc):
                raise
            error = exc
    pairs = [(row, repair(row, table)) for row in rows]
    fixes = [(row, fixed[0]) for row, fixed in pairs if fixed is not None]
    candidates = [(row, row if fixed is None else fixed[0]) for row, fixed in pairs]
    if fixes:
        notes = next(fixed[1] for _, fixed in pairs if fixed is not None)
        report(
            "audit record repaired",
            error,
            f"the audit database refused {len(fixes)} record(s) ({reason_of(error)}); "
            f"repaired, e.g. {fixes[0][0].get('publish_id')}: {'; '.join(notes)}",
        )
        try:
            write([fixed for _, fixed in candidates])
            return
        except Exception as exc:
            if not is_refusal(exc):
                raise
            error = exc
    _bisect(write, candidates, error, refused)


def _bisect(
    write: Callable[[list[Record]], None],
    candidates: list[tuple[Record, Record]],
    error: BaseException,
    refused: Callable[[Record, BaseException], None],
) -> None:
    """``candidates`` (original, repaired) were refused together with ``error``: write each
    half alone, recursing into a refused half; a lone refused record goes to ``refused``."""
    if len(candidates) == 1:
        refused(candidates[0][0], error)
        return
    middle = len(candidates) // 2
    for half in (candidates[:middle], candidates[middle:]):
        try:
            write([fixed for _, fixed in half])
        except Exception as exc:
            if not is_refusal(exc):
                raise
            _bisect(write, half, exc, refused)


def drain_spool(settings: Settings) -> int:
    """Ship the spool leftovers of dead processes now; return the number of records stored.

    A record the database refuses is repaired or quarantined like in the shipping thread
    (listed by :func:`~otel_celery_publish.sink.quarantine.quarantined`), so one bad record
    never makes every drain fail.
    """
    table = audit_table(settings.table_name)
    db = Database(settings, table)
    directory = target_dir(settings.spool_dir, settings.audit_url, settings.table_name)
    counter = instruments(metrics.get_meter("otel_celery_publish")).quarantined
    refused = 0

    def quarantine(row: Record, exc: BaseException) -> None:
        nonlocal refused
        store.refuse(row, exc)
        refused += 1

    store = Quarantine(directory, counter.add)
    try:
        with _fewer_collections():
            shipped = adopt_orphans(
                directory, lambda rows: ship_isolating(db.upsert, rows, table, quarantine)
            )
        return shipped - refused
    finally:
        db.dispose()


# A drain's young-generation threshold (the default is 700), see _fewer_collections.
DRAIN_GC_THRESHOLD = 50_000
_GC_LOCK = threading.Lock()
_DRAINING = 0
_THRESHOLDS: tuple[int, ...] = ()


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector's young passes made rarer while a drain runs: the records
    it decodes hold no cycles (reference counting frees them), and a pass every 700 of them
    cost a fifth of the decoding. Concurrent drains restore the setting once, with the last."""
    global _DRAINING, _THRESHOLDS  # noqa: PLW0603 - the process's one collector setting
    with _GC_LOCK:
        if not _DRAINING:
            _THRESHOLDS = gc.get_threshold()
            gc.set_threshold(max(_THRESHOLDS[0], DRAIN_GC_THRESHOLD), *_THRESHOLDS[1:])
        _DRAINING += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _DRAINING -= 1
            if not _DRAINING:
                gc.set_threshold(*_THRESHOLDS)
