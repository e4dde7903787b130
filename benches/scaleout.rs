//! Scale-out benchmark (docs/scaling.md): the same N rows drained by
//!   A. one pipeline on one queue, one process (the reference);
//!   B. the stream sharded over 4 queues by a consistent-hash exchange, 4 pipelines in one process;
//!   C. the same 4 shards spread over 3 processes, each shard's standby in another process
//!      (the layout of tests/scaleout.rs; a shard is held by the first process that registers).
//! Each drain is timed from its first committed row to its last (process start-up excluded).
//! Prints the rates and B÷A, C÷A, and records them as section `scaleout` of
//! `target/bench/results.json`. On one host every process shares the same cores with RabbitMQ
//! and PostgreSQL: the ratios say what sharding costs or gains there, not across hosts.
//!
//! `cargo bench --bench scaleout` (N = 200,000; `SCALE_ROWS` overrides). Under `cargo test
//! --all-targets` it runs a small smoke pass that checks the counts instead.

mod common;

use std::time::{Duration, Instant};

use common::World;
use conveyor::config::{QueueDeclare, SecretUrl};
use sqlx::PgConnection;

const SHARDS: usize = 4;
const PROCESSES: usize = 3;

fn main() {
    common::run_in_world(
        common::rows("SCALE_ROWS", 200_000),
        |w, mut db, n, bench| async move { measure(&w, &mut db, n, bench).await },
    );
}

async fn measure(w: &World, db: &mut PgConnection, n: u64, bench: bool) {
    let exchange = format!("{}.hash", w.queue);
    let queues: Vec<String> = (0..SHARDS).map(|k| format!("{}.s{k}", w.queue)).collect();
    let amqp = conveyor::source::connect(&SecretUrl::new(common::AMQP_URL), "bench-scaleout")
        .await
        .expect("amqp");
    let ch = amqp.create_channel().await.expect("channel");
    conveyor::source::declare_sharded(&ch, &exchange, &queues, QueueDeclare::Quorum)
        .await
        .expect("declare the sharded stream (rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)");

    // A. one queue, one pipeline
    common::feed(w, n, 0, 0.0, 1).await;
    let (child, config) = common::spawn_daemon(w, "");
    let one = drain(db, w, n).await;
    common::stop_daemon(child, &config);
    truncate(db, w).await;

    // B. four shards, one process
    feed_shards(&exchange, n).await;
    let mut procs = vec![spawn(w, "all", &shards_text(w, &queues, |_| true))];
    let b = drain(db, w, n).await;
    stop(&mut procs);
    truncate(db, w).await;

    // C. four shards over three processes, standbys elsewhere
    feed_shards(&exchange, n).await;
    for p in 0..PROCESSES {
        let hosted = |k: usize| k % PROCESSES == p || (k + 1) % PROCESSES == p;
        procs.push(spawn(w, &format!("p{p}"), &shards_text(w, &queues, hosted)));
    }
    let c = drain(db, w, n).await;
    stop(&mut procs);

    conveyor::source::delete_sharded(&ch, &exchange, &queues).await;
    let _ = amqp.close(200, "done".into()).await;

    println!("scale-out drain of {n} rows (rows/s, first to last commit)");
    println!("A. 1 queue, 1 pipeline, 1 process          {one:>10.0}");
    println!(
        "B. 4 shards, 4 pipelines, 1 process        {b:>10.0}   ÷ A = {:.2}",
        b / one
    );
    println!(
        "C. 4 shards over 3 processes               {c:>10.0}   ÷ A = {:.2}",
        c / one
    );
    if bench {
        common::record(
            "scaleout",
            serde_json::json!({
                "rows": n,
                "one_queue_rows_per_s": one,
                "four_shards_one_process_rows_per_s": b,
                "four_shards_three_processes_rows_per_s": c,
                "ratio_shards_one_process_to_one_queue": b / one,
                "ratio_shards_three_processes_to_one_queue": c / one,
            }),
        );
    }
}

/// Publishes `n` rows to the sharded stream (routing key = message id).
async fn feed_shards(exchange: &str, n: u64) {
    conveyor::feed::run(conveyor::feed::FeedOptions {
        amqp_url: SecretUrl::new(common::AMQP_URL),
        queue: "unused: routed by the exchange".into(),
        declare: QueueDeclare::Passive,
        count: n,
        rate: 0,
        errors_pct: 0.0,
        file: None,
        seed: 2,
        id_base: 1,
        progress: false,
        exchange: Some(exchange.to_string()),
    })
    .await
    .expect("feed the shards");
}

/// A config whose pipelines are the shards `hosted` says.
fn shards_text(w: &World, queues: &[String], hosted: impl Fn(usize) -> bool) -> String {
    let mut text = String::new();
    for (k, q) in queues.iter().enumerate().filter(|(k, _)| hosted(*k)) {
        text.push_str(&format!(
            "[[pipeline]]\nname = \"shard{k}\"\nqueue = \"{q}\"\ntarget = \"{}.person\"\nqueue_time_column = \"queue_time\"\n",
            w.schema
        ));
    }
    text
}

/// Starts `conveyor run` with the world's config minus its pipeline, plus `pipelines`; its own
/// state directory, as every process needs.
fn spawn(w: &World, tag: &str, pipelines: &str) -> (std::process::Child, std::path::PathBuf) {
    let base = common::config_text(w, "");
    let head = &base[..base.find("[[pipeline]]").unwrap_or(base.len())];
    let head = head.replace(
        &format!("{}-state", w.schema),
        &format!("{}-state-{tag}", w.schema),
    );
    let path = std::env::temp_dir().join(format!("{}-{tag}.toml", w.schema));
    common::spawn_text(&path, &format!("{head}{pipelines}"))
}

fn stop(procs: &mut Vec<(std::process::Child, std::path::PathBuf)>) {
    for (child, config) in procs.drain(..) {
        common::stop_daemon(child, &config);
    }
}

/// Rows/s from the first committed row to the n-th (from the spawn when the first look
/// already finds every row, as a small smoke run can).
async fn drain(db: &mut PgConnection, w: &World, n: u64) -> f64 {
    let spawned = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut at_first) = (None, 0);
    loop {
        let rows = common::loaded(db, w).await;
        if first.is_none() && rows > 0 {
            first = Some(Instant::now());
            at_first = rows;
        }
        if rows as u64 >= n {
            if at_first as u64 >= n {
                return n as f64 / spawned.elapsed().as_secs_f64().max(1e-3);
            }
            let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
            return (n as f64 - at_first as f64) / secs.max(1e-3);
        }
        assert!(
            Instant::now() < deadline,
            "drain did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn truncate(db: &mut PgConnection, w: &World) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("TRUNCATE {}.person", w.schema)))
        .execute(db)
        .await
        .expect("truncate");
}
