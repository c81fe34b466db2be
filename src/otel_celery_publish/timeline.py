"""Text timelines: labelled bars to scale, one per line, like a trace waterfall in a terminal.

Pure: no clock, no I/O. ``audit show`` draws each attempt's lifecycle with it and the demo draws
traces; both hand over ``(label, start, end, depth)`` items in display order::

    >>> print("\\n".join(render([("send", 0.0, 0.001, 0), ("run", 0.002, 0.004, 1)], width=8)))
      send                               ██ 1.0 ms
        run                                  ████ 2.0 ms

``start``/``end`` are epoch seconds. An item whose ``end`` is None has not ended (a task still
waiting, or lost): it is drawn in a lighter shade up to ``now`` (or the last known instant)
and its duration is marked ``>``. ``error`` adds a ``✗``, ``note`` a trailing remark.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

FULL, OPEN = "█", "░"


class Bar(NamedTuple):
    """One line of a timeline; a plain ``(label, start, end, depth)`` tuple works too."""

    label: str
    start: float
    end: float | None
    depth: int = 0
    error: bool = False
    note: str = ""


def duration(seconds: float) -> str:
    """``0.9 ms``, ``12.35 s``, ``4.0 min``, ``2.5 h``: the unit a human reads at a glance."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(
    items: Iterable[Bar | tuple[str, float, float | None, int]],
    *,
    width: int = 48,
    label_width: int = 34,
    now: float | None = None,
) -> list[str]:
    """Draw ``items`` on one shared time axis ``width`` characters wide; one line per item.

    Labels are indented two spaces per ``depth`` and cut to ``label_width``. Every bar is at
    least one character, so an instant is still visible.
    """
    bars = [Bar(*item) for item in items]
    if not bars:
        return []
    t0 = min(bar.start for bar in bars)
    known = [t for bar in bars for t in (bar.start, bar.end) if t is not None]
    t1 = max([*known, now] if now is not None else known)
    scale = width / max(t1 - t0, 1e-6)
    lines = []
    for bar in bars:
        end = t1 if bar.end is None else bar.end
        shade = OPEN if bar.end is None else FULL
        offset = " " * int((bar.start - t0) * scale)
        drawn = offset + shade * max(1, int((end - bar.start) * scale))
        took = ("> " if bar.end is None else "") + duration(max(0.0, end - bar.start))
        label = ("  " * bar.depth + bar.label)[:label_width]
        suffix = (" ✗" if bar.error else "") + (f"  {bar.note}" if bar.note else "")
        lines.append(f"  {label:<{label_width}} {drawn} {took}{suffix}")
    return lines
