"""The read-only admin of the audit table: find a task, see where it stopped, replay it.

* Changelist: task, id, queue, status, lost reason or where an unfinished attempt is, when it
  was published and finished, the worker. Filters: outcome (and "unfinished", "replayed"),
  queue, task name, and "lost", which asks :func:`otel_celery_publish.audit.lost` (the rules of
  ``celery -A proj audit lost``: stuck for 10 minutes, published in the last 7 days) and shows
  each row's reason. Search: an exact task id, publish id, root id or group id (index lookups,
  not ``UPPER(...) LIKE``). Nothing scans the whole table (it can hold millions of rows): no
  date hierarchy, the queue and task-name filters offer the values of the last day (at most
  :data:`RECENT_VALUES`, through the ``published_at`` index), no facet counts, and the
  paginator counts at most :data:`COUNT_CAP` + 1 rows (more shows as "10,000+").
* Detail: every column, the lifecycle timeline (published, sent, ready, received, started,
  finished, with the waits as :mod:`otel_celery_publish.timing` defines them), a trace link
  from ``TRACE_URL``, and the task's history (attempts and replays, :func:`audit.show`).
* Nothing can be added, changed or deleted. "Replay selected tasks" (permission
  ``otel_celery_publish.replay_publishattempt``, at most :data:`MAX_REPLAY` tasks: the
  confirmation form posts one field per task, and Django refuses more than
  ``DATA_UPLOAD_MAX_NUMBER_FIELDS``) shows the plan first, with the refusals of
  ``audit replay`` (:func:`~otel_celery_publish.audit.plan_replay`) and an optional queue, then
  sends it (:func:`~otel_celery_publish.audit.send_replay`), recorded as replayed by
  ``django:<username>``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any, cast

import django
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import Case, CharField, F, Q, Value, When
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join

from otel_celery_publish import audit as api
from otel_celery_publish import timing
from otel_celery_publish.contrib.django._settings import celery_app, current_settings
from otel_celery_publish.contrib.django.models import LOST_WORDS, PublishAttempt
from otel_celery_publish.schema.table import LOST_REASONS
from otel_celery_publish.timeline import Bar, duration, render

#: What the "lost" filter asks ``audit.lost`` for: the CLI's defaults, over a week.
LOST_OLDER_THAN = dt.timedelta(minutes=10)
LOST_SINCE = dt.timedelta(days=7)
LOST_LIMIT = 1000
OUTCOMES = ("succeeded", "failed", "retried", "revoked", "rejected", "ignored")
MAX_QUEUE = 255  # the audit table's queue column
#: The queue and task-name filters offer the distinct values among rows published this recently
#: (a range of the ``published_at`` index), at most RECENT_VALUES of them.
RECENT_WINDOW = dt.timedelta(days=1)
RECENT_VALUES = 100
#: The changelist counts at most COUNT_CAP + 1 rows: an exact count is a scan of the table.
COUNT_CAP = 10_000
#: The most tasks one replay may select (the confirmation posts a field per task; Django's
#: DATA_UPLOAD_MAX_NUMBER_FIELDS, 1000 by default, would answer 400).
MAX_REPLAY = 500


class CappedPaginator(Paginator):
    """A paginator that counts at most ``COUNT_CAP + 1`` rows (``COUNT(*)`` over a ``LIMIT``
    subquery): past that the changelist says "10,000+" (our pagination.html) and offers those
    rows' pages only (search or filter to narrow down)."""

    @cached_property
    def count(self) -> int:
        return int(self.object_list[: COUNT_CAP + 1].count())


class _RecentValuesFilter(admin.SimpleListFilter):
    """A filter on one column (the URL parameter is the column's name, as Django's
    ``AllValuesFieldListFilter`` had it) whose choices are the column's distinct values among
    the rows of the last :data:`RECENT_WINDOW`: ``SELECT DISTINCT`` over the whole table would
    be a scan on every changelist load. Any value still filters (``?queue=x``)."""

    field = ""

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        since = timezone.now() - RECENT_WINDOW
        recent = (
            PublishAttempt.objects.filter(published_at__gte=since)
            .exclude(**{f"{self.field}__isnull": True})
            .order_by(self.field)
            .values_list(self.field, flat=True)
            .distinct()[:RECENT_VALUES]
        )
        values = [str(v) for v in recent]
        current = self.value()
        if current and current not in values:
            values.append(current)
        return [(v, v) for v in values]

    def queryset(self, request: Any, queryset: Any) -> Any:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class QueueFilter(_RecentValuesFilter):
    title = "queue (published in the last day)"
    parameter_name = field = "queue"


