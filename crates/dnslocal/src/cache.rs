//! The wire-format answer cache, sans-IO: sharded, bounded by entries and by bytes (CLOCK eviction),
//! TTL-aware, with serve-stale and prefetch signals. Time is passed in (milliseconds on any monotonic clock).
//!
//! An entry costs its answer bytes, its TTL offsets, its key and [`ENTRY_OVERHEAD`] for the slot and the
//! map entry; the sum over all entries stays at or below `max_memory`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::wire::Answer;

const SHARDS: usize = 32;
/// Bytes counted per entry beyond its answer and key: the slot, the map entry and its share of the map's
/// spare capacity (measured: `size_of::<Slot>()` is 72, a map entry 24 plus control bytes, at most 7/8 full).
pub const ENTRY_OVERHEAD: usize = 160;

/// How fresh a cached answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// Within its TTL; `age` seconds old. `prefetch` is set once when a popular entry nears expiry: the
    /// caller should refresh it in the background.
    Fresh { age: u32, prefetch: bool },
    /// Expired, but within the serve-stale window.
    Stale,
}

#[derive(Debug)]
struct Slot {
    /// Shared with the map (one allocation per key).
    key: Arc<[u8]>,
    answer: Answer,
    stored_ms: u64,
    referenced: bool,
    hits: u32,
    refreshing: bool,
    /// What this entry counts against the byte bound.
    cost: usize,
}

fn cost(key: &[u8], answer: &Answer) -> usize {
    answer.bytes.len() + answer.ttl_offsets.len() * 2 + key.len() + ENTRY_OVERHEAD
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Arc<[u8]>, usize>,
    slots: Vec<Slot>,
    hand: usize,
    bytes: usize,
}

/// The cache. `size` entries at most (rounded up to a multiple of the shard count), `max_memory` bytes at most.
#[derive(Debug)]
pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    bytes_per_shard: usize,
    stale_ms: u64,
    prefetch: bool,
    /// The origin of [`Cache::now_ms`].
    epoch: Instant,
}

fn shard_of(key: &[u8]) -> usize {
    // FNV-1a: cheap and good enough to spread keys over shards.
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h as usize) % SHARDS
}

