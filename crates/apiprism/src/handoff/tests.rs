use super::*;

#[test]
fn parses_the_three_messages_and_refuses_the_rest() {
    let addr: SocketAddr = "192.0.2.1:6443".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parse(b"L 192.0.2.1:6443", 1).ok(),
        Some(Message::Listener(addr))
    );
    assert_eq!(
        parse(b"C 192.0.2.1:6443", 2).ok(),
        Some(Message::Pair(addr))
    );
    assert_eq!(
        parse(b"END 2 7", 0).ok(),
        Some(Message::End {
            listeners: 2,
            pairs: 7
        })
    );
    for (bad, fds) in [
        (&b"L 192.0.2.1:6443"[..], 0), // no descriptor
        (b"L 192.0.2.1:6443", 2),      // one too many
        (b"C 192.0.2.1:6443", 1),      // half a pair
        (b"C nowhere", 2),             // not an address
        (b"END 1", 0),                 // a count missing
        (b"END 1 2 3", 0),             // trailing words
        (b"END -1 2", 0),              // not a count
        (b"X 1", 0),                   // unknown
        (b"", 0),                      // empty
        (b"L \xff\xfe", 1),            // not UTF-8
        (b"END 1 2", 1),               // END carries nothing
    ] {
        assert!(
            parse(bad, fds).is_err(),
            "{:?} with {fds}",
            String::from_utf8_lossy(bad)
        );
    }
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apiprism-handoff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("apiprism").join(SOCKET)
}

/// A taker with nobody listening starts afresh; a stale socket file (its instance gone) too.
#[test]
fn nobody_to_take_over_from() {
    let path = temp_path("nobody");
    assert!(matches!(take(&path, 10), Ok(None)));
    std::fs::create_dir_all(path.parent().unwrap_or(&path)).unwrap_or_else(|e| panic!("{e}"));
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
    drop(stale); // the file stays, nobody listens
    assert!(matches!(take(&path, 10), Ok(None)));
}

/// The whole exchange over the real socket: a listener and a connected pair go over, the giver gets `DONE`,
/// and the pair received still carries bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_and_a_pair_go_over_and_still_work() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let path = temp_path("exchange");
    let giver = GiverSocket::bind(&path)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let laddr = listener.local_addr()?;
    let mut client = std::net::TcpStream::connect(laddr)?;
    let (served, _) = listener.accept()?;
    let taker = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || take(&path, 10))
    };
    let conn = giver.accept().await;
    let conn = tokio::task::spawn_blocking(move || hello(&conn).map(|()| conn)).await??;
    let raw_l = [(laddr, listener.as_raw_fd())];
    let raw_p = [(laddr, served.as_raw_fd(), served.as_raw_fd())];
    let given = tokio::task::spawn_blocking(move || give(&conn, &raw_l, &raw_p)).await?;
    given?;
    let taken = taker
        .await??
        .ok_or_else(|| anyhow::anyhow!("nothing taken"))?;
    assert_eq!(taken.listeners.len(), 1);
    assert_eq!(taken.pairs.len(), 1);
    drop(served);
    drop(listener);
    // The taken descriptors are the same sockets: the pair still talks, the listener still accepts.
    let mut ours = std::net::TcpStream::from(
        taken
            .pairs
            .into_iter()
            .next()
            .map(|p| p.1)
            .unwrap_or_else(|| unreachable!()),
    );
    client.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    ours.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    let l = std::net::TcpListener::from(
        taken
            .listeners
            .into_iter()
            .next()
            .map(|l| l.1)
            .unwrap_or_else(|| unreachable!()),
    );
    let _second = std::net::TcpStream::connect(laddr)?;
    l.accept()?;
    drop(giver);
    assert!(!path.exists(), "the giver removes its socket file");
    Ok(())
}

/// A giver whose handoff backlog is full (stopped, or flooded by connections that never say hello): the
/// taker's connect gives up after the step timeout and starts afresh, rather than waiting forever with
/// nothing bound.
#[test]
fn a_full_backlog_does_not_hold_a_taker_forever() -> anyhow::Result<()> {
    let path = temp_path("backlog");
    std::fs::create_dir_all(path.parent().unwrap_or(&path))?;
    let giver = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    giver.bind(&SockAddr::unix(&path)?)?;
    giver.listen(0)?;
    // Fill the backlog: connections nobody accepts, until one would wait.
    let mut flood = Vec::new();
    loop {
        let c = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
        c.set_nonblocking(true)?;
        match c.connect(&SockAddr::unix(&path)?) {
            Ok(()) => flood.push(c),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(flood.len() < 64, "the backlog never filled");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    let taker = {
        let path = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(take(&path, 10).map(|t| t.is_some()));
        })
    };
    let bound = STEP_TIMEOUT + Duration::from_secs(3);
    let taken = rx
        .recv_timeout(bound)
        .map_err(|_| anyhow::anyhow!("the taker still waits after {bound:?}"))?;
    assert!(
        taken.is_err(),
        "a giver that never answers is no handoff: {taken:?}"
    );
    assert!(start.elapsed() >= STEP_TIMEOUT / 2, "gave up too early");
    taker
        .join()
        .map_err(|_| anyhow::anyhow!("taker panicked"))?;
    drop(flood);
    Ok(())
}