class TaskNameFilter(_RecentValuesFilter):
    title = "task name (published in the last day)"
    parameter_name = field = "task_name"


class OutcomeFilter(admin.SimpleListFilter):
    title = "outcome"
    parameter_name = "outcome"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return [(o, o) for o in OUTCOMES] + [
            ("unfinished", "unfinished"), ("replayed", "replayed"),
            ("dead-lettered", "dead-lettered"),
        ]  # fmt: skip

    def queryset(self, request: Any, queryset: Any) -> Any:
        value = self.value()
        if value == "unfinished":
            return queryset.filter(
                outcome__isnull=True, replayed_at__isnull=True, dead_lettered_at__isnull=True
            )
        if value == "replayed":  # as the status column: an outcome wins over a replay
            return queryset.filter(outcome__isnull=True, replayed_at__isnull=False)
        if value == "dead-lettered":
            return queryset.filter(
                outcome__isnull=True, replayed_at__isnull=True, dead_lettered_at__isnull=False
            )
        if value:
            return queryset.filter(outcome=value)
        return queryset


class LostFilter(admin.SimpleListFilter):
    """The attempts ``audit lost`` reports now, each annotated with its reason (``lost_now``)."""

    title = "lost (as audit lost)"
    parameter_name = "lost"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return [("any", "lost, any reason"), *LOST_REASONS.items()]

    def queryset(self, request: Any, queryset: Any) -> Any:
        value = self.value()
        if not value:
            return queryset
        try:
            # The queue and task-name filters narrow the search itself: applied to the oldest
            # LOST_LIMIT of every queue, they would miss a queue's lost tasks behind others'.
            found = api.lost(
                settings=current_settings(),
                older_than=LOST_OLDER_THAN,
                since=LOST_SINCE,
                task=request.GET.get(TaskNameFilter.parameter_name) or None,
                queue=request.GET.get(QueueFilter.parameter_name) or None,
                limit=LOST_LIMIT,
            )
        except api.AuditError as exc:
            messages.error(request, f"audit lost: {exc}")
            return queryset.none()
        if len(found) == LOST_LIMIT:
            messages.warning(
                request,
                f"Only the oldest {LOST_LIMIT} lost tasks are shown (celery -A proj audit lost).",
            )
        reasons = {t.publish_id: t.reason for t in found if value in ("any", t.reason)}
        if not reasons:
            return queryset.none()
        whens = [When(publish_id=p, then=Value(r)) for p, r in reasons.items()]
        return queryset.filter(publish_id__in=list(reasons)).annotate(
            lost_now=Case(*whens, output_field=CharField())
        )


