//! `cordon replay SESSION`: a session as the client saw it.
//!
//! With a recording (the profile had `record_results = true`) the output is
//! the statements with their columns, rows, notices, errors and command tags,
//! rows printed as psql's unaligned format prints them (`a|b`, NULL empty).
//! The recording's SHA-256 is checked against the hash-chained close record
//! first. Without a recording it is the statements, row counts and errors
//! from the audit log.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::{self, Entry};

/// How an SSH recording is shown.
#[derive(Debug, Clone, Copy)]
pub enum Play {
    /// In the terminal, with the recorded timing unless `wait` is false.
    Terminal { wait: bool, speed: f64 },
    /// Converted to asciicast v2 on stdout.
    AsciicastV2,
}

/// `cordon replay`: PostgreSQL sessions as text, SSH sessions played.
pub fn replay_to(audit_dir: &Path, session: &str, play: Play, out: &mut dyn std::io::Write) -> Result<()> {
    let records: Vec<Entry> =
        audit::read_all(audit_dir)?.into_iter().filter(|r| r.session.as_deref() == Some(session)).collect();
    let casts = records
        .iter()
        .find(|r| r.event == "close")
        .and_then(|c| c.fields.get("recordings"))
        .and_then(Value::as_array)
        .cloned();
    match casts {
        Some(casts) if !casts.is_empty() => {
            for c in &casts {
                play_cast(c, play, out)?;
            }
            Ok(())
        }
        _ => {
            out.write_all(replay(audit_dir, session)?.as_bytes())?;
            Ok(())
        }
    }
}

/// One channel's asciicast v3 recording, checked against the hash in the
/// close record first.
fn play_cast(c: &Value, play: Play, out: &mut dyn std::io::Write) -> Result<()> {
    let path = c.get("path").and_then(Value::as_str).context("a recording without a path")?;
    let sha = c.get("sha256").and_then(Value::as_str).context("a recording without a hash")?;
    let mut bytes = Vec::new();
    File::open(path).with_context(|| format!("opening the recording {path}"))?.read_to_end(&mut bytes)?;
    if hex::encode(Sha256::digest(&bytes)) != sha {
        bail!("the recording {path} does not match the hash in the audit log: it was altered");
    }
    let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty() && !l.starts_with(b"#"));
    let header: Value =
        serde_json::from_slice(lines.next().context("an empty recording")?).context("the recording's header")?;
    let mut at = 0.0f64;
    if let Play::AsciicastV2 = play {
        let v2 = serde_json::json!({
            "version": 2,
            "width": header["term"]["cols"],
            "height": header["term"]["rows"],
            "timestamp": header["timestamp"],
            "title": header["title"],
            "command": header["command"],
        });
        writeln!(out, "{v2}")?;
    }
    for l in lines {
        let ev: Value = serde_json::from_slice(l).context("a recording event")?;
        let dt = ev.get(0).and_then(Value::as_f64).unwrap_or(0.0);
        let code = ev.get(1).and_then(Value::as_str).unwrap_or("");
        let data = ev.get(2).and_then(Value::as_str).unwrap_or("");
        at += dt;
        match play {
            Play::AsciicastV2 => {
                if matches!(code, "o" | "r" | "m") {
                    writeln!(out, "{}", serde_json::json!([(at * 1000.0).round() / 1000.0, code, data]))?;
                }
            }
            Play::Terminal { wait, speed } => {
                if wait && dt > 0.0 {
                    let s = (dt / speed.max(0.01)).min(5.0);
                    std::thread::sleep(std::time::Duration::from_secs_f64(s));
                }
                if code == "o" {
                    out.write_all(data.as_bytes())?;
                    out.flush()?;
                }
            }
        }
    }
    Ok(())
}

pub fn replay(audit_dir: &Path, session: &str) -> Result<String> {
    let records: Vec<Entry> =
        audit::read_all(audit_dir)?.into_iter().filter(|r| r.session.as_deref() == Some(session)).collect();
    let Some(open) = records.iter().find(|r| r.event == "open") else {
        bail!("no session {session:?} in {} (see `cordon sessions list`)", audit_dir.display());
    };
    let mut out = String::new();
    header(&mut out, session, open, records.iter().find(|r| r.event == "close"));
    let recording = records
        .iter()
        .find(|r| r.event == "close")
        .and_then(|c| c.fields.get("recording"))
        .and_then(|r| Some((r.get("path")?.as_str()?.to_string(), r.get("sha256")?.as_str()?.to_string())));
    match recording {
        Some((path, sha)) => from_recording(&mut out, Path::new(&path), &sha)?,
        None => from_audit(&mut out, &records),
    }
    Ok(out)
}

fn header(out: &mut String, session: &str, open: &Entry, close: Option<&Entry>) {
    let w = open.fields.get("workload").cloned().unwrap_or(Value::Null);
    let s = |k: &str| w.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default();
    let _ = writeln!(
        out,
        "-- session {session} at {}: cgroup {} pid {} uid {} ({}) comm {} -> {}",
        open.ts,
        s("cgroup"),
        s("pid"),
        s("uid"),
        s("user"),
        s("comm"),
        open.fields.get("destination").and_then(Value::as_str).unwrap_or("?"),
    );
    if let Some(c) = close {
        let f = |k: &str| {
            c.fields.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "-- ended {}: {} ({} statements, {} ms)",
            c.ts,
            f("outcome"),
            f("statements"),
            f("duration_ms")
        );
    }
}

