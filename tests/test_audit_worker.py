"""With a real worker and the real ``celery -A tests.app audit`` entry point: a task stranded on
a queue nobody consumes is lost, replayed to a consumed queue it runs once; a worker killed
mid-task leaves a task started but never finished, reported once its heartbeat is stale. The
stranded task's story runs on Redis and on RabbitMQ."""

from __future__ import annotations

import datetime as dt
from typing import Any

from otel_celery_publish import audit
from tests.app import add, sleep
from tests.audit_support import celery_audit, cli, migrated, stored, validated
from tests.conftest import Broker, audit_rows, both_brokers, wait_row
from tests.otlp_receiver import wait_for


@both_brokers
def test_stranded_task_is_lost_then_replayed_once(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """lost reports it; a dry run sends nothing; replay --queue runs it once on the worker;
    lost no longer reports it; a second replay is refused."""
    settings = migrated(pg_url)
    on_broker = {"OCP_BROKER_URL": broker.url}
    start_worker()
    stranded = f"{queue_name}-nobody"
    broker.queues.append(stranded)
    task_id = add.apply_async((2, 3), queue=stranded).id
    [original] = wait_row(pg, task_id, lambda rows: rows[0]["sent_at"] is not None)
    found = celery_audit("lost", "--older-than", "0s", "--queue", stranded, "--json",
                         settings=settings, env=on_broker)  # fmt: skip
    assert found.returncode == 0, found.stderr
    [lost] = validated("lost", found.stdout)
    assert (lost["task_id"], lost["reason"]) == (task_id, "not_received")

    dry = celery_audit("replay", task_id, "--queue", queue_name, "--dry-run", "--json",
                       settings=settings, env=on_broker)  # fmt: skip
    assert validated("replay", dry.stdout)["would_send"] == 1, dry.stderr
    sent = celery_audit("replay", task_id, "--queue", queue_name, "--yes", "--json",
                        settings=settings, env=on_broker)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    [result] = validated("replay", sent.stdout)["results"]
    assert result["status"] == "sent"

    new_id = result["new_task_id"]
    [ran] = wait_row(pg, new_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert (ran["replay_of"], ran["queue"]) == (original["publish_id"], queue_name)
    assert ran["worker"].startswith("ocp-") and ran["args_repr"] == "(2, 3)"
    # Exactly one replay reached the audit table: the dry run sent nothing.
    assert [r["task_id"] for r in stored(settings, replay_of=original["publish_id"])] == [new_id]
    [marked] = audit_rows(pg, task_id)
    assert marked["replayed_as"] == new_id and marked["replayed_at"] is not None
    for queue in (stranded, queue_name):
        assert audit.lost(settings=settings, older_than=dt.timedelta(0), queue=queue) == []

    again = celery_audit("replay", task_id, "--queue", queue_name, "--yes",
                         settings=settings, env=on_broker)  # fmt: skip
    assert again.returncode == 1
    assert f"it was already replayed as {new_id}; --force replays it again" in again.stdout
    assert len(stored(settings, replay_of=original["publish_id"])) == 1


def test_worker_killed_mid_task_is_started_but_never_finished(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """SIGKILL the worker while its task runs: once its heartbeat is stale, lost says its
    worker died, naming it; the row's history shows the run unfinished."""
    settings = migrated(pg_url)
    # Solo pool: the task runs in the process we kill.
    worker = start_worker(env={"OTEL_CELERY_PUBLISH_HEARTBEAT_INTERVAL": "0.5"})
    task_id = sleep.apply_async((30,), queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    worker.proc.kill()
    worker.proc.wait(10)
    [stuck] = wait_for(
        lambda: audit.lost(settings=settings, older_than=dt.timedelta(0), queue=queue_name),
        10,
        "the task of the dead worker",
    )
    assert (stuck.task_id, stuck.reason, stuck.worker) == (task_id, "worker_dead", worker.nodename)
    table = celery_audit("lost", "--older-than", "0s", "--queue", queue_name, settings=settings)
    assert task_id in table.stdout and worker.nodename in table.stdout, table.stderr
    shown = cli("show", task_id, settings=settings).stdout
    assert "attempt 0: unfinished" in shown
    run_bar = next(line for line in shown.splitlines() if line.strip().startswith("run "))
    assert "░" in run_bar and "> " in run_bar
