"""What every row and span now says about where a publish came from (app, broker, beat entry),
who replayed it, the default redaction keys, and the line ``instrument()`` logs."""

from __future__ import annotations

import getpass
import logging
import socket
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import serialization
from opentelemetry.trace import SpanKind

from otel_celery_publish import CeleryPublishInstrumentor, audit, rows
from otel_celery_publish.config import DEFAULT_REDACT_KEYS
from otel_celery_publish.hooks import _celery
from otel_celery_publish.redaction import is_sensitive, redact
from tests.app import add
from tests.audit_support import migrated
from tests.conftest import BROKER, Publisher, audit_rows, wait_row


@pytest.mark.parametrize(
    "name",
    ["card_number", "credit_card_number", "cardNumber", "cvv", "card_cvc", "ssn", "user_ssn",
     "SSN", "iban", "IBAN", "pin", "card-pin", "account_number", "routing_number", "pan",
     "session_id", "Cookie", "private_key", "passphrase", "social_security_no", "access_token",
     "cardCvv", "userPin", "userSSN", "ibanNumber", "IBANNumber", "cvv2", "pin_2", "apiKey",
     "sessionId", "X-Api-Key", "accountNumber"],
)  # fmt: skip
def test_default_keys_mask_payment_and_identity_fields(name: str) -> None:
    assert is_sensitive(name, DEFAULT_REDACT_KEYS)


@pytest.mark.parametrize(
    ("keys", "name"),
    [("pass", "dbpass"), ("pass", "passcode"), ("pwd", "db_pwd_hash"), ("auth", "oauth_state"),
     ("otp", "totp_seed"), ("otp", "otpCode"), ("pass", "dbPass"), ("key", "monkey"),
     ("pin", "userPin")],
)  # fmt: skip
def test_a_users_own_keys_match_inside_longer_names(keys: str, name: str) -> None:
    """Only the built-in short keys are whole words: a key the user configures, however
    short, is a substring (as ``REDACT_KEYS`` always was)."""
    assert is_sensitive(name, frozenset(keys.split(",")))


@pytest.mark.parametrize(
    "name",
    ["classname", "shipping", "spin", "company", "expand", "opinion", "business_name",
     "caribbean", "cvvs_seen", "pinned", "className", "shippingAddress", "CompanyName",
     "spinCount", "pinnedAt", "pandas_version", "expandAll"],
)  # fmt: skip
def test_short_keys_match_whole_words_only(name: str) -> None:
    """``ssn``, ``pin``, ``pan``, ``cvv`` and ``iban`` inside a longer word are not secrets."""
    assert not is_sensitive(name, DEFAULT_REDACT_KEYS)


def test_payment_kwargs_are_masked_in_a_row() -> None:
    masked, hit = redact(
        {"card_number": "4111111111111111", "cvv": "123", "iban": "DE89", "amount": 5},
        DEFAULT_REDACT_KEYS,
    )
    assert hit and masked == {"card_number": "***", "cvv": "***", "iban": "***", "amount": 5}


