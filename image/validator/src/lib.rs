//! hybridnet-extension-validator: checks a Talos system extension tree (a directory holding `manifest.yaml` and
//! `rootfs/`) the way Talos and siderolabs/extensions-validator do, offline, and stages ours from `extension/`.
//!
//! What [`validate`] checks, in extensions-validator's order and with Talos's messages
//! (`reference/extension.md` sections 1 and 2; `talos:pkg/machinery/extensions/{load,validate}.go`,
//! `services/services.go`, `extensions-validator:cmd/extensions-validator/cmd/validate.go`):
//! 1. **Load**: only `manifest.yaml` and `rootfs` at the top (`unexpected file "a"`), manifest `version` exactly
//!    `v1alpha1` (`unsupported manifest version: ""`), `extension manifest is missing`, `extension rootfs is missing`.
//! 2. With [`Options::pkg_name`]: `pkg name does not match extension name: X != Y`.
//! 3. With [`Options::check_version_format`]: `metadata.version` matches one of extensions-validator's formats.
//! 4. Every `rootfs/usr/local/etc/containers/*.yaml` is a valid service spec (name pattern, restart kind,
//!    entrypoint, one key per dependency, absolute dependency paths, network statuses), and its container
//!    rootfs `rootfs/usr/local/lib/containers/<name>/` exists (the service name must equal that directory, or
//!    the service fails at start with `FSCONFIG_SET_BINARY failed`).
//! 5. `compatibility.talos.version` is satisfied by [`Options::talos_version`].
//! 6. Contents: no world-writable entry (Talos tests `fs.DirEntry.Type().Perm()`, which holds no permission
//!    bits, so Talos's own check never fires; we check the real mode), only directories, regular files and
//!    symlinks, and every non-directory under one of [`ALLOWED_PATHS`] (on a path-component boundary: Talos's
//!    plain prefix test would also let `/usr/localfoo` through).
//! 7. With [`Options::strict`] (our own image): no unknown keys in the manifest or the specs (Talos ignores
//!    misspellings silently), spec file name = service name, no duplicate names, the entrypoint an executable
//!    regular file in the container rootfs, absolute mount destinations, no `configuration: true` dependency
//!    (it blocks boot when the document is missing: DESIGN.md section 3), a `service: cri` dependency for a
//!    service that mounts something from `/var`, and author and description set. And four mount sources that
//!    Talos accepts but that break on a node: a relative source (machined's `os.MkdirAll` fails on its
//!    read-only `/`), a plain `bind` of a directory Talos fills with nested mounts ([`NESTED_MOUNT_DIRS`]:
//!    `/etc/ssl/certs` shows the empty placeholder CA bundle), a file that appears only after boot
//!    ([`LATE_FILES`]: machined makes it a directory), and a directory Talos removes and recreates
//!    ([`RECREATED_DIRS`]).

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub mod esc;
pub mod semver;
mod spec;
pub mod stage;
mod yamlv;

pub use semver::{Range, Version};
pub use spec::{Dependency, Mount, NETWORK_STATUSES, RESTART_KINDS, ServiceSpec, valid_name};

/// Where Talos looks for service specs, inside `rootfs/`.
pub const SPEC_DIR: &str = "usr/local/etc/containers";
/// Where each service's container rootfs lives, inside `rootfs/` (`<CONTAINERS_DIR>/<name>/`).
pub const CONTAINERS_DIR: &str = "usr/local/lib/containers";
/// The Talos version checked against `compatibility.talos.version` unless told otherwise (the latest stable
/// release in `reference/extension.md`).
pub const DEFAULT_TALOS_VERSION: &str = "1.13.9";

