//! Extension service specs (`rootfs/usr/local/etc/containers/*.yaml`): Talos's `services.Spec` and its
//! `Validate()` (`talos:pkg/machinery/extensions/services/services.go`), with the same messages.

use crate::yamlv::{Obj, parse};

/// The restart kinds Talos knows (`RestartKind` enumer strings).
pub const RESTART_KINDS: &[&str] = &["always", "never", "untilSuccess"];
/// The network dependency statuses (`nethelpers.Status` strings).
pub const NETWORK_STATUSES: &[&str] = &["addresses", "connectivity", "hostname", "etcfiles"];

/// One OCI runtime-spec mount.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    pub source: String,
    pub destination: String,
    pub kind: String,
    pub options: Vec<String>,
}

/// One dependency: exactly one of the fields should be set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dependency {
    pub service: String,
    pub path: String,
    pub network: Vec<String>,
    pub time: bool,
    pub configuration: bool,
}

/// A parsed service spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceSpec {
    pub name: String,
    pub entrypoint: String,
    pub args: Vec<String>,
    pub environment: Vec<String>,
    pub mounts: Vec<Mount>,
    pub depends: Vec<Dependency>,
    /// As written; empty when missing.
    pub restart: String,
    pub log_to_console: bool,
    /// Keys Talos would ignore silently (misspellings); our strict mode refuses them.
    pub unknown_keys: Vec<String>,
}

impl ServiceSpec {
    /// Parses a spec as Talos's non-strict decoder does (unknown keys are recorded, not refused).
    pub fn parse(text: &str) -> Result<ServiceSpec, String> {
        let doc = parse(text)?;
        let top = Obj::new(&doc, "spec")?;
        let mut unknown =
            top.unknown_keys(&["name", "container", "depends", "restart", "logToConsole"]);
        let c = top.obj("container")?;
        unknown.extend(c.unknown_keys(&[
            "entrypoint",
            "environment",
            "environmentFile",
            "args",
            "mounts",
            "security",
        ]));
        let sec = c.obj("security")?;
        unknown.extend(sec.unknown_keys(&[
            "writeableSysfs",
            "maskedPaths",
            "readonlyPaths",
            "writeableRootfs",
            "rootfsPropagation",
        ]));
        // read them so that a wrong type is an error, as in Go
        sec.bool("writeableSysfs")?;
        sec.bool("writeableRootfs")?;
        sec.strings("maskedPaths")?;
        sec.strings("readonlyPaths")?;
        sec.str("rootfsPropagation")?;
        c.str("environmentFile")?;
        let mut mounts = Vec::new();
        for m in c.list("mounts")? {
            let m = Obj::new(m, "mounts[]")?;
            unknown.extend(m.unknown_keys(&[
                "source",
                "destination",
                "type",
                "options",
                "uidMappings",
                "gidMappings",
            ]));
            mounts.push(Mount {
                source: m.str("source")?,
                destination: m.str("destination")?,
                kind: m.str("type")?,
                options: m.strings("options")?,
            });
        }
        let mut depends = Vec::new();
        for d in top.list("depends")? {
            let d = Obj::new(d, "depends[]")?;
            unknown.extend(d.unknown_keys(&[
                "service",
                "path",
                "network",
                "time",
                "configuration",
            ]));
            depends.push(Dependency {
                service: d.str("service")?,
                path: d.str("path")?,
                network: d.strings("network")?,
                time: d.bool("time")?,
                configuration: d.bool("configuration")?,
            });
        }
        Ok(ServiceSpec {
            name: top.str("name")?,
            entrypoint: c.str("entrypoint")?,
            args: c.strings("args")?,
            environment: c.strings("environment")?,
            mounts,
            depends,
            restart: top.str("restart")?,
            log_to_console: top.bool("logToConsole")?,
            unknown_keys: unknown,
        })
    }

