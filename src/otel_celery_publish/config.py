"""Settings: every knob in one frozen dataclass, read from ``OTEL_CELERY_PUBLISH_*`` or kwargs.

Every value is checked once, when the settings are built (``instrument()``, ``Settings.from_env``,
``Settings(...)``, the ``audit`` commands): a bad one raises :class:`SettingsError`, one line
naming the variable (``OTEL_CELERY_PUBLISH_<NAME>``) or the keyword and what it accepts; a
keyword that is no setting raises :class:`TypeError` naming it (with a "did you mean" hint), as
Python does for any unexpected keyword. Nothing is checked on the publish path.

Where a value comes from, first found wins: an ``instrument()`` keyword, then the variable
``OTEL_CELERY_PUBLISH_<NAME>``, then Django's settings (when the Django app
``otel_celery_publish.contrib.django`` is installed, see :mod:`.contrib.django._layer`), then the
default. Django is consulted only in a process that already configured it: this module never
imports Django nor makes it load its settings (``instrument()`` under ``opentelemetry-instrument``
runs before a project's settings exist; the Django app re-resolves at ``django.setup()``, see
:meth:`Settings.refreshed`).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import re
import string
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

Durability = Literal["sync", "spool", "async"]
DURABILITIES: tuple[str, ...] = ("sync", "spool", "async")

ENV_PREFIX = "OTEL_CELERY_PUBLISH_"
# Matched as substrings of a normalised name (:func:`~otel_celery_publish.redaction.is_sensitive`):
# ``token`` covers ``access_token``, ``card_number`` covers ``credit_card_number``.
DEFAULT_REDACT_KEYS = frozenset(
    {
        "password", "passwd", "passphrase", "secret", "token", "api_key", "apikey",
        "authorization", "cookie", "session_id", "private_key", "credit_card", "card_number",
        "cardnumber", "cvv", "cvc", "pan", "ssn", "social_security", "iban", "account_number",
        "routing_number", "pin",
    }
)  # fmt: skip
# Keywords ``instrument()`` hands to ``from_env`` that are not settings: the providers (used by
# the instrumentor; a distro may pass the logger/event ones to every instrumentor) and
# BaseInstrumentor's own switches, should a caller reach ``_instrument`` without it popping them.
PASS_THROUGH_KEYWORDS: tuple[str, ...] = (
    "tracer_provider",
    "meter_provider",
    "logger_provider",
    "event_logger_provider",
    "skip_dep_check",
    "raise_exception_on_conflict",
)
# PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes): two tables would then share
# an index or version-table name.
MAX_IDENTIFIER_BYTES = 63
TABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_SECONDS = 3600.0
MAX_COUNT = 2**63 - 1
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
# The drivers the writer speaks: psycopg 3 (COPY, prepared statements) and the stdlib sqlite3.
DRIVERS = {"postgresql": frozenset({"psycopg"}), "sqlite": frozenset({"pysqlite"})}


class SettingsError(ValueError):
    """An invalid setting, said in one line: ``"<source> <problem>"``.

    ``field`` is the Settings field, ``source`` the variable or keyword the value came from
    (``OTEL_CELERY_PUBLISH_DB_TIMEOUT``, ``keyword db_timeout``), ``problem`` what is wrong with
    it (``must be ...; got ...``), so a caller such as the CLI can name its own option instead.
    """

    def __init__(self, source: str, problem: str, *, field: str) -> None:
        super().__init__(f"{source} {problem}")
        self.source = source
        self.problem = problem
        self.field = field


def default_spool_dir() -> str:
    """``$XDG_STATE_HOME/otel-celery-publish/spool`` (``~/.local/state/...``), else the temp dir.

    Per user and persistent across reboots: a spool exists to outlive a crash.
    """
    home = os.path.expanduser("~")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    if os.path.isabs(state) and os.access(home, os.W_OK):
        return os.path.join(state, "otel-celery-publish", "spool")
    return os.path.join(tempfile.gettempdir(), f"otel-celery-publish-{os.getuid()}", "spool")


def table_identifiers(table_name: str) -> tuple[str, ...]:
    """Every database identifier derived from the audit table's name: its indexes (schema.py),
    the COPY staging table (writer.py), the Alembic version table (migrate.version_table) and
    the primary key Alembic names after it, the workers' heartbeat table, and the primary keys
    PostgreSQL names itself. Kept here because config must not import the audit package (which
    imports config); a test checks them against the migrations' DDL."""
    return (
        table_name,
        f"{table_name}_pkey",
        f"ix_{table_name}_published_at",
        f"ix_{table_name}_task_id",
        f"ix_{table_name}_unfinished",
        f"ix_{table_name}_replay_of",
        f"ix_{table_name}_group_id",
        f"ix_{table_name}_root_id",
        f"{table_name}_stage",
        f"{table_name}_alembic_version",
        f"{table_name}_alembic_version_pkc",
        f"{table_name}_workers",
        f"{table_name}_workers_pkey",
    )


