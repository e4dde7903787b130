//! Test support: a fresh schema and queue per test (random suffix, so tests run in parallel and
//! leave nothing behind), a real `conveyor run` child process, and a TCP proxy to cut a service
//! without touching the machine's PostgreSQL or RabbitMQ.
//!
//! The services must be up: PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`) and
//! RabbitMQ on 127.0.0.1:5672 (guest/guest). `bash .ci/run` starts them if they are down; by
//! hand: `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` and
//! `rabbitmq-server -detached && rabbitmqctl await_startup`.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::config::{QueueDeclare, SecretUrl};
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::BasicProperties;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADDR: &str = "127.0.0.1:5432";
pub const AMQP_ADDR: &str = "127.0.0.1:5672";

/// Pipeline settings a test may change; the rest of the config is fixed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pack: u32,
    pub latency_ms: u64,
    pub sessions: u32,
    pub prefetch: u32,
    pub database_url: String,
    pub amqp_url: String,
    pub max_body_bytes: u64,
    /// Lines appended verbatim to the `[[pipeline]]` section (e.g. `rotate_every = "2s"`).
    pub extra: String,
    /// `[report] dir`; `None` writes no `[report]` section (the daemon's default applies).
    pub report_dir: Option<PathBuf>,
    /// `[[pipeline]] name` (it is part of every job name); default `person`.
    pub pipeline: String,
    /// `[http] listen`; default "" (no listener).
    pub http_listen: String,
    /// Sections written before `[[pipeline]]` (e.g. `[consolidate]\nafter_job = false`).
    pub top: String,
    /// Write `target = "<schema>.person"` (off for a routed pipeline, whose routes name tables).
    pub target: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pack: 500,
            latency_ms: 50,
            sessions: 2,
            prefetch: 2000,
            database_url: PG_URL.into(),
            amqp_url: AMQP_URL.into(),
            max_body_bytes: 1 << 20,
            extra: String::new(),
            report_dir: None,
            pipeline: "person".into(),
            http_listen: String::new(),
            top: String::new(),
            target: true,
        }
    }
}

/// One test's world: schema `t_<suffix>` holding the `person` table and conveyor's own objects,
/// queue `conveyor.test.<name>.<suffix>`, and a directory for the config and logs.
pub struct Env {
    pub name: String,
    pub schema: String,
    pub queue: String,
    pub dir: PathBuf,
    cleaned: bool,
}

