//! Latency statistics (DESIGN §4; seeds/001 "Analyzing Prototype Latency"): per job and commit
//! minute — rows, rate, cumulative rows, min/max/avg/stddev of latency and the same relative to
//! the job's minimum latency — and rows per latency range.
//!
//! Latency of a row = its batch's commit time on the database clock (read inside the batch's
//! transaction, so publisher and database clocks are compared, not conveyor's) − its queue_time.
//! The session summarises each batch as it commits ([`BatchLatency`]: a handful of sums, no
//! per-row state kept); the worker merges the summaries per minute ([`JobLatency`]) and upserts
//! them at each status interval and at job end. No query per row, and the hot path only adds.

use std::collections::BTreeMap;

/// Upper bounds (seconds) of the default latency ranges: finer below a second, then the seed's
/// one-second ranges up to 10 s, then coarse. A range below 0 catches publisher clocks ahead of
/// the database; a last range is open-ended.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 20.0, 30.0, 60.0,
];

/// Sums over some rows' latencies (seconds): enough to merge and to derive avg and stddev.
#[derive(Debug, Clone, PartialEq)]
pub struct Acc {
    pub rows: u64,
    pub sum: f64,
    pub sumsq: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            rows: 0,
            sum: 0.0,
            sumsq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Acc {
    pub fn add(&mut self, x: f64) {
        self.rows += 1;
        self.sum += x;
        self.sumsq += x * x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    pub fn merge(&mut self, o: &Acc) {
        self.rows += o.rows;
        self.sum += o.sum;
        self.sumsq += o.sumsq;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    pub fn avg(&self) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            self.sum / self.rows as f64
        }
    }

    /// Population standard deviation (clamped at 0 against rounding).
    pub fn stddev(&self) -> f64 {
        if self.rows == 0 {
            return 0.0;
        }
        let n = self.rows as f64;
        let var = self.sumsq / n - (self.sum / n).powi(2);
        var.max(0.0).sqrt()
    }
}

/// Index of the range `x` falls in: 0 for x < bounds[0], i for bounds[i-1] ≤ x < bounds[i],
/// bounds.len() for x ≥ the last bound.
pub fn bucket(bounds: &[f64], x: f64) -> usize {
    bounds.partition_point(|b| *b <= x)
}

/// One committed batch's latencies.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLatency {
    /// The batch's commit time, µs since the epoch, database clock.
    pub commit_us: i64,
    pub acc: Acc,
    /// Rows per range (`bounds.len() + 1` entries).
    pub hist: Vec<u64>,
}

impl BatchLatency {
    /// Summarises rows with these queue times committed at `commit_us`.
    pub fn new(commit_us: i64, bounds: &[f64], queue_times_us: impl Iterator<Item = i64>) -> Self {
        let mut acc = Acc::default();
        let mut hist = vec![0; bounds.len() + 1];
        for q in queue_times_us {
            let x = (commit_us - q) as f64 / 1e6;
            acc.add(x);
            hist[bucket(bounds, x)] += 1;
        }
        BatchLatency {
            commit_us,
            acc,
            hist,
        }
    }
}

/// One row of `latency_minute`.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRow {
    /// Start of the minute, µs since the epoch.
    pub minute_us: i64,
    pub rows: u64,
    pub rate_per_s: f64,
    pub cumulative_rows: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub stddev: f64,
    pub min_rel: f64,
    pub max_rel: f64,
    pub avg_rel: f64,
    pub sum: f64,
    pub sumsq: f64,
}

/// A job's latencies so far, per commit minute and per range.
#[derive(Debug, Clone)]
pub struct JobLatency {
    bounds: Vec<f64>,
    minutes: BTreeMap<i64, Acc>,
    hist: Vec<u64>,
    /// Whether something was added since the last [`JobLatency::take_dirty`].
    dirty: bool,
}

impl JobLatency {
    pub fn new(bounds: &[f64]) -> Self {
        JobLatency {
            bounds: bounds.to_vec(),
            minutes: BTreeMap::new(),
            hist: vec![0; bounds.len() + 1],
            dirty: false,
        }
    }

    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    pub fn add(&mut self, b: &BatchLatency) {
        if b.acc.rows == 0 {
            return;
        }
        let minute = b.commit_us.div_euclid(60_000_000) * 60_000_000;
        self.minutes.entry(minute).or_default().merge(&b.acc);
        for (h, n) in self.hist.iter_mut().zip(&b.hist) {
            *h += n;
        }
        self.dirty = true;
    }

