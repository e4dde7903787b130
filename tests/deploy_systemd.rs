//! The service deployment in `deploy/`: the systemd unit (`deploy/systemd/conveyor.service`),
//! its production config and env example, `deploy/install.sh`, the RabbitMQ definitions
//! (`deploy/rabbitmq/definitions.json`) and the database role (`deploy/sql/role.sql`).
//!
//! Static checks always run (and can always fail): the unit's lifecycle keys and every hardening
//! key, the production config parses with conveyor's own validator and points at the systemd
//! directories, `bash -n deploy/install.sh` and a `--dry-run` of it, the definitions declare the
//! quorum single-active-consumer queue exactly as the daemon does and the control exchange.
//!
//! When `systemd-analyze` is on PATH, `systemd-analyze verify` checks the unit. It is run on a
//! temporary copy, because verify refuses a unit whose ExecStart binary does not exist, and
//! /usr/local/bin/conveyor is not installed on a build machine: in the copy ExecStart runs the
//! binary this test was built with (`CARGO_BIN_EXE_conveyor`, same arguments), ExecReload keeps
//! /bin/kill, and the `User=`/`Group=` lines are dropped when the `conveyor` user/group does
//! not exist on this machine (deploy/install.sh creates them on a real host). Everything else is
//! verified as shipped. `verify` exits 0 on unknown keys and unparseable values (it only warns
//! "…, ignoring"), so any line it prints about the unit fails the test too. Without
//! `systemd-analyze` that part is skipped with a note.
//!
//! `shellcheck deploy/install.sh` runs when shellcheck is on PATH, likewise.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(tool);
            f.is_file()
                && std::fs::metadata(&f)
                    .map(|m| {
                        use std::os::unix::fs::PermissionsExt;
                        m.permissions().mode() & 0o111 != 0
                    })
                    .unwrap_or(false)
        })
    })
}

/// `key=value` assignments of the unit, comments and section headers left out.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn sections(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('[') && l.ends_with(']'))
        .collect()
}

#[test]
fn unit_has_lifecycle_identity_and_directories() {
    let text = read("deploy/systemd/conveyor.service");
    assert_eq!(sections(&text), ["[Unit]", "[Service]", "[Install]"]);
    let e = unit_entries(&text);
    let expect = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        (
            "ExecStart",
            "/usr/local/bin/conveyor --config /etc/conveyor/conveyor.toml run",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "60"),
        ("User", "conveyor"),
        ("Group", "conveyor"),
        ("EnvironmentFile", "-/etc/conveyor/conveyor.env"),
        ("LimitNOFILE", "65536"),
        ("WantedBy", "multi-user.target"),
    ];
    for (k, v) in expect {
        assert_eq!(value(&e, k), Some(v), "conveyor.service: {k}");
    }
    let words = |k: &str| -> Vec<String> {
        value(&e, k)
            .unwrap_or_else(|| panic!("conveyor.service has no {k}="))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // The config's [state] dir and [journal] dir live under StateDirectory, [report] dir
    // under LogsDirectory (see production_config_uses_the_systemd_paths).
    let state = words("StateDirectory");
    assert_eq!(state.first().map(String::as_str), Some("conveyor"));
    assert!(state.iter().any(|d| d == "conveyor/state"), "{state:?}");
    let logs = words("LogsDirectory");
    assert_eq!(logs.first().map(String::as_str), Some("conveyor"));
    assert!(logs.iter().any(|d| d == "conveyor/reports"), "{logs:?}");
}

#[test]
fn unit_has_every_hardening_key() {
    let e = unit_entries(&read("deploy/systemd/conveyor.service"));
    let expect = [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        // Empty: no capabilities at all.
        ("CapabilityBoundingSet", ""),
    ];
    for (k, v) in expect {
        assert_eq!(value(&e, k), Some(v), "conveyor.service: {k}");
    }
}

#[test]
fn production_config_uses_the_systemd_paths() {
    let rel = "deploy/systemd/conveyor.toml";
    let path = root().join(rel);
    // No environment overrides: the file itself must be valid.
    let config = conveyor::config::Config::from_toml(&path, &read(rel), |_| None)
        .unwrap_or_else(|e| panic!("{rel} is refused by conveyor's config validator: {e}"));
    assert_eq!(config.state_dir, Path::new("/var/lib/conveyor/state"));
    assert_eq!(config.journal_dir, Path::new("/var/lib/conveyor/journal"));
    assert_eq!(config.report_dir, Path::new("/var/log/conveyor/reports"));
    assert_eq!(config.log_format, conveyor::config::LogFormat::Json);
    // The secrets come from the env file: no password in the shipped config.
    for url in [config.amqp_url.expose(), config.database_url.expose()] {
        let u = url::Url::parse(url).expect("url");
        assert!(u.password().is_none(), "password in {rel}: {u}");
    }

    let env = read("deploy/systemd/conveyor.env.example");
    for key in ["CONVEYOR_AMQP_URL=", "CONVEYOR_DATABASE_URL="] {
        assert!(
            env.lines().any(|l| l.starts_with(key)),
            "conveyor.env.example sets no {key}"
        );
    }
}

