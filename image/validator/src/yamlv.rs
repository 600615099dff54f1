//! Reading YAML documents the way Talos's (non-strict) Go decoder does, on top of a generic value: unknown keys
//! are ignored by the getters and listed by [`Obj::unknown_keys`] for our strict mode; scalars are read as
//! strings where Go wants a string (yaml.v3 accepts `1.0` for a string field).

use serde_json::{Map, Value};

/// Parses one YAML document; an empty document (nothing, comments, a lone `---`) is `Null`, as Go's decoder
/// leaves the target at its zero value then.
pub fn parse(text: &str) -> Result<Value, String> {
    let empty = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if empty {
        return Ok(Value::Null);
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| format!("yaml: {e}"))
}

/// A mapping (or nothing: `Null` reads as an empty mapping, like a Go zero struct).
#[derive(Debug, Clone, Copy)]
pub struct Obj<'a> {
    map: Option<&'a Map<String, Value>>,
    path: &'a str,
}

static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, path: &'a str) -> Result<Obj<'a>, String> {
        match v {
            Value::Object(m) => Ok(Obj { map: Some(m), path }),
            Value::Null => Ok(Obj { map: None, path }),
            other => Err(format!(
                "yaml: {path}: expected a mapping, found {}",
                kind(other)
            )),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    pub fn obj(&self, key: &'a str) -> Result<Obj<'a>, String> {
        match self.get(key) {
            Some(v) => Obj::new(v, key),
            None => Ok(Obj {
                map: Some(EMPTY.get_or_init(Map::new)),
                path: key,
            }),
        }
    }

    pub fn str(&self, key: &str) -> Result<String, String> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(v) => scalar(v).ok_or_else(|| {
                format!(
                    "yaml: {}.{key}: expected a string, found {}",
                    self.path,
                    kind(v)
                )
            }),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(format!(
                "yaml: {}.{key}: expected a boolean, found {}",
                self.path,
                kind(v)
            )),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| {
                        format!(
                            "yaml: {}.{key}: expected strings, found {}",
                            self.path,
                            kind(v)
                        )
                    })
                })
                .collect(),
            Some(v) => Err(format!(
                "yaml: {}.{key}: expected a list, found {}",
                self.path,
                kind(v)
            )),
        }
    }

    pub fn list(&self, key: &str) -> Result<Vec<&'a Value>, String> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.iter().collect()),
            Some(v) => Err(format!(
                "yaml: {}.{key}: expected a list, found {}",
                self.path,
                kind(v)
            )),
        }
    }

    /// Keys that are not in `known` (Talos ignores them silently; our strict mode refuses them).
    pub fn unknown_keys(&self, known: &[&str]) -> Vec<String> {
        self.map
            .map(|m| {
                m.keys()
                    .filter(|k| !known.contains(&k.as_str()))
                    .map(|k| format!("unknown key {k:?} in {}", self.path))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
