//! The cluster zone as dnslocal answers it in `clusterZone: kubernetes` mode: a pure model of the
//! Services and EndpointSlices it was given ([`ServiceInfo`], [`SliceInfo`]) and the answers the
//! Kubernetes DNS specification (kubernetes/dns `docs/specification.md`, schema 1.1.0) derives from
//! them. No sockets, no clock: [`crate::kube`] feeds it, [`encode`] renders its answers.
//!
//! Records served (`<zone>` is the cluster domain):
//! - `dns-version.<zone>. TXT "1.1.0"`; the apex `SOA` (and in every negative answer);
//! - `<svc>.<ns>.svc.<zone>.`: A/AAAA of the ClusterIPs; for a headless Service one record per ready
//!   endpoint address (this node's topology zone first), NXDOMAIN without one; a CNAME for ExternalName;
//! - `<host>.<svc>.<ns>.svc.<zone>.` (headless): the endpoint's `hostname` (set from a Pod's
//!   `hostname` + `subdomain`), else the address with dashes (`10-0-0-1`), as CoreDNS names them;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>. SRV` for named ports (headless: per ready endpoint);
//! - PTR in `in-addr.arpa`/`ip6.arpa` for ClusterIPs and headless endpoint addresses;
//! - `<a>-<b>-<c>-<d>.<ns>.pod.<zone>.` (the spec's deprecated but required pod records).
//!
//! A name that exists with other types (or only has names below it) is NODATA; any other name in the
//! zone NXDOMAIN. Reverse names we hold no record for are not ours ([`Lookup::NotOurs`]): they keep
//! today's path (kube-dns or the upstreams).

pub mod encode;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The schema version in `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;

/// What a Service contributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceKind {
    /// ClusterIPs (one per family).
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: the endpoints answer.
    Headless,
    /// `type: ExternalName`: a CNAME to this name (presentation format, no trailing dot).
    ExternalName(String),
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Lower-cased; unnamed ports have no SRV record.
    pub name: String,
    /// Lower-cased: `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
}

/// The parts of a Service the zone needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceKind,
    pub ports: Vec<Port>,
    /// `spec.publishNotReadyAddresses`: every endpoint counts as ready.
    pub publish_not_ready: bool,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    /// Lower-cased `hostname` (a Pod with `hostname` and `subdomain` = the Service's name).
    pub hostname: Option<String>,
    /// `conditions.ready` (absent counts as ready, as the API says).
    pub ready: bool,
    /// The endpoint's topology zone.
    pub zone: Option<String>,
}

/// The parts of an EndpointSlice the zone needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<Port>,
    pub endpoints: Vec<EndpointInfo>,
}

/// Lower-cased `name.namespace`: the key of a Service (and of the slices that belong to it).
fn service_key(name: &str, namespace: &str) -> String {
    let mut k = String::with_capacity(name.len() + namespace.len() + 1);
    k.push_str(&name.to_ascii_lowercase());
    k.push('.');
    k.push_str(&namespace.to_ascii_lowercase());
    k
}

fn slice_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Who owns an address (for PTR).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Service(Box<str>),
    Slice(Box<str>),
}

/// One resource record's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Target in lower-cased wire format.
    Cname(Vec<u8>),
    Ptr(Vec<u8>),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Vec<u8>,
    },
    Txt(String),
    Soa,
}

impl Rdata {
    pub fn rtype(&self) -> u16 {
        match self {
            Rdata::A(_) => TYPE_A,
            Rdata::Aaaa(_) => TYPE_AAAA,
            Rdata::Cname(_) => TYPE_CNAME,
            Rdata::Ptr(_) => TYPE_PTR,
            Rdata::Srv { .. } => TYPE_SRV,
            Rdata::Txt(_) => TYPE_TXT,
            Rdata::Soa => TYPE_SOA,
        }
    }

    fn of_ip(ip: IpAddr) -> Rdata {
        match ip {
            IpAddr::V4(v4) => Rdata::A(v4),
            IpAddr::V6(v6) => Rdata::Aaaa(v6),
        }
    }
}

/// A record: owner (`None`: the question's name) and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub owner: Option<Vec<u8>>,
    pub data: Rdata,
}

