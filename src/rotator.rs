//! Rotator: decides when jobs end, for one pipeline in this process.
//!
//! It watches the pipeline's shared state (which local job is active, since when, with which
//! schedule) and publishes:
//! - an EOJ marker naming the active job into the queue every `rotate_every` (the marker queues
//!   behind the backlog, so rows before it belong to the ending job, rows after it to the next);
//! - a priority control message on the `conveyor.control` fanout exchange when the queue depth
//!   passes `depth_threshold` (control overtakes the backlog: the job ends now).
//!
//! Markers name the job, never `*`: a scheduled marker that arrives after the job already ended
//! (say by idle EOJ) is acked and ignored by whoever reads it. Idle and max-rows EOJs are
//! decided by the worker itself, which sees every delivery. Only the process that holds the
//! active job rotates it, so several `conveyor run` processes never double-rotate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, PipelineConfig, QueueDeclare};
use crate::job::EndReason;
use crate::source;

/// State shared by a pipeline's two workers and its rotator (one process).
#[derive(Debug, Default)]
pub struct PipelineState {
    active: Mutex<Option<Active>>,
    /// When and why the last job of this pipeline (in this process) saw its last delivery.
    last_end: Mutex<Option<LastEnd>>,
    /// Set by a priority EOJ: the job that takes over runs with the priority pack/sessions.
    boost_next: AtomicBool,
    /// Workers registered with the broker and not yet active. Ending a job while this is 0
    /// leaves the queue unowned until the partner finishes initialising, so the rotator waits.
    standbys: std::sync::atomic::AtomicUsize,
    /// Wakes the post-job task (shared by all pipelines of the process) when a job is closed.
    closed: Arc<tokio::sync::Notify>,
    /// Counters for the daemon's own alerts (`monitor`): rows committed and rejected by this
    /// process's jobs, the queue depth last read (u64::MAX: not yet), the slowest handoff
    /// since the last snapshot (µs).
    committed: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
    depth: std::sync::atomic::AtomicU64,
    slowest_handoff_us: std::sync::atomic::AtomicU64,
}

/// The end of the last local job, the start of a handoff.
#[derive(Debug, Clone)]
struct LastEnd {
    job: String,
    at: Instant,
    reason: EndReason,
}

/// A handoff as seen by the job that took over: the job it (probably) followed and the gap.
/// "Probably": another process may have held the queue in between; `Jobs::activated` checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub previous: String,
    pub gap: Duration,
}

/// The job that owns the queue, as the rotator needs it.
#[derive(Debug, Clone)]
struct Active {
    job: String,
    since: Instant,
    rotate_every: Option<Duration>,
    depth_threshold: Option<u64>,
    marker_sent: bool,
    priority_sent: bool,
}

impl PipelineState {
    /// A pipeline's state whose closed jobs wake `postjob`'s task.
    pub fn new(closed: Arc<tokio::sync::Notify>) -> PipelineState {
        PipelineState {
            closed,
            depth: std::sync::atomic::AtomicU64::new(u64::MAX),
            ..PipelineState::default()
        }
    }

    /// A batch committed `inserted` rows and rejected `rejected`.
    pub fn batch_committed(&self, inserted: u64, rejected: u64) {
        self.committed.fetch_add(inserted, Ordering::Relaxed);
        self.rejected.fetch_add(rejected, Ordering::Relaxed);
    }

    pub fn set_depth(&self, depth: u32) {
        self.depth.store(u64::from(depth), Ordering::Relaxed);
    }

    pub fn handoff_took(&self, gap: Duration) {
        self.slowest_handoff_us
            .fetch_max(gap.as_micros() as u64, Ordering::Relaxed);
    }

    /// The counters now; the slowest handoff restarts from zero.
    pub fn snapshot(&self) -> crate::monitor::Snapshot {
        let depth = self.depth.load(Ordering::Relaxed);
        let slowest = self.slowest_handoff_us.swap(0, Ordering::Relaxed);
        crate::monitor::Snapshot {
            committed: self.committed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            depth: (depth != u64::MAX).then_some(depth),
            slowest_handoff: (slowest > 0).then(|| Duration::from_micros(slowest)),
        }
    }

    /// A job's row is closed (ended, or recovered after a crash): its error tables can be
    /// consolidated.
    pub fn job_closed(&self) {
        self.closed.notify_one();
    }

