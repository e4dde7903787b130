//! End to end against the real services: rows fed to the queue are loaded exactly once, and a
//! SIGTERM mid-load loses nothing.

mod support;

use std::time::Duration;

use support::{Env, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_rows_load_exactly_once() {
    let env = Env::new("load").await;
    let report = env.feed(20_000, 0.0, 1_000_000, 7).await;
    assert_eq!(report.published, 20_000);
    let mut daemon = env.spawn(&Settings::default());
    env.wait_loaded(20_000, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000, "every row loaded once");
    assert_eq!(
        sum as u128, report.good_id_sum,
        "the ids are exactly the fed ids"
    );
    assert!(
        env.error_codes().await.is_empty(),
        "clean feed, no error rows"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0, "nothing left unacked or unread");
    let jobs = env
        .scalar("SELECT count(*) FROM {schema}.jobs WHERE status = 1 AND end_reason = 'shutdown' AND rows_inserted = 20000 AND rows_read = 20000")
        .await;
    assert_eq!(
        jobs,
        1,
        "the job row is closed with its counts; log: {}",
        daemon.log_text()
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM {schema}.robust_log").await,
        0,
        "robust marks cleared at job end"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_zero_and_loses_nothing() {
    let env = Env::new("sigterm").await;
    let report = env.feed(30_000, 0.0, 2_000_000, 11).await;
    let settings = Settings {
        pack: 200,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(2_000).await;
    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "log: {}",
        daemon.log_text()
    );
    let (loaded, _) = env.loaded().await;
    assert!(loaded < 30_000, "stopped mid-load (loaded {loaded})");
    // A quorum queue applies the requeue of the prefetched deliveries asynchronously (Raft), so
    // the depth catches up a moment after the process exits.
    env.wait_for(
        "every row to be either committed (and acked) or back in the queue",
        Duration::from_secs(10),
        || async { env.loaded().await.0 + env.queue_depth().await as i64 == 30_000 },
    )
    .await;
    // A restart finishes the job: nothing lost, nothing twice.
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(30_000, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 30_000);
    assert_eq!(sum as u128, report.good_id_sum);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0);
    env.cleanup().await;
}
