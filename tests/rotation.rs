//! Rotation against the real services: each pipeline runs two workers (slots 01 and 02) on a
//! single-active-consumer queue; a job ends on a marker in the queue (schedule, manual), on its
//! own (idle, max rows), or ahead of the backlog (priority control), and the other worker takes
//! over. Every test checks that no row is lost or loaded twice across the handoffs, and that two
//! jobs never consume at the same time (the active windows recorded in `jobs` do not overlap).

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::Row;
use support::{Daemon, Env, Settings};

/// One row of the `jobs` table, as these tests read it.
#[derive(Debug, Clone)]
struct JobRow {
    name: String,
    slot: String,
    pid: i32,
    status: i16,
    phase: String,
    end_reason: Option<String>,
    rows_read: i64,
    rows_inserted: i64,
    rows_skipped: i64,
    activated_at: Option<DateTime<Utc>>,
    last_delivery_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    handoff_gap_ms: Option<f64>,
}

/// Every job of the test, in activation order (jobs never activated last, by start time).
/// Empty while the daemon has not created the table yet.
async fn jobs(env: &Env) -> Vec<JobRow> {
    let mut db = support::pg().await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT job_name, slot, pid, status, phase, end_reason, rows_read, rows_inserted,
                rows_skipped, activated_at, last_delivery_at, ended_at, handoff_gap_ms
         FROM {}.jobs ORDER BY activated_at NULLS LAST, started_at, job_name",
        env.schema
    )))
    .fetch_all(&mut db)
    .await
    .unwrap_or_default();
    rows.iter()
        .map(|r| JobRow {
            name: r.get("job_name"),
            slot: r.get("slot"),
            pid: r.get("pid"),
            status: r.get("status"),
            phase: r.get("phase"),
            end_reason: r.get("end_reason"),
            rows_read: r.get("rows_read"),
            rows_inserted: r.get("rows_inserted"),
            rows_skipped: r.get("rows_skipped"),
            activated_at: r.get("activated_at"),
            last_delivery_at: r.get("last_delivery_at"),
            ended_at: r.get("ended_at"),
            handoff_gap_ms: r.get("handoff_gap_ms"),
        })
        .collect()
}

/// The jobs table as text, for assertion messages.
fn describe(jobs: &[JobRow]) -> String {
    let t = |d: &Option<DateTime<Utc>>| {
        d.map_or("-".to_string(), |d| d.format("%H:%M:%S%.6f").to_string())
    };
    let mut s = String::from(
        "\njob | slot | pid | status | phase | end_reason | read | inserted | skipped | activated | last_delivery | ended | gap_ms\n",
    );
    for j in jobs {
        s.push_str(&format!(
            "{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}\n",
            j.name,
            j.slot,
            j.pid,
            j.status,
            j.phase,
            j.end_reason.as_deref().unwrap_or("-"),
            j.rows_read,
            j.rows_inserted,
            j.rows_skipped,
            t(&j.activated_at),
            t(&j.last_delivery_at),
            t(&j.ended_at),
            j.handoff_gap_ms.map_or("-".into(), |g| format!("{g:.1}")),
        ));
    }
    s
}

/// Jobs that owned the queue at some point, in activation order.
fn activated(jobs: &[JobRow]) -> Vec<&JobRow> {
    let mut v: Vec<&JobRow> = jobs.iter().filter(|j| j.activated_at.is_some()).collect();
    v.sort_by_key(|j| j.activated_at);
    v
}

fn with_reason<'a>(jobs: &'a [JobRow], reason: &str) -> Vec<&'a JobRow> {
    jobs.iter()
        .filter(|j| j.end_reason.as_deref() == Some(reason))
        .collect()
}

