//! The machine's RabbitMQ and PostgreSQL really restarted in the middle of a load: the daemon
//! reconnects with backoff, says so in its log, and every row is loaded exactly once.
//!
//! This is the only test in this file on purpose: `cargo test` runs test binaries one after
//! another, so while it restarts the services no other test is running. It waits until both
//! services answer again before it returns, leaving the machine as it found it.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Env, Settings};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a PostgreSQL cluster")
}

async fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pg_answers() -> bool {
    Command::new("pg_isready")
        .args(["-h", "127.0.0.1", "-p", "5432", "-q"])
        .status()
        .is_ok_and(|s| s.success())
}

fn amqp_answers() -> bool {
    std::net::TcpStream::connect("127.0.0.1:5672").is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_and_postgresql_restarts_lose_nothing_and_load_nothing_twice() {
    let env = Env::new("restart").await;
    let report = env.feed(60_000, 0.0, 97_000_000, 91).await;
    // Small batches on one session: the load lasts long enough for both restarts to land in it.
    let settings = Settings {
        pack: 100,
        sessions: 1,
        extra: "rotate_every = \"0s\"\nidle_eoj = \"0s\"".into(),
        ..Settings::default()
    };
    let mut daemon = env.spawn(&settings);
    env.wait_rows_over(4_000).await;

    // RabbitMQ: stop and start the broker application (every connection drops; the quorum
    // queue keeps its messages; unacked deliveries come back).
    run("rabbitmqctl", &["stop_app"]);
    let during = env.loaded().await.0;
    run("rabbitmqctl", &["start_app"]);
    run("rabbitmqctl", &["await_startup", "--timeout", "120"]);
    wait_until("RabbitMQ answering", Duration::from_secs(60), amqp_answers).await;
    // Progress after the broker came back (spooled rows commit; the rest is consumed again).
    env.wait_rows_over(during).await;
    assert!(
        during < 60_000,
        "the broker restart landed mid-load ({during} rows loaded)"
    );

    // PostgreSQL: a fast restart (every session is terminated, in-flight transactions abort).
    let pg_loaded = env.loaded().await.0;
    let version = pg_version();
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ],
    );
    wait_until("PostgreSQL answering", Duration::from_secs(60), pg_answers).await;
    assert!(pg_loaded < 60_000, "the database restart landed mid-load");

    env.wait_loaded(60_000, Duration::from_secs(180)).await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(60)).await, Some(0));
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 60_000, "every row loaded");
    assert_eq!(sum as u128, report.good_id_sum, "exactly the fed rows");
    assert!(
        env.error_codes().await.is_empty(),
        "no row was loaded twice (a second copy would be a duplicate_key error row)"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("RabbitMQ connection restored"),
        "the log says the broker came back"
    );
    assert!(
        log.contains("database connection restored") || log.contains("database unavailable"),
        "the log says the database went away"
    );
    env.cleanup().await;
}
