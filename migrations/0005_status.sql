-- The monitor table (DESIGN §4; seeds/001 "TPump Monitor Table", seeds/000 STAT): one row per
-- running job, inserted at job start, updated every `status.interval`, deleted at job end.
-- Triggers copy every insert, update and delete into status_log with ind = i / u / d, as the
-- seed's TPumpStatusLog, so the history of a job's progress survives the job.
CREATE TABLE IF NOT EXISTS status (
    job_name      text PRIMARY KEY,
    pipeline      text NOT NULL,
    slot          text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    phase         text NOT NULL,
    rows_read     bigint NOT NULL DEFAULT 0,
    rows_sent     bigint NOT NULL DEFAULT 0,
    rows_inserted bigint NOT NULL DEFAULT 0,
    rows_rejected bigint NOT NULL DEFAULT 0,
    rows_skipped  bigint NOT NULL DEFAULT 0,
    restarts      integer NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS status_log (
    log_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ind           char(1) NOT NULL CHECK (ind IN ('i', 'u', 'd')),
    logged_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    job_name      text NOT NULL,
    pipeline      text NOT NULL,
    slot          text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    phase         text NOT NULL,
    rows_read     bigint NOT NULL,
    rows_sent     bigint NOT NULL,
    rows_inserted bigint NOT NULL,
    rows_rejected bigint NOT NULL,
    rows_skipped  bigint NOT NULL,
    restarts      integer NOT NULL,
    started_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS status_log_job ON status_log (job_name, log_id);

-- SET search_path FROM CURRENT: the function finds status_log in the schema it was created in,
-- whatever the search_path of the session that fires it.
CREATE OR REPLACE FUNCTION status_log_copy() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    r status%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    INSERT INTO status_log (ind, job_name, pipeline, slot, host, pid, phase, rows_read, rows_sent,
        rows_inserted, rows_rejected, rows_skipped, restarts, started_at, updated_at)
    VALUES (lower(left(TG_OP, 1)), r.job_name, r.pipeline, r.slot, r.host, r.pid, r.phase,
        r.rows_read, r.rows_sent, r.rows_inserted, r.rows_rejected, r.rows_skipped, r.restarts,
        r.started_at, r.updated_at);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS status_log_copy ON status;
CREATE TRIGGER status_log_copy AFTER INSERT OR UPDATE OR DELETE ON status
    FOR EACH ROW EXECUTE FUNCTION status_log_copy();
