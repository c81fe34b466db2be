"""Settings of the test project: PostgreSQL on 127.0.0.1 (database ``OCP_DJANGO_DB``, default
``test``), django-celery-results as the result backend, our Django app installed."""

import os

SECRET_KEY = "otel-celery-publish-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "proj.urls"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_celery_results",
    "otel_celery_publish.contrib.django",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("OCP_DJANGO_DB", "test"),
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }
}

CELERY_BROKER_URL = os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("OCP_QUEUE", "celery")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# Ours. The table name here is overridden by OTEL_CELERY_PUBLISH_TABLE_NAME in the tests (the
# environment wins over Django's settings); the URL comes from DATABASES["default"].
OTEL_CELERY_PUBLISH = {
    "DATABASE": "default",
    "TABLE_NAME": "from_django_settings",
    "TRACE_URL": "http://jaeger.example:16686/trace/{trace_id}",
    "FLUSH_INTERVAL": 0.1,
    "REDACT_KEYS": ["password", "card"],
}
