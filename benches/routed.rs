//! Routed-pipeline benchmark (ETL2 style, README "Several tables"): N messages, a fifth of them
//! customers (upserted by email) and the rest events (inserted, their customer resolved by an
//! identity lookup), drained by one routed pipeline, clean and with 1 % duplicate event ids
//! (found by the in-batch check and the key probe, to uv_); against the same N person rows
//! drained by a single-target pipeline (COPY). Prints both rates and routed ÷ single, and records them as
//! section `routed` of `target/bench/results.json`. Each drain is timed from the daemon's spawn
//! to the last committed message, so both carry the same start-up.
//!
//! `cargo bench --bench routed` (N = 100,000; `ROUTED_ROWS` overrides). Under `cargo test
//! --all-targets` it runs a small smoke pass that checks the counts instead.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::World;
use conveyor::config::{QueueDeclare, SecretUrl};
use sqlx::PgConnection;

fn main() {
    common::run_in_world(
        common::rows("ROUTED_ROWS", 100_000),
        |w, mut db, n, bench| async move { measure(&w, &mut db, n, bench).await },
    );
}

async fn measure(w: &World, db: &mut PgConnection, n: u64, bench: bool) {
    let s = &w.schema;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {s}.customer (id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text, tier int);
         CREATE TABLE {s}.event (id bigint PRIMARY KEY, customer_id int NOT NULL, kind text NOT NULL,
             status int NOT NULL DEFAULT 200, load_job text);"
    )))
    .execute(&mut *db)
    .await
    .expect("create the routed tables");

    // Single target: N person rows through COPY.
    common::feed(w, n, 0, 0.0, 1).await;
    let started = Instant::now();
    let (child, config) = common::spawn_daemon(w, "");
    wait(db, &format!("SELECT count(*) FROM {s}.person"), n).await;
    let single = n as f64 / started.elapsed().as_secs_f64();
    common::stop_daemon(child, &config);

    // Routed: customers upserted, events inserted with their customer looked up; then the
    // same with 1 % of the events repeating an id (refused to uv_).
    let routed = routed_drain(w, db, n, None).await;
    let routed_bad = routed_drain(w, db, n, Some(100)).await;

    println!("routed drain of {n} messages (rows/s from the daemon's spawn)");
    println!("single target (COPY), person rows      {single:>10.0}");
    println!(
        "routed: upsert + identity lookup        {routed:>10.0}   ÷ single = {:.2}",
        routed / single
    );
    println!(
        "routed, 1 % duplicate event ids         {routed_bad:>10.0}   ÷ routed clean = {:.2}",
        routed_bad / routed
    );
    if bench {
        common::record(
            "routed",
            serde_json::json!({
                "messages": n,
                "single_target_rows_per_s": single,
                "routed_rows_per_s": routed,
                "routed_1pct_refused_rows_per_s": routed_bad,
                "ratio_routed_to_single": routed / single,
                "ratio_routed_1pct_refused_to_clean": routed_bad / routed,
            }),
        );
    }
}

/// Drains `n` routed messages (every `bad_every`-th event refused by the database) into empty
/// tables; messages/s from the daemon's spawn to the last good row committed.
async fn routed_drain(w: &World, db: &mut PgConnection, n: u64, bad_every: Option<u64>) -> f64 {
    let s = &w.schema;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {s}.event; TRUNCATE {s}.customer RESTART IDENTITY CASCADE"
    )))
    .execute(&mut *db)
    .await
    .expect("truncate");
    let customers = (n / 5).max(1);
    let mut bad = 0;
    let file = std::env::temp_dir().join(format!("{s}-routed.jsonl"));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).expect("feed file"));
        for i in 0..n {
            let email = format!("c{}@example.com", i % customers);
            let line = if i < customers {
                serde_json::json!({"type": "customer", "email": email, "name": format!("Customer {i}"), "tier": i % 3})
            } else if i > customers && bad_every.is_some_and(|k| i % k == 0) {
                // The previous event's id: a duplicate key, refused to uv_.
                bad += 1;
                serde_json::json!({"type": "event", "id": i - 1, "email": email, "kind": "click"})
            } else {
                serde_json::json!({"type": "event", "id": i, "email": email, "kind": "click"})
            };
            writeln!(f, "{line}").expect("write feed file");
        }
    }
    conveyor::feed::run(conveyor::feed::FeedOptions {
        amqp_url: SecretUrl::new(common::AMQP_URL),
        queue: w.queue.clone(),
        declare: QueueDeclare::Quorum,
        count: 0,
        rate: 0,
        errors_pct: 0.0,
        file: Some(file.clone()),
        seed: 1,
        id_base: 0,
        progress: false,
        exchange: None,
    })
    .await
    .expect("feed the routed messages");
    let _ = std::fs::remove_file(&file);
    let base = common::config_text(w, "");
    let head = &base[..base.find("[[pipeline]]").unwrap_or(base.len())];
    let pipeline = format!(
        r#"[[pipeline]]
name = "routed"
queue = "{q}"
[[pipeline.route]]
table = "{s}.customer"
when = "type = customer"
mode = "upsert"
key = ["email"]
[[pipeline.route]]
table = "{s}.event"
when = "type = event"
job_column = "load_job"
identity = {{ column = "customer_id", field = "email", table = "{s}.customer", by = "email", value = "id" }}
"#,
        q = w.queue
    );
    let path = std::env::temp_dir().join(format!("{s}-routed.toml"));
    let started = Instant::now();
    let (child, config) = common::spawn_text(&path, &format!("{head}{pipeline}"));
    wait(
        db,
        &format!("SELECT (SELECT count(*) FROM {s}.customer) + (SELECT count(*) FROM {s}.event)"),
        n - bad,
    )
    .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    common::stop_daemon(child, &config);
    let joined: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {s}.event e JOIN {s}.customer c ON c.id = e.customer_id"
    )))
    .fetch_one(&mut *db)
    .await
    .expect("events with their customer");
    assert_eq!(
        joined as u64,
        n - customers - bad,
        "every good event found its customer"
    );
    rate
}

/// Polls `sql` (a count) until it reaches `n`.
async fn wait(db: &mut PgConnection, sql: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let c: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *db)
            .await
            .expect("count");
        if c as u64 >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "drain did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