impl Env {
    pub async fn new(name: &str) -> Env {
        let suffix: String = format!("{:08x}", rand::random::<u32>());
        let schema = format!("t_{name}_{suffix}");
        let queue = format!("conveyor.test.{name}.{suffix}");
        let dir = std::env::temp_dir().join(format!("conveyor-test-{name}-{suffix}"));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let mut db = pg().await;
        let ddl = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/sql/person.sql"
        ))
        .expect("read person.sql");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA {schema}; SET search_path = {schema}; {ddl}"
        )))
        .execute(&mut db)
        .await
        .expect("create schema and person table");
        Env {
            name: name.into(),
            schema,
            queue,
            dir,
            cleaned: false,
        }
    }

    /// Where this test's daemons keep their spools.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("conveyor.toml")
    }

    /// Writes the config file for `s` and returns its path.
    pub fn write_config(&self, s: &Settings) -> PathBuf {
        let text = format!(
            r#"[amqp]
url = "{amqp}"
[database]
url = "{db}"
schema = "{schema}"
connect_timeout_ms = 2000
[http]
listen = "{http_listen}"
[log]
format = "json"
level = "info"
[state]
dir = {state:?}
[journal]
dir = {journal:?}
{report}{top}
[[pipeline]]
name = "{pipeline}"
queue = "{queue}"
{target}prefetch = {prefetch}
pack = {pack}
latency_ms = {latency}
sessions = {sessions}
max_body_bytes = {max_body}
queue_time_column = "queue_time"
{extra}
"#,
            amqp = s.amqp_url,
            db = s.database_url,
            schema = self.schema,
            queue = self.queue,
            prefetch = s.prefetch,
            pack = s.pack,
            latency = s.latency_ms,
            sessions = s.sessions,
            max_body = s.max_body_bytes,
            report = s
                .report_dir
                .as_ref()
                .map(|d| format!("[report]\ndir = {:?}\n", d.display().to_string()))
                .unwrap_or_default(),
            extra = s.extra,
            state = self.state_dir().display().to_string(),
            journal = self.dir.join("journal").display().to_string(),
            pipeline = s.pipeline,
            http_listen = s.http_listen,
            top = s.top,
            target = if s.target {
                format!("target = \"{}.person\"\n", self.schema)
            } else {
                String::new()
            },
        );
        let path = self.config_path();
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Starts `conveyor run` with the config written for `s`; its log goes to `<dir>/daemon-N.log`.
    pub fn spawn(&self, s: &Settings) -> Daemon {
        self.spawn_env(s, &[])
    }

    /// [`Env::spawn`] with extra environment variables (e.g. `CONVEYOR_CRASH_AT`).
    pub fn spawn_env(&self, s: &Settings, vars: &[(&str, &str)]) -> Daemon {
        let config = self.write_config(s);
        self.spawn_config(&config, vars)
    }

    /// Starts `conveyor run` with the config file `config` (written by the test itself).
    pub fn spawn_config(&self, config: &std::path::Path, vars: &[(&str, &str)]) -> Daemon {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.join(format!("daemon-{n}.log"));
        let file = std::fs::File::create(&log).expect("create daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["--config"])
            .arg(config)
            .arg("run")
            .current_dir(&self.dir)
            .env_remove("RUST_LOG")
            .env_remove("CONVEYOR_AMQP_URL")
            .env_remove("CONVEYOR_DATABASE_URL")
            .env_remove("CONVEYOR_CRASH_AT")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn conveyor run");
        Daemon { child, log }
    }

    /// Publishes generated person rows with the library's feed (publisher confirms).
    pub async fn feed(
        &self,
        count: u64,
        errors_pct: f64,
        id_base: u64,
        seed: u64,
    ) -> conveyor::feed::FeedReport {
        self.feed_rate(count, 0, errors_pct, id_base, seed).await
    }

    pub async fn feed_rate(
        &self,
        count: u64,
        rate: u64,
        errors_pct: f64,
        id_base: u64,
        seed: u64,
    ) -> conveyor::feed::FeedReport {
        conveyor::feed::run(conveyor::feed::FeedOptions {
            amqp_url: SecretUrl::new(AMQP_URL),
            queue: self.queue.clone(),
            declare: QueueDeclare::Quorum,
            count,
            rate,
            errors_pct,
            file: None,
            seed,
            id_base,
            progress: false,
            exchange: None,
        })
        .await
        .expect("feed")
    }

    /// A connection and a confirm-mode channel on which the test queue is declared.
    async fn publisher(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = conveyor::source::connect(&SecretUrl::new(AMQP_URL), "test-publisher")
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        conveyor::source::declare_queue(&ch, &self.queue, QueueDeclare::Quorum)
            .await
            .expect("declare");
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        (conn, ch)
    }

    /// Publishes raw bodies (no headers) to the test queue.
    /// Publishes each body with its own `x-queue-time` header (µs since the epoch), as a
    /// publisher whose clock is off would stamp it.
    pub async fn publish_stamped(&self, bodies: &[(Vec<u8>, i64)]) {
        let (conn, ch) = self.publisher().await;
        for (body, queue_time_us) in bodies {
            let mut headers = lapin::types::FieldTable::default();
            headers.insert(
                "x-queue-time".into(),
                lapin::types::AMQPValue::LongLongInt(*queue_time_us),
            );
            ch.basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
        let _ = conn.close(200, "done".into()).await;
    }

    pub async fn publish_raw(&self, bodies: &[Vec<u8>]) {
        let (conn, ch) = self.publisher().await;
        for body in bodies {
            ch.basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
        let _ = conn.close(200, "done".into()).await;
    }

    /// Publishes an end-of-job marker for `job` (a job name or `*`) with `reason` (default
    /// `manual`), the way the rotator and `conveyor eoj` do.
    pub async fn publish_marker(&self, job: &str, reason: Option<&str>) {
        let reason = reason
            .map(|r| conveyor::job::EndReason::parse(r).expect("a valid end reason"))
            .unwrap_or(conveyor::job::EndReason::Manual);
        let (conn, ch) = self.publisher().await;
        conveyor::source::publish_marker(&ch, &self.queue, job, reason)
            .await
            .expect("publish marker");
        let _ = conn.close(200, "done".into()).await;
    }

    /// Ready messages in the queue (0 if it does not exist yet).
    pub async fn queue_depth(&self) -> u32 {
        let conn = conveyor::source::connect(&SecretUrl::new(AMQP_URL), "test-probe")
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        let n = conveyor::source::declare_queue(&ch, &self.queue, QueueDeclare::Passive)
            .await
            .unwrap_or(0);
        let _ = conn.close(200, "done".into()).await;
        n
    }

    /// (rows, sum of numeric ids) in the target table.
    pub async fn loaded(&self) -> (i64, i64) {
        let mut db = pg().await;
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int8 AS n, coalesce(sum(id::int8), 0)::int8 AS s FROM {}.person",
            self.schema
        )))
        .fetch_one(&mut db)
        .await
        .expect("count person");
        (r.get("n"), r.get("s"))
    }

    /// Rows in `person` whose id appears more than once (can only be > 0 without a key).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let mut db = pg().await;
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.replace("{schema}", &self.schema)))
            .fetch_one(&mut db)
            .await
            .expect("scalar query")
    }

    /// Error rows over every job of this test: (code, count), sorted by code.
    pub async fn error_codes(&self) -> Vec<(String, i64)> {
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for (code, _, _) in self.error_rows().await {
            *counts.entry(code).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// All error rows of this test's jobs, wherever they are now (a job's `et_`/`uv_` tables or,
    /// once consolidated, `error_history`): (code, raw bytes, message), for content checks.
    pub async fn error_rows(&self) -> Vec<(String, Vec<u8>, String)> {
        self.error_rows_full()
            .await
            .into_iter()
            .map(|e| (e.code, e.raw, e.message))
            .collect()
    }

    /// Every column that matters of every error row. One statement reads the tables and the
    /// history, so a consolidation step (one transaction) can neither hide nor double a row; a
    /// table dropped between listing and reading makes it retry.
    pub async fn error_rows_full(&self) -> Vec<ErrorRow> {
        let mut db = pg().await;
        for _ in 0..20 {
            let tables = self.error_tables(&mut db).await;
            // Before the daemon's first migration there is no history table yet.
            let history: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(format!("{}.error_history", self.schema))
                .fetch_one(&mut db)
                .await
                .expect("look up error_history");
            let mut parts = vec![format!(
                "SELECT kind, code, sqlstate, raw, message, seq FROM {}.error_history",
                self.schema
            )];
            if !history {
                parts.clear();
            }
            if parts.is_empty() && tables.is_empty() {
                return Vec::new();
            }
            for t in &tables {
                parts.push(format!(
                    "SELECT '{}'::text, code, sqlstate, raw, message, seq FROM {}.\"{t}\"",
                    &t[..2],
                    self.schema
                ));
            }
            match sqlx::query(sqlx::AssertSqlSafe(parts.join(" UNION ALL ")))
                .fetch_all(&mut db)
                .await
            {
                Ok(rows) => {
                    return rows
                        .iter()
                        .map(|r| ErrorRow {
                            kind: r.get(0),
                            code: r.get(1),
                            sqlstate: r.get(2),
                            raw: r.get(3),
                            message: r.get(4),
                            seq: r.get(5),
                        })
                        .collect()
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("could not read the error rows (tables kept vanishing)");
    }

    /// The per-job error tables (`et_<job>`, `uv_<job>`) in this test's schema.
    pub async fn error_tables(&self, db: &mut PgConnection) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND (table_name LIKE 'et\\_%' OR table_name LIKE 'uv\\_%') ORDER BY 1",
        )
        .bind(&self.schema)
        .fetch_all(db)
        .await
        .expect("list error tables")
    }

    /// Waits until more than `n` rows are in the target: the load is under way.
    pub async fn wait_rows_over(&self, n: i64) {
        self.wait_for(
            "the load to be under way",
            Duration::from_secs(60),
            || async { self.loaded().await.0 > n },
        )
        .await;
    }

    /// Waits until the daemon's HTTP listener on `port` accepts connections.
    pub async fn wait_listening(&self, port: u16) {
        self.wait_for(
            "the daemon to serve metrics",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Polls `f` every 100 ms until it returns true or `timeout` passes.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        while !f().await {
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; daemon logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `expected` rows (good + error) have been committed.
    pub async fn wait_loaded(&self, expected_total: i64, timeout: Duration) {
        self.wait_for("all rows committed", timeout, || async {
            let (n, _) = self.loaded().await;
            let e: i64 = self.error_codes().await.iter().map(|(_, c)| c).sum();
            n + e >= expected_total
        })
        .await;
    }

    /// Drops the schema and deletes the queue.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        cleanup(&self.schema, &self.queue).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A failed test still leaves nothing behind in the services (logs stay for reading).
        let (schema, queue) = (self.schema.clone(), self.queue.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup(&schema, &queue));
            }
        })
        .join();
    }
}

async fn cleanup(schema: &str, queue: &str) {
    if let Ok(mut db) = PgConnection::connect(PG_URL).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&mut db)
        .await;
    }
    if let Ok(conn) = conveyor::source::connect(&SecretUrl::new(AMQP_URL), "test-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// (status code, body) of `GET path` on the daemon's HTTP port.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the daemon's HTTP port");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sum of the samples of metric `name` whose labels contain every one of `labels`.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the conveyor binary with `args` (e.g. `replay --direct FILE`) against `config`;
