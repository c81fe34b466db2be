"""The Django app: the audit table in Django's database, ``manage.py migrate``, a read-only admin.

Setup, in the settings of a project laid out as Celery's "First steps with Django" shows::

    INSTALLED_APPS += ["otel_celery_publish.contrib.django"]
    OTEL_CELERY_PUBLISH = {"DATABASE": "default", "TRACE_URL": "http://jaeger:16686/trace/{trace_id}"}

then ``python manage.py migrate`` (creates or upgrades the audit table with our own Alembic
migrations, not Django's: the table stays ours) and ``opentelemetry-instrument celery -A proj
worker`` with ``DJANGO_SETTINGS_MODULE`` exported.

* Settings: every ``OTEL_CELERY_PUBLISH_<NAME>`` variable can be a key ``<NAME>`` of the
  ``OTEL_CELERY_PUBLISH`` dict; ``"DATABASE"`` names the ``DATABASES`` alias of the audit table
  (default ``"default"``), whose SQLAlchemy URL is derived unless ``AUDIT_URL`` is given.
  Precedence: ``instrument()`` keywords > environment > Django settings > defaults
  (:mod:`otel_celery_publish.config`).
* Ordering: ``instrument()`` may run before Django is set up (``opentelemetry-instrument``
  instruments at interpreter start, a project's ``proj/celery.py`` runs while its settings are
  being imported). At ``django.setup()`` this app re-resolves the active instrumentation's
  settings with Django's and re-instruments when they differ (:mod:`.apps`).
* ``models.PublishAttempt``: an unmanaged model of the audit table; ``admin``: its read-only
  admin with filters, the lifecycle timeline, a trace link and a "replay" action that goes
  through :func:`otel_celery_publish.audit.plan_replay` like ``celery -A proj audit replay``.

docs/django.md is the manual.
"""
