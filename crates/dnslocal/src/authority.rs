//! The cluster zone as the engine sees it in `clusterZone: kubernetes` mode: the [`Zone`] model behind a
//! lock (queries read it, watch events write it), whether it holds a state to answer from, how old that
//! state is, and its snapshot in `dataDir` (so a restart with the API down still answers).
//!
//! Snapshot: `<dataDir>/dnslocal/cluster-zone.json`, written atomically (temp file, fsync, rename:
//! [`hybridnet_state::atomic_write`]) at most every [`SNAPSHOT_EVERY`] when the state changed; at most
//! [`SNAPSHOT_MAX_BYTES`] (a larger state is not written: the last one stays, with a warning); read at
//! start only when younger than [`SNAPSHOT_MAX_AGE`] and for the same cluster domain.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::wire::Query;
use crate::zone::{Snapshot, Zone, encode};

/// The snapshot is written at most this often.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// A state whose snapshot would be larger is not written (100,000 endpoints take about 15 MB).
pub const SNAPSHOT_MAX_BYTES: usize = 64 << 20;
/// An older snapshot is not loaded: the cluster has changed too much for its names to help.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const SNAPSHOT_VERSION: u32 = 1;

/// Where the state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Origin {
    /// Nothing yet: cluster names keep today's path (forwarded to `clusterDNS`).
    None = 0,
    /// The snapshot in `dataDir`; the API has not answered since the start.
    Snapshot = 1,
    /// Lists and watches of the API.
    Api = 2,
}

/// The shared cluster-zone state.
#[derive(Debug)]
pub struct Authority {
    zone: RwLock<Zone>,
    ttl: u32,
    /// Bumped on every change: the SOA serial, and what the snapshot writer compares.
    generation: AtomicU32,
    origin: std::sync::atomic::AtomicU8,
    /// Watches connected and in sync now (services, endpointslices).
    live: [AtomicBool; 2],
    /// When the API last confirmed the state (Unix ms): the last moment both watches were live, or the
    /// snapshot's time.
    confirmed_ms: AtomicU64,
    /// The snapshot file (`None`: no dataDir snapshot).
    snapshot_path: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    domain: String,
    /// Unix ms of the last time the API confirmed this state.
    confirmed_ms: u64,
    /// This node's topology zone as last read (so a restart with the API down keeps the order).
    #[serde(default)]
    local_zone: Option<String>,
    #[serde(flatten)]
    state: Snapshot,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What [`Authority::answer`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answered {
    /// The answer is in `out`.
    Done,
    /// `out` holds a CNAME (an ExternalName Service): the target (wire format) is to be resolved and
    /// its records appended.
    Chase(Vec<u8>),
    NotOurs,
}

/// Which watch a [`Authority::set_live`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Services = 0,
    Slices = 1,
}

impl Authority {
    /// An empty state for `domain`, answering with `ttl`, its snapshot at `<data_dir>/dnslocal/`.
    pub fn new(
        domain: &str,
        local_zone: Option<String>,
        ttl: Duration,
        data_dir: Option<&Path>,
    ) -> Authority {
        Authority {
            zone: RwLock::new(Zone::new(domain, local_zone)),
            ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            generation: AtomicU32::new(1),
            origin: std::sync::atomic::AtomicU8::new(Origin::None as u8),
            live: [AtomicBool::new(false), AtomicBool::new(false)],
            confirmed_ms: AtomicU64::new(0),
            snapshot_path: data_dir.map(|d| d.join("dnslocal").join("cluster-zone.json")),
        }
    }

    /// Renders the answer to a question in the cluster zone (or a reverse name we hold) into `out`;
    /// [`Answered::NotOurs`] when it is not ours to answer (then the query takes today's path), also while
    /// no state was ever loaded.
    pub fn answer(&self, buf: &[u8], q: &Query, limit: usize, out: &mut Vec<u8>) -> Answered {
        if self.origin() == Origin::None {
            return Answered::NotOurs;
        }
        let zone = self.zone.read().unwrap_or_else(PoisonError::into_inner);
        let lookup = zone.lookup(q.qname(), q.qtype);
        let params = encode::Params {
            apex: zone.apex(),
            ttl: self.ttl,
            serial: self.generation.load(Ordering::Relaxed),
        };
        if !encode::render(&lookup, buf, q, limit, &params, out) {
            return Answered::NotOurs;
        }
        // An ExternalName asked for another type: the target's records are to follow (stub resolvers
        // do not chase a CNAME themselves).
        match &lookup {
            crate::zone::Lookup::Answer(records, _)
                if q.qtype != crate::zone::TYPE_CNAME && records.len() == 1 =>
            {
                match &records[0].data {
                    crate::zone::Rdata::Cname(target) => Answered::Chase(target.clone()),
                    _ => Answered::Done,
                }
            }
            _ => Answered::Done,
        }
    }

