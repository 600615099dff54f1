//! Stages the extension tree from the sources in `extension/` (what `hack/build-image.sh` packs):
//!
//! ```text
//! manifest.yaml                                          extension/manifest.yaml, @VERSION@ filled in (0644)
//! rootfs/usr/local/etc/containers/<service>.yaml         extension/<service>.yaml (0644)
//! rootfs/usr/local/lib/containers/<service>/<entrypoint> the binary named like the entrypoint's file (0755)
//! rootfs/usr/local/lib/containers/<service>/<--config>   extension/defaults/<service>.yaml, if present (0644)
//! ```
//! Every directory is 0755. The tree holds nothing else, so the same inputs give the same tree.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{CONTAINERS_DIR, SPEC_DIR, ServiceSpec};

/// The manifest version of this build: `v` + the workspace version.
pub const MANIFEST_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

/// The token in `extension/manifest.yaml` replaced by the version.
pub const VERSION_TOKEN: &str = "@VERSION@";

/// Stages the tree into `out` (created; must not exist or be empty). `binary(name)` gives the file to install
/// for the entrypoint whose file name is `name` (e.g. `meshd`). Returns the service names.
pub fn stage(
    extension_dir: &Path,
    version: &str,
    binary: &dyn Fn(&str) -> Result<PathBuf, String>,
    out: &Path,
) -> Result<Vec<String>, String> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| format!("{}: {e}", out.display()))?
            .next()
            .is_some()
    {
        return Err(format!("{} is not empty", out.display()));
    }
    let template = read(&extension_dir.join("manifest.yaml"))?;
    if !template.contains(VERSION_TOKEN) {
        return Err(format!(
            "{}: no {VERSION_TOKEN} token",
            extension_dir.join("manifest.yaml").display()
        ));
    }
    write(
        &out.join("manifest.yaml"),
        template.replace(VERSION_TOKEN, version).as_bytes(),
        0o644,
    )?;
    let mut specs: Vec<PathBuf> = std::fs::read_dir(extension_dir)
        .map_err(|e| format!("{}: {e}", extension_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "manifest.yaml")
        })
        .collect();
    specs.sort();
    if specs.is_empty() {
        return Err(format!("no service specs in {}", extension_dir.display()));
    }
    let rootfs = out.join("rootfs");
    let mut names = Vec::new();
    for path in specs {
        let text = read(&path)?;
        let spec = ServiceSpec::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write(&rootfs.join(SPEC_DIR).join(&file), text.as_bytes(), 0o644)?;
        let croot = rootfs.join(CONTAINERS_DIR).join(&spec.name);
        let entry = spec
            .entrypoint
            .trim_start_matches("./")
            .trim_start_matches('/');
        let bin_name = Path::new(entry)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                format!(
                    "{}: entrypoint {:?} names no file",
                    path.display(),
                    spec.entrypoint
                )
            })?;
        let bin = binary(&bin_name)?;
        let bytes = std::fs::read(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
        write(&croot.join(entry), &bytes, 0o755)?;
        let defaults = extension_dir
            .join("defaults")
            .join(format!("{}.yaml", spec.name));
        if defaults.is_file() {
            let Some(config) = spec.config_arg() else {
                return Err(format!(
                    "{} exists but {} passes no --config",
                    defaults.display(),
                    path.display()
                ));
            };
            write(
                &croot.join(config.trim_start_matches('/')),
                read(&defaults)?.as_bytes(),
                0o644,
            )?;
        }
        names.push(spec.name);
    }
    fix_dirs(out)?;
    Ok(names)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn fix_dirs(dir: &Path) -> Result<(), String> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        if e.file_type().map_err(|e| e.to_string())?.is_dir() {
            fix_dirs(&e.path())?;
        }
    }
    Ok(())
}
