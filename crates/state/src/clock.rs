//! Wall-clock time as records carry it: whole seconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 on a clock set before 1970 (never a panic). The one clock helper: status
/// records, peer ages, discovery expiries and doctor's skew check all read it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