fn from_recording(out: &mut String, path: &Path, sha: &str) -> Result<()> {
    let mut bytes = Vec::new();
    File::open(path).with_context(|| format!("opening the recording {}", path.display()))?.read_to_end(&mut bytes)?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != sha {
        bail!("the recording {} does not match the hash in the audit log: it was altered", path.display());
    }
    for line in BufReader::new(bytes.as_slice()).lines() {
        let ev: Value = serde_json::from_str(&line?).context("a recording line does not parse")?;
        let get = |k: &str| ev.get(k).cloned().unwrap_or(Value::Null);
        match ev.get("ev").and_then(Value::as_str).unwrap_or("") {
            "query" => {
                let _ = writeln!(out, "=> {}", get("text").as_str().unwrap_or(""));
            }
            "columns" => {
                let names: Vec<String> = get("names")
                    .as_array()
                    .map(|a| a.iter().map(|n| n.as_str().unwrap_or("").to_string()).collect())
                    .unwrap_or_default();
                let _ = writeln!(out, "{}", names.join("|"));
            }
            "row" => {
                let values: Vec<String> = get("values")
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect())
                    .unwrap_or_default();
                let _ = writeln!(out, "{}", values.join("|"));
            }
            "end" => {
                let o = get("outcome");
                let tags: Vec<String> = o
                    .get("tags")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter().filter_map(|t| t.as_str()).filter(|t| !t.is_empty()).map(str::to_string).collect()
                    })
                    .unwrap_or_default();
                let mut line =
                    format!("-- {}", if tags.is_empty() { "(no result)".to_string() } else { tags.join(", ") });
                if o.get("skipped").and_then(Value::as_bool) == Some(true) {
                    line.push_str(" (skipped: an earlier error aborted the pipeline)");
                }
                let _ = writeln!(out, "{line}");
            }
            "error" | "notice" => {
                let _ = writeln!(
                    out,
                    "{}:  {}: {}",
                    get("severity").as_str().unwrap_or("?"),
                    get("code").as_str().unwrap_or(""),
                    get("message").as_str().unwrap_or("")
                );
            }
            "held" => {
                let _ = writeln!(
                    out,
                    "-- held for approval: request {} (rule {}: {})",
                    get("request").as_str().unwrap_or(""),
                    get("rule").as_str().unwrap_or(""),
                    get("reason").as_str().unwrap_or("")
                );
            }
            "decision" => {
                let _ = writeln!(out, "{}", decision_line(&ev));
            }
            "notification" => {
                let _ = writeln!(
                    out,
                    "Asynchronous notification \"{}\" with payload \"{}\" received from server process with PID {}.",
                    get("channel").as_str().unwrap_or(""),
                    get("payload").as_str().unwrap_or(""),
                    get("pid")
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// "-- approved by alice, bob (request ap-…)" and the like.
fn decision_line(ev: &Value) -> String {
    let id = ev.get("request").and_then(Value::as_str).unwrap_or("");
    let by = match ev.get("by") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let glass = if ev.get("break_glass") == Some(&Value::Bool(true)) { " (BREAK-GLASS)" } else { "" };
    match ev.get("decision").and_then(Value::as_str).unwrap_or("") {
        "approved" | "granted" => format!("-- approved by {by}{glass} (request {id})"),
        "grant_used" => format!("-- released by the window grant of request {id}"),
        "denied" => {
            format!("-- denied by {by}: {} (request {id})", ev.get("reason").and_then(Value::as_str).unwrap_or(""))
        }
        "expired" => format!("-- not approved in time (request {id})"),
        "withdrawn" => {
            format!("-- withdrawn: {} (request {id})", ev.get("cause").and_then(Value::as_str).unwrap_or(""))
        }
        other => format!("-- {other} (request {id})"),
    }
}

fn from_audit(out: &mut String, records: &[Entry]) {
    let _ = writeln!(out, "-- (no result recording for this session: statements and outcomes from the audit log)");
    for r in records {
        match r.event.as_str() {
            "statement" => {
                let _ = writeln!(out, "=> {}", r.fields.get("text").and_then(Value::as_str).unwrap_or(""));
                if let Some(p) = r.fields.get("params") {
                    let _ = writeln!(out, "-- params: {p}");
                }
            }
            "approval_request" => {
                let f = |k: &str| r.fields.get(k).and_then(Value::as_str).unwrap_or("");
                let _ = writeln!(
                    out,
                    "-- held for approval: request {} (rule {}: {})",
                    f("request"),
                    f("rule"),
                    f("reason")
                );
            }
            "approval_granted"
            | "approval_denied"
            | "approval_expired"
            | "approval_withdrawn"
            | "approval_grant_used" => {
                let mut ev = serde_json::Map::new();
                for (k, v) in &r.fields {
                    ev.insert(k.clone(), v.clone());
                }
                let decision = r.event.trim_start_matches("approval_");
                ev.insert("decision".into(), Value::from(decision));
                let _ = writeln!(out, "{}", decision_line(&Value::Object(ev)));
            }
            "statement_end" => {
                let o = r.fields.get("outcome").cloned().unwrap_or(Value::Null);
                if let Some(e) = o.get("error") {
                    let _ = writeln!(
                        out,
                        "{}:  {}: {}",
                        e.get("severity").and_then(Value::as_str).unwrap_or("ERROR"),
                        e.get("code").and_then(Value::as_str).unwrap_or(""),
                        e.get("message").and_then(Value::as_str).unwrap_or("")
                    );
                }
                let tags = o.get("tags").map(ToString::to_string).unwrap_or_default();
                let _ = writeln!(out, "-- {tags} rows={}", o.get("rows").map(ToString::to_string).unwrap_or_default());
            }
            _ => {}
        }
    }
}