/// Two jobs never consume at once: among jobs that have both an activation and a last delivery,
/// each one's last delivery comes no later than the next one's activation.
fn assert_windows_do_not_overlap(jobs: &[JobRow], env: &Env) {
    let mut w: Vec<&JobRow> = jobs
        .iter()
        .filter(|j| j.activated_at.is_some() && j.last_delivery_at.is_some())
        .collect();
    w.sort_by_key(|j| j.activated_at);
    for pair in w.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        assert!(
            prev.last_delivery_at <= next.activated_at,
            "active windows overlap: {} received a delivery at {:?}, after {} became active at {:?}; logs in {}{}",
            prev.name,
            prev.last_delivery_at,
            next.name,
            next.activated_at,
            env.dir.display(),
            describe(jobs)
        );
    }
}

/// A job's handoff gap runs from the previous job's last delivery to its own first one, so it
/// can never exceed the time since the previous job (whichever process ran it) became active.
fn assert_gaps_fit_the_handoffs(jobs: &[JobRow], env: &Env) {
    let a = activated(jobs);
    for pair in a.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let (Some(gap), Some(p), Some(n)) =
            (next.handoff_gap_ms, prev.activated_at, next.activated_at)
        else {
            continue;
        };
        let bound = (n - p).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
        assert!(
            gap <= bound + 50.0,
            "{} reports a handoff gap of {gap:.1} ms, but the job before it ({}, pid {}) became active only {bound:.1} ms earlier: the gap is measured from an older job of pid {}; logs in {}{}",
            next.name,
            prev.name,
            prev.pid,
            next.pid,
            env.dir.display(),
            describe(jobs)
        );
    }
}

/// Consecutive active jobs belong to different slots (the standby takes over).
fn assert_slots_alternate(jobs: &[JobRow], env: &Env) {
    let a = activated(jobs);
    for pair in a.windows(2) {
        assert_ne!(
            pair[0].slot,
            pair[1].slot,
            "{} was followed by {} of the same slot; logs in {}{}",
            pair[0].name,
            pair[1].name,
            env.dir.display(),
            describe(jobs)
        );
    }
}

/// Waits until the daemon has logged `n` consumer registrations (workers standing by or active).
async fn wait_registered(daemon: &Daemon, n: usize, timeout: Duration) {
    let start = Instant::now();
    while daemon.log_text().matches("registered as consumer").count() < n {
        if start.elapsed() > timeout {
            panic!(
                "daemon did not register {n} consumer(s) within {timeout:?}; log: {}",
                daemon.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until no job holds the queue any more (the last one ended, its partner never got a
/// delivery).
async fn wait_none_active(env: &Env, timeout: Duration) {
    env.wait_for("the last active job to end", timeout, || async {
        !jobs(env)
            .await
            .iter()
            .any(|j| j.status == 0 && j.phase == "active")
    })
    .await;
}

/// Person rows whose `db_time` lies in no job's [activated_at, ended_at].
async fn rows_outside_job_windows(env: &Env) -> i64 {
    env.scalar(
        "SELECT count(*)::int8 FROM {schema}.person p WHERE NOT EXISTS (
            SELECT 1 FROM {schema}.jobs j
            WHERE j.activated_at IS NOT NULL
              AND p.db_time::timestamptz BETWEEN j.activated_at AND coalesce(j.ended_at, clock_timestamp()))",
    )
    .await
}

/// Error rows grouped by the job that wrote them, code, and the job whose active window holds the
/// commit time of the row the id already belongs to (for duplicates: which job loaded it first).
/// For assertion messages; call it while the daemon is stopped (jobs drop empty error tables).
async fn error_details(env: &Env) -> String {
    let mut db = support::pg().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND table_name LIKE 'et\\_%'",
    )
    .bind(&env.schema)
    .fetch_all(&mut db)
    .await
    .unwrap_or_default();
    let mut out = String::new();
    for t in tables {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT e.code, j.job_name AS first_loaded_by, count(*)::int8 AS n,
                    min(e.seq)::int8 AS min_seq, max(e.seq)::int8 AS max_seq,
                    min(split_part(e.message_id, '-', 2))::text AS min_id,
                    max(split_part(e.message_id, '-', 2))::text AS max_id
             FROM {s}.\"{t}\" e
             LEFT JOIN {s}.person p ON e.message_id IS NOT NULL AND trim(p.id) = split_part(e.message_id, '-', 2)
             LEFT JOIN {s}.jobs j ON p.db_time::timestamptz BETWEEN j.activated_at AND coalesce(j.ended_at, clock_timestamp())
             GROUP BY 1, 2 ORDER BY 4",
            s = env.schema
        )))
        .fetch_all(&mut db)
        .await
        .unwrap_or_default();
        for r in rows {
            out.push_str(&format!(
                "\n{t}: {} × {} (seq {}..{}, ids {}..{}), first loaded by {}",
                r.get::<i64, _>("n"),
                r.get::<String, _>("code"),
                r.get::<i64, _>("min_seq"),
                r.get::<i64, _>("max_seq"),
                r.get::<Option<String>, _>("min_id").unwrap_or_default(),
                r.get::<Option<String>, _>("max_id").unwrap_or_default(),
                r.get::<Option<String>, _>("first_loaded_by")
                    .unwrap_or_else(|| "-".into()),
            ));
        }
    }
    out
}

