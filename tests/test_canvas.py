"""Canvas workflows read as one trace, and ``audit show <group id | root id>`` shows them whole:
group, chord, chain, chunks, starmap, link and link_error, published by this (instrumented)
process and run by a real worker process on Redis with a Redis result backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, canvas, chain, chord, group
from opentelemetry import trace
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from otel_celery_publish.audit import _db, _show
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks import canvas as canvas_hooks
from tests.app import app as tests_app
from tests.audit_support import ago, celery_audit, cli, database, row, seed, validated
from tests.conftest import BROKER, Broker, Publisher, audit_rows, wait_row
from tests.otlp_receiver import Receiver, wait_for

# Chords need a result backend on both sides: the worker's counts the header's results.
WITH_BACKEND = {"OCP_RESULT_BACKEND": BROKER}


@pytest.fixture
def capp(broker: Broker, queue_name: str) -> Iterator[Celery]:
    """A publishing app on the test's broker and queue with a Redis result backend (chords
    need one), sending the tasks of tests.app by name."""
    app = Celery("ocp_canvas", broker=broker.url, backend=BROKER, set_as_current=False)
    app.conf.update(task_default_queue=queue_name, broker_connection_retry_on_startup=True)
    yield app
    app.close()


def sig(app: Celery, name: str, *args: Any, **options: Any) -> canvas.Signature:
    return app.signature(name, args=args, **options)


def settled(pg: Any, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each task's latest row once it is sent and finished (the worker ships them in batches)."""
    return {
        task_id: wait_row(
            pg, task_id, lambda rows: bool(rows[-1]["outcome"] and rows[-1]["sent_at"])
        )[-1]
        for task_id in task_ids
    }


def one_trace(
    publisher: Publisher, receiver: Receiver, rows: dict[str, dict[str, Any]]
) -> tuple[str, dict[tuple[str, str], Any]]:
    """Every task's producer, queue-wait and process spans, all in one trace: its id, and the
    spans by (task id, span name prefix)."""
    trace_ids = {r["trace_id"] for r in rows.values()}
    assert len(trace_ids) == 1, f"the rows' producer spans are in {len(trace_ids)} traces"
    [trace_id] = trace_ids
    wanted = {(task_id, kind) for task_id in rows for kind in ("send", "queue wait", "process")}

    def probe() -> dict[tuple[str, str], Any] | None:
        found: dict[tuple[str, str], Any] = {}
        local = [
            (format_trace_id(s.context.trace_id), s.name, dict(s.attributes or {}))
            for s in publisher.exporter.get_finished_spans()
        ]
        remote = [(s.trace_id, s.name, s.attributes) for s in receiver.find(lambda _: True)]
        for span_trace, name, attributes in local + remote:
            task_id = attributes.get("messaging.message.id")
            row = rows.get(task_id)  # type: ignore[arg-type]
            if row is None:
                continue
            for kind in ("send", "queue wait", "process"):
                if name == f"{kind} {row['task_name']}":
                    found[(task_id, kind)] = (span_trace, attributes)  # type: ignore[index]
        return found if wanted <= found.keys() else None

    spans = wait_for(probe, 30, f"send, queue wait and process spans of {sorted(rows)}")
    elsewhere = {key: t for key, (t, _) in spans.items() if t != trace_id}
    assert not elsewhere, f"spans outside trace {trace_id}: {elsewhere}"
    return trace_id, {key: attributes for key, (_, attributes) in spans.items()}


def internal_span(publisher: Publisher, name: str) -> Any:
    [span] = [
        s
        for s in publisher.exporter.get_finished_spans()
        if s.name == name and s.kind is SpanKind.INTERNAL
    ]
    return span


