"""``celery -A proj audit ...``: a thin click layer over :mod:`otel_celery_publish.audit`.

Each command parses its options (:mod:`._options`), calls the read API and prints what it
returns (:mod:`._output`): a table by default, the documented JSON with ``--json``
(docs/audit.md). One module per command family: :mod:`.lost` (lost, replay), :mod:`.stats`,
:mod:`.show`, :mod:`.maintenance` (migrate, prune, drain), :mod:`.watch`; each command's
docstring is its help.

Every error is one ``Error: ...`` line on stderr, never a traceback: exit code 2 for a usage
error (an option out of range, a bad ``OTEL_CELERY_PUBLISH_*`` variable, named), 1 for a runtime
one (database unreachable, table not migrated...) and for a replay that did not send everything
it was asked to.

The Celery app (``-A``) is loaded as a worker loads it (its task modules from ``include=``,
``imports`` and ``autodiscover_tasks``; Django set up first in a Django project) before the
settings are resolved, in :func:`._options.app_of`. ``replay`` and ``lost --check-results``
need it: a task module that fails to import is their one ``Error:`` line. The other commands
read only the audit table: they work without ``-A``, and with a broken task module after one
``Warning:`` line. Celery finds the group through the ``celery.commands`` entry point; nothing
outside this package imports it: the hot path never imports click (Celery itself does).
"""

from __future__ import annotations

from typing import Any

import click

from otel_celery_publish import audit as api
from otel_celery_publish.cli import lost, maintenance, show, stats, watch
from otel_celery_publish.config import SettingsError

__all__ = ["audit"]


class UsageLine(click.UsageError):
    """A usage error printed as one ``Error:`` line (exit code 2), without the usage text."""

    def show(self, file: Any = None) -> None:
        click.ClickException.show(self, file)


class _AuditGroup(click.Group):
    """Every subcommand's failure becomes one line: exit code 2 for a usage error (click's own
    and a bad setting), 1 for an operator-facing runtime failure (:class:`api.AuditError`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageLine:
            raise
        except click.UsageError as exc:
            raise UsageLine(_one_line(exc.format_message()), exc.ctx) from None
        except SettingsError as exc:
            raise UsageLine(_one_line(str(exc)), ctx) from None
        except api.AuditError as exc:
            raise click.ClickException(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_AuditGroup)
def audit() -> None:
    """Find lost tasks, replay them, report latency (otel-celery-publish).

    The audit database and table come from OTEL_CELERY_PUBLISH_AUDIT_URL and
    OTEL_CELERY_PUBLISH_TABLE_NAME, or --audit-url and --table.
    """


for _command in (
    lost.lost,
    lost.replay,
    maintenance.drain,
    maintenance.migrate,
    maintenance.prune,
    maintenance.ship,
    show.show,
    stats.stats,
    watch.watch,
):
    audit.add_command(_command)
