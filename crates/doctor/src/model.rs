//! What a check finds, and the report of all of them.

use serde::Serialize;

/// How a check came out. Ordered: the worst decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Nothing to check here (the input is missing, or the check does not apply).
    Skip,
    Ok,
    /// Works, but is fragile or not what hybridnet is for.
    Warn,
    /// Broken: the node does not get what hybridnet should give it.
    Fail,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Skip => "SKIP",
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One check's outcome: what was found, in plain words, and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier, e.g. `kubelet-dns`.
    pub check: &'static str,
    pub verdict: Verdict,
    pub message: String,
    /// What to do, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// What the check measured, for `--json` readers (e.g. `clock`: the offset and each source's reading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<serde_json::Value>,
}

impl Finding {
    pub fn ok(check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Ok,
            message: message.into(),
            fix: None,
            measured: None,
        }
    }

    pub fn skip(check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Skip,
            message: message.into(),
            fix: None,
            measured: None,
        }
    }

    pub fn warn(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            verdict: Verdict::Warn,
            message: message.into(),
            fix: Some(fix.into()),
            measured: None,
        }
    }

    pub fn fail(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            verdict: Verdict::Fail,
            message: message.into(),
            fix: Some(fix.into()),
            measured: None,
        }
    }
}

impl Finding {
    /// The finding with what was measured attached.
    #[must_use]
    pub fn with_measured(mut self, measured: serde_json::Value) -> Finding {
        self.measured = Some(measured);
        self
    }
}

/// Every finding, in check order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(findings: Vec<Finding>) -> Report {
        Report {
            ok: findings.iter().all(|f| f.verdict < Verdict::Fail),
            findings,
        }
    }

    /// The worst verdict (`Skip` for an empty report).
    pub fn worst(&self) -> Verdict {
        self.findings
            .iter()
            .map(|f| f.verdict)
            .max()
            .unwrap_or(Verdict::Skip)
    }
}