def children_of(publisher: Publisher, parent: Any) -> list[Any]:
    return [
        s
        for s in publisher.exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def pg_settings(pg_url: str) -> Settings:
    return Settings.from_env(environ={}, audit_url=pg_url)


def shown(pg_url: str, workflow_id: str) -> tuple[dict[str, Any], str]:
    """``celery -A tests.app audit show ID`` as a subprocess: its --json (validated against
    docs/audit.md) and its table."""
    settings = pg_settings(pg_url)
    as_json = celery_audit("show", workflow_id, "--json", settings=settings)
    assert as_json.returncode == 0, as_json.stderr
    table = celery_audit("show", workflow_id, settings=settings)
    assert table.returncode == 0, table.stderr
    return validated("show", as_json.stdout), table.stdout


def by_task(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["task_id"]: t for t in data["workflow"]["tasks"]}


def test_group_members_share_one_trace_under_one_apply_span(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, pg_url: str,
    capp: Celery,
) -> None:  # fmt: skip
    """A group published where no span is current is one trace: an ``apply group`` span whose
    children are the members' producer spans; ``audit show <group id>`` lists every member."""
    start_worker(env=WITH_BACKEND)
    result = group(sig(capp, "tests.add", 1, 2), sig(capp, "tests.add", 3, 4)).apply_async()
    members = [r.id for r in result.results]
    rows = settled(pg, members)
    trace_id, spans = one_trace(publisher, receiver, rows)

    apply = internal_span(publisher, "apply group tests.add")
    assert format_trace_id(apply.context.trace_id) == trace_id and apply.parent is None
    assert apply.attributes["celery.task.group_id"] == result.id
    assert apply.attributes["celery.group.size"] == 2
    sends = children_of(publisher, apply)
    assert sorted(s.attributes["messaging.message.id"] for s in sends) == sorted(members)
    for task_id in members:
        for kind in ("send", "process"):
            assert spans[(task_id, kind)]["celery.task.group_id"] == result.id
            # Celery makes each member of a client-published group its own root.
            assert "celery.task.root_id" not in spans[(task_id, kind)]

    data, table = shown(pg_url, result.id)
    assert data["attempts"] == []  # a group id is no task's id
    assert data["workflow"]["kind"] == "group"
    tasks = by_task(data)
    assert set(tasks) == set(members)
    assert {(t["role"], t["status"]) for t in tasks.values()} == {("member", "succeeded")}
    assert sorted(t["group_index"] for t in tasks.values()) == [0, 1]
    totals = data["workflow"]["totals"]
    assert (totals["tasks"], totals["done"], totals["failed"], totals["unfinished"]) == (2, 2, 0, 0)
    assert totals["first_published_at"] == min(t["published_at"] for t in tasks.values())
    assert totals["last_finished_at"] is not None and totals["elapsed_s"] > 0
    assert f"group {result.id}: 2 task(s), 2 done, 0 failed, 0 unfinished" in table
    for task_id in members:
        [line] = [line for line in table.splitlines() if task_id in line]
        assert "member" in line and "succeeded" in line


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_chord_header_and_callback_share_one_trace(
    pool: str, publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any,
    pg_url: str, capp: Celery,
) -> None:  # fmt: skip
    """A chord is one trace: ``apply chord`` over the header's producer spans, and the callback
    sent by the last header task's worker inside its process span; ``show <group id>`` marks
    the callback and the group it waited for."""
    start_worker(pool=pool, concurrency=2 if pool == "prefork" else 1, env=WITH_BACKEND)
    header = [
        sig(capp, "tests.add", 1, 2),
        sig(capp, "tests.add", 3, 4),
        sig(capp, "tests.add", 5, 6),
    ]
    result = chord(header)(sig(capp, "tests.tsum"))
    group_id = result.parent.id
    members = [r.id for r in result.parent.results]
    rows = settled(pg, [*members, result.id])
    assert result.get(timeout=30) == 21
    trace_id, spans = one_trace(publisher, receiver, rows)

    apply = internal_span(publisher, "apply chord tests.tsum")
    assert apply.parent is None and format_trace_id(apply.context.trace_id) == trace_id
    assert apply.attributes["celery.task.group_id"] == group_id
    assert apply.attributes["celery.group.size"] == 3
    assert apply.attributes["celery.chord.callback.id"] == result.id
    assert apply.attributes["celery.chord.callback.name"] == "tests.tsum"
    assert sorted(s.attributes["messaging.message.id"] for s in children_of(publisher, apply)) == (
        sorted(members)
    )
    # The callback is sent from the process span of the header task that finished last.
    [callback_send] = receiver.find(
        lambda s: (
            s.name == "send tests.tsum" and s.attributes.get("messaging.message.id") == result.id
        )
    )
    header_process = {
        s.span_id: s.attributes["messaging.message.id"]
        for s in receiver.find(lambda s: s.name == "process tests.add" and s.trace_id == trace_id)
    }
    assert header_process.get(callback_send.parent_id) in members
    assert spans[(result.id, "send")]["celery.task.group_id"] == group_id
    assert rows[result.id]["group_id"] == group_id

    data, table = shown(pg_url, group_id)
    flow = data["workflow"]
    assert flow["kind"] == "chord"
    tasks = by_task(data)
    assert set(tasks) == {*members, result.id}
    assert {tasks[m]["role"] for m in members} == {"member"}
    assert tasks[result.id]["role"] == "callback"
    assert tasks[result.id]["waited_for"] == group_id
    assert [t["task_id"] for t in flow["tasks"]][-1] == result.id  # sorted by publish time
    assert {t["status"] for t in tasks.values()} == {"succeeded"}
    assert flow["totals"]["done"] == 4 and flow["totals"]["unfinished"] == 0
    assert flow["totals"]["elapsed_s"] > 0
    [line] = [line for line in table.splitlines() if result.id in line and "callback" in line]
    assert f"waited for group {group_id}" in line and "succeeded" in line
    assert f"chord (group id) {group_id}: 4 task(s), 4 done" in table


def test_chord_on_a_backend_without_native_chords_is_one_trace(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, tmp_path: Path,
    broker: Broker, queue_name: str,
) -> None:  # fmt: skip
    """On a result backend without native chords (SQL), the publisher also sends
    ``celery.chord_unlock``, which polls (retries) on the worker and then sends the callback:
    all of it, every retry included, in the one trace of ``apply chord``."""
    backend = f"db+sqlite:///{tmp_path / 'results.db'}"
    start_worker(env={"OCP_RESULT_BACKEND": backend})
    app = Celery("ocp_canvas_db", broker=broker.url, backend=backend, set_as_current=False)
    app.conf.update(task_default_queue=queue_name, broker_connection_retry_on_startup=True)
    try:
        header = [sig(app, "tests.add", 1, 2), sig(app, "tests.add", 3, 4)]
        result = chord(header, interval=0.2)(sig(app, "tests.tsum"))
        members = [r.id for r in result.parent.results]
        rows = settled(pg, [*members, result.id])
        unlock = rows[result.id]["parent_id"]
        rows |= settled(pg, [unlock])
        assert rows[unlock]["task_name"] == "celery.chord_unlock"
        trace_id, _ = one_trace(publisher, receiver, rows)
        attempts = {r["trace_id"] for r in audit_rows(pg, unlock)}
        assert attempts == {trace_id}, "a chord_unlock retry left the trace"
        apply = internal_span(publisher, "apply chord tests.tsum")
        assert format_trace_id(apply.context.trace_id) == trace_id
        assert result.get(timeout=30) == 10
    finally:
        app.close()


def test_chain_is_one_trace_and_show_root_id_lists_it(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, pg_url: str,
    capp: Celery,
) -> None:  # fmt: skip
    """A chain's later steps are sent by the worker inside the previous step's process span:
    one trace, every step carrying the root id; ``show <root id>`` prints the root task's
    history as before, then the workflow."""
    start_worker(env=WITH_BACKEND)
    last = chain(
        sig(capp, "tests.add", 1, 2), sig(capp, "tests.add", 3), sig(capp, "tests.add", 4)
    ).apply_async()
    ids = [last.parent.parent.id, last.parent.id, last.id]
    rows = settled(pg, ids)
    _, spans = one_trace(publisher, receiver, rows)
    root = ids[0]
    for task_id in ids[1:]:
        for kind in ("send", "process"):
            assert spans[(task_id, kind)]["celery.task.root_id"] == root
            assert spans[(task_id, kind)]["messaging.message.conversation_id"] == root
    assert not [s for s in publisher.exporter.get_finished_spans() if s.name.startswith("apply")]

    data, table = shown(pg_url, root)
    assert [a["task_id"] for a in data["attempts"]] == [root]  # show <task id> as before
    flow = data["workflow"]
    assert flow["kind"] == "root"
    assert [(t["task_id"], t["role"], t["status"]) for t in flow["tasks"]] == [
        (root, "root", "succeeded"), (ids[1], "task", "succeeded"), (ids[2], "task", "succeeded")
    ]  # fmt: skip
    assert table.startswith(f"tests.add[{root}] attempt 0: succeeded")
    assert f"workflow (root id) {root}: 3 task(s), 3 done, 0 failed, 0 unfinished" in table


def test_chunks_are_one_trace(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, pg_url: str,
    capp: Celery,
) -> None:  # fmt: skip
    """``chunks`` is a group of ``celery.starmap`` tasks: one trace under ``apply group``;
    ``show <group id>`` lists the chunks."""
    start_worker(env=WITH_BACKEND)
    add = capp.signature("tests.add")
    result = canvas.chunks(add, [(1, 2), (3, 4), (5, 6)], 2, app=capp).apply_async()
    members = [r.id for r in result.results]
    assert len(members) == 2
    rows = settled(pg, members)
    trace_id, spans = one_trace(publisher, receiver, rows)
    apply = internal_span(publisher, "apply group celery.starmap")
    assert format_trace_id(apply.context.trace_id) == trace_id
    assert {spans[(m, "process")]["celery.task.group_id"] for m in members} == {result.id}

    data = validated("show", cli("show", result.id, "--json", settings=pg_settings(pg_url)).stdout)
    assert {(t["task_name"], t["role"], t["status"]) for t in data["workflow"]["tasks"]} == {
        ("celery.starmap", "member", "succeeded")
    }
    assert set(by_task(data)) == set(members)


def test_starmap_is_one_task_in_one_trace(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, capp: Celery,
) -> None:  # fmt: skip
    """``starmap`` is one ``celery.starmap`` task that calls the task in the worker's
    process: one producer, one queue wait, one process span, no workflow."""
    start_worker(env=WITH_BACKEND)
    add = capp.signature("tests.add")
    result = canvas.xstarmap(add, [(1, 2), (3, 4)], app=capp).apply_async()
    rows = settled(pg, [result.id])
    one_trace(publisher, receiver, rows)
    assert result.get(timeout=30) == [3, 7]
    assert rows[result.id]["group_id"] is None


def test_link_and_link_error_callbacks_join_the_trace(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, pg_url: str,
    capp: Celery,
) -> None:  # fmt: skip
    """A ``link`` callback (after success) and a ``link_error`` callback published as a task
    (after failure) are sent inside the parent's process span: each workflow is one trace,
    and ``show <parent id>`` lists the callback with the root's outcome."""
    start_worker(env=WITH_BACKEND)
    on_success = sig(capp, "tests.add", 10)
    on_success.freeze()
    ok = capp.send_task("tests.add", (1, 2), link=on_success)
    on_error = sig(capp, "tests.errback")
    on_error.freeze()
    failed = capp.send_task("tests.fail", ("boom",), link_error=on_error)

    ok_rows = settled(pg, [ok.id, on_success.id])
    _, spans = one_trace(publisher, receiver, ok_rows)
    assert spans[(on_success.id, "process")]["celery.task.root_id"] == ok.id
    failed_rows = settled(pg, [failed.id, on_error.id])
    _, spans = one_trace(publisher, receiver, failed_rows)
    assert failed_rows[failed.id]["outcome"] == "failed"
    assert spans[(on_error.id, "process")]["celery.task.root_id"] == failed.id

    settings = pg_settings(pg_url)
    data = validated("show", cli("show", failed.id, "--json", settings=settings).stdout)
    tasks = by_task(data)
    assert tasks[failed.id]["role"] == "root" and tasks[failed.id]["status"] == "failed"
    # Celery sends a task errback as a group of its own (of one).
    assert tasks[on_error.id]["status"] == "succeeded"
    assert data["workflow"]["totals"]["failed"] == 1 and data["workflow"]["totals"]["done"] == 1
    table = cli("show", ok.id, settings=settings).stdout
    [line] = [line for line in table.splitlines() if on_success.id in line and "task" in line]
    assert "succeeded" in line


# -- the wrapper itself: no worker needed ------------------------------------------------------


def test_inside_a_current_span_the_members_are_its_children(
    publisher: Publisher, capp: Celery
) -> None:
    """Where a span is current (a web request, a task), the group adds no span of its own:
    its members' producer spans are the current span's children."""
    tracer = publisher.instrumentor._canvas._tracer
    with tracer.start_as_current_span("request") as request:
        result = group(sig(capp, "tests.add", 1, 2), sig(capp, "tests.add", 3, 4)).apply_async()
    finished = publisher.exporter.get_finished_spans()
    assert not [s for s in finished if s.name.startswith("apply")]
    sends = [s for s in finished if s.kind is SpanKind.PRODUCER]
    assert sorted(s.attributes["messaging.message.id"] for s in sends) == sorted(
        r.id for r in result.results
    )
    assert {s.parent.span_id for s in sends} == {request.get_span_context().span_id}


def test_the_canvas_call_is_unchanged_errors_eager_and_uninstrument(
    publisher: Publisher, capp: Celery, pg_url: str
) -> None:
    """Our wrapper keeps the canvas' exceptions (a group refuses ``link``: still TypeError,
    the span says so), adds nothing for an eager group (nothing is published), and is gone
    after uninstrument()."""
    members = group(sig(capp, "tests.add", 1, 2))
    with pytest.raises(TypeError, match="Cannot add link to group"):
        members.apply_async(link=sig(capp, "tests.add", 1))
    failed = internal_span(publisher, "apply group tests.add")
    assert failed.attributes["error.type"] == "TypeError"
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert not trace.get_current_span().get_span_context().is_valid  # detached again

    tests_app.conf.task_always_eager = True
    try:
        eager = group(tests_app.signature("tests.add", (1, 2))).apply_async()
    finally:
        tests_app.conf.task_always_eager = False
    assert eager.results[0].result == 3
    assert len(publisher.exporter.get_finished_spans()) == 1  # only the TypeError one

    assert hasattr(canvas.group.__dict__["apply_async"], "__wrapped__")
    assert hasattr(canvas._chord.__dict__["run"], "__wrapped__")
    provider = publisher.instrumentor._tracer_provider
    publisher.instrumentor.uninstrument()
    try:
        assert not hasattr(canvas.group.__dict__["apply_async"], "__wrapped__")
        assert not hasattr(canvas._chord.__dict__["run"], "__wrapped__")
    finally:
        publisher.instrumentor.instrument(
            tracer_provider=provider, audit_url=pg_url, flush_interval=0.05
        )


def test_a_failure_of_ours_leaves_the_group_as_without_us(
    publisher: Publisher, capp: Celery, monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[tuple[str, BaseException]],
) -> None:  # fmt: skip
    """If our span code fails, the guard reports it and the group is published as without us:
    same result, every member sent (each then the root of its own trace, as before)."""
    bug = RuntimeError("canvas hook bug")
    bug._ocp_expected = True  # type: ignore[attr-defined]

    def broken(_tasks: Any) -> str:
        raise bug

    monkeypatch.setattr(canvas_hooks, "_first_name", broken)
    result = group(sig(capp, "tests.add", 1, 2), sig(capp, "tests.add", 3, 4)).apply_async()
    assert len(result.results) == 2
    assert [where for where, exc in internal_errors if exc is bug] == ["canvas group"]
    finished = publisher.exporter.get_finished_spans()
    assert not [s for s in finished if s.name.startswith("apply")]
    sends = [s for s in finished if s.kind is SpanKind.PRODUCER]
    assert sorted(s.attributes["messaging.message.id"] for s in sends) == sorted(
        r.id for r in result.results
    )
    assert {format_span_id(s.context.span_id) for s in sends if s.parent is None} == {
        format_span_id(s.context.span_id) for s in sends
    }


def test_the_workflow_lookups_read_the_partial_indexes(tmp_path: Path, pg_url: str) -> None:
    """On PostgreSQL the group and root lookups of ``show`` use ix_<table>_group_id and
    ix_<table>_root_id: their WHERE clauses repeat the indexes' partial predicates."""
    settings = database("postgresql", tmp_path, pg_url)
    seed(settings, row(group_id="g-1", root_id="r-1"), row(root_id="r-1"), row())
    with _db.open_db(settings) as db:
        t = db.table
        for stmt, index in (
            (_show._by_group(t, ["g-1", "g-2"]), f"ix_{t.name}_group_id"),
            (_show._by_root(t, ["r-1", "r-2"]), f"ix_{t.name}_root_id"),
        ):
            compiled = stmt.compile(
                dialect=db.engine.dialect, compile_kwargs={"render_postcompile": True}
            )
            with db.engine.connect() as conn:
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = "\n".join(
                    r[0]
                    for r in conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)
                )
            assert index in plan, plan


