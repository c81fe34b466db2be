"""Our internal errors as Sentry events: once, scrubbed, never the host's events.

Loaded by :mod:`otel_celery_publish._guard` only when the host has imported sentry-sdk (the
``sentry`` extra); nothing else imports this module. Importing it excludes our logger from
Sentry's logging integration, so a reported failure is one event, not a second one through our
log line. The host owns ``sentry_sdk.init``: without an active client nothing is sent.

What we send must not carry the audit database's password (or any other secret): it is in the
stack frames' local variables of a failed connection (the URL, libpq's conninfo, the Settings).
So every event we capture goes through a scope of its own, forked from the host's, with one
event processor: sentry-sdk's :class:`~sentry_sdk.scrubber.EventScrubber` (its denylist, made
recursive) plus our rules, applied to frame variables, exception messages, breadcrumbs, extra,
contexts and tags: a key *containing* a sensitive word (the ``redact_keys`` setting, always with
the defaults) is masked, and every string gets the rules of :class:`~._guard.TextScrubber`, with
every secret seen in the event under a sensitive key or in a URL masked wherever it occurs. The
host's own Sentry configuration and events are left alone. If scrubbing fails, the event is
dropped, not sent.
"""

from __future__ import annotations

from typing import Any

import sentry_sdk
from sentry_sdk._types import AnnotatedValue
from sentry_sdk.integrations.logging import ignore_logger
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.utils import safe_repr

from otel_celery_publish._guard import REDACTED, TextScrubber, logger

ignore_logger(logger.name)

_MAX_DEPTH = 32


def capture(exc: BaseException, keys: frozenset[str], secrets: frozenset[str]) -> None:
    """Send ``exc`` to the host's Sentry client, if one is active, scrubbed (see the module)."""
    client = sentry_sdk.get_client()
    if not client.is_active():
        return
    pii = bool(client.options.get("send_default_pii"))
    scrubber = _Scrubber(keys, secrets, send_default_pii=pii)
    with sentry_sdk.new_scope() as scope:
        scope.add_event_processor(scrubber.process)
        scope.capture_exception(exc)


class _Scrubber(EventScrubber):
    """Sentry's scrubber (recursive, its denylist plus ours) with our rules on top."""

    def __init__(
        self, keys: frozenset[str], secrets: frozenset[str], *, send_default_pii: bool
    ) -> None:
        super().__init__(
            denylist=[*DEFAULT_DENYLIST, *keys], recursive=True, send_default_pii=send_default_pii
        )
        self.keys = keys
        self._text = TextScrubber(keys, secrets)

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
        """``value`` scrubbed by the string rules, with the secrets this event showed."""
        return self._text.text(value)

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
            self._text.learn_from(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if self.sensitive(k) and isinstance(v, str):
                    self._text.learn(v)
                self._collect(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._collect(v, depth + 1)
        elif isinstance(value, AnnotatedValue):
            self._collect(value.value, depth + 1)
