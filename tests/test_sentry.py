"""Internal failures reach Sentry exactly once, never through the logging integration, and
never with a secret in them (the events are scrubbed; the host's own events are not ours)."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport
from sqlalchemy import create_engine

from otel_celery_publish import _guard, _sentry
from otel_celery_publish.config import DEFAULT_REDACT_KEYS, Settings
from otel_celery_publish.sink.writer import AuditWriter

SECRET = "hunter2-SECRET"
# Port 1 on loopback: connection refused at once, a real driver error from a real connect.
URL = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/db"
NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)


class _Capture(Transport):
    """A real transport object that keeps the envelopes instead of sending them."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [
            json.loads(item.get_bytes())
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == "event"
        ]

    def wire(self) -> bytes:
        """Everything that would have left the process, as serialized for the network."""
        return b"".join(envelope.serialize() for envelope in self.envelopes)


@pytest.fixture
def sentry() -> Iterator[_Capture]:
    transport = _Capture()
    # Without the dedupe integration, so a second event through logging would show up here.
    sentry_sdk.init(
        dsn="https://key@sentry.invalid/1",
        transport=transport,
        default_integrations=False,
        auto_enabling_integrations=False,  # its Celery integration would patch every publish
        integrations=[LoggingIntegration()],
    )
    _guard._last_report.clear()
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.init(default_integrations=False, auto_enabling_integrations=False)  # disabled


def _expected(internal_errors: list[Any]) -> None:
    """The reports are what the test is about, not failures."""
    for _where, exc in internal_errors:
        exc._ocp_expected = True


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


def test_a_database_outage_report_never_carries_the_password(
    sentry: _Capture, internal_errors: list[Any], tmp_path: Path
) -> None:
    """A real failed connect reported by the writer reaches Sentry without the password, in
    frame variables, libpq's conninfo, the Settings repr or anywhere else on the wire."""
    settings = Settings(audit_url=URL, spool_dir=str(tmp_path), flush_interval=3600)
    writer = AuditWriter(settings)
    try:
        row = {"publish_id": "p1", "task_id": "t1", "task_name": "t", "published_at": NOW}
        writer.record_publish(row)
    finally:
        writer.close(timeout=10)
    sentry_sdk.flush()
    _expected(internal_errors)
    assert "audit write" in [where for where, _ in internal_errors]
    events = sentry.events
    assert events, "the outage must be reported"
    frames = [
        f for e in events for v in e["exception"]["values"] for f in v["stacktrace"]["frames"]
    ]
    assert any(f.get("vars") for f in frames), "local variables are sent (and scrubbed)"
    wire = sentry.wire()
    assert SECRET.encode() not in wire
    assert b"u:***@127.0.0.1" in wire, "the URL is still there to read, its password masked"


def test_the_hosts_own_events_are_left_alone(sentry: _Capture) -> None:
    """The same failure captured by the host itself keeps what the host's config lets through:
    we scrub our events only, and this test would see a leak."""
    try:
        create_engine(URL).connect()
    except Exception as exc:  # the host's own capture, as an app would do it
        sentry_sdk.capture_exception(exc)
    sentry_sdk.flush()
    assert SECRET.encode() in sentry.wire()


def test_scope_data_the_host_set_is_scrubbed_in_our_events(
    sentry: _Capture, internal_errors: list[Any]
) -> None:
    """Breadcrumbs, extra, tags and contexts set by the host are scrubbed in our event, by key
    and in text; the host's scopes get no processor from us."""
    scopes = (sentry_sdk.get_isolation_scope(), sentry_sdk.get_current_scope())
    before = [list(scope._event_processors) for scope in scopes]
    sentry_sdk.add_breadcrumb(
        message=f"connecting to {URL}",
        data={"dsn": URL, "x-api-key": "key-abcdef", "nested": {"Client-Secret": "cs-123456"}},
    )
    sentry_sdk.set_extra("conninfo", "host=h password=pw-654321 dbname=db")
    sentry_sdk.set_extra("headers", {"Authorization": "Bearer tok-abcdef"})
    sentry_sdk.set_tag("db", URL)
    sentry_sdk.set_context("db", {"url": URL, "access_token": "at-123456"})
    card = {"credit_card": "4111111111111111"}
    exc = ValueError(f"cannot reach {URL} (header Authorization: Bearer tok-abcdef) {card}")
    _guard.report("test outage", exc, "audit database unavailable")
    sentry_sdk.flush()
    _expected(internal_errors)
    wire = sentry.wire()
    assert len(sentry.events) == 1
    for secret in (SECRET, "key-abcdef", "cs-123456", "pw-654321", "tok-abcdef", "at-123456"):
        assert secret.encode() not in wire, secret
    assert b"4111111111111111" not in wire
    assert [list(scope._event_processors) for scope in scopes] == before


