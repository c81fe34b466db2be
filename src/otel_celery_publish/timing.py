"""Queue-wait arithmetic: pure, wall-clock seconds across processes."""

from __future__ import annotations

from typing import NamedTuple


class Waits(NamedTuple):
    """Edges of the queue wait, clamped so that ``ready <= received <= started``."""

    ready: float
    """When the task became runnable: ``max(published_at, eta)``."""
    received: float | None
    """When the worker took the message from the broker (None if unknown)."""
    started: float
    skew_s: float
    """How far the publisher's clock was ahead of ours (0 when consistent)."""

    @property
    def total(self) -> float:
        return self.started - self.ready


def queue_waits(
    published_at: float, eta: float | None, received_at: float | None, started_at: float
) -> Waits:
    """Split the wait into broker wait (ready -> received) and worker wait (received -> started).

    ETA/countdown tasks wait from their ETA, not from the publish, like celery-exporter's
    ``started - max(sent, eta)``. A publisher clock ahead of the worker's would make waits
    negative: every edge is clamped to the next one and the skew is reported, never hidden.
    """
    first_seen = started_at if received_at is None else min(received_at, started_at)
    skew = max(0.0, published_at - first_seen)
    ready = min(max(published_at, eta if eta is not None else published_at), started_at)
    received = None if received_at is None else min(max(received_at, ready), started_at)
    return Waits(ready, received, started_at, skew)
