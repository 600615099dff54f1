//! One discovery service endpoint: connect, Hello (public IP, redirects), Watch (snapshot, then
//! deltas), AffiliateUpdate at TTL/2 and on every local change, AffiliateDelete on a clean stop;
//! reconnects with capped exponential backoff, and a reconnect always starts from a new snapshot
//! (which is also how a "lost update" is resynced).
//!
//! The backoff starts over once a session has received its snapshot: a service (or a proxy in front
//! of it) that ends long-lived streams every few seconds is healthy, and must not push us to the
//! 15 s cap. Talos's client does the same: it resets its backoff after every successful update and
//! waits its first interval (500 ms, randomised by half) before it watches again (discovery-client
//! `pkg/client/client.go`, `Run`: `client.backoff.Reset()` after `refreshData`, `NextBackOff()`
//! before `sendHello`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::grpc::{Channel, Stream, Target};
use super::proto::server;
use super::{Local, Publisher, TTL, codec::Codec, decode};
use crate::metrics::Metrics;
use hybridnet_state::unix_now;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// The wait before watching again after a session that had its snapshot (Talos: its first backoff
/// interval, 500 ms). A session costs three calls (Hello, Watch, AffiliateUpdate), so even a service
/// that ends every stream at once sees at most about 7 calls a second from us, under the real
/// service's per-IP limit of 15 a second (discovery-service `pkg/limits/limits.go`).
const RESUME: Duration = Duration::from_millis(500);
const MAX_REDIRECTS: u32 = 5;
/// `HelloRequest.client_version`: `vX.Y.Z`, as Talos sends its own tag. The service labels its
/// `discovery_server_hello_requests_total` by the `vX.Y` it parses out of it and counts anything
/// else as `unknown` (discovery-service `pkg/server/version.go`, `parseVersion`).
pub const CLIENT_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

#[derive(Debug)]
pub(super) struct Registry {
    pub index: usize,
    pub endpoint: String,
    /// Extra CA certificates trusted for this endpoint (and where it redirects), besides the system
    /// bundle; Talos's client keeps its TLS config across redirects too.
    pub ca_file: Option<std::path::PathBuf>,
    pub cluster_id: String,
    pub our_id: String,
    pub codec: Codec,
    pub local: watch::Receiver<Option<Local>>,
    pub shared: Publisher,
    pub stop: CancellationToken,
    pub metrics: Metrics,
}

enum Ended {
    Stop,
    Failed(String),
}

impl Registry {
    fn labels(&self) -> Vec<(String, String)> {
        vec![("registry".to_owned(), self.endpoint.clone())]
    }

