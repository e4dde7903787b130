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
        "the status row to show every row loaded",
        Duration::from_secs(10),
        || async {
            // Rows are read before they commit and the row is refreshed every 300 ms: wait for
            // the refresh that shows them all committed.
            env.scalar(
                "SELECT count(*) FROM {schema}.status WHERE phase = 'active' AND rows_read = 2000 \
                 AND rows_inserted = 2000 AND rows_sent = 2000 AND rows_rejected = 0",
            )
            .await
                == 1
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

/// µs since the epoch, now.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_per_minute_matches_the_rows_including_a_skewed_publisher() {
    let env = Env::new("latency").await;
    // Keep the load inside one commit minute, so the test's grouping and the daemon's agree.
    loop {
        let sec = (now_us() / 1_000_000) % 60;
        if (3..40).contains(&sec) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = Settings {
        pack: 50,
        sessions: 1,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&s);
    // 200 rows stamped 1.5 s before publishing (an honest clock, a queue that waited), 100 rows
    // from a publisher whose clock runs 7 s ahead (the seed's skewed server).
    let base = now_us();
    let mut bodies = Vec::new();
    for i in 0..300u64 {
        let body = format!(r#"{{"id":"{:020}","fname":"L{i}"}}"#, 300_000 + i).into_bytes();
        let qt = if i % 3 == 2 {
            base + 7_000_000
        } else {
            base - 1_500_000
        };
        bodies.push((body, qt));
    }
    env.publish_stamped(&bodies).await;
    env.wait_loaded(300, Duration::from_secs(60)).await;
    let (code, out, err) = support::cli(&env.config_path(), &["eoj"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");

    let mut db = support::pg().await;
    env.wait_for(
        "the job's latency rows",
        Duration::from_secs(10),
        || async {
            env.scalar("SELECT coalesce(sum(rows), 0)::int8 FROM {schema}.latency_minute")
                .await
                == 300
        },
    )
    .await;
    // Independently: latency from the table itself (db_time is the insert time on the
    // database clock, a few ms before the batch's commit).
    let expect: (f64, f64, f64, f64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT min(l), max(l), avg(l), stddev_pop(l), count(*)
         FROM (SELECT extract(epoch FROM db_time - queue_time)::float8 AS l FROM {}.person) t",
        env.schema
    )))
    .fetch_one(&mut db)
    .await
    .expect("expected latencies");
    let got: (i64, f64, f64, f64, f64, f64, f64, f64, i64, f64) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT rows, min_s, max_s, avg_s, stddev_s, min_rel_s, max_rel_s, avg_rel_s,
                    cumulative_rows, rate_per_s FROM {}.latency_minute",
            env.schema
        )))
        .fetch_one(&mut db)
        .await
        .expect("one minute row");
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() < 0.3, "{what}: daemon {a} vs table {b}");
    };
    assert_eq!(got.0, 300);
    assert_eq!(expect.4, 300);
    close(got.1, expect.0, "min");
    close(got.2, expect.1, "max");
    close(got.3, expect.2, "avg");
    close(got.4, expect.3, "stddev");
    assert!(
        got.1 < -5.0,
        "the skewed publisher shows as negative latency: {}",
        got.1
    );
    close(got.5, 0.0, "min_rel (the job's own minimum)");
    close(got.6, expect.1 - expect.0, "max_rel");
    close(got.7, expect.2 - expect.0, "avg_rel");
    assert_eq!(got.8, 300, "cumulative");
    assert!((got.9 - 5.0).abs() < 1e-9, "rate = rows / 60");

    let hist: Vec<(Option<f64>, Option<f64>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT lower_s, upper_s, rows FROM {}.latency_histogram ORDER BY bucket",
        env.schema
    )))
    .fetch_all(&mut db)
    .await
    .expect("histogram");
    assert_eq!(hist.iter().map(|h| h.2).sum::<i64>(), 300);
    assert_eq!(
        hist[0],
        (None, Some(0.0), 100),
        "the skewed rows are below 0"
    );
    let honest: i64 = hist
        .iter()
        .filter(|h| h.0.is_some_and(|lo| lo >= 1.0) && h.1.is_some_and(|hi| hi <= 3.0))
        .map(|h| h.2)
        .sum();
    assert_eq!(honest, 200, "1.5 s latencies fall in 1–3 s: {hist:?}");
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}
