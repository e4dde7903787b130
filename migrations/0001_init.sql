-- conveyor's own objects. Names are unqualified: `conveyor migrate` runs this with search_path
-- set to the configured schema (database.schema, default "conveyor").

-- One row per job (DESIGN §4). status: 0 running, 1 success, 3 failure (seeds/000 STAT).
CREATE TABLE IF NOT EXISTS jobs (
    job_name        text PRIMARY KEY,
    pipeline        text NOT NULL,
    slot            text NOT NULL,
    host            text NOT NULL,
    pid             integer NOT NULL,
    status          smallint NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 3)),
    phase           text NOT NULL DEFAULT 'init',
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at        timestamptz,
    end_reason      text CHECK (end_reason IN ('schedule', 'idle', 'rows', 'priority', 'manual', 'shutdown', 'error')),
    rows_read       bigint NOT NULL DEFAULT 0,
    rows_inserted   bigint NOT NULL DEFAULT 0,
    rows_updated    bigint NOT NULL DEFAULT 0,
    rows_rejected   bigint NOT NULL DEFAULT 0,
    rows_uv         bigint NOT NULL DEFAULT 0,
    batches         bigint NOT NULL DEFAULT 0,
    restarts        integer NOT NULL DEFAULT 0,
    handoff_gap_ms  double precision,
    params          jsonb,
    error           text
);
CREATE INDEX IF NOT EXISTS jobs_pipeline_started ON jobs (pipeline, started_at DESC);

-- Robust marks: one row per committed batch, written in the batch's own transaction, so a
-- retried batch whose COMMIT outcome was lost with the connection is recognised, not reloaded.
CREATE TABLE IF NOT EXISTS robust_log (
    job_name     text NOT NULL,
    batch_id     bigint NOT NULL,
    first_seq    bigint NOT NULL,
    last_seq     bigint NOT NULL,
    rows         integer NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_name, batch_id)
);