def check_table_name(name: str, source: str = "keyword table_name") -> str:
    """``name`` if it can name the audit table, else :class:`SettingsError` naming ``source``
    (for callers that take a table name without a Settings, such as the migrations)."""
    problem = _table_problem(name)
    if problem:
        raise SettingsError(source, f"must be {problem}; got {_shown(name)}", field="table_name")
    return name


def _table_problem(name: Any) -> str | None:
    """What a valid table name is, if ``name`` is not one."""
    if not isinstance(name, str) or not TABLE_NAME_RE.fullmatch(name):
        return "a table name of ASCII letters, digits and underscores, not starting with a digit"
    if name.lower().startswith("sqlite_"):
        return "a table name not starting with 'sqlite_' (reserved by SQLite)"
    longest = max(table_identifiers(name), key=len)
    if len(longest) > MAX_IDENTIFIER_BYTES:
        limit = MAX_IDENTIFIER_BYTES - (len(longest) - len(name))
        return (
            f"at most {limit} characters long (the derived name {longest!r} must fit "
            f"PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte identifier limit)"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved configuration: field ``x`` is env var ``OTEL_CELERY_PUBLISH_X`` and kwarg ``x``.

    Every field is validated on construction (see :class:`SettingsError`).
    """

    audit_url: str = "sqlite:///celery_audit.db"
    durability: Durability = "sync"
    use_links: bool = False
    #: ``OTEL_CELERY_PUBLISH_QUEUE_WAIT_CHILDREN``: also export ``broker wait`` / ``worker wait``
    #: spans under each ``queue wait`` span (two more spans per task). Off by default: the
    #: queue-wait span carries the split as attributes and a ``received`` event.
    queue_wait_children: bool = False
    redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS
    redact_payload: bool = False
    create_schema: bool = True
    table_name: str = "celery_publish_audit"
    flush_interval: float = 1.0
    max_pending: int = 10_000
    repr_maxsize: int = 4096
    max_payload_bytes: int = 1_048_576
    spool_dir: str = dataclasses.field(default_factory=default_spool_dir)
    spool_fsync: bool = False
    spool_max_bytes: int = 1_073_741_824
    db_timeout: float = 2.0
    heartbeat_interval: float = 30.0
    trace_url: str = ""
    #: ``audit watch``: which lost tasks it replays by itself (:class:`AutoreplayRule`); none
    #: by default: nothing is replayed automatically unless configured.
    autoreplay: tuple[AutoreplayRule, ...] = ()
    autoreplay_min_age: float = 600.0
    autoreplay_max: int = 3
    autoreplay_rate: float = 10.0

    # How from_env built these settings, when it read no Django settings for want of a
    # configured Django: (the environment given, or None for os.environ; its keywords), so that
    # refreshed() can resolve them again once Django is set up. Not a field: no part of the
    # value, its equality or its repr; absent from settings built any other way.
    _unlayered: ClassVar[tuple[Mapping[str, str] | None, dict[str, Any]] | None] = None

    def __post_init__(self) -> None:
        # Normalises too (a list of redact keys becomes a frozenset, "2" seconds 2.0), so a
        # Settings built directly holds the same types as one from from_env.
        for field in dataclasses.fields(self):
            value = _parse(field.name, getattr(self, field.name), f"keyword {field.name}")
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from non-None ``overrides`` (instrument() kwargs), then the environment, then
        Django's settings (see the module docstring), then the defaults.

        An empty variable counts as unset. Keywords other than the fields and
        :data:`PASS_THROUGH_KEYWORDS` raise :class:`TypeError` naming them, so a misspelt one
        is not silently ignored.
        """
        source = os.environ if environ is None else environ
        _refuse_unknown(overrides)
        django = _django_layer()
        values: dict[str, Any] = {}
        for name in _FIELDS:
            if overrides.get(name) is not None:
                values[name] = _parse(name, overrides[name], f"keyword {name}")
                continue
            variable = ENV_PREFIX + name.upper()
            raw = source.get(variable)
            if raw is not None and raw.strip():
                values[name] = _parse(name, raw, variable)
            elif django is not None and (found := django.value(name)) is not None:
                values[name] = _parse(name, *found)
        settings = cls(**values)
        if django is None:
            keywords = {k: v for k, v in overrides.items() if k in _FIELDS and v is not None}
            object.__setattr__(settings, "_unlayered", (environ, keywords))
        return settings

    def refreshed(self) -> Settings:
        """These settings resolved again, now, if :meth:`from_env` built them while Django was
        not configured (so without Django's settings); else these settings themselves.

        ``instrument()`` under ``opentelemetry-instrument`` runs before a Django project's
        settings exist: the Django app calls this at ``django.setup()`` and re-instruments
        with the result when it differs. The keywords keep their precedence.
        """
        if self._unlayered is None:
            return self
        environ, keywords = self._unlayered
        return type(self).from_env(environ, **keywords)

    @classmethod
    def resolve(cls, settings: Settings | None = None, **overrides: Any) -> Settings:
        """What ``instrument(**kwargs)`` runs with.

        Without ``settings``: :meth:`from_env` (non-None keywords, then the environment, then
        Django's settings). With ``settings``: those settings, neither the environment nor
        Django read (a Settings is complete: its defaults are values too, so nothing in it
        could tell the environment where to apply), and non-None keywords override them as in
        :func:`dataclasses.replace`, so ``instrument(settings=base, durability="async")`` is
        ``base`` in async mode. Unknown keywords raise :class:`TypeError` naming them; a bad
        value :class:`SettingsError`.
        """
        if settings is None:
            return cls.from_env(**overrides)
        if not isinstance(settings, Settings):
            raise TypeError(f"keyword settings must be a Settings; got {_shown(settings)}")
        _refuse_unknown(overrides, also=("settings",))
        return dataclasses.replace(
            settings,
            **{name: overrides[name] for name in _FIELDS if overrides.get(name) is not None},
        )


_FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Settings))


