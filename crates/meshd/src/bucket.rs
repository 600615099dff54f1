//! A token bucket: the probe socket's HMAC budget (`responder/budget.rs`) and a relay allocation's byte and
//! packet budgets (`relay.rs`) both spend from one.

use std::time::Instant;

/// Holds up to one second's worth of tokens at the rate it is used with; refills continuously.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Full: one second's worth at `rate` per second.
    pub fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate,
            last: now,
        }
    }

    /// Refills at `rate` per second up to one second's worth, then takes `n` tokens if there are that many.
    pub fn take(&mut self, rate: f64, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn spends_a_second_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10.0, t0);
        assert_eq!((0..20).filter(|_| b.take(10.0, 1.0, t0)).count(), 10);
        assert!(
            !b.take(10.0, 1.0, t0 + Duration::from_millis(50)),
            "half a token"
        );
        assert!(b.take(10.0, 1.0, t0 + Duration::from_millis(100)));
        // Never more than a second's worth, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.take(10.0, 10.0, later));
        assert!(!b.take(10.0, 1.0, later));
    }
}
