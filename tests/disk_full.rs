//! A full disk under the spool: the daemon stops reading (it never acks what is not durable),
//! says so in its log, `/readyz` and `/metrics`, and resumes by itself when space returns —
//! every row loaded exactly once. The state directory is a real 512 KiB tmpfs.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{free_port, get, sample, Env, Settings};

/// A tmpfs mounted for the test; unmounted on drop (also when the test fails).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); this test simulates a full disk with one"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_stops_consuming_and_resumes_when_space_returns() {
    let env = Env::new("diskfull").await;
    let tmpfs = Tmpfs::mount(&env.state_dir(), "512k");
    let report = env.feed(20_000, 0.0, 95_000_000, 71).await;
    let port = free_port();
    let settings = Settings {
        pack: 200,
        http_listen: format!("127.0.0.1:{port}"),
        extra: "checkpoint_interval = \"200ms\"\nrotate_every = \"0s\"\nidle_eoj = \"0s\"".into(),
        ..Settings::default()
    };
    // Hold the table against writes (reads still work): batches cannot commit, so the spool
    // cannot be cut back and fills the disk.
    let mut locker = support::pg().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {}.person IN SHARE MODE",
        env.schema
    )))
    .execute(&mut locker)
    .await
    .expect("lock");
    let mut daemon = env.spawn(&settings);
    daemon
        .wait_log("spool write failed", Duration::from_secs(60))
        .await;
    env.wait_for(
        "/readyz to report the spool",
        Duration::from_secs(10),
        || async {
            let (code, body) = get(port, "/readyz").await;
            code == 503 && body.contains("spool")
        },
    )
    .await;
    let (_, metrics) = get(port, "/metrics").await;
    assert_eq!(
        sample(&metrics, "conveyor_spool_failing", &[]),
        1.0,
        "{metrics}"
    );
    // Nothing is read while the spool cannot take it. (The queue's ready count is no measure:
    // the broker keeps pushing into the prefetch window whether or not the worker reads.)
    // Rows read before the failure still close their batch (latency timer): let that settle.
    let received = |m: &str| sample(m, "conveyor_messages_received_total", &[]);
    let mut before = received(&get(port, "/metrics").await.1);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = received(&get(port, "/metrics").await.1);
        if now == before {
            break;
        }
        before = now;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        received(&get(port, "/metrics").await.1),
        before,
        "consuming stopped"
    );
    assert!(
        env.queue_depth().await > 0,
        "the disk filled before the backlog was read"
    );
    assert_eq!(env.loaded().await.0, 0, "nothing committed under the lock");

    // Space returns once the batches can commit and a checkpoint cuts the spool back.
    drop(locker);
    env.wait_loaded(20_000, Duration::from_secs(120)).await;
    daemon
        .wait_log("spool writable again", Duration::from_secs(10))
        .await;
    env.wait_for(
        "/readyz to be ready again",
        Duration::from_secs(10),
        || async { get(port, "/readyz").await.0 == 200 },
    )
    .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let (n, sum) = env.loaded().await;
    assert_eq!(n, 20_000);
    assert_eq!(sum as u128, report.good_id_sum);
    assert!(env.error_codes().await.is_empty(), "no row loaded twice");
    assert_eq!(env.queue_depth().await, 0);
    drop(tmpfs);
    env.cleanup().await;
}
