"""Room for HOT updates: the audit table's heap keeps 30% of each page free (fillfactor 70).

A row is updated four times after its insert (sent, received, started, finished). On full
pages (PostgreSQL's default fillfactor, 100) no new row version fits on its page: each update
writes the whole row to another page and a new entry into every index (four for a plain task),
and leaves a dead tuple for VACUUM. With room left at insert, most sent, received and started
updates are HOT: same page, no index entry, the old version pruned by the next visitor of the
page. Measured with ``benchmarks/db_cost.py`` (20,000 tasks): WAL per task 4.8 KB -> 2.9 KB,
dead tuples 3.9 -> 2.1, for a heap a third larger at insert. The finished update stays a
normal one: ``finished_at`` is in the predicate of ``ix_<table>_unfinished``.

Only pages written from now on are affected: nothing is rewritten, and the lock taken (SHARE
UPDATE EXCLUSIVE) lets writers go on. SQLite has no fillfactor: nothing to do there.
A frozen copy of the schema at this revision: never edit it, add a revision instead.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FILLFACTOR = 70


def _table() -> str | None:
    """The quoted audit table on PostgreSQL, else None (SQLite has no fillfactor)."""
    migration = op.get_context()
    if migration.dialect.name != "postgresql":
        return None
    quoted: str = migration.dialect.identifier_preparer.quote(
        context.config.attributes["table_name"]
    )
    return quoted


def upgrade() -> None:
    table = _table()
    if table is not None:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    table = _table()
    if table is not None:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