/// What the zone says about a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Records for the answer section, and for the additional section.
    Answer(Vec<Record>, Vec<Record>),
    /// The name exists, not with this type.
    NoData,
    NxDomain,
    /// Not a name we answer (a reverse name we hold nothing for).
    NotOurs,
}

/// The model: Services and EndpointSlices, with the indexes queries need.
#[derive(Debug)]
pub struct Zone {
    /// The cluster domain, lower-cased wire format.
    apex: Vec<u8>,
    /// This node's topology zone: its endpoints come first in headless answers.
    local_zone: Option<String>,
    services: HashMap<String, ServiceInfo>,
    slices: HashMap<String, SliceInfo>,
    /// Service key -> its slices' keys.
    by_service: HashMap<String, Vec<String>>,
    /// Namespace (lower-cased) -> how many Services it holds.
    namespaces: HashMap<String, usize>,
    ptr: HashMap<IpAddr, Vec<Owner>>,
}

/// Everything the model was given, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
}

/// Splits a lower-cased wire-format name into its labels (no root label).
fn labels(name: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let len = usize::from(*name.get(off)?);
        if len == 0 {
            return Some(out);
        }
        out.push(name.get(off + 1..off + 1 + len)?);
        off += 1 + len;
    }
}

/// A wire-format name from presentation-format labels followed by the wire-format `suffix`.
pub fn join(parts: &[&str], suffix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for p in parts {
        for l in p.split('.').filter(|l| !l.is_empty()) {
            let l = l.as_bytes();
            let n = l.len().min(63);
            out.push(n as u8);
            out.extend(l[..n].iter().map(u8::to_ascii_lowercase));
        }
    }
    out.extend_from_slice(suffix);
    out
}

