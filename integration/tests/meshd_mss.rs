//! meshd's TCP MSS clamping for forwarded traffic, in network namespaces (userspace backend).
//!
//! Two nodes, each with a "pod" namespace behind it (veth, MTU 1500, pod CIDR 10.244.<i>.0/24 in the other
//! node's `allowedIPs`, forwarding on). The nodes drop the ICMP "fragmentation needed" they would send (a
//! path-MTU black hole, as on many clouds), so a TCP connection between pods only works when its MSS fits
//! the mesh MTU (1420). Needs root and `nft`; fails (never skips) without them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hybridnet_integration::meshd::MeshLab;
use hybridnet_integration::{Daemon, Netns, wait_until};
use nix::sys::signal::Signal;

/// The mesh MTU (meshd's default).
const MESH_MTU: u32 = 1420;
/// The bulk transfer.
const BULK: usize = 4 << 20;

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

/// A pod namespace behind `node`: veth `vpod` (node, 10.244.i.1/24) — `eth0` (pod, 10.244.i.2/24,
/// default route via the node), MTU 1500; forwarding on in the node.
fn add_pod(node: &Netns, i: u8) -> Netns {
    let pod = Netns::new();
    node.ip(&[
        "link",
        "add",
        "vpod",
        "mtu",
        "1500",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    node.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", "vpod"]);
    node.ip(&["link", "set", "vpod", "up"]);
    pod.ip(&["link", "set", "eth0", "mtu", "1500"]);
    pod.ip(&["addr", "add", &format!("{}/24", pod_ip(i)), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")]);
    sh(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The PMTU black hole: the node never tells a pod that its packet was too big for the mesh.
    nft(
        node,
        "add table inet lab\n\
         add chain inet lab out { type filter hook output priority 0; }\n\
         add rule inet lab out icmp type destination-unreachable icmp code frag-needed drop\n",
    );
    pod
}

fn sh(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec(args);
    assert!(
        out.status.success(),
        "{args:?} in {} failed: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an nft script in `ns` (`nft -f -`).
fn nft(ns: &Netns, script: &str) {
    use std::process::Stdio;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft (install nftables): {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("nft stdin: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("nft: {e}"));
    assert!(
        out.status.success(),
        "nft -f failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// meshd's table as `nft list table` shows it, or None when it is not there.
fn our_table(ns: &Netns) -> Option<String> {
    let out = ns.exec(&["nft", "list", "table", "inet", "hybridnet-meshd"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What one connection from pod `client` to pod `server` saw: the MSS (`TCP_MAXSEG`) on the accepting
/// and the connecting socket, and how long `bytes` took from server to client, or why they did not
/// arrive (reads time out after `patience`).
#[derive(Debug)]
struct Conn {
    server_mss: u32,
    client_mss: u32,
    transfer: Result<Duration, String>,
}

fn connect(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    port: u16,
    bytes: usize,
    patience: Duration,
) -> Conn {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let accepted = scope.spawn(move || {
            server.enter(move || -> Result<u32, String> {
                let l = TcpListener::bind((server_ip, port)).map_err(|e| e.to_string())?;
                let _ = tx.send(());
                let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
                let mss = socket2::SockRef::from(&s)
                    .tcp_mss()
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(patience + Duration::from_secs(1)))
                    .map_err(|e| e.to_string())?;
                let chunk = vec![0x5au8; 64 << 10];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    // A stalled transfer is the client's to report.
                    if s.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                Ok(mss)
            })
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("server did not listen: {e}"));
        let (client_mss, transfer) = client
            .enter(|| -> Result<(u32, Result<Duration, String>), String> {
                let addr = SocketAddr::from((server_ip, port));
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let mss = socket2::SockRef::from(&s)
                    .tcp_mss()
                    .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(patience))
                    .map_err(|e| e.to_string())?;
                let start = Instant::now();
                let mut got = 0;
                let mut buf = vec![0u8; 64 << 10];
                while got < bytes {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            return Ok((mss, Err(format!("closed after {got} of {bytes} bytes"))));
                        }
                        Ok(n) => got += n,
                        Err(e) => {
                            return Ok((
                                mss,
                                Err(format!("read after {got} of {bytes} bytes: {e}")),
                            ));
                        }
                    }
                }
                Ok((mss, Ok(start.elapsed())))
            })
            .unwrap_or_else(|e| panic!("enter: {e}"))
            .unwrap_or_else(|e| panic!("client: {e}"));
        let server_mss = accepted
            .join()
            .unwrap_or_else(|_| panic!("server panicked"))
            .unwrap_or_else(|e| panic!("enter: {e}"))
            .unwrap_or_else(|e| panic!("server: {e}"));
        Conn {
            server_mss,
            client_mss,
            transfer,
        }
    })
}

#[test]
fn pod_traffic_over_the_mesh_gets_a_clamped_mss() {
    let mut lab = MeshLab::new(2, "meshd-mss");
    let pods: Vec<Netns> = lab
        .nodes
        .iter()
        .map(|n| add_pod(&n.netns, n.index))
        .collect();
    for node in &mut lab.nodes {
        node.routed = vec![format!("10.244.{}.0/24", node.index)];
    }
    let mut daemons = lab.start_all();
    for node in &lab.nodes {
        wait_until(Duration::from_secs(10), "the mesh up", || node.all_up(1))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The rule, as nft shows it, on both nodes.
    for node in &lab.nodes {
        let table = wait_until(Duration::from_secs(5), "meshd's nft table", || {
            our_table(&node.netns).ok_or("no table")
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            table.contains("hook postrouting priority mangle")
                && table.contains(
                    "oifname \"hybridnet0\" tcp flags syn tcp option maxseg size set rt mtu"
                ),
            "{table}"
        );
    }
    wait_until(
        Duration::from_secs(5),
        "pod-to-pod ping over the mesh",
        || {
            let out = pods[0].exec(&["ping", "-c1", "-W1", &pod_ip(2).to_string()]);
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // pod1 -> pod2: both ends see an MSS that fits the mesh; 4 MB cross the PMTU black hole.
    let c = connect(
        &pods[1],
        pod_ip(2),
        &pods[0],
        7100,
        BULK,
        Duration::from_secs(10),
    );
    let took = *c
        .transfer
        .as_ref()
        .unwrap_or_else(|e| panic!("bulk transfer over the mesh: {e}"));
    eprintln!(
        "clamped: server MSS {}, client MSS {}, {} MB in {took:?}",
        c.server_mss,
        c.client_mss,
        BULK >> 20
    );
    assert!(c.server_mss <= MESH_MTU - 40, "{c:?}");
    assert!(c.client_mss <= MESH_MTU - 40, "{c:?}");
    assert!(took < Duration::from_secs(20), "{c:?}");

    // Control: without the tables, the pods' own MSS (1460, less 12 for timestamps) goes through and
    // full-size segments die in the black hole: the lab does need the clamp. The connection must start
    // and end while both tables are gone (meshd restores them every 10 s).
    let mut unclamped = None;
    for attempt in 0..3 {
        for node in &lab.nodes {
            sh(
                &node.netns,
                &["nft", "delete", "table", "inet", "hybridnet-meshd"],
            );
        }
        let c = connect(
            &pods[1],
            pod_ip(2),
            &pods[0],
            7101 + attempt,
            256 << 10,
            Duration::from_secs(2),
        );
        if lab.nodes.iter().all(|n| our_table(&n.netns).is_none()) {
            unclamped = Some(c);
            break;
        }
    }
    let c = unclamped.unwrap_or_else(|| panic!("meshd restored its table too fast three times"));
    eprintln!(
        "without the table: server MSS {}, transfer: {:?}",
        c.server_mss, c.transfer
    );
    assert!(c.server_mss > MESH_MTU - 40, "{c:?}");
    assert!(
        c.transfer.is_err(),
        "unclamped, the black hole must stall: {c:?}"
    );

    // The deleted table comes back within the 10 s resync, and clamps again.
    let start = Instant::now();
    for node in &lab.nodes {
        wait_until(
            Duration::from_secs(12),
            "meshd to restore its table",
            || our_table(&node.netns).ok_or("not yet"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!("table restored {:?} after the delete", start.elapsed());
    let c = connect(
        &pods[1],
        pod_ip(2),
        &pods[0],
        7110,
        1 << 20,
        Duration::from_secs(10),
    );
    assert!(c.server_mss <= MESH_MTU - 40 && c.transfer.is_ok(), "{c:?}");

    // SIGKILL leaves the table; a restart adopts it and replaces what is not meshd's (an extra rule).
    daemons[1]
        .signal(Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = daemons[1].wait_exit(Duration::from_secs(5));
    let node2 = &lab.nodes[1].netns;
    assert!(our_table(node2).is_some(), "the table outlives SIGKILL");
    sh(
        node2,
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "hybridnet-meshd",
            "postrouting",
            "counter",
        ],
    );
    daemons[1] = lab.start(1);
    wait_until(
        Duration::from_secs(10),
        "the restarted meshd to replace the table",
        || match our_table(node2) {
            Some(t) if !t.contains("counter") && t.contains("maxseg size set rt mtu") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // A clean stop removes it.
    daemons[1]
        .signal(Signal::SIGTERM)
        .unwrap_or_else(|e| panic!("{e}"));
    daemons[1]
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    let ruleset = sh(node2, &["nft", "list", "ruleset"]);
    assert!(
        !ruleset.contains("hybridnet-meshd"),
        "table left behind: {ruleset}"
    );
    assert!(
        ruleset.contains("table inet lab"),
        "only meshd's table goes: {ruleset}"
    );

    // `clampMSS: false`: meshd removes a table left behind and writes none.
    sh(node2, &["nft", "add", "table", "inet", "hybridnet-meshd"]);
    drop(daemons.pop());
    lab.nodes[1].extra = "  clampMSS: false\n".into();
    lab.write_config(1);
    daemons.push(lab.start(1));
    let node2 = &lab.nodes[1].netns;
    // The status of this process, not the one the killed process left behind.
    let pid = daemons.last().map(Daemon::pid);
    wait_until(Duration::from_secs(10), "meshd up without clamping", || {
        lab.nodes[1].all_up_in(1, pid)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_until(Duration::from_secs(5), "the stale table removed", || {
        our_table(node2).map_or(Ok(()), Err)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let status = lab.nodes[1].details().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["mssClamp"]["enabled"], false, "{status}");
}
