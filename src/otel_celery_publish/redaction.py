"""Redaction: masking the values of sensitive names (``REDACT_KEYS``) in task arguments and
headers before they are stored. Pure functions; no I/O."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REDACTED = "***"
_MAX_DEPTH = 8
# Nothing to look into (most arguments): no ABC checks for them.
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def is_sensitive(name: str, keys: frozenset[str]) -> bool:
    """True when any configured key occurs in ``name``, case-insensitively ("token" masks
    "card_token", a user's "pass" masks "dbpass"): redacting a little too much beats leaking a
    secret under a longer name. A ``-`` counts as ``_``, so "api_key" masks the ``X-Api-Key``
    header too, and so does a camelCase boundary ("api_key" masks ``apiKey``).

    Only the built-in short keys of :data:`WHOLE_WORD_KEYS` ("ssn", "cvv", "pin", "iban", ...)
    match as a whole word, i.e. not between two letters: ``user_ssn``, ``userSSN``, ``PIN``,
    ``cardCvv``, ``ibanNumber`` and ``cvv2`` are masked, ``classname``, ``shipping`` and
    ``opinion`` are not. A key a user configures always matches as a substring.
    """
    if not keys:
        return False
    return _remembered(name, keys) if len(name) <= _REMEMBERED_LEN else _check(name, keys)


# Names up to this long are remembered (a dict key of the payload may be any long string).
_REMEMBERED_LEN = 128


@functools.lru_cache(maxsize=4096)
def _remembered(name: str, keys: frozenset[str]) -> bool:
    """:func:`_check`, remembered: the same kwarg and header names come on every publish (a
    frozenset keeps its hash, so a hit costs about a dict lookup)."""
    return _check(name, keys)


def _check(name: str, keys: frozenset[str]) -> bool:
    plain = name.lower().replace("-", "_")
    if name.islower():  # no camelCase to see (the common snake_case name: one search)
        return _matcher(keys)(plain) is not None
    # Both spellings in one search: the substring keys keep matching across a camelCase
    # boundary ("cardnumber" in ``cardNumber``), the whole-word keys see it ("ssn" in
    # ``userSSN``). NUL is not a letter, so it is a boundary between the two.
    split = _CAMEL.sub("_", name).lower().replace("-", "_")
    return _matcher(keys)(f"{plain}\0{split}") is not None


# A word starts at an uppercase letter after a lowercase letter or digit (``userSSN``), and at
# the last capital of an acronym followed by a lowercase letter (``IBANNumber``).
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

# Short built-in keys that are also common fragments of ordinary words ("classname",
# "shipping", "company", "caribbean"): these match only where no letter touches them.
WHOLE_WORD_KEYS = frozenset({"cvv", "cvc", "pan", "ssn", "pin", "iban"})


@functools.lru_cache(maxsize=16)
def _matcher(keys: frozenset[str]) -> Callable[[str], re.Match[str] | None]:
    """One regex search for all keys: faster than a loop of ``in`` on every name we check."""
    return re.compile("|".join(_pattern(key.replace("-", "_")) for key in sorted(keys))).search


def _pattern(key: str) -> str:
    if key not in WHOLE_WORD_KEYS:
        return re.escape(key)
    return rf"(?<![a-z]){re.escape(key)}(?![a-z])"


def redact(value: Any, keys: frozenset[str], _depth: int = 0) -> tuple[Any, bool]:
    """Copy ``value`` with mapping entries whose key is sensitive (:func:`is_sensitive`) masked.

    Returns the copy and whether anything was masked. Containers are only copied when needed;
    a tuple (namedtuples included) comes back as a plain tuple. Containers nested deeper than we
    look are masked whole rather than passed through unread.
    """
    if not keys or type(value) in _SCALARS:
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
