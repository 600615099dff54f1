//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hybridnet_config::{Config, Error};

/// The Talos fixtures, at `/work/shared/fixtures/talos` seen from this crate. Fails (never skips)
/// when the directory is missing.
pub fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/talos");
    assert!(
        dir.is_dir(),
        "Talos fixtures not found at {}: the shared/ directory must sit beside the repository",
        dir.display()
    );
    dir
}

pub fn fixture_files(sub: &str) -> Vec<PathBuf> {
    let dir = fixtures().join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn load(text: &str) -> Result<Config, Error> {
    hybridnet_config::load_str(text, Path::new("config.yaml"))
}

pub fn ok(text: &str) -> Config {
    load(text).unwrap_or_else(|e| panic!("expected the config to load, got:\n{e}"))
}

pub fn err(text: &str) -> Error {
    match load(text) {
        Ok(c) => panic!("expected an error, got a config: {c:#?}"),
        Err(e) => e,
    }
}
