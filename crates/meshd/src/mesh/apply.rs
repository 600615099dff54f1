//! The appliers: one per resource kind, each diffing the plan's desired state against what the kernel
//! reports and applying the minimal change. All of them run in every reconcile (on a change, and every
//! [`super::RESYNC`] without one), so a resource changed from outside (a deleted link, a removed address,
//! rules flushed by systemd-networkd's `ManageForeignRoutingPolicyRules`) comes back within one resync.
//!
//! The two resources that grow with the peers, the WireGuard device and meshd's routes, are read in full
//! (one dump each) only by the resync pass and by a pass after a failure. A pass triggered by a change
//! diffs against what meshd knows of them, the last full read with every change applied since (and the
//! device as each counter reading found it), so one change among thousands of peers costs one operation
//! and no dump. What changed from outside in between is repaired by the next resync.

use std::time::Instant;

use hybridnet_config::PublicKey;

use super::{Backend, Error, Mesh, backend};
use crate::plan::Desired;
use crate::wg;

impl Mesh {
    /// Brings every resource in line with the plan: link, addresses, rules, WireGuard device, routes,
    /// sysctls. A failing applier does not keep the others from running; the first failure is returned.
    /// `full`: read the device and the routes from the kernel (the resync) instead of diffing against what
    /// meshd knows of them; a pass without that knowledge (the first, one after a failure) reads them too.
    pub async fn reconcile(&mut self, full: bool) -> Result<(), Error> {
        self.metrics.reconciles.inc();
        let started = Instant::now();
        if full {
            self.device_known = None;
            self.routes_known = None;
        }
        let full = self.device_known.is_none() || self.routes_known.is_none();
        let planned = self.planned();
        let planned_at = started.elapsed();
        // Without the link nothing else can be applied.
        if let Err(error) = self.apply_link(&planned).await {
            self.forget_kernel();
            return Err(error);
        }
        let mut first: Option<Error> = None;
        let mut note = |r: Result<(), Error>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        note(self.apply_addresses(&planned).await);
        note(self.apply_rules().await);
        let device_from = started.elapsed();
        note(self.apply_device(&planned).await);
        let routes_from = started.elapsed();
        note(self.apply_routes(&planned).await);
        tracing::debug!(
            full,
            plan = ?planned_at,
            device = ?routes_from.saturating_sub(device_from),
            routes = ?started.elapsed().saturating_sub(routes_from),
            "reconcile pass"
        );
        self.apply_sysctls(&planned);
        self.report_conflicts(&planned);
        self.report_gateways(&planned);
        self.report_refused(&planned.refused);
        let took = started.elapsed().as_secs_f64();
        self.metrics.reconcile_seconds.set(took);
        if !full {
            self.metrics.reconcile_change_seconds.set(took);
        }
        if first.is_some() {
            self.forget_kernel();
        }
        first.map_or(Ok(()), Err)
    }

    /// Drops what meshd knows of the device and its routes: the next pass reads both.
    pub(super) fn forget_kernel(&mut self) {
        self.device_known = None;
        self.routes_known = None;
    }

    fn drift(&self, resource: &str, changes: usize) {
        if changes > 0 {
            tracing::warn!(
                resource,
                changes,
                "repaired a change made from outside to what meshd owns"
            );
            self.metrics
                .drift_repairs
                .get_or_create(&vec![("resource".to_owned(), resource.to_owned())])
                .inc_by(changes as u64);
        }
    }

    /// The link: up with the planned MTU; re-created when it was deleted (a new kernel link or userspace
    /// device; the other appliers then fill it). A link of our name that is not ours is an error naming it.
    async fn apply_link(&mut self, planned: &Desired) -> Result<(), Error> {
        let name = planned.interface.clone();
        match self.net.link(&name).await? {
            Some(link) if link.index == self.index => {
                if link.up && link.mtu == Some(planned.mtu) {
                    return Ok(());
                }
                // Set down, or another MTU, from outside.
            }
            Some(link) if !link.ours() => return Err(backend::foreign(&name, &link)),
            Some(link) if matches!(self.backend, Backend::Kernel(_)) => {
                // Ours under a new index (re-created by an earlier pass that failed half-way).
                self.index = link.index;
            }
            Some(link) => {
                return Err(Error::Backend(format!(
                    "interface {name} was replaced (index {} now) while the userspace device ran",
                    link.index
                )));
            }
            None => {
                tracing::warn!(interface = %name, "the mesh interface is gone: re-creating it");
                self.index = backend::recreate(&self.net, &name, &mut self.backend).await?;
            }
        }
        // A link set down lost its routes, a re-created one its peers: read both in this pass.
        self.forget_kernel();
        self.net.up(self.index, planned.mtu).await?;
        self.drift("link", 1);
        Ok(())
    }

