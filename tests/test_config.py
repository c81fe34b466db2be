"""Settings validation: every variable and keyword is checked once, at construction, with one
line naming it; valid values (and the defaults) still construct."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import MetaData

from otel_celery_publish import CeleryPublishInstrumentor
from otel_celery_publish.config import (
    DEFAULT_REDACT_KEYS,
    ENV_PREFIX,
    MAX_IDENTIFIER_BYTES,
    PASS_THROUGH_KEYWORDS,
    Settings,
    SettingsError,
    check_table_name,
    table_identifiers,
)
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import audit_table

FIELDS = [field.name for field in dataclasses.fields(Settings)]
LONGEST_TABLE = "t" * 43  # + "_alembic_version_pkc" = 63 bytes

BAD_ENV = [
    ("FLUSH_INTERVAL", "0", "from 0.01 to 3600"),
    ("FLUSH_INTERVAL", "0.001", "from 0.01 to 3600"),
    ("FLUSH_INTERVAL", "nan", "seconds"),
    ("FLUSH_INTERVAL", "inf", "seconds"),
    ("FLUSH_INTERVAL", "-1", "seconds"),
    ("FLUSH_INTERVAL", "1s", "seconds"),
    ("DB_TIMEOUT", "0", "from 0.05 to 3600"),
    ("DB_TIMEOUT", "inf", "from 0.05 to 3600"),
    ("DB_TIMEOUT", "1e400", "from 0.05 to 3600"),
    ("HEARTBEAT_INTERVAL", "0.05", "from 0.1 to 3600"),
    ("HEARTBEAT_INTERVAL", "-inf", "from 0.1 to 3600"),
    ("USE_LINKS", "maybe", "1/0, true/false, yes/no, on/off"),
    ("CREATE_SCHEMA", "2", "1/0, true/false, yes/no, on/off"),
    ("SPOOL_FSYNC", "enabled", "1/0, true/false, yes/no, on/off"),
    ("REDACT_PAYLOAD", "y", "1/0, true/false, yes/no, on/off"),
    ("MAX_PENDING", "-1", ">= 1"),
    ("MAX_PENDING", "0", ">= 1"),
    ("MAX_PENDING", "1e3", ">= 1"),
    ("MAX_PENDING", "10.5", ">= 1"),
    ("REPR_MAXSIZE", "0", ">= 1"),
    ("MAX_PAYLOAD_BYTES", "-1", ">= 0"),
    ("SPOOL_MAX_BYTES", "-5", ">= 1"),
    ("SPOOL_MAX_BYTES", str(2**63), ">= 1"),
    ("DURABILITY", "fast", "one of sync, spool, async"),
    ("AUDIT_URL", "not a url", "postgresql+psycopg"),
    ("AUDIT_URL", "mysql://user@db/audit", "postgresql+psycopg"),
    ("AUDIT_URL", "postgresql+asyncpg://user@db/audit", "postgresql+psycopg"),
    ("AUDIT_URL", "postgresql+psycopg2://user@db/audit", "postgresql+psycopg"),
    ("AUDIT_URL", "postgresql+nosuch://user@db/audit", "postgresql+psycopg"),
    ("AUDIT_URL", "postgresql+psycopg://user@db:port/audit", "postgresql+psycopg"),
    ("AUDIT_URL", "sqlite+aiosqlite:///a.db", "postgresql+psycopg"),
    ("SPOOL_DIR", "relative/spool", "absolute"),
    ("TRACE_URL", "http://jaeger/trace/{span_id}", "{trace_id}"),
    ("TRACE_URL", "http://jaeger/trace/{trace_id}/{0}", "{trace_id}"),
    ("TRACE_URL", "http://jaeger/trace/{trace_id!r}", "{trace_id}"),
    ("TRACE_URL", "http://jaeger/trace/{", "{trace_id}"),
    ("TRACE_URL", "http://jaeger/search", "{trace_id}"),
    ("REDACT_KEYS", " , ", "at least one"),
    ("REDACT_KEYS", "pass word", "no spaces"),
    ("TABLE_NAME", "1audit", "letters, digits and underscores"),
    ("TABLE_NAME", "audit-table", "letters, digits and underscores"),
    ("TABLE_NAME", 'audit"; drop', "letters, digits and underscores"),
    ("TABLE_NAME", "audit_tåble", "letters, digits and underscores"),
    ("TABLE_NAME", "sqlite_audit", "reserved by SQLite"),
    ("TABLE_NAME", LONGEST_TABLE + "t", "at most 43 characters"),
]


@pytest.mark.parametrize(("name", "value", "accepted"), BAD_ENV)
def test_bad_environment_value_is_one_line_naming_the_variable(
    name: str, value: str, accepted: str
) -> None:
    """A bad OTEL_CELERY_PUBLISH_* value raises SettingsError: one line, variable first."""
    variable = ENV_PREFIX + name
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith(f"{variable} must be "), message
    assert "\n" not in message and accepted in message, message
    assert caught.value.field == name.lower() and caught.value.source == variable


BAD_KWARGS = [
    ({"flush_interval": 0}, "keyword flush_interval", "from 0.01"),
    ({"flush_interval": float("nan")}, "keyword flush_interval", "from 0.01"),
    ({"db_timeout": 0.0}, "keyword db_timeout", "from 0.05"),
    ({"db_timeout": True}, "keyword db_timeout", "seconds"),
    ({"heartbeat_interval": float("inf")}, "keyword heartbeat_interval", "from 0.1"),
    ({"max_pending": -1}, "keyword max_pending", ">= 1"),
    ({"max_pending": 2.5}, "keyword max_pending", ">= 1"),
    ({"max_pending": True}, "keyword max_pending", ">= 1"),
    ({"use_links": "maybe"}, "keyword use_links", "true/false"),
    ({"use_links": 2}, "keyword use_links", "true/false"),
    ({"durability": "SPOOLED"}, "keyword durability", "sync, spool, async"),
    ({"redact_keys": []}, "keyword redact_keys", "at least one"),
    ({"redact_keys": ["ok", 3]}, "keyword redact_keys", "key names"),
    ({"spool_dir": "spool"}, "keyword spool_dir", "absolute"),
    ({"table_name": ""}, "keyword table_name", "letters, digits"),
    ({"audit_url": ""}, "keyword audit_url", "postgresql+psycopg"),
]


@pytest.mark.parametrize(("kwargs", "source", "accepted"), BAD_KWARGS)
def test_bad_keyword_is_one_line_naming_the_keyword(
    kwargs: dict[str, Any], source: str, accepted: str
) -> None:
    """A bad keyword value raises SettingsError: one line naming the keyword."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({}, **kwargs)
    message = str(caught.value)
    assert message.startswith(source + " "), message
    assert "\n" not in message and accepted in message, message


