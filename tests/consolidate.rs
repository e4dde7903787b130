//! Post-job consolidation against the real services: error tables moved into `error_history`
//! in steps of at most `limit` rows, dropped, reported; one run at a time (result 2 for a
//! second caller, `--override` for a hung holder); a kill -9 mid-run resumed with nothing lost
//! or doubled; and the daemon consolidating by itself after each job.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{Env, ErrorRow, Settings};

/// Settings whose daemon leaves the error tables for the test to consolidate by hand.
fn manual(top_extra: &str) -> Settings {
    Settings {
        pack: 50,
        latency_ms: 50,
        sessions: 1,
        top: format!("[consolidate]\nafter_job = false\n{top_extra}"),
        ..Settings::default()
    }
}

fn good(id: u64) -> Vec<u8> {
    format!(r#"{{"id":"{id:020}","fname":"Ann","age":{}}}"#, id % 90).into_bytes()
}

/// Loads `good_rows` rows plus `bad` malformed messages and `dups` duplicate keys with one
/// daemon run, ends the job, and returns the job name and the error rows as they are now (in
/// the job's `et_`/`uv_` tables).
async fn load_errors(
    env: &Env,
    s: &Settings,
    good_rows: u64,
    bad: u64,
    dups: u64,
) -> (String, Vec<ErrorRow>) {
    let mut bodies = Vec::new();
    for i in 0..good_rows {
        bodies.push(good(i));
    }
    for i in 0..bad {
        bodies.push(format!("{{\"id\": \"broken {i}\",").into_bytes());
    }
    for i in 0..dups {
        bodies.push(good(i % good_rows.max(1)));
    }
    env.publish_raw(&bodies).await;
    let mut daemon = env.spawn(s);
    env.wait_loaded((good_rows + bad + dups) as i64, Duration::from_secs(60))
        .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let rows = env.error_rows_full().await;
    assert_eq!(
        rows.len() as u64,
        bad + dups,
        "every bad message has its row"
    );
    let mut db = support::pg().await;
    let tables = env.error_tables(&mut db).await;
    assert!(
        !tables.is_empty(),
        "the job's error tables wait for consolidation: {tables:?}"
    );
    let job: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT job_name FROM {}.jobs WHERE rows_rejected > 0 ORDER BY started_at LIMIT 1",
        env.schema
    )))
    .fetch_one(&mut db)
    .await
    .expect("the job with errors");
    (job, rows)
}

/// (kind, seq, code, raw) of every row, sorted: the identity of the error rows.
fn keyed(rows: &[ErrorRow]) -> Vec<(String, i64, String, Vec<u8>)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| (r.kind.clone(), r.seq, r.code.clone(), r.raw.clone()))
        .collect();
    v.sort();
    v
}