def _refuse_unknown(keywords: Mapping[str, Any], also: tuple[str, ...] = ()) -> None:
    """TypeError naming every keyword that is neither a field nor passed through, each with a
    "did you mean" hint when one is close."""
    valid = [*_FIELDS, *PASS_THROUGH_KEYWORDS, *also]
    unknown = sorted(set(keywords) - set(valid))
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        named.append(f"{name} (did you mean {close[0]!r}?)" if close else name)
    subject = "keyword {} is not a setting" if len(unknown) == 1 else "keywords {} are not settings"
    raise TypeError(f"{subject.format(', '.join(named))}; valid: {', '.join(valid)}")


def _django_layer() -> Any:
    """Django's settings as a layer (:class:`~.contrib.django._layer.DjangoLayer`), or None.
    Looked at only where ``django.conf`` is already imported: nothing else loads Django."""
    if "django.conf" not in sys.modules:
        return None
    from otel_celery_publish.contrib.django._layer import DjangoLayer  # noqa: PLC0415

    return DjangoLayer.current()


# -- parsers: raw value (a string from the environment, or a kwarg) -> typed value ------------


class _Invalid(Exception):
    """Raised by a parser; the rule's ``accepted`` text (or this message) says what is valid."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    accepted: str
    parse: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class AutoreplayRule:
    """One rule of ``AUTOREPLAY``: lost tasks whose name matches ``pattern`` (a glob) and whose
    lost reason is in ``reasons`` (None: any reason) are replayed by ``audit watch``, to
    ``queue`` when given (else to where they were first routed).

    Written ``<glob>:<reason>,<reason>[@<queue>]`` or ``<glob>:all[@<queue>]``; rules are
    separated by ``;`` and tried in order (the first that allows a task decides its queue and
    is recorded on the row as ``replayed_by = "watchdog:<rule>"``).
    """

    pattern: str
    reasons: frozenset[str] | None = None
    queue: str | None = None

    def allows(self, task_name: str, reason: str) -> bool:
        return fnmatch.fnmatchcase(task_name, self.pattern) and (
            self.reasons is None or reason in self.reasons
        )

    def __str__(self) -> str:
        reasons = "all" if self.reasons is None else ",".join(sorted(self.reasons))
        return f"{self.pattern}:{reasons}" + (f"@{self.queue}" if self.queue else "")


def _parse(name: str, raw: Any, source: str) -> Any:
    rule = _RULES[name]
    try:
        return rule.parse(raw)
    except _Invalid as exc:
        accepted = str(exc) or rule.accepted
        shown = _shown_url(raw) if name == "audit_url" else _shown(raw)
        raise SettingsError(source, f"must be {accepted}; got {shown}", field=name) from None


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def _shown_url(raw: Any) -> str:
    """The URL with its password hidden; not at all when it does not parse (it might hold one
    where the parser did not expect it)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - only on the error path
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    if not isinstance(raw, str):
        return _shown(raw)
    try:
        return _shown(make_url(raw.strip()).render_as_string(hide_password=True))
    except (SQLAlchemyError, ValueError):
        return "a value that is not a URL"


