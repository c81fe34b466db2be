"""Django's settings as the layer of :meth:`~otel_celery_publish.config.Settings.from_env`
under the environment: ``OTEL_CELERY_PUBLISH[<NAME>]`` for each setting, and the audit URL
derived from the ``DATABASES`` entry ``OTEL_CELERY_PUBLISH["DATABASE"]`` names.

Imports nothing of Django: config looks here only in a process that already imported
``django.conf``, and reads settings only once they are configured (a project's settings may
import the Celery app, which may instrument).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from typing import Any

from otel_celery_publish.config import (
    _FIELDS,
    ENV_PREFIX,
    SettingsError,
    _shown,
)

#: The Django app whose presence in ``INSTALLED_APPS`` makes Django's settings count.
DJANGO_APP = "otel_celery_publish.contrib.django"
#: The Django setting holding ours: ``{"DURABILITY": "spool", "DATABASE": "default", ...}``.
DJANGO_SETTING = "OTEL_CELERY_PUBLISH"
#: Its key naming the ``DATABASES`` alias that holds the audit table (default ``"default"``).
DJANGO_DATABASE = "DATABASE"
DEFAULT_DATABASE_ALIAS = "default"
# The last part of a Django ENGINE (django.db.backends.postgresql, ...contrib.gis...postgis, a
# wrapper such as django_prometheus.db.backends.postgresql) -> the audit database kind.
_DJANGO_ENGINES = {
    "postgresql": "postgresql",
    "postgis": "postgresql",
    "postgresql_psycopg2": "postgresql",
    "sqlite3": "sqlite",
    "spatialite": "sqlite",
}
# Django's PostgreSQL OPTIONS that mean the same to our psycopg connection (libpq parameters);
# the others (pool, isolation_level, server_side_binding, assume_role...) are Django's own.
_LIBPQ_OPTIONS = (
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "application_name", "options",
    "target_session_attrs", "passfile", "service", "channel_binding", "gssencmode",
)  # fmt: skip


class DjangoLayer:
    """The values Django's settings give: ``OTEL_CELERY_PUBLISH[<NAME>]`` for each field, and
    for ``audit_url`` the database ``OTEL_CELERY_PUBLISH["DATABASE"]`` names in ``DATABASES``.

    Only in a process where ``django.conf`` is imported, its settings are configured and our
    app is installed: nothing here imports Django or makes it read a settings module (a
    project's settings may import the Celery app, which may instrument).
    """

    def __init__(self, settings: Any, ours: Mapping[str, Any]) -> None:
        self._settings = settings
        self._ours = ours

    @classmethod
    def current(cls) -> DjangoLayer | None:
        conf = sys.modules.get("django.conf")
        settings = getattr(conf, "settings", None)
        if settings is None or not settings.configured:
            return None
        if not any(_is_our_app(entry) for entry in getattr(settings, "INSTALLED_APPS", ())):
            return None
        ours = getattr(settings, DJANGO_SETTING, None)
        if ours is None:
            ours = {}
        if not isinstance(ours, Mapping):
            raise SettingsError(
                f"Django setting {DJANGO_SETTING}",
                f"must be a dict; got {_shown(ours)}",
                field="",
            )
        known = [name.upper() for name in _FIELDS] + [DJANGO_DATABASE]
        for key in ours:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SettingsError(
                    f"Django setting {DJANGO_SETTING}[{key!r}]",
                    f"is not a setting{hint}; valid: {', '.join(known)}",
                    field=str(key).lower(),
                )
        return cls(settings, ours)

    def value(self, name: str) -> tuple[Any, str] | None:
        """``(raw value, where it is)`` for field ``name``, or None when Django has none."""
        key = name.upper()
        if key in self._ours and self._ours[key] is not None:
            return self._ours[key], f"Django setting {DJANGO_SETTING}[{key!r}]"
        if name == "audit_url":
            alias = self.database_alias()
            databases = getattr(self._settings, "DATABASES", {}) or {}
            source = f"Django setting DATABASES[{alias!r}]"
            return django_database_url(databases[alias], alias), source
        return None

    def database_alias(self) -> str:
        alias = self._ours.get(DJANGO_DATABASE) or DEFAULT_DATABASE_ALIAS
        databases = getattr(self._settings, "DATABASES", {}) or {}
        if alias not in databases:
            raise SettingsError(
                f"Django setting {DJANGO_SETTING}[{DJANGO_DATABASE!r}]",
                f"must name a database in DATABASES ({', '.join(map(str, databases)) or 'none'}); "
                f"got {_shown(alias)}",
                field="audit_url",
            )
        return str(alias)


def _is_our_app(entry: Any) -> bool:
    """``INSTALLED_APPS`` names our app by its module or by its AppConfig's dotted path."""
    return isinstance(entry, str) and (entry == DJANGO_APP or entry.startswith(DJANGO_APP + "."))


def django_configured() -> bool:
    """True when Django's settings are part of :meth:`Settings.from_env` in this process."""
    return DjangoLayer.current() is not None


def django_database_alias() -> str:
    """The ``DATABASES`` alias of the audit table (``OTEL_CELERY_PUBLISH["DATABASE"]``);
    ``"default"`` when Django is not configured with our app."""
    django = DjangoLayer.current()
    return DEFAULT_DATABASE_ALIAS if django is None else django.database_alias()


def django_database_url(database: Mapping[str, Any], alias: str = DEFAULT_DATABASE_ALIAS) -> str:
    """The SQLAlchemy URL of a Django ``DATABASES`` entry: ``postgresql+psycopg://user:pass@
    host:port/name`` (a HOST that is a directory becomes the socket's ``?host=``; the libpq
    OPTIONS ride along as query parameters) or ``sqlite:///path``. Another engine, or an
    in-memory SQLite database (which our own connections could not share: Django's SQLite
    test database is one), raises :class:`SettingsError` naming the entry."""
    from sqlalchemy.engine import URL  # noqa: PLC0415 - only with Django configured

    source = f"Django setting DATABASES[{alias!r}]"
    instead = f"; or set {ENV_PREFIX}AUDIT_URL or {DJANGO_SETTING}['AUDIT_URL']"
    engine = str(database.get("ENGINE") or "")
    kind = _DJANGO_ENGINES.get(engine.rsplit(".", 1)[-1])
    name = database.get("NAME")
    if kind == "sqlite":
        path = os.fspath(name) if name else ""
        if not path or path == ":memory:" or "mode=memory" in path:
            problem = f"must be an SQLite file, not in memory{instead}; got NAME {path!r}"
            raise SettingsError(source, problem, field="audit_url")
        return f"sqlite:///{path}"
    port = str(database.get("PORT") or "")
    if kind != "postgresql" or (port and not port.isdigit()):
        problem = f"must be a PostgreSQL or SQLite database{instead}; got ENGINE {engine!r}"
        if kind == "postgresql":
            problem = f"must have a numeric PORT; got {port!r}"
        raise SettingsError(source, problem, field="audit_url")
    options = database.get("OPTIONS") or {}
    query = {k: str(options[k]) for k in _LIBPQ_OPTIONS if options.get(k) not in (None, "")}
    host = str(database.get("HOST") or "")
    if host.startswith("/"):  # a Unix socket directory, as libpq reads HOST
        query["host"], host = host, ""
    return URL.create(
        "postgresql+psycopg",
        username=str(database.get("USER") or "") or None,
        password=str(database.get("PASSWORD") or "") or None,
        host=host or None,
        port=int(port) if port else None,
        database=str(name) if name else None,
        query=query,
    ).render_as_string(hide_password=False)
