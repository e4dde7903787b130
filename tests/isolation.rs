//! One daemon, two pipelines: when one pipeline's target table disappears, that pipeline is
//! reported (an error line naming it, its batches held unacked and retried) while the other
//! goes on loading; once the table is back, the held rows load, each exactly once.

mod support;

use std::time::Duration;

use support::{Env, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pipeline_does_not_stop_the_others() {
    let a = Env::new("iso_a").await;
    let b = Env::new("iso_b").await;
    let s = Settings {
        pack: 100,
        sessions: 1,
        extra: format!(
            "\n[[pipeline]]\nname = \"orders\"\nqueue = \"{}\"\ntarget = \"{}.person\"\npack = 100\nsessions = 1\nlatency_ms = 50\nqueue_time_column = \"queue_time\"\n",
            b.queue, b.schema
        ),
        ..Settings::default()
    };
    let mut daemon = a.spawn(&s);
    a.feed(300, 0.0, 1, 1).await;
    b.feed(300, 0.0, 1, 2).await;
    a.wait_loaded(300, Duration::from_secs(60)).await;
    b.wait_loaded(300, Duration::from_secs(60)).await;

    let mut db = support::pg().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE {}.person",
        a.schema
    )))
    .execute(&mut db)
    .await
    .expect("drop pipeline person's table");
    a.feed(200, 0.0, 10_000, 3).await;
    b.feed(200, 0.0, 10_000, 4).await;
    daemon
        .wait_log("batch cannot be written", Duration::from_secs(30))
        .await;
    b.wait_loaded(500, Duration::from_secs(60)).await;
    let log = daemon.log_text();
    let failing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("batch cannot be written"))
        .collect();
    assert!(
        failing
            .iter()
            .all(|l| l.contains("\"pipeline\":\"person\"")),
        "only the failing pipeline reports: {failing:?}"
    );
    assert!(
        failing.iter().any(|l| l.contains("does not exist")),
        "the reason is given: {failing:?}"
    );
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "the daemon goes on"
    );
    assert_eq!(
        b.loaded().await,
        (500, expected_sum(300, 1) + expected_sum(200, 10_000))
    );

    // The operator puts the table back: the held batches load, nothing twice.
    let ddl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sql/person.sql"
    ))
    .expect("person.sql");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET search_path = {}; {ddl}",
        a.schema
    )))
    .execute(&mut db)
    .await
    .expect("recreate the table");
    a.wait_loaded(200, Duration::from_secs(90)).await;
    // A while longer: a duplicate would show as a second copy or a uv_ row.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.loaded().await, (200, expected_sum(200, 10_000)));
    assert!(
        a.error_codes().await.is_empty(),
        "{:?}",
        a.error_codes().await
    );
    assert_eq!(a.queue_depth().await, 0);
    assert_eq!(b.queue_depth().await, 0);

    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    a.cleanup().await;
    b.cleanup().await;
}

/// Sum of the ids `feed` generates for `count` rows from `base`.
fn expected_sum(count: i64, base: i64) -> i64 {
    (base..base + count).sum()
}
