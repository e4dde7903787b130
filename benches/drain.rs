//! Drain benchmark: how close conveyor comes to the bare broker and the bare database.
//!
//! In one run, against the local RabbitMQ and PostgreSQL: publish N seed-like person rows, time
//! a bare lapin consumer draining them (ack only); publish them again, time conveyor draining
//! them into the 33-column `person` table; time a plain COPY of the same rows from a file; then
//! the same conveyor drain with 1 % bad rows of the five seed kinds. Prints every rate and the
//! ratios, and records them as section `drain` of `target/bench/results.json`.
//!
//! `cargo bench --bench drain` (N = 200,000; `DRAIN_ROWS` overrides). Under `cargo test
//! --all-targets` it runs a small smoke pass that checks the counts instead.

mod common;

use std::time::{Duration, Instant};

use conveyor::config::{Config, SecretUrl};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use common::{World, AMQP_URL, PG_URL};
/// The daemon's default prefetch, given to the bare consumer too.
const PREFETCH: u16 = 20_000;

fn main() {
    common::run_in_world(
        common::rows("DRAIN_ROWS", 200_000),
        |w, mut db, n, bench| async move { measure(&w, &mut db, n, bench).await },
    );
}

async fn measure(w: &World, db: &mut PgConnection, n: u64, bench: bool) {
    // 1. bare consumer
    let fed = common::feed(w, n, 0, 0.0, 1).await;
    let bare = bare_consume(&w.queue, n).await;

    // 2. conveyor, clean rows (durability = "spool", the default)
    common::feed(w, n, 0, 0.0, 1).await;
    let fsync_before = fsync_samples();
    let clean = conveyor_drain(w, db, n, "").await;
    let fsync = fsync_quantiles(&fsync_before, &fsync_samples());
    let (rows, _) = counts(db, w).await;
    assert_eq!(rows as u64, fed.good, "conveyor loaded every clean row");

    // 2b. the same with durability = "broker" (ack after commit, message ids recorded)
    truncate(db, w).await;
    common::feed(w, n, 0, 0.0, 1).await;
    let broker = conveyor_drain(w, db, n, "durability = \"broker\"").await;
    let (rows, _) = counts(db, w).await;
    assert_eq!(
        rows as u64, fed.good,
        "conveyor (broker durability) loaded every row"
    );

    // 3. plain COPY of the same rows from a file
    let copy = copy_from_file(w, db, n).await;

    // 4. conveyor, 1 % bad rows
    truncate(db, w).await;
    let bad_feed = common::feed(w, n, 0, 1.0, 2).await;
    let errors = conveyor_drain(w, db, n, "").await;
    let (rows, rejected) = counts(db, w).await;
    assert_eq!(rows as u64, bad_feed.good, "good rows loaded");
    assert_eq!(
        rejected as u64,
        bad_feed.bad.values().sum::<u64>(),
        "bad rows in the error tables"
    );

    let line = |name: &str, rate: f64| println!("{name:<38} {rate:>10.0} rows/s");
    println!(
        "\ndrain benchmark: {n} seed-like rows (~{} bytes each), default pipeline settings, one run\n",
        fed_bytes(n)
    );
    line("bare lapin consumer (ack only, multiple)", bare);
    line("plain COPY from a file", copy);
    line("conveyor drain, clean (spool)", clean);
    line("conveyor drain, clean (broker durability)", broker);
    line("conveyor drain, 1 % bad rows", errors);
    println!();
    println!(
        "conveyor clean ÷ bare consumer          {:>10.2}   (aim ≥ 0.75)",
        clean / bare
    );
    println!(
        "conveyor clean ÷ plain COPY             {:>10.2}",
        clean / copy
    );
    println!(
        "conveyor 1 % bad ÷ conveyor clean       {:>10.2}   (aim ≥ 0.9)",
        errors / clean
    );
    println!(
        "spool ÷ broker durability               {:>10.2}   (aim ≥ 0.85: spool costs ≤ 15 %)",
        clean / broker
    );
    println!(
        "spool group commit (write + fsync)      p50 ≤ {:.2} ms, p99 ≤ {:.2} ms (histogram bucket bounds)",
        fsync.0 * 1000.0,
        fsync.1 * 1000.0
    );
    if bench {
        let json = serde_json::json!({
            "rows": n,
            "bare_consumer_rows_per_s": bare,
            "copy_from_file_rows_per_s": copy,
            "conveyor_clean_rows_per_s": clean,
            "conveyor_broker_durability_rows_per_s": broker,
            "ratio_spool_to_broker": clean / broker,
            "spool_fsync_p50_s_upper": fsync.0,
            "spool_fsync_p99_s_upper": fsync.1,
            "conveyor_errors_1pct_rows_per_s": errors,
            "ratio_clean_to_bare": clean / bare,
            "ratio_clean_to_copy": clean / copy,
            "ratio_errors_to_clean": errors / clean,
        });
        common::record("drain", json);
    }
}

fn fed_bytes(_n: u64) -> usize {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    conveyor::feed::person_row(1, &mut rng, None, None).len()
}

