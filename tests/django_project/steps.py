"""Django-side steps of tests/test_django.py, each run in a process of its own (Django's
settings are process-global; the pytest process must never load them).

``python steps.py STEP JSON`` prints one JSON line: what the step saw. Run from any directory
with this directory on PYTHONPATH and DJANGO_SETTINGS_MODULE=proj.settings.
"""

import json
import sys
import uuid
from typing import Any

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Permission  # noqa: E402
from django.contrib.messages import get_messages  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django_celery_results.models import TaskResult  # noqa: E402
from shop.models import Order  # noqa: E402
from shop.tasks import add, mark_paid  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

from otel_celery_publish import CeleryPublishInstrumentor  # noqa: E402
from otel_celery_publish.config import Settings  # noqa: E402
from otel_celery_publish.contrib.django._settings import database_alias  # noqa: E402
from otel_celery_publish.contrib.django.models import PublishAttempt  # noqa: E402
from otel_celery_publish.schema.table import audit_table  # noqa: E402


class Rollback(Exception):
    """Raised inside transaction.atomic() to roll it back."""


def _row_visible_elsewhere(task_id: str) -> bool:
    """Whether a connection of our own (not Django's) sees a committed audit row of task_id."""
    settings = Settings.from_env()
    engine = create_engine(settings.audit_url)
    table = audit_table(settings.table_name)
    try:
        with engine.connect() as conn:
            return (
                conn.execute(select(table.c.publish_id).where(table.c.task_id == task_id)).first()
                is not None
            )
    finally:
        engine.dispose()


def publish(
    task: str, args: list[Any], task_id: str, queue: str, mode: str = "plain"
) -> dict[str, Any]:
    """Publish ``task`` the way ``mode`` says; report what was visible when."""
    seen: dict[str, Any] = {
        "instrumented": CeleryPublishInstrumentor().is_instrumented_by_opentelemetry
    }
    target = {"shop.add": add, "shop.mark_paid": mark_paid}[task]
    if task == "shop.mark_paid" and not args:
        args = [None]
    try:
        with transaction.atomic():
            if task == "shop.mark_paid":
                args = [Order.objects.create(name=task_id).id]
                seen["order_id"] = args[0]
            if mode.startswith("on_commit"):
                target.apply_async_on_commit(args, task_id=task_id, queue=queue)
            else:
                target.apply_async(args, task_id=task_id, queue=queue)
            seen["row_before_commit"] = _row_visible_elsewhere(task_id)
            if mode.endswith("rollback"):
                raise Rollback
    except Rollback:
        seen["rolled_back"] = True
    seen["row_after"] = _row_visible_elsewhere(task_id)
    ours = CeleryPublishInstrumentor()
    if ours.is_instrumented_by_opentelemetry:
        seen["flushed"] = ours.writer.flush(10)
        seen["settings"] = {
            "audit_url": ours.writer.settings.audit_url.split("@")[-1],
            "table_name": ours.writer.settings.table_name,
            "flush_interval": ours.writer.settings.flush_interval,
            "trace_url": ours.writer.settings.trace_url,
        }
    return seen


def client(
    user: str, staff_perms: list[str] | None = None, requests: list[dict[str, Any]] = ()
) -> dict[str, Any]:
    """Log in as ``user`` (a superuser, or staff with ``staff_perms``) and make ``requests``;
    each response says the SQL run on the audit table's database meanwhile (``queries``)."""
    User = get_user_model()
    account = User.objects.filter(username=user).first()
    if account is None:
        if staff_perms is None:
            account = User.objects.create_superuser(user, f"{user}@example.com", uuid.uuid4().hex)
        else:
            account = User.objects.create_user(user, is_staff=True)
            for perm in staff_perms:
                app_label, codename = perm.split(".")
                account.user_permissions.add(
                    Permission.objects.get(content_type__app_label=app_label, codename=codename)
                )
    browser = Client()
    browser.force_login(account)
    out = []
    for request in requests:
        method = getattr(browser, request.get("method", "get"))
        with CaptureQueriesContext(connections[database_alias()]) as captured:
            response = method(
                request["path"], request.get("data") or {}, follow=request.get("follow", False)
            )
        out.append(
            {
                "queries": [q["sql"] for q in captured.captured_queries],
                "status": response.status_code,
                "html": response.content.decode(),
                "messages": [str(m) for m in get_messages(response.wsgi_request)],
            }
        )
    return {"responses": out}


def model_columns() -> dict[str, Any]:
    return {
        "columns": sorted(f.column for f in PublishAttempt._meta.fields),
        "db_table": PublishAttempt._meta.db_table,
    }


def store_result(task_id: str, status: str) -> dict[str, Any]:
    TaskResult.objects.store_result("application/json", "utf-8", task_id, json.dumps(None), status)
    return {"stored": task_id}


STEPS = {
    "publish": publish,
    "client": client,
    "model_columns": model_columns,
    "store_result": store_result,
}

if __name__ == "__main__":
    step, arguments = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(STEPS[step](**arguments)))
