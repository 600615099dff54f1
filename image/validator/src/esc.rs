//! `ExtensionServiceConfig` documents (`talos:pkg/machinery/config/types/runtime/extensions/service_config.go`):
//! read from a machine config patch, validated as Talos does, and how Talos hands each file to a service
//! (written under `/system/overlays/extensions/<name>/`, bind-mounted read-only at `mountPath`).

use serde_json::Value;

use crate::yamlv::Obj;

/// One config file of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub mount_path: String,
    pub content: String,
}

/// One `ExtensionServiceConfig` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionServiceConfig {
    /// The service spec's name (not the extension's).
    pub name: String,
    pub config_files: Vec<ConfigFile>,
    pub environment: Vec<String>,
}

impl ExtensionServiceConfig {
    /// Where Talos writes this file on the host (`ExtensionServiceConfigFilesController`): the mount path
    /// without its leading `/`, every `/` turned into `-`, under `/system/overlays/extensions/<name>/`.
    pub fn host_path(&self, file: &ConfigFile) -> String {
        format!(
            "/system/overlays/extensions/{}/{}",
            self.name,
            file.mount_path.trim_start_matches('/').replace('/', "-")
        )
    }
}

/// Every `ExtensionServiceConfig` document in a (multi-document) machine config or patch; other documents are
/// skipped. Talos's validation: `name` is required, `configFiles` or `environment` must be present, every file
/// needs a non-empty `content` and an absolute `mountPath`.
pub fn parse(text: &str) -> Result<Vec<ExtensionServiceConfig>, String> {
    let docs: Vec<Value> =
        serde_saphyr::from_str_multiple(text).map_err(|e| format!("yaml: {e}"))?;
    let mut out = Vec::new();
    for doc in &docs {
        let top = Obj::new(doc, "document")?;
        if top.str("kind")? != "ExtensionServiceConfig" {
            continue;
        }
        let name = top.str("name")?;
        if name.is_empty() {
            return Err("ExtensionServiceConfig: name is required".to_string());
        }
        let mut config_files = Vec::new();
        for f in top.list("configFiles")? {
            let f = Obj::new(f, "configFiles[]")?;
            let file = ConfigFile {
                mount_path: f.str("mountPath")?,
                content: f.str("content")?,
            };
            if file.content.is_empty() {
                return Err(format!(
                    "ExtensionServiceConfig {name}: a config file has no content"
                ));
            }
            if !file.mount_path.starts_with('/') {
                return Err(format!(
                    "ExtensionServiceConfig {name}: mountPath {:?} is not absolute",
                    file.mount_path
                ));
            }
            config_files.push(file);
        }
        let environment = top.strings("environment")?;
        if config_files.is_empty() && environment.is_empty() {
            return Err(format!(
                "ExtensionServiceConfig {name}: configFiles or environment must be set"
            ));
        }
        out.push(ExtensionServiceConfig {
            name,
            config_files,
            environment,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talos_document() {
        // shared/fixtures/talos/documents/extension_service_config.yaml, in substance
        let text = "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: foo\nconfigFiles:\n    - content: hello\n      mountPath: /etc/foo\nenvironment:\n    - FOO=BAR\n---\napiVersion: v1alpha1\nkind: KubePrismConfig\nport: 7445\n";
        let esc = parse(text).expect("parse");
        assert_eq!(esc.len(), 1);
        assert_eq!(esc[0].environment, ["FOO=BAR"]);
        assert_eq!(
            esc[0].host_path(&esc[0].config_files[0]),
            "/system/overlays/extensions/foo/etc-foo"
        );
        assert!(parse("kind: ExtensionServiceConfig\nname: x\n").is_err());
        assert!(
            parse("kind: ExtensionServiceConfig\nconfigFiles: [{content: a, mountPath: /a}]\n")
                .is_err()
        );
        assert!(
            parse(
                "kind: ExtensionServiceConfig\nname: x\nconfigFiles: [{content: a, mountPath: a}]\n"
            )
            .is_err()
        );
    }
}
