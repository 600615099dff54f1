//! dnslocal's test peers: NSD serving test zones (the upstream and the cluster DNS), `dig` and glibc's
//! resolver as clients, a counting stand-in upstream, and a UDP load generator that counts lost queries.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{Netns, TestDir, wait_until};

pub mod guard;

/// dnslocal's listen address in the tests (NodeLocal DNSCache's).
pub const LISTEN: &str = "169.254.20.10";
/// Where NSD listens inside the test namespace.
pub const NSD_ADDR: &str = "127.0.0.11";

/// Panics (never skips) when a command the tests need is missing.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: install it (hack/test.sh does: apt-get install nsd bind9-dnsutils)"
        );
    }
}

/// The zones NSD serves. `generation` changes www.example.test's address (to tell fresh from stale).
pub fn zones(generation: u8) -> Vec<(&'static str, String)> {
    let txt = |c: char| format!("big IN TXT \"{}\"\n", c.to_string().repeat(200));
    vec![
        (
            "cluster.local",
            "$TTL 30\n@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 3600 600 86400 5\n\
             @ IN NS ns.cluster.local.\nns IN A 127.0.0.11\n\
             kubernetes.default.svc IN A 10.96.0.1\nkube-dns.kube-system.svc IN A 10.96.0.10\n"
                .to_owned(),
        ),
        (
            "example.test",
            format!(
                "$TTL 300\n@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\n\
                 @ IN NS ns.example.test.\nns IN A 127.0.0.11\n\
                 www IN A 192.0.2.{}\nwww IN AAAA 2001:db8::80\n{}",
                80 + generation,
                "abcdefgh".chars().map(txt).collect::<String>(),
            ),
        ),
        (
            "2.0.192.in-addr.arpa",
            "$TTL 30\n@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 3600 600 86400 5\n\
             @ IN NS ns.cluster.local.\n80 IN PTR www.example.test.\n"
                .to_owned(),
        ),
    ]
}

/// NSD, authoritative for [`zones`], in a namespace; killed on drop.
#[derive(Debug)]
pub struct Nsd {
    netns: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Zones served beside [`zones`].
    extra: Vec<(&'static str, String)>,
}

impl Nsd {
    pub fn start(netns: &Netns, dir: &TestDir, generation: u8) -> Nsd {
        Nsd::start_with(netns, dir, generation, Vec::new())
    }