    /// A job got its first delivery. Returns the handoff gap when the job before it ended
    /// with the queue still flowing (schedule, manual, priority, rows), not after idling.
    pub fn activated(
        &self,
        job: &str,
        rotate_every: Option<Duration>,
        depth_threshold: Option<u64>,
    ) -> Option<Handoff> {
        let now = Instant::now();
        if let Ok(mut a) = self.active.lock() {
            *a = Some(Active {
                job: job.to_string(),
                since: now,
                rotate_every,
                depth_threshold,
                marker_sent: false,
                priority_sent: false,
            });
        }
        let last = self.last_end.lock().ok().and_then(|mut l| l.take())?;
        match last.reason {
            EndReason::Idle | EndReason::Shutdown | EndReason::Error | EndReason::Crash => None,
            _ => Some(Handoff {
                previous: last.job,
                gap: now.saturating_duration_since(last.at),
            }),
        }
    }

    /// The active job saw its last delivery (called as soon as the end is decided, before the
    /// consumer is cancelled, so the gap measures the whole handoff).
    pub fn ending(&self, job: &str, reason: EndReason) {
        if let Ok(mut a) = self.active.lock() {
            if a.as_ref().is_some_and(|a| a.job == job) {
                *a = None;
            }
        }
        if let Ok(mut l) = self.last_end.lock() {
            *l = Some(LastEnd {
                job: job.to_string(),
                at: Instant::now(),
                reason,
            });
        }
    }

    /// A worker registered as consumer and waits for the broker to activate it.
    pub fn standby_up(&self) {
        self.standbys.fetch_add(1, Ordering::SeqCst);
    }

    /// A standby became active, or left without ever being active.
    pub fn standby_down(&self) {
        let _ = self
            .standbys
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    pub fn request_boost(&self) {
        self.boost_next.store(true, Ordering::SeqCst);
    }

    pub fn take_boost(&self) -> bool {
        self.boost_next.swap(false, Ordering::SeqCst)
    }

    /// The active job's name, if a worker of this process holds the queue.
    pub fn active_job(&self) -> Option<String> {
        self.active
            .lock()
            .ok()
            .and_then(|a| a.as_ref().map(|a| a.job.clone()))
    }

    /// What the rotator should do now, marking it as done. Nothing while no partner stands by.
    fn due(&self, depth: Option<u32>) -> Option<(String, EndReason)> {
        if self.standbys.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut guard = self.active.lock().ok()?;
        let a = guard.as_mut()?;
        if let (Some(limit), Some(depth)) = (a.depth_threshold, depth) {
            if u64::from(depth) > limit && !a.priority_sent {
                a.priority_sent = true;
                return Some((a.job.clone(), EndReason::Priority));
            }
        }
        if a.rotate_every
            .is_some_and(|every| a.since.elapsed() >= every)
            && !a.marker_sent
        {
            a.marker_sent = true;
            return Some((a.job.clone(), EndReason::Schedule));
        }
        None
    }
}

/// How often the rotator checks the schedule; bounds how late a scheduled EOJ is published.
const TICK: Duration = Duration::from_millis(100);

/// Runs the rotator of pipeline `p` until `cancel`.
pub async fn run(
    config: Arc<Config>,
    p: PipelineConfig,
    state: Arc<PipelineState>,
    cancel: CancellationToken,
) {
    let mut attempt = 0;
    'connect: loop {
        let opened = async {
            let conn =
                source::connect(&config.amqp_url, &format!("conveyor-rotator-{}", p.name)).await?;
            let ch = source::open_channel(&conn).await?;
            Ok::<_, source::SourceError>((conn, ch))
        };
        let (conn, channel) = tokio::select! {
            r = opened => match r {
                Ok(v) => v,
                Err(e) => {
                    attempt += 1;
                    warn!(pipeline = %p.name, attempt, error = %e, "rotator cannot reach RabbitMQ; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(crate::backoff::delay(attempt)) => continue 'connect,
                        _ = cancel.cancelled() => return,
                    }
                }
            },
            _ = cancel.cancelled() => return,
        };
        attempt = 0;
        let mut tick = tokio::time::interval(TICK);
        let mut last_poll: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => {
                    let _ = conn.close(200, "rotator stopping".into()).await;
                    return;
                }
            }
            let mut depth = None;
            if last_poll.is_none_or(|t| t.elapsed() >= p.depth_poll) {
                last_poll = Some(Instant::now());
                match source::declare_queue(&channel, &p.queue, QueueDeclare::Passive).await {
                    Ok(d) => {
                        crate::metrics::queue_depth(&p.name, d);
                        state.set_depth(d);
                        depth = Some(d);
                    }
                    Err(e) => {
                        warn!(pipeline = %p.name, error = %e, "rotator lost its channel; reconnecting");
                        let _ = conn.close(200, "rotator reconnecting".into()).await;
                        continue 'connect;
                    }
                }
            }
            // Shutdown may have begun while this tick ran: a marker now would outlive the job.
            if cancel.is_cancelled() {
                continue;
            }
            let Some((job, reason)) = state.due(depth) else {
                continue;
            };
            let sent = match reason {
                EndReason::Priority => {
                    let msg = source::Control {
                        pipeline: p.name.clone(),
                        queue: p.queue.clone(),
                        job: job.clone(),
                        reason: reason.as_str().into(),
                    };
                    source::publish_control(&channel, &msg).await
                }
                _ => source::publish_marker(&channel, &p.queue, &job, reason).await,
            };
            match sent {
                Ok(()) => {
                    info!(pipeline = %p.name, job = %job, reason = reason.as_str(), depth, "end of job requested")
                }
                Err(e) => {
                    warn!(pipeline = %p.name, job = %job, error = %e, "cannot publish the end-of-job request; reconnecting");
                    let _ = conn.close(200, "rotator reconnecting".into()).await;
                    continue 'connect;
                }
            }
        }
    }
}

