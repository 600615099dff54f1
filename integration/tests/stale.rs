//! The stale-binary check (`hybridnet_integration::stale`), no root: a binary older than an edit fails the
//! root tests, a fresh `git clone` run against binaries built before the clone does not.

use std::path::Path;
use std::process::Command;

use hybridnet_integration::TestDir;
use hybridnet_integration::stale::stale_reason;

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .output()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A repository whose only commit is from 2020, and a "binary" built in 2021.
fn repo(dir: &TestDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("crates/x/src")).unwrap_or_else(|e| panic!("{e}"));
    sh(
        &ws,
        "git init -q . && echo 'fn main() {}' > crates/x/src/main.rs && echo '# lock' > Cargo.lock && \
         git add -A && GIT_COMMITTER_DATE='2020-01-01T00:00:00Z' git commit -q -m one \
         --date '2020-01-01T00:00:00Z'",
    );
    let bin = dir.path().join("meshd");
    std::fs::write(&bin, "binary").unwrap_or_else(|e| panic!("{e}"));
    sh(dir.path(), "touch -d '2021-01-01T00:00:00Z' meshd");
    (ws, bin)
}

#[test]
fn a_fresh_clone_is_not_stale_an_edit_or_a_later_commit_is() {
    let dir = TestDir::new("stale");
    let (ws, bin) = repo(&dir);
    // the working files carry the time of the checkout (now), after the build, but their content is the 2020
    // commit's: not stale
    assert_eq!(stale_reason(&bin, &ws), None);
    // a clone: the same
    sh(dir.path(), "git clone -q ws clone");
    assert_eq!(stale_reason(&bin, &dir.path().join("clone")), None);

    // an edit after the build
    sh(&ws, "echo '// edit' >> crates/x/src/main.rs");
    let why = stale_reason(&bin, &ws).expect("an edited source must make it stale");
    assert!(
        why.contains("crates/x/src/main.rs is changed against git HEAD"),
        "{why}"
    );
    // committed after the build: still stale
    sh(&ws, "git commit -q -am two");
    let why = stale_reason(&bin, &ws).expect("a later commit must make it stale");
    assert!(
        why.contains("changed the sources after it was built"),
        "{why}"
    );
    // rebuilt: fresh
    sh(dir.path(), "touch meshd");
    assert_eq!(stale_reason(&bin, &ws), None);
    // a new, untracked source file after the build
    sh(&ws, "sleep 1; echo 'mod y;' > crates/x/src/y.rs");
    assert!(stale_reason(&bin, &ws).is_some());
}

#[test]
fn without_git_the_modification_times_decide() {
    let dir = TestDir::new("stale-nogit");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("crates/x/src")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(ws.join("crates/x/src/main.rs"), "fn main() {}")
        .unwrap_or_else(|e| panic!("{e}"));
    let bin = dir.path().join("meshd");
    std::fs::write(&bin, "binary").unwrap_or_else(|e| panic!("{e}"));
    sh(dir.path(), "touch -d '2021-01-01T00:00:00Z' meshd");
    let why = stale_reason(&bin, &ws).expect("stale");
    assert!(why.contains("main.rs was modified after it"), "{why}");
    sh(dir.path(), "touch meshd");
    assert_eq!(stale_reason(&bin, &ws), None);
}

#[test]
fn only_the_files_cargo_built_the_binary_from_count() {
    let dir = TestDir::new("stale-depinfo");
    let (ws, bin) = repo(&dir);
    // cargo's dep-info beside the binary: it was built from main.rs only
    let main = ws.join("crates/x/src/main.rs");
    std::fs::write(
        bin.with_extension("d"),
        format!("{}: {}\n", bin.display(), main.display()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // a test-only file edited after the build: a rebuild would not touch the binary, so it must not count
    sh(
        &ws,
        "echo '#[test] fn t() {}' > crates/x/src/tests.rs && echo '# v2' > Cargo.lock",
    );
    assert_eq!(stale_reason(&bin, &ws), None);
    // the file it was built from
    sh(&ws, "echo '// edit' >> crates/x/src/main.rs");
    let why = stale_reason(&bin, &ws).expect("stale");
    assert!(why.contains("crates/x/src/main.rs"), "{why}");
}
