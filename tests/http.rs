//! The operator's HTTP surface against a real daemon: `/metrics` counts what was committed (rows
//! loaded, rows rejected by kind, batch and latency histograms, active worker), `/healthz`
//! answers, and `/readyz` turns ready once both workers are registered.

mod support;

use std::time::Duration;

use support::{free_port, get, sample, Env, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_committed_and_health_answers() {
    let env = Env::new("http").await;
    let port = free_port();
    let report = env.feed(3_000, 1.0, 30_000_000, 41).await;
    let bad: u64 = report.bad.values().sum();
    assert!(bad > 0);
    let settings = Settings {
        http_listen: format!("127.0.0.1:{port}"),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_for(
        "the daemon to be ready",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && get(port, "/readyz").await.0 == 200
        },
    )
    .await;
    assert_eq!(get(port, "/healthz").await, (200, "ok\n".to_string()));
    env.wait_loaded(3_000, Duration::from_secs(60)).await;

    let (status, m) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    let loaded = sample(
        &m,
        "conveyor_rows_loaded_total",
        &["pipeline=\"person\"", "op=\"insert\""],
    );
    assert_eq!(
        loaded as u64, report.good,
        "rows loaded = good rows fed\n{m}"
    );
    for (kind, n) in &report.bad {
        let label = format!("kind=\"{}\"", kind.as_str());
        let got = sample(&m, "conveyor_rows_rejected_total", &[&label]);
        assert_eq!(got as u64, *n, "rejected {label}\n{m}");
    }
    assert_eq!(
        sample(
            &m,
            "conveyor_messages_received_total",
            &["pipeline=\"person\""]
        ) as u64,
        3_000
    );
    let batches = sample(&m, "conveyor_batches_total", &[]);
    assert!(batches >= 1.0);
    assert_eq!(
        sample(&m, "conveyor_batch_rows_count", &[]),
        batches,
        "one batch-rows sample per batch"
    );
    assert_eq!(
        sample(&m, "conveyor_row_latency_seconds_count", &[]) as u64,
        report.good,
        "one latency sample per loaded row"
    );
    assert!(
        m.contains("conveyor_row_latency_seconds_bucket{"),
        "histogram buckets exported\n{m}"
    );
    assert_eq!(
        sample(&m, "conveyor_active_worker", &[]),
        1.0,
        "exactly one slot active\n{m}"
    );

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conveyor_config_row_overrides_the_file_for_the_next_job() {
    let env = Env::new("params").await;
    let config = env.write_config(&Settings::default());
    let (code, _, err) = support::cli(&config, &["migrate"]);
    assert_eq!(code, Some(0), "migrate: {err}");
    let mut db = support::pg().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.config (pipeline, pack, sessions) VALUES ('person', 7, NULL)",
        env.schema
    )))
    .execute(&mut db)
    .await
    .expect("insert override");
    let report = env.feed(100, 0.0, 31_000_000, 42).await;
    let mut daemon = env.spawn(&Settings::default());
    env.wait_loaded(100, Duration::from_secs(60)).await;
    let pack7 = env
        .scalar("SELECT count(*) FROM {schema}.jobs WHERE (params->>'pack')::int = 7 AND (params->>'sessions')::int = 2")
        .await;
    assert!(
        pack7 >= 1,
        "jobs record pack 7 from the table and sessions 2 from the file"
    );
    let batches = env
        .scalar("SELECT coalesce(sum(batches), 0)::int8 FROM {schema}.jobs")
        .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let batches_after = env
        .scalar("SELECT coalesce(sum(batches), 0)::int8 FROM {schema}.jobs")
        .await;
    assert!(
        batches_after.max(batches) >= 100 / 7,
        "100 rows in batches of at most 7: at least 14 batches, got {batches_after}"
    );
    assert_eq!(env.loaded().await, (100, report.good_id_sum as i64));
    env.cleanup().await;
}
