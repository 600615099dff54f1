//! The Talos extension's config documents against the real binaries (no root needed): every
//! `ExtensionServiceConfig` in `extension/examples/*.yaml` targets one of our services, mounts its file at the
//! path that service's spec passes to `run --config`, and that file passes `<service> check-config`; so does the
//! built-in default each service may ship (`extension/defaults/<service>.yaml`).
//!
//! Needs the release binaries (`hack/test.sh` builds them). Run alone:
//! `cargo test -p hybridnet-integration --test extension_examples`.

use std::path::Path;
use std::time::Duration;

use hybridnet_extension_validator::{ServiceSpec, esc};
use hybridnet_integration::{DaemonKind, TestDir};

const CLI: Duration = Duration::from_secs(10);

fn extension_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../extension")
}

fn kind(name: &str) -> DaemonKind {
    DaemonKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .unwrap_or_else(|| panic!("ExtensionServiceConfig for an unknown service {name:?}"))
}

fn spec(name: &str) -> ServiceSpec {
    let path = extension_dir().join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ServiceSpec::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_config(name: &str, file: &Path, what: &str) {
    let config = file.to_string_lossy().into_owned();
    let out = kind(name).cli(&["check-config", "--config", &config], CLI);
    assert_eq!(out.code(), Some(0), "{what}: {}", out.describe());
}

#[test]
fn example_documents_pass_check_config() {
    let dir = TestDir::new("extension-examples");
    let mut examples: Vec<_> = std::fs::read_dir(extension_dir().join("examples"))
        .unwrap_or_else(|e| panic!("extension/examples: {e}"))
        .map(|e| e.unwrap_or_else(|e| panic!("{e}")).path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    assert!(!examples.is_empty(), "no examples in extension/examples");
    let mut checked = 0;
    for example in &examples {
        let text = std::fs::read_to_string(example).unwrap_or_else(|e| panic!("{e}"));
        let docs = esc::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
        assert!(
            !docs.is_empty(),
            "{}: no ExtensionServiceConfig",
            example.display()
        );
        for doc in docs {
            let spec = spec(&doc.name);
            let config_path = spec
                .config_arg()
                .unwrap_or_else(|| panic!("{} has no --config", doc.name));
            let file = doc
                .config_files
                .iter()
                .find(|f| f.mount_path == config_path)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: the {} document mounts no file at {config_path}, the path its spec reads",
                        example.display(),
                        doc.name
                    )
                });
            let path = dir.join(format!(
                "{}-{}.yaml",
                example
                    .file_stem()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default(),
                doc.name
            ));
            std::fs::write(&path, &file.content).unwrap_or_else(|e| panic!("{e}"));
            check_config(
                &doc.name,
                &path,
                &format!("{} ({})", example.display(), doc.name),
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} documents checked");
    // the built-in defaults
    for kind in DaemonKind::ALL {
        let defaults = extension_dir().join(format!("defaults/{}.yaml", kind.name()));
        if defaults.is_file() {
            check_config(kind.name(), &defaults, &defaults.display().to_string());
        }
    }
}
