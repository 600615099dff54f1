//! Per-client budgets on the UDP path, in the spirit of response-rate limiting: each source address may
//! ask `rate` queries a second (bursts of as many); beyond that every second query gets an empty truncated
//! answer (TC: a real client retries over TCP, which is not limited here) and the others are dropped, so one
//! pod asking at full rate costs little and cannot starve the others. TC answers are no larger than the query:
//! no amplification.
//!
//! The budgets live in a fixed table of [`SLOTS`] cells indexed by a keyed hash of the address (GCRA: each cell
//! holds the theoretical arrival time of the next query), so memory is fixed and a flood of forged source
//! addresses cannot grow it; two clients that share a cell share a budget.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Cells in the budget table (8 bytes each).
pub const SLOTS: usize = 16_384;

/// What to do with a query from a client over its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Truncate,
    Drop,
}

/// The budget table.
#[derive(Debug)]
pub struct ClientBudget {
    cells: Box<[AtomicU64]>,
    hasher: RandomState,
    interval_ns: u64,
    tolerance_ns: u64,
    epoch: Instant,
    over: AtomicU64,
}

impl ClientBudget {
    /// `rate` queries a second per client address; `None` when `rate` is 0 (no limit).
    pub fn new(rate: u32) -> Option<ClientBudget> {
        if rate == 0 {
            return None;
        }
        let interval_ns = 1_000_000_000 / u64::from(rate);
        Some(ClientBudget {
            cells: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            interval_ns: interval_ns.max(1),
            tolerance_ns: 1_000_000_000,
            epoch: Instant::now(),
            over: AtomicU64::new(0),
        })
    }

    /// Charges one query from `client`.
    pub fn check(&self, client: IpAddr) -> Verdict {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.check_at(client, now)
    }

    fn check_at(&self, client: IpAddr, now: u64) -> Verdict {
        let i = (self.hasher.hash_one(client) as usize) % SLOTS;
        let cell = &self.cells[i];
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base - now > self.tolerance_ns {
                // Slip: every second query over budget gets TC, the others nothing.
                return if self.over.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                    Verdict::Truncate
                } else {
                    Verdict::Drop
                };
            }
            match cell.compare_exchange_weak(
                tat,
                base + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Verdict::Allow,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_budget_is_slowed_and_others_are_not() {
        let b = ClientBudget::new(100).unwrap_or_else(|| unreachable!());
        let greedy = IpAddr::from([10, 0, 0, 1]);
        let polite = IpAddr::from([10, 0, 0, 2]);
        // 1,000 queries within the same millisecond: a second's worth (plus one) pass.
        let allowed = (0..1000)
            .filter(|_| b.check_at(greedy, 1_000_000) == Verdict::Allow)
            .count();
        assert!((100..=102).contains(&allowed), "{allowed}");
        let truncated = (0..100)
            .filter(|_| b.check_at(greedy, 1_000_000) == Verdict::Truncate)
            .count();
        assert_eq!(truncated, 50, "every second one over budget gets TC");
        assert_eq!(b.check_at(polite, 1_000_000), Verdict::Allow);
        // A second later the greedy one has budget again.
        assert_eq!(b.check_at(greedy, 2_100_000_000), Verdict::Allow);
        assert!(ClientBudget::new(0).is_none());
    }
}
