//! The status record's summary and details (the upstream table), and how `apiprism status` prints them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Instant;

use serde_json::{Value, json};

use crate::core::{State, Table};

/// Summary line and details for `status.json`.
pub fn report(table: &Table, listening: &[SocketAddr], started: Instant) -> (String, Value) {
    let now = Instant::now();
    let upstreams: Vec<Value> = table
        .iter()
        .map(|u| {
            json!({
                "address": u.addr.to_string(),
                "sources": u.sources.iter().collect::<Vec<_>>(),
                "state": u.state.as_str(),
                "rttMs": u.srtt.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
                "score": u.streak,
                "active": u.active,
                "total": u.total,
                "dialErrors": u.dial_errors,
                "failovers": u.failovers,
                "sinceSeconds": now.duration_since(u.last_change).as_secs(),
                "lastError": u.last_error,
            })
        })
        .collect();
    let up = table.iter().filter(|u| u.state == State::Up).count();
    let active: u64 = table.iter().map(|u| u.active).sum();
    let listen: Vec<String> = listening.iter().map(ToString::to_string).collect();
    let summary = if listen.is_empty() {
        "not listening (see the log)".to_owned()
    } else if table.is_empty() {
        format!(
            "listening on {}; no upstreams configured",
            listen.join(", ")
        )
    } else {
        format!(
            "{up}/{} upstreams up, {active} connections; listening on {}",
            table.len(),
            listen.join(", ")
        )
    };
    let details = json!({
        "listen": listen,
        "uptimeSeconds": now.duration_since(started).as_secs(),
        "upstreams": upstreams,
    });
    (summary, details)
}

/// The upstream table as text, for `apiprism status`.
pub fn render(details: &Value) -> String {
    let mut out = String::new();
    let listen: Vec<&str> = details["listen"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "listen  {}", listen.join("  "));
    let rows: Vec<[String; 9]> = details["upstreams"]
        .as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default();
    if rows.is_empty() {
        out.push_str("no upstreams\n");
        return out;
    }
    let header = [
        "UPSTREAM",
        "STATE",
        "RTT",
        "SCORE",
        "ACTIVE",
        "TOTAL",
        "DIAL-ERR",
        "FAILOVERS",
        "SOURCES",
    ]
    .map(str::to_owned);
    let mut widths = [0usize; 9];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for u in details["upstreams"].as_array().into_iter().flatten() {
        if u["state"] == "down"
            && let Some(e) = u["lastError"].as_str()
        {
            let _ = writeln!(out, "{}: {e}", u["address"].as_str().unwrap_or("?"));
        }
    }
    out
}

fn row(u: &Value) -> [String; 9] {
    let s = |k: &str| match &u[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    let state = format!("{} {}s", s("state"), s("sinceSeconds"));
    let rtt = u["rttMs"]
        .as_f64()
        .map_or("-".to_owned(), |ms| format!("{ms:.3}ms"));
    let sources: Vec<&str> = u["sources"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    [
        s("address"),
        state,
        rtt,
        s("score"),
        s("active"),
        s("total"),
        s("dialErrors"),
        s("failovers"),
        sources.join(", "),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Policy, Signal};
    use std::time::Duration;

    #[test]
    fn renders_the_upstream_table() {
        let now = Instant::now();
        let mut t = Table::new(Policy::default());
        let a: SocketAddr = "192.0.2.11:6443".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:6443".parse().expect("addr");
        t.reconcile(&[(a, "endpoint".into()), (b, "localhost:6443".into())], now);
        t.observe(a, Ok(Duration::from_micros(420)), Signal::Probe, now);
        for _ in 0..2 {
            t.observe(b, Err("connection refused".into()), Signal::Probe, now);
        }
        let listen: SocketAddr = "127.0.0.1:7445".parse().expect("addr");
        let (summary, details) = report(&t, &[listen], now);
        assert_eq!(
            summary,
            "1/2 upstreams up, 0 connections; listening on 127.0.0.1:7445"
        );
        let text = render(&details);
        assert!(text.contains("UPSTREAM"), "{text}");
        assert!(text.contains("192.0.2.11:6443  up 0s"), "{text}");
        assert!(text.contains("0.420ms"), "{text}");
        assert!(
            text.contains("127.0.0.1:6443: connection refused"),
            "{text}"
        );
    }
}
