-- Rotation (DESIGN §3): when a job became active and saw its last delivery (for handoff gaps
-- and "which job was active when"), and per-pipeline parameter overrides read at every job start.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS activated_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS last_delivery_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS rows_skipped bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (pipeline) WHERE status = 0;

-- One row per pipeline; a NULL column means "use the config file's value" (seeds/000 ETL2_CONFIG).
CREATE TABLE IF NOT EXISTS config (
    pipeline          text PRIMARY KEY,
    pack              integer CHECK (pack BETWEEN 1 AND 100000),
    latency_ms        integer CHECK (latency_ms BETWEEN 1 AND 3600000),
    sessions          integer CHECK (sessions BETWEEN 1 AND 64),
    rotate_every_s    integer CHECK (rotate_every_s >= 0),
    idle_eoj_s        integer CHECK (idle_eoj_s >= 0),
    max_rows          bigint CHECK (max_rows >= 0),
    depth_threshold   bigint CHECK (depth_threshold >= 0),
    priority_pack     integer CHECK (priority_pack BETWEEN 1 AND 100000),
    priority_sessions integer CHECK (priority_sessions BETWEEN 1 AND 64),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
