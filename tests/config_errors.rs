//! Bad configuration, through the real binary: for `migrate` and `run`, an unknown key, a wrong
//! type, an impossible value, a missing file and a non-AMQP URL each make the process exit
//! non-zero with a message that names the file, the key and what is allowed; an unreachable
//! database makes `migrate` fail fast, and no output ever shows the database password.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "hunter2";

/// A valid config with the pipeline section last, so a test can append keys to it.
fn valid_config(amqp: &str, db: &str, timeout_ms: u64) -> String {
    format!(
        r#"[amqp]
url = "{amqp}"
[database]
url = "{db}"
schema = "conveyor_cfgtest"
connect_timeout_ms = {timeout_ms}
[http]
listen = ""
[log]
format = "json"
level = "info"
[[pipeline]]
name = "person"
queue = "conveyor.test.config_errors"
target = "public.person"
"#
    )
}

fn base() -> String {
    valid_config(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "postgres://postgres@127.0.0.1:5432/test",
        2000,
    )
}

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-config-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("conveyor.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

struct Outcome {
    code: Option<i32>,
    /// stdout and stderr together.
    output: String,
    elapsed: Duration,
}

/// Runs `conveyor --config <config> <sub>`; kills it after `limit` (code is then `None`).
fn conveyor(config: &Path, sub: &str, limit: Duration) -> Outcome {
    let dir = config.parent().expect("config dir");
    let (out, err) = (
        dir.join(format!("{sub}.out")),
        dir.join(format!("{sub}.err")),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("--config")
        .arg(config)
        .arg(sub)
        .env_remove("RUST_LOG")
        .env_remove("CONVEYOR_CONFIG")
        .env_remove("CONVEYOR_AMQP_URL")
        .env_remove("CONVEYOR_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn conveyor");
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Outcome {
        code,
        output: format!("{}{}", read(&out), read(&err)),
        elapsed,
    }
}

/// Both subcommands refuse `text` with a non-zero exit and an output containing every `needle`
/// and the config file's path.
fn refused(name: &str, text: &str, needles: &[&str]) {
    let dir = temp_dir(name);
    let path = write(&dir, text);
    for sub in ["migrate", "run"] {
        let o = conveyor(&path, sub, Duration::from_secs(30));
        assert!(
            o.code.is_some(),
            "{sub} did not exit within 30 s: {}",
            o.output
        );
        assert_ne!(o.code, Some(0), "{sub} must fail: {}", o.output);
        let shown = path.display().to_string();
        assert!(
            o.output.contains(&shown),
            "{sub}: names the file {shown}: {}",
            o.output
        );
        for n in needles {
            assert!(o.output.contains(n), "{sub}: mentions {n:?}: {}", o.output);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_named() {
    refused("unknown", &format!("{}pakc = 5\n", base()), &["pakc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_names_the_key() {
    refused(
        "wrongtype",
        &format!("{}pack = \"many\"\n", base()),
        &["pack"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_value_names_the_key_and_the_allowed_range() {
    refused(
        "sessions",
        &format!("{}sessions = 0\n", base()),
        &["sessions", "between 1 and 64"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_amqp_url_is_refused() {
    let text = base().replace("amqp://guest", "http://guest");
    refused("amqpurl", &text, &["amqp.url", "amqp://"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_file_says_the_path_and_how_to_fix() {
    let dir = temp_dir("missing");
    let path = dir.join("does-not-exist.toml");
    for sub in ["migrate", "run"] {
        let o = conveyor(&path, sub, Duration::from_secs(30));
        assert!(
            o.code.is_some_and(|c| c != 0),
            "{sub}: {:?} {}",
            o.code,
            o.output
        );
        assert!(
            o.output.contains(&path.display().to_string()),
            "{sub}: {}",
            o.output
        );
        assert!(
            o.output.contains("--config"),
            "{sub}: says how to fix it: {}",
            o.output
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_fails_fast_and_never_shows_the_password() {
    let dir = temp_dir("secret");
    let db = format!("postgres://u:{PASSWORD}@127.0.0.1:1/test");
    let path = write(
        &dir,
        &valid_config("amqp://guest:guest@127.0.0.1:5672/%2f", &db, 500),
    );
    let o = conveyor(&path, "migrate", Duration::from_secs(30));
    assert!(o.code.is_some_and(|c| c != 0), "{:?} {}", o.code, o.output);
    assert!(o.elapsed < Duration::from_secs(5), "took {:?}", o.elapsed);
    assert!(
        o.output.contains("127.0.0.1:1"),
        "names the address: {}",
        o.output
    );
    assert!(
        !o.output.contains(PASSWORD),
        "password leaked: {}",
        o.output
    );
    // `run` applies the migrations first: it fails the same way (or, were it to retry, is
    // killed after 10 s); whatever it printed hides the password too.
    let o = conveyor(&path, "run", Duration::from_secs(10));
    assert_ne!(o.code, Some(0), "{}", o.output);
    assert!(
        o.output.contains("127.0.0.1:1"),
        "names the address: {}",
        o.output
    );
    assert!(
        !o.output.contains(PASSWORD),
        "password leaked: {}",
        o.output
    );
    let _ = std::fs::remove_dir_all(&dir);
}
