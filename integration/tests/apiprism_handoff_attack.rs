//! Root tests that attack apiprism's handoff socket (`<stateDir>/apiprism/handoff.sock`, crates/apiprism
//! README "Upgrades that cut nothing") the way a hostile local process or a careless operator would: garbage,
//! a huge message, descriptors that are not TCP sockets and too many of them, a hello and then silence, a
//! stranger (another UID), a stale socket file from a SIGKILLed instance, a symlink planted at the path.
//!
//! Each asserts that the running apiprism keeps serving (an established watch through it is not cut, new
//! connections succeed within a bound) and that the attack is refused (the giver hangs up without handing
//! anything, and logs it). One stand-in API server (TLS + HTTP/2, `hybridnet_integration::apiprism`: no real
//! kube-apiserver runs here) in one namespace, apiprism in another.
//!
//! Needs root and the binaries (`hack/test.sh`). Scenarios run one at a time; each takes under 20 s.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use hybridnet_integration::apiprism::lab::{ClientLog as Log, Load, Standin, beside, lock};
use hybridnet_integration::apiprism::{Pki, fetch_name};
use hybridnet_integration::{
    ConfigDoc, Daemon, DaemonKind, LabNet, TestDir, require_root, wait_until, write_atomic,
};
use nix::sys::signal::Signal;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use socket2::{Domain, SockAddr, Socket, Type};

const SOON: Duration = Duration::from_secs(10);
const API_PORT: u16 = 6443;
const LISTEN: &str = "127.0.0.1:7445";
/// The giver's bounds (crates/apiprism/src/handoff.rs): how long it waits for its relays to pause, and for
/// each step of the exchange.
const PAUSE_BOUND: Duration = Duration::from_secs(2);
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(2);
const REFUSED: &str = "handoff request refused";

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Lab {
    apiprism: Daemon,
    _standin: Standin,
    config: PathBuf,
    socket: PathBuf,
    pki: PathBuf,
    net: LabNet,
    dir: TestDir,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    fn new() -> Result<Lab> {
        require_root();
        let serial = serial();
        let dir = TestDir::new("apiprism-attack");
        let net = LabNet::new(2);
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        Pki::generate().write(&pki);
        let upstream = SocketAddr::new(net.nodes[0].ipv4.into(), API_PORT);
        let standin = Standin::start(
            &net.nodes[0].netns,
            env!("CARGO_BIN_EXE_apiprism-standin"),
            "api-1",
            upstream,
            &pki,
        )
        .context("starting apiprism-standin")?;
        let mut doc = ConfigDoc::new(dir.path());
        doc.apiprism_listen = vec![LISTEN.into()];
        doc.apiprism_endpoints = vec![upstream.to_string()];
        let config = dir.join("config.yaml");
        write_atomic(&config, doc.render());
        let socket = doc.state_dir.join("apiprism").join("handoff.sock");
        let apiprism = Daemon::start(DaemonKind::Apiprism, &net.nodes[1].netns, &config);
        let mut lab = Lab {
            apiprism,
            _standin: standin,
            config,
            socket,
            pki,
            net,
            dir,
            _serial: serial,
        };
        lab.apiprism.wait_ready(SOON)?;
        lab.wait_socket()?;
        Ok(lab)
    }

    fn wait_socket(&self) -> Result<()> {
        wait_until(
            SOON,
            "the handoff socket",
            || match std::fs::symlink_metadata(&self.socket) {
                Ok(m) if m.file_type().is_socket() => Ok(()),
                Ok(m) => Err(format!("{:?}", m.file_type())),
                Err(e) => Err(e.to_string()),
            },
        )?;
        Ok(())
    }

    fn refusals(&self) -> usize {
        self.apiprism.log().matches(REFUSED).count()
    }

    /// Runs a watch and a new connection every 100 ms in apiprism's namespace while `scenario` runs
    /// (once the watch streams).
    fn with_client<T>(
        &mut self,
        scenario: impl FnOnce(&mut Lab, &Mutex<Log>) -> Result<T>,
    ) -> Result<(T, Log)> {
        let tls = Pki::read(&self.pki)?.client_config()?;
        let netns = self.net.nodes[1].netns.name().to_owned();
        let load = Load {
            burst: 1,
            every: Duration::from_millis(100),
            timeout: Duration::from_secs(20),
        };
        let result = beside(&netns, LISTEN.parse()?, tls, load, |log| {
            wait_until(SOON, "the watch streaming", || {
                (!lock(log).connected.is_empty())
                    .then_some(())
                    .ok_or("not yet")
            })?;
            scenario(self, log)
        });
        if result.is_err() {
            eprintln!("--- apiprism log ---\n{}", self.apiprism.log());
        }
        result
    }
}

