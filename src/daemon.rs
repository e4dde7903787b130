//! The daemon: `conveyor run`. Applies migrations, serves HTTP, runs one worker per pipeline,
//! and owns the stop order.
//!
//! Stop order on shutdown (SIGTERM/SIGINT cancel the root token):
//! 1. each worker cancels its consumer, seals its open batch, waits for its in-flight batches to
//!    commit and acks them, closes its channel and ends its job row;
//! 2. once every worker has returned, the HTTP server stops (so /metrics is scrapable to the end);
//! 3. `run` returns; nothing is left running.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, Instrument};

use crate::config::Config;
use crate::worker::{self, Health};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("cannot listen on {addr} for /metrics: {source} (change http.listen, or set it to \"\" to disable)")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the spool directory {} is in use by another conveyor process: give each `conveyor run` its own [state] dir (two processes must never share a spool)", dir.display())]
    StateInUse { dir: std::path::PathBuf },
    #[error("cannot lock the spool directory {}: {source} (check that [state] dir is writable)", dir.display())]
    StateLock {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the spool of pipeline {pipeline} slot {slot}: {source}")]
    Spool {
        pipeline: String,
        slot: &'static str,
        source: crate::spool::SpoolError,
    },
}

/// The two workers of every pipeline (DESIGN §1).
pub const SLOTS: [&str; 2] = ["01", "02"];

/// Takes the slot's spool directory for this process (an exclusive lock held until exit), so
/// two daemons configured with the same `[state] dir` cannot write one spool.
fn lock_state(
    config: &Config,
    p: &crate::config::PipelineConfig,
    slot: &str,
) -> Result<Option<std::fs::File>, DaemonError> {
    if p.durability != crate::config::Durability::Spool {
        return Ok(None);
    }
    let path = crate::spool::spool_path(&config.state_dir, &p.name, slot);
    let dir = path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let lock_err = |source| DaemonError::StateLock {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(lock_err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::StateInUse { dir }),
        Err(std::fs::TryLockError::Error(e)) => Err(lock_err(e)),
    }
}

/// The slot's spool as the last process left it, if any.
async fn read_spool(
    config: &Config,
    p: &crate::config::PipelineConfig,
    slot: &'static str,
) -> Result<Option<crate::spool::FileContents>, DaemonError> {
    let path = crate::spool::spool_path(&config.state_dir, &p.name, slot);
    let read = tokio::task::spawn_blocking(move || crate::spool::read_file(&path))
        .await
        .unwrap_or(Ok(None));
    read.map_err(|source| DaemonError::Spool {
        pipeline: p.name.clone(),
        slot,
        source,
    })
}

/// Adds to the pipeline's set the identities of the messages the slot may still see again: the
/// last `prefetch` of its spool (only those can be unacked at the broker) and those a recovery
/// carried forward in the sidecar.
fn remember_owned(
    owned: &std::sync::Mutex<crate::spool::Owned>,
    config: &Config,
    p: &crate::config::PipelineConfig,
    slot: &str,
    spool: Option<&crate::spool::FileContents>,
) {
    let path = crate::spool::spool_path(&config.state_dir, &p.name, slot);
    let mut ids = crate::spool::owned::load(&crate::spool::owned::sidecar_path(&path));
    if let Some(s) = spool {
        ids.extend(crate::spool::owned::spool_identities(
            s,
            &p.queue_time_header,
            usize::from(p.prefetch),
        ));
    }
    if let Ok(mut set) = owned.lock() {
        for id in ids {
            set.push(id);
        }
    }
}

