//! The torn-write test: writers killed with SIGKILL mid-write, over and over, while a reader reads the record
//! continuously. The reader must never see a torn record, and after every kill the record must be the last complete
//! write.
//!
//! The writer is this test binary itself: run with [`CHILD_ENV`] set, its `torn_write_child` test writes 256 KiB
//! self-checking records as fast as it can and reports each completed write on stdout (`W <seq>`).

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hybridnet_state::StateDir;
use serde::{Deserialize, Serialize};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// Set in the child: the state directory to write to.
const CHILD_ENV: &str = "HYBRIDNET_STATE_TORN_WRITER_DIR";
const WRITER: &str = "torn";
const NAME: &str = "big";
const PAYLOAD_BYTES: usize = 64 * 1024;
/// How many writers are killed; `HYBRIDNET_STATE_TORN_KILLS` overrides it (for a longer soak).
const KILLS: usize = 220;

fn kills() -> usize {
    std::env::var("HYBRIDNET_STATE_TORN_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(KILLS)
}

/// A record that can tell whether it is whole: its blob is derived from `seq`, and `checksum` covers both.
#[derive(Serialize, Deserialize)]
struct Payload {
    seq: u64,
    len: usize,
    checksum: u64,
    blob: String,
}

impl Payload {
    fn new(seq: u64) -> Self {
        let blob = blob(seq);
        Payload {
            seq,
            len: blob.len(),
            checksum: checksum(seq, &blob),
            blob,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.blob.len() != self.len || self.len != PAYLOAD_BYTES {
            return Err(format!(
                "seq {}: blob of {} bytes, expected {}",
                self.seq,
                self.blob.len(),
                self.len
            ));
        }
        if checksum(self.seq, &self.blob) != self.checksum || self.blob != blob(self.seq) {
            return Err(format!("seq {}: checksum mismatch", self.seq));
        }
        Ok(())
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// 256 KiB derived from `seq`: a 64-byte block of it, repeated (cheap to make and check in a debug build).
fn blob(seq: u64) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz012345";
    let mut rng = Rng(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let block: String = (0..64)
        .map(|_| char::from(ALPHABET[(rng.next() & 31) as usize]))
        .collect();
    block.repeat(PAYLOAD_BYTES / block.len())
}

fn checksum(seq: u64, blob: &str) -> u64 {
    // FNV-1a over the seq and the blob, a word at a time.
    let words = blob
        .as_bytes()
        .chunks(8)
        .map(|c| c.iter().fold(0u64, |w, b| (w << 8) | u64::from(*b)));
    std::iter::once(seq)
        .chain(words)
        .fold(0xcbf2_9ce4_8422_2325, |h, w| {
            (h ^ w).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// The child: writes records until killed. Without [`CHILD_ENV`] (a normal test run) it does nothing.
#[test]
fn torn_write_child() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    let state = StateDir::new(dir);
    // StateDir resumes seq from the record on disk: the payload carries the seq its envelope will get.
    let mut seq = state
        .read_record::<serde::de::IgnoredAny>(WRITER, NAME)
        .map_or(0, |r| r.seq);
    let mut out = std::io::stdout().lock();
    loop {
        seq += 1;
        state.write(WRITER, NAME, &Payload::new(seq))?;
        writeln!(out, "W {seq}")?;
        out.flush()?;
    }
}

#[derive(Debug, Default)]
struct Reads {
    good: u64,
    missing: u64,
    max_seq: u64,
}

/// Reads until `stop`; any read that fails (other than before the first write) or is not whole is an error.
fn reader(state: StateDir, stop: Arc<AtomicBool>) -> Result<Reads, String> {
    let mut reads = Reads::default();
    while !stop.load(Ordering::Relaxed) {
        match state.read_record::<Payload>(WRITER, NAME) {
            Ok(record) => {
                record
                    .data
                    .check()
                    .map_err(|e| format!("torn record after {} good reads: {e}", reads.good))?;
                if record.seq != record.data.seq || record.seq < reads.max_seq {
                    return Err(format!(
                        "envelope seq {} with payload seq {}",
                        record.seq, record.data.seq
                    ));
                }
                reads.max_seq = record.seq;
                reads.good += 1;
            }
            Err(e) if e.is_not_found() && reads.good == 0 => reads.missing += 1,
            Err(e) => return Err(format!("read failed after {} good reads: {e}", reads.good)),
        }
    }
    Ok(reads)
}

/// A running writer child.
struct Writer {
    child: Child,
    /// Each completed write as the child reports it, with the time the report arrived.
    writes: mpsc::Receiver<(u64, Instant)>,
    /// Returns the last write the child reported.
    drain: thread::JoinHandle<Option<u64>>,
}

impl Writer {
    fn spawn(exe: &Path, dir: &Path) -> TestResult<Self> {
        let mut child = Command::new(exe)
            .args([
                "torn_write_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, dir)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, writes) = mpsc::channel();
        let drain = thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(seq) = line.strip_prefix("W ").and_then(|s| s.parse::<u64>().ok()) {
                    let _ = tx.send((seq, Instant::now()));
                    last = Some(seq);
                }
            }
            last
        });
        Ok(Writer {
            child,
            writes,
            drain,
        })
    }

    /// Waits for the child's next completed write.
    fn next_write(&self) -> TestResult<Instant> {
        let (_, at) = self
            .writes
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the writer child wrote nothing")?;
        Ok(at)
    }

    /// SIGKILLs the child and returns the last write it reported complete.
    fn kill(mut self) -> TestResult<u64> {
        self.child.kill()?; // SIGKILL
        let status = self.child.wait()?;
        let last = self.drain.join().map_err(|_| "stdout drain panicked")?;
        Ok(last.ok_or_else(|| format!("the writer child reported no write (exit {status})"))?)
    }
}

/// How long one write takes here (a debug build on a busy machine is slow): kills are spread over that.
fn write_period(exe: &Path, dir: &Path) -> TestResult<Duration> {
    let writer = Writer::spawn(exe, dir)?;
    let first = writer.next_write();
    let mut last = first.as_ref().ok().copied();
    for _ in 0..5 {
        last = writer.next_write().ok();
    }
    writer.kill()?;
    let (first, last) = (first?, last.ok_or("the writer child stopped writing")?);
    Ok(((last - first) / 5).clamp(Duration::from_micros(200), Duration::from_millis(50)))
}

/// When a cycle kills its writer, counted from the writer's first complete write.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// After this long.
    Delay(Duration),
    /// As soon as the next write's temp file shows up (within this long): right inside the write.
    TempFile(Duration),
}

/// One cycle: a writer child runs until its first complete write and a bit more, then is SIGKILLed. The
/// record must then be whole, and be the last complete write: the last one reported, or the one whose rename
/// landed just before the kill, before its report.
fn kill_one(exe: &Path, dir: &Path, state: &StateDir, at: KillAt) -> TestResult {
    let writer = Writer::spawn(exe, dir)?;
    let started = writer.next_write();
    if started.is_ok() {
        match at {
            KillAt::Delay(delay) => thread::sleep(delay),
            KillAt::TempFile(within) => {
                let deadline = Instant::now() + within;
                while temp_files(dir)? == 0 && Instant::now() < deadline {
                    thread::yield_now();
                }
            }
        }
    }
    let last = writer.kill()?;
    started?;
    let record = state.read_record::<Payload>(WRITER, NAME)?;
    record.data.check()?;
    if record.seq != last && record.seq != last + 1 {
        return Err(format!(
            "record seq {} after the last reported write {last}",
            record.seq
        )
        .into());
    }
    Ok(())
}

fn temp_files(dir: &Path) -> TestResult<usize> {
    let prefix = format!(".{NAME}.json.tmp.");
    let entries = std::fs::read_dir(dir.join(WRITER))?;
    Ok(entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count())
}

/// Where the record goes: the temp directory (a disk here, where fsync takes long enough for many kills to land
/// mid-write), or `HYBRIDNET_STATE_TORN_DIR` (e.g. a tmpfs such as `/dev/shm`, like `/run/hybridnet`).
fn scratch_dir() -> TestResult<tempfile::TempDir> {
    let base =
        std::env::var_os("HYBRIDNET_STATE_TORN_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    Ok(tempfile::Builder::new()
        .prefix("hybridnet-torn-")
        .tempdir_in(base)?)
}

#[test]
fn killed_writers_never_tear_a_record() -> TestResult {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Ok(());
    }
    let dir = scratch_dir()?;
    let state = StateDir::new(dir.path());
    let exe = std::env::current_exe()?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (state, stop) = (state.clone(), Arc::clone(&stop));
        thread::spawn(move || reader(state, stop))
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut outcome = write_period(&exe, dir.path()).map(|period| (period, 0));
    for cycle in 0..kills() {
        let Ok((period, killed_mid_write)) = outcome else {
            break;
        };
        // Kill at a random point of the write after the first complete one, or (every fourth cycle) as soon as
        // its temp file exists: on a tmpfs the file part of a write takes microseconds, and random kills would
        // seldom hit it.
        let at = match cycle % 4 {
            3 => KillAt::TempFile(2 * period),
            _ => KillAt::Delay(Duration::from_nanos(
                rng.next() % period.as_nanos().max(1) as u64,
            )),
        };
        outcome = kill_one(&exe, dir.path(), &state, at)
            .map_err(|e| format!("cycle {cycle}: {e}").into())
            .and_then(|()| Ok((period, killed_mid_write + temp_files(dir.path())?.min(1))));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().map_err(|_| "reader panicked")?;
    let elapsed = started.elapsed();
    let (period, killed_mid_write) = outcome?;
    let reads = reads?;
    let kills = kills();
    eprintln!(
        "torn-write: {kills} writers of {PAYLOAD_BYTES}-byte records killed ({killed_mid_write} mid-write, leaving a \
         temp file; one write takes {period:?}) in {elapsed:?}; {} good reads ({} before the first write), last seq {}",
        reads.good, reads.missing, reads.max_seq
    );
    assert!(
        reads.good >= kills as u64,
        "the reader read too little: {reads:?}"
    );
    assert!(
        killed_mid_write > 0,
        "no writer was killed mid-write: the test proves nothing"
    );

    // A new writer of the record cleans up what the killed ones left, and goes on from the last complete write.
    let last = state.read_record::<Payload>(WRITER, NAME)?;
    last.data.check()?;
    let writer = StateDir::new(dir.path());
    writer.write(WRITER, NAME, &Payload::new(last.seq + 1))?;
    assert_eq!(temp_files(dir.path())?, 0);
    let next = state.read_record::<Payload>(WRITER, NAME)?;
    next.data.check()?;
    assert_eq!(next.seq, last.seq + 1);
    Ok(())
}
