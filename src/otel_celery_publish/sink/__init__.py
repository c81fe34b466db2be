"""Where rows go: the writer (durability modes, breaker, shipping thread), the database (engine,
bounded connections, upserts, COPY), the local spool, the quarantine of refused records, and the
worker heartbeat. Imports ``schema`` and ``rows``; never the hooks or the read side."""