/// The post-job task: after every closed job (of any pipeline of this process) it consolidates
/// the error tables of all ended jobs (`consolidate`). Wake-ups that arrive during a run
/// coalesce into one more run, so a burst of job ends costs at most two runs.
pub async fn postjob(
    config: Arc<Config>,
    closed: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let caller = format!("rotator@{}:{}", crate::job::host(), std::process::id());
    loop {
        tokio::select! {
            _ = closed.notified() => {}
            _ = cancel.cancelled() => return,
        }
        // Post-job SQL steps first: they finish the job's own data (e.g. make its rows
        // visible); each is one transaction, so shutdown cannot cut one in half.
        if let Err(e) = crate::steps::run_post(&config, false, None).await {
            warn!(error = %e, "post-job steps could not run; the next job end retries");
        }
        if !config.consolidate.after_job {
            continue;
        }
        let mut opts = crate::consolidate::Options::from_config(&config, caller.clone());
        // Shutdown stops the run between two steps (each one short transaction); the next run
        // resumes.
        opts.stop = Some(cancel.clone());
        match crate::consolidate::run(&config, &opts).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "post-job consolidation could not start; the next job end retries")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_fires_once_per_job_and_priority_first() {
        let s = PipelineState::default();
        s.standby_up();
        assert_eq!(s.due(Some(10)), None, "nothing active");
        s.activated("a", Some(Duration::ZERO), Some(5));
        assert_eq!(s.due(Some(10)), Some(("a".into(), EndReason::Priority)));
        assert_eq!(s.due(Some(10)), Some(("a".into(), EndReason::Schedule)));
        assert_eq!(s.due(Some(10)), None, "each request is made once");
        s.ending("a", EndReason::Schedule);
        assert_eq!(s.active_job(), None);
        let gap = s.activated("b", None, None);
        assert!(gap.is_some(), "a scheduled handoff has a gap");
        assert_eq!(s.due(Some(10)), None);
        s.ending("b", EndReason::Idle);
        assert_eq!(
            s.activated("c", None, None),
            None,
            "no gap after an idle end"
        );
    }

    #[test]
    fn no_rotation_without_a_standby() {
        let s = PipelineState::default();
        s.activated("a", Some(Duration::ZERO), None);
        assert_eq!(s.due(None), None, "the partner is still initialising");
        s.standby_up();
        assert_eq!(s.due(None), Some(("a".into(), EndReason::Schedule)));
        s.standby_down();
        s.standby_down();
        assert_eq!(s.standbys.load(Ordering::SeqCst), 0, "never below zero");
    }

    #[test]
    fn ending_another_job_keeps_the_active_one() {
        let s = PipelineState::default();
        s.activated("b", None, None);
        s.ending("a", EndReason::Manual);
        assert_eq!(s.active_job().as_deref(), Some("b"));
    }
}