/// Asserts that no row went to an error table (call after the daemon stopped).
async fn assert_no_error_rows(env: &Env) {
    let codes = env.error_codes().await;
    assert!(
        codes.is_empty(),
        "error rows {codes:?} for a clean feed:{}\nlogs in {}{}",
        error_details(env).await,
        env.dir.display(),
        describe(&jobs(env).await)
    );
}

async fn sigterm_and_drain(daemon: &mut Daemon, env: &Env) {
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "SIGTERM exits 0; log: {}",
        daemon.log_text()
    );
    assert_eq!(
        queue_depth(env).await,
        0,
        "nothing left in the queue; logs in {}",
        env.dir.display()
    );
}

/// `Env::queue_depth`, bounded (it ends with lapin's `Connection::close`, see `finish`).
async fn queue_depth(env: &Env) -> u32 {
    tokio::time::timeout(Duration::from_secs(15), env.queue_depth())
        .await
        .expect("reading the queue depth took over 15 s")
}

/// `Env::cleanup`, bounded: once it hung forever in lapin's `Connection::close` after the queue
/// was already deleted (broker log: "client unexpectedly closed TCP connection").
async fn finish(env: Env) {
    let _ = tokio::time::timeout(Duration::from_secs(15), env.cleanup()).await;
}

/// The test's settings: its own pipeline name, reports in the test's directory, and `extra`
/// lines for the pipeline. The pipeline name is part of every job name; with the same name in
/// every test, two tests' jobs started in the same second share a name, and a priority control
/// message (fanout exchange `conveyor.control`, shared by the whole broker) for one of them ends
/// the other too.
fn settings(env: &Env, extra: &str) -> Settings {
    Settings {
        extra: extra.into(),
        report_dir: Some(env.dir.join("reports")),
        pipeline: env.name.clone(),
        ..Settings::default()
    }
}

