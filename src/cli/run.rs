//! `conveyor run`: load the config, install signal handlers, run the daemon.
//!
//! SIGTERM/SIGINT stop it cleanly. SIGHUP re-reads the config file now and says what it will do
//! with it: per-job parameters (pack, sessions, latency, rotation, thresholds, …) apply to each
//! pipeline's jobs initialised from now on — every job re-reads the file at its start anyway
//! (`params`); a standby already waiting runs its turn as it was set up — while what a running
//! process cannot change (URLs, queues, targets, the set of pipelines) is reported as needing
//! a restart; an invalid file is refused with the reason and the running config stays.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    super::init_logging(config.log_format, &config.log_level);
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM handler: {e}"))?;
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping consumers, committing in-flight batches"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping consumers, committing in-flight batches"),
        }
        on_signal.cancel();
    });
    tokio::spawn(reload_on_hup(
        hup,
        config_path.to_path_buf(),
        config.clone(),
        shutdown.clone(),
    ));
    crate::daemon::run(config, shutdown).await?;
    info!("conveyor stopped cleanly");
    Ok(())
}

async fn reload_on_hup(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    mut current: Config,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = cancel.cancelled() => return,
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        match read {
            Ok(Ok(new)) => {
                let changes = changes(&current, &new);
                if changes.is_empty() {
                    info!(path = %path.display(), "SIGHUP: config re-read, nothing changed");
                }
                for c in changes {
                    match c {
                        Change::NextJob(what) => {
                            info!(path = %path.display(), change = %what, "SIGHUP: applies at the pipeline's next job (jobs initialised from now on; a standby already waiting keeps its values for its turn)")
                        }
                        Change::Restart(what) => {
                            warn!(path = %path.display(), change = %what, "SIGHUP: needs a restart (systemctl restart conveyor); the running process keeps the old value")
                        }
                    }
                }
                current = new;
            }
            Ok(Err(e)) => {
                error!(path = %path.display(), error = %e, "SIGHUP: config refused; the running config stays (fix the file and send SIGHUP again)")
            }
            Err(e) => error!(error = %e, "SIGHUP: could not read the config"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
}

#[derive(Debug, PartialEq)]
enum Change {
    NextJob(String),
    Restart(String),
}

/// What differs between two configs, and when it can take effect.
fn changes(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    if old.amqp_url.expose() != new.amqp_url.expose() {
        out.push(Change::Restart("amqp.url".into()));
    }
    if old.database_url.expose() != new.database_url.expose() || old.schema != new.schema {
        out.push(Change::Restart("database.url / database.schema".into()));
    }
    if old.http_listen != new.http_listen {
        out.push(Change::Restart("http.listen".into()));
    }
    for p in &new.pipelines {
        let Some(o) = old.pipelines.iter().find(|o| o.name == p.name) else {
            out.push(Change::Restart(format!("new pipeline {}", p.name)));
            continue;
        };
        let (a, b) = (
            serde_json::to_value(o).unwrap_or_default(),
            serde_json::to_value(p).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            continue;
        };
        for (k, v) in b {
            let before = a.get(k).cloned().unwrap_or_default();
            if before == *v {
                continue;
            }
            let what = format!("{}.{k}: {before} → {v}", p.name);
            // Fixed for the life of the process (params keeps them, too).
            if matches!(
                k.as_str(),
                "queue" | "target_schema" | "target_table" | "handoff" | "durability"
            ) {
                out.push(Change::Restart(what));
            } else {
                out.push(Change::NextJob(what));
            }
        }
    }
    for o in &old.pipelines {
        if !new.pipelines.iter().any(|p| p.name == o.name) {
            out.push(Change::Restart(format!("pipeline {} removed", o.name)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Config {
        Config::from_toml(
            Path::new("t.toml"),
            &format!(
                "[amqp]\nurl = \"amqp://g:g@h:5672/%2f\"\n[database]\nurl = \"postgres://p@h/d\"\n[[pipeline]]\nname = \"p\"\nqueue = \"q\"\ntarget = \"public.t\"\n{extra}"
            ),
            |_| None,
        )
        .expect("valid")
    }

    #[test]
    fn per_job_changes_apply_next_job_and_queue_needs_a_restart() {
        let old = parse("pack = 2500");
        let new = parse("pack = 1000\nsessions = 3");
        let c = changes(&old, &new);
        assert!(
            c.contains(&Change::NextJob("p.pack: 2500 → 1000".into())),
            "{c:?}"
        );
        assert!(c
            .iter()
            .any(|c| matches!(c, Change::NextJob(s) if s.starts_with("p.sessions"))));
        let moved = Config::from_toml(
            Path::new("t.toml"),
            "[amqp]\nurl = \"amqp://g:g@h:5672/%2f\"\n[database]\nurl = \"postgres://p@h/d\"\n[[pipeline]]\nname = \"p\"\nqueue = \"other\"\ntarget = \"public.t\"\n",
            |_| None,
        )
        .expect("valid");
        assert!(changes(&old, &moved)
            .iter()
            .any(|c| matches!(c, Change::Restart(s) if s.starts_with("p.queue"))));
        assert!(changes(&old, &old).is_empty());
    }
}
