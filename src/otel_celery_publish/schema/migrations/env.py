"""Alembic environment for the audit table, run from :mod:`otel_celery_publish.schema.migrate`.

A library's migrations live inside the host's database: they use their own version table
(``<table>_alembic_version``, never the host's ``alembic_version``), take the table name and the
connection from ``config.attributes``, and never read ``alembic.ini`` or call ``fileConfig``
(logging belongs to the host).
"""

from __future__ import annotations

from alembic import context

config = context.config
version_table = f"{config.attributes['table_name']}_alembic_version"

if context.is_offline_mode():
    context.configure(
        dialect_name=config.attributes["dialect_name"],
        literal_binds=True,
        version_table=version_table,
    )
else:
    context.configure(connection=config.attributes["connection"], version_table=version_table)

with context.begin_transaction():
    context.run_migrations()