@admin.register(PublishAttempt)
class PublishAttemptAdmin(admin.ModelAdmin):
    list_display = (
        "task_name",
        "task_id",
        "queue",
        "status_display",
        "lost_display",
        "published_at",
        "finished_at",
        "worker",
    )
    list_filter = (OutcomeFilter, QueueFilter, TaskNameFilter, LostFilter)
    search_fields = ("task_id",)
    search_help_text = "An exact task id, publish id, root id or group id."
    ordering = ("-published_at",)
    show_full_result_count = False
    paginator = CappedPaginator
    count_cap = COUNT_CAP  # for admin/otel_celery_publish/publishattempt/pagination.html
    count_cap_text = f"{COUNT_CAP:,}"
    if django.VERSION >= (5, 0):  # "Show counts" would count (and ask audit.lost) per choice
        show_facets = admin.ShowFacets.NEVER
    list_per_page = 100
    actions = ("replay_selected",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "task_name", "task_id", "status_display", "lost_display", "queue",
                    "attempt", "worker", "runtime_s", "publish_id",
                )
            },
        ),
        ("Lifecycle", {"fields": ("timeline_display", "eta", "expires")}),
        ("Trace", {"fields": ("trace_link", "trace_id", "span_id")}),
        ("Arguments", {"fields": ("args_repr", "kwargs_repr", "payload_display", "options")}),
        (
            "Error",
            {"fields": ("error", "exception_type", "exception_message", "lost_reason")},
        ),
        (
            "Replays and workflow",
            {
                "fields": (
                    "history_display", "replay_of_link", "replayed_at", "replayed_as",
                    "replayed_by", "dead_lettered_at", "root_id", "parent_id", "group_id",
                )
            },
        ),
        (
            "Origin",
            {
                "classes": ("collapse",),
                "fields": (
                    "app", "broker", "periodic_task", "publisher_host", "publisher_pid",
                    "exchange", "routing_key", "priority", "content_type", "content_encoding",
                    "worker_instance", "acks_late",
                ),
            },
        ),
    )  # fmt: skip

    # -- read-only -------------------------------------------------------------------------

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_replay_permission(self, request: Any) -> bool:
        return bool(request.user.has_perm("otel_celery_publish.replay_publishattempt"))

    def get_readonly_fields(self, request: Any, obj: Any = None) -> Any:
        return [f for _, options in self.fieldsets for f in options["fields"]]

    def get_search_results(self, request: Any, queryset: Any, search_term: str) -> Any:
        """Exact matches on the indexed ids (the default would be ``UPPER(task_id) LIKE``)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        # Each arm matches an index: the primary key, ix_task_id, and the partial indexes of
        # group members and of workflow members (whose predicates the arms imply).
        in_workflow = Q(root_id=term, root_id__ne=F("task_id"))
        ids = Q(task_id=term) | Q(publish_id=term) | Q(group_id=term) | in_workflow
        return queryset.filter(ids), False

    # -- columns ---------------------------------------------------------------------------

    @admin.display(description="status", ordering="outcome")
    def status_display(self, obj: PublishAttempt) -> str:
        return obj.status

    @admin.display(description="lost reason / stage")
    def lost_display(self, obj: PublishAttempt) -> str:
        reason = getattr(obj, "lost_now", None)
        if reason:
            return f"lost: {LOST_WORDS.get(reason, reason)}"
        return obj.stage

    @admin.display(description="payload")
    def payload_display(self, obj: PublishAttempt) -> str:
        if obj.payload is None:
            return "none (not replayable)"
        size = f"{len(obj.payload)} bytes, {obj.content_type or '?'}"
        return size + (" (redacted)" if obj.payload_redacted else "")

    @admin.display(description="trace")
    def trace_link(self, obj: PublishAttempt) -> str:
        template = current_settings().trace_url
        if not obj.trace_id:
            return "-"
        if not template:
            return "set TRACE_URL to link the trace"
        return _html('<a href="{}">{}</a>', template.format(trace_id=obj.trace_id), obj.trace_id)

    @admin.display(description="replay of")
    def replay_of_link(self, obj: PublishAttempt) -> str:
        return _link(obj.replay_of) if obj.replay_of else "-"

    @admin.display(description="timeline")
    def timeline_display(self, obj: PublishAttempt) -> str:
        return _timeline(obj)

    @admin.display(description="history (attempts and replays)")
    def history_display(self, obj: PublishAttempt) -> str:
        try:
            history = api.show(obj.task_id, settings=current_settings())
        except api.AuditError as exc:
            return f"audit show: {exc}"
        rows = [
            (
                _link(a.publish_id, a.publish_id[:8]),
                "this attempt" if a.publish_id == obj.publish_id else "",
                a.task_id,
                a.attempt,
                a.status,
                a.published_at.isoformat(sep=" ", timespec="milliseconds"),
                f"replay of {a.replay_of[:8]}" if a.replay_of else "",
                f"replayed by {a.replayed_by}" if a.replayed_by else "",
            )
            for a in history.attempts
        ]
        return _html(
            "<table><tr><th>publish</th><th></th><th>task id</th><th>attempt</th>"
            "<th>status</th><th>published</th><th></th><th></th></tr>{}</table>",
            format_html_join("", "<tr>" + "<td>{}</td>" * 8 + "</tr>", rows),
        )

    # -- replay ----------------------------------------------------------------------------

    @admin.action(description="Replay selected tasks", permissions=["replay"])
    def replay_selected(self, request: Any, queryset: Any) -> Any:
        """First the plan (what would be sent, what is refused and why), then on confirmation
        the sends; every outcome becomes an admin message."""
        queue = (request.POST.get("replay_queue") or "").strip() or None
        if queue is not None and (len(queue) > MAX_QUEUE or not queue.isprintable()):
            self.message_user(
                request, f"Queue must be 1 to {MAX_QUEUE} printable characters.", messages.ERROR
            )
            return None
        if queryset[: MAX_REPLAY + 1].count() > MAX_REPLAY:
            self.message_user(
                request,
                f"Select at most {MAX_REPLAY} tasks to replay; for more, use "
                "`celery -A proj audit replay --lost`.",
                messages.ERROR,
            )
            return None
        username = request.user.get_username()
        policy = api.Policy(queue=queue, replayed_by=f"django:{username}")
        publish_ids = list(queryset.values_list("publish_id", flat=True))
        settings = current_settings()
        app = celery_app()
        try:
            _import_tasks(app)
            planned = api.plan_replay(
                app, publish_ids=publish_ids, policy=policy, settings=settings
            )
            if request.POST.get("confirm") != "yes":
                return TemplateResponse(
                    request,
                    "otel_celery_publish/replay_confirm.html",
                    {
                        **self.admin_site.each_context(request),
                        "title": "Replay published tasks",
                        "opts": self.model._meta,
                        "planned": planned,
                        "queue": queue or "",
                        "sending": sum(1 for p in planned if p.refused is None),
                        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                        "publish_ids": publish_ids,
                    },
                )
            report = api.send_replay(app, planned, settings=settings)
        except api.AuditError as exc:
            self.message_user(request, f"Replay: {exc}", messages.ERROR)
            return None
        for result in report.results:
            name = f"{result.task_name}[{result.task_id}]"
            if result.status == "sent":
                self.message_user(
                    request,
                    f"Replayed {name} as {result.new_task_id} (queue {result.queue or 'default'}).",
                    messages.SUCCESS,
                )
            elif result.status == "refused":
                self.message_user(request, f"Refused {name}: {result.reason}", messages.WARNING)
            else:
                self.message_user(request, f"Failed {name}: {result.reason}", messages.ERROR)
        return None


def _html(template: str, *args: Any) -> str:
    """:func:`django.utils.html.format_html`, typed (Django ships no type hints)."""
    return cast(str, format_html(template, *args))


def _link(publish_id: str, text: str | None = None) -> str:
    url = reverse("admin:otel_celery_publish_publishattempt_change", args=[publish_id])
    return _html('<a href="{}">{}</a>', url, text or publish_id)


_imported: set[int] = set()
_import_lock = threading.Lock()


def _import_tasks(app: Any) -> None:
    """Import the app's task modules once per process (``autodiscover_tasks()`` is lazy: a web
    process has only imported the ones its views use), so that a task registered only in a
    Django app's ``tasks.py`` is known to the replay's "is it registered" check."""
    with _import_lock:
        if id(app) not in _imported:
            app.loader.import_default_modules()
            _imported.add(id(app))


def _epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _timeline(obj: PublishAttempt) -> str:
    """The lifecycle as a table (each edge, and the wait that ends there) and as bars."""
    published = obj.published_at.timestamp()
    edges = timing.edges(
        published,
        _epoch(obj.eta),
        _epoch(obj.received_at),
        _epoch(obj.started_at),
        _epoch(obj.finished_at),
    )
    sent = _epoch(obj.sent_at)
    steps: list[tuple[str, float | None, str, float | None]] = [
        ("published", published, "", None),
        ("sent", sent, "send", None if sent is None else sent - published),
    ]
    if obj.eta is not None:
        steps.append(("ready (ETA)", edges.ready, "", None))
    steps += [
        ("received", edges.received, "broker wait", edges.broker_wait),
        ("started", edges.started, "worker wait", edges.worker_wait),
        (
            "finished",
            edges.finished,
            "run",
            None
            if edges.finished is None or edges.started is None
            else edges.finished - edges.started,
        ),
    ]
    rows = [
        (
            label,
            "-" if at is None else _when(at),
            wait_label,
            "" if wait is None else duration(max(0.0, wait)),
        )
        for label, at, wait_label, wait in steps
    ]
    total = edges.end_to_end
    bars: list[Bar] = []
    for label, start, end in (
        ("send", published, sent),
        ("broker wait", edges.ready, edges.received),
        ("worker wait", edges.received or edges.ready, edges.started),
        ("run", edges.started or edges.ready, edges.finished),
    ):
        bars.append(Bar(label, start if end is None else min(start, end), end))
        if end is None:  # where it is stuck (or still going): an open bar up to now
            break
    skew = f" Publisher clock ahead by {duration(edges.skew_s)} (clamped)." if edges.skew_s else ""
    return _html(
        "<table><tr><th>edge</th><th>at (UTC)</th><th>the wait ending here</th><th>took</th>"
        "</tr>{}</table>"
        "<p>End to end: {}.{}</p><pre>{}</pre>",
        format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        "unfinished" if total is None else duration(total),
        skew,
        "\n".join(render(bars, width=40, label_width=12, now=time.time())),
    )


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(
        sep=" ", timespec="milliseconds"
    )
