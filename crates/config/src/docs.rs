//! Splits the stream into documents, tells Talos's from ours, and refuses duplicates.

use std::collections::HashMap;

use crate::error::IssueKind;
use crate::pos::Pos;
use crate::read::Ctx;
use crate::yaml::{Node, Value};

/// Our document's kind.
pub const HYBRIDNET_KIND: &str = "HybridNetConfig";

/// One classified document.
pub enum Doc<'a> {
    /// The legacy Talos `version: v1alpha1` document.
    Legacy(&'a Node),
    /// A newer Talos document of the given kind.
    Talos(String, &'a Node),
    /// Our `HybridNetConfig`.
    HybridNet(&'a Node),
}

/// Classifies every non-empty document; reports documents that are not mappings, that have no
/// `kind`/`version`, and duplicates (same unnamed kind twice, same kind and `name` twice, two
/// legacy documents, two HybridNetConfig). A document with a `name:` key is a named kind.
pub fn classify<'a>(ctx: &mut Ctx, docs: &'a [Node]) -> Vec<Doc<'a>> {
    let mut seen: HashMap<(String, Option<String>), Pos> = HashMap::new();
    let mut out = Vec::new();
    for (index, doc) in docs.iter().enumerate() {
        let number = index + 1;
        match &doc.value {
            Value::Null => continue,
            Value::Map(_) => {}
            _ => {
                let found = doc.type_name();
                ctx.issue(
                    doc,
                    IssueKind::Document,
                    format!("document {number}: expected a mapping, found {found}"),
                );
                continue;
            }
        }
        let Some(classified) = classify_one(ctx, doc, number) else {
            continue;
        };
        let (kind, name) = match &classified {
            Doc::Legacy(_) => ("v1alpha1 (legacy machine config)".to_owned(), None),
            Doc::HybridNet(_) => (HYBRIDNET_KIND.to_owned(), None),
            Doc::Talos(kind, node) => (
                kind.clone(),
                node.get("name").and_then(Node::as_str).map(str::to_owned),
            ),
        };
        let what = match &name {
            Some(n) => format!("{kind} named `{n}`"),
            None => kind.clone(),
        };
        if let Some(first) = seen.get(&(kind.clone(), name.clone())) {
            let message = format!(
                "duplicate document: {what} is already defined at line {}",
                first.line
            );
            ctx.issue(doc, IssueKind::Duplicate, message);
            continue;
        }
        seen.insert((kind, name), doc.pos);
        out.push(classified);
    }
    out
}

fn classify_one<'a>(ctx: &mut Ctx, doc: &'a Node, number: usize) -> Option<Doc<'a>> {
    let kind = doc.get("kind");
    let version = doc.get("version");
    match (kind, version) {
        (Some(k), _) => {
            let Some(kind) = k.as_str().filter(|s| !s.is_empty()) else {
                ctx.issue(
                    k,
                    IssueKind::Type,
                    format!("document {number}: `kind` must be a non-empty string"),
                );
                return None;
            };
            match doc.get("apiVersion").map(|v| v.as_str()) {
                Some(Some("v1alpha1")) => {}
                Some(Some(other)) if kind == HYBRIDNET_KIND => {
                    let message = format!(
                        "{HYBRIDNET_KIND}: unsupported apiVersion `{other}`: expected v1alpha1"
                    );
                    ctx.issue(doc, IssueKind::Value, message);
                    return None;
                }
                None if kind == HYBRIDNET_KIND => {
                    ctx.issue(
                        doc,
                        IssueKind::Document,
                        format!("{HYBRIDNET_KIND}: `apiVersion: v1alpha1` is missing"),
                    );
                    return None;
                }
                // Talos documents of another apiVersion are accepted and ignored like unknown kinds.
                _ => {}
            }
            if kind == HYBRIDNET_KIND {
                Some(Doc::HybridNet(doc))
            } else {
                Some(Doc::Talos(kind.to_owned(), doc))
            }
        }
        (None, Some(v)) => match v.as_str() {
            Some("v1alpha1") => Some(Doc::Legacy(doc)),
            _ => {
                let message = format!(
                    "document {number}: unsupported machine config `version`: expected v1alpha1"
                );
                ctx.issue(v, IssueKind::Value, message);
                None
            }
        },
        (None, None) => {
            let message = format!(
                "document {number}: expected `apiVersion` and `kind` (e.g. `kind: {HYBRIDNET_KIND}`) \
                 or a Talos `version: v1alpha1` machine config"
            );
            ctx.issue(doc, IssueKind::Document, message);
            None
        }
    }
}