    fn set_state(&self, state: &str, error: Option<String>) {
        let i = self.index;
        let state = state.to_owned();
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                st.state = state;
                if error.is_some() {
                    st.error = error;
                }
            }
        });
    }

    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut target = match Target::parse(&self.endpoint) {
            Ok(t) => t,
            Err(error) => {
                tracing::error!(endpoint = %self.endpoint, %error, "discovery endpoint unusable");
                self.set_state("stopped", Some(error));
                return;
            }
        };
        let mut redirects = 0;
        let mut published_once = false;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            self.set_state("connecting", None);
            let mut watched = false;
            let error = match self
                .session(&mut target, &mut published_once, &mut watched)
                .await
            {
                Ok(Some(next)) if redirects < MAX_REDIRECTS => {
                    tracing::info!(from = %target, to = %next, "discovery service redirects");
                    target = next;
                    redirects += 1;
                    continue;
                }
                Ok(Some(_)) => {
                    target = Target::parse(&self.endpoint).unwrap_or(target);
                    redirects = 0;
                    "too many redirects; starting over from the configured endpoint".to_owned()
                }
                Ok(None) | Err(Ended::Stop) => break,
                Err(Ended::Failed(error)) => error,
            };
            // A session that had its snapshot was healthy: start the backoff over.
            let wait = if watched {
                backoff = BACKOFF_MIN;
                RESUME
            } else {
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            };
            if !self.pause(&target, error, watched, wait).await {
                break;
            }
        }
        if published_once {
            self.delete(&target).await;
        }
        self.set_state("stopped", None);
        self.metrics
            .discovery_registry_up
            .get_or_create(&self.labels())
            .set(0);
    }

    /// Reports a failed or ended session and waits `wait` (jittered 80-120 %); `false` on stop.
    async fn pause(&self, target: &Target, error: String, watched: bool, wait: Duration) -> bool {
        let wait = wait.mul_f64(0.8 + fastrand::f64() * 0.4);
        if watched {
            tracing::info!(endpoint = %target, %error, retry_in = ?wait, "discovery watch ended; watching again");
        } else {
            tracing::warn!(endpoint = %target, %error, retry_in = ?wait, "discovery service unreachable or failed");
        }
        self.metrics
            .discovery_errors
            .get_or_create(&self.labels())
            .inc();
        let i = self.index;
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                st.state = "backoff".into();
                st.error = Some(error);
                st.reconnects += 1;
            }
        });
        self.metrics
            .discovery_registry_up
            .get_or_create(&self.labels())
            .set(0);
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    /// A clean stop removes our record at once (otherwise it lingers until its TTL).
    async fn delete(&self, target: &Target) {
        let req = server::AffiliateDeleteRequest {
            cluster_id: self.cluster_id.clone(),
            affiliate_id: self.our_id.clone(),
        };
        let work = async {
            let mut ch =
                Channel::connect(target, self.ca_file.as_deref(), Duration::from_secs(2)).await?;
            ch.unary::<_, server::Empty>("AffiliateDelete", &req, Duration::from_secs(2))
                .await
        };
        match work.await {
            Ok(_) => {
                tracing::info!(endpoint = %target, "our affiliate deleted from the discovery service")
            }
            Err(error) => tracing::warn!(endpoint = %target, %error, "cannot delete our affiliate"),
        }
    }

    /// One connection: returns `Ok(Some(target))` for a redirect, `Ok(None)` on stop; sets
    /// `watched` once the watch has delivered its snapshot.
    async fn session(
        &mut self,
        target: &mut Target,
        published_once: &mut bool,
        watched: &mut bool,
    ) -> Result<Option<Target>, Ended> {
        let stop = self.stop.clone();
        let fail = Ended::Failed;
        let mut ch = tokio::select! {
            () = stop.cancelled() => return Err(Ended::Stop),
            r = Channel::connect(target, self.ca_file.as_deref(), CALL_TIMEOUT) => r.map_err(fail)?,
        };
        let hello: server::HelloResponse = ch
            .unary(
                "Hello",
                &server::HelloRequest {
                    cluster_id: self.cluster_id.clone(),
                    client_version: CLIENT_VERSION.into(),
                },
                CALL_TIMEOUT,
            )
            .await
            .map_err(fail)?;
        if let Some(r) = hello.redirect.filter(|r| !r.endpoint.is_empty()) {
            return target.redirect(&r.endpoint).map(Some).map_err(fail);
        }
        let public_ip = super::codec::ip_from_bytes(&hello.client_ip);
        let i = self.index;
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                st.public_ip = public_ip;
            }
        });
        let mut stream = ch
            .stream(
                "Watch",
                &server::WatchRequest {
                    cluster_id: self.cluster_id.clone(),
                },
                CALL_TIMEOUT,
            )
            .await
            .map_err(fail)?;
        // Marked before publishing: a change while the update is in flight is published again.
        self.local.mark_unchanged();
        self.publish(&mut ch, public_ip).await.map_err(fail)?;
        *published_once = true;
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + TTL / 2, TTL / 2);
        let mut first = true;
        let mut known: BTreeMap<String, super::Affiliate> = BTreeMap::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(None),
                _ = refresh.tick() => self.publish(&mut ch, public_ip).await.map_err(fail)?,
                changed = self.local.changed() => {
                    if changed.is_err() { return Ok(None); }
                    self.publish(&mut ch, public_ip).await.map_err(fail)?;
                }
                msg = next_watch(&mut stream) => {
                    let msg = msg.map_err(fail)?;
                    self.absorb(msg, first, &mut known);
                    first = false;
                    *watched = true;
                }
            }
        }
    }

    fn absorb(
        &self,
        msg: server::WatchResponse,
        snapshot: bool,
        known: &mut BTreeMap<String, super::Affiliate>,
    ) {
        if snapshot {
            known.clear();
        }
        for rec in msg.affiliates {
            if rec.id == self.our_id {
                continue;
            }
            if msg.deleted {
                if known.remove(&rec.id).is_some() {
                    tracing::info!(registry = %self.endpoint, affiliate = %rec.id, "affiliate deleted");
                }
                continue;
            }
            if rec.data.is_empty() {
                // Endpoints only (harvested by others) or not yet published: nothing to decrypt.
                continue;
            }
            match decode(&self.codec, &rec) {
                Ok((a, dropped)) => {
                    for reason in dropped {
                        self.rejected(&rec.id, reason);
                    }
                    if known.get(&rec.id) != Some(&a) {
                        tracing::info!(registry = %self.endpoint, affiliate = %rec.id, name = %a.name(), endpoints = a.endpoints.len(), "affiliate");
                    }
                    known.insert(rec.id.clone(), a);
                }
                Err(reason) => {
                    // Keep what we had: a bad update does not remove a peer.
                    self.rejected(&rec.id, reason);
                }
            }
        }
        let i = self.index;
        let list = known.clone();
        self.metrics
            .discovery_affiliates
            .get_or_create(&self.labels())
            .set(list.len() as i64);
        self.metrics
            .discovery_registry_up
            .get_or_create(&self.labels())
            .set(1);
        let now = unix_now();
        self.metrics
            .discovery_last_update_seconds
            .get_or_create(&self.labels())
            .set(now as i64);
        self.shared.update(move |s| {
            if let Some(st) = s.status.get_mut(i) {
                st.state = "watching".into();
                st.error = None;
                st.last_update = now;
                st.affiliates = list.len();
            }
            if let Some(m) = s.per_registry.get_mut(i) {
                *m = list;
            }
            if snapshot {
                s.synced = true;
            }
        });
    }

    fn rejected(&self, id: &str, reason: super::codec::Rejected) {
        tracing::warn!(registry = %self.endpoint, affiliate = %id, reason = reason.as_str(), "dropping an affiliate record");
        self.metrics
            .discovery_rejected(&self.endpoint, reason.as_str());
        let i = self.index;
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                st.rejected += 1;
            }
        });
    }

    async fn publish(
        &self,
        ch: &mut Channel,
        public_ip: Option<std::net::IpAddr>,
    ) -> Result<(), String> {
        let Some(local) = self.local.borrow().clone() else {
            return Ok(());
        };
        let endpoints = local.endpoints_with(public_ip);
        let req = server::AffiliateUpdateRequest {
            cluster_id: self.cluster_id.clone(),
            affiliate_id: self.our_id.clone(),
            affiliate_data: Some(self.codec.seal_affiliate(&local.affiliate)),
            affiliate_endpoints: endpoints
                .iter()
                .take(super::codec::ENDPOINTS_MAX)
                .map(|e| self.codec.seal_endpoint(*e))
                .collect(),
            ttl: Some(server::Duration {
                seconds: TTL.as_secs() as i64,
                nanos: 0,
            }),
        };
        ch.unary::<_, server::Empty>("AffiliateUpdate", &req, CALL_TIMEOUT)
            .await?;
        self.metrics
            .discovery_updates
            .get_or_create(&self.labels())
            .inc();
        tracing::debug!(registry = %self.endpoint, endpoints = endpoints.len(), "affiliate published");
        Ok(())
    }
}

async fn next_watch(stream: &mut Stream) -> Result<server::WatchResponse, String> {
    stream.next().await
}
