"""Internal failures reach Sentry exactly once, and never through the logging integration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from otel_celery_publish import _guard


class _Capture(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def capture_envelope(self, envelope: Any) -> None:
        self.events += [item for item in envelope.items if item.type == "event"]


@pytest.fixture
def sentry() -> Iterator[_Capture]:
    transport = _Capture()
    # Without the dedupe integration, so a second event through logging would show up here.
    sentry_sdk.init(
        dsn="https://key@sentry.invalid/1",
        transport=transport,
        default_integrations=False,
        integrations=[LoggingIntegration()],
    )
    _guard._last_report.clear()
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # back to a disabled client


def test_guard_sends_one_sentry_event_per_failure(
    sentry: _Capture, internal_errors: list[Any]
) -> None:
    """A swallowed internal error is one Sentry event, not a second one via our log line."""
    exc = RuntimeError("audit database exploded")
    exc._ocp_expected = True  # type: ignore[attr-defined]
    with _guard.guard("test hook"):
        raise exc
    sentry_sdk.flush()
    assert len(sentry.events) == 1
    assert internal_errors == [("test hook", exc)]