    /// Talos's `Spec.Validate()`: every problem, in Talos's order and words.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !valid_name(&self.name) {
            errors.push(format!("name {:?} is invalid", self.name));
        }
        if !RESTART_KINDS.contains(&self.restart.as_str()) {
            let shown = if self.restart.is_empty() {
                "RestartKind(0)"
            } else {
                self.restart.as_str()
            };
            errors.push(format!("restart kind is invalid: {shown}"));
        }
        if self.entrypoint.is_empty() {
            errors.push("container endpoint can't be empty".to_string());
        }
        for dep in &self.depends {
            errors.extend(dep.validate());
        }
        errors
    }

    /// The value after `--config` in the args, if any.
    pub fn config_arg(&self) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
            .or_else(|| self.args.iter().find_map(|a| a.strip_prefix("--config=")))
    }
}

impl Dependency {
    fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut set = 0;
        if !self.service.is_empty() {
            set += 1;
        }
        if !self.path.is_empty() {
            set += 1;
            if !self.path.starts_with('/') {
                errors.push(format!("path is not absolute: {:?}", self.path));
            }
        }
        if !self.network.is_empty() {
            set += 1;
            for st in &self.network {
                if !NETWORK_STATUSES.contains(&st.as_str()) {
                    errors.push(format!("invalid network dependency: {st}"));
                }
            }
        }
        if self.time {
            set += 1;
        }
        if self.configuration {
            set += 1;
        }
        if set == 0 {
            errors.push("no dependency specified".to_string());
        }
        if set > 1 {
            errors.push("more than a single dependency is set".to_string());
        }
        errors
    }
}

/// `^[-_a-z0-9]{1,}$`
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b == b'-' || b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talos_messages() {
        let empty = ServiceSpec::default();
        assert_eq!(
            empty.validate(),
            [
                "name \"\" is invalid",
                "restart kind is invalid: RestartKind(0)",
                "container endpoint can't be empty"
            ]
        );
        let s = ServiceSpec::parse("name: FOO\ncontainer: {entrypoint: foo}\nrestart: always\n")
            .expect("parse");
        assert_eq!(s.validate(), ["name \"FOO\" is invalid"]);
        let s = ServiceSpec::parse(
            "name: foo\ncontainer: {entrypoint: foo}\nrestart: always\ndepends:\n  - {}\n  - path: ./somefile\n  - network: [bogus]\n  - {network: [addresses], path: /foo}\n",
        )
        .expect("parse");
        assert_eq!(
            s.validate(),
            [
                "no dependency specified",
                "path is not absolute: \"./somefile\"",
                "invalid network dependency: bogus",
                "more than a single dependency is set"
            ]
        );
    }

    #[test]
    fn talos_hello_spec() {
        // talos:pkg/machinery/extensions/services/testdata/hello.yaml, in substance
        let s = ServiceSpec::parse(
            "name: hello\ncontainer:\n  entrypoint: hello-world\n  args: [--development, --log=debug]\n  mounts:\n    - {source: /var/lib/example, destination: /var/lib/example, type: bind, options: [rbind, ro]}\ndepends:\n  - service: cri\n  - path: /system/run/machined/machined.sock\n  - network: [addresses]\nrestart: never\n",
        )
        .expect("parse");
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        assert!(s.unknown_keys.is_empty());
        assert_eq!(s.mounts[0].options, ["rbind", "ro"]);
    }

    #[test]
    fn unknown_keys_and_types() {
        let s =
            ServiceSpec::parse("name: a\nrestrat: always\ncontainer: {entrypoint: x, arg: [y]}\n")
                .expect("parse");
        assert_eq!(s.unknown_keys.len(), 2, "{:?}", s.unknown_keys);
        assert!(ServiceSpec::parse("name: a\ncontainer: {args: run}\n").is_err());
        assert!(ServiceSpec::parse("name: [a]\n").is_err());
        let s = ServiceSpec::parse("name: a\ncontainer: {args: [run, --config, /c.yaml]}\n")
            .expect("parse");
        assert_eq!(s.config_arg(), Some("/c.yaml"));
    }
}