/// Waits until `n` rows are in the target table. (Not `Env::wait_loaded`: it lists the error
/// tables and then counts them, and a rotating job drops its empty error table in between.)
async fn wait_rows(env: &Env, n: i64, timeout: Duration) {
    env.wait_for(&format!("{n} rows in person"), timeout, || async {
        env.loaded().await.0 >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_every_two_seconds_under_load() {
    let env = Env::new("rot_sched").await;
    let s = Settings {
        latency_ms: 50,
        ..settings(&env, "rotate_every = \"2s\"\nidle_eoj = \"0s\"")
    };
    let mut daemon = env.spawn(&s);
    wait_registered(&daemon, 2, Duration::from_secs(20)).await;
    let fed = env.feed_rate(30_000, 2_000, 0.0, 10_000_000, 21).await;
    assert_eq!(fed.published, 30_000);
    wait_rows(&env, 30_000, Duration::from_secs(30)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 30_000, "every row loaded once");
    assert_eq!(sum as u128, fed.good_id_sum, "exactly the fed ids");
    // The job active when the feed stopped still gets its scheduled marker.
    wait_none_active(&env, Duration::from_secs(15)).await;
    sigterm_and_drain(&mut daemon, &env).await;
    assert_no_error_rows(&env).await;

    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let scheduled = with_reason(&all, "schedule");
    // 15 s of load, a job every 2 s plus the rotator's 100 ms tick and the handoff: 7 or 8.
    assert!(
        scheduled.len() >= 7,
        "at least 7 scheduled rotations in 15 s of load at rotate_every = 2s, got {}; logs in {}{d}",
        scheduled.len(),
        env.dir.display()
    );
    assert_eq!(
        scheduled.len(),
        activated(&all).len(),
        "every job that was active ended on its schedule{d}"
    );
    for j in &scheduled {
        let held = j
            .last_delivery_at
            .zip(j.activated_at)
            .map(|(l, a)| (l - a).num_milliseconds())
            .unwrap_or(-1);
        assert!(
            (1_900..3_000).contains(&held),
            "{} read its marker {held} ms after it became active (rotate_every = 2s){d}",
            j.name
        );
    }
    assert!(
        all.iter().all(|j| j.status == 1),
        "every job ended successfully{d}"
    );
    let total: i64 = all.iter().map(|j| j.rows_inserted).sum();
    assert_eq!(total, 30_000, "rows_inserted over the jobs adds up{d}");
    let read: i64 = all.iter().map(|j| j.rows_read).sum();
    assert_eq!(read, 30_000, "rows_read over the jobs adds up{d}");
    assert_slots_alternate(&all, &env);
    assert_windows_do_not_overlap(&all, &env);
    assert_eq!(
        rows_outside_job_windows(&env).await,
        0,
        "every row was committed while the job that read it was active{d}"
    );
    // Handoff gaps: every job that took over from a scheduled end measures its gap.
    let a = activated(&all);
    let successors: Vec<&&JobRow> = a
        .iter()
        .skip(1)
        .zip(a.iter())
        .filter(|(_, prev)| prev.end_reason.as_deref() == Some("schedule"))
        .map(|(next, _)| next)
        .collect();
    let with_gap = successors
        .iter()
        .filter(|j| j.handoff_gap_ms.is_some())
        .count();
    assert!(
        successors.len() + 1 == a.len() && with_gap * 4 >= successors.len() * 3,
        "handoff_gap_ms is set on most scheduled handoffs ({with_gap} of {}){d}",
        successors.len()
    );
    let max_gap = all
        .iter()
        .filter_map(|j| j.handoff_gap_ms)
        .fold(0.0, f64::max);
    assert!(max_gap < 1000.0, "handoff gap {max_gap} ms ≥ 1 s{d}");
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eoj_in_a_prefetched_burst_splits_rows_between_jobs() {
    let env = Env::new("rot_burst").await;
    // Everything is queued before the daemon starts: the marker arrives inside a prefetched burst.
    let first = env.feed(1_000, 0.0, 20_000_000, 31).await;
    env.publish_raw(&[vec![]]).await;
    let second = env.feed(1_000, 0.0, 21_000_000, 32).await;
    let s = Settings {
        prefetch: 500,
        pack: 100,
        ..settings(&env, "rotate_every = \"0s\"\nidle_eoj = \"0s\"")
    };
    let mut daemon = env.spawn(&s);
    wait_rows(&env, 2_000, Duration::from_secs(30)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 2_000, "nothing lost or loaded twice");
    assert_eq!(sum as u128, first.good_id_sum + second.good_id_sum);
    sigterm_and_drain(&mut daemon, &env).await;
    assert_no_error_rows(&env).await;

    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let manual = with_reason(&all, "manual");
    assert_eq!(manual.len(), 1, "exactly one job ended on the marker{d}");
    let ended = manual[0];
    assert_eq!(
        (ended.rows_read, ended.rows_inserted),
        (1_000, 1_000),
        "the job that read the marker loaded exactly the rows before it{d}"
    );
    let a = activated(&all);
    assert_eq!(
        a.len(),
        2,
        "the marker's job and one successor were active{d}"
    );
    assert_eq!(a[0].name, ended.name, "the marker ended the first job{d}");
    let next = a[1];
    assert_ne!(next.slot, ended.slot, "the standby took over{d}");
    assert_eq!(
        (next.rows_read, next.rows_inserted),
        (1_000, 1_000),
        "the next job loaded the rows after the marker{d}"
    );
    assert_windows_do_not_overlap(&all, &env);
    // Rows before the marker were committed by the ending job, rows after it by the next.
    let before_in_first = env
        .scalar(&format!(
            "SELECT count(*)::int8 FROM {{schema}}.person WHERE id::int8 < 21000000
               AND db_time::timestamptz <= (SELECT ended_at FROM {{schema}}.jobs WHERE job_name = '{}')",
            ended.name
        ))
        .await;
    assert_eq!(before_in_first, 1_000, "rows before the marker{d}");
    let after_in_next = env
        .scalar(&format!(
            "SELECT count(*)::int8 FROM {{schema}}.person WHERE id::int8 >= 21000000
               AND db_time::timestamptz >= (SELECT activated_at FROM {{schema}}.jobs WHERE job_name = '{}')",
            next.name
        ))
        .await;
    assert_eq!(after_in_next, 1_000, "rows after the marker{d}");
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_max_rows_end_jobs() {
    // (a) idle: a job that has read rows ends after idle_eoj without deliveries.
    {
        let env = Env::new("rot_idle").await;
        let mut daemon = env.spawn(&settings(&env, "rotate_every = \"0s\"\nidle_eoj = \"1s\""));
        wait_registered(&daemon, 2, Duration::from_secs(20)).await;
        let fed = env.feed(500, 0.0, 30_000_000, 41).await;
        wait_rows(&env, 500, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let all = jobs(&env).await;
        let d = describe(&all);
        let idle = with_reason(&all, "idle");
        assert_eq!(idle.len(), 1, "one job ended idle{d}");
        assert_eq!(
            (idle[0].rows_read, idle[0].rows_inserted),
            (500, 500),
            "the idle job read and loaded the 500 rows{d}"
        );
        assert_eq!(idle[0].status, 1, "an idle end is a successful end{d}");
        let (n, sum) = env.loaded().await;
        assert_eq!((n, sum as u128), (500, fed.good_id_sum));
        sigterm_and_drain(&mut daemon, &env).await;
        finish(env).await;
    }
    // (b) max_rows: each job ends after reading 300 rows; the rest goes to the next job.
    {
        let env = Env::new("rot_rows").await;
        let mut daemon = env.spawn(&settings(
            &env,
            "rotate_every = \"0s\"\nidle_eoj = \"0s\"\nmax_rows = 300",
        ));
        wait_registered(&daemon, 2, Duration::from_secs(20)).await;
        let fed = env.feed(1_000, 0.0, 31_000_000, 42).await;
        wait_rows(&env, 1_000, Duration::from_secs(30)).await;
        env.wait_for(
            "three jobs ended by max_rows",
            Duration::from_secs(10),
            || async { with_reason(&jobs(&env).await, "rows").len() >= 3 },
        )
        .await;
        let (n, sum) = env.loaded().await;
        assert_eq!(n, 1_000, "every row loaded once");
        assert_eq!(sum as u128, fed.good_id_sum);
        sigterm_and_drain(&mut daemon, &env).await;
        let all = jobs(&env).await;
        let d = describe(&all);
        let rows = with_reason(&all, "rows");
        assert_eq!(
            rows.len(),
            3,
            "1,000 rows at max_rows = 300: three full jobs{d}"
        );
        for j in &rows {
            assert_eq!(
                (j.rows_read, j.rows_inserted),
                (300, 300),
                "{} read exactly max_rows{d}",
                j.name
            );
        }
        let total: i64 = all.iter().map(|j| j.rows_inserted).sum();
        assert_eq!(total, 1_000, "the last 100 rows went to the next job{d}");
        assert_windows_do_not_overlap(&all, &env);
        finish(env).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_eoj_overtakes_a_backlog() {
    let env = Env::new("rot_prio").await;
    let fed = env.feed(100_000, 0.0, 40_000_000, 51).await;
    assert_eq!(fed.published, 100_000);
    let s = Settings {
        prefetch: 5_000,
        ..settings(
            &env,
            "rotate_every = \"0s\"\nidle_eoj = \"0s\"\ndepth_threshold = 1000\ndepth_poll = \"200ms\"\npriority_pack = 2000",
        )
    };
    let mut daemon = env.spawn(&s);
    // The first priority end must come while most of the backlog is still queued.
    let start = Instant::now();
    let mut depth_at_first_priority = None;
    while start.elapsed() < Duration::from_secs(30) {
        if !with_reason(&jobs(&env).await, "priority").is_empty() {
            depth_at_first_priority = Some(queue_depth(&env).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let depth = depth_at_first_priority.unwrap_or_else(|| {
        panic!(
            "no job ended with 'priority' within 30 s; logs in {}{d}",
            env.dir.display()
        )
    });
    let first = with_reason(&all, "priority")[0].clone();
    let held = first
        .ended_at
        .zip(first.activated_at)
        .map(|(e, a)| (e - a).num_milliseconds());
    assert!(
        held.is_some_and(|ms| ms < 1_000) || depth > 50_000,
        "the priority end overtook the backlog: {} was active {held:?} ms and the queue held {depth} after it; logs in {}{d}",
        first.name,
        env.dir.display()
    );
    assert!(
        first.rows_read < 50_000,
        "the job ended long before its backlog was read ({} rows){d}",
        first.rows_read
    );
    wait_rows(&env, 100_000, Duration::from_secs(90)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 100_000, "every row loaded once");
    assert_eq!(sum as u128, fed.good_id_sum);
    sigterm_and_drain(&mut daemon, &env).await;
    assert_no_error_rows(&env).await;
    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let total: i64 = all.iter().map(|j| j.rows_inserted).sum();
    assert_eq!(total, 100_000, "rows_inserted over the jobs adds up{d}");
    assert_slots_alternate(&all, &env);
    assert_windows_do_not_overlap(&all, &env);
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_marker_is_acked_and_ignored() {
    let env = Env::new("rot_stale").await;
    let first = env.feed(500, 0.0, 50_000_000, 61).await;
    env.publish_marker(&format!("19990101_000000_{}_01", env.name), None)
        .await;
    let second = env.feed(500, 0.0, 51_000_000, 62).await;
    let mut daemon = env.spawn(&settings(&env, "rotate_every = \"0s\"\nidle_eoj = \"0s\""));
    wait_rows(&env, 1_000, Duration::from_secs(30)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 1_000, "every row loaded once");
    assert_eq!(sum as u128, first.good_id_sum + second.good_id_sum);
    // Still one job: the marker named another job.
    let running = jobs(&env).await;
    assert!(
        with_reason(&running, "manual").is_empty(),
        "a marker for another job ends nothing{}",
        describe(&running)
    );
    sigterm_and_drain(&mut daemon, &env).await;
    assert_no_error_rows(&env).await;
    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    assert!(
        with_reason(&all, "manual").is_empty(),
        "no job ended on the stale marker{d}"
    );
    let a = activated(&all);
    assert_eq!(a.len(), 1, "one job read everything{d}");
    assert_eq!(
        (a[0].rows_read, a[0].rows_inserted, a[0].rows_skipped),
        (1_000, 1_000, 1),
        "the marker is counted as skipped by the job that read it{d}"
    );
    let skipped: i64 = all.iter().map(|j| j.rows_skipped).sum();
    assert_eq!(skipped, 1, "{d}");
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_never_both_active_and_survive_a_kill() {
    let env = Env::new("rot_two").await;
    // Broker durability: what the killed process had read comes back through the broker to the
    // survivor. (With the spool it would wait in the killed process's spool for that process to
    // restart — tests/durability.rs covers that — and two processes cannot share a spool dir.)
    let s = settings(
        &env,
        "rotate_every = \"1s\"\nidle_eoj = \"0s\"\ndurability = \"broker\"",
    );
    let mut daemons = [env.spawn(&s), env.spawn(&s)];
    for d in &daemons {
        wait_registered(d, 2, Duration::from_secs(20)).await;
    }
    let pids = [daemons[0].child.id() as i32, daemons[1].child.id() as i32];
    let feed = env.feed_rate(20_000, 2_000, 0.0, 60_000_000, 71);
    // After ~4 s, kill -9 the process that holds the queue, preferably once its job has been
    // active for a while and the other process has already ended a job of its own (so the
    // takeover's handoff gap is measured by a process that has seen an earlier end).
    let killer = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let start = Instant::now();
        loop {
            let all = jobs(&env).await;
            // The latest activated job that has not ended yet holds the queue.
            if let Some(j) = all
                .iter()
                .rev()
                .find(|j| j.status == 0 && j.phase == "active")
            {
                let i = pids
                    .iter()
                    .position(|p| *p == j.pid)
                    .unwrap_or_else(|| panic!("active job {} of unknown pid {}", j.name, j.pid));
                let settled = j
                    .activated_at
                    .is_some_and(|a| Utc::now() - a > chrono::Duration::milliseconds(300));
                let other_ended = all
                    .iter()
                    .any(|o| o.pid == pids[1 - i] && o.end_reason.as_deref() == Some("schedule"));
                if (settled && other_ended) || start.elapsed() > Duration::from_secs(4) {
                    daemons[i].kill9();
                    return (i, j.name.clone(), Utc::now());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no active job to kill{}",
                describe(&all)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (fed, (killed, killed_job, killed_at)) = tokio::join!(feed, killer);
    assert_eq!(fed.published, 20_000);
    let survivor = 1 - killed;
    env.wait_for("20,000 rows in person", Duration::from_secs(40), || async {
        env.loaded().await.0 >= 20_000
    })
    .await;
    wait_none_active(&env, Duration::from_secs(15)).await;
    sigterm_and_drain(&mut daemons[survivor], &env).await;

    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000, "every row loaded exactly once{d}");
    assert_eq!(sum as u128, fed.good_id_sum, "exactly the fed ids");
    assert_eq!(
        env.scalar("SELECT count(DISTINCT id)::int8 FROM {schema}.person")
            .await,
        20_000
    );
    let codes = env.error_codes().await;
    assert!(
        codes.iter().all(|(c, _)| c == "duplicate_key"),
        "only redelivered rows of the killed process may be refused (as duplicates): {codes:?}{}{d}",
        error_details(&env).await
    );
    assert!(
        all.iter()
            .any(|j| j.pid == pids[survivor] && j.activated_at.is_some_and(|a| a > killed_at)),
        "the surviving process took over after {killed_job} was killed{d}"
    );
    assert_windows_do_not_overlap(&all, &env);
    // The killed job read until it died, so the takeover's gap (if it reports one) starts no
    // earlier than the kill.
    let takeover = activated(&all)
        .into_iter()
        .find(|j| j.activated_at.is_some_and(|a| a > killed_at))
        .expect("a job activated after the kill");
    if let (Some(gap), Some(at)) = (takeover.handoff_gap_ms, takeover.activated_at) {
        let since_kill = (at - killed_at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        assert!(
            gap <= since_kill + 100.0,
            "{} (pid {}) took over {since_kill:.1} ms after {killed_job} was killed but reports a handoff gap of {gap:.1} ms (measured from its own process's last job end, across the other process's jobs); logs in {}{d}",
            takeover.name,
            takeover.pid,
            env.dir.display()
        );
    }
    assert_gaps_fit_the_handoffs(&all, &env);
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_handoff_rotates_too() {
    let env = Env::new("rot_excl").await;
    let mut daemon = env.spawn(&settings(
        &env,
        "handoff = \"exclusive\"\nretry_ms = 100\nrotate_every = \"2s\"\nidle_eoj = \"0s\"",
    ));
    // Only the worker that holds the queue is registered; the other retries.
    wait_registered(&daemon, 1, Duration::from_secs(20)).await;
    let fed = env.feed_rate(10_000, 2_000, 0.0, 70_000_000, 81).await;
    wait_rows(&env, 10_000, Duration::from_secs(30)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 10_000, "every row loaded once");
    assert_eq!(sum as u128, fed.good_id_sum);
    wait_none_active(&env, Duration::from_secs(15)).await;
    sigterm_and_drain(&mut daemon, &env).await;
    assert_no_error_rows(&env).await;
    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    assert!(
        with_reason(&all, "schedule").len() >= 3,
        "at least 3 scheduled rotations; logs in {}{d}",
        env.dir.display()
    );
    let total: i64 = all.iter().map(|j| j.rows_inserted).sum();
    assert_eq!(total, 10_000, "{d}");
    assert_slots_alternate(&all, &env);
    assert_windows_do_not_overlap(&all, &env);
    finish(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_report_records_the_job() {
    let env = Env::new("rot_report").await;
    let dir = env.dir.join("reports");
    let mut daemon = env.spawn(&settings(&env, "rotate_every = \"1s\"\nidle_eoj = \"0s\""));
    wait_registered(&daemon, 2, Duration::from_secs(20)).await;
    let fed = env.feed_rate(3_000, 1_000, 0.0, 80_000_000, 91).await;
    wait_rows(&env, 3_000, Duration::from_secs(30)).await;
    env.wait_for("a scheduled rotation", Duration::from_secs(10), || async {
        !with_reason(&jobs(&env).await, "schedule").is_empty()
    })
    .await;
    let all = jobs(&env).await;
    let d = describe(&all);
    println!("{}: {d}", env.name);
    let job = with_reason(&all, "schedule")[0].clone();
    let path = dir.join(format!("{}.output", job.name));
    env.wait_for(
        "the report's closing line",
        Duration::from_secs(10),
        || async { std::fs::read_to_string(&path).is_ok_and(|t| t.contains("Exit: TermCode=")) },
    )
    .await;
    let text = std::fs::read_to_string(&path).expect("read report");
    for needle in [
        "Init:",
        "QueueOpen:",
        "PhaseBegin:",
        "ImportEnd: Records Read=",
        "Exit: TermCode=0",
    ] {
        assert!(
            text.lines().any(|l| l.contains(needle)),
            "{} has no line with {needle:?}:\n{text}{d}",
            path.display()
        );
    }
    assert!(
        text.contains(&format!("Records Read={},", job.rows_read)),
        "the report's count matches the job row ({}):\n{text}",
        job.rows_read
    );
    assert!(
        text.contains(&format!("Job={}", job.name)),
        "the report names its job:\n{text}"
    );
    let (n, sum) = env.loaded().await;
    assert_eq!((n, sum as u128), (3_000, fed.good_id_sum));
    // Stop between rotations: a SIGTERM while a job is due can race the rotator's marker.
    wait_none_active(&env, Duration::from_secs(15)).await;
    sigterm_and_drain(&mut daemon, &env).await;
    finish(env).await;
}