def _seconds(low: float, high: float = MAX_SECONDS) -> _Rule:
    def parse(raw: Any) -> float:
        if isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _Invalid from None
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        else:
            raise _Invalid
        if not (math.isfinite(value) and low <= value <= high):
            raise _Invalid
        return value

    return _Rule(f"a number of seconds from {low:g} to {high:g}", parse)


def _count(low: int, high: int = MAX_COUNT) -> _Rule:
    def parse(raw: Any) -> int:
        if isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                raise _Invalid from None
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            raise _Invalid
        if not low <= value <= high:
            raise _Invalid
        return value

    accepted = (
        f"a whole number from {low} to {high}" if high < MAX_COUNT else f"a whole number >= {low}"
    )
    return _Rule(accepted, parse)


def _flag(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise _Invalid


def _durability(raw: Any) -> str:
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text not in DURABILITIES:
        raise _Invalid
    return text


def _audit_url(raw: Any) -> str:
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - only when a URL is checked
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    if not isinstance(raw, str) or "\x00" in raw:
        raise _Invalid
    try:
        url = make_url(raw.strip())
        backend = url.get_backend_name()
        # Loads the dialect for a bare "postgresql://" (its default driver), never the DBAPI.
        driver = url.get_driver_name() if backend in DRIVERS else ""
    except (SQLAlchemyError, ValueError):  # unparseable, bad port, unknown driver plugin
        raise _Invalid from None
    if driver not in DRIVERS.get(backend, ()):
        raise _Invalid
    return raw.strip()


def _table_name(raw: Any) -> str:
    problem = _table_problem(raw)
    if problem:
        raise _Invalid(problem)
    return str(raw)


def _spool_dir(raw: Any) -> str:
    try:
        path = os.fspath(raw)
    except TypeError:
        raise _Invalid from None
    if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path.strip()):
        raise _Invalid
    return path.strip()


