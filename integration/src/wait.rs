//! Polling with a deadline: every "eventually" in a test goes through [`wait_until`].

use std::fmt::Display;
use std::time::{Duration, Instant};

/// A [`wait_until`] that ran out of time: what it waited for, how long, and the last failed probe.
#[derive(Debug)]
pub struct Timeout {
    pub what: String,
    pub waited: Duration,
    pub last: String,
    /// The wait was cut short: what it waited on can no longer happen (e.g. the daemon exited).
    pub gave_up: bool,
}

impl Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.gave_up { "gave up" } else { "timed out" };
        write!(
            f,
            "{verb} after {:?} waiting for {}; last: {}",
            self.waited, self.what, self.last
        )
    }
}

impl std::error::Error for Timeout {}

/// The factor by which every timeout is stretched: `HYBRIDNET_TEST_PATIENCE` (e.g. `3` on a slow machine),
/// default 1.
pub fn patience(timeout: Duration) -> Duration {
    let factor = std::env::var("HYBRIDNET_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0);
    timeout.mul_f64(factor)
}

/// Calls `probe` until it returns `Ok` (and returns that value) or `timeout` (times [`patience`]) has
/// passed. Polls every 10 ms at first, backing off to 100 ms.
pub fn wait_until<T, E: Display>(
    timeout: Duration,
    what: impl Display,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, Timeout> {
    let start = Instant::now();
    let deadline = start + patience(timeout);
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match probe() {
            Ok(value) => return Ok(value),
            Err(error) => error.to_string(),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Timeout {
                what: what.to_string(),
                waited: now - start,
                last,
                gave_up: false,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut n = 0;
        let got = wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n = {n}"))
            }
        });
        assert_eq!(got.ok(), Some(3));
    }

    #[test]
    fn times_out_with_the_last_error() {
        let got = wait_until(Duration::from_millis(50), "never", || {
            Err::<(), _>("still no")
        });
        let error = got.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains("waiting for never; last: still no"),
            "{error}"
        );
    }
}