UNKNOWN_KWARGS = [
    ({"flush_intervall": 1}, "keyword flush_intervall (did you mean 'flush_interval'?) is not"),
    ({"colour": object()}, "keyword colour is not a setting; valid: audit_url,"),
    (
        {"colour": 1, "flush_intervall": 1},
        "keywords colour, flush_intervall (did you mean 'flush_interval'?) are not settings",
    ),
]


@pytest.mark.parametrize(("kwargs", "start"), UNKNOWN_KWARGS)
def test_unknown_keywords_raise_type_error_naming_them(kwargs: dict[str, Any], start: str) -> None:
    """A keyword that is no setting raises TypeError, one line naming every such keyword with a
    "did you mean" hint when one is close, from from_env() and resolve() alike."""
    for build in (Settings.from_env, Settings.resolve):
        with pytest.raises(TypeError) as caught:
            build(**kwargs)
        message = str(caught.value)
        assert message.startswith(start), message
        assert "\n" not in message and "valid: audit_url," in message, message
        assert not isinstance(caught.value, SettingsError)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_validated(name: str) -> None:
    """Every field has a rule: a value of no sensible type is refused, by keyword and directly."""
    with pytest.raises(SettingsError, match=f"^keyword {name} must be "):
        Settings.from_env({}, **{name: object()})
    with pytest.raises(SettingsError, match=f"^keyword {name} must be "):
        Settings(**{name: object()})


