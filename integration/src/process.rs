//! Running a command to completion with a deadline (CLI tests: a config loader that hangs must fail the
//! test, not hang it).

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::wait::patience;

/// What a command did: its exit status (`None` if it was killed at the deadline), output, and run time.
#[derive(Debug)]
pub struct TimedOutput {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl TimedOutput {
    /// The exit code, `None` when killed by a signal or at the deadline.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// A one-paragraph description for assertion messages.
    pub fn describe(&self) -> String {
        let status = match self.status {
            None => "killed at the deadline".to_owned(),
            Some(s) => s.to_string(),
        };
        format!(
            "{status} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (stdin null, stdout/stderr captured) and waits at most `timeout` (times [`patience`]);
/// kills it at the deadline. Panics if the command cannot be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> TimedOutput {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = start + patience(timeout);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill(); // it may have exited just now
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    let elapsed = start.elapsed();
    TimedOutput {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
        elapsed,
    }
}

type Reader = Option<std::thread::JoinHandle<String>>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Reader {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes); // a partial read is still worth showing
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

fn collect(reader: Reader) -> String {
    reader.and_then(|r| r.join().ok()).unwrap_or_default()
}