def test_instrument_says_where_rows_go_without_the_password(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """One INFO line: the database URL with the password hidden, the table, the mode."""
    url = f"sqlite:///{tmp_path}/a.db"
    instrumentor = CeleryPublishInstrumentor()
    with caplog.at_level(logging.INFO, logger="otel_celery_publish"):
        instrumentor.instrument(audit_url=url, durability="async", table_name="said_table")
    instrumentor.uninstrument()
    [line] = [r.getMessage() for r in caplog.records if "audit rows go to" in r.getMessage()]
    assert url in line and "table said_table" in line and "durability async" in line

    caplog.clear()
    instrumentor = CeleryPublishInstrumentor()
    secret_url = "postgresql+psycopg://app:s3cr3t-pw@127.0.0.1:1/none"
    with caplog.at_level(logging.INFO, logger="otel_celery_publish"):
        instrumentor.instrument(audit_url=secret_url, db_timeout=0.2, create_schema=False)
    instrumentor.uninstrument()
    [line] = [r.getMessage() for r in caplog.records if "audit rows go to" in r.getMessage()]
    assert "s3cr3t-pw" not in line and "app:***@127.0.0.1:1/none" in line


def test_app_facts_name_the_broker_without_credentials() -> None:
    app = Celery(
        "billing", broker="amqp://guest:hunter2@127.0.0.1:5672/vhost1", set_as_current=False
    )
    facts = _celery.app_facts(app)
    assert (facts.name, facts.system) == ("billing", "rabbitmq")
    assert facts.broker == "amqp://127.0.0.1:5672/vhost1"
    assert (facts.server_address, facts.server_port) == ("127.0.0.1", 5672)
    failover = Celery(
        "f", broker="redis://:pw1@10.0.0.1:6379/0;redis://:pw2@10.0.0.2/1", set_as_current=False
    )
    assert _celery.app_facts(failover).broker == "redis://10.0.0.1:6379/0;redis://10.0.0.2/1"
    v6 = Celery("v6", broker="amqp://u:pw@[::1]:5672//", set_as_current=False)
    assert _celery.app_facts(v6).broker == "amqp://[::1]:5672//"
    # An unquoted "/" in a secret makes kombu read a port: the scheme is all we say, no error.
    sqs = Celery("q", broker="sqs://AKIA:se/cret@", set_as_current=False)
    assert _celery.app_facts(sqs)[:4] == ("aws_sqs", "json", "q", "sqs://")
    # ... and when the first segment of such a secret is digits, kombu reads a port and takes
    # the rest for the path (or a "#" ends the URL): the scheme is still all we say.
    for url, secret in [
        ("amqp://guest:5672/s3cr3t@rabbit//", "s3cr3t"),
        ("sqs://AKIA:12/cret@", "cret"),
        ("redis://:99#pw@h:6379/0", "pw"),
        ("redis://:12/34@cache:6379/0", "34"),
        ("redis://h:1/secret@h:1/0", "secret"),
    ]:
        facts = _celery.app_facts(Celery("s", broker=url, set_as_current=False))
        assert facts.broker == url.split("://")[0] + "://", url
        assert (facts.server_address, facts.server_port) == (None, None), url
        assert not any(secret in str(field) for field in facts), (url, facts)
    # Celery publishes through broker_write_url (which falls back to broker_url).
    split = Celery(
        "rw",
        broker="amqp://guest:rpw@10.0.0.5:5672//",
        broker_write_url="redis://:wpw@10.0.0.6:6379/2",
        set_as_current=False,
    )
    facts = _celery.app_facts(split)
    assert (facts.system, facts.broker) == ("redis", "redis://10.0.0.6:6379/2")
    assert (facts.server_address, facts.server_port) == ("10.0.0.6", 6379)


def test_the_row_and_span_know_the_app_and_broker(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """Against real Redis and PostgreSQL: ``app``/``broker`` on the row, ``server.*`` on the
    span; a task that is its own root carries no root or group id."""
    result = add.apply_async((1, 2), queue=queue_name)
    [row] = audit_rows(pg, result.id)
    assert (row["app"], row["broker"]) == ("ocp_tests", BROKER)
    assert row["periodic_task"] is None
    [span] = [
        s
        for s in publisher.exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.attributes.get("messaging.message.id") == result.id
    ]
    assert (span.attributes["server.address"], span.attributes["server.port"]) == (
        "127.0.0.1", 6379,
    )  # fmt: skip
    assert "celery.task.group_id" not in span.attributes
    assert "celery.task.root_id" not in span.attributes
    redis.Redis.from_url(BROKER).delete(queue_name)


def test_workflow_attributes() -> None:
    assert _celery.workflow_attributes("t", "t", None) == {}
    assert _celery.workflow_attributes("t", "r", "g") == {
        "messaging.message.conversation_id": "r",
        "celery.task.root_id": "r",
        "celery.task.group_id": "g",
    }


def test_django_beat_header_names_the_entry() -> None:
    assert _celery.periodic_task({"periodic_task_name": "nightly"}) == "nightly"
    assert _celery.periodic_task({"celery_beat_task": True}) is None  # not from beat's frame
    assert _celery.periodic_task({}) is None


def test_a_replay_records_who_asked(
    publisher: Publisher, pg: Any, pg_url: str, queue_name: str
) -> None:
    """``replayed_by`` is the caller's name (the admin passes ``django:<user>``), else this
    process's ``user@host``."""
    settings = migrated(pg_url)
    first = add.apply_async((1, 1), queue=queue_name).id
    second = add.apply_async((2, 2), queue=queue_name).id
    for task_id in (first, second):
        wait_row(pg, task_id, lambda found: found[0]["sent_at"] is not None)
    app = add.app
    for task_id, policy in (
        (first, audit.Policy()),
        (second, audit.Policy(replayed_by="django:alice")),
    ):
        report = audit.replay(app, [task_id], policy=policy, settings=settings)
        assert [r.status for r in report.results] == ["sent"], report
    [original] = audit_rows(pg, first)  # the replay is a new task id
    assert original["replayed_by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert audit_rows(pg, second)[0]["replayed_by"] == "django:alice"
    redis.Redis.from_url(BROKER).delete(queue_name)


def test_publish_row_carries_the_new_columns() -> None:
    facts = rows.PublishFacts(
        publish_id="p", task_id="t", task_name="n", body=((), {}, {}), headers={}, properties={},
        exchange="", routing_key="q", published_at=0.0, serializer="json", arg_names=(),
        exclude_headers=(), host="h", pid=1, trace_id=None, span_id=None,
        app="a", broker="redis://h:1/0", periodic_task="every-minute",
    )  # fmt: skip
    policy = rows.RowPolicy(frozenset(), False, 100, 1000)
    row = rows.publish_row(facts, policy)
    assert (row["app"], row["broker"], row["periodic_task"]) == (
        "a",
        "redis://h:1/0",
        "every-minute",
    )
    assert serialization.loads(row["payload"], row["content_type"], "utf-8") == [[], {}, {}]