    /// True once if rows were added since the last call: whether a flush has anything new.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Every minute's row, relative columns against the job's minimum latency so far.
    pub fn minute_rows(&self) -> Vec<MinuteRow> {
        let job_min = self
            .minutes
            .values()
            .map(|a| a.min)
            .fold(f64::INFINITY, f64::min);
        let mut cumulative = 0;
        self.minutes
            .iter()
            .map(|(m, a)| {
                cumulative += a.rows;
                MinuteRow {
                    minute_us: *m,
                    rows: a.rows,
                    rate_per_s: a.rows as f64 / 60.0,
                    cumulative_rows: cumulative,
                    min: a.min,
                    max: a.max,
                    avg: a.avg(),
                    stddev: a.stddev(),
                    min_rel: a.min - job_min,
                    max_rel: a.max - job_min,
                    avg_rel: a.avg() - job_min,
                    sum: a.sum,
                    sumsq: a.sumsq,
                }
            })
            .collect()
    }

    /// (lower, upper, rows) per range; `None` = unbounded.
    pub fn histogram(&self) -> Vec<(Option<f64>, Option<f64>, u64)> {
        (0..self.hist.len())
            .map(|i| {
                let lower = i.checked_sub(1).map(|j| self.bounds[j]);
                let upper = self.bounds.get(i).copied();
                (lower, upper, self.hist[i])
            })
            .collect()
    }
}