/// `AllowedPaths` (`talos:pkg/machinery/extensions/extensions.go`, main as of 2026-08).
pub const ALLOWED_PATHS: &[&str] = &[
    "/etc/cri/conf.d",
    "/usr/lib/firmware",
    "/usr/lib/modules",
    "/usr/lib/ld-linux-x86-64.so.2",
    "/usr/lib/ld-linux-aarch64.so.1",
    "/usr/bin/ldconfig",
    "/etc/ld.so.conf",
    "/etc/ld.so.cache",
    "/usr/bin/nvidia-modprobe",
    "/usr/bin/nvidia-pcc",
    "/usr/bin/nvidia-smi",
    "/usr/bin/nvidia-ctk",
    "/usr/bin/nvidia-cdi-hook",
    "/usr/bin/nvme",
    "/usr/lib/udev/rules.d",
    "/usr/local",
    "/usr/share/glvnd",
    "/usr/share/egl",
    "/etc/vulkan",
];

/// What to check beyond Talos's own `Load` + `Validate(WithValidateConstraints, WithValidateContents)`.
#[derive(Debug, Clone)]
pub struct Options {
    /// extensions-validator's `--pkg-name`: the manifest name must equal it.
    pub pkg_name: Option<String>,
    /// extensions-validator's version-format check.
    pub check_version_format: bool,
    /// The Talos version the compatibility range is checked against.
    pub talos_version: Version,
    /// Our own stricter rules (see the crate docs, point 7).
    pub strict: bool,
}

impl Options {
    /// Exactly Talos's checks (plus the service specs and their container directories), as Talos's own
    /// extension tests run them on its fixtures.
    pub fn talos(talos_version: Version) -> Options {
        Options {
            pkg_name: None,
            check_version_format: false,
            talos_version,
            strict: false,
        }
    }

    /// What `extensions-validator validate --rootfs DIR --pkg-name NAME` checks.
    pub fn extensions_validator(pkg_name: Option<&str>) -> Options {
        Options {
            pkg_name: pkg_name.map(str::to_string),
            check_version_format: true,
            ..Options::talos(default_talos_version())
        }
    }

    /// Everything, strict: what our own image must pass.
    pub fn hybridnet() -> Options {
        Options {
            strict: true,
            ..Options::extensions_validator(Some("hybridnet"))
        }
    }
}

/// [`DEFAULT_TALOS_VERSION`], parsed.
pub fn default_talos_version() -> Version {
    Version::parse(DEFAULT_TALOS_VERSION).unwrap_or(Version {
        major: 1,
        minor: 13,
        patch: 9,
        pre: Vec::new(),
    })
}

/// Why a tree is not a valid extension. `Display` words it as extensions-validator does; [`Error::message`] is
/// the inner message (Talos's own words, which the tests compare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Reading the tree failed.
    Io(String),
    /// Talos `Load`: top-level entries, manifest presence and version, YAML.
    Load(String),
    /// `--pkg-name` differs from `metadata.name`.
    PkgName { expected: String, found: String },
    /// `metadata.version` matches none of extensions-validator's formats.
    VersionFormat { version: String, name: String },
    /// A service spec failed to parse or validate (every problem in it).
    ServiceSpec { file: String, errors: Vec<String> },
    /// `compatibility.talos.version` is malformed or not satisfied.
    Constraint(String),
    /// Talos `validateContents`: world-writable, special file or path not allowed.
    Contents(String),
    /// Our strict rules.
    Strict(Vec<String>),
}

impl Error {
    /// The inner message(s), without extensions-validator's prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Io(m) | Error::Load(m) | Error::Constraint(m) | Error::Contents(m) => m.clone(),
            Error::PkgName { expected, found } => {
                format!("pkg name does not match extension name: {expected} != {found}")
            }
            Error::VersionFormat { version, name } => {
                format!("invalid version format {version} for extension: {name}")
            }
            Error::ServiceSpec { errors, .. } | Error::Strict(errors) => errors.join("; "),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Load(m) => write!(f, "error loading extension: {m}"),
            Error::ServiceSpec { file, errors } => {
                write!(f, "error validating service spec file {file}: ")?;
                if errors.len() == 1 {
                    write!(f, "{}", errors[0])
                } else {
                    write!(f, "{} errors occurred: {}", errors.len(), errors.join("; "))
                }
            }
            Error::Strict(errors) => write!(f, "hybridnet rules: {}", errors.join("; ")),
            other => write!(f, "{}", other.message()),
        }
    }
}

