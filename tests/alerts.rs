//! The alerts the daemon evaluates itself (`conveyor_alert{pipeline,name}` and a WARN line),
//! each provoked for real against the services and seen to clear: stalled and low_rate (the
//! target table locked under a backlog), errors (bad rows), slow_handoff (rotation under load
//! with a 1 ms threshold), consolidation_failed (error_history moved away, then back), and a
//! publisher whose clock runs 7 s ahead (`conveyor_clock_skew_seconds`).

mod support;

use std::time::Duration;

use support::{free_port, get, sample, Env, Settings};

async fn alert(port: u16, pipeline: &str, name: &str) -> f64 {
    let (_, m) = get(port, "/metrics").await;
    sample(
        &m,
        "conveyor_alert",
        &[
            &format!("pipeline=\"{pipeline}\""),
            &format!("name=\"{name}\""),
        ],
    )
}

async fn wait_alert(env: &Env, port: u16, pipeline: &str, name: &str, want: f64) {
    env.wait_for(
        &format!("alert {name} = {want}"),
        Duration::from_secs(30),
        || async { alert(port, pipeline, name).await == want },
    )
    .await;
}

fn settings(port: u16, alerts: &str, extra: &str) -> Settings {
    Settings {
        pack: 100,
        sessions: 1,
        http_listen: format!("127.0.0.1:{port}"),
        top: format!("[status]\ninterval = \"300ms\"\n[alerts]\n{alerts}\n"),
        extra: format!("depth_poll = \"200ms\"\n{extra}"),
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_low_rate_and_errors_fire_and_clear() {
    let env = Env::new("alerts").await;
    let port = free_port();
    let s = settings(port, "low_rate = 1000000", "");
    let mut daemon = env.spawn(&s);
    env.wait_listening(port).await;
    // Hold the table against writes: a backlog and no progress.
    let mut locker = support::pg().await;
    env.wait_for("the job's tables", Duration::from_secs(30), || async {
        env.scalar("SELECT count(*) FROM {schema}.status").await > 0
    })
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {}.person IN SHARE MODE",
        env.schema
    )))
    .execute(&mut locker)
    .await
    .expect("lock");
    env.feed(5_000, 0.0, 1, 5).await;
    wait_alert(&env, port, "person", "stalled", 1.0).await;
    wait_alert(&env, port, "person", "low_rate", 1.0).await;
    assert!(
        daemon.log_text().contains("ALERT stalled"),
        "a WARN line says why"
    );
    assert_eq!(alert(port, "person", "errors").await, 0.0);

    drop(locker);
    env.wait_loaded(5_000, Duration::from_secs(60)).await;
    wait_alert(&env, port, "person", "stalled", 0.0).await;
    wait_alert(&env, port, "person", "low_rate", 0.0).await;
    assert!(daemon.log_text().contains("alert cleared"));

    env.publish_raw(&[b"not json".to_vec(), b"{\"id\": 1".to_vec()])
        .await;
    wait_alert(&env, port, "person", "errors", 1.0).await;
    wait_alert(&env, port, "person", "errors", 0.0).await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handoff_consolidation_failure_and_clock_skew() {
    let env = Env::new("alerts2").await;
    let port = free_port();
    let s = settings(port, "slow_handoff_ms = 1", "rotate_every = \"700ms\"");
    let mut daemon = env.spawn(&s);
    env.wait_listening(port).await;
    // Rows keep flowing across rotations: every handoff has a gap, and 1 ms is too slow.
    tokio::join!(
        env.feed_rate(3_000, 1_000, 0.0, 1, 8),
        wait_alert(&env, port, "person", "slow_handoff", 1.0)
    );
    // No more handoffs under load: it clears.
    wait_alert(&env, port, "person", "slow_handoff", 0.0).await;

    // A consolidation that fails: its target table is gone.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {s}.error_history RENAME TO error_history_away",
        s = env.schema
    )))
    .execute(&mut support::pg().await)
    .await
    .expect("rename");
    env.publish_raw(&[b"bad row".to_vec()]).await;
    wait_alert(&env, port, "*", "consolidation_failed", 1.0).await;
    assert!(daemon.log_text().contains("ALERT consolidation_failed"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {s}.error_history_away RENAME TO error_history",
        s = env.schema
    )))
    .execute(&mut support::pg().await)
    .await
    .expect("rename back");
    // The next job end runs it again, and it succeeds.
    env.feed_rate(500, 1_000, 0.0, 100_000, 9).await;
    wait_alert(&env, port, "*", "consolidation_failed", 0.0).await;
    assert_eq!(
        env.scalar("SELECT count(*) FROM {schema}.error_history")
            .await,
        1,
        "the bad row reached history once the table was back"
    );

    // A publisher whose clock runs 7 s ahead (the seed's skewed server).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    env.publish_stamped(&[(
        br#"{"id":"00000000000000990001"}"#.to_vec(),
        now + 7_000_000,
    )])
    .await;
    env.wait_for("the skew gauge", Duration::from_secs(30), || async {
        let (_, m) = get(port, "/metrics").await;
        sample(
            &m,
            "conveyor_clock_skew_seconds",
            &["publisher=\"unknown\""],
        ) > 5.0
    })
    .await;
    assert!(daemon.log_text().contains("publisher clock skew"));
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}