/// returns (exit code, stdout, stderr).
pub fn cli(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    cli_env(config, args, &[])
}

/// The conveyor binary as a command for `config`, run in the config's directory (so relative
/// paths such as the default report dir stay inside the test's directory).
pub fn cli_command(config: &std::path::Path, args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    c.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("CONVEYOR_AMQP_URL")
        .env_remove("CONVEYOR_DATABASE_URL")
        .env_remove("CONVEYOR_CRASH_AT")
        .envs(vars.iter().copied());
    if let Some(dir) = config.parent() {
        c.current_dir(dir);
    }
    c
}

/// [`cli`] with extra environment variables (e.g. `CONVEYOR_CRASH_AT`).
pub fn cli_env(
    config: &std::path::Path,
    args: &[&str],
    vars: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let out = cli_command(config, args, vars)
        .output()
        .expect("run conveyor");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn pg() -> PgConnection {
    PgConnection::connect(PG_URL).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is not reachable at {PG_URL}: {e}; start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")
    })
}

/// A running `conveyor run` child process.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if start.elapsed() > timeout {
                panic!(
                    "daemon did not exit within {timeout:?}; log: {}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon logs `needle` (e.g. "consuming").
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            if start.elapsed() > timeout {
                panic!("daemon never logged {needle:?}; log: {}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of a service: `cut()` resets every open connection and refuses new
/// ones until `restore()`; `stall()` keeps connections open but stops forwarding bytes.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let upstream = upstream.to_string();
        let (up2, stalled2, gen2, stop2) = (
            up.clone(),
            stalled.clone(),
            generation.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop2.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let token = gen2.lock().expect("lock").clone();
                let upstream = upstream.clone();
                let stalled = stalled2.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    pipe(client, server, token, stalled).await;
                });
            }
        });
        Proxy {
            addr,
            up,
            stalled,
            generation,
            stop,
        }
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn pg_url(&self) -> String {
        format!("postgres://postgres@{}/test", self.addr)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    token: CancellationToken,
    stalled: Arc<AtomicBool>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let s1 = stalled.clone();
    let a = async move { copy(&mut cr, &mut sw, s1).await };
    let b = async move { copy(&mut sr, &mut cw, stalled).await };
    tokio::select! {
        _ = a => {}
        _ = b => {}
        _ = token.cancelled() => {}
    }
}

async fn copy(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One error row, from a job's `et_`/`uv_` table or from `error_history`.
#[derive(Debug, Clone)]
pub struct ErrorRow {
    /// "et" or "uv".
    pub kind: String,
    pub code: String,
    pub sqlstate: Option<String>,
    pub raw: Vec<u8>,
    pub message: String,
    pub seq: i64,
}
