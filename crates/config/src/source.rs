//! Provenance: where each effective value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::pos::Pos;

/// Where one value of the effective config came from, in precedence order (first wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Set in our `HybridNetConfig` document: `HybridNetConfig apiprism.listen (config.yaml:12:3)`.
    HybridNet {
        key: String,
        origin: PathBuf,
        pos: Pos,
    },
    /// A Talos field for the same thing: `Talos machine.features.kubePrism.port (config.yaml:8:9)`
    /// or `Talos KubePrismConfig.port (...)`.
    Talos {
        field: String,
        origin: PathBuf,
        pos: Pos,
    },
    /// Computed from Talos fields: `derived from cluster.network.serviceSubnets[0]`.
    Derived { from: String },
    /// The built-in default.
    Default,
}

impl Source {
    pub fn derived(from: impl Into<String>) -> Self {
        Source::Derived { from: from.into() }
    }

    /// True for a value set in HybridNetConfig.
    pub fn is_hybridnet(&self) -> bool {
        matches!(self, Source::HybridNet { .. })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::HybridNet { key, origin, pos } => {
                write!(f, "HybridNetConfig {key} ({}:{pos})", origin.display())
            }
            Source::Talos { field, origin, pos } => {
                write!(f, "Talos {field} ({}:{pos})", origin.display())
            }
            Source::Derived { from } => write!(f, "derived from {from}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The source of every effective value, keyed by its dotted config key (`apiprism.listen`,
/// `meshd.filters.endpoints`, `cluster.id`, ...).
///
/// Provenance takes no part in equality: two configs with the same values compare equal even if
/// a value moved to another line, so a reload that only reformats the file changes nothing.
#[derive(Clone, Debug, Default)]
pub struct Sources(BTreeMap<String, Source>);

impl PartialEq for Sources {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Sources {
    /// The source of `key`; [`Source::Default`] for a key never set.
    pub fn get(&self, key: &str) -> &Source {
        self.0.get(key).unwrap_or(&Source::Default)
    }

    pub(crate) fn set(&mut self, key: impl Into<String>, source: Source) {
        self.0.insert(key.into(), source);
    }

    /// Every recorded key and its source (keys left at their default are absent).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Source)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// A value with its source, as the readers produce them before merging.
pub type Sourced<T> = Option<(T, Source)>;