impl std::error::Error for Error {}

/// The manifest's fields (`talos:pkg/machinery/extensions/metadata.go`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub name: String,
    pub metadata_version: String,
    pub author: String,
    pub description: String,
    pub talos_constraint: String,
    unknown_keys: Vec<String>,
}

impl Manifest {
    /// Parses `manifest.yaml` as Talos's decoder does (unknown keys ignored, recorded for strict mode).
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let doc = yamlv::parse(text)?;
        let top = yamlv::Obj::new(&doc, "manifest")?;
        let md = top.obj("metadata")?;
        let compat = md.obj("compatibility")?;
        let talos = compat.obj("talos")?;
        let mut unknown = top.unknown_keys(&["version", "metadata"]);
        unknown.extend(md.unknown_keys(&[
            "name",
            "version",
            "author",
            "description",
            "compatibility",
            "extraInfo",
        ]));
        unknown.extend(compat.unknown_keys(&["talos"]));
        unknown.extend(talos.unknown_keys(&["version"]));
        md.str("extraInfo")?;
        Ok(Manifest {
            version: top.str("version")?,
            name: md.str("name")?,
            metadata_version: md.str("version")?,
            author: md.str("author")?,
            description: md.str("description")?,
            talos_constraint: talos.str("version")?,
            unknown_keys: unknown,
        })
    }
}

/// What a valid tree holds.
#[derive(Debug, Clone)]
pub struct Report {
    pub manifest: Manifest,
    /// The service specs, by file name (sorted).
    pub services: Vec<(String, ServiceSpec)>,
    /// Regular files and symlinks under `rootfs/`.
    pub files: usize,
}

/// Talos `Load`: the top level of the tree and the manifest.
pub fn load(dir: &Path) -> Result<(Manifest, PathBuf), Error> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::Io(format!("open {}: {e}", dir.display())))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| Error::Io(format!("read {}: {e}", dir.display())))
        })
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut manifest = None;
    let mut rootfs = None;
    for name in names {
        match name.as_str() {
            "manifest.yaml" => {
                let path = dir.join(&name);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::Load(format!("read {}: {e}", path.display())))?;
                let m = Manifest::parse(&text).map_err(Error::Load)?;
                if m.version != "v1alpha1" {
                    return Err(Error::Load(format!(
                        "unsupported manifest version: {:?}",
                        m.version
                    )));
                }
                manifest = Some(m);
            }
            "rootfs" => rootfs = Some(dir.join(name)),
            other => return Err(Error::Load(format!("unexpected file {other:?}"))),
        }
    }
    let Some(manifest) = manifest else {
        return Err(Error::Load("extension manifest is missing".to_string()));
    };
    let Some(rootfs) = rootfs else {
        return Err(Error::Load("extension rootfs is missing".to_string()));
    };
    Ok((manifest, rootfs))
}

/// extensions-validator's version formats: semver, a date, `X.Y.Z-vA.B.C[-N-gSHA[-dirty]]`,
/// `<hex>-vA.B.C[-N-gSHA[-dirty]]`, or a partial `vX.Y`.
pub fn valid_version_format(version: &str) -> bool {
    const PRE: &str = r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?";
    const GIT: &str = r"(-([0-9]+)-g([0-9a-f]+)(-dirty)?)?";
    let patterns = [
        format!(r"^v?([0-9]+\.[0-9]+\.[0-9]+{PRE})$"),
        r"^[0-9]{8}(\.[0-9])?$".to_string(),
        format!(r"^([0-9]+\.[0-9]+\.[0-9]+)-v([0-9]+\.[0-9]+\.[0-9]+{PRE}){GIT}$"),
        format!(r"^([0-9a-f]+)-v([0-9]+\.[0-9]+\.[0-9]+{PRE}){GIT}$"),
        r"^v?([0-9]+\.[0-9]+)$".to_string(),
    ];
    patterns.iter().any(|p| {
        regex::Regex::new(p)
            .map(|re| re.is_match(version))
            .unwrap_or(false)
    })
}

