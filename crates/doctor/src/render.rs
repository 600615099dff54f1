//! The report as text (one line per check, the fix indented under what is wrong) and as JSON.

use std::fmt::Write as _;

use crate::model::{Report, Verdict};

pub fn text(report: &Report) -> String {
    let mut out = String::new();
    for f in &report.findings {
        let _ = writeln!(
            out,
            "{:<4}  {:<18}  {}",
            f.verdict.label(),
            f.check,
            f.message
        );
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "{:<4}  {:<18}  fix: {fix}", "", "");
        }
    }
    let count = |v: Verdict| report.findings.iter().filter(|f| f.verdict == v).count();
    let _ = writeln!(
        out,
        "{}: {} failed, {} warnings, {} ok, {} skipped",
        if report.ok {
            "healthy"
        } else {
            "PROBLEMS FOUND"
        },
        count(Verdict::Fail),
        count(Verdict::Warn),
        count(Verdict::Ok),
        count(Verdict::Skip),
    );
    out
}

pub fn json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_default()
}
