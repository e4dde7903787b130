//! Faults against the real services, injected without touching them: a TCP proxy cuts the
//! daemon's database or broker connections mid-load, a test transaction locks the target table,
//! and a `kill -9` lands while batches wait on that lock. In every case nothing is acked that was
//! not committed, and after recovery every row is loaded exactly once.

mod support;

use std::time::Duration;

use support::{Env, Proxy, Settings, AMQP_ADDR, PG_ADDR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_mid_load_is_survived_without_loss_or_duplicates() {
    let env = Env::new("dbcut").await;
    let proxy = Proxy::start(PG_ADDR).await;
    let report = env.feed(20_000, 0.0, 3_000_000, 21).await;
    let settings = Settings {
        database_url: proxy.pg_url(),
        pack: 200,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(2_000).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = env.loaded().await.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.loaded().await.0,
        during,
        "nothing commits while the database is unreachable"
    );
    proxy.restore();
    env.wait_loaded(20_000, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000, "every row loaded once");
    assert_eq!(sum as u128, report.good_id_sum);
    assert!(
        env.error_codes().await.is_empty(),
        "a retried batch is never reloaded into the error table as duplicates"
    );
    assert!(
        daemon.log_text().contains("database connection restored"),
        "the recovery is logged"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(env.queue_depth().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_batches_wait_on_a_table_lock_acks_nothing_uncommitted() {
    // durability = "broker": nothing uncommitted is acked, so the broker gets it all back.
    let env = Env::new("lock").await;
    let report = env.feed(20_000, 0.0, 4_000_000, 22).await;
    let settings = Settings {
        pack: 200,
        extra: "durability = \"broker\"".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(2_000).await;
    let lock = lock_target(&env).await;
    // The dangerous moment: batches are written but not committed. Kill without warning.
    daemon.kill9();
    drop(lock);
    let (loaded, _) = env.loaded().await;
    assert!(loaded < 20_000, "the kill landed mid-load");
    // Every delivery that is not committed must come back to the queue.
    env.wait_for(
        "unacked deliveries to return to the queue",
        Duration::from_secs(30),
        // ≥: a batch that committed just before the kill may not have had its ack applied; its
        // rows are then both loaded and back in the queue (the restart below skips them by
        // message_id, and the exact count is asserted at the end).
        || async { env.loaded().await.0 + env.queue_depth().await as i64 >= 20_000 },
    )
    .await;
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(20_000, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000);
    assert_eq!(sum as u128, report.good_id_sum);
    assert!(
        env.error_codes().await.is_empty(),
        "no row was loaded before and redelivered"
    );
    let failed = env
        .scalar("SELECT count(*) FROM {schema}.jobs WHERE status = 3 AND end_reason = 'crash' AND error LIKE '%without closing%'")
        .await;
    assert_eq!(
        failed, 2,
        "the killed process's two jobs (active and standby) are marked failed by the next start"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_batches_wait_on_a_table_lock_recovers_the_spool() {
    // durability = "spool" (default): deliveries are acked once fsynced, so after the kill the
    // spool owns what did not commit; the next start loads exactly that.
    let env = Env::new("lockspool").await;
    let report = env.feed(20_000, 0.0, 4_100_000, 22).await;
    let settings = Settings {
        pack: 200,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(2_000).await;
    let lock = lock_target(&env).await;
    daemon.kill9();
    drop(lock);
    let (loaded, _) = env.loaded().await;
    assert!(loaded < 20_000, "the kill landed mid-load");
    let spool = env.state_dir().join("person");
    assert!(spool.exists(), "the killed daemon left its spools");
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(20_000, Duration::from_secs(120)).await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000);
    assert_eq!(sum as u128, report.good_id_sum);
    assert!(
        env.error_codes().await.is_empty(),
        "no row was loaded twice (a duplicate key would land in the error table)"
    );
    let recovered = env
        .scalar("SELECT count(*) FROM {schema}.jobs WHERE status = 1 AND end_reason = 'crash' AND restarts = 1")
        .await;
    assert_eq!(
        recovered, 2,
        "both slots' jobs were recovered from their spools and closed"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

/// Takes an exclusive lock on the target for two seconds' worth of batches: every batch
/// transaction then waits inside COPY. Dropping the guard releases it.
async fn lock_target(env: &Env) -> sqlx::PgConnection {
    let mut locker = support::pg().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {}.person IN ACCESS EXCLUSIVE MODE",
        env.schema
    )))
    .execute(&mut locker)
    .await
    .expect("lock");
    tokio::time::sleep(Duration::from_secs(2)).await;
    locker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_mid_load_reconnects_and_loads_every_row() {
    let env = Env::new("amqpcut").await;
    let proxy = Proxy::start(AMQP_ADDR).await;
    let report = env.feed(20_000, 0.0, 5_000_000, 23).await;
    let settings = Settings {
        amqp_url: proxy.amqp_url(),
        pack: 200,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(2_000).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    env.wait_for("every row loaded", Duration::from_secs(120), || async {
        env.loaded().await.0 == 20_000 && env.queue_depth().await == 0
    })
    .await;
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000, "every row loaded, none twice");
    assert_eq!(sum as u128, report.good_id_sum);
    let log = daemon.log_text();
    assert!(
        (log.contains("RabbitMQ connection lost") || log.contains("control channel lost"))
            && log.contains("RabbitMQ connection restored"),
        "the loss and the reconnect are logged"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_spool_directory_is_refused() {
    let env = Env::new("statelock").await;
    let settings = Settings::default();
    let first = env.spawn(&settings);
    first
        .wait_log("registered as consumer", Duration::from_secs(30))
        .await;
    let mut second = env.spawn(&settings);
    let code = second.wait_exit(Duration::from_secs(30)).await;
    assert_ne!(code, Some(0), "the second daemon must not start");
    assert!(
        second
            .log_text()
            .contains("in use by another conveyor process"),
        "it says why: {}",
        second.log_text()
    );
    first.sigterm();
    env.cleanup().await;
}