    /// Changes the model (a watch event, a relist).
    pub fn update<R>(&self, f: impl FnOnce(&mut Zone) -> R) -> R {
        let mut zone = self.zone.write().unwrap_or_else(PoisonError::into_inner);
        let r = f(&mut zone);
        self.generation.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Reads the model.
    pub fn read<R>(&self, f: impl FnOnce(&Zone) -> R) -> R {
        f(&self.zone.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn origin(&self) -> Origin {
        match self.origin.load(Ordering::Relaxed) {
            1 => Origin::Snapshot,
            2 => Origin::Api,
            _ => Origin::None,
        }
    }

    /// A watch listed and is in sync (`true`), or lost its connection (`false`).
    pub fn set_live(&self, feed: Feed, live: bool) {
        let was_all = self.all_live();
        self.live[feed as usize].store(live, Ordering::Relaxed);
        if self.all_live() {
            self.origin.store(Origin::Api as u8, Ordering::Relaxed);
        }
        if was_all || self.all_live() {
            self.confirmed_ms.store(unix_ms(), Ordering::Relaxed);
        }
    }

    fn all_live(&self) -> bool {
        self.live.iter().all(|l| l.load(Ordering::Relaxed))
    }

    /// Whether both watches are connected and in sync.
    pub fn api_live(&self) -> bool {
        self.all_live()
    }

    /// How old the state is: zero while both watches are live, else the time since the API last
    /// confirmed it (`None`: no state).
    pub fn age(&self) -> Option<Duration> {
        if self.origin() == Origin::None {
            return None;
        }
        if self.all_live() {
            self.confirmed_ms.store(unix_ms(), Ordering::Relaxed);
            return Some(Duration::ZERO);
        }
        let then = self.confirmed_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(unix_ms().saturating_sub(then)))
    }

    pub fn snapshot_path(&self) -> Option<&Path> {
        self.snapshot_path.as_deref()
    }

    /// Loads the snapshot if there is a usable one (same domain, young enough, parses). Returns what
    /// happened, for the log.
    pub fn load_snapshot(&self) -> Result<(usize, usize, Duration), String> {
        let Some(path) = &self.snapshot_path else {
            return Err("no dataDir".into());
        };
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > SNAPSHOT_MAX_BYTES as u64 {
            return Err(format!(
                "{}: larger than {SNAPSHOT_MAX_BYTES} bytes",
                path.display()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: SnapshotFile =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let apex = self.read(|z| z.apex().to_vec());
        if file.version != SNAPSHOT_VERSION || crate::wire::name_to_wire(&file.domain) != apex {
            return Err(format!(
                "{}: another version or cluster domain ({})",
                path.display(),
                file.domain
            ));
        }
        let age = Duration::from_millis(unix_ms().saturating_sub(file.confirmed_ms));
        if age > SNAPSHOT_MAX_AGE {
            return Err(format!(
                "{}: {}s old, older than {}s",
                path.display(),
                age.as_secs(),
                SNAPSHOT_MAX_AGE.as_secs()
            ));
        }
        let counts = (file.state.services.len(), file.state.slices.len());
        if self.origin() != Origin::None {
            return Err("the API answered first".into());
        }
        self.update(|z| {
            z.restore(file.state);
            if z.local_zone().is_none() {
                z.set_local_zone(file.local_zone);
            }
        });
        self.confirmed_ms
            .store(file.confirmed_ms, Ordering::Relaxed);
        let _ = self.origin.compare_exchange(
            Origin::None as u8,
            Origin::Snapshot as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        Ok((counts.0, counts.1, age))
    }

    /// Writes the snapshot now (blocking: call from `spawn_blocking`). Only a state from the API is
    /// written.
    pub fn write_snapshot(&self) -> Result<usize, String> {
        let Some(path) = &self.snapshot_path else {
            return Ok(0);
        };
        if self.origin() != Origin::Api {
            return Ok(0);
        }
        let _ = self.age();
        let (domain, local_zone, state) = self.read(|z| {
            (
                crate::wire::wire_to_name(z.apex()),
                z.local_zone().map(str::to_owned),
                z.snapshot(),
            )
        });
        let file = SnapshotFile {
            version: SNAPSHOT_VERSION,
            domain: domain.trim_end_matches('.').to_owned(),
            confirmed_ms: self.confirmed_ms.load(Ordering::Relaxed),
            local_zone,
            state,
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        if bytes.len() > SNAPSHOT_MAX_BYTES {
            return Err(format!(
                "the cluster zone's snapshot would take {} bytes, more than {SNAPSHOT_MAX_BYTES}: not written",
                bytes.len()
            ));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        hybridnet_state::atomic_write(path, &bytes, 0o644).map_err(|e| e.to_string())?;
        Ok(bytes.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::zone::{ServiceInfo, ServiceKind};

    #[test]
    fn a_snapshot_round_trips_and_is_served_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("dnslocal-snap-{}", std::process::id()));
        let a = Authority::new("cluster.local", None, Duration::from_secs(5), Some(&dir));
        a.update(|z| {
            z.upsert_service(ServiceInfo {
                namespace: "default".into(),
                name: "kubernetes".into(),
                kind: ServiceKind::ClusterIp(vec!["10.96.0.1".parse().unwrap()]),
                ports: Vec::new(),
                publish_not_ready: false,
            })
        });
        assert_eq!(
            a.write_snapshot().unwrap(),
            0,
            "not from the API yet: nothing written"
        );
        a.set_live(Feed::Services, true);
        a.set_live(Feed::Slices, true);
        assert_eq!(a.age(), Some(Duration::ZERO));
        assert!(a.write_snapshot().unwrap() > 0);
        a.set_live(Feed::Slices, false);
        assert!(a.age().is_some());

        let b = Authority::new("cluster.local", None, Duration::from_secs(5), Some(&dir));
        assert_eq!(b.origin(), Origin::None);
        let (services, slices, _) = b.load_snapshot().unwrap();
        assert_eq!((services, slices), (1, 0));
        assert_eq!(b.origin(), Origin::Snapshot);
        assert_eq!(b.read(Zone::snapshot), a.read(Zone::snapshot));

        let other = Authority::new("other.local", None, Duration::from_secs(5), Some(&dir));
        assert!(other.load_snapshot().is_err(), "another cluster domain");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