/// Nothing cut, no new connection failed, none took longer than `bound`, and new connections succeed after
/// `since`.
fn served_on(log: &Mutex<Log>, since: Instant, bound: Duration) -> Result<()> {
    wait_until(SOON, "new connections after the attack", || {
        let ok = lock(log)
            .requests
            .iter()
            .filter(|(start, _, r)| *start >= since && r.is_ok())
            .count();
        if ok >= 5 {
            Ok(())
        } else {
            Err(format!("{ok} so far"))
        }
    })?;
    let log = lock(log);
    ensure!(log.cut.is_empty(), "the watch was cut: {:?}", log.cut);
    let failed: Vec<_> = log.requests.iter().filter(|r| r.2.is_err()).collect();
    ensure!(
        failed.is_empty(),
        "{} of {} new connections failed: {failed:?}",
        failed.len(),
        log.requests.len()
    );
    let slowest = log
        .requests
        .iter()
        .map(|(start, end, _)| end.duration_since(*start))
        .max()
        .unwrap_or_default();
    ensure!(
        slowest <= bound,
        "a new connection took {slowest:?} (bound {bound:?})"
    );
    Ok(())
}

fn connect(path: &Path) -> Result<Socket> {
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    sock.connect(&SockAddr::unix(path)?)
        .with_context(|| format!("connecting to {}", path.display()))?;
    Ok(sock)
}

