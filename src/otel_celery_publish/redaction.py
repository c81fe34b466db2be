"""Redaction: masking the values of sensitive names (``REDACT_KEYS``) in task arguments and
headers before they are stored. Pure functions; no I/O."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REDACTED = "***"
_MAX_DEPTH = 8


def is_sensitive(name: str, keys: frozenset[str]) -> bool:
    """True when any configured key occurs in ``name``, case-insensitively ("token" masks
    "card_token"): redacting a little too much beats leaking a secret under a longer name.
    A ``-`` counts as ``_``, so "api_key" masks the ``X-Api-Key`` header too. A key of
    :data:`WHOLE_WORD_MAX` characters or fewer ("ssn", "cvv", "pin", "iban") matches only as a
    whole word between ``_`` (``user_ssn``, ``PIN``), not inside one (``classname``,
    ``shipping``)."""
    return bool(keys) and _matcher(keys)(name.lower().replace("-", "_")) is not None


@functools.lru_cache(maxsize=16)
def _matcher(keys: frozenset[str]) -> Callable[[str], re.Match[str] | None]:
    """One regex search for all keys: faster than a loop of ``in`` on every name we check."""
    return re.compile("|".join(_pattern(key.replace("-", "_")) for key in sorted(keys))).search


WHOLE_WORD_MAX = 4


def _pattern(key: str) -> str:
    if len(key) > WHOLE_WORD_MAX:
        return re.escape(key)
    return rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])"


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
