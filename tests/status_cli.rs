//! `conveyor status`, `stats` and `view` against the real services: status shows a running
//! daemon's workers and its active job with counts and a rate, then the job among the ended
//! ones after `conveyor eoj`; stats prints latency rows (written here by hand, with the seed's
//! values) as JSON, CSV and a table with bars; view creates a point-in-time view that shows
//! exactly the rows loaded by its time, and drops it.
//!
//! The services must be up: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`) and
//! RabbitMQ on 127.0.0.1:5672 (guest/guest); `bash .ci/run` starts them.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use support::{Env, Settings};

/// `conveyor <args>` on a blocking thread (the daemon and the feed keep running meanwhile).
async fn cli(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::cli(&config, &args)
    })
    .await
    .expect("cli thread")
}

/// `conveyor status --json` parsed; `None` while the command fails (e.g. before the daemon's
/// first migration).
async fn status_json(config: &Path) -> Option<Value> {
    let (code, out, err) = cli(config, &["status", "--json"]).await;
    if code != Some(0) {
        eprintln!("status --json: {code:?}: {err}");
        return None;
    }
    Some(
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{out}")),
    )
}

/// Polls `status --json` until `f` accepts it; returns that snapshot.
async fn wait_status(config: &Path, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(v) = status_json(config).await {
            if f(&v) {
                return v;
            }
            last = Some(v);
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "timed out waiting for {what}; last status: {}",
                serde_json::to_string_pretty(&last).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn array<'v>(v: &'v Value, pointer: &str) -> &'v Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{pointer} is not an array in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_workers_the_running_job_and_then_the_ended_one() {
    let env = Env::new("statuscli").await;
    let s = Settings {
        pack: 100,
        sessions: 1,
        top: "[status]\ninterval = \"300ms\"\n".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&s);
    let config = env.config_path();

    // A job is registered (standby) before anything is fed.
    wait_status(&config, "a registered worker", |v| {
        array(v, "/pipelines/person/workers")
            .iter()
            .any(|w| w["phase"] == "standby")
    })
    .await;

    // While 3,000 rows flow at 1,000/s, the active job's rate comes from its last two status
    // refreshes (300 ms apart).
    let (feed, during) = tokio::join!(
        env.feed_rate(3_000, 1_000, 0.0, 1, 5),
        wait_status(&config, "a rate from status_log", |v| {
            array(v, "/pipelines/person/running_jobs").iter().any(|j| {
                j["phase"] == "active"
                    && j["rate_basis"] == "status_log"
                    && j["rate_per_s"].as_f64().unwrap_or(0.0) > 0.0
            })
        })
    );
    assert_eq!(feed.published, 3_000);
    let active = array(&during, "/pipelines/person/running_jobs")
        .iter()
        .find(|j| j["phase"] == "active")
        .expect("the active job");
    let rate = active["rate_per_s"].as_f64().expect("rate");
    assert!(rate > 0.0 && rate < 100_000.0, "{active}");
    env.wait_loaded(3_000, Duration::from_secs(60)).await;

    // Everything loaded: the active job's counts, and both slots as workers.
    let v = wait_status(
        &config,
        "the active job's final counts and a standby",
        |v| {
            let workers = array(v, "/pipelines/person/workers");
            array(v, "/pipelines/person/running_jobs")
                .iter()
                .any(|j| j["phase"] == "active" && j["rows_inserted"] == 3_000)
                && workers.iter().any(|w| w["phase"] == "standby")
        },
    )
    .await;
    assert_eq!(v["schema"], env.schema.as_str());
    assert!(
        v["taken_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    let p = &v["pipelines"]["person"];
    assert_eq!(p["queue"], env.queue.as_str());
    let job = array(&v, "/pipelines/person/running_jobs")
        .iter()
        .find(|j| j["phase"] == "active")
        .expect("active job")
        .clone();
    let job_name = job["job_name"].as_str().expect("job_name").to_string();
    assert_eq!(job["rows_read"], 3_000, "{job}");
    assert_eq!(job["rows_rejected"], 0, "{job}");
    assert_eq!(job["rows_skipped"], 0, "{job}");
    assert!(job["elapsed_s"].as_f64().unwrap() > 0.0, "{job}");
    let workers = array(&v, "/pipelines/person/workers");
    assert_eq!(workers.len(), 2, "{v}");
    let mut slots: Vec<&str> = workers
        .iter()
        .map(|w| w["slot"].as_str().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, ["01", "02"]);
    for w in workers {
        assert_eq!(w["pid"], daemon.child.id(), "{w}");
        assert_eq!(w["stale"], false, "{w}");
        assert!(w["age_s"].as_f64().unwrap() < 30.0, "{w}");
    }
    assert!(array(&v, "/pipelines/person/last_jobs").is_empty(), "{v}");

    // The table: readable, with the job, its phase and its counts.
    let (code, out, err) = cli(&config, &["status"]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(!out.trim().is_empty());
    for want in [
        job_name.as_str(),
        "active",
        "standby",
        "workers",
        "running jobs",
        "3,000",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }

    // After an end of job, it is among the ended jobs with status 1 and its counts.
    let (code, out, err) = cli(&config, &["eoj"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let v = wait_status(&config, "the ended job in last_jobs", |v| {
        array(v, "/pipelines/person/last_jobs")
            .first()
            .is_some_and(|j| j["job_name"] == job_name.as_str())
            && !array(v, "/pipelines/person/running_jobs")
                .iter()
                .any(|j| j["job_name"] == job_name.as_str())
    })
    .await;
    let ended = &array(&v, "/pipelines/person/last_jobs")[0];
    assert_eq!(ended["status"], 1, "{ended}");
    assert_eq!(ended["end_reason"], "manual", "{ended}");
    assert_eq!(ended["rows_read"], 3_000, "{ended}");
    assert_eq!(ended["rows_inserted"], 3_000, "{ended}");
    assert_eq!(ended["rows_rejected"], 0, "{ended}");
    assert!(ended["ended_at"].as_str().is_some(), "{ended}");
    assert!(ended["duration_s"].as_f64().unwrap() > 0.0, "{ended}");
    let (code, out, err) = cli(&config, &["status", "--last", "5"]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(
        out.contains("ended jobs") && out.contains("1 ok") && out.contains(&job_name),
        "{out}"
    );
    let v = status_json(&config).await.expect("status");
    assert_eq!(array(&v, "/pipelines/person/last_jobs").len(), 1);
    let (code, out, _) = cli(&config, &["status", "--json", "--last", "0"]).await;
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("json");
    assert!(array(&v, "/pipelines/person/last_jobs").is_empty());

    // --watch with --json: one object per refresh, one per line, until Ctrl-C (exit 0).
    let mut child = support::cli_command(&config, &["status", "--json", "--watch", "0.3"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let a = lines.next().expect("a first line").expect("read");
        let b = lines.next().expect("a second line").expect("read");
        (a, b, lines)
    })
    .await
    .expect("reader");
    for line in [&lines.0, &lines.1] {
        let v: Value = serde_json::from_str(line).expect("each line is a JSON object");
        assert_eq!(
            v["pipelines"]["person"]["last_jobs"][0]["job_name"],
            job_name.as_str()
        );
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("waiter")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "Ctrl-C ends a watch cleanly");
    drop(lines);

    let (code, _, err) = cli(&config, &["status", "--pipeline", "nope"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no pipeline named \"nope\""), "{err}");

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

/// The test's fake job (and an older one): names as the daemon makes them.
const JOB: &str = "20261124_013000_person_01";
const OLDER_JOB: &str = "20261124_012000_person_02";

/// Upper bounds of the latency ranges ([stats] latency_buckets' default).
const BOUNDS: [f64; 17] = [
    0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 20.0, 30.0, 60.0,
];
/// Rows per range (18 ranges: below 0, the 16 between the bounds, 60 s and more): 39,229.
const RANGE_ROWS: [i64; 18] = [
    0, 1200, 2100, 3500, 6000, 12000, 8000, 4000, 1500, 600, 200, 80, 30, 15, 4, 0, 0, 0,
];

/// One minute's rows, min, max, avg and stddev (seconds).
type MinuteRow = (i64, f64, f64, f64, f64);

/// The seed's first three minutes (1 % errors).
const MINUTES: [MinuteRow; 3] = [
    (13_028, 0.001, 10.633, 2.431, 1.675),
    (13_074, 0.001, 8.943, 2.472, 1.569),
    (13_127, 0.004, 7.413, 2.741, 1.450),
];

async fn insert_latency(env: &Env) {
    let mut db = support::pg().await;
    let s = &env.schema;
    let job_min = 0.001;
    let mut cumulative = 0;
    let mut minutes: Vec<(&str, &str, MinuteRow)> = MINUTES
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                JOB,
                [
                    "2026-11-24T01:30:00Z",
                    "2026-11-24T01:31:00Z",
                    "2026-11-24T01:32:00Z",
                ][i],
                *m,
            )
        })
        .collect();
    minutes.push((
        OLDER_JOB,
        "2026-11-24T01:20:00Z",
        (12_000, 0.002, 3.0, 1.5, 0.7),
    ));
    for (job, minute, (rows, min, max, avg, sd)) in minutes {
        cumulative = if job == JOB { cumulative + rows } else { rows };
        let n = rows as f64;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.latency_minute (job_name, pipeline, minute, rows, rate_per_s,
                cumulative_rows, min_s, max_s, avg_s, stddev_s, min_rel_s, max_rel_s, avg_rel_s,
                sum_s, sumsq_s)
             VALUES ($1, 'person', $2::timestamptz, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )))
        .bind(job)
        .bind(minute)
        .bind(rows)
        .bind(n / 60.0)
        .bind(cumulative)
        .bind(min)
        .bind(max)
        .bind(avg)
        .bind(sd)
        .bind(min - job_min)
        .bind(max - job_min)
        .bind(avg - job_min)
        .bind(n * avg)
        .bind(n * (sd * sd + avg * avg))
        .execute(&mut db)
        .await
        .expect("insert latency_minute");
    }
    for (i, rows) in RANGE_ROWS.iter().enumerate() {
        let lower = i.checked_sub(1).map(|j| BOUNDS[j]);
        let upper = BOUNDS.get(i).copied();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.latency_histogram (job_name, pipeline, bucket, lower_s, upper_s, rows)
             VALUES ($1, 'person', $2, $3, $4, $5)"
        )))
        .bind(JOB)
        .bind(i as i32)
        .bind(lower)
        .bind(upper)
        .bind(rows)
        .execute(&mut db)
        .await
        .expect("insert latency_histogram");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_prints_the_minutes_and_the_ranges() {
    let env = Env::new("statuscli").await;
    let config = env.write_config(&Settings::default());
    let (code, out, err) = cli(&config, &["migrate"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");

    // Before any statistics exist: a clear error, exit 1.
    let (code, _, err) = cli(&config, &["stats"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no latency statistics for pipeline \"person\""),
        "{err}"
    );

    insert_latency(&env).await;

    // JSON: what the tables hold, with the ranges labelled and their share.
    let (code, out, err) = cli(&config, &["stats", "--job", JOB, "--format", "json"]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(&out).expect("stats --format json is JSON");
    assert_eq!(v["job"], JOB);
    assert_eq!(v["pipeline"], "person");
    let minutes = array(&v, "/minutes");
    assert_eq!(minutes.len(), 3);
    let mut cumulative = 0;
    for (i, (m, (rows, min, max, avg, sd))) in minutes.iter().zip(MINUTES).enumerate() {
        cumulative += rows;
        assert_eq!(m["index"], i as i64 + 1, "{m}");
        assert_eq!(m["minute"], format!("2026-11-24T01:3{i}:00Z"), "{m}");
        assert_eq!(m["rows"], rows, "{m}");
        assert_eq!(m["cumulative_rows"], cumulative, "{m}");
        assert_eq!(m["min_s"], min, "{m}");
        assert_eq!(m["max_s"], max, "{m}");
        assert_eq!(m["avg_s"], avg, "{m}");
        assert_eq!(m["stddev_s"], sd, "{m}");
        assert_eq!(m["avg_rel_s"], avg - 0.001, "{m}");
        assert!((m["rate_per_s"].as_f64().unwrap() - rows as f64 / 60.0).abs() < 1e-9);
    }
    let summary = &v["summary"];
    assert_eq!(summary["rows"], 39_229);
    assert_eq!(summary["min_s"], 0.001);
    assert_eq!(summary["max_s"], 10.633);
    let avg = summary["avg_s"].as_f64().unwrap();
    assert!(
        (avg - (13_028.0 * 2.431 + 13_074.0 * 2.472 + 13_127.0 * 2.741) / 39_229.0).abs() < 1e-9
    );
    let histogram = array(&v, "/histogram");
    assert_eq!(histogram.len(), 18);
    for (i, b) in histogram.iter().enumerate() {
        assert_eq!(b["bucket"], i, "{b}");
        assert_eq!(b["rows"], RANGE_ROWS[i], "{b}");
        let pct = RANGE_ROWS[i] as f64 * 100.0 / 39_229.0;
        assert!((b["percent"].as_f64().unwrap() - pct).abs() < 1e-9, "{b}");
    }
    assert_eq!(histogram[0]["label"], "<0 s");
    assert_eq!(histogram[0]["lower_s"], Value::Null);
    assert_eq!(histogram[1]["label"], "0–0.1 s");
    assert_eq!(histogram[5]["label"], "1–2 s");
    assert_eq!(histogram[17]["label"], "60 s+");
    assert_eq!(histogram[17]["upper_s"], Value::Null);

    // CSV: a header and one line per minute, seconds with 3 decimals.
    let (code, out, err) = cli(&config, &["stats", "--job", JOB, "--format", "csv"]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        "job,pipeline,minute,index,rows,rate_per_s,cumulative_rows,min_s,max_s,avg_s,stddev_s,min_rel_s,max_rel_s,avg_rel_s"
    );
    assert_eq!(
        lines[1],
        format!("{JOB},person,2026-11-24T01:30:00Z,1,13028,217.133,13028,0.001,10.633,2.431,1.675,0.000,10.632,2.430")
    );
    assert!(lines[3].starts_with(&format!("{JOB},person,2026-11-24T01:32:00Z,3,13127,")));
    let (code, out, _) = cli(
        &config,
        &["stats", "--job", JOB, "--format", "csv-histogram"],
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 19, "{out}");
    assert!(
        out.contains(&format!("{JOB},person,5,1,2,1–2 s,12000,30.59")),
        "{out}"
    );

    // The table: the seed's columns and the ranges as bars (50 cells for the largest when
    // stdout is not a terminal); the empty ranges above the last with rows make one line.
    let (code, out, err) = cli(&config, &["stats", "--job", JOB]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    for want in [
        JOB,
        "CUMULATIVE",
        "STDDEV",
        "AVG_REL",
        "13,028",
        "39,229",
        "10.633",
        "<0 s",
        "0–0.1 s",
        "(no rows at 20 s or more)",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let largest = out
        .lines()
        .find(|l| l.contains("1–2 s"))
        .expect("the 1–2 s range");
    assert!(
        largest.contains(&"█".repeat(50)) && !largest.contains(&"█".repeat(51)),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("0.5–1 s") && l.contains("█") && l.contains("15.3%")),
        "{out}"
    );

    // Default: the pipeline's newest job; --last 2: both, oldest first.
    let (code, out, err) = cli(&config, &["stats", "--format", "json"]).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["job"], JOB);
    let (code, out, _) = cli(&config, &["stats", "--last", "2", "--format", "json"]).await;
    assert_eq!(code, Some(0));
    let jobs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["job"], OLDER_JOB);
    assert_eq!(jobs[0]["histogram"], Value::Array(vec![]));
    assert_eq!(jobs[1]["job"], JOB);
    let (code, out, _) = cli(&config, &["stats", "--last", "2"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains(OLDER_JOB) && out.contains("no latency ranges recorded"),
        "{out}"
    );

    // Unknown job: exit 1, saying where to look.
    let (code, _, err) = cli(&config, &["stats", "--job", "20200101_000000_person_01"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is not in") && err.contains("conveyor status"),
        "{err}"
    );
    env.cleanup().await;
}

async fn count(relation: &str) -> i64 {
    let mut db = support::pg().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {relation}"
    )))
    .fetch_one(&mut db)
    .await
    .unwrap_or_else(|e| panic!("count {relation}: {e}"))
}

async fn exists(relation: &str) -> bool {
    let mut db = support::pg().await;
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(relation)
        .fetch_one(&mut db)
        .await
        .expect("to_regclass")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_view_shows_the_rows_loaded_by_its_time() {
    let env = Env::new("statuscli").await;
    let mut daemon = env.spawn(&Settings::default());
    let config: PathBuf = env.config_path();
    let s = env.schema.clone();

    env.feed(100, 0.0, 1, 11).await;
    env.wait_loaded(100, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cutoff: DateTime<Utc> = {
        let mut db = support::pg().await;
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut db)
            .await
            .expect("database clock")
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.feed(100, 0.0, 101, 12).await;
    env.wait_loaded(200, Duration::from_secs(60)).await;

    // The default name: <table>_at_<yyyymmdd_hhmmss>, in the target's schema.
    let at = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (code, out, err) = cli(&config, &["view", "--at", &at]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let name = format!("person_at_{}", cutoff.format("%Y%m%d_%H%M%S"));
    let view = format!("{s}.{name}");
    assert!(out.contains(&format!("\"{s}\".\"{name}\"")), "{out}");
    assert!(
        out.contains("CREATE OR REPLACE VIEW") && out.contains("\"db_time\" <="),
        "{out}"
    );
    assert_eq!(count(&view).await, 100, "the rows loaded by the cut-off");
    assert_eq!(count(&format!("{s}.person")).await, 200);
    let ids_in_view = count(&format!("{view} WHERE id::int8 > 100")).await;
    assert_eq!(ids_in_view, 0, "no row of the second feed");

    // Relative times on the database's clock, and --name.
    let (code, out, err) = cli(&config, &["view", "--at", "now", "--name", "person_now"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(count(&format!("{s}.person_now")).await, 200);
    let (code, _, err) = cli(
        &config,
        &["view", "--at", "1h", "--name", "person_hour_ago"],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(count(&format!("{s}.person_hour_ago")).await, 0);

    // A column that is missing or not a timestamp: the error names the ones that would do.
    let (code, _, err) = cli(&config, &["view", "--at", "now", "--column", "nosuch"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("\"nosuch\" is not in")
            && err.contains("db_time")
            && err.contains("queue_time"),
        "{err}"
    );
    let (code, _, err) = cli(&config, &["view", "--at", "now", "--column", "age"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is integer, not a timestamp") && err.contains("db_time"),
        "{err}"
    );
    let (code, _, err) = cli(&config, &["view", "--at", "yesterday-ish"]).await;
    assert_eq!(code, Some(2), "a bad --at is a usage error: {err}");

    // Only views over the target are replaced or dropped: never the table, nor another view.
    let (code, _, err) = cli(&config, &["view", "--drop", "--name", "person"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("is a table, not a view"), "{err}");
    let (code, _, err) = cli(&config, &["view", "--at", "now", "--name", "person"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("exists and is a table"), "{err}");
    assert_eq!(count(&format!("{s}.person")).await, 200);
    {
        let mut db = support::pg().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE VIEW {s}.other AS SELECT 1 AS one"
        )))
        .execute(&mut db)
        .await
        .expect("create another view");
    }
    let (code, _, err) = cli(&config, &["view", "--at", "now", "--name", "other"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not read") && err.contains("not replaced"),
        "{err}"
    );
    let (code, _, err) = cli(&config, &["view", "--drop", "--name", "other"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not read") && err.contains("not dropped"),
        "{err}"
    );
    assert_eq!(count(&format!("{s}.other")).await, 1);
    let (code, out, err) = cli(&config, &["view", "--drop", "--at", &at]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("dropped view"), "{out}");
    assert!(!exists(&view).await);
    let (code, _, err) = cli(&config, &["view", "--drop", "--name", &name]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("there is no view") && err.contains("person_now"),
        "{err}"
    );
    for v in ["person_now", "person_hour_ago"] {
        let (code, _, err) = cli(&config, &["view", "--drop", "--name", v]).await;
        assert_eq!(code, Some(0), "stderr: {err}");
        assert!(!exists(&format!("{s}.{v}")).await);
    }

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}