/// Sends one message with `fds` (`SCM_RIGHTS`).
fn send_with(sock: &Socket, payload: &[u8], fds: &[RawFd]) -> Result<()> {
    let iov = [std::io::IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// The giver hangs up on us without sending anything, within `within`.
fn hung_up(sock: &Socket, within: Duration) -> Result<()> {
    sock.set_read_timeout(Some(within))?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 256];
    match sock.recv(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!("the giver answered a refused request ({n} bytes)"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => anyhow::bail!("the giver did not hang up within {within:?}: {e}"),
    }
}

/// The inode behind a descriptor of ours, as `/proc/<pid>/fd` shows it (`pipe:[N]`, `socket:[N]`).
fn inode(fd: &impl AsRawFd) -> Result<u64> {
    Ok(std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.ino())
}

/// Whether process `pid` holds a descriptor for `inode`.
fn holds(pid: u32, inode: u64) -> Result<bool> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t.ends_with(&format!(":[{inode}]")) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Garbage, a huge message, a wrong version, a hello with a pipe, with six descriptors of the wrong kinds,
/// an empty message, a connection closed at once: each refused (the giver hangs up without handing anything
/// and logs it), none of our descriptors kept by apiprism, the watch not cut, no new connection failed or
/// waited; and a real hello after all that still starts a handoff (the socket is not wedged).
#[test]
fn garbage_on_the_handoff_socket_is_refused_and_cuts_nothing() -> Result<()> {
    let mut lab = Lab::new()?;
    let ((), log) = lab.with_client(|lab, log| {
        let since = Instant::now();
        let before = lab.refusals();
        let (pipe_r, pipe_w) = nix::unistd::pipe()?;
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let devnull = std::fs::File::open("/dev/null")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let huge = vec![b'A'; 64 * 1024];
        let many = [
            pipe_r.as_raw_fd(),
            pipe_w.as_raw_fd(),
            udp.as_raw_fd(),
            devnull.as_raw_fd(),
            listener.as_raw_fd(),
            listener.as_raw_fd(),
        ];
        let attacks: [(&str, &[u8], &[RawFd]); 7] = [
            ("garbage", b"GET / HTTP/1.1\r\n\r\n", &[]),
            ("huge", &huge, &[]),
            ("wrong version", b"TAKE 2", &[]),
            ("hello with a pipe", b"TAKE 1", &[pipe_r.as_raw_fd()]),
            ("hello with six descriptors", b"TAKE 1", &many),
            ("hello with a UDP socket", b"TAKE 1", &[udp.as_raw_fd()]),
            ("empty", b"", &[]),
        ];
        for (what, payload, fds) in attacks {
            let sock = connect(&lab.socket)?;
            send_with(&sock, payload, fds).with_context(|| what.to_owned())?;
            hung_up(&sock, SOON).with_context(|| what.to_owned())?;
        }
        drop(connect(&lab.socket)?); // connects and closes at once
        let attacks = 8;
        wait_until(SOON, "every attack refused and logged", || {
            let n = lab.refusals() - before;
            if n >= attacks {
                Ok(())
            } else {
                Err(format!("{n} of {attacks}"))
            }
        })?;
        let pid = lab.apiprism.pid();
        for (what, fd) in [
            ("pipe", inode(&pipe_r)?),
            ("UDP socket", inode(&udp)?),
            ("TCP listener", inode(&listener)?),
        ] {
            ensure!(!holds(pid, fd)?, "apiprism kept our {what}");
        }
        // Still a working handoff socket: a real hello gets the first message of a handoff; hanging up
        // then leaves the giver serving on (as `a_handoff_abandoned_half_way_cuts_nothing`).
        let taker = connect(&lab.socket)?;
        taker.set_read_timeout(Some(SOON))?;
        taker.send(b"TAKE 1")?;
        let mut first = [MaybeUninit::<u8>::uninit(); 128];
        ensure!(taker.recv(&mut first)? > 0, "no handoff after the attacks");
        drop(taker);
        wait_until(SOON, "apiprism serving on", || {
            lab.apiprism
                .log()
                .contains("handoff failed: serving on")
                .then_some(())
                .ok_or("not yet")
        })?;
        served_on(log, since, PAUSE_BOUND + SLACK)
    })?;
    ensure!(log.cut.is_empty(), "the watch was cut: {:?}", log.cut);
    Ok(())
}

/// A connection that says nothing holds the giver's control loop (not its data path) for one step: new
/// connections are served meanwhile without delay, and the giver hangs up after the step timeout. A hello
/// and then silence (a taker that never reads or confirms) makes the giver pause and then give up: new
/// connections wait in the backlog for at most the pause bound and one step, none fails, the watch is not
/// cut, and it serves on after.
#[test]
fn silence_on_the_handoff_socket_delays_only_boundedly() -> Result<()> {
    let mut lab = Lab::new()?;
    let ((), log) = lab.with_client(|lab, log| {
        let start = Instant::now();
        let before = lab.refusals();
        let mute = connect(&lab.socket)?;
        hung_up(&mute, STEP_TIMEOUT + SLACK)?;
        let hung = start.elapsed();
        ensure!(
            start.elapsed() >= STEP_TIMEOUT - Duration::from_millis(500),
            "hung up on a mute connection after {:?}, before its step timeout",
            start.elapsed()
        );
        wait_until(SOON, "the mute connection refused and logged", || {
            (lab.refusals() > before).then_some(()).ok_or("not yet")
        })?;
        // The data path did not wait for the control loop.
        served_on(log, start, SLACK)?;

        let since = Instant::now();
        let silent = connect(&lab.socket)?;
        silent.send(b"TAKE 1")?;
        wait_until(
            PAUSE_BOUND + STEP_TIMEOUT + SOON,
            "apiprism serving on",
            || {
                lab.apiprism
                    .log()
                    .contains("handoff failed: serving on")
                    .then_some(())
                    .ok_or("not yet")
            },
        )?;
        let gave_up = since.elapsed();
        ensure!(
            gave_up <= PAUSE_BOUND + STEP_TIMEOUT + SLACK,
            "the giver waited {gave_up:?} for a silent taker"
        );
        drop(silent);
        served_on(log, since, PAUSE_BOUND + STEP_TIMEOUT + SLACK)?;
        let slowest = lock(log)
            .requests
            .iter()
            .map(|(start, end, _)| end.duration_since(*start))
            .max();
        eprintln!(
            "apiprism handoff attack: a mute connection hung up after {hung:?}; a silent taker given up \
             after {gave_up:?}; slowest new connection {slowest:?}"
        );
        Ok(())
    })?;
    ensure!(log.cut.is_empty(), "the watch was cut: {:?}", log.cut);
    Ok(())
}

/// A process of another UID is refused: by the file system (the socket is not writable for others), and,
/// with the socket opened up (mode 0777, as a careless operator might), by the peer credentials check
/// (`SO_PEERCRED`): the giver hangs up without handing anything and logs the stranger's UID.
#[test]
fn a_stranger_is_refused() -> Result<()> {
    let lab = Lab::new()?;
    // The client binary where UID 65534 may run it (the build tree may not be reachable).
    let client = lab.dir.join("handoff-client");
    std::fs::copy(env!("CARGO_BIN_EXE_handoff-client"), &client)?;
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755))?;
    for dir in lab.socket.ancestors().skip(1) {
        if dir == Path::new("/") || dir == std::env::temp_dir() {
            break;
        }
        let mode = std::fs::metadata(dir)?.permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    }
    let as_stranger = || -> Result<String> {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&client)
            .arg(&lab.socket)
            .stdin(Stdio::null())
            .output()
            .context("running setpriv (util-linux)")?;
        ensure!(out.status.success(), "handoff-client: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let mode = std::fs::metadata(&lab.socket)?.permissions().mode();
    if mode & 0o002 == 0 {
        let said = as_stranger()?;
        ensure!(
            said.starts_with("connect-refused"),
            "a stranger connected to a socket of mode {mode:o}: {said}"
        );
    }
    std::fs::set_permissions(&lab.socket, std::fs::Permissions::from_mode(0o777))?;
    let said = as_stranger()?;
    ensure!(
        said.starts_with("closed"),
        "a stranger was answered: {said}"
    );
    wait_until(SOON, "the stranger refused and logged", || {
        lab.apiprism
            .log()
            .contains("UID 65534")
            .then_some(())
            .ok_or("not yet")
    })?;
    ensure!(
        !lab.apiprism.log().contains("handoff failed"),
        "a stranger's request went as far as a handoff"
    );
    Ok(())
}

/// A SIGKILLed instance leaves its socket file behind: a fresh start over it works (nobody listens there,
/// so nothing to take over) and binds a new socket. A symlink planted at the socket path: a fresh start
/// replaces the link, never writes through it (the file it points to is untouched).
#[test]
fn a_stale_socket_or_a_planted_symlink_does_not_stop_a_start() -> Result<()> {
    let mut lab = Lab::new()?;
    let tls = Pki::read(&lab.pki)?.client_config()?;
    let kill = |lab: &mut Lab| -> Result<()> {
        lab.apiprism.signal(Signal::SIGKILL)?;
        lab.apiprism.wait_exit(SOON)?;
        Ok(())
    };
    let start = |lab: &mut Lab| -> Result<()> {
        lab.apiprism = Daemon::start(DaemonKind::Apiprism, &lab.net.nodes[1].netns, &lab.config);
        lab.apiprism.wait_ready(SOON)?;
        lab.wait_socket()?;
        Ok(())
    };
    let serves = |lab: &Lab| -> Result<String> {
        let tls = Arc::clone(&tls);
        let addr: SocketAddr = LISTEN.parse()?;
        let name = lab.net.nodes[1].netns.enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(fetch_name(addr, &tls, SOON))
                .map_err(anyhow::Error::msg)
        })??;
        Ok(name)
    };

    kill(&mut lab)?;
    ensure!(
        std::fs::symlink_metadata(&lab.socket)?
            .file_type()
            .is_socket(),
        "a SIGKILLed instance leaves its socket file"
    );
    start(&mut lab)?;
    ensure!(
        !lab.apiprism.log().contains("could not take over"),
        "a stale socket taken for a running instance"
    );
    ensure!(serves(&lab)? == "api-1", "not serving after a stale socket");

    kill(&mut lab)?;
    let victim = lab.dir.join("victim");
    std::fs::write(&victim, b"precious")?;
    std::fs::remove_file(&lab.socket)?;
    std::os::unix::fs::symlink(&victim, &lab.socket)?;
    start(&mut lab)?;
    ensure!(
        std::fs::read(&victim)? == b"precious",
        "the file behind the planted symlink changed"
    );
    ensure!(
        std::fs::symlink_metadata(&lab.socket)?
            .file_type()
            .is_socket(),
        "the symlink was not replaced by a socket"
    );
    ensure!(serves(&lab)? == "api-1", "not serving after a symlink");
    Ok(())
}
