-- ETL2-style steps (seeds/000 ETL2_MONITOR): one row per job and step. A load step is a
-- pipeline route (kind 'load', one table); a post step is a SQL statement run after the job's
-- load succeeded (kind 'post'). status: 0 running or pending, 1 success, 3 failure (ETL2's STAT_*
-- values). Load steps' counters grow in each batch's own transaction, so they are exact.
CREATE TABLE IF NOT EXISTS steps (
    job_name    text NOT NULL,
    step        integer NOT NULL,
    pipeline    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('load', 'post')),
    name        text NOT NULL,
    status      smallint NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 3)),
    inserted    bigint NOT NULL DEFAULT 0,
    updated     bigint NOT NULL DEFAULT 0,
    ignored     bigint NOT NULL DEFAULT 0,
    errors      bigint NOT NULL DEFAULT 0,
    attempts    integer NOT NULL DEFAULT 0,
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    PRIMARY KEY (job_name, step)
);
CREATE INDEX IF NOT EXISTS steps_pending ON steps (status, kind) WHERE status <> 1;

-- Change journal (seeds/003, ODI's J$ tables): every row a journaled route loads is recorded
-- once per subscriber, in the batch's transaction. `conveyor journal lock` marks a subscriber's
-- unconsumed rows consumed (= 1) under a new window; `conveyor journal purge` deletes a window
-- only once the subscriber's run succeeded, so a failed run re-reads its window.
CREATE SEQUENCE IF NOT EXISTS change_window;
CREATE TABLE IF NOT EXISTS change_journal (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscriber  text NOT NULL,
    target      text NOT NULL,
    consumed    smallint NOT NULL DEFAULT 0 CHECK (consumed IN (0, 1)),
    flag        char(1) NOT NULL CHECK (flag IN ('I', 'U')),
    jrn_date    timestamptz NOT NULL DEFAULT now(),
    key         jsonb NOT NULL,
    job_name    text NOT NULL,
    window_id   bigint
);
CREATE INDEX IF NOT EXISTS change_journal_backlog ON change_journal (subscriber, consumed, id);