async fn history_count(env: &Env) -> i64 {
    env.scalar("SELECT count(*) FROM {schema}.error_history")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consolidation_moves_rows_in_limited_steps_drops_tables_and_reports() {
    let env = Env::new("consol").await;
    let s = manual("");
    let (job, before) = load_errors(&env, &s, 120, 30, 5).await;
    assert_eq!(
        before.iter().filter(|r| r.kind == "uv").count(),
        5,
        "duplicate keys go to uv_<job>"
    );

    let (code, out, err) = support::cli(&env.config_path(), &["consolidate", "--limit", "7"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("result 0"), "{out}");

    let mut db = support::pg().await;
    assert!(
        env.error_tables(&mut db).await.is_empty(),
        "consolidated tables are dropped"
    );
    let after = env.error_rows_full().await;
    assert_eq!(
        keyed(&after),
        keyed(&before),
        "every row moved exactly once"
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.error_history WHERE job_name = '{job}'"
        ))
        .await,
        35,
        "rows carry their job's name"
    );
    // Each step is one transaction: rows moved together share consolidated_at (now()).
    let steps: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT kind, count(*) FROM {}.error_history GROUP BY kind, consolidated_at ORDER BY 1, 2",
        env.schema
    )))
    .fetch_all(&mut db)
    .await
    .expect("steps");
    assert!(steps.iter().all(|(_, n)| *n <= 7), "{steps:?}");
    let mut per_kind = BTreeMap::<String, usize>::new();
    for (k, _) in &steps {
        *per_kind.entry(k.clone()).or_default() += 1;
    }
    // 30 rows in steps of 7 → 5 transactions; 5 rows → 1.
    assert_eq!(
        per_kind,
        BTreeMap::from([("et".to_string(), 5), ("uv".to_string(), 1)])
    );
    let run: (i16, i64, i32, i32) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT result, rows_moved, transactions, tables FROM {}.postjob_runs ORDER BY run_id DESC LIMIT 1",
        env.schema
    )))
    .fetch_one(&mut db)
    .await
    .expect("run row");
    assert_eq!(run, (0, 35, 6, 2));

    let report = std::fs::read_to_string(env.dir.join("reports").join(format!("{job}.output")))
        .expect("job report");
    assert!(
        report.contains(&format!(
            "ErrTableDrop: Name={}.\"et_{job}\", Rows=30",
            env.schema
        )) || report.contains(&format!("et_{job}\", Rows=30")),
        "{report}"
    );
    assert!(report.contains(&format!("uv_{job}\", Rows=5")), "{report}");

    // Nothing left: a second run is a no-op that still succeeds.
    let (code, out, _) = support::cli(&env.config_path(), &["consolidate"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 table(s), 0 row(s)"), "{out}");
    assert_eq!(history_count(&env).await, 35);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_caller_gets_result_2_and_override_takes_over_a_hung_run() {
    let env = Env::new("consollock").await;
    let s = manual("override_after = \"1s\"\n");
    let (_, before) = load_errors(&env, &s, 20, 300, 0).await;
    let config = env.config_path();

    // A: one row per transaction, so it runs long enough to be caught holding the lock.
    let mut a = support::cli_command(
        &config,
        &["consolidate", "--limit", "1", "--caller", "caller-A"],
        &[],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn A");
    env.wait_for("A to hold the lock and move rows", Duration::from_secs(30), || async {
        env.scalar(
            "SELECT count(*) FROM {schema}.postjob_runs WHERE caller = 'caller-A' AND result IS NULL AND rows_moved > 0",
        )
        .await
            == 1
    })
    .await;
    // Hang A for real: the process stops, its session keeps the lock.
    let pid = a.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP")
        .success());

    let (code, out, err) = support::cli(&config, &["consolidate", "--caller", "caller-B"]);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("locked by caller-A"), "{out}");
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM {schema}.postjob_runs WHERE caller = 'caller-B' AND result = 2 AND prev_caller = 'caller-A' AND prev_age_s >= 0"
        )
        .await,
        1
    );

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, out, err) = support::cli(
        &config,
        &["consolidate", "--caller", "caller-C", "--override"],
    );
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("took over the lock from caller-A"), "{out}");
    let _ = a.kill();
    let _ = a.wait();

    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM {schema}.postjob_runs WHERE caller = 'caller-A' AND result = 1 AND error LIKE 'taken over by caller-C%'"
        )
        .await,
        1,
        "the hung run is marked failed"
    );
    let after = env.error_rows_full().await;
    assert_eq!(keyed(&after), keyed(&before), "nothing lost or doubled");
    let mut db = support::pg().await;
    assert!(env.error_tables(&mut db).await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_consolidation_then_reset_finishes_with_nothing_lost_or_doubled() {
    let env = Env::new("consolkill").await;
    let s = manual("");
    let (_, before) = load_errors(&env, &s, 30, 40, 0).await;
    let config = env.config_path();

    // The process SIGKILLs itself right after its third step committed.
    let (code, _, err) = support::cli_env(
        &config,
        &["consolidate", "--limit", "5", "--caller", "doomed"],
        &[("CONVEYOR_CRASH_AT", "mid_consolidation:3")],
    );
    assert_eq!(code, None, "killed by a signal; stderr: {err}");
    assert_eq!(history_count(&env).await, 15, "three steps of 5 committed");
    assert_eq!(
        env.error_rows_full().await.len(),
        40,
        "the rest waits in et_<job>, none doubled"
    );
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM {schema}.postjob_runs WHERE caller = 'doomed' AND result IS NULL"
        )
        .await,
        1,
        "the dead run still looks running"
    );

    let (code, out, err) = support::cli(&config, &["consolidate", "--reset"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("reset 1 failed run(s)"), "{out}");
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM {schema}.postjob_runs WHERE caller = 'doomed' AND result = 1 AND reset_at IS NOT NULL AND error LIKE 'abandoned%'"
        )
        .await,
        1
    );
    let after = env.error_rows_full().await;
    assert_eq!(keyed(&after), keyed(&before), "nothing lost or doubled");
    assert_eq!(history_count(&env).await, 40);
    let mut db = support::pg().await;
    assert!(env.error_tables(&mut db).await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_consolidates_after_each_job() {
    let env = Env::new("consolauto").await;
    let port = support::free_port();
    let s = Settings {
        pack: 50,
        sessions: 1,
        http_listen: format!("127.0.0.1:{port}"),
        ..Settings::default()
    };
    let mut bodies: Vec<Vec<u8>> = (0..100).map(good).collect();
    bodies.extend((0..12).map(|i| format!("not json {i}").into_bytes()));
    bodies.extend((0..3).map(good));
    env.publish_raw(&bodies).await;
    let mut daemon = env.spawn(&s);
    env.wait_loaded(115, Duration::from_secs(60)).await;
    let (code, out, err) = support::cli(&env.config_path(), &["eoj"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    env.wait_for(
        "the ended job's error tables to be consolidated",
        Duration::from_secs(30),
        || async { history_count(&env).await == 15 },
    )
    .await;
    let rows = env.error_rows_full().await;
    assert_eq!(rows.iter().filter(|r| r.kind == "et").count(), 12);
    assert_eq!(rows.iter().filter(|r| r.kind == "uv").count(), 3);
    env.wait_for("the run to be recorded", Duration::from_secs(10), || async {
        env.scalar("SELECT count(*) FROM {schema}.postjob_runs WHERE result = 0 AND rows_moved = 15 AND caller LIKE 'rotator@%'")
            .await
            == 1
    })
    .await;
    let (_, metrics) = support::get(port, "/metrics").await;
    assert!(
        support::sample(
            &metrics,
            "conveyor_consolidation_runs_total",
            &["result=\"0\""]
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        support::sample(&metrics, "conveyor_error_history_rows", &[]),
        15.0
    );
    assert_eq!(
        support::sample(
            &metrics,
            "conveyor_rows_rejected_total",
            &["kind=\"duplicate_key\""]
        ),
        3.0
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}
