//! Memory of the cluster-zone model at scale: 10,000 Services and 100,000 endpoints (one EndpointSlice
//! of 10 endpoints per Service, a third of them headless with hostnames), measured as the heap bytes
//! live after building it, with a counting global allocator. Prints the figure (run with
//! `--nocapture`) and holds it under the budget stated in crates/dnslocal/README.md.
#![allow(unsafe_code, clippy::unwrap_used, clippy::print_stdout)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};

use hybridnet_dnslocal::zone::{
    EndpointInfo, Lookup, Port, ServiceInfo, ServiceKind, SliceInfo, TYPE_A, Zone,
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `realloc` itself.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SERVICES: u32 = 10_000;
const PER_SERVICE: u32 = 10;

fn build() -> Zone {
    let mut z = Zone::new("cluster.local", Some("zone-a".into()));
    for i in 0..SERVICES {
        let headless = i % 3 == 0;
        let ns = format!("team-{}", i % 200);
        let name = format!("service-{i}");
        z.upsert_service(ServiceInfo {
            namespace: ns.clone(),
            name: name.clone(),
            kind: if headless {
                ServiceKind::Headless
            } else {
                ServiceKind::ClusterIp(vec![IpAddr::from([10, 96, (i >> 8) as u8, i as u8])])
            },
            ports: vec![Port {
                name: "http".into(),
                protocol: "tcp".into(),
                port: 80,
            }],
            publish_not_ready: false,
        });
        z.upsert_slice(SliceInfo {
            namespace: ns,
            name: format!("{name}-abcde"),
            service: name.clone(),
            ports: vec![Port {
                name: "http".into(),
                protocol: "tcp".into(),
                port: 8080,
            }],
            endpoints: (0..PER_SERVICE)
                .map(|e| {
                    let n = i * PER_SERVICE + e;
                    EndpointInfo {
                        addresses: vec![IpAddr::from([
                            10,
                            (n >> 16) as u8,
                            (n >> 8) as u8,
                            n as u8,
                        ])],
                        hostname: headless.then(|| format!("{name}-{e}")),
                        ready: true,
                        zone: Some(["zone-a", "zone-b", "zone-c"][(e % 3) as usize].into()),
                    }
                })
                .collect(),
        });
    }
    z
}

#[test]
fn ten_thousand_services_and_a_hundred_thousand_endpoints_fit() {
    let before = LIVE.load(Ordering::Relaxed);
    let zone = build();
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64;
    let (services, slices, endpoints) = zone.counts();
    assert_eq!((services, slices, endpoints), (10_000, 10_000, 100_000));
    let mib = bytes / (1 << 20) as f64;
    println!(
        "cluster zone: {services} services, {endpoints} endpoints: {mib:.1} MiB heap \
         ({:.0} bytes per endpoint, services and their slices included)",
        bytes / endpoints as f64
    );
    // Budget (README): under 64 MiB at this size.
    assert!(mib < 64.0, "{mib:.1} MiB");
    // And it answers.
    let name = hybridnet_dnslocal::wire::name_to_wire("service-3.team-3.svc.cluster.local");
    match zone.lookup(&name, TYPE_A) {
        Lookup::Answer(a, _) => assert_eq!(a.len(), 10),
        other => panic!("{other:?}"),
    }
    let snapshot = serde_json::to_vec(&zone.snapshot()).unwrap();
    println!(
        "snapshot: {:.1} MiB of JSON",
        snapshot.len() as f64 / (1 << 20) as f64
    );
    assert!(snapshot.len() < hybridnet_dnslocal::authority::SNAPSHOT_MAX_BYTES);
}