/// `10-0-0-1` for 10.0.0.1, `fd00--1` for fd00::1 (CoreDNS's endpoint and pod names).
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The address of a `<a>-<b>-<c>-<d>` (or dashed IPv6) label.
fn undashed(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    if let Ok(v4) = s.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    s.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The address of a reverse name (`4.3.2.1.in-addr.arpa`, 32 nibbles `.ip6.arpa`), if it names one.
pub fn reverse_ip(labels: &[&[u8]]) -> Option<IpAddr> {
    match labels {
        [d, c, b, a, in_addr, arpa] if *in_addr == b"in-addr" && *arpa == b"arpa" => {
            let oct = |l: &[u8]| -> Option<u8> {
                let s = std::str::from_utf8(l).ok()?;
                (s.len() == 1 || !s.starts_with('0')).then_some(())?;
                s.parse().ok()
            };
            Some(IpAddr::V4(Ipv4Addr::new(
                oct(a)?,
                oct(b)?,
                oct(c)?,
                oct(d)?,
            )))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && *ip6 == b"ip6" && *arpa == b"arpa" => {
            let mut v = 0u128;
            for n in nibbles.iter().rev() {
                let [c] = n else { return None };
                v = v << 4 | u128::from((*c as char).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}

fn eq(label: &[u8], s: &str) -> bool {
    label.eq_ignore_ascii_case(s.as_bytes())
}

impl Zone {
    /// An empty zone for the cluster domain `domain` (e.g. `cluster.local`).
    pub fn new(domain: &str, local_zone: Option<String>) -> Zone {
        Zone {
            apex: crate::wire::name_to_wire(domain),
            local_zone,
            services: HashMap::new(),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            namespaces: HashMap::new(),
            ptr: HashMap::new(),
        }
    }

    /// The cluster domain in lower-cased wire format.
    pub fn apex(&self) -> &[u8] {
        &self.apex
    }

    pub fn set_local_zone(&mut self, zone: Option<String>) {
        self.local_zone = zone;
    }

    pub fn local_zone(&self) -> Option<&str> {
        self.local_zone.as_deref()
    }

    /// Services and EndpointSlices held.
    pub fn counts(&self) -> (usize, usize, usize) {
        let endpoints = self.slices.values().map(|s| s.endpoints.len()).sum();
        (self.services.len(), self.slices.len(), endpoints)
    }

    fn unindex(&mut self, ips: impl IntoIterator<Item = IpAddr>, owner: &Owner) {
        for ip in ips {
            if let Some(v) = self.ptr.get_mut(&ip) {
                v.retain(|o| o != owner);
                if v.is_empty() {
                    self.ptr.remove(&ip);
                }
            }
        }
    }

    fn index(&mut self, ips: impl IntoIterator<Item = IpAddr>, owner: &Owner) {
        for ip in ips {
            let v = self.ptr.entry(ip).or_default();
            if !v.contains(owner) {
                v.push(owner.clone());
            }
        }
    }

    /// Adds or replaces a Service.
    pub fn upsert_service(&mut self, s: ServiceInfo) {
        let key = service_key(&s.name, &s.namespace);
        self.remove_service(&s.namespace, &s.name);
        let owner = Owner::Service(key.clone().into_boxed_str());
        if let ServiceKind::ClusterIp(ips) = &s.kind {
            self.index(ips.clone(), &owner);
        }
        *self
            .namespaces
            .entry(s.namespace.to_ascii_lowercase())
            .or_default() += 1;
        self.services.insert(key, s);
    }

    /// Removes a Service (its slices stay: they go with their own DELETED event).
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = service_key(name, namespace);
        let Some(old) = self.services.remove(&key) else {
            return;
        };
        if let ServiceKind::ClusterIp(ips) = &old.kind {
            self.unindex(ips.clone(), &Owner::Service(key.into_boxed_str()));
        }
        let ns = namespace.to_ascii_lowercase();
        if let Some(n) = self.namespaces.get_mut(&ns) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(&ns);
            }
        }
    }

    /// Adds or replaces an EndpointSlice.
    pub fn upsert_slice(&mut self, s: SliceInfo) {
        self.remove_slice(&s.namespace, &s.name);
        let key = slice_key(&s.namespace, &s.name);
        let owner = Owner::Slice(key.clone().into_boxed_str());
        let ips: Vec<IpAddr> = s
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        self.index(ips, &owner);
        self.by_service
            .entry(service_key(&s.service, &s.namespace))
            .or_default()
            .push(key.clone());
        self.slices.insert(key, s);
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        let key = slice_key(namespace, name);
        let Some(old) = self.slices.remove(&key) else {
            return;
        };
        let ips: Vec<IpAddr> = old
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        let owner = Owner::Slice(key.clone().into_boxed_str());
        self.unindex(ips, &owner);
        let skey = service_key(&old.service, &old.namespace);
        if let Some(v) = self.by_service.get_mut(&skey) {
            v.retain(|k| *k != key);
            if v.is_empty() {
                self.by_service.remove(&skey);
            }
        }
    }

    /// Replaces every Service (a relist), keeping the slices.
    pub fn replace_services(&mut self, services: Vec<ServiceInfo>) {
        self.services.clear();
        self.namespaces.clear();
        self.ptr.retain(|_, owners| {
            owners.retain(|o| matches!(o, Owner::Slice(_)));
            !owners.is_empty()
        });
        for s in services {
            self.upsert_service(s);
        }
    }

    /// Replaces every EndpointSlice (a relist), keeping the Services.
    pub fn replace_slices(&mut self, slices: Vec<SliceInfo>) {
        self.slices.clear();
        self.by_service.clear();
        self.ptr.retain(|_, owners| {
            owners.retain(|o| matches!(o, Owner::Service(_)));
            !owners.is_empty()
        });
        for s in slices {
            self.upsert_slice(s);
        }
    }

    /// Everything held, for a snapshot (sorted, so equal states give equal snapshots).
    pub fn snapshot(&self) -> Snapshot {
        let mut services: Vec<ServiceInfo> = self.services.values().cloned().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut slices: Vec<SliceInfo> = self.slices.values().cloned().collect();
        slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Snapshot { services, slices }
    }

    /// Loads a snapshot (replacing everything).
    pub fn restore(&mut self, snap: Snapshot) {
        self.replace_services(snap.services);
        self.replace_slices(snap.slices);
    }

    /// The ready endpoints of a Service, this node's zone first: (endpoint, slice ports).
    fn ready_endpoints<'a>(
        &'a self,
        key: &str,
        svc: &ServiceInfo,
    ) -> Vec<(&'a EndpointInfo, &'a [Port])> {
        let mut out: Vec<(&EndpointInfo, &[Port])> = self
            .by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .flat_map(|s| s.endpoints.iter().map(move |e| (e, s.ports.as_slice())))
            .filter(|(e, _)| e.ready || svc.publish_not_ready)
            .collect();
        if let Some(local) = &self.local_zone {
            // Stable: the API's order within each group.
            out.sort_by_key(|(e, _)| e.zone.as_deref() != Some(local.as_str()));
        }
        out
    }

    /// The name of `ip` of endpoint `e` below its Service: its hostname, else the dashed address.
    fn endpoint_label(e: &EndpointInfo, ip: IpAddr) -> String {
        e.hostname.clone().unwrap_or_else(|| dashed(ip))
    }

    /// The answer for `qname` (lower-cased wire format) and `qtype`.
    pub fn lookup(&self, qname: &[u8], qtype: u16) -> Lookup {
        let Some(all) = labels(qname) else {
            return Lookup::NotOurs;
        };
        if crate::wire::in_zone(qname, &self.apex) {
            let apex_labels = labels(&self.apex).map_or(0, |l| l.len());
            let rel = &all[..all.len() - apex_labels];
            return self.lookup_zone(rel, qtype);
        }
        match reverse_ip(&all) {
            Some(ip) => self.lookup_ptr(ip, qtype),
            None => Lookup::NotOurs,
        }
    }

    fn only(qtype: u16, want: u16, records: Vec<Record>) -> Lookup {
        if qtype == want && !records.is_empty() {
            Lookup::Answer(records, Vec::new())
        } else {
            Lookup::NoData
        }
    }

    fn lookup_zone(&self, rel: &[&[u8]], qtype: u16) -> Lookup {
        let own = |data| Record { owner: None, data };
        match rel {
            [] => Self::only(qtype, TYPE_SOA, vec![own(Rdata::Soa)]),
            [l] if eq(l, "dns-version") => Self::only(
                qtype,
                TYPE_TXT,
                vec![own(Rdata::Txt(SCHEMA_VERSION.to_owned()))],
            ),
            [l] if eq(l, "svc") || eq(l, "pod") => Lookup::NoData,
            [ns, l] if eq(l, "svc") => match std::str::from_utf8(ns) {
                Ok(ns) if self.namespaces.contains_key(ns) => Lookup::NoData,
                _ => Lookup::NxDomain,
            },
            [_, l] if eq(l, "pod") => Lookup::NoData,
            [ip, _, l] if eq(l, "pod") => match undashed(ip) {
                Some(ip) => {
                    let want = if ip.is_ipv4() { TYPE_A } else { TYPE_AAAA };
                    Self::only(qtype, want, vec![own(Rdata::of_ip(ip))])
                }
                None => Lookup::NxDomain,
            },
            [svc, ns, l] if eq(l, "svc") => self.lookup_service(svc, ns, qtype),
            [first, svc, ns, l] if eq(l, "svc") => {
                if first.starts_with(b"_") {
                    self.lookup_proto(first, svc, ns)
                } else {
                    self.lookup_endpoint(first, svc, ns, qtype)
                }
            }
            [port, proto, svc, ns, l] if eq(l, "svc") => {
                self.lookup_srv(port, proto, svc, ns, qtype)
            }
            _ => Lookup::NxDomain,
        }
    }

    fn service(&self, svc: &[u8], ns: &[u8]) -> Option<(String, &ServiceInfo)> {
        let key = format!(
            "{}.{}",
            std::str::from_utf8(svc).ok()?,
            std::str::from_utf8(ns).ok()?
        );
        let s = self.services.get(&key)?;
        Some((key, s))
    }

    fn service_name(&self, svc: &ServiceInfo) -> Vec<u8> {
        join(&[&svc.name, &svc.namespace, "svc"], &self.apex)
    }

    fn lookup_service(&self, svc: &[u8], ns: &[u8], qtype: u16) -> Lookup {
        let Some((key, s)) = self.service(svc, ns) else {
            return Lookup::NxDomain;
        };
        let own = |data| Record { owner: None, data };
        match &s.kind {
            ServiceKind::ExternalName(target) => Lookup::Answer(
                vec![own(Rdata::Cname(crate::wire::name_to_wire(target)))],
                Vec::new(),
            ),
            ServiceKind::ClusterIp(ips) => {
                if qtype == TYPE_SRV {
                    return self.service_srv(s, None, None, qtype);
                }
                let records = ips
                    .iter()
                    .map(|ip| Rdata::of_ip(*ip))
                    .filter(|d| d.rtype() == qtype)
                    .map(own)
                    .collect();
                Self::only(qtype, qtype, records)
            }
            ServiceKind::Headless => {
                let ready = self.ready_endpoints(&key, s);
                if ready.is_empty() {
                    return Lookup::NxDomain;
                }
                if qtype == TYPE_SRV {
                    return self.headless_srv(&key, s, None, None, qtype);
                }
                let mut seen = HashSet::new();
                let records = ready
                    .iter()
                    .flat_map(|(e, _)| e.addresses.iter().copied())
                    .filter(|ip| seen.insert(*ip))
                    .map(Rdata::of_ip)
                    .filter(|d| d.rtype() == qtype)
                    .map(own)
                    .collect();
                Self::only(qtype, qtype, records)
            }
        }
    }

    fn lookup_endpoint(&self, host: &[u8], svc: &[u8], ns: &[u8], qtype: u16) -> Lookup {
        let Some((key, s)) = self.service(svc, ns) else {
            return Lookup::NxDomain;
        };
        if s.kind != ServiceKind::Headless {
            return Lookup::NxDomain;
        }
        let mut records = Vec::new();
        let mut found = false;
        for (e, _) in self.ready_endpoints(&key, s) {
            for ip in &e.addresses {
                if eq(host, &Self::endpoint_label(e, *ip)) {
                    found = true;
                    let d = Rdata::of_ip(*ip);
                    if d.rtype() == qtype {
                        records.push(Record {
                            owner: None,
                            data: d,
                        });
                    }
                }
            }
        }
        if !found {
            return Lookup::NxDomain;
        }
        Self::only(qtype, qtype, records)
    }

    /// `_<proto>.<svc>.<ns>.svc`: an empty non-terminal when a named port of that protocol exists.
    fn lookup_proto(&self, proto: &[u8], svc: &[u8], ns: &[u8]) -> Lookup {
        let Some((key, s)) = self.service(svc, ns) else {
            return Lookup::NxDomain;
        };
        let proto = &proto[1..];
        let any = self
            .ports_of(&key, s)
            .iter()
            .any(|p| !p.name.is_empty() && eq(proto, &p.protocol));
        if any {
            Lookup::NoData
        } else {
            Lookup::NxDomain
        }
    }

    /// The ports SRV records use: the Service's, or for a headless Service its endpoints' (the
    /// ports its Pods listen on).
    fn ports_of(&self, key: &str, s: &ServiceInfo) -> Vec<Port> {
        if s.kind != ServiceKind::Headless {
            return s.ports.clone();
        }
        let mut out: Vec<Port> = Vec::new();
        for k in self.by_service.get(key).into_iter().flatten() {
            for p in self.slices.get(k).into_iter().flat_map(|sl| &sl.ports) {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
        if out.is_empty() { s.ports.clone() } else { out }
    }

    fn lookup_srv(&self, port: &[u8], proto: &[u8], svc: &[u8], ns: &[u8], qtype: u16) -> Lookup {
        let (Some(port), Some(proto)) = (port.strip_prefix(b"_"), proto.strip_prefix(b"_")) else {
            return Lookup::NxDomain;
        };
        let Some((key, s)) = self.service(svc, ns) else {
            return Lookup::NxDomain;
        };
        match s.kind {
            ServiceKind::ExternalName(_) => Lookup::NxDomain,
            ServiceKind::ClusterIp(_) => self.service_srv(s, Some(port), Some(proto), qtype),
            ServiceKind::Headless => self.headless_srv(&key, s, Some(port), Some(proto), qtype),
        }
    }

    fn matches(p: &Port, port: Option<&[u8]>, proto: Option<&[u8]>) -> bool {
        !p.name.is_empty()
            && port.is_none_or(|n| eq(n, &p.name))
            && proto.is_none_or(|n| eq(n, &p.protocol))
    }

    fn service_srv(
        &self,
        s: &ServiceInfo,
        port: Option<&[u8]>,
        proto: Option<&[u8]>,
        qtype: u16,
    ) -> Lookup {
        let ports: Vec<&Port> = s
            .ports
            .iter()
            .filter(|p| Self::matches(p, port, proto))
            .collect();
        if ports.is_empty() {
            return if port.is_some() {
                Lookup::NxDomain
            } else {
                Lookup::NoData
            };
        }
        if qtype != TYPE_SRV {
            return Lookup::NoData;
        }
        let target = self.service_name(s);
        let answers = ports
            .iter()
            .map(|p| Record {
                owner: None,
                data: Rdata::Srv {
                    priority: 0,
                    weight: 100,
                    port: p.port,
                    target: target.clone(),
                },
            })
            .collect();
        let extra = match &s.kind {
            ServiceKind::ClusterIp(ips) => ips
                .iter()
                .map(|ip| Record {
                    owner: Some(target.clone()),
                    data: Rdata::of_ip(*ip),
                })
                .collect(),
            _ => Vec::new(),
        };
        Lookup::Answer(answers, extra)
    }

    fn headless_srv(
        &self,
        key: &str,
        s: &ServiceInfo,
        port: Option<&[u8]>,
        proto: Option<&[u8]>,
        qtype: u16,
    ) -> Lookup {
        let ready = self.ready_endpoints(key, s);
        let named = self
            .ports_of(key, s)
            .iter()
            .any(|p| Self::matches(p, port, proto));
        if !named {
            return if port.is_some() {
                Lookup::NxDomain
            } else {
                Lookup::NoData
            };
        }
        if qtype != TYPE_SRV || ready.is_empty() {
            return Lookup::NoData;
        }
        let svc_name = self.service_name(s);
        let mut answers = Vec::new();
        let mut extra = Vec::new();
        let mut seen = HashSet::new();
        for (e, slice_ports) in ready {
            let ports: &[Port] = if slice_ports.is_empty() {
                &s.ports
            } else {
                slice_ports
            };
            for ip in &e.addresses {
                let target = join(&[&Self::endpoint_label(e, *ip)], &svc_name);
                for p in ports.iter().filter(|p| Self::matches(p, port, proto)) {
                    if seen.insert((target.clone(), p.port)) {
                        answers.push(Record {
                            owner: None,
                            data: Rdata::Srv {
                                priority: 0,
                                weight: 100,
                                port: p.port,
                                target: target.clone(),
                            },
                        });
                    }
                }
                extra.push(Record {
                    owner: Some(target),
                    data: Rdata::of_ip(*ip),
                });
            }
        }
        if answers.is_empty() {
            return Lookup::NoData;
        }
        Lookup::Answer(answers, extra)
    }

    fn lookup_ptr(&self, ip: IpAddr, qtype: u16) -> Lookup {
        let Some(owners) = self.ptr.get(&ip) else {
            return Lookup::NotOurs;
        };
        let mut targets: Vec<Vec<u8>> = Vec::new();
        for o in owners {
            match o {
                Owner::Service(k) => {
                    if let Some(s) = self.services.get(&**k) {
                        targets.push(self.service_name(s));
                    }
                }
                Owner::Slice(k) => {
                    let Some(sl) = self.slices.get(&**k) else {
                        continue;
                    };
                    let skey = service_key(&sl.service, &sl.namespace);
                    let Some(s) = self.services.get(&skey) else {
                        continue;
                    };
                    if s.kind != ServiceKind::Headless {
                        continue;
                    }
                    for e in &sl.endpoints {
                        if (e.ready || s.publish_not_ready) && e.addresses.contains(&ip) {
                            let svc_name = self.service_name(s);
                            targets.push(join(&[&Self::endpoint_label(e, ip)], &svc_name));
                        }
                    }
                }
            }
        }
        if targets.is_empty() {
            return Lookup::NotOurs;
        }
        targets.sort();
        targets.dedup();
        let records = targets
            .into_iter()
            .map(|t| Record {
                owner: None,
                data: Rdata::Ptr(t),
            })
            .collect();
        Self::only(qtype, TYPE_PTR, records)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
