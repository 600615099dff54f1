//! Client admission: how many client connections are served at once, and how many one client may hold.
//!
//! Every proxied connection takes two descriptors (client and upstream). Without a limit, any local process
//! can open connections to the loopback listener until apiprism is out of descriptors; then its upstream
//! dials and health checks fail with `EMFILE` too. So the connection limit sits below the open-file limit:
//! `(RLIMIT_NOFILE - FD_RESERVE) / 2` unless configured, and the reserve keeps descriptors for the splice
//! pipe pool, upstream dials of connections being set up, health checks, the admin endpoint and the file
//! watchers. At the limit the accept loops stop accepting (the kernel's backlog holds new connections) until
//! a connection ends. One client (a source address) may hold at most its share of the limit, so a single
//! flooding process cannot take every slot; connections over its share are closed at once.
//!
//! [`Slots`] is the sans-IO count; [`Admission`] adds the wake-up for paused accept loops and the
//! [`Permit`] a connection holds until it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Descriptors a proxied connection holds: the client's and the upstream's.
pub const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors kept out of the connection limit: the splice pipe pool (64 pipes, 128 descriptors), dials of
/// connections being set up, health checks, the admin endpoint, watchers, DNS lookups, logging.
pub const FD_RESERVE: u64 = 256;
/// The smallest derived limit (a tiny open-file limit still serves a few clients).
pub const MIN_LIMIT: u32 = 16;

/// Who a client is, for its share of the connection limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The source address (on loopback, every local process shares one).
    Addr(IpAddr),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

/// The two limits in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Client connections served at once.
    pub total: u32,
    /// Client connections one client may hold.
    pub per_client: u32,
}

impl Limits {
    /// From the config (`0`: derived) and the open-file limit (`None`: unknown, 1024 assumed).
    pub fn new(max_connections: u32, per_client: u32, open_files: Option<u64>) -> Limits {
        let total = if max_connections > 0 {
            max_connections
        } else {
            let nofile = open_files.unwrap_or(1024).min(u64::from(u32::MAX));
            let derived = nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
            u32::try_from(derived).unwrap_or(u32::MAX).max(MIN_LIMIT)
        };
        let per_client = match per_client {
            0 => (total / 2).max(1),
            n => n.min(total),
        };
        Limits { total, per_client }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken (the accept loops should not have accepted: they pause at the limit).
    Full,
    /// The client holds its whole share.
    ClientShare,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "limit",
            Refusal::ClientShare => "client_limit",
        }
    }
}

/// The count of admitted connections, in total and per client.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    total: u32,
    by_client: HashMap<ClientKey, u32>,
}

impl Slots {
    pub fn new(limits: Limits) -> Slots {
        Slots {
            limits,
            total: 0,
            by_client: HashMap::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// New limits; connections over them stay (they are not cut), new ones wait until under.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn active(&self) -> u32 {
        self.total
    }

    /// True when no new connection may be accepted.
    pub fn full(&self) -> bool {
        self.total >= self.limits.total
    }

    /// Takes a slot for `key`.
    pub fn admit(&mut self, key: ClientKey) -> Result<(), Refusal> {
        if self.full() {
            return Err(Refusal::Full);
        }
        let held = self.by_client.entry(key).or_insert(0);
        if *held >= self.limits.per_client {
            return Err(Refusal::ClientShare);
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// Takes a slot for an established connection handed over by a previous instance: counted, never refused
    /// (refusing would cut it; connections over the limit hold their slots as after a lowered limit).
    pub fn adopt(&mut self, key: ClientKey) {
        *self.by_client.entry(key).or_insert(0) += 1;
        self.total += 1;
    }

    /// Gives back a slot of `key`.
    pub fn release(&mut self, key: ClientKey) {
        if let Some(held) = self.by_client.get_mut(&key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.by_client.remove(&key);
            }
            self.total = self.total.saturating_sub(1);
        }
    }
}

/// [`Slots`] shared by the accept loops, with a wake-up when a slot frees.
#[derive(Debug)]
pub struct Admission {
    slots: Mutex<Slots>,
    freed: Notify,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            slots: Mutex::new(Slots::new(limits)),
            freed: Notify::new(),
        }
    }

