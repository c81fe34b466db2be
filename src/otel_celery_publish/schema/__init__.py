"""The audit table, the worker-liveness table and their Alembic migrations.

A leaf: everything that reads or writes the tables imports it, it imports nothing of ours but
``config``. Alembic is imported only when a migration actually runs.
"""
