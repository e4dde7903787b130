//! The monitor table against the real services: a running job has one `status` row that is
//! updated every `status.interval` with its counters and deleted at its end, and the triggers
//! copy each of those changes into `status_log` (ind i / u / d), as the seed's TPumpStatusLog.

mod support;

use std::time::Duration;

use support::{Env, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_status_row_is_inserted_updated_deleted_and_logged() {
    let env = Env::new("status").await;
    let s = Settings {
        pack: 100,
        sessions: 1,
        top: "[status]\ninterval = \"300ms\"\n".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&s);
    // Rows arrive over ~2 s, so the active job's row is refreshed several times meanwhile.
    let feed = env.feed_rate(2_000, 1_000, 0.0, 1, 3).await;
    env.wait_loaded(feed.published as i64, Duration::from_secs(60))
        .await;
    env.wait_for(
        "the status row to show every row read",
        Duration::from_secs(10),
        || async {
            env.scalar(
                "SELECT coalesce(max(rows_read), 0) FROM {schema}.status WHERE phase = 'active'",
            )
            .await
                == 2_000
        },
    )
    .await;
    let job: String = {
        let mut db = support::pg().await;
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT job_name FROM {}.status WHERE phase = 'active'",
            env.schema
        )))
        .fetch_one(&mut db)
        .await
        .expect("the active job's status row")
    };
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM {{schema}}.status WHERE job_name = '{job}' AND rows_inserted = 2000 AND rows_sent = 2000 AND rows_rejected = 0"
        ))
        .await,
        1
    );
    let (code, out, err) = support::cli(&env.config_path(), &["eoj"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    env.wait_for(
        "the ended job's status row to go",
        Duration::from_secs(10),
        || async {
            env.scalar(&format!(
                "SELECT count(*) FROM {{schema}}.status WHERE job_name = '{job}'"
            ))
            .await
                == 0
        },
    )
    .await;

    let mut db = support::pg().await;
    let log: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ind::text, rows_read FROM {}.status_log WHERE job_name = $1 ORDER BY log_id",
        env.schema
    )))
    .bind(&job)
    .fetch_all(&mut db)
    .await
    .expect("status_log");
    let inds: String = log.iter().map(|(i, _)| i.as_str()).collect();
    assert!(inds.starts_with('i'), "{inds}");
    assert!(inds.ends_with('d'), "{inds}");
    assert!(
        inds[1..inds.len() - 1].chars().all(|c| c == 'u') && inds.len() >= 4,
        "insert, several updates, delete: {inds}"
    );
    let reads: Vec<i64> = log.iter().map(|(_, r)| *r).collect();
    assert!(
        reads.windows(2).all(|w| w[0] <= w[1]),
        "counters only grow: {reads:?}"
    );
    assert_eq!(
        *reads.last().expect("rows"),
        2_000,
        "the delete logs the final counts"
    );
    assert!(
        reads.iter().any(|r| *r > 0 && *r < 2_000),
        "an update caught the job mid-load: {reads:?}"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        env.scalar("SELECT count(*) FROM {schema}.status").await,
        0,
        "no status row outlives its job"
    );
    env.cleanup().await;
}