    /// [`Nsd::start`] with `extra` zones (name, zone file text) beside [`zones`].
    pub fn start_with(
        netns: &Netns,
        dir: &TestDir,
        generation: u8,
        extra: Vec<(&'static str, String)>,
    ) -> Nsd {
        let mut nsd = Nsd {
            netns: netns.name().to_owned(),
            dir: dir.join("nsd"),
            child: None,
            extra,
        };
        nsd.restart(generation);
        nsd
    }

    /// (Re)starts NSD with the zones of `generation` and waits until it answers.
    pub fn restart(&mut self, generation: u8) {
        self.kill();
        std::fs::create_dir_all(&self.dir).expect("nsd dir");
        let d = self.dir.display();
        let mut conf = format!(
            "server:\n  ip-address: {NSD_ADDR}\n  port: 53\n  zonesdir: \"{d}\"\n  database: \"\"\n  \
             pidfile: \"{d}/nsd.pid\"\n  username: \"\"\n  chroot: \"\"\n  xfrdfile: \"{d}/xfrd.state\"\n  \
             zonelistfile: \"{d}/zone.list\"\n  server-count: 1\n  logfile: \"{d}/nsd.log\"\n\
             remote-control:\n  control-enable: no\n"
        );
        for (name, text) in zones(generation).into_iter().chain(self.extra.clone()) {
            std::fs::write(self.dir.join(format!("{name}.zone")), text).expect("zone file");
            conf.push_str(&format!("zone:\n  name: {name}\n  zonefile: {name}.zone\n"));
        }
        let conf_path = self.dir.join("nsd.conf");
        std::fs::write(&conf_path, conf).expect("nsd.conf");
        let log = File::create(self.dir.join("nsd.out")).expect("nsd.out");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nsd", "-d", "-c"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .process_group(0) // NSD forks: signal the whole group
            .spawn()
            .expect("cannot start nsd");
        self.child = Some(child);
        let ns = self.netns.clone();
        wait_until(Duration::from_secs(10), "nsd to answer", || {
            let d = dig_in(&ns, NSD_ADDR, &["www.example.test"]);
            if d.status == "NOERROR" {
                Ok(())
            } else {
                Err(d.text)
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGSTOP/SIGCONT: a hung upstream (queries go unanswered).
    pub fn pause(&self, paused: bool) {
        if let Some(c) = &self.child {
            let sig = if paused {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = killpg(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Kills NSD and its children; returns once they are gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = Pid::from_raw(c.id() as i32);
            let _ = killpg(group, Signal::SIGKILL);
            let _ = killpg(group, Signal::SIGCONT);
            let _ = c.wait();
            let _ = wait_until(Duration::from_secs(5), "nsd's children to exit", || {
                if killpg(group, None).is_err() {
                    Ok(())
                } else {
                    Err("alive")
                }
            });
        }
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What `dig` printed.
#[derive(Debug, Clone)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    /// Answer records, `name ttl class type data` with single spaces.
    pub answers: Vec<String>,
    pub text: String,
    pub elapsed: Duration,
}

impl Dig {
    pub fn ttls(&self) -> Vec<u32> {
        self.answers
            .iter()
            .filter_map(|a| a.split(' ').nth(1)?.parse().ok())
            .collect()
    }

    pub fn data(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter_map(|a| Some(a.splitn(5, ' ').nth(4)?.to_owned()))
            .collect()
    }
}

/// `dig @server ARGS` in namespace `netns` (one try, 3 s timeout).
pub fn dig_in(netns: &str, server: &str, args: &[&str]) -> Dig {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", &format!("@{server}")])
        .args([
            "+tries=1",
            "+time=3",
            "+noall",
            "+comments",
            "+answer",
            "+authority",
        ])
        .args(args)
        .output()
        .expect("cannot run dig");
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_owned();
    let flags = text
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.starts_with(";;") || line.is_empty() {
            in_answer = false;
        } else if in_answer && !line.starts_with(';') {
            answers.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    Dig {
        status,
        flags,
        answers,
        text,
        elapsed,
    }
}

/// A dnslocal config for one test (no per-client budget: the load tests send from one address).
pub fn write_config(
    dir: &TestDir,
    name: &str,
    admin: &str,
    upstreams: &[&str],
    max_ttl: &str,
) -> PathBuf {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\ndnslocal:\n  \
         listen: [\"{LISTEN}:53\"]\n  interface: {{name: dnslocal0, create: true}}\n  clusterDomain: cluster.local\n  \
         clusterDNS: [\"{NSD_ADDR}:53\"]\n  upstreams: [{ups}]\n  \
         cache: {{size: 10000, maxTTL: {max_ttl}, negativeTTL: 5s, serveStale: 1h, prefetch: true}}\n  admin: {admin}\n  \
         clientRate: 0\n",
        state = dir.join(format!("{name}-state")).display(),
        data = dir.join(format!("{name}-data")).display(),
        ups = list(upstreams),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Runs `f` on a new thread inside namespace `netns` (the thread keeps running).
pub fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let handle = File::open(format!("/run/netns/{netns}")).expect("open netns");
    std::thread::spawn(move || {
        setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A wire-format A query for `name` with `id`, RD set, no EDNS.
pub fn query_bytes(name: &str, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A UDP stand-in upstream that counts the queries it gets and answers each (A 192.0.2.1, TTL 60) after
/// `delay`, so that concurrent misses overlap.
#[derive(Debug)]
pub struct CountingUpstream {
    pub count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingUpstream {
    pub fn start(netns: &str, addr: SocketAddr, delay: Duration) -> CountingUpstream {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_in(netns, move || {
            let socket = UdpSocket::bind(addr).expect("bind stand-in");
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let Some(answer) = answer_a(&buf[..n]) else {
                    continue;
                };
                let socket = socket.try_clone().expect("clone");
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = socket.send_to(&answer, peer);
                });
            }
        });
        ready_rx.recv().expect("stand-in started");
        CountingUpstream {
            count,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers a query (header + one question, anything after ignored) with one A record.
fn answer_a(q: &[u8]) -> Option<Vec<u8>> {
    let mut off = 12;
    loop {
        let len = usize::from(*q.get(off)?);
        off += 1 + len;
        if len == 0 {
            break;
        }
    }
    let end = off + 4;
    let mut a = q.get(..end)?.to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    a[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    Some(a)
}

/// What a [`Load`] run saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
}

/// UDP clients in a namespace sending A queries for `names` to `server`, each waiting up to 2 s for
/// its answer (a query with no answer by then is lost).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(
        netns: &str,
        server: SocketAddr,
        names: Vec<String>,
        clients: usize,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let names = Arc::new(names);
        let threads = (0..clients)
            .map(|c| {
                let (stop, names) = (stop.clone(), names.clone());
                spawn_in(netns, move || {
                    let mut r = LoadReport::default();
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind client");
                    socket
                        .set_read_timeout(Some(Duration::from_millis(50)))
                        .expect("timeout");
                    let mut buf = [0u8; 1500];
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let id = (i & 0xFFFF) as u16;
                        let name = &names[i % names.len()];
                        i += 1;
                        r.sent += 1;
                        if socket.send_to(&query_bytes(name, id), server).is_err() {
                            r.lost += 1;
                            continue;
                        }
                        let deadline = Instant::now() + Duration::from_secs(2);
                        let answered = loop {
                            if Instant::now() >= deadline {
                                break false;
                            }
                            match socket.recv_from(&mut buf) {
                                Ok((n, _)) if n >= 2 && buf[..2] == id.to_be_bytes() => break true,
                                _ => {}
                            }
                        };
                        if answered {
                            r.answered += 1
                        } else {
                            r.lost += 1
                        }
                        std::thread::sleep(pause);
                    }
                    r
                })
            })
            .collect();
        Load { stop, threads }
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
            total.sent += r.sent;
            total.answered += r.answered;
            total.lost += r.lost;
        }
        total
    }
}

/// `/etc/netns/<ns>/resolv.conf` (what `ip netns exec` mounts over `/etc/resolv.conf`); removed on drop.
#[derive(Debug)]
pub struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    pub fn write(netns: &Netns, text: &str) -> NetnsResolvConf {
        let dir = PathBuf::from(format!("/etc/netns/{}", netns.name()));
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(dir.join("resolv.conf"), text).expect("resolv.conf");
        NetnsResolvConf { dir }
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
