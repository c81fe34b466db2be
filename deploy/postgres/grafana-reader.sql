-- Run once by the postgres image when it creates the audit database (/docker-entrypoint-initdb.d):
-- the role Grafana's "Audit table" datasource logs in as. It can read and nothing else, as
-- Grafana's documentation asks of a SQL datasource (Grafana does not check what a query does).
CREATE ROLE grafana_reader LOGIN PASSWORD 'grafana';
DO $$
BEGIN
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO grafana_reader', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO grafana_reader;
-- The audit table does not exist yet (the migrate service creates it, as postgres): grant SELECT
-- on every table postgres creates in this schema from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
