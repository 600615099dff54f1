//! The validator against Talos's own extension trees (`../shared/fixtures/talos/extension-trees`: `good` passes,
//! each `bad/*` fails for its own reason, with Talos's message) and against our tree, staged from `extension/`
//! with placeholder executables (so no release build is needed), plus one broken copy of ours per rule.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hybridnet_extension_validator::{Error, Options, Version, stage, validate};

fn trees() -> PathBuf {
    let dir = std::env::var_os("HYBRIDNET_TALOS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/talos")
        })
        .join("extension-trees");
    assert!(
        dir.join("good").is_dir() && dir.join("bad").is_dir(),
        "the Talos extension-tree fixtures are missing in {} (they live beside the workspace in \
         shared/fixtures/talos; or set HYBRIDNET_TALOS_FIXTURES)",
        dir.display()
    );
    dir
}

/// Talos's extension tests check the fixtures against Talos 1.0.0.
fn talos_1_0() -> Options {
    Options::talos(Version::parse("1.0.0").expect("version"))
}

#[test]
fn good_fixtures_pass() {
    let good = trees().join("good");
    let mut n = 0;
    for e in std::fs::read_dir(&good).expect("read good/") {
        let dir = e.expect("entry").path();
        let report = validate(&dir, &talos_1_0())
            .unwrap_or_else(|e| panic!("{} must pass: {e}", dir.display()));
        assert_eq!(report.manifest.name, "gvisor");
        assert_eq!(report.files, 4, "{report:?}");
        // also against the current Talos release
        validate(
            &dir,
            &Options::talos(hybridnet_extension_validator::default_talos_version()),
        )
        .unwrap_or_else(|e| panic!("{} must pass: {e}", dir.display()));
        n += 1;
    }
    assert!(n >= 1, "no trees in {}", good.display());
}

/// extensions-validator adds the version-format check, which Talos's own fixture does not meet
/// (`20220117.0-v1.0.0` matches none of its formats), and the name check.
#[test]
fn good_fixture_under_extensions_validator_rules() {
    let dir = trees().join("good/extension1");
    let err = validate(&dir, &Options::extensions_validator(None)).expect_err("version format");
    assert_eq!(
        err,
        Error::VersionFormat {
            version: "20220117.0-v1.0.0".into(),
            name: "gvisor".into()
        }
    );
    let err = validate(&dir, &Options::extensions_validator(Some("hybridnet"))).expect_err("name");
    assert_eq!(
        err.message(),
        "pkg name does not match extension name: hybridnet != gvisor"
    );
}

#[test]
fn bad_fixtures_fail_each_for_its_reason() {
    let bad = trees().join("bad");
    let expected: &[(&str, Error)] = &[
        ("wrongfiles", Error::Load("unexpected file \"a\"".into())),
        (
            "emptymanifest",
            Error::Load("unsupported manifest version: \"\"".into()),
        ),
        (
            "norootfs",
            Error::Load("extension rootfs is missing".into()),
        ),
        (
            "badpaths",
            Error::Contents("path \"/boot/vmlinuz\" is not allowed in extensions".into()),
        ),
        (
            "usrmerge",
            Error::Contents("path \"/usr/lib64/a.so\" is not allowed in extensions".into()),
        ),
    ];
    let mut present: Vec<String> = std::fs::read_dir(&bad)
        .expect("read bad/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut covered: Vec<String> = expected.iter().map(|(n, _)| n.to_string()).collect();
    covered.sort();
    assert_eq!(
        present, covered,
        "every bad fixture needs its expected error"
    );
    for (name, want) in expected {
        let got = validate(&bad.join(name), &talos_1_0()).expect_err(name);
        assert_eq!(&got, want, "bad/{name}");
    }
    assert_eq!(
        validate(&bad.join("wrongfiles"), &talos_1_0())
            .expect_err("wrongfiles")
            .to_string(),
        "error loading extension: unexpected file \"a\""
    );
}

fn placeholder(dir: &Path) -> impl Fn(&str) -> Result<PathBuf, String> + use<> {
    let bins = dir.join("bins");
    std::fs::create_dir_all(&bins).expect("mkdir");
    move |name: &str| {
        let p = bins.join(name);
        std::fs::write(&p, format!("#!/bin/sh\necho {name} placeholder\n"))
            .map_err(|e| e.to_string())?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        Ok(p)
    }
}

/// Our tree, staged from extension/ into a fresh temp dir.
fn ours() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("tree");
    let ext = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../extension");
    let names = stage::stage(
        &ext,
        stage::MANIFEST_VERSION,
        &placeholder(tmp.path()),
        &out,
    )
    .expect("stage");
    assert_eq!(names, ["apiprism", "dnslocal", "meshd"]);
    (tmp, out)
}