/// Validates the extension tree in `dir` (holding `manifest.yaml` and `rootfs/`).
pub fn validate(dir: &Path, opts: &Options) -> Result<Report, Error> {
    let (manifest, rootfs) = load(dir)?;
    if let Some(pkg) = &opts.pkg_name
        && *pkg != manifest.name
    {
        return Err(Error::PkgName {
            expected: pkg.clone(),
            found: manifest.name.clone(),
        });
    }
    if opts.check_version_format && !valid_version_format(&manifest.metadata_version) {
        return Err(Error::VersionFormat {
            version: manifest.metadata_version.clone(),
            name: manifest.name.clone(),
        });
    }
    let services = service_specs(&rootfs)?;
    check_constraint(&manifest.talos_constraint, &opts.talos_version)?;
    let files = check_contents(&rootfs)?;
    if opts.strict {
        strict(&manifest, &rootfs, &services)?;
    }
    Ok(Report {
        manifest,
        services,
        files,
    })
}

fn service_specs(rootfs: &Path) -> Result<Vec<(String, ServiceSpec)>, Error> {
    let dir = rootfs.join(SPEC_DIR);
    let mut files: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::Io(format!("read {}: {e}", dir.display()))),
    };
    files.sort();
    let mut specs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(dir.join(&file))
            .map_err(|e| Error::Io(format!("read {file}: {e}")))?;
        let spec = ServiceSpec::parse(&text).map_err(|e| Error::ServiceSpec {
            file: file.clone(),
            errors: vec![format!("error unmarshalling: {e}")],
        })?;
        let mut errors = spec.validate();
        if valid_name(&spec.name) && !rootfs.join(CONTAINERS_DIR).join(&spec.name).is_dir() {
            errors.push(format!(
                "container rootfs /{CONTAINERS_DIR}/{} is missing (the service name must equal its container directory)",
                spec.name
            ));
        }
        if !errors.is_empty() {
            return Err(Error::ServiceSpec { file, errors });
        }
        specs.push((file, spec));
    }
    Ok(specs)
}

fn check_constraint(constraint: &str, talos: &Version) -> Result<(), Error> {
    if constraint.is_empty() {
        return Ok(());
    }
    let range = Range::parse(&semver::trim_v(constraint))
        .map_err(|e| Error::Constraint(format!("error parsing Talos version constraint: {e}")))?;
    if !range.matches(&talos.core()) {
        return Err(Error::Constraint(format!(
            "version constraint {constraint} can't be satisfied with Talos version {talos}"
        )));
    }
    Ok(())
}

/// Talos `validateContents`, walking in lexical order as Go's `filepath.WalkDir` does; the number of files.
fn check_contents(rootfs: &Path) -> Result<usize, Error> {
    fn walk(root: &Path, path: &Path, files: &mut usize) -> Result<(), Error> {
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| Error::Io(format!("lstat {}: {e}", path.display())))?;
        let rel = path.strip_prefix(root).unwrap_or(path);
        let item = format!("/{}", rel.to_string_lossy());
        let item = if item == "/" {
            item
        } else {
            item.trim_end_matches('/').to_string()
        };
        // a symlink's own mode is always 0777 on Linux and means nothing
        if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o002 != 0 {
            return Err(Error::Contents(format!(
                "world-writeable files are not allowed: {item:?}"
            )));
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| Error::Io(format!("read {}: {e}", path.display())))?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &path.join(n), files)?;
            }
            return Ok(());
        }
        if !ft.is_file() && !ft.is_symlink() {
            return Err(Error::Contents(format!(
                "special files are not allowed: {item:?}"
            )));
        }
        if !allowed_path(&item) {
            return Err(Error::Contents(format!(
                "path {item:?} is not allowed in extensions"
            )));
        }
        *files += 1;
        Ok(())
    }
    let mut files = 0;
    walk(rootfs, rootfs, &mut files)?;
    Ok(files)
}

