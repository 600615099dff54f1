//! A file watcher set up while the process is out of descriptors polls (every 5 s by default), and must be back
//! on inotify within a fraction of a second of the pressure ending, not at the next poll: a config change
//! made right after a flood of connections is applied at once.
//!
//! This test lowers its own process's open-file limit, so it is alone in its own test binary (a process of
//! its own under both `cargo test` and nextest).

use std::fs::File;
use std::time::{Duration, Instant};

use hybridnet_state::FileWatcher;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

#[test]
fn watcher_returns_to_inotify_soon_after_descriptor_exhaustion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).expect("setrlimit");
    // Use up every descriptor.
    let mut spare = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        spare.push(f);
    }
    assert!(!spare.is_empty());
    let took = rt.block_on(async {
        let mut watcher = FileWatcher::new(&path);
        assert!(
            !watcher.uses_inotify(),
            "inotify was set up without descriptors"
        );
        let writer_path = path.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(spare);
            std::fs::write(writer_path, "changed\n").expect("write");
            Instant::now()
        });
        tokio::time::timeout(Duration::from_secs(10), watcher.changed())
            .await
            .expect("no change seen within 10 s");
        let written = writer.join().expect("writer");
        assert!(
            watcher.uses_inotify(),
            "still polling after the pressure ended"
        );
        written.elapsed()
    });
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restoring the limit");
    assert!(
        took < Duration::from_secs(2),
        "the change was seen {took:?} after it was made (the poll interval is 5 s)"
    );
}