#[test]
fn our_tree_passes_every_rule() {
    let (_tmp, tree) = ours();
    let report = validate(&tree, &Options::hybridnet()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.manifest.name, "hybridnet");
    assert_eq!(report.manifest.metadata_version, stage::MANIFEST_VERSION);
    // three binaries, three specs, apiprism's default config
    assert_eq!(report.files, 7, "{report:?}");
    for (file, spec) in &report.services {
        assert_eq!(spec.restart, "always", "{file}");
        assert_eq!(
            spec.args,
            ["run", "--config", "/usr/local/etc/hybridnet/config.yaml"],
            "{file}"
        );
        assert_eq!(spec.entrypoint, format!("/usr/local/bin/{}", spec.name));
        assert!(spec.depends.iter().any(|d| d.service == "cri"), "{file}");
        assert!(!spec.depends.iter().any(|d| d.configuration), "{file}");
        let dests: Vec<&str> = spec.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert!(
            dests.contains(&"/run/hybridnet") && dests.contains(&"/var/lib/hybridnet"),
            "{file}"
        );
        if spec.name == "meshd" {
            assert!(dests.contains(&"/dev/net/tun"), "{file}");
        }
    }
    // also what Talos checks against the oldest release our range admits, and a release it refuses
    validate(&tree, &Options::talos(Version::parse("1.10.0").expect("v"))).expect("1.10.0");
    let err =
        validate(&tree, &Options::talos(Version::parse("1.9.5").expect("v"))).expect_err("1.9.5");
    assert_eq!(
        err.message(),
        "version constraint >= v1.10.0 can't be satisfied with Talos version 1.9.5"
    );
    // staging twice gives the same tree
    let (_tmp2, again) = ours();
    assert_eq!(listing(&tree), listing(&again));
}

