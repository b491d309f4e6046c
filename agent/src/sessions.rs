//! `cordon sessions list`: sessions reassembled from the audit log.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::audit::{self, Entry};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub started: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// "open" while no close record exists; else the close outcome, or
    /// "rejected: <reason>".
    pub outcome: String,
    pub workload: Value,
    pub destination: Value,
    pub rule: Value,
    pub bytes_up: Value,
    pub bytes_down: Value,
    pub duration_ms: Value,
    /// Statements seen (PostgreSQL sessions).
    pub statements: Value,
}

pub fn list(audit_dir: &Path) -> Result<Vec<Session>> {
    Ok(assemble(&audit::read_all(audit_dir)?))
}

pub fn assemble(records: &[Entry]) -> Vec<Session> {
    let mut out: Vec<Session> = Vec::new();
    let get = |r: &Entry, k: &str| r.fields.get(k).cloned().unwrap_or(Value::Null);
    for r in records {
        match r.event.as_str() {
            "open" => out.push(Session {
                id: r.session.clone().unwrap_or_default(),
                started: r.ts.clone(),
                ended: None,
                outcome: "open".into(),
                workload: get(r, "workload"),
                destination: get(r, "destination"),
                rule: get(r, "rule"),
                bytes_up: Value::Null,
                bytes_down: Value::Null,
                duration_ms: Value::Null,
                statements: Value::Null,
            }),
            "close" => {
                if let Some(s) = out.iter_mut().rev().find(|s| Some(&s.id) == r.session.as_ref()) {
                    s.ended = Some(r.ts.clone());
                    s.outcome = get(r, "outcome").as_str().unwrap_or("closed").to_string();
                    s.bytes_up = get(r, "bytes_up");
                    s.bytes_down = get(r, "bytes_down");
                    s.duration_ms = get(r, "duration_ms");
                    s.statements = get(r, "statements");
                }
            }
            "reject" => out.push(Session {
                id: r.session.clone().unwrap_or_else(|| "-".into()),
                started: r.ts.clone(),
                ended: Some(r.ts.clone()),
                outcome: format!("rejected: {}", get(r, "reason").as_str().unwrap_or("?")),
                workload: r.fields.get("workload").cloned().unwrap_or_else(|| get(r, "peer")),
                destination: get(r, "destination"),
                rule: Value::Null,
                bytes_up: Value::Null,
                bytes_down: Value::Null,
                duration_ms: Value::Null,
                statements: Value::Null,
            }),
            _ => {}
        }
    }
    out
}

/// `--since`: an RFC 3339 time, or an age ("90s", "30m", "2h", "7d").
pub fn parse_since(s: &str) -> Result<std::time::SystemTime> {
    if let Some(t) = audit::parse_rfc3339(s) {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        num.parse().map_err(|_| anyhow::anyhow!("--since {s:?}: use an RFC 3339 time or an age like 30m, 2h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("--since {s:?}: the unit is s, m, h or d"),
    };
    Ok(std::time::SystemTime::now() - std::time::Duration::from_secs(secs))
}

pub fn filter(list: Vec<Session>, identity: Option<&str>, since: Option<std::time::SystemTime>) -> Vec<Session> {
    list.into_iter()
        .filter(|s| since.is_none_or(|t| audit::parse_rfc3339(&s.started).is_some_and(|st| st >= t)))
        .filter(|s| {
            identity.is_none_or(|needle| {
                ["cgroup", "tagged_cgroup", "unit", "slice", "container", "user", "comm", "pid", "uid", "profile"]
                    .iter()
                    .filter_map(|k| s.workload.get(*k))
                    .any(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string).contains(needle))
            })
        })
        .collect()
}

/// One line per session, for people.
pub fn render_table(sessions: &[Session]) -> String {
    let mut s = format!(
        "{:<18} {:<27} {:<24} {:<30} {:>7} {:<8} {:<22} {:>9} {:>9}  {}\n",
        "SESSION", "STARTED", "CGROUP", "UNIT/COMM", "PID", "USER", "DESTINATION", "UP", "DOWN", "OUTCOME"
    );
    for x in sessions {
        let w = &x.workload;
        let field = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let cgroup = if w.is_string() { "(unidentified)".to_string() } else { field("cgroup") };
        let unit = w.get("unit").and_then(Value::as_str).map_or_else(|| field("comm"), str::to_string);
        let user = w
            .get("user")
            .and_then(Value::as_str)
            .map_or_else(|| w.get("uid").map_or("-".to_string(), ToString::to_string), str::to_string);
        let pid = w.get("pid").map_or("-".to_string(), ToString::to_string);
        let num = |v: &Value| if v.is_null() { "-".to_string() } else { v.to_string() };
        s.push_str(&format!(
            "{:<18} {:<27} {:<24} {:<30} {:>7} {:<8} {:<22} {:>9} {:>9}  {}\n",
            x.id,
            x.started,
            cgroup,
            unit,
            pid,
            user,
            x.destination.as_str().unwrap_or("-"),
            num(&x.bytes_up),
            num(&x.bytes_down),
            x.outcome
        ));
    }
    s
}

#[cfg(test)]
#[path = "tests/sessions.rs"]
mod tests;

/// A statement that carried a value, found by its keyed hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    pub session: String,
    pub stmt: u64,
    pub seq: u64,
    pub ts: String,
    /// "text" (a literal) or "parameter".
    pub r#in: &'static str,
}

/// `cordon audit find --value V`: the statements whose literals or bind
/// parameters were V, by V's keyed hashes (V is never stored).
pub fn find(
    dir: &std::path::Path,
    key: &crate::pipeline::literals::LiteralKey,
    value: &str,
) -> anyhow::Result<Vec<Found>> {
    let wanted = key.hashes(value);
    let has = |s: &str| s.split(' ').any(|h| wanted.iter().any(|w| w == h));
    let mut out = Vec::new();
    for r in crate::audit::read_all(dir)? {
        if r.event != "statement" {
            continue;
        }
        let f = &r.fields;
        let in_text = f.get("literals").and_then(|l| l.as_array()).is_some_and(|ls| {
            ls.iter().any(|l| l["hashes"].as_array().is_some_and(|hs| hs.iter().any(|h| h.as_str().is_some_and(has))))
        });
        let in_params =
            f.get("params").and_then(|p| p.as_array()).is_some_and(|ps| ps.iter().any(|p| p.as_str().is_some_and(has)));
        if in_text || in_params {
            out.push(Found {
                session: r.session.clone().unwrap_or_default(),
                stmt: f.get("stmt").and_then(|v| v.as_u64()).unwrap_or(0),
                seq: r.seq,
                ts: r.ts.clone(),
                r#in: if in_text { "text" } else { "parameter" },
            });
        }
    }
    Ok(out)
}