/// A taker that says hello and then reads one message at a time, slowly (each within the step timeout):
/// the giver, whose relays are paused meanwhile, gives up at its deadline rather than after every message.
#[test]
fn a_slow_reader_cannot_hold_the_giver_past_its_deadline() -> anyhow::Result<()> {
    let (giver, taker) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
    giver.set_send_buffer_size(0)?; // the kernel's minimum: a few messages in flight
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let laddr = listener.local_addr()?;
    let listeners = vec![(laddr, listener.as_raw_fd()); 5_000];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut read = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if taker
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
                if recv(taker.as_raw_fd()).is_ok() {
                    read += 1;
                }
            }
            read
        })
    };
    let deadline = Duration::from_secs(1);
    let start = Instant::now();
    let given = give_within(&giver, &listeners, &[], start + deadline);
    let took = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    assert!(given.is_err(), "a handoff past its deadline failed");
    assert!(
        took >= deadline * 9 / 10 && took < deadline * 3,
        "gave up after {took:?}, deadline {deadline:?} ({read} messages read)"
    );
    assert!(read < listeners.len(), "the reader was slow");
    Ok(())
}

/// How many of our descriptors refer to the same open socket as `fd` (its inode in `/proc/self/fd`).
fn copies_of(fd: &impl AsRawFd) -> usize {
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
    let want = ino(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())));
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| want.is_some() && ino(&e.path()) == want)
                .count()
        })
        .unwrap_or_default()
}

/// A hello that carries more descriptors than any message should (here the most one message can): refused,
/// and every descriptor received with it closed again (none left in our table), every time.
#[test]
fn descriptors_with_a_refused_message_are_closed() -> anyhow::Result<()> {
    let (giver, taker) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for n in [1, 2, 5, SCM_MAX_FD] {
        let fds = vec![udp.as_raw_fd(); n];
        send(taker.as_raw_fd(), HELLO, &fds)?;
        let got = recv(giver.as_raw_fd());
        if let Ok((_, fds)) = &got {
            assert_eq!(fds.len(), n, "every descriptor seen");
        }
        drop(got);
        assert_eq!(copies_of(&udp), 1, "{n} descriptors: some left open");
    }
    Ok(())
}

/// A hostile giver (a same-UID process listening at the socket path) hands the taker what is not a TCP
/// socket, or too many descriptors: the taker refuses (and so starts afresh), keeping none of them.
#[test]
fn a_taker_refuses_what_is_not_a_tcp_socket() -> anyhow::Result<()> {
    let path = temp_path("hostile");
    std::fs::create_dir_all(path.parent().unwrap_or(&path))?;
    let listening = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    listening.bind(&SockAddr::unix(&path)?)?;
    listening.listen(4)?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let (pipe_r, _pipe_w) = nix::unistd::pipe()?;
    let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let cases: Vec<(&str, &[u8], Vec<RawFd>)> = vec![
        ("a UDP socket", b"L 127.0.0.1:1", vec![udp.as_raw_fd()]),
        ("a pipe", b"L 127.0.0.1:1", vec![pipe_r.as_raw_fd()]),
        (
            "listening sockets for a pair",
            b"C 127.0.0.1:1",
            vec![tcp_listener.as_raw_fd(); 2],
        ),
        ("too many", b"L 127.0.0.1:1", vec![udp.as_raw_fd(); 40]),
    ];
    for (what, payload, fds) in cases {
        let giver = std::thread::scope(|s| -> anyhow::Result<_> {
            let giver = s.spawn(|| -> anyhow::Result<Socket> {
                let (conn, _) = listening.accept()?;
                let (hello, _) = recv(conn.as_raw_fd())?;
                anyhow::ensure!(hello == HELLO, "no hello");
                send(conn.as_raw_fd(), payload, &fds)?;
                Ok(conn)
            });
            let taken = take(&path, 10);
            assert!(taken.is_err(), "{what}: taken {taken:?}");
            giver
                .join()
                .map_err(|_| anyhow::anyhow!("giver panicked"))?
        })?;
        drop(giver);
        assert_eq!(copies_of(&udp), 1, "{what}: a UDP socket kept");
        assert_eq!(copies_of(&tcp_listener), 1, "{what}: a listener kept");
        assert_eq!(copies_of(&pipe_r), 2, "{what}: a pipe end kept"); // both ends: one inode
    }
    Ok(())
}

/// A giver that retires drops its socket while its taker binds the next one at the same path: whatever the
/// interleaving, the taker's socket stays (CI once saw the retiring giver check the file, find its own, and
/// then remove the taker's, which had replaced it in between: the next upgrade found no socket). Without the
/// directory lock this failed in 2 of 3 runs of 20,000 rounds (at rounds 128 and 9,360).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retiring_giver_never_removes_its_takers_socket() -> anyhow::Result<()> {
    let path = temp_path("retire-race");
    for round in 0..5000 {
        let old = GiverSocket::bind(&path)?;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let dropper = std::thread::spawn({
            let barrier = std::sync::Arc::clone(&barrier);
            move || {
                barrier.wait();
                drop(old);
            }
        });
        barrier.wait();
        let new = GiverSocket::bind(&path)?;
        dropper
            .join()
            .map_err(|_| anyhow::anyhow!("the dropping thread panicked"))?;
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| anyhow::anyhow!("round {round}: the taker's socket file is gone: {e}"))?;
        anyhow::ensure!(
            (meta.dev(), meta.ino()) == new.inode,
            "round {round}: the socket file is not the taker's"
        );
    }
    Ok(())
}