fn listing(root: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, p: &Path, out: &mut Vec<(String, u32, Vec<u8>)>) {
        let m = std::fs::symlink_metadata(p).expect("lstat");
        let rel = p
            .strip_prefix(root)
            .expect("rel")
            .to_string_lossy()
            .into_owned();
        let content = if m.is_file() {
            std::fs::read(p).expect("read")
        } else {
            Vec::new()
        };
        out.push((rel, m.permissions().mode(), content));
        if m.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(p)
                .expect("read")
                .map(|e| e.expect("e").path())
                .collect();
            names.sort();
            for n in names {
                walk(root, &n, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Breaks a fresh copy of our tree with `f` and returns the error under our strict options.
#[track_caller]
fn broken(f: impl FnOnce(&Path)) -> Error {
    let (_tmp, tree) = ours();
    f(&tree);
    validate(&tree, &Options::hybridnet()).expect_err("must fail")
}

fn spec_path(tree: &Path, name: &str) -> PathBuf {
    tree.join(format!("rootfs/usr/local/etc/containers/{name}.yaml"))
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn each_rule_fails_our_tree() {
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    // world-writable file and directory
    let e = broken(|t| chmod(&t.join("rootfs/usr/local/etc/containers/meshd.yaml"), 0o666));
    assert_eq!(
        e,
        Error::Contents(
            "world-writeable files are not allowed: \"/usr/local/etc/containers/meshd.yaml\""
                .into()
        )
    );
    let e = broken(|t| chmod(&t.join("rootfs/usr/local/lib"), 0o777));
    assert_eq!(
        e.message(),
        "world-writeable files are not allowed: \"/usr/local/lib\""
    );
    // a special file (a FIFO)
    let e = broken(|t| {
        let st = std::process::Command::new("mkfifo")
            .arg(t.join("rootfs/usr/local/fifo"))
            .status()
            .expect("mkfifo");
        assert!(st.success());
    });
    assert_eq!(
        e,
        Error::Contents("special files are not allowed: \"/usr/local/fifo\"".into())
    );
    // a symlink outside the allowed paths (symlinks are checked like files, not followed)
    let e = broken(|t| {
        std::fs::create_dir_all(t.join("rootfs/etc")).expect("mkdir");
        std::os::unix::fs::symlink("/usr/local/bin", t.join("rootfs/etc/hybridnet"))
            .expect("symlink");
    });
    assert_eq!(
        e.message(),
        "path \"/etc/hybridnet\" is not allowed in extensions"
    );
    // a path that only shares a prefix with /usr/local
    let e = broken(|t| {
        std::fs::create_dir_all(t.join("rootfs/usr/localfoo")).expect("mkdir");
        std::fs::write(t.join("rootfs/usr/localfoo/x"), "x").expect("write");
    });
    assert_eq!(
        e.message(),
        "path \"/usr/localfoo/x\" is not allowed in extensions"
    );
    // an extra top-level entry
    let e = broken(|t| std::fs::write(t.join("README"), "x").expect("write"));
    assert_eq!(e, Error::Load("unexpected file \"README\"".into()));
    // manifest: wrong version, bad version format, wrong name
    let e = broken(|t| {
        edit(
            &t.join("manifest.yaml"),
            "version: v1alpha1",
            "version: v1alpha2",
        )
    });
    assert_eq!(e.message(), "unsupported manifest version: \"v1alpha2\"");
    let e = broken(|t| {
        edit(
            &t.join("manifest.yaml"),
            &format!("version: \"{}\"", stage::MANIFEST_VERSION),
            "version: latest",
        )
    });
    assert!(matches!(e, Error::VersionFormat { .. }), "{e}");
    let e = broken(|t| edit(&t.join("manifest.yaml"), "name: hybridnet", "name: meshkit"));
    assert_eq!(
        e.message(),
        "pkg name does not match extension name: hybridnet != meshkit"
    );
    let e = broken(|t| edit(&t.join("manifest.yaml"), "\">= v1.10.0\"", "\">= v9.0.0\""));
    assert!(matches!(e, Error::Constraint(_)), "{e}");
    // service specs: name pattern, restart kind, entrypoint, dependencies
    let e = broken(|t| edit(&spec_path(t, "meshd"), "name: meshd", "name: MeshD"));
    assert_eq!(
        e,
        Error::ServiceSpec {
            file: "meshd.yaml".into(),
            errors: vec!["name \"MeshD\" is invalid".into()]
        }
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "restart: always",
            "restart: sometimes",
        )
    });
    assert_eq!(e.message(), "restart kind is invalid: sometimes");
    let e = broken(|t| edit(&spec_path(t, "meshd"), "restart: always", ""));
    assert_eq!(e.message(), "restart kind is invalid: RestartKind(0)");
    let e = broken(|t| {
        edit(
            &spec_path(t, "dnslocal"),
            "entrypoint: /usr/local/bin/dnslocal",
            "entrypoint: \"\"",
        )
    });
    assert_eq!(e.message(), "container endpoint can't be empty");
    let e = broken(|t| {
        edit(
            &spec_path(t, "apiprism"),
            "  - service: cri\n",
            "  - service: cri\n    path: /var\n",
        )
    });
    assert_eq!(e.message(), "more than a single dependency is set");
    let e = broken(|t| {
        edit(
            &spec_path(t, "apiprism"),
            "  - service: cri\n",
            "  - path: var/lib\n",
        )
    });
    assert!(
        e.message().contains("path is not absolute: \"var/lib\""),
        "{e}"
    );
    let e = broken(|t| edit(&spec_path(t, "apiprism"), "  - service: cri\n", "  - {}\n"));
    assert!(e.message().contains("no dependency specified"), "{e}");
    let e = broken(|t| {
        edit(
            &spec_path(t, "dnslocal"),
            "[addresses, etcfiles]",
            "[addresses, dns]",
        )
    });
    assert_eq!(e.message(), "invalid network dependency: dns");
    // the service name must equal its container directory
    let e = broken(|t| edit(&spec_path(t, "meshd"), "name: meshd", "name: mesh"));
    assert!(
        e.message()
            .contains("container rootfs /usr/local/lib/containers/mesh is missing"),
        "{e}"
    );
    // strict: unknown (misspelt) keys, configuration: true, entrypoint, file name, /var without cri
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "restart: always",
            "restart: always\nrestat: never",
        )
    });
    assert_eq!(
        e,
        Error::Strict(vec!["meshd.yaml: unknown key \"restat\" in spec".into()])
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "  - service: cri\n",
            "  - service: cri\n  - configuration: true\n",
        )
    });
    assert!(
        e.message().contains("`configuration: true` blocks boot"),
        "{e}"
    );
    let e = broken(|t| {
        std::fs::remove_file(t.join("rootfs/usr/local/lib/containers/meshd/usr/local/bin/meshd"))
            .expect("rm")
    });
    assert!(
        e.message()
            .contains("entrypoint /usr/local/bin/meshd is missing"),
        "{e}"
    );
    let e = broken(|t| {
        chmod(
            &t.join("rootfs/usr/local/lib/containers/meshd/usr/local/bin/meshd"),
            0o644,
        )
    });
    assert!(e.message().contains("is not an executable file"), "{e}");
    let e =
        broken(|t| std::fs::rename(spec_path(t, "meshd"), spec_path(t, "wireguard")).expect("mv"));
    assert!(
        e.message()
            .contains("the file name must be the service name (meshd.yaml)"),
        "{e}"
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "dnslocal"),
            "  - service: cri\n",
            "  - time: true\n",
        )
    });
    assert!(
        e.message().contains("need a `service: cri` dependency"),
        "{e}"
    );
    // strict: the four mount sources Talos accepts but that break on a node
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "  mounts:\n",
            "  mounts:\n    - {source: tmpfs, destination: /var/run/wireguard, type: tmpfs, options: [nosuid]}\n",
        )
    });
    assert!(
        e.message().contains(
            "meshd.yaml: mount source \"tmpfs\" is not absolute: machined runs os.MkdirAll"
        ),
        "{e}"
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "options: [rbind, ro]",
            "options: [bind, ro]",
        )
    });
    assert!(
        e.message()
            .contains("meshd.yaml: mount source /etc/ssl/certs is bound without `rbind`"),
        "{e}"
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "source: /etc/kubernetes\n",
            "source: /etc/kubernetes/kubeconfig-kubelet\n",
        )
    });
    assert!(
        e.message().contains(
            "meshd.yaml: mount source /etc/kubernetes/kubeconfig-kubelet is a file that appears only after boot"
        ),
        "{e}"
    );
    let e = broken(|t| {
        edit(
            &spec_path(t, "meshd"),
            "source: /var/lib/kubelet\n",
            "source: /var/lib/kubelet/pki/\n",
        )
    });
    assert!(
        e.message()
            .contains("meshd.yaml: mount source /var/lib/kubelet/pki is removed and created again"),
        "{e}"
    );
    let e = broken(|t| {
        edit(
            &t.join("manifest.yaml"),
            "  author: hybridnet developers\n",
            "",
        )
    });
    assert!(e.message().contains("metadata.author is empty"), "{e}");
}
