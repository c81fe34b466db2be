"""The never-raise-into-the-host guard.

Every hook body runs inside :func:`guard`. An internal failure is logged (rate-limited per place
and exception type) and sent to Sentry when sentry-sdk is initialised. Our logger is ignored by
Sentry's logging integration so the same failure does not become a second event, and because we
never let the exception escape, Celery's ``Signal.send`` never logs it either.

What we send must not carry the audit database's password (or any other secret): it is in the
stack frames' local variables of a failed connection (the URL, libpq's conninfo, the Settings).
So every event we capture goes through a scope of its own, forked from the host's, with one
event processor: sentry-sdk's :class:`~sentry_sdk.scrubber.EventScrubber` (its denylist, made
recursive) plus our rules, applied to frame variables, exception messages, breadcrumbs, extra,
contexts and tags: a key *containing* a sensitive word (the ``redact_keys`` setting, always with
the defaults) is masked, and in every string the password of a URL (``scheme://user:***@``),
``key=value`` pairs under a sensitive key and every secret value seen that way or registered
with :func:`configure` become ``***``. The host's own Sentry configuration and events are left
alone: the host owns ``sentry_sdk.init``. If scrubbing fails, the event is dropped, not sent.
Our log lines get the same string scrubbing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sentry_sdk
from sentry_sdk._types import AnnotatedValue
from sentry_sdk.integrations.logging import ignore_logger
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.utils import safe_repr

from otel_celery_publish.config import DEFAULT_REDACT_KEYS

logger = logging.getLogger("otel_celery_publish")
ignore_logger(logger.name)

REPEAT_AFTER_S = 60.0
REDACTED = "***"
_last_report: dict[tuple[str, type[BaseException]], float] = {}

# Tests set this to collect swallowed errors and fail at teardown instead of hiding them in a log.
on_internal_error: Callable[[str, BaseException], None] | None = None

# A secret is replaced wherever it occurs only from this length on: a two-letter "password"
# would turn the whole event into asterisks. Shorter ones are still masked where they stand.
MIN_SECRET = 4
_redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS
_secrets: frozenset[str] = frozenset()
# A URL-like token: every quantifier is bounded and nothing follows an open-ended one, so the
# cost stays linear in the text (a huge local variable must not stall the host's publish).
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]{0,30}://[^\s'\"<>]{1,4096}")
_NOT_SECRETS = frozenset({REDACTED, "[filtered]", "none", "null", "true", "false"})
_MAX_DEPTH = 32
# Longer strings are cut (Sentry itself no longer does by default): scrubbing stays cheap on
# the thread that reports, which in sync mode is the host's publish.
MAX_TEXT = 16 << 10


def configure(*, redact_keys: Iterable[str] = (), urls: Iterable[str] = ()) -> None:
    """Add to what our events and log lines must never show: values under keys containing one
    of ``redact_keys`` (the defaults always apply) and the passwords of ``urls`` (the audit
    database's, wherever they occur). Call with the Settings when instrumenting."""
    global _redact_keys, _secrets  # noqa: PLW0603 - process-wide, like sentry-sdk's own client
    _redact_keys = _redact_keys | {key.lower() for key in redact_keys}
    found = {_url_password(m.group(0)) for url in urls for m in _URL.finditer(url)}
    _secrets = _secrets | {s for s in found if s is not None and len(s) >= MIN_SECRET}


@contextlib.contextmanager
def guard(where: str) -> Iterator[None]:
    """Run the block; report and swallow any ``Exception`` it raises (ours, never the host's)."""
    try:
        yield
    except Exception as exc:
        report(where, exc)


def report(where: str, exc: BaseException, message: str | None = None) -> None:
    """Log and capture ``exc`` once per (where, type) per :data:`REPEAT_AFTER_S`.

    Without ``message`` it is our bug (logged as an internal error, with the traceback); with
    one it is a condition the operator must know about, e.g. the audit database being down.
    """
    if on_internal_error is not None:
        on_internal_error(where, exc)
    key = (where, type(exc))
    now = time.monotonic()
    last = _last_report.get(key)
    if last is not None and now - last < REPEAT_AFTER_S:
        return
    _last_report[key] = now
    client = sentry_sdk.get_client()
    pii = client.is_active() and bool(client.options.get("send_default_pii"))
    scrubber = _Scrubber(_redact_keys, _secrets, send_default_pii=pii)
    if message is None:
        logger.error(
            "otel-celery-publish internal error in %s (publish and task continue): %s",
            where,
            scrubber.text(repr(exc)),
            exc_info=exc,
        )
    else:
        logger.warning(
            "otel-celery-publish: %s (publish and task continue)", scrubber.text(message)
        )
    if client.is_active():
        with sentry_sdk.new_scope() as scope:
            scope.add_event_processor(scrubber.process)
            scope.capture_exception(exc)


def _url_parts(url: str) -> tuple[str, str, str] | None:
    """``(up to the password, password, from the @ on)`` of a URL with a password. The
    password runs to the last ``@`` (an unencoded ``@`` in it is common); a URL cut short by
    a truncation marker has it running to the end."""
    start = url.index("://") + 3
    at = url.rfind("@", start)
    end = at
    if at < 0:
        if not url.endswith(("...", "\u2026")):
            return None
        end = len(url) - (3 if url.endswith("...") else 1)
    colon = url.find(":", start, end)
    if colon < 0 or colon + 1 >= end:
        return None
    return url[: colon + 1], url[colon + 1 : end], url[end:]


def _url_password(url: str) -> str | None:
    parts = _url_parts(url)
    return None if parts is None else parts[1]


def _mask_url(match: re.Match[str]) -> str:
    parts = _url_parts(match.group(0))
    return match.group(0) if parts is None else parts[0] + REDACTED + parts[2]


@functools.cache
def _kv_pattern(keys: frozenset[str]) -> re.Pattern[str]:
    """``<key>[rest of the name][quote] = or : <value>`` (``api_key`` also matches ``api-key``;
    what precedes the key in the name is left as it is); an ``Authorization: Bearer <token>``
    value includes the token. Bounded quantifiers: linear in the text."""
    words = sorted(keys, key=len, reverse=True)
    alternatives = "|".join(re.escape(k).replace("_", "[_-]") for k in words)
    return re.compile(
        rf"(?i)((?:{alternatives})[\w.\-]{{0,64}}['\"]?\s{{0,8}}[=:]\s{{0,8}})"
        r"((?:(?:bearer|basic|digest|token)\s{1,8})?)"
        r"('[^']{0,1024}'|\"[^\"]{0,1024}\"|[^\s,;&)}\]'\"]{1,1024})"
    )


class _Scrubber(EventScrubber):
    """Sentry's scrubber (recursive, its denylist plus ours) with our rules on top."""

    def __init__(
        self, keys: frozenset[str], secrets: frozenset[str], *, send_default_pii: bool
    ) -> None:
        super().__init__(
            denylist=[*DEFAULT_DENYLIST, *keys], recursive=True, send_default_pii=send_default_pii
        )
        self.keys = keys
        self.secrets = set(secrets)
        self._pattern = _kv_pattern(keys)

    def process(self, event: Any, _hint: Any) -> Any:
        """The event processor: the scrubbed event, or None (dropped) if scrubbing failed."""
        try:
            self._collect(event, 0)
            self.scrub_event(event)  # sentry's sections: request, extra, user, breadcrumbs...
            for section in ("contexts", "tags"):
                if isinstance(event.get(section), dict):
                    self.scrub_dict(event[section])
            self._walk(event, 0, keys=False)  # every other string: messages, exceptions
        except Exception:  # never send what we could not scrub
            logger.debug("otel-celery-publish: a Sentry event was dropped", exc_info=True)
            return None
        return event

    def sensitive(self, key: Any) -> bool:
        if not isinstance(key, str):
            return False
        lowered = key.lower()
        normal = lowered.replace("-", "_")
        return lowered in self.denylist or any(k in normal or k in lowered for k in self.keys)

    def text(self, value: str) -> str:
        """``value`` with URL passwords, sensitive ``key=value`` pairs and known secrets masked,
        cut at :data:`MAX_TEXT` (the cut is marked "...", which the URL rule understands)."""
        if len(value) > MAX_TEXT:
            value = value[:MAX_TEXT] + "..."
        value = _URL.sub(_mask_url, value)
        value = self._pattern.sub(lambda m: m.group(1) + m.group(2) + REDACTED, value)
        for secret in sorted(self.secrets, key=len, reverse=True):
            value = value.replace(secret, REDACTED)
        return value

    def scrub_dict(self, d: object, _depth: int = 0) -> None:
        if isinstance(d, dict):
            self._walk(d, _depth, keys=True)

    def scrub_list(self, lst: object, _depth: int = 0) -> None:
        if isinstance(lst, list):
            self._walk(lst, _depth, keys=True)

    def _walk(self, value: Any, depth: int, *, keys: bool) -> Any:
        """``value`` scrubbed (containers in place). In the data sections (``keys``), objects
        become their scrubbed repr, which is what Sentry's serializer would have sent; elsewhere
        they are the event's own fields (a timestamp) and stay."""
        if isinstance(value, str):
            return self.text(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if depth > _MAX_DEPTH:
            return REDACTED
        if isinstance(value, (dict, list, tuple, AnnotatedValue)):
            return self._walk_container(value, depth, keys=keys)
        return self.text(safe_repr(value)) if keys else value

    def _walk_container(self, value: Any, depth: int, *, keys: bool) -> Any:
        if isinstance(value, AnnotatedValue):
            value.value = self._walk(value.value, depth + 1, keys=keys)
        elif isinstance(value, dict):
            for k, v in list(value.items()):
                if keys and self.sensitive(k):
                    value[k] = AnnotatedValue.substituted_because_contains_sensitive_data()
                else:
                    value[k] = self._walk(v, depth + 1, keys=keys)
        else:
            items = [self._walk(v, depth + 1, keys=keys) for v in value]
            if isinstance(value, tuple):
                return items
            value[:] = items
        return value

    def _collect(self, value: Any, depth: int) -> None:
        """Learn the secrets this event shows somewhere, to mask them everywhere."""
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, str):
            value = value[:MAX_TEXT]
            for m in _URL.finditer(value):
                self._learn(_url_password(m.group(0)) or "")
            for m in self._pattern.finditer(value):
                self._learn(m.group(3))
        elif isinstance(value, dict):
            for k, v in value.items():
                if self.sensitive(k) and isinstance(v, str):
                    self._learn(v)
                self._collect(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._collect(v, depth + 1)
        elif isinstance(value, AnnotatedValue):
            self._collect(value.value, depth + 1)

    def _learn(self, value: str) -> None:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if len(value) >= MIN_SECRET and value.lower() not in _NOT_SECRETS:
            self.secrets.add(value)
