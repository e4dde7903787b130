//! Shared by the benches: a fresh schema with the demo `person` table and a fresh queue, torn
//! down afterwards even when the measurement panics; the daemon's config for that world; feeds.
#![allow(dead_code)]

use std::future::Future;

use conveyor::config::{Config, QueueDeclare, SecretUrl};
use lapin::options::QueueDeleteOptions;
use sqlx::{Connection, PgConnection};

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One bench run's schema (person table + conveyor's objects) and queue.
pub struct World {
    pub schema: String,
    pub queue: String,
}

/// True under `cargo bench`; false under `cargo test --all-targets`, where benches smoke-test.
pub fn is_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The row count of a bench: under `cargo bench` the environment variable `var` or `full`;
/// under `cargo test --all-targets` (a smoke pass) 2,000.
pub fn rows(var: &str, full: u64) -> u64 {
    if is_bench() {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(full)
    } else {
        2_000
    }
}

/// Runs `measure(world, db, rows, is_bench)` in a fresh world on a multi-threaded runtime: the
/// `main` of a bench that measures one world.
pub fn run_in_world<F, Fut>(rows: u64, measure: F)
where
    F: FnOnce(World, PgConnection, u64, bool) -> Fut,
    Fut: Future<Output = ()>,
{
    let bench = is_bench();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(with_world(|w, db| measure(w, db, rows, bench)));
}

/// Creates a world, runs `measure` in it, and drops the world whatever happens.
pub async fn with_world<F, Fut>(measure: F)
where
    F: FnOnce(World, PgConnection) -> Fut,
    Fut: Future<Output = ()>,
{
    let suffix = format!("{:08x}", rand::random::<u32>());
    let (schema, queue) = (
        format!("bench_{suffix}"),
        format!("conveyor.bench.{suffix}"),
    );
    let mut db = connect().await;
    let ddl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sql/person.sql"
    ))
    .expect("person.sql");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA {schema}; SET search_path = {schema}; {ddl}"
    )))
    .execute(&mut db)
    .await
    .expect("create bench schema");
    let w = World {
        schema: schema.clone(),
        queue: queue.clone(),
    };
    let outcome =
        futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(measure(w, db))).await;
    let mut db = connect().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut db)
    .await;
    if let Ok(conn) = conveyor::source::connect(&SecretUrl::new(AMQP_URL), "bench-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

pub async fn connect() -> PgConnection {
    PgConnection::connect(PG_URL).await.expect(
        "PostgreSQL at 127.0.0.1:5432 (start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)",
    )
}

/// The daemon's config for `w`: defaults, plus `extra` lines in the pipeline section.
pub fn config(w: &World, extra: &str) -> Config {
    Config::from_toml(
        std::path::Path::new("bench.toml"),
        &config_text(w, extra),
        |_| None,
    )
    .expect("bench config")
}

/// The TOML text of [`config`].
pub fn config_text(w: &World, extra: &str) -> String {
    format!(
        "[amqp]\nurl = \"{AMQP_URL}\"\n[database]\nurl = \"{PG_URL}\"\nschema = \"{s}\"\n[http]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n[report]\ndir = \"{dir}\"\n[state]\ndir = \"{state}\"\n[journal]\ndir = \"{journal}\"\n[[pipeline]]\nname = \"bench\"\nqueue = \"{q}\"\ntarget = \"{s}.person\"\nqueue_time_column = \"queue_time\"\n{extra}\n",
        s = w.schema,
        q = w.queue,
        dir = std::env::temp_dir().join(format!("{}-reports", w.schema)).display(),
        state = std::env::temp_dir().join(format!("{}-state", w.schema)).display(),
        journal = std::env::temp_dir().join(format!("{}-journal", w.schema)).display(),
    )
}

/// Publishes `n` generated rows (publisher confirms) at `rate` rows/s (0 = as fast as possible).
pub async fn feed(
    w: &World,
    n: u64,
    rate: u64,
    errors_pct: f64,
    seed: u64,
) -> conveyor::feed::FeedReport {
    conveyor::feed::run(conveyor::feed::FeedOptions {
        amqp_url: SecretUrl::new(AMQP_URL),
        queue: w.queue.clone(),
        declare: QueueDeclare::Quorum,
        count: n,
        rate,
        errors_pct,
        file: None,
        seed,
        id_base: seed * 100_000_000,
        progress: false,
        exchange: None,
    })
    .await
    .expect("feed")
}

/// `p`-th percentile of sorted `v` (nearest rank).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Merges `value` as section `name` into `target/bench/results.json`, the suite's one file of
/// figures (each bench writes its own section; a later run of a bench replaces its section).
pub fn record(name: &str, value: serde_json::Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("results.json");
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut value = value;
    if let Some(o) = value.as_object_mut() {
        o.insert(
            "measured_at".into(),
            serde_json::Value::String(chrono::Utc::now().to_rfc3339()),
        );
    }
    all.insert(name.to_string(), value);
    let _ = std::fs::write(
        &path,
        serde_json::to_string_pretty(&all).unwrap_or_default(),
    );
}

/// Starts `conveyor run` as a child process on `w` with the pipeline lines `extra`; the config
/// file lives in the temp dir. The daemon runs in its own process, as in production, so the
/// bench's feed does not compete for its runtime.
pub fn spawn_daemon(w: &World, extra: &str) -> (std::process::Child, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("{}.toml", w.schema));
    spawn_text(&path, &config_text(w, extra))
}

/// Writes `text` to `path` and starts `conveyor run` with it.
pub fn spawn_text(path: &std::path::Path, text: &str) -> (std::process::Child, std::path::PathBuf) {
    std::fs::write(path, text).expect("write config");
    let path = path.to_path_buf();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn conveyor run");
    (child, path)
}

/// Stops the daemon with SIGTERM and checks it exits 0.
pub fn stop_daemon(mut child: std::process::Child, config: &std::path::Path) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait for the daemon");
    let _ = std::fs::remove_file(config);
    assert!(status.success(), "daemon exit: {status}");
}

/// Rows in the world's `person` table.
pub async fn loaded(db: &mut PgConnection, w: &World) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.person",
        w.schema
    )))
    .fetch_one(db)
    .await
    .expect("count")
}