# -- the workflow view on seeded rows --------------------------------------------------------


def member(index: int | None, **fields: Any) -> dict[str, Any]:
    options = {"serializer": "json"} | ({"group_index": index} if index is not None else {})
    return row(group_id="g-7", options=options, **fields)


def test_show_workflow_counts_tasks_by_their_latest_attempt(tmp_path: Path, pg_url: str) -> None:
    """A group's tasks are counted by their latest attempt (a retried member that then
    succeeded is done, with 2 attempts; a replayed one is replayed, its replay a task of its
    own), the chord callback is the group's task without an index; a plain task id still
    shows as before, and an id nobody has is one error line."""
    settings = database("sqlite", tmp_path, pg_url)
    done = {"sent_at": ago(9), "started_at": ago(9), "finished_at": ago(8)}
    replayed = member(3, task_id="m3", published_at=ago(10), replayed_at=ago(5))
    seed(
        settings,
        member(0, task_id="m0", published_at=ago(10), outcome="retried", **done),
        member(0, task_id="m0", published_at=ago(9), attempt=1, outcome="succeeded", **done),
        member(1, task_id="m1", published_at=ago(10, 1), outcome="failed",
               exception_type="ValueError", exception_message="boom", **done),
        member(2, task_id="m2", published_at=ago(10, 2)),
        replayed,
        member(3, task_id="m3b", published_at=ago(5), replay_of=replayed["publish_id"],
               outcome="succeeded", finished_at=ago(4)),
        member(None, task_id="cb", published_at=ago(7), parent_id="m0"),
        row(task_id="plain", published_at=ago(3)),
    )  # fmt: skip
    data = validated("show", cli("show", "g-7", "--json", settings=settings).stdout)
    flow = data["workflow"]
    assert flow["kind"] == "chord" and data["attempts"] == []
    tasks = by_task(data)
    assert [t["task_id"] for t in flow["tasks"]] == ["m2", "m1", "m0", "m3", "cb", "m3b"]
    assert (tasks["m0"]["attempts"], tasks["m0"]["status"]) == (2, "succeeded")
    assert (tasks["m3"]["status"], tasks["m3b"]["replay_of"]) == (
        "replayed",
        replayed["publish_id"],
    )
    assert (tasks["cb"]["role"], tasks["cb"]["waited_for"]) == ("callback", "g-7")
    assert {tasks[m]["role"] for m in ("m0", "m1", "m2", "m3", "m3b")} == {"member"}
    totals = flow["totals"]
    assert {k: totals[k] for k in ("tasks", "done", "failed", "unfinished", "replayed")} == {
        "tasks": 6, "done": 2, "failed": 1, "unfinished": 2, "replayed": 1,
    }  # fmt: skip
    table = cli("show", "g-7", settings=settings).stdout
    assert "chord (group id) g-7: 6 task(s), 2 done, 1 failed, 2 unfinished, 1 replayed" in table
    [m1] = [line for line in table.splitlines() if " m1 " in line]
    assert "member 1" in m1 and "failed" in m1 and "ValueError: boom" in m1

    plain = validated("show", cli("show", "plain", "--json", settings=settings).stdout)
    assert set(plain) == {"task_id", "attempts"}  # no workflow: exactly as before
    assert "task(s)" not in cli("show", "plain", settings=settings).stdout
    unknown = cli("show", "nope", settings=settings)
    assert unknown.exit_code == 1
    assert "no audit row for task id 'nope'" in unknown.output


def test_a_workflow_past_the_row_cap_is_cut_and_says_so(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_WORKFLOW_ROWS the workflow is cut at the cap, ``truncated`` and the table say
    so, and the totals count what is listed."""
    settings = database("sqlite", tmp_path, pg_url)
    seed(settings, *[member(i, task_id=f"m{i}", published_at=ago(10, i)) for i in range(5)])
    monkeypatch.setattr(_show, "MAX_WORKFLOW_ROWS", 3)
    data = validated("show", cli("show", "g-7", "--json", settings=settings).stdout)
    assert data["workflow"]["truncated"] is True
    assert len(data["workflow"]["tasks"]) == data["workflow"]["totals"]["tasks"] == 3
    table = cli("show", "g-7", settings=settings).stdout
    assert "cut: the workflow has more rows than the 3 tasks shown" in table
