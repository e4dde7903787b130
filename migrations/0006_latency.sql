-- Latency statistics (DESIGN §4; seeds/001 "Analyzing Prototype Latency"). Latency of a row =
-- its batch's commit time (the database clock, read in the batch's transaction) − its queue_time.
-- The worker aggregates in memory per batch (no per-row query) and upserts these rows at every
-- status interval and at job end.
CREATE TABLE IF NOT EXISTS latency_minute (
    job_name        text NOT NULL,
    pipeline        text NOT NULL,
    minute          timestamptz NOT NULL,          -- commit minute (UTC, truncated)
    rows            bigint NOT NULL,
    rate_per_s      double precision NOT NULL,     -- rows / 60 (rows / seconds covered for a partial minute)
    cumulative_rows bigint NOT NULL,               -- the job's rows up to and including this minute
    min_s           double precision NOT NULL,
    max_s           double precision NOT NULL,
    avg_s           double precision NOT NULL,
    stddev_s        double precision NOT NULL,     -- population standard deviation
    -- The same relative to the job's minimum latency: removes a constant clock skew between
    -- publisher and database (the seed's correction).
    min_rel_s       double precision NOT NULL,
    max_rel_s       double precision NOT NULL,
    avg_rel_s       double precision NOT NULL,
    sum_s           double precision NOT NULL,     -- kept so partial minutes merge exactly
    sumsq_s         double precision NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_name, minute)
);
CREATE INDEX IF NOT EXISTS latency_minute_pipeline ON latency_minute (pipeline, minute);

-- Rows per latency range per job; bounds from [stats] latency_buckets. lower_s NULL = -inf
-- (negative latency: a publisher clock ahead of the database), upper_s NULL = +inf.
CREATE TABLE IF NOT EXISTS latency_histogram (
    job_name   text NOT NULL,
    pipeline   text NOT NULL,
    bucket     integer NOT NULL,
    lower_s    double precision,
    upper_s    double precision,
    rows       bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_name, bucket)
);
