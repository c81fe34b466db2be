"""The never-raise-into-the-host guard.

Every hook body runs inside :func:`guard`. An internal failure is logged (rate-limited per place
and exception type) and, when the host uses Sentry, sent to it once, scrubbed
(:mod:`otel_celery_publish._sentry`). Because we never let the exception escape, Celery's
``Signal.send`` never logs it either.

sentry-sdk is optional (the ``sentry`` extra) and never imported by us: our Sentry side is
loaded at the first report, and only if ``sentry_sdk`` is already in ``sys.modules``. A host
that never imported it has no client to send to; importing it ourselves would only cost (about
0.2 s and its integrations' patching) in every web and worker process.

What we log must not carry the audit database's password (or any other secret): it is in the
messages of a failed connection (the URL, libpq's conninfo). So every line of our logger, from
whichever module, goes through :class:`TextScrubber` (a filter on the logger): the password of a
URL (``scheme://user:***@``), ``key=value`` pairs under a sensitive key (the ``redact_keys``
setting, always with the defaults) and every secret registered with :func:`configure` become
``***``. Sentry events get the same rules and more.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType

from otel_celery_publish.config import DEFAULT_REDACT_KEYS

logger = logging.getLogger("otel_celery_publish")

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
# Longer strings are cut (Sentry itself no longer does by default): scrubbing stays cheap on
# the thread that reports, which in sync mode is the host's publish.
MAX_TEXT = 16 << 10

Capture = Callable[[BaseException, frozenset[str], frozenset[str]], None]
_capture: Capture | None = None
_sentry_unusable = False
# A fork while one of our threads imports our Sentry side would hand the child that module's
# import lock, held by a thread it does not have (its first report would hang forever). The
# import runs under this lock, and a fork waits for it; once loaded, reports never take it.
_LOADING = threading.Lock()


def _release_loading() -> None:
    _LOADING.release()


os.register_at_fork(
    before=_LOADING.acquire, after_in_parent=_release_loading, after_in_child=_release_loading
)


def configure(*, redact_keys: Iterable[str] = (), urls: Iterable[str] = ()) -> None:
    """Add to what our events and log lines must never show: values under keys containing one
    of ``redact_keys`` (the defaults always apply) and the passwords of ``urls`` (the audit
    database's, wherever they occur). Call with the Settings when instrumenting: it also loads
    our Sentry side now, on the caller's thread, if the host has imported sentry-sdk."""
    global _redact_keys, _secrets  # noqa: PLW0603 - process-wide, like sentry-sdk's own client
    _redact_keys = _redact_keys | {key.lower() for key in redact_keys}
    found = {_url_password(m.group(0)) for url in urls for m in _URL.finditer(url)}
    _secrets = _secrets | {s for s in found if s is not None and len(s) >= MIN_SECRET}
    _sentry_capture()


class guard:  # named as the function it replaced: ``with guard("where"):``
    """Run the block; report and swallow any ``Exception`` it raises (ours, never the host's).

    A class, not ``contextlib.contextmanager``: it wraps every signal we receive, and a
    generator-based manager costs twice as much per use."""

    __slots__ = ("_where",)

    def __init__(self, where: str) -> None:
        self._where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, Exception):
            report(self._where, exc)
            return True
        return False


def report(where: str, exc: BaseException, message: str | None = None) -> None:
    """Log and capture ``exc`` once per (where, type) per :data:`REPEAT_AFTER_S`; never raises.

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
    capture = _sentry_capture()
    if message is None:
        logger.error(
            "otel-celery-publish internal error in %s (publish and task continue): %r",
            where,
            exc,
            exc_info=exc,
        )
    else:
        logger.warning("otel-celery-publish: %s (publish and task continue)", message)
    if capture is not None:
        try:
            capture(exc, _redact_keys, _secrets)
        except Exception:  # sentry-sdk's own failure must not reach the host either
            logger.debug("otel-celery-publish: a Sentry capture failed", exc_info=True)


class _EveryLine(logging.Filter):
    """On our logger, before any handler sees a record (Sentry's logging integration included):
    load our Sentry side if the host has sentry-sdk, which makes that integration ignore our
    logger (no breadcrumb, no second event), and scrub the line's text (:class:`TextScrubber`),
    whichever module logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _sentry_capture()
        try:
            text = record.getMessage()
        except Exception:  # a broken format: logging reports it itself, as it would without us
            return True
        record.msg, record.args = TextScrubber(_redact_keys, _secrets).text(text), None
        return True


logger.addFilter(_EveryLine())


def _sentry_capture() -> Capture | None:
    """:func:`otel_celery_publish._sentry.capture`, loaded on first need, if the host imported
    sentry-sdk (``sys.modules['sentry_sdk'] = None`` blocks it, as Python's import does)."""
    global _capture, _sentry_unusable  # noqa: PLW0603 - loaded once per process
    if _capture is not None or _sentry_unusable or sys.modules.get("sentry_sdk") is None:
        return _capture
    with _LOADING:
        if _capture is None and not _sentry_unusable:
            try:
                from otel_celery_publish._sentry import capture  # noqa: PLC0415 - see docstring
            except Exception:  # a sentry-sdk we do not support: internal errors are logged only
                _sentry_unusable = True
                logger.warning(
                    "otel-celery-publish: sentry-sdk is imported but unusable (need >= 2.0); "
                    "internal errors are logged only",
                    exc_info=True,
                )
            else:
                _capture = capture
    return _capture


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


class TextScrubber:
    """The string rules, for our log lines and (with more) our Sentry events."""

    def __init__(self, keys: frozenset[str], secrets: Iterable[str]) -> None:
        self.keys = keys
        self.secrets = set(secrets)
        self._pattern = _kv_pattern(keys)

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

    def learn_from(self, value: str) -> None:
        """Learn the secrets ``value`` shows (URL passwords, sensitive values), to mask them
        everywhere."""
        value = value[:MAX_TEXT]
        for m in _URL.finditer(value):
            self.learn(_url_password(m.group(0)) or "")
        for m in self._pattern.finditer(value):
            self.learn(m.group(3))

    def learn(self, value: str) -> None:
        """Mask ``value`` (unquoted) wherever it occurs, if it is long enough to be a secret."""
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if len(value) >= MIN_SECRET and value.lower() not in _NOT_SECRETS:
            self.secrets.add(value)
