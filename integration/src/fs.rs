//! Scratch directories, atomic writes, and the shared Talos fixtures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A scratch directory `$TMPDIR/hn-it-<pid>-<n>-<label>`, removed on drop, kept (and its path printed) when
/// the test fails, for the daemons' logs and state.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hn-it-{}-{n}-{label}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/<rel>`, with its parent directories created.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        let path = self.path.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: kept {} for inspection", self.path.display());
        } else if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {error}", self.path.display());
        }
    }
}

/// Replaces `path` atomically (temp file in the same directory, fsync, rename), as Talos and careful
/// editors do, so a daemon never sees a half-written version. Panics on failure.
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(contents.as_ref())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = result {
        panic!("cannot write {}: {error}", path.display());
    }
}

/// The shared Talos fixtures (`machine-config/`, `documents/`, `extension-trees/`):
/// `$HYBRIDNET_TALOS_FIXTURES`, else `<workspace>/../shared/fixtures/talos`. Panics if missing.
pub fn talos_fixtures() -> PathBuf {
    let dir = std::env::var_os("HYBRIDNET_TALOS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/talos")
        });
    if !dir.join("machine-config").is_dir() || !dir.join("documents").is_dir() {
        panic!(
            "the Talos fixtures are missing: expected machine-config/ and documents/ in {}. They live beside \
             the workspace in shared/fixtures/talos (CI has them there); or set HYBRIDNET_TALOS_FIXTURES.",
            dir.display()
        );
    }
    dir
}
