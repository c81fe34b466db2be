"""Celery projects laid out the ways users lay them out, for ``tests/test_cli_layouts.py``.

Each folder is a top-level package: the tests run ``celery -A <package>... audit`` and workers
with this directory first on ``PYTHONPATH``, as a project's own directory would be. The apps
read their broker and result backend from ``OCP_BROKER_URL`` and ``OCP_RESULT_BACKEND``
(:mod:`_conf`); none of them instruments itself.
"""