/// Runs every pipeline until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let metrics = crate::metrics::install();
    crate::db::migrate(&config.database_url, &config.schema, config.connect_timeout).await?;
    let health = Arc::new(Health::default());
    health.expect(config.pipelines.len() * SLOTS.len());
    let http_cancel = CancellationToken::new();
    let upkeep = tokio::spawn(crate::metrics::upkeep(metrics.clone(), http_cancel.clone()));
    let http = match config.http_listen {
        Some(addr) => {
            let (bound, task) =
                crate::http::serve(addr, metrics, health.clone(), http_cancel.clone())
                    .await
                    .map_err(|source| DaemonError::Listen { addr, source })?;
            info!(%bound, "serving /metrics, /healthz, /readyz");
            Some(task)
        }
        None => None,
    };
    let tracker = TaskTracker::new();
    // Held until `run` returns: the slots' spool directories belong to this process.
    let mut state_locks = Vec::new();
    let closed = Arc::new(tokio::sync::Notify::new());
    // A first run at start-up consolidates what an earlier process left behind.
    closed.notify_one();
    tracker.spawn(
        crate::rotator::postjob(config.clone(), closed.clone(), shutdown.child_token())
            .instrument(tracing::info_span!("postjob")),
    );
    let mut states = Vec::new();
    for p in config.pipelines.iter().cloned() {
        let state = Arc::new(crate::rotator::PipelineState::new(closed.clone()));
        states.push((p.name.clone(), state.clone()));
        let pipeline_cancel = shutdown.child_token();
        // Both slots' spools are read before either registers, so each slot knows every message
        // the pipeline's spools own before any redelivery can reach it.
        let owned = Arc::new(std::sync::Mutex::new(crate::spool::Owned::new(
            4 * usize::from(p.prefetch),
        )));
        let mut spools = Vec::new();
        for slot in SLOTS {
            state_locks.extend(lock_state(&config, &p, slot)?);
            let spool = read_spool(&config, &p, slot).await?;
            remember_owned(&owned, &config, &p, slot, spool.as_ref());
            spools.push(spool);
        }
        for (slot, spool) in SLOTS.into_iter().zip(spools) {
            let ctx = worker::SlotContext {
                config: config.clone(),
                slot,
                state: state.clone(),
                health: health.clone(),
                cancel: pipeline_cancel.child_token(),
                owned: owned.clone(),
                beat: health.beat_for(&p.name, slot),
            };
            let span = tracing::info_span!("slot", pipeline = %p.name, slot);
            let p = p.clone();
            let config = config.clone();
            tracker.spawn(
                async move {
                    let mut spool = spool;
                    let mut attempt = 0;
                    loop {
                        let started = std::time::Instant::now();
                        match worker::run_slot(ctx.clone(), p.clone(), spool.take()).await {
                            Ok(()) => break,
                            Err(e) => {
                                // One pipeline's failure is its own: the others go on, and
                                // this slot starts again (recovering its spool first).
                                if started.elapsed() > std::time::Duration::from_secs(300) {
                                    attempt = 0;
                                }
                                attempt += 1;
                                crate::metrics::worker_restarted(&p.name, slot);
                                error!(pipeline = %p.name, slot, attempt, error = %e, "worker failed; restarting this slot (the other pipelines are not affected)");
                                ctx.beat.park();
                                tokio::select! {
                                    _ = tokio::time::sleep(crate::backoff::delay(attempt)) => {}
                                    _ = ctx.cancel.cancelled() => break,
                                }
                                match read_spool(&config, &p, slot).await {
                                    Ok(s) => spool = s,
                                    Err(e) => error!(pipeline = %p.name, slot, error = %e, "cannot read the spool again; it is recovered at the next start"),
                                }
                            }
                        }
                    }
                }
                .instrument(span),
            );
        }
        let span = tracing::info_span!("rotator", pipeline = %p.name);
        tracker.spawn(
            crate::rotator::run(config.clone(), p, state, pipeline_cancel.child_token())
                .instrument(span),
        );
    }
    tracker.spawn(crate::monitor::run(
        states,
        config.status_interval,
        config.alerts,
        shutdown.child_token(),
    ));
    tracker.spawn(systemd(
        health.clone(),
        config.wedged_after,
        shutdown.clone(),
    ));
    tracker.close();
    info!(pipelines = config.pipelines.len(), amqp = %config.amqp_url, database = %config.database_url, "conveyor running");
    tracker.wait().await;
    http_cancel.cancel();
    if let Some(task) = http {
        let _ = task.await;
    }
    let _ = upkeep.await;
    drop(state_locks);
    Ok(())
}

/// systemd's notify protocol (`Type=notify`): READY=1 once every worker of every pipeline is
/// registered with the broker, WATCHDOG=1 at half the unit's `WatchdogSec` while every worker's
/// heartbeat is alive (a worker wedged for `wedged_after` stops it, and systemd restarts the
/// service), STOPPING=1 at shutdown. Without `NOTIFY_SOCKET` (not under systemd) each
/// notification is a no-op, but a wedge is still logged and shown by the
/// `conveyor_worker_wedged` gauge.
async fn systemd(
    health: Arc<Health>,
    wedged_after: std::time::Duration,
    shutdown: CancellationToken,
) {
    use sd_notify::NotifyState;
    let mut usec = 0;
    let beat = sd_notify::watchdog_enabled(false, &mut usec)
        .then(|| std::time::Duration::from_micros(usec / 2));
    let mut ready = false;
    let mut last_beat: Option<std::time::Instant> = None;
    let mut wedged_before: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => {
                let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
                return;
            }
        }
        if !ready && health.ready() {
            ready = true;
            let _ = sd_notify::notify(
                false,
                &[
                    NotifyState::Ready,
                    NotifyState::Status("every worker registered"),
                ],
            );
            info!("ready: every worker registered (READY=1 to systemd when run as a service)");
        }
        let wedged = health.wedged(wedged_after);
        let names: Vec<String> = wedged.iter().map(|(n, _)| n.clone()).collect();
        if names != wedged_before {
            for (worker, age) in &wedged {
                if !wedged_before.contains(worker) {
                    error!(worker = %worker, stuck_s = age.as_secs(), "worker wedged: its loop has not turned for longer than watchdog.wedged_after; no more WATCHDOG=1, so systemd restarts the service (nothing is lost: spool and robust marks)");
                }
            }
            for w in &wedged_before {
                if !names.contains(w) {
                    info!(worker = %w, "worker moving again; feeding the watchdog");
                }
            }
            crate::metrics::workers_wedged(names.len());
            health.set_wedged(names.len());
            wedged_before = names;
        }
        if let Some(every) = beat {
            if wedged_before.is_empty() && last_beat.is_none_or(|t| t.elapsed() >= every) {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                last_beat = Some(std::time::Instant::now());
            }
        }
    }
}