/// Under one of [`ALLOWED_PATHS`], on a component boundary.
pub fn allowed_path(path: &str) -> bool {
    ALLOWED_PATHS.iter().any(|a| {
        path == *a
            || path
                .strip_prefix(a)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

fn strict(
    manifest: &Manifest,
    rootfs: &Path,
    services: &[(String, ServiceSpec)],
) -> Result<(), Error> {
    let mut errors: Vec<String> = manifest
        .unknown_keys
        .iter()
        .map(|k| format!("manifest.yaml: {k}"))
        .collect();
    if manifest.author.trim().is_empty() {
        errors.push("manifest.yaml: metadata.author is empty".to_string());
    }
    if manifest.description.trim().is_empty() {
        errors.push("manifest.yaml: metadata.description is empty".to_string());
    }
    let mut names = BTreeSet::new();
    for (file, spec) in services {
        let e = |m: String| format!("{file}: {m}");
        errors.extend(spec.unknown_keys.iter().map(|k| e(k.clone())));
        if file.strip_suffix(".yaml") != Some(spec.name.as_str()) {
            errors.push(e(format!(
                "the file name must be the service name ({}.yaml)",
                spec.name
            )));
        }
        if !names.insert(spec.name.clone()) {
            errors.push(e(format!(
                "service {:?} is defined twice (Talos skips the second)",
                spec.name
            )));
        }
        let croot = rootfs.join(CONTAINERS_DIR).join(&spec.name);
        let entry = croot.join(
            spec.entrypoint
                .trim_start_matches("./")
                .trim_start_matches('/'),
        );
        match std::fs::metadata(&entry) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => errors.push(e(format!(
                "entrypoint {} is not an executable file in the container rootfs",
                spec.entrypoint
            ))),
            Err(err) => errors.push(e(format!(
                "entrypoint {} is missing from /{CONTAINERS_DIR}/{}: {err}",
                spec.entrypoint, spec.name
            ))),
        }
        for m in &spec.mounts {
            if !m.destination.starts_with('/') {
                errors.push(e(format!(
                    "mount destination {:?} is not absolute",
                    m.destination
                )));
            }
            errors.extend(mount_source_problem(m).map(e));
        }
        if spec.depends.iter().any(|d| d.configuration) {
            errors.push(e(
                "`configuration: true` blocks boot while the ExtensionServiceConfig is missing; the daemons run on defaults and watch their file instead".to_string(),
            ));
        }
        let uses_var = spec
            .mounts
            .iter()
            .any(|m| m.source == "/var" || m.source.starts_with("/var/"));
        if uses_var && !spec.depends.iter().any(|d| d.service == "cri") {
            errors.push(e(
                "mounts from /var need a `service: cri` dependency (/var is mounted late)"
                    .to_string(),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Strict(errors))
    }
}

/// Host directories Talos fills with mounts of its own after boot, whose content a container only sees through
/// a recursive bind (`rbind`): `/etc/ssl/certs/ca-certificates.crt` is an empty file in the image (Talos's
/// `Dockerfile`: `touch .../ssl/certs/ca-certificates.crt`) with the real bundle bind-mounted over it
/// (`internal/app/machined/pkg/controllers/files/etcfile.go`, `createBindMountFile`), and so are the other
/// files under `/etc` that controller manages (`resolv.conf`, `hosts`, `machine-id`, ...).
pub const NESTED_MOUNT_DIRS: &[&str] = &["/etc", "/etc/ssl", "/etc/ssl/certs"];

/// Host files that appear only after boot (written by the kubelet once it has bootstrapped, or by Talos later):
/// machined creates a missing mount source as a directory
/// (`internal/app/machined/pkg/system/services/extension.go`, `Runner`: `os.MkdirAll(mount.Source, 0o700)`),
/// which then stands where the file should be written. Mount their directory instead.
pub const LATE_FILES: &[&str] = &[
    "/etc/kubernetes/kubeconfig-kubelet",
    "/etc/kubernetes/bootstrap-kubeconfig",
    "/var/lib/kubelet/pki/kubelet-client-current.pem",
    "/var/lib/kubelet/pki/kubelet.crt",
    "/var/lib/kubelet/pki/kubelet.key",
];

/// Host directories Talos removes and creates again (`/var/lib/kubelet/pki` on a CA change:
/// `internal/app/machined/pkg/controllers/k8s/kubelet_service.go`, `refreshKubeletCerts`: `os.RemoveAll`): a bind
/// of the directory keeps showing the removed one. Mount the parent.
pub const RECREATED_DIRS: &[&str] = &["/var/lib/kubelet/pki"];

/// What is wrong with a mount's `source` on a real Talos node, if anything (strict mode).
fn mount_source_problem(m: &Mount) -> Option<String> {
    let source = m.source.trim_end_matches('/');
    let source = if source.is_empty() { "/" } else { source };
    if !m.source.starts_with('/') {
        // every mount, whatever its type: a tmpfs's `source: tmpfs` too
        return Some(format!(
            "mount source {:?} is not absolute: machined runs os.MkdirAll(source) for every mount before it \
             starts the service, relative to its working directory `/`, which is read-only, so the service never \
             starts (for a tmpfs, use an absolute host directory as a bind mount, or no mount at all)",
            m.source
        ));
    }
    let is_bind = m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
    let recursive = m.options.iter().any(|o| o == "rbind");
    if is_bind && !recursive && NESTED_MOUNT_DIRS.contains(&source) {
        return Some(format!(
            "mount source {source} is bound without `rbind`: Talos bind-mounts the real files over empty \
             placeholders in it (the CA bundle /etc/ssl/certs/ca-certificates.crt among them), which only a \
             recursive bind carries into the container (options: [rbind, ro])"
        ));
    }
    if LATE_FILES.contains(&source) {
        return Some(format!(
            "mount source {source} is a file that appears only after boot: while it is missing, machined creates \
             a directory in its place (os.MkdirAll), in the way of the file; mount its directory"
        ));
    }
    if RECREATED_DIRS.contains(&source) {
        return Some(format!(
            "mount source {source} is removed and created again by Talos (on a CA change): the container would \
             keep the removed directory; mount its parent"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_formats() {
        for ok in [
            "v0.1.0",
            "0.1.0",
            "v1.2.3-rc.1",
            "20210914",
            "20210914.1",
            "535.129.03-v1.8.0-alpha.0-10-g336fa0f-dirty",
            "535.129.03-v1.8.0",
            "5815ee3-v1.8.0-alpha.0-10-g336fa0f",
            "v4.3",
            "4.3",
        ] {
            assert!(valid_version_format(ok), "{ok}");
        }
        for bad in [
            "",
            "v1",
            "1.2.3+build",
            "20220117.0-v1.0.0",
            "latest",
            "v1.2.3.4",
        ] {
            assert!(!valid_version_format(bad), "{bad}");
        }
    }

    #[test]
    fn allowed_paths_on_boundaries() {
        assert!(allowed_path("/usr/local/bin/x"));
        assert!(allowed_path("/usr/lib/ld-linux-x86-64.so.2"));
        assert!(allowed_path("/usr/lib/firmware/amd/cpu"));
        assert!(!allowed_path("/usr/localfoo"));
        assert!(!allowed_path("/usr/lib64/a.so"));
        assert!(!allowed_path("/lib/firmware/x"));
        assert!(!allowed_path("/boot/vmlinuz"));
        assert!(!allowed_path("/etc/hosts"));
    }

    #[test]
    fn empty_manifest_is_version_empty() {
        let m = Manifest::parse("---\n").expect("parse");
        assert_eq!(m.version, "");
        assert!(Manifest::parse("version: [1]\n").is_err());
    }
}
