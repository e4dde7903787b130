-- Durability (DESIGN §2, §5). Robust marks are keyed by the first spool sequence they cover:
-- batch ids restart when a crashed job's spool is recovered, sequences never repeat in a job.
ALTER TABLE robust_log DROP CONSTRAINT IF EXISTS robust_log_pkey;
ALTER TABLE robust_log ADD PRIMARY KEY (job_name, first_seq);

-- A job whose process died is closed at the next start with end_reason 'crash' (its spool,
-- if any, recovered and loaded).
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_end_reason_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_end_reason_check CHECK (end_reason IN
    ('schedule', 'idle', 'rows', 'priority', 'manual', 'shutdown', 'error', 'crash'));
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS rows_recovered bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS rows_duplicate bigint NOT NULL DEFAULT 0;

-- durability = "broker": message_ids loaded by each batch, written in the batch's transaction,
-- so a redelivered message that was already loaded is recognised and acked, not loaded again.
-- A job that ends cleanly deletes its ids (its acks were all applied); others age out.
CREATE TABLE IF NOT EXISTS loaded_ids (
    pipeline   text NOT NULL,
    message_id text NOT NULL,
    job_name   text NOT NULL,
    loaded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, message_id)
);
CREATE INDEX IF NOT EXISTS loaded_ids_job ON loaded_ids (job_name);
CREATE INDEX IF NOT EXISTS loaded_ids_age ON loaded_ids (loaded_at);