def _trace_url(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Invalid
    text = raw.strip()
    if not text:
        return ""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:  # an unmatched brace
        raise _Invalid from None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if {name for name, _, _ in fields} != {"trace_id"} or any(s or c for _, s, c in fields):
        raise _Invalid
    return text


_KEY_RE = re.compile(r"[^\s,]+")


def _redact_keys(raw: Any) -> frozenset[str]:
    if isinstance(raw, str):
        items: Iterable[Any] = raw.split(",")
    elif isinstance(raw, Iterable):
        items = list(raw)
        if not all(isinstance(k, str) for k in items):
            raise _Invalid
    else:
        raise _Invalid
    keys = frozenset(k.strip().lower() for k in items if k.strip())
    if not keys or not all(_KEY_RE.fullmatch(k) for k in keys):
        raise _Invalid
    return keys


_AUTOREPLAY_ACCEPTED = (
    "';'-separated rules <task glob>:<reasons>[@<queue>], reasons a ','-separated list of lost "
    "reasons or 'all', e.g. 'billing.*:not_received,not_sent@billing-retry;reports.*:all'"
)
_NAME_RE = re.compile(r"[^\s;:@,]{1,255}")  # a glob, a queue: printable, no separator
_REASON_RE = re.compile(r"[a-z_]+")


def _autoreplay(raw: Any) -> tuple[AutoreplayRule, ...]:
    if isinstance(raw, (tuple, list)) and all(isinstance(r, AutoreplayRule) for r in raw):
        rules = tuple(raw)
        texts = [str(rule) for rule in rules]
    elif isinstance(raw, str):
        texts = [part.strip() for part in raw.split(";") if part.strip()]
        rules = tuple(_autoreplay_rule(text) for text in texts)
    else:
        raise _Invalid
    for rule in rules:
        _autoreplay_rule(str(rule))  # a rule built in code is held to the same grammar
    return rules


def _autoreplay_rule(text: str) -> AutoreplayRule:
    """``billing.*:not_received,not_sent@billing-retry`` (see :class:`AutoreplayRule`)."""
    from otel_celery_publish.schema.table import LOST_REASONS  # noqa: PLC0415 - when set

    head, at, queue = text.partition("@")
    pattern, colon, listed = (part.strip() for part in head.partition(":"))
    reasons = [r.strip() for r in listed.split(",")]
    queue = queue.strip()
    if not colon or not _NAME_RE.fullmatch(pattern) or (at and not _NAME_RE.fullmatch(queue)):
        raise _Invalid(f"{_AUTOREPLAY_ACCEPTED} (in rule {text!r})")
    if reasons == ["all"]:
        return AutoreplayRule(pattern, None, queue or None)
    unknown = [r for r in reasons if not _REASON_RE.fullmatch(r) or r not in LOST_REASONS]
    if unknown:
        raise _Invalid(
            f"lost reasons from {', '.join(LOST_REASONS)} or 'all' (in rule {text!r}: "
            f"{', '.join(map(repr, unknown))})"
        )
    return AutoreplayRule(pattern, frozenset(reasons), queue or None)


def _rate(low: float, high: float) -> _Rule:
    seconds = _seconds(low, high)
    return _Rule(f"a number per second from {low:g} to {high:g}", seconds.parse)


_RULES: dict[str, _Rule] = {
    "audit_url": _Rule(
        "a SQLAlchemy URL postgresql+psycopg://user@host/db or sqlite:///path", _audit_url
    ),
    "durability": _Rule("one of sync, spool, async", _durability),
    "use_links": _Rule("a boolean: 1/0, true/false, yes/no, on/off", _flag),
    "queue_wait_children": _Rule("a boolean: 1/0, true/false, yes/no, on/off", _flag),
    "redact_keys": _Rule(
        "comma-separated key names (at least one, no spaces inside a name)", _redact_keys
    ),
    "redact_payload": _Rule("a boolean: 1/0, true/false, yes/no, on/off", _flag),
    "create_schema": _Rule("a boolean: 1/0, true/false, yes/no, on/off", _flag),
    "table_name": _Rule("a table name", _table_name),
    "flush_interval": _seconds(0.01),
    "max_pending": _count(1),
    "repr_maxsize": _count(1),
    "max_payload_bytes": _count(0),
    "spool_dir": _Rule("an absolute directory path", _spool_dir),
    "spool_fsync": _Rule("a boolean: 1/0, true/false, yes/no, on/off", _flag),
    "spool_max_bytes": _count(1),
    "db_timeout": _seconds(0.05),
    "heartbeat_interval": _seconds(0.1),
    "trace_url": _Rule(
        "empty or a URL template whose only field is {trace_id}, e.g. "
        "http://jaeger:16686/trace/{trace_id}",
        _trace_url,
    ),
    "autoreplay": _Rule(_AUTOREPLAY_ACCEPTED, _autoreplay),
    "autoreplay_min_age": _seconds(0, 7 * 86400),
    "autoreplay_max": _count(1, 1000),
    "autoreplay_rate": _rate(0.001, 100_000),
}
