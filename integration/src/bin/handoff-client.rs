//! A minimal taker for apiprism's handoff socket, for the tests that run it as another user
//! (`integration/tests/apiprism_handoff_attack.rs`, under `setpriv --reuid`): connects, says hello, and
//! prints what happened on one line:
//!
//!     handoff-client SOCKET_PATH
//!
//! `connect-refused <error>` (the file system said no), `closed` (the giver hung up without a word),
//! `message <bytes>` (the giver started a handoff), `silent` (nothing within 8 s), `error <error>`.
use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: handoff-client SOCKET_PATH");
        return ExitCode::from(2);
    };
    #[allow(clippy::print_stdout)] // the one line the caller reads
    {
        println!("{}", attempt(&path));
    }
    ExitCode::SUCCESS
}

fn attempt(path: &str) -> String {
    let sock = match Socket::new(Domain::UNIX, Type::SEQPACKET, None) {
        Ok(s) => s,
        Err(e) => return format!("error {e}"),
    };
    let addr = match SockAddr::unix(path) {
        Ok(a) => a,
        Err(e) => return format!("error {e}"),
    };
    if let Err(e) = sock.connect(&addr) {
        return format!("connect-refused {e}");
    }
    if let Err(e) = sock
        .set_read_timeout(Some(Duration::from_secs(8)))
        .and_then(|()| sock.send(b"TAKE 1").map(drop))
    {
        return format!("closed ({e})");
    }
    let mut buf = [MaybeUninit::<u8>::uninit(); 256];
    match sock.recv(&mut buf) {
        Ok(0) => "closed".to_owned(),
        Ok(n) => format!("message {n}"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "silent".to_owned(),
        Err(e) => format!("closed ({e})"),
    }
}