impl Cache {
    pub fn new(size: usize, max_memory: u64, serve_stale_secs: u64, prefetch: bool) -> Cache {
        Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: size.div_ceil(SHARDS).max(1),
            bytes_per_shard: usize::try_from(max_memory / SHARDS as u64).unwrap_or(usize::MAX),
            stale_ms: serve_stale_secs.saturating_mul(1000),
            prefetch,
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the cache was made: the clock its users pass in (an engine that takes the cache
    /// over after a reload keeps it).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `key` up at `now_ms` and, on a fresh or stale hit, calls `f` with the answer (under the shard
    /// lock: keep it short, e.g. render into a buffer).
    pub fn get<R>(&self, key: &[u8], now_ms: u64, f: impl FnOnce(&Answer, Hit) -> R) -> Option<R> {
        let mut shard = self.shard(key);
        let &i = shard.map.get(key)?;
        let prefetch_on = self.prefetch;
        let stale_ms = self.stale_ms;
        let slot = &mut shard.slots[i];
        let age_ms = now_ms.saturating_sub(slot.stored_ms);
        let ttl_ms = u64::from(slot.answer.ttl) * 1000;
        let hit = if age_ms < ttl_ms {
            slot.referenced = true;
            slot.hits = slot.hits.saturating_add(1);
            // Popular (hit at least twice) and in the last tenth of its life: refresh it once.
            let prefetch = prefetch_on
                && !slot.refreshing
                && slot.hits >= 2
                && ttl_ms >= 10_000
                && (ttl_ms - age_ms) * 10 < ttl_ms;
            if prefetch {
                slot.refreshing = true;
            }
            Hit::Fresh {
                age: (age_ms / 1000) as u32,
                prefetch,
            }
        } else if age_ms < ttl_ms + stale_ms {
            Hit::Stale
        } else {
            return None;
        };
        Some(f(&slot.answer, hit))
    }

    /// Stores `answer` under `key` (if its TTL allows caching), evicting with CLOCK while the shard is
    /// full (in entries or bytes). An answer larger than a shard's byte budget is not stored.
    pub fn insert(&self, key: &[u8], answer: Answer, now_ms: u64) {
        let cost = cost(key, &answer);
        if answer.ttl == 0 || cost > self.bytes_per_shard {
            return;
        }
        let mut shard = self.shard(key);
        if let Some(&i) = shard.map.get(key) {
            shard.remove(i);
        }
        while !shard.slots.is_empty()
            && (shard.slots.len() >= self.per_shard || shard.bytes + cost > self.bytes_per_shard)
        {
            let i = shard.victim();
            shard.remove(i);
        }
        let shared: Arc<[u8]> = key.into();
        shard.slots.push(Slot {
            key: shared.clone(),
            answer,
            stored_ms: now_ms,
            referenced: false,
            hits: 0,
            refreshing: false,
            cost,
        });
        shard.bytes += cost;
        let i = shard.slots.len() - 1;
        shard.map.insert(shared, i);
    }

    /// Bytes held (as counted against `max_memory`).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).bytes)
            .sum()
    }

    /// The most bytes it will hold.
    pub fn max_bytes(&self) -> usize {
        self.bytes_per_shard.saturating_mul(SHARDS)
    }

    /// Drops the prefetch mark of `key` (a refresh that failed may be retried later).
    pub fn refresh_failed(&self, key: &[u8]) {
        let mut shard = self.shard(key);
        if let Some(&i) = shard.map.get(key) {
            shard.slots[i].refreshing = false;
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).slots.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries it will hold.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

impl Shard {
    /// Removes slot `i` (the last slot moves into its place) and its key; returns it.
    fn remove(&mut self, i: usize) -> Slot {
        let old = self.slots.swap_remove(i);
        self.map.remove(&old.key);
        self.bytes -= old.cost;
        if let Some(moved) = self.slots.get(i)
            && let Some(index) = self.map.get_mut(&moved.key)
        {
            *index = i;
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        old
    }

    /// CLOCK: the first slot from the hand that was not referenced since the last sweep.
    fn victim(&mut self) -> usize {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand % n;
            self.hand = (i + 1) % n;
            if std::mem::take(&mut self.slots[i].referenced) {
                continue;
            }
            return i;
        }
        self.hand % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ttl: u32) -> Answer {
        Answer {
            bytes: vec![0; 12].into(),
            ttl_offsets: Box::new([]),
            rcode: 0,
            ttl,
            truncated: false,
        }
    }

    #[test]
    fn fresh_then_stale_then_gone() {
        let c = Cache::new(100, 1 << 20, 10, false);
        c.insert(b"k", answer(5), 1000);
        assert_eq!(
            c.get(b"k", 3500, |_, h| h),
            Some(Hit::Fresh {
                age: 2,
                prefetch: false
            })
        );
        assert_eq!(c.get(b"k", 6000, |_, h| h), Some(Hit::Stale));
        assert_eq!(c.get(b"k", 16_000, |_, h| h), None);
        assert_eq!(c.get(b"other", 1000, |_, h| h), None);
    }

    #[test]
    fn zero_ttl_is_not_stored() {
        let c = Cache::new(100, 1 << 20, 10, false);
        c.insert(b"k", answer(0), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_by_size() {
        let c = Cache::new(64, 1 << 20, 0, false);
        for i in 0..10_000u32 {
            c.insert(&i.to_be_bytes(), answer(60), 0);
        }
        assert!(c.len() <= c.capacity());
        assert!(c.capacity() <= 64);
    }

    #[test]
    fn bounded_by_bytes() {
        let c = Cache::new(1_000_000, 4 << 20, 0, false);
        let big = |ttl| Answer {
            bytes: vec![0; 60 << 10].into(),
            ..answer(ttl)
        };
        for i in 0..1000u32 {
            c.insert(&i.to_be_bytes(), big(60), 0);
            assert!(c.bytes() <= 4 << 20, "{} bytes after {i}", c.bytes());
        }
        assert!(c.len() >= 32, "{} entries", c.len());
        // Replacing an entry counts only the new one.
        c.insert(b"k", answer(60), 0);
        let before = c.bytes();
        c.insert(b"k", answer(60), 0);
        assert_eq!(c.bytes(), before);
        // An answer larger than a shard's budget is not kept.
        let tiny = Cache::new(100, 1 << 20, 0, false);
        tiny.insert(b"k", big(60), 0);
        assert!(tiny.is_empty());
    }

    #[test]
    fn clock_keeps_referenced_entries() {
        let c = Cache::new(SHARDS * 4, 1 << 20, 0, false);
        c.insert(b"hot", answer(60), 0);
        let mut evicted_hot = false;
        for i in 0..1000u32 {
            let _ = c.get(b"hot", 0, |_, _| ());
            c.insert(&i.to_be_bytes(), answer(60), 0);
            evicted_hot |= c.get(b"hot", 0, |_, _| ()).is_none();
        }
        assert!(!evicted_hot, "a hit entry was evicted");
    }

    #[test]
    fn prefetch_once_for_popular_entries_near_expiry() {
        let c = Cache::new(100, 1 << 20, 0, true);
        c.insert(b"k", answer(100), 0);
        let hit = |t| c.get(b"k", t, |_, h| h);
        assert_eq!(
            hit(1000),
            Some(Hit::Fresh {
                age: 1,
                prefetch: false
            })
        );
        assert_eq!(
            hit(2000),
            Some(Hit::Fresh {
                age: 2,
                prefetch: false
            })
        );
        assert_eq!(
            hit(95_000),
            Some(Hit::Fresh {
                age: 95,
                prefetch: true
            })
        );
        assert_eq!(
            hit(96_000),
            Some(Hit::Fresh {
                age: 96,
                prefetch: false
            })
        );
        c.refresh_failed(b"k");
        assert_eq!(
            hit(97_000),
            Some(Hit::Fresh {
                age: 97,
                prefetch: true
            })
        );
    }
}