    async fn apply_addresses(&mut self, planned: &Desired) -> Result<(), Error> {
        let changes = self
            .net
            .sync_addresses(self.index, &planned.addresses)
            .await?;
        self.drift("address", changes);
        Ok(())
    }

    async fn apply_rules(&mut self) -> Result<(), Error> {
        let added = self.net.ensure_rules().await?;
        self.drift("rule", added);
        Ok(())
    }

    /// The WireGuard device: the minimal peer changes ([`wg::diff`]) against the device as read now, or as
    /// meshd knows it (see the module's doc). Counters are taken from a read only.
    async fn apply_device(&mut self, planned: &Desired) -> Result<(), Error> {
        let mut known = match self.device_known.take() {
            Some(known) => known,
            None => {
                let mut actual = self.backend.get().await?;
                self.absorb_stats(&actual);
                wg::share_allowed(&mut actual, |k| {
                    planned.device.peers.get(k).map(|c| &c.allowed_ips)
                });
                actual
            }
        };
        let update = wg::diff(&planned.device, &known);
        if !update.is_empty() {
            tracing::debug!(ops = update.peers.len(), "applying WireGuard changes");
            // A failure leaves the device unknown: the next pass reads it.
            self.backend.apply(&update).await?;
            self.metrics
                .wireguard_peer_ops
                .inc_by(update.peers.len() as u64);
            if matches!(self.backend, Backend::Userspace(_)) {
                self.kick(&update);
            }
            wg::record_applied(&mut known, &update);
        }
        self.device_known = Some(known);
        Ok(())
    }

    /// meshd's routes: the minimal changes against the table as read now, or as meshd knows it.
    async fn apply_routes(&mut self, planned: &Desired) -> Result<(), Error> {
        let mut known = match self.routes_known.take() {
            Some(known) => known,
            None => self.net.routes(self.index).await?,
        };
        // A failure leaves the table unknown: the next pass reads it.
        let changes = self
            .net
            .sync_routes(self.index, &planned.routes, &mut known)
            .await?;
        self.metrics.route_changes.inc_by(changes as u64);
        self.routes_known = Some(known);
        Ok(())
    }

    fn apply_sysctls(&mut self, planned: &Desired) {
        self.sysctls.apply(planned.forwarding, &planned.interface);
    }

    /// Counts and logs each change of a location's active gateway (a location seen for the first time is
    /// not a change).
    fn report_gateways(&mut self, planned: &Desired) {
        for (location, now) in &planned.gateways {
            let Some(before) = self.gateways.get(location) else {
                continue;
            };
            if before != now {
                let name = |k: &Option<PublicKey>| match k {
                    None => "none".to_owned(),
                    Some(k) if *k == self.public => "this node".to_owned(),
                    Some(k) => self
                        .peers
                        .get(k)
                        .map_or_else(|| k.to_string(), |p| p.spec.name.clone()),
                };
                tracing::info!(location, from = %name(before), to = %name(now), "active gateway changed");
                self.metrics.gateway_changes.inc();
            }
        }
        self.gateways.clone_from(&planned.gateways);
    }

    fn report_conflicts(&mut self, planned: &Desired) {
        self.metrics
            .prefix_conflicts
            .set(planned.conflicts.len() as i64);
        if planned.conflicts != self.conflicts {
            for c in &planned.conflicts {
                let name = |k| {
                    self.peers
                        .get(k)
                        .map_or_else(|| format!("{k}"), |p| p.spec.name.clone())
                };
                let losers: Vec<String> = c.losers.iter().map(name).collect();
                tracing::warn!(prefix = %c.prefix, holder = %name(&c.holder), without = ?losers, "two peers claim the same prefix: one holds it");
            }
            self.conflicts.clone_from(&planned.conflicts);
        }
    }
}
