-- conveyor_loader: the least-privilege PostgreSQL role conveyor.service connects as.
--
-- Run once per database, as a superuser or the database owner, connected to the database that
-- holds the target table (it is idempotent: run it again after adding a pipeline):
--
--   psql -v ON_ERROR_STOP=1 -d conveyor -f deploy/sql/role.sql
--   psql -v ON_ERROR_STOP=1 -d conveyor -v password="$(cat secret)" -f deploy/sql/role.sql
--
-- then put the role and its password in CONVEYOR_DATABASE_URL (/etc/conveyor/conveyor.env) and
-- let the daemon create its own objects: `conveyor --config /etc/conveyor/conveyor.toml migrate`
-- (run as this role, so it owns conveyor's tables and can apply later migrations itself).
--
-- Adapt the two names if your config differs: `conveyor` ([database] schema) and
-- `public.person` (each pipeline's `target`; repeat that block per target table).

-- 1. The role: may log in, nothing else (no superuser, no CREATEDB/CREATEROLE, no replication,
--    no RLS bypass). CREATE ROLE has no IF NOT EXISTS, hence the DO block. Roles are
--    cluster-wide: one role serves every database of the cluster it is granted on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'conveyor_loader') THEN
        CREATE ROLE conveyor_loader LOGIN;
    END IF;
END
$$;
ALTER ROLE conveyor_loader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    INHERIT;
-- Optionally cap its connections (each worker holds `sessions` loader connections, plus a few
-- for the rotator, status and consolidation; leave room for a restart's overlap):
-- ALTER ROLE conveyor_loader CONNECTION LIMIT 50;
-- The password, only when given with -v password=... (otherwise set it with \password).
\if :{?password}
ALTER ROLE conveyor_loader PASSWORD :'password';
\endif

-- 2. The database: CONNECT, and CREATE because `conveyor run` and `conveyor migrate` start with
--    `CREATE SCHEMA IF NOT EXISTS conveyor`, which PostgreSQL checks against CREATE on the
--    database even when the schema exists. (That is the only use: conveyor creates no other
--    schema.) The name comes from current_database(), so this file works in any database.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO conveyor_loader', current_database());
END
$$;

-- 3. conveyor's own schema: jobs, robust_log, status, error_history, ..., and the per-job error
--    tables et_<job>/uv_<job> the daemon creates at job start and drops after consolidation
--    (a table can only be dropped by its owner: the role that created it, i.e. this one).
CREATE SCHEMA IF NOT EXISTS conveyor;
GRANT USAGE, CREATE ON SCHEMA conveyor TO conveyor_loader;
-- If an administrator already ran `conveyor migrate` under another role, the tables belong to
-- that role: give the loader the rows (never ALTER/DROP), including tables that role creates later.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA conveyor TO conveyor_loader;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA conveyor TO conveyor_loader;
ALTER DEFAULT PRIVILEGES IN SCHEMA conveyor
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO conveyor_loader;
ALTER DEFAULT PRIVILEGES IN SCHEMA conveyor
    GRANT USAGE, SELECT ON SEQUENCES TO conveyor_loader;

-- 4. The target table (one block per pipeline `target`): USAGE on its schema to see it,
--    INSERT for the COPY of each batch (and INSERT ... ON CONFLICT DO NOTHING in
--    mode = "insert_ignore"), SELECT for the unique-key probes of each batch and for reading it
--    back (`conveyor view`, stats). No UPDATE, DELETE, TRUNCATE or DDL on the target.
--    The catalogue (columns, types, unique indexes) is readable by every role already.
GRANT USAGE ON SCHEMA public TO conveyor_loader;
GRANT SELECT, INSERT ON TABLE public.person TO conveyor_loader;
-- A serial column's sequence needs its own grant (identity columns do not), e.g.:
-- GRANT USAGE ON SEQUENCE public.person_id_seq TO conveyor_loader;
-- `conveyor view` (cut-off views of the target) creates a view in the target's schema; run it
-- as an owner, or allow the loader:
-- GRANT CREATE ON SCHEMA public TO conveyor_loader;
