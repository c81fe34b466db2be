"""Where rows go: from the hooks to the audit database, durably, without slowing the host down.

Imports ``schema``, ``rows`` and ``_guard``; never the hooks or the read side. The read side
(``audit``) uses ``database``, ``shipping`` and ``quarantine``, which never import the writer's
thread.

* ``writer``: :class:`~.writer.AuditWriter`, one per process: the durability modes, the breaker
  of the sync path, the shipping thread and its memory queue.
* ``database``: the engine factory, and the writer's database: the prepared single-row upsert
  and COPY for big batches.
* ``deadline``: client-side deadlines on every wait for the database, and ending the server
  sessions of connections abandoned at their deadline.
* ``shipping``: batches in which one refused record never stalls the others; shipping dead
  processes' spools (``celery audit drain``).
* ``spool``: this process's spool segment, and adopting dead processes' segments.
* ``records``: the :data:`~.records.Record` and its framing on disk: encoding, the safe
  unpickler, the row shape check.
* ``directories``: the ownership and permission checks of spool and quarantine directories.
* ``quarantine``: refusals told from outages, repaired, or set aside on disk and listed.
* ``heartbeat``: worker liveness, a heartbeat row per worker instance.
* ``instruments``: the sink's metrics, once per meter.
* ``process_hooks``: at-fork and atexit hooks, once per process however many writers.
"""