    pub fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_limits(&self, limits: Limits) {
        self.slots().set_limits(limits);
        self.freed.notify_waiters();
    }

    /// Returns once a slot is free (at once when one is).
    pub async fn wait_for_slot(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.slots().full() {
                return;
            }
            freed.await;
        }
    }

    /// Takes a slot for `key`; the permit gives it back when dropped.
    pub fn admit(self: &Arc<Self>, key: ClientKey) -> Result<Permit, Refusal> {
        self.slots().admit(key)?;
        Ok(Permit {
            admission: Arc::clone(self),
            key,
        })
    }
}

impl Admission {
    /// A slot for a handed-over connection (see [`Slots::adopt`]).
    pub fn adopt(self: &Arc<Self>, key: ClientKey) -> Permit {
        self.slots().adopt(key);
        Permit {
            admission: Arc::clone(self),
            key,
        }
    }
}

/// One admitted connection's slot.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    key: ClientKey,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.slots().release(self.key);
        self.admission.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8) -> ClientKey {
        ClientKey::Addr(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn the_derived_limit_leaves_the_reserve_free() {
        let l = Limits::new(0, 0, Some(1024));
        assert_eq!(l.total, 384);
        assert_eq!(l.per_client, 192);
        assert!(u64::from(l.total) * FDS_PER_CONNECTION + FD_RESERVE <= 1024);
        assert_eq!(Limits::new(0, 0, Some(100)).total, MIN_LIMIT);
        assert_eq!(
            Limits::new(0, 0, Some(1 << 20)).total,
            ((1 << 20) - 256) / 2
        );
        assert_eq!(
            Limits::new(0, 0, Some(u64::MAX)).total,
            (u32::MAX - 256) / 2
        );
        assert_eq!(Limits::new(0, 0, None).total, 384);
        let set = Limits::new(1000, 10, Some(1024));
        assert_eq!((set.total, set.per_client), (1000, 10));
        assert_eq!(Limits::new(10, 50, None).per_client, 10);
        assert_eq!(Limits::new(1, 0, None).per_client, 1);
    }

    #[test]
    fn one_client_cannot_take_every_slot() {
        let mut s = Slots::new(Limits::new(4, 2, None));
        assert_eq!(s.admit(key(1)), Ok(()));
        assert_eq!(s.admit(key(1)), Ok(()));
        assert_eq!(s.admit(key(1)), Err(Refusal::ClientShare));
        assert_eq!(s.admit(key(2)), Ok(()));
        assert_eq!(s.admit(key(3)), Ok(()));
        assert!(s.full());
        assert_eq!(s.admit(key(4)), Err(Refusal::Full));
        s.release(key(1));
        assert!(!s.full());
        assert_eq!(s.admit(key(1)), Ok(()));
        // Releasing a client that holds nothing changes nothing.
        s.release(key(9));
        assert_eq!(s.active(), 4);
        for k in [1, 1, 2, 3] {
            s.release(key(k));
        }
        assert_eq!(s.active(), 0);
        assert!(s.by_client.is_empty());
    }

    #[test]
    fn lower_limits_keep_existing_connections() {
        let mut s = Slots::new(Limits::new(4, 4, None));
        for _ in 0..4 {
            assert_eq!(s.admit(key(1)), Ok(()));
        }
        s.set_limits(Limits::new(2, 2, None));
        assert_eq!(s.active(), 4);
        assert!(s.full());
        s.release(key(1));
        s.release(key(1));
        assert!(s.full());
        s.release(key(1));
        assert_eq!(s.admit(key(2)), Ok(()));
    }

    #[tokio::test]
    async fn a_paused_accept_loop_wakes_when_a_permit_drops() {
        let a = Arc::new(Admission::new(Limits::new(1, 1, None)));
        let permit = a.admit(key(1)).expect("first");
        let waiter = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.wait_for_slot().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(permit);
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("join");
    }
}
