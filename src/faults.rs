//! Crash points for the durability tests: `CONVEYOR_CRASH_AT=<point>:<n>` makes the process
//! SIGKILL itself the n-th time it passes `<point>` — a real kill -9, aimed at a moment a timer
//! could only hit by luck (just after a batch commits, before its ack, in the middle of a
//! checkpoint, during a handoff). Unset, each point costs one atomic load.
//! `CONVEYOR_WEDGE_AT=<point>:<n>` instead makes the task passing it the n-th time wait forever:
//! a wedged worker, for the watchdog test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Points a test can aim at.
pub const AFTER_COMMIT: &str = "after_commit";
pub const BEFORE_ACK: &str = "before_ack";
pub const MID_CHECKPOINT: &str = "mid_checkpoint";
pub const HANDOFF: &str = "handoff";
pub const MID_RECOVERY: &str = "mid_recovery";
/// After a consolidation step committed, before the next one.
pub const MID_CONSOLIDATION: &str = "mid_consolidation";

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

/// `<point>:<n>` from the environment variable `var`.
fn aim(var: &str) -> Option<(String, u64)> {
    let v = std::env::var(var).ok()?;
    let (point, n) = v.split_once(':')?;
    Some((point.to_string(), n.parse().ok()?))
}

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| aim("CONVEYOR_CRASH_AT"))
}

/// Passes the crash point `name`.
pub fn point(name: &str) {
    let Some((point, n)) = target() else { return };
    if point == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::warn!(point = name, "crash point reached: SIGKILL");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

static WEDGE: OnceLock<Option<(String, u64)>> = OnceLock::new();
static WEDGE_PASSES: AtomicU64 = AtomicU64::new(0);

/// Passes the wedge point `name`: never returns when it is the one aimed at.
pub async fn wedge(name: &str) {
    let target = WEDGE.get_or_init(|| aim("CONVEYOR_WEDGE_AT"));
    let Some((point, n)) = target else { return };
    if point == name && WEDGE_PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::warn!(point = name, "wedge point reached: this task waits forever");
        std::future::pending::<()>().await;
    }
}