def test_audit_url_errors_never_show_the_password() -> None:
    """A refused URL is shown with its password hidden, an unparseable one not at all."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"OTEL_CELERY_PUBLISH_AUDIT_URL": "mysql://u:s3cret@db/audit"})
    assert "s3cret" not in str(caught.value) and "mysql://u:***@db/audit" in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"OTEL_CELERY_PUBLISH_AUDIT_URL": "u:s3cret@db:port"})
    assert "s3cret" not in str(caught.value)


def test_instrument_refuses_bad_settings_before_connecting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """instrument() raises the TypeError (unknown keyword) or SettingsError (keyword or
    variable named) and stays off."""
    instrumentor = CeleryPublishInstrumentor()
    assert not instrumentor.is_instrumented_by_opentelemetry
    with pytest.raises(TypeError, match=r"^keyword flush_intervall \(did you mean 'flush_int"):
        instrumentor.instrument(flush_intervall=0.05)
    with pytest.raises(TypeError, match=r"^keyword settings must be a Settings; got 'async'"):
        instrumentor.instrument(settings="async")
    with pytest.raises(SettingsError, match=r"^keyword db_timeout must be"):
        instrumentor.instrument(db_timeout=0)
    with pytest.raises(SettingsError, match=r"^keyword db_timeout must be"):
        instrumentor.instrument(settings=Settings(), db_timeout=0)
    monkeypatch.setenv("OTEL_CELERY_PUBLISH_FLUSH_INTERVAL", "0")
    with pytest.raises(SettingsError, match=r"^OTEL_CELERY_PUBLISH_FLUSH_INTERVAL must be"):
        instrumentor.instrument()
    assert not instrumentor.is_instrumented_by_opentelemetry


def test_instrument_takes_settings_and_keywords_override_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """instrument(settings=...) runs with those settings, the environment unread; a field
    keyword given with it overrides it, a provider keyword is passed through."""
    monkeypatch.setenv(ENV_PREFIX + "TABLE_NAME", "from_the_environment")
    base = Settings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}", spool_dir=str(tmp_path))
    instrumentor = CeleryPublishInstrumentor()
    provider = TracerProvider()
    instrumentor.instrument(settings=base, durability="async", tracer_provider=provider)
    try:
        used = instrumentor.writer.settings
    finally:
        instrumentor.uninstrument()
    assert used == dataclasses.replace(base, durability="async")
    assert used.table_name == "celery_publish_audit" and instrumentor._tracer_provider is provider


def test_resolve_is_from_env_without_settings_and_replace_with_them() -> None:
    """Settings.resolve(): the environment with keyword overrides, or the given settings with
    non-None keyword overrides, validated like any keyword."""
    env = {ENV_PREFIX + "DURABILITY": "spool"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("os.environ", env)
        assert Settings.resolve(max_pending=5) == Settings.from_env(env, max_pending=5)
    base = Settings(max_pending=3)
    assert Settings.resolve(base) == base
    assert Settings.resolve(base, max_pending=None, tracer_provider=object()) == base
    assert Settings.resolve(base, max_pending="7").max_pending == 7
    with pytest.raises(SettingsError, match=r"^keyword max_pending must be"):
        Settings.resolve(base, max_pending=0)


# -- valid values ---------------------------------------------------------------------------


def test_defaults_construct() -> None:
    """Settings() and from_env() of an empty environment give the documented defaults."""
    defaults = Settings()
    assert Settings.from_env({}, spool_dir=defaults.spool_dir) == defaults
    assert (defaults.audit_url, defaults.durability, defaults.table_name) == (
        "sqlite:///celery_audit.db",
        "sync",
        "celery_publish_audit",
    )
    assert (defaults.flush_interval, defaults.db_timeout, defaults.heartbeat_interval) == (
        1.0,
        2.0,
        30.0,
    )
    assert defaults.redact_keys == DEFAULT_REDACT_KEYS and defaults.trace_url == ""


GOOD_ENV = [
    ("FLUSH_INTERVAL", "0.01", 0.01),
    ("FLUSH_INTERVAL", " 3600 ", 3600.0),
    ("DB_TIMEOUT", "0.05", 0.05),
    ("HEARTBEAT_INTERVAL", "0.1", 0.1),
    ("HEARTBEAT_INTERVAL", "30", 30.0),
    ("MAX_PENDING", "1", 1),
    ("MAX_PAYLOAD_BYTES", "0", 0),
    ("SPOOL_MAX_BYTES", "300", 300),
    ("USE_LINKS", "ON", True),
    ("USE_LINKS", "off", False),
    ("SPOOL_FSYNC", "yes", True),
    ("CREATE_SCHEMA", "0", False),
    ("REDACT_PAYLOAD", "TRUE", True),
    ("DURABILITY", " Spool ", "spool"),
    ("AUDIT_URL", "postgresql://u:pw@db/audit", "postgresql://u:pw@db/audit"),
    ("AUDIT_URL", "postgresql+psycopg://u@db:5433/a", "postgresql+psycopg://u@db:5433/a"),
    ("AUDIT_URL", "sqlite://", "sqlite://"),
    ("AUDIT_URL", "sqlite+pysqlite:///rel/a.db", "sqlite+pysqlite:///rel/a.db"),
    ("SPOOL_DIR", "/var/spool/ocp", "/var/spool/ocp"),
    ("TRACE_URL", "http://j:16686/trace/{trace_id}", "http://j:16686/trace/{trace_id}"),
    ("TRACE_URL", "http://t/{{x}}/{trace_id}", "http://t/{{x}}/{trace_id}"),
    ("REDACT_KEYS", "SSN, x-api-key,", frozenset({"ssn", "x-api-key"})),
    ("TABLE_NAME", "_Audit2", "_Audit2"),
    ("TABLE_NAME", LONGEST_TABLE, LONGEST_TABLE),
]


@pytest.mark.parametrize(("name", "value", "expected"), GOOD_ENV)
def test_valid_environment_values_parse(name: str, value: str, expected: Any) -> None:
    """Valid values, the bounds included, parse to their typed value."""
    settings = Settings.from_env({ENV_PREFIX + name: value})
    assert getattr(settings, name.lower()) == expected


def test_empty_variables_count_as_unset_and_kwargs_win() -> None:
    """An empty variable keeps the default; a keyword beats the variable; None is no keyword."""
    env = {ENV_PREFIX + "FLUSH_INTERVAL": "", ENV_PREFIX + "REDACT_KEYS": "  "}
    assert Settings.from_env(env).flush_interval == 1.0
    assert Settings.from_env(env).redact_keys == DEFAULT_REDACT_KEYS
    bad_env = {ENV_PREFIX + "DB_TIMEOUT": "0"}
    assert Settings.from_env(bad_env, db_timeout=0.5).db_timeout == 0.5
    assert Settings.from_env({}, db_timeout=None).db_timeout == 2.0


def test_keywords_take_typed_values_and_pass_through_the_providers() -> None:
    """Keywords may be typed (bools, ints, lists); provider keywords are accepted, not stored."""
    settings = Settings.from_env(
        {},
        use_links=True,
        flush_interval=2,
        max_pending=7,
        redact_keys=("Card",),
        **dict.fromkeys(PASS_THROUGH_KEYWORDS, object()),
    )
    assert settings.use_links is True and settings.flush_interval == 2.0
    assert settings.max_pending == 7 and settings.redact_keys == frozenset({"card"})
    direct = Settings(redact_keys=["A"], flush_interval=2)  # type: ignore[arg-type]
    assert direct.redact_keys == frozenset({"a"}) and isinstance(direct.flush_interval, float)


# -- table names ----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_table_identifiers_cover_the_migrations(dialect: str) -> None:
    """Every identifier the migrations create (tables, indexes, constraints) is a checked one."""
    name = "Tq7x"
    ddl = migrate.upgrade_sql(dialect, name)
    created = set(re.findall(rf"\b\w*{name}\w*", ddl))
    assert created and created <= set(table_identifiers(name)), created
    assert migrate.version_table(name) in created
    indexes = {index.name for index in audit_table(name, MetaData()).indexes}
    assert indexes <= set(table_identifiers(name))


def test_longest_table_name_fits_postgresql() -> None:
    """The longest accepted name keeps every derived identifier within 63 bytes."""
    assert max(len(n.encode()) for n in table_identifiers(LONGEST_TABLE)) == MAX_IDENTIFIER_BYTES
    assert check_table_name(LONGEST_TABLE) == LONGEST_TABLE
    with pytest.raises(SettingsError, match=r"^TABLE_NAME must be at most 43 characters"):
        check_table_name(LONGEST_TABLE + "x", "TABLE_NAME")
