//! Reconnect backoff: a pure function of the attempt number, so its bounds are unit-tested.

use std::time::Duration;

/// First retry comes quickly (a blip heals in well under a second).
const BASE: Duration = Duration::from_millis(100);
/// Never wait longer than this between attempts: an operator who fixes the cause should see
/// conveyor recover within half a minute.
const CAP: Duration = Duration::from_secs(30);

/// Delay before attempt `attempt` (1-based): 100 ms doubling to 30 s, with ±20 % jitter so
/// several sessions do not reconnect in lockstep.
pub fn delay(attempt: u32) -> Duration {
    let exp = BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(CAP);
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    d.mul_f64(jitter).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        for _ in 0..100 {
            let first = delay(1);
            assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
            assert!(delay(4) >= Duration::from_millis(640));
            assert!(delay(40) <= CAP);
            assert!(delay(40) >= CAP.mul_f64(0.8));
        }
    }
}
