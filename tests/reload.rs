//! Operations against the real services: SIGHUP re-reads the config (a new `pack` reaches the
//! next job's `jobs.params`; a broken file is refused and the daemon goes on), and systemd's
//! notify protocol (READY=1 once the workers are registered, WATCHDOG=1 heartbeats, STOPPING=1)
//! received on a real datagram socket, as systemd would.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, Settings};

fn hup(pid: u32) {
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP")
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_pack_at_the_next_job_and_refuses_a_broken_config() {
    let env = Env::new("reload").await;
    let s = Settings {
        pack: 500,
        sessions: 1,
        ..Settings::default()
    };
    let mut daemon = env.spawn(&s);
    env.feed(200, 0.0, 1, 1).await;
    env.wait_loaded(200, Duration::from_secs(60)).await;

    env.write_config(&Settings {
        pack: 123,
        ..s.clone()
    });
    hup(daemon.child.id());
    daemon
        .wait_log(
            "SIGHUP: applies at the pipeline's next job",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        daemon.log_text().contains("person.pack: 500 → 123"),
        "{}",
        daemon.log_text()
    );

    // The standby was initialised before the reload and runs the next turn as it was set up;
    // the job initialised after it (the turn after) reads the new file.
    for (i, base) in [1_000u64, 5_000].into_iter().enumerate() {
        let (code, out, err) = support::cli(&env.config_path(), &["eoj"]);
        assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
        env.feed(100, 0.0, base, 2 + i as u64).await;
        env.wait_loaded(300 + 100 * i as i64, Duration::from_secs(60))
            .await;
    }
    assert_eq!(
        env.scalar(
            // activated_at: set at a job's first delivery (rows_read is refreshed only every 10 s).
            "SELECT count(*) FROM {schema}.jobs WHERE (params->>'pack')::int = 123 AND activated_at IS NOT NULL"
        )
        .await,
        1,
        "the job after the reload runs with the new pack"
    );

    std::fs::write(env.config_path(), "[amqp]\nurl = 42\n").expect("break the config");
    hup(daemon.child.id());
    daemon
        .wait_log("SIGHUP: config refused", Duration::from_secs(10))
        .await;
    env.feed(50, 0.0, 9_000, 9).await;
    env.wait_loaded(450, Duration::from_secs(60)).await;
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "the daemon goes on with the running config"
    );
    daemon.sigterm();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    env.cleanup().await;
}

/// `conveyor run` as systemd starts a `Type=notify` service with `WatchdogSec=0.8`: a notify
/// socket bound here (read timeout `timeout`), `WATCHDOG_USEC`, and `WATCHDOG_PID` = the
/// service's pid (`exec` keeps the shell's pid, $$). Its log goes to `<dir>/<log>`.
fn spawn_notified(
    env: &Env,
    config: &std::path::Path,
    timeout: Duration,
    vars: &[(&str, &str)],
    log: &str,
) -> (UnixDatagram, support::Daemon) {
    let sock_path = env.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let log = env.dir.join(log);
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {} --config {} run",
            env!("CARGO_BIN_EXE_conveyor"),
            config.display()
        ))
        .current_dir(&env.dir)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .envs(vars.iter().copied())
        .env_remove("RUST_LOG")
        .env_remove("CONVEYOR_AMQP_URL")
        .env_remove("CONVEYOR_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn");
    (sock, support::Daemon { child, log })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_watchdog_and_stopping() {
    let env = Env::new("sdnotify").await;
    let config = env.write_config(&Settings::default());
    let (sock, mut daemon) = spawn_notified(
        &env,
        &config,
        Duration::from_millis(200),
        &[],
        "sdnotify.log",
    );
    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let watchdogs = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        if seen.iter().any(|m| m.contains("READY=1")) && watchdogs >= 3 {
            break;
        }
    }
    assert!(
        seen.iter().any(|m| m.contains("READY=1")),
        "READY once the workers registered: {seen:?}"
    );
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "heartbeats at half of WATCHDOG_USEC: {seen:?}"
    );
    assert!(Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .expect("kill")
        .success());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30)
        && !seen.iter().any(|m| m.contains("STOPPING=1"))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    let status = daemon.child.wait().expect("wait");
    assert!(status.success(), "clean exit: {status}");
    env.cleanup().await;
}

/// A worker that stops turning (a future that never completes, aimed at the moment its spooled
/// deliveries would be acked) stops the WATCHDOG=1 heartbeats, so systemd would restart the
/// service; the log names the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_worker_starves_the_systemd_watchdog() {
    let env = Env::new("wedge").await;
    let port = support::free_port();
    let config = env.write_config(&Settings {
        top: "[watchdog]\nwedged_after = \"2s\"\n".into(),
        http_listen: format!("127.0.0.1:{port}"),
        ..Settings::default()
    });
    let (sock, mut daemon) = spawn_notified(
        &env,
        &config,
        Duration::from_millis(100),
        &[("CONVEYOR_WEDGE_AT", "before_ack:1")],
        "wedge.log",
    );
    let log = daemon.log.clone();
    let mut buf = [0u8; 4096];
    let mut recv_for = |d: Duration| {
        let mut got = Vec::new();
        let start = Instant::now();
        while start.elapsed() < d {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    };
    let beats = |m: &[String]| m.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let before = recv_for(Duration::from_secs(3));
    assert!(before.iter().any(|m| m.contains("READY=1")), "{before:?}");
    assert!(
        beats(&before) >= 3,
        "fed while every worker turns: {before:?}"
    );

    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text().contains("worker wedged"),
        "idle workers are not wedged: {}",
        text()
    );
    assert_eq!(support::get(port, "/healthz").await.0, 200);
    env.feed(20, 0.0, 1, 1).await;
    let start = Instant::now();
    let wedged_after_point = || {
        let t = text();
        t.find("wedge point reached")
            .is_some_and(|i| t[i..].contains("worker wedged"))
    };
    while !wedged_after_point() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the wedge is never noticed; log: {}",
            text()
        );
        recv_for(Duration::from_millis(200));
    }
    assert!(
        text().contains("person/0"),
        "the log names the worker: {}",
        text()
    );
    let (code, body) = support::get(port, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("wedged"), "{body}");
    let (_, metrics) = support::get(port, "/metrics").await;
    assert!(
        support::sample(&metrics, "conveyor_workers_wedged", &[]) >= 1.0,
        "{metrics}"
    );
    // One heartbeat may already be on its way; after that, none.
    recv_for(Duration::from_millis(300));
    let after = recv_for(Duration::from_secs(2));
    assert_eq!(
        beats(&after),
        0,
        "no WATCHDOG=1 once a worker is wedged: {after:?}"
    );

    daemon.kill9();
    env.cleanup().await;
}