/// Drains `n` messages with a plain lapin consumer that does nothing but ack (one `multiple`
/// ack per 500 deliveries, the cheapest acking a consumer can do): the broker's own ceiling.
async fn bare_consume(queue: &str, n: u64) -> f64 {
    let conn = conveyor::source::connect(&SecretUrl::new(AMQP_URL), "bench-bare")
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let start = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = 0;
    while got < n {
        let d = consumer
            .next()
            .await
            .expect("stream open")
            .expect("delivery");
        got += 1;
        if got % 500 == 0 || got == n {
            d.ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    n as f64 / secs
}

/// Cumulative bucket counts of `conveyor_spool_fsync_seconds` over all labels: (le, count).
fn fsync_samples() -> Vec<(f64, f64)> {
    let text = conveyor::metrics::install().render();
    let mut buckets: std::collections::BTreeMap<String, f64> = Default::default();
    for l in text
        .lines()
        .filter(|l| l.starts_with("conveyor_spool_fsync_seconds_bucket{"))
    {
        let le = l.split("le=\"").nth(1).and_then(|r| r.split('"').next());
        let v = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(le), Some(v)) = (le, v) {
            *buckets.entry(le.to_string()).or_default() += v;
        }
    }
    let mut v: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, c)| (le.parse().unwrap_or(f64::INFINITY), c))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// p50 and p99 (as bucket upper bounds) of the fsyncs between two snapshots.
fn fsync_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    let q = |p: f64| {
        delta
            .iter()
            .find(|(_, c)| *c >= total * p)
            .map_or(f64::NAN, |(le, _)| *le)
    };
    (q(0.5), q(0.99))
}

/// Runs the daemon in-process on the backlog and times it until every row is committed.
async fn conveyor_drain(w: &World, db: &mut PgConnection, n: u64, extra: &str) -> f64 {
    let config = common::config(w, extra);
    let before = counts(db, w).await;
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(conveyor::daemon::run(config, shutdown.clone()));
    loop {
        let (rows, rejected) = counts(db, w).await;
        if (rows + rejected - before.0 - before.1) as u64 >= n {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "drain did not finish in 10 minutes"
        );
        if std::env::var("DRAIN_TRACE").is_ok() {
            eprintln!(
                "{:>8.3}s rows {} rejected {}",
                start.elapsed().as_secs_f64(),
                rows - before.0,
                rejected - before.1
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    shutdown.cancel();
    daemon.await.expect("daemon task").expect("daemon result");
    n as f64 / secs
}

/// (rows in person, rows in every error table and their robust-mark-free count).
async fn counts(db: &mut PgConnection, w: &World) -> (i64, i64) {
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.person",
        w.schema
    )))
    .fetch_one(&mut *db)
    .await
    .expect("count");
    let rejected: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT coalesce(sum(rows_rejected), 0)::int8 FROM {}.jobs",
        w.schema
    )))
    .fetch_one(&mut *db)
    .await
    .unwrap_or(0);
    let live: i64 = live_rejected(db, w).await;
    (rows, rejected.max(live))
}

/// Error rows (et_ and uv_) committed by the running job (the jobs row is refreshed only
/// periodically).
async fn live_rejected(db: &mut PgConnection, w: &World) -> i64 {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND (table_name LIKE 'et\\_%' OR table_name LIKE 'uv\\_%')",
    )
    .bind(&w.schema)
    .fetch_all(&mut *db)
    .await
    .unwrap_or_default();
    let mut total = 0;
    for t in tables {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.\"{t}\"",
            w.schema
        )))
        .fetch_one(&mut *db)
        .await
        .unwrap_or(0);
        total += n;
    }
    total
}

async fn truncate(db: &mut PgConnection, w: &World) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {s}.person; UPDATE {s}.jobs SET rows_rejected = 0",
        s = w.schema
    )))
    .execute(&mut *db)
    .await
    .expect("truncate");
}

/// COPY of the same rows from a file: the database's own ceiling for this table.
async fn copy_from_file(w: &World, db: &mut PgConnection, n: u64) -> f64 {
    // Encode the rows once through conveyor's decoder, as a loader with a ready file would.
    let columns = conveyor::sink::catalog::read_columns(db, Some(&w.schema), "person")
        .await
        .expect("columns");
    let mut cfg = Config::from_toml(
        std::path::Path::new("bench.toml"),
        &format!(
            "[amqp]\nurl = \"{AMQP_URL}\"\n[database]\nurl = \"{PG_URL}\"\n[[pipeline]]\nname = \"b\"\nqueue = \"q\"\ntarget = \"person\"\nqueue_time_column = \"queue_time\"\n"
        ),
        |_| None,
    )
    .expect("config");
    let p = cfg.pipelines.remove(0);
    let mut decoder = conveyor::decode::Decoder::new(&columns, &p).expect("decoder");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let mut file = Vec::new();
    for i in 0..n {
        let body = conveyor::feed::person_row(10_000_000 + i, &mut rng, None, None);
        decoder
            .decode(&body, Some(0), 0, &mut file)
            .expect("clean row");
    }
    let path = std::env::temp_dir().join(format!("{}.copy", w.schema));
    std::fs::write(&path, &file).expect("write copy file");
    truncate(db, w).await;
    let cols: Vec<&str> = decoder.copy_columns().collect();
    let sql = format!("COPY {}.person ({}) FROM STDIN", w.schema, cols.join(", "));
    let start = Instant::now();
    let f = tokio::fs::File::open(&path).await.expect("open copy file");
    let mut tx = db.begin().await.expect("begin");
    let mut copy = tx.copy_in_raw(&sql).await.expect("copy");
    copy.read_from(f).await.expect("stream file");
    let rows = copy.finish().await.expect("finish");
    tx.commit().await.expect("commit");
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    assert_eq!(rows, n);
    truncate(db, w).await;
    n as f64 / secs
}
