//! The YAML layer: parses a multi-document stream into a positioned tree ([`Node`]) with hard
//! budgets, so that every later error can name a line and a column.
//!
//! serde-saphyr does the parsing; its budgets bound events, nodes, depth, anchors and alias replay,
//! so an alias bomb ("billion laughs") fails after a few thousand replayed events.

use std::fmt;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::error::{Issue, IssueKind};
use crate::pos::Pos;

/// A YAML value without its position.
#[derive(Debug)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A YAML value and where it starts.
#[derive(Debug)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// The value of `key` in a mapping (`None` when absent or when this is not a mapping).
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows a dotted path of mapping keys.
    pub fn path(&self, path: &str) -> Option<&Node> {
        path.split('.').try_fold(self, |node, key| node.get(key))
    }

    /// The value as a string when it is a scalar string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// A short name of the value's type, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// The raw shape serde-saphyr fills; converted to [`Node`] right after parsing.
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Raw, E> {
        Ok(i128::try_from(v).map_or(Raw::Float(v as f64), Raw::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_char<E>(self, v: char) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Raw, E> {
        Ok(Raw::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = a.next_element()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = a.next_entry()? {
            entries.push(entry);
        }
        Ok(Raw::Map(entries))
    }
}

fn convert(raw: Spanned<Raw>) -> Node {
    let pos = Pos {
        line: raw.referenced.line(),
        column: raw.referenced.column(),
    };
    let value = match raw.value {
        Raw::Null => Value::Null,
        Raw::Bool(b) => Value::Bool(b),
        Raw::Int(i) => Value::Int(i),
        Raw::Float(f) => Value::Float(f),
        Raw::Str(s) => Value::Str(s),
        Raw::Seq(items) => Value::Seq(items.into_iter().map(convert).collect()),
        Raw::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (convert(k), convert(v)))
                .collect(),
        ),
    };
    Node { value, pos }
}

/// Nesting deeper than this is refused (a Talos config nests about 10 deep; it bounds recursion). The
/// deserializer recurses per level: at 48, a debug build with serde-saphyr's `comments` feature (which
/// kube enables in meshd) overflowed a 2 MiB thread stack; at 32 it fits, and a release build needs
/// under 256 KiB for the refusal.
pub const MAX_DEPTH: usize = 32;

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 400_000;
    budget.max_nodes = 200_000;
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_documents = 1_000;
    budget.max_aliases = 2_000;
    budget.max_anchors = 2_000;
    budget.max_recorded_anchor_events = 50_000;
    budget.max_recorded_anchor_bytes = 1 << 20;
    budget.max_total_scalar_bytes = 8 << 20;
    let mut opts = serde_saphyr::Options::default();
    opts.budget = Some(budget);
    opts.alias_limits.max_total_replayed_events = 20_000;
    opts.alias_limits.max_replay_stack_depth = 16;
    opts.with_snippet = false;
    opts
}

/// Parses every document of `text`. Empty documents (nothing, or only comments) come back as
/// `Value::Null` nodes or are left out, as the parser reports them.
pub fn parse_stream(text: &str, origin: &Path) -> Result<Vec<Node>, Issue> {
    match serde_saphyr::from_multiple_with_options::<Spanned<Raw>>(text, options()) {
        Ok(docs) => Ok(docs.into_iter().map(convert).collect()),
        Err(err) => {
            let pos = err
                .location()
                .map(|l| Pos {
                    line: l.line(),
                    column: l.column(),
                })
                .filter(|p| p.line > 0);
            let message = err.to_string();
            let kind = if message.contains("budget") || message.contains("limit") {
                IssueKind::Limit
            } else {
                IssueKind::Syntax
            };
            let message = strip_location(&message);
            let message = if kind == IssueKind::Limit {
                format!(
                    "YAML too complex (aliases, nesting or size over the loader's limits): {message}"
                )
            } else {
                format!("invalid YAML: {message}")
            };
            Err(Issue::new(origin, pos, kind, message))
        }
    }
}

/// serde-saphyr appends " at line L, column C" to its messages; we print the position first.
fn strip_location(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    match first.find(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}
