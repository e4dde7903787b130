//! The journal: every message a job read, kept per job, loaded again by `conveyor replay` —
//! straight into the table (`--direct`) or back through the queue (`--to-queue`) — giving the
//! same rows as the original load.

mod support;

use std::time::Duration;

use support::{cli, Env, Settings};

/// A fingerprint of the table's rows as a multiset, without `db_time` (set by the database at
/// insert, so it differs on every load).
async fn rows_digest(env: &Env) -> (i64, String) {
    let mut db = support::pg().await;
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*)::int8, coalesce(md5(string_agg(r, E'\\n' ORDER BY r)), '')
           FROM (SELECT (to_jsonb(p) - 'db_time')::text AS r FROM {}.person p) t",
        env.schema
    )))
    .fetch_one(&mut db)
    .await
    .expect("digest")
}

async fn truncate(env: &Env) {
    let mut db = support::pg().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {}.person",
        env.schema
    )))
    .execute(&mut db)
    .await
    .expect("truncate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_journal_restores_the_same_rows() {
    let env = Env::new("journal").await;
    // Clean rows plus a few bad messages; no duplicate keys: with two sessions committing in
    // parallel, which of two rows with one key wins is not defined by arrival order.
    let report = env.feed(4_000, 0.0, 90_000_000, 61).await;
    env.publish_raw(&[
        b"{not json".to_vec(),
        br#"{"id": "x", "age": "forty"}"#.to_vec(),
        vec![0xff, 0xfe, 0x00],
    ])
    .await;
    let settings = Settings {
        extra: "journal = true\nrotate_every = \"0s\"\nidle_eoj = \"0s\"".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_loaded(report.good as i64, Duration::from_secs(120))
        .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let original = rows_digest(&env).await;
    assert_eq!(original.0, report.good as i64);

    // One job consumed everything; the standby's empty journal was not kept.
    let journals = conveyor::replay::list(&env.dir.join("journal")).expect("list journals");
    assert_eq!(
        journals.len(),
        1,
        "one journal (the active job's): {journals:?}"
    );
    let journal = &journals[0];
    assert_eq!(journal.messages, 4_003, "every message read, good and bad");
    assert_eq!(journal.damaged_bytes, 0);
    let (code, out, err) = cli(&env.config_path(), &["replay", "--list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&journal.job), "--list names the job: {out}");

    // --direct: straight into the emptied table.
    truncate(&env).await;
    let file = journal.path.display().to_string();
    let (code, out, err) = cli(
        &env.config_path(),
        &["replay", "--direct", "--quiet", &file],
    );
    assert_eq!(code, Some(0), "replay --direct failed: {out}{err}");
    assert!(
        out.contains(&format!("loaded {} rows", report.good)),
        "{out}"
    );
    assert!(
        out.contains("3 rejected"),
        "the bad rows are rejected again, into the replay's error table: {out}"
    );
    assert_eq!(
        rows_digest(&env).await,
        original,
        "identical multiset of rows"
    );

    // --to-queue: through the queue and a running daemon.
    truncate(&env).await;
    let mut daemon = env.spawn(&settings);
    let (code, out, err) = cli(
        &env.config_path(),
        &["replay", "--to-queue", &env.queue, "--quiet", &file],
    );
    assert_eq!(code, Some(0), "replay --to-queue failed: {out}{err}");
    assert!(out.contains("replayed 4003 messages"), "{out}");
    env.wait_loaded(report.good as i64, Duration::from_secs(120))
        .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        rows_digest(&env).await,
        original,
        "identical multiset of rows"
    );
    env.cleanup().await;
}