/// Upserts the job's minute rows and histogram (`latency_minute`, `latency_histogram` in
/// `schema`): every minute and range, recomputed, so the relative columns follow the job's
/// minimum as it moves.
pub async fn save(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    job: &str,
    pipeline: &str,
    lat: &JobLatency,
) -> Result<(), sqlx::Error> {
    let s = crate::db::quote_ident(schema);
    let rows = lat.minute_rows();
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&MinuteRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let minutes: Vec<i64> = rows.iter().map(|r| r.minute_us).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.rows as i64).collect();
    let cumulative: Vec<i64> = rows.iter().map(|r| r.cumulative_rows as i64).collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {s}.latency_minute AS l (job_name, pipeline, minute, rows, rate_per_s,
             cumulative_rows, min_s, max_s, avg_s, stddev_s, min_rel_s, max_rel_s, avg_rel_s,
             sum_s, sumsq_s)
         SELECT $1, $2, to_timestamp(m::float8 / 1e6), n, r, c, mn, mx, av, sd, mnr, mxr, avr, su, sq
         FROM unnest($3::int8[], $4::int8[], $5::float8[], $6::int8[], $7::float8[], $8::float8[],
                     $9::float8[], $10::float8[], $11::float8[], $12::float8[], $13::float8[],
                     $14::float8[], $15::float8[])
              AS u(m, n, r, c, mn, mx, av, sd, mnr, mxr, avr, su, sq)
         ON CONFLICT (job_name, minute) DO UPDATE SET rows = EXCLUDED.rows,
             rate_per_s = EXCLUDED.rate_per_s, cumulative_rows = EXCLUDED.cumulative_rows,
             min_s = EXCLUDED.min_s, max_s = EXCLUDED.max_s, avg_s = EXCLUDED.avg_s,
             stddev_s = EXCLUDED.stddev_s, min_rel_s = EXCLUDED.min_rel_s,
             max_rel_s = EXCLUDED.max_rel_s, avg_rel_s = EXCLUDED.avg_rel_s,
             sum_s = EXCLUDED.sum_s, sumsq_s = EXCLUDED.sumsq_s, updated_at = clock_timestamp()"
    )))
    .bind(job)
    .bind(pipeline)
    .bind(&minutes)
    .bind(&counts)
    .bind(col(|r| r.rate_per_s))
    .bind(&cumulative)
    .bind(col(|r| r.min))
    .bind(col(|r| r.max))
    .bind(col(|r| r.avg))
    .bind(col(|r| r.stddev))
    .bind(col(|r| r.min_rel))
    .bind(col(|r| r.max_rel))
    .bind(col(|r| r.avg_rel))
    .bind(col(|r| r.sum))
    .bind(col(|r| r.sumsq))
    .execute(&mut *conn)
    .await?;
    let hist = lat.histogram();
    let idx: Vec<i32> = (0..hist.len() as i32).collect();
    let lower: Vec<Option<f64>> = hist.iter().map(|h| h.0).collect();
    let upper: Vec<Option<f64>> = hist.iter().map(|h| h.1).collect();
    let n: Vec<i64> = hist.iter().map(|h| h.2 as i64).collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {s}.latency_histogram AS h (job_name, pipeline, bucket, lower_s, upper_s, rows)
         SELECT $1, $2, b, lo, hi, n
         FROM unnest($3::int4[], $4::float8[], $5::float8[], $6::int8[]) AS u(b, lo, hi, n)
         ON CONFLICT (job_name, bucket) DO UPDATE SET rows = EXCLUDED.rows,
             lower_s = EXCLUDED.lower_s, upper_s = EXCLUDED.upper_s, updated_at = clock_timestamp()"
    )))
    .bind(job)
    .bind(pipeline)
    .bind(&idx)
    .bind(&lower)
    .bind(&upper)
    .bind(&n)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_half_open() {
        let b = [0.0, 1.0, 2.0];
        assert_eq!(bucket(&b, -0.5), 0);
        assert_eq!(bucket(&b, 0.0), 1);
        assert_eq!(bucket(&b, 0.99), 1);
        assert_eq!(bucket(&b, 1.0), 2);
        assert_eq!(bucket(&b, 2.0), 3);
        assert_eq!(bucket(&b, 99.0), 3);
    }

    #[test]
    fn minutes_relative_columns_and_cumulative() {
        let mut j = JobLatency::new(DEFAULT_BUCKETS);
        // Minute 0: latencies 1 s and 3 s; minute 1: 8 s (a skewed publisher).
        j.add(&BatchLatency::new(
            10_000_000,
            DEFAULT_BUCKETS,
            [9_000_000, 7_000_000].into_iter(),
        ));
        j.add(&BatchLatency::new(
            70_000_000,
            DEFAULT_BUCKETS,
            [62_000_000].into_iter(),
        ));
        let rows = j.minute_rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].minute_us, rows[0].rows, rows[0].cumulative_rows),
            (0, 2, 2)
        );
        assert_eq!(
            (rows[1].minute_us, rows[1].cumulative_rows),
            (60_000_000, 3)
        );
        assert!((rows[0].avg - 2.0).abs() < 1e-9);
        assert!((rows[0].stddev - 1.0).abs() < 1e-9);
        assert!(
            (rows[1].min_rel - 7.0).abs() < 1e-9,
            "relative to the job's 1 s minimum"
        );
        assert!((rows[0].max_rel - 2.0).abs() < 1e-9);
        let h = j.histogram();
        assert_eq!(h[0], (None, Some(0.0), 0));
        assert_eq!(h.iter().map(|(_, _, n)| n).sum::<u64>(), 3);
        assert_eq!(h.last().map(|x| (x.1, x.2)), Some((None, 0)));
    }

    proptest! {
        /// Merging per-batch sums gives the statistics of all the rows at once.
        #[test]
        fn merged_batches_match_direct_statistics(
            lat in proptest::collection::vec(-5_000_000i64..120_000_000, 1..200),
            split in 1usize..10,
        ) {
            let commit = 200_000_000i64;
            let mut j = JobLatency::new(DEFAULT_BUCKETS);
            for chunk in lat.chunks(split) {
                j.add(&BatchLatency::new(commit, DEFAULT_BUCKETS, chunk.iter().map(|l| commit - l)));
            }
            let rows = j.minute_rows();
            prop_assert_eq!(rows.len(), 1);
            let xs: Vec<f64> = lat.iter().map(|l| *l as f64 / 1e6).collect();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
            let min = xs.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert_eq!(rows[0].rows, lat.len() as u64);
            prop_assert!((rows[0].avg - mean).abs() < 1e-6);
            prop_assert!((rows[0].stddev - sd).abs() < 1e-4);
            prop_assert!((rows[0].min - min).abs() < 1e-9 && (rows[0].max - max).abs() < 1e-9);
            prop_assert_eq!(j.histogram().iter().map(|h| h.2).sum::<u64>(), lat.len() as u64);
        }
    }
}
