-- Error consolidation (DESIGN §4, seeds/001 et_hist, seeds/004 post-processing procedure).
-- After each job its error tables (et_<job>: rows refused for their content; uv_<job>: rows
-- refused as duplicates of a unique key) are moved here, `limit` rows per transaction, and
-- dropped. `kind` is 'et' or 'uv'; the other columns are those of the job's tables.
CREATE TABLE IF NOT EXISTS error_history (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_name        text NOT NULL,
    pipeline        text,
    kind            text NOT NULL CHECK (kind IN ('et', 'uv')),
    seq             bigint NOT NULL,
    code            text NOT NULL,
    sqlstate        text,
    message         text NOT NULL,
    column_name     text,
    raw             bytea NOT NULL,
    queue_time      timestamptz,
    message_id      text,
    recorded_at     timestamptz NOT NULL,
    -- The moving transaction's start: rows moved together share it.
    consolidated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS error_history_job ON error_history (job_name, kind, seq);
CREATE INDEX IF NOT EXISTS error_history_recorded ON error_history (recorded_at);

-- One row per consolidation run. result: NULL running, 0 ok, 1 error, 2 locked by another
-- caller (prev_caller, prev_age_s name the holder). A run killed mid-way keeps result NULL
-- until the next run (or `conveyor consolidate --reset`) marks it abandoned.
CREATE TABLE IF NOT EXISTS postjob_runs (
    run_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    caller        text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    backend_pid   integer,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at      timestamptz,
    result        smallint CHECK (result IN (0, 1, 2)),
    prev_caller   text,
    prev_age_s    double precision,
    overrode      text,
    row_limit     integer NOT NULL,
    tables        integer NOT NULL DEFAULT 0,
    rows_moved    bigint NOT NULL DEFAULT 0,
    transactions  integer NOT NULL DEFAULT 0,
    error         text,
    reset_at      timestamptz
);
CREATE INDEX IF NOT EXISTS postjob_runs_started ON postjob_runs (started_at DESC);