def test_configured_secrets_are_masked_wherever_they_occur(
    sentry: _Capture, internal_errors: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password registered through configure() is masked even where nothing says it is one."""
    monkeypatch.setattr(_guard, "_secrets", frozenset())
    _guard.configure(redact_keys=DEFAULT_REDACT_KEYS, urls=[URL])
    exc = RuntimeError(f"server said: bad credentials {SECRET}")
    _guard.report("test outage", exc, "audit database unavailable")
    sentry_sdk.flush()
    _expected(internal_errors)
    assert sentry.events
    assert SECRET.encode() not in sentry.wire()


def test_an_event_that_cannot_be_scrubbed_is_dropped(
    sentry: _Capture, internal_errors: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If scrubbing fails, our event is not sent at all rather than sent as it is."""

    def broken(*_args: Any) -> None:
        raise RuntimeError("scrubber bug")

    monkeypatch.setattr(_sentry._Scrubber, "_collect", broken)
    _guard.report("test outage", RuntimeError(URL), "audit database unavailable")
    sentry_sdk.flush()
    _expected(internal_errors)
    assert sentry.events == []


def test_log_lines_are_scrubbed_too(
    internal_errors: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Our warning and error lines mask URL passwords like the Sentry events do."""
    _guard._last_report.clear()
    with caplog.at_level(logging.WARNING, logger="otel_celery_publish"):
        _guard.report("test outage", RuntimeError(URL), f"audit database unavailable ({URL})")
        _guard.report("test bug", RuntimeError(URL))
    _expected(internal_errors)
    assert "u:***@127.0.0.1" in caplog.text
    assert SECRET not in "".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "redis://:p@ss@h:6379/0 and amqp://g:x@y@h//",
            "redis://:***@h:6379/0 and amqp://g:***@h//",
        ),
        ("Engine(postgresql://u:longpasswo...", "Engine(postgresql://u:***..."),
        ("host=h password='a b' port=1", "host=h password=*** port=1"),
        ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
        ("{'api_key': 'zzz', 'n': 1}", "{'api_key': ***, 'n': 1}"),
        ("x-api-key=k1&page=2", "x-api-key=***&page=2"),
        ("http://localhost:4317/v1/traces", "http://localhost:4317/v1/traces"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("ordinary text: 12:30", "ordinary text: 12:30"),
    ],
)
def test_text_scrubbing(text: str, expected: str) -> None:
    """Strings lose URL passwords and sensitive key=value values; other text is unchanged, in
    log lines and Sentry events alike."""
    scrubber = _guard.TextScrubber(DEFAULT_REDACT_KEYS, frozenset())
    assert scrubber.text(text) == expected
    event_scrubber = _sentry._Scrubber(DEFAULT_REDACT_KEYS, frozenset(), send_default_pii=False)
    assert event_scrubber.text(text) == expected


def test_long_text_is_cut_and_a_password_cut_with_it_stays_masked() -> None:
    """Strings beyond MAX_TEXT are cut (bounded scrubbing cost); a URL cut in its password
    still has what is left of it masked."""
    scrubber = _guard.TextScrubber(DEFAULT_REDACT_KEYS, frozenset())
    head = "x" * (_guard.MAX_TEXT - len(" postgresql+psycopg://u:hunt"))
    out = scrubber.text(f"{head} {URL} and more")
    assert len(out) <= _guard.MAX_TEXT + 3
    assert out.endswith(" postgresql+psycopg://u:***...")
    assert "hunt" not in out


NO_SENTRY = """
import logging, sys
sys.modules["sentry_sdk"] = None  # as if sentry-sdk were not installed: its import fails
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from opentelemetry.sdk.trace import TracerProvider
from otel_celery_publish import CeleryPublishInstrumentor, _guard
instrumentor = CeleryPublishInstrumentor()
instrumentor.instrument(tracer_provider=TracerProvider(), audit_url=sys.argv[1],
                        spool_dir=sys.argv[2])
with _guard.guard("test hook"):
    raise RuntimeError("our bug")
_guard.report("test outage", RuntimeError("down"), "audit database unavailable")
instrumentor.uninstrument()
assert "otel_celery_publish._sentry" not in sys.modules, "our Sentry side was loaded"
print("done")
"""


def test_without_sentry_sdk_internal_errors_are_logged_and_nothing_raises(
    tmp_path: Path,
) -> None:
    """Where sentry-sdk cannot be imported, instrument() works and an internal error or an
    outage is logged, never raised, and our Sentry side is never loaded."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    done = subprocess.run(
        [sys.executable, "-c", NO_SENTRY, url, str(tmp_path / "spool")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "done", done.stdout
    assert any("internal error in test hook" in line for line in lines), done.stdout
    assert any("audit database unavailable" in line for line in lines), done.stdout


def test_any_line_of_our_logger_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    """A warning any of our modules logs directly (not through report()) is scrubbed too."""
    with caplog.at_level(logging.WARNING, logger="otel_celery_publish"):
        logging.getLogger("otel_celery_publish").warning("engine %s failed", URL)
    [record] = [r for r in caplog.records if r.name == "otel_celery_publish"]
    assert "u:***@127.0.0.1" in record.getMessage() and SECRET not in record.getMessage()


LATE_SENTRY = """
import json, logging, sys
from otel_celery_publish import _guard  # the host's sentry_sdk is not imported yet
import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

class Keep(Transport):
    def __init__(self):
        super().__init__()
        self.events = []
    def capture_envelope(self, envelope):
        self.events += [json.loads(i.get_bytes()) for i in envelope.items if i.type == "event"]

keep = Keep()
sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=keep, default_integrations=False,
                auto_enabling_integrations=False, integrations=[LoggingIntegration()])
logging.getLogger("otel_celery_publish").warning("audit spool: %s", sys.argv[1])
sentry_sdk.capture_message("the host's own event")
sentry_sdk.flush()
[event] = keep.events
print(json.dumps(event.get("breadcrumbs", {}).get("values", [])))
"""


def test_our_lines_never_become_breadcrumbs_when_the_host_imports_sentry_after_us() -> None:
    """A host that initialises Sentry after instrumenting: our first log line (before any
    report) still neither becomes a breadcrumb in the host's events nor carries the secret."""
    done = subprocess.run(
        [sys.executable, "-c", LATE_SENTRY, URL],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    crumbs = json.loads(done.stdout.splitlines()[-1])
    assert [c for c in crumbs if c.get("category") == "otel_celery_publish"] == [], crumbs