#[test]
fn install_script_parses_and_dry_runs() {
    let script = root().join("deploy/install.sh");
    let text = read("deploy/install.sh");
    assert!(text.starts_with("#!/usr/bin/env bash\n"), "shebang");
    assert!(text.contains("set -euo pipefail"));
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash -n deploy/install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --dry-run needs no root and changes nothing; it names every step.
    let out = Command::new("bash")
        .arg(&script)
        .args([
            "--dry-run",
            "--prefix",
            "/opt/conveyor-test",
            "--binary",
            env!("CARGO_BIN_EXE_conveyor"),
        ])
        .output()
        .expect("run install.sh --dry-run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "install.sh --dry-run failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "/opt/conveyor-test/bin/conveyor",
        "/etc/systemd/system/conveyor.service",
        "/etc/conveyor/conveyor.env",
        "-m 0600",
        "conveyor --config /etc/conveyor/conveyor.toml check",
        "conveyor --config /etc/conveyor/conveyor.toml migrate",
        "systemctl enable --now conveyor",
    ] {
        assert!(
            stdout.contains(want),
            "dry run does not mention {want:?}:\n{stdout}"
        );
    }
    assert!(
        !Path::new("/opt/conveyor-test").exists(),
        "dry run created files"
    );

    if on_path("shellcheck") {
        // The .deb's maintainer script and CI's own entry point too.
        let out = Command::new("shellcheck")
            .arg(&script)
            .arg(root().join("deploy/debian/postinst"))
            .arg(root().join(".ci/run"))
            .output()
            .expect("run shellcheck");
        assert!(
            out.status.success(),
            "shellcheck deploy/install.sh deploy/debian/postinst .ci/run:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        println!("shellcheck is not on PATH: skipped `shellcheck deploy/install.sh`");
    }
}

#[test]
fn rabbitmq_definitions_match_what_the_daemon_declares() {
    let text = read("deploy/rabbitmq/definitions.json");
    let d: serde_json::Value = serde_json::from_str(&text).expect("definitions.json parses");
    let items = |k: &str| {
        d[k].as_array()
            .unwrap_or_else(|| panic!("no {k} array"))
            .clone()
    };

    assert!(items("vhosts").iter().any(|v| v["name"] == "/"));

    let queues = items("queues");
    let q = queues
        .iter()
        .find(|q| q["name"] == "conveyor.person")
        .expect("queue conveyor.person");
    assert_eq!(q["vhost"], "/");
    assert_eq!(q["durable"], true);
    assert_eq!(q["auto_delete"], false);
    // Exactly the arguments the daemon's queue_declare = "quorum" uses: any difference makes its
    // declare fail with PRECONDITION_FAILED (inequivalent arg).
    let args = q["arguments"].as_object().expect("arguments");
    assert_eq!(args.get("x-queue-type"), Some(&"quorum".into()));
    assert_eq!(args.get("x-single-active-consumer"), Some(&true.into()));
    assert_eq!(
        args.len(),
        2,
        "extra queue arguments: {args:?} (use the policy)"
    );

    let exchanges = items("exchanges");
    let x = exchanges
        .iter()
        .find(|x| x["name"] == conveyor::source::CONTROL_EXCHANGE)
        .expect("exchange conveyor.control");
    assert_eq!(x["type"], "fanout");
    assert_eq!(x["durable"], true);
    assert_eq!(x["auto_delete"], false);
    assert_eq!(x["vhost"], "/");

    let policies = items("policies");
    let p = policies
        .iter()
        .find(|p| p["name"] == "conveyor-queues")
        .expect("policy conveyor-queues");
    assert_eq!(p["pattern"], "^conveyor\\.");
    assert_eq!(p["apply-to"], "queues");
    let def = p["definition"].as_object().expect("policy definition");
    assert!(!def.is_empty());
    // A delivery limit drops (or dead-letters) a message redelivered that often; conveyor never
    // rejects a message, so redeliveries only come from crashes: the policy must not set one.
    assert!(!def.contains_key("delivery-limit"), "{def:?}");
    // A length limit must push back on publishers, not silently drop the oldest messages.
    if def.contains_key("max-length") || def.contains_key("max-length-bytes") {
        assert_eq!(def.get("overflow"), Some(&"reject-publish".into()));
    }
}

#[test]
fn role_sql_grants_least_privilege() {
    let sql = read("deploy/sql/role.sql");
    let code: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "CREATE ROLE conveyor_loader LOGIN",
        "NOSUPERUSER",
        "GRANT USAGE, CREATE ON SCHEMA conveyor TO conveyor_loader",
        "GRANT SELECT, INSERT ON TABLE public.person TO conveyor_loader",
        "GRANT CONNECT, CREATE ON DATABASE",
    ] {
        assert!(code.contains(want), "role.sql lacks {want:?}");
    }
    for never in [
        "SUPERUSER LOGIN",
        " SUPERUSER;",
        "GRANT ALL",
        "UPDATE ON TABLE public.person",
    ] {
        assert!(!code.contains(never), "role.sql grants {never:?}");
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !on_path("systemd-analyze") {
        println!("systemd-analyze is not on PATH: skipped `systemd-analyze verify` (static checks still ran)");
        return;
    }
    let text = read("deploy/systemd/conveyor.service");
    let exists = |db: &str, name: &str| {
        Command::new("getent")
            .args([db, name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let have_user = exists("passwd", "conveyor");
    let have_group = exists("group", "conveyor");
    let bin = env!("CARGO_BIN_EXE_conveyor");
    let mut copy = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ExecStart=/usr/local/bin/conveyor") {
            copy.push_str(&format!("ExecStart={bin}{rest}\n"));
        } else if line.starts_with("ExecReload=") {
            assert!(line.starts_with("ExecReload=/bin/kill "), "{line}");
            copy.push_str(line);
            copy.push('\n');
        } else if (line.starts_with("User=") && !have_user)
            || (line.starts_with("Group=") && !have_group)
        {
            copy.push_str(&format!(
                "# (dropped for verify: no such user/group here) {line}\n"
            ));
        } else {
            copy.push_str(line);
            copy.push('\n');
        }
    }
    assert!(
        copy.contains(&format!("ExecStart={bin} --config ")),
        "ExecStart not rewritten"
    );

    let dir = std::env::temp_dir().join(format!("conveyor-unit-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let unit = dir.join("conveyor.service");
    std::fs::write(&unit, copy).expect("write unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{all}"
    );
    // verify exits 0 on "Unknown key …, ignoring" and "Failed to parse …, ignoring": every
    // line that names the unit is a problem with it.
    let complaints: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("conveyor.service") || l.contains("ignoring"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}",
        complaints.join("\n")
    );
    println!(
        "systemd-analyze verify: ok (User= {}, Group= {})",
        if have_user {
            "kept"
        } else {
            "dropped: no user conveyor"
        },
        if have_group {
            "kept"
        } else {
            "dropped: no group conveyor"
        }
    );
}

#[test]
fn sharded_definitions_bind_every_shard_queue_to_the_hash_exchange() {
    let d: serde_json::Value =
        serde_json::from_str(&read("deploy/rabbitmq/definitions-sharded.json"))
            .expect("definitions-sharded.json parses");
    let x = d["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .find(|x| x["type"] == "x-consistent-hash")
        .expect("a consistent-hash exchange")
        .clone();
    assert_eq!(x["durable"], true);
    let queues = d["queues"].as_array().expect("queues");
    assert!(queues.len() >= 2, "a sharded stream has several queues");
    let bindings = d["bindings"].as_array().expect("bindings");
    for q in queues {
        // The daemon declares each shard queue like any other (queue_declare = "quorum").
        let args = q["arguments"].as_object().expect("arguments");
        assert_eq!(args.get("x-queue-type"), Some(&"quorum".into()));
        assert_eq!(args.get("x-single-active-consumer"), Some(&true.into()));
        assert_eq!(args.len(), 2, "{args:?}");
        let b = bindings
            .iter()
            .find(|b| b["destination"] == q["name"])
            .unwrap_or_else(|| panic!("{} is bound", q["name"]));
        assert_eq!(b["source"], x["name"]);
        assert_eq!(b["destination_type"], "queue");
        // The routing key of a consistent-hash binding is the queue's weight.
        assert!(b["routing_key"]
            .as_str()
            .and_then(|w| w.parse::<u32>().ok())
            .is_some_and(|w| w > 0));
    }
}
