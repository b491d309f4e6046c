//! Append-only, hash-chained audit log.
//!
//! Layout under the audit directory:
//! - `audit-<first seq, 12 digits>.jsonl`: segments of JSON Lines. Each
//!   record carries `seq` (one more than the previous) and `prev`, the
//!   SHA-256 of the previous record's line. The first record ever has
//!   `prev` = 64 zeros.
//! - `audit.head`: seq and hash of the last record known to be on disk,
//!   rewritten after every sync, so removing records from the end is
//!   detected.
//! - `audit.anchor`: seq and hash where the chain in this directory starts
//!   (after retention pruned older segments, or after the directory was
//!   recreated during an outage), so the chain stays verifiable.
//!
//! Durability (see `writer.rs`): a record is *written* (in the kernel, in
//! the segment file) before the caller goes on, so `kill -9` of the agent
//! loses nothing a client was shown. It is *synced* (fdatasync) by one
//! thread that group-commits every `sync_interval`, or at once for
//! `audit_durability = "statement"` and for records written with
//! [`AuditLog::write_durable`].
//!
//! Faults: a record that did not land whole is cut off again and the chain
//! position rolled back, so nothing ever chains onto a torn record. While
//! the log cannot be written, every append fails with [`Unavailable`]
//! (callers refuse the session or statement and say why); the writer retries
//! on its own and records the outage once it can write again.

mod read;
pub mod time;
mod writer;

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use read::{read_all, segments, verify, Verified};
pub use time::{format_rfc3339, now_rfc3339, parse_rfc3339};
pub use writer::{AuditLog, Ticket};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HEAD: &str = "audit.head";
const ANCHOR: &str = "audit.anchor";

/// One audit record being built. `event` says which: `open`, `close`,
/// `reject`, `statement`, `statement_end`, `cancel`, `agent`.
///
/// Fields are serialised once, as they are added (`with`), into `body`: the
/// writer puts `seq`, `prev`, `ts`, `event` and `session` in front and the
/// line is done, with no intermediate `Value` tree per record. What is read
/// back from the log is an [`Entry`].
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// RFC 3339 UTC time.
    pub ts: String,
    pub event: String,
    pub session: Option<String>,
    /// `,"key":value` for each field, in the order added (JSON, UTF-8).
    body: Vec<u8>,
    /// Where each field lies in `body` (key, start, end): a key added again
    /// replaces the earlier value, as a map would.
    spans: Vec<(&'static str, usize, usize)>,
}

impl Record {
    pub fn new(event: &str, session: Option<&str>) -> Self {
        Self {
            ts: now_rfc3339(),
            event: event.to_string(),
            session: session.map(str::to_string),
            // A statement record's fields fit here: growing the buffer
            // field by field was a realloc per record.
            body: Vec::with_capacity(256),
            spans: Vec::with_capacity(8),
        }
    }

    /// Add a field. Keys are names in cordon's code, never input.
    pub fn with(mut self, key: &'static str, value: impl Serialize) -> Self {
        if let Some(i) = self.spans.iter().position(|(k, _, _)| *k == key) {
            let (_, start, end) = self.spans.remove(i);
            self.body.drain(start..end);
            for span in &mut self.spans {
                if span.1 >= end {
                    span.1 -= end - start;
                    span.2 -= end - start;
                }
            }
        }
        let start = self.body.len();
        self.body.push(b',');
        // A key that needs no escaping (all of cordon's) is copied as it is.
        if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.body.push(b'"');
            self.body.extend_from_slice(key.as_bytes());
            self.body.push(b'"');
        } else {
            // Writing JSON into a Vec fails only for values serde cannot
            // express (a map with non-string keys): those become null.
            let _ = serde_json::to_writer(&mut self.body, key);
        }
        self.body.push(b':');
        let value_at = self.body.len();
        if serde_json::to_writer(&mut self.body, &value).is_err() {
            self.body.truncate(value_at);
            self.body.extend_from_slice(b"null");
        }
        self.spans.push((key, start, self.body.len()));
        self
    }

    /// A copy of a base record under another event name, stamped now.
    pub fn with_event(mut self, event: &str) -> Self {
        event.clone_into(&mut self.event);
        self.ts = now_rfc3339();
        self
    }

    /// The record's line with the writer's `seq` and `prev`, appended to
    /// `out` (no newline).
    pub(crate) fn write_line(&self, seq: u64, prev: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
        use std::io::Write;
        let _ = write!(out, "{{\"seq\":{seq},\"prev\":");
        serde_json::to_writer(&mut *out, prev)?;
        out.extend_from_slice(b",\"ts\":");
        serde_json::to_writer(&mut *out, &self.ts)?;
        out.extend_from_slice(b",\"event\":");
        serde_json::to_writer(&mut *out, &self.event)?;
        if let Some(session) = &self.session {
            out.extend_from_slice(b",\"session\":");
            serde_json::to_writer(&mut *out, session)?;
        }
        out.extend_from_slice(&self.body);
        out.push(b'}');
        Ok(())
    }

    /// One field's value, parsed back (for tests, and the rare reader of a
    /// record still being built).
    pub fn field(&self, key: &str) -> Option<Value> {
        let (_, start, end) = self.spans.iter().find(|(k, _, _)| *k == key)?;
        let key_len = serde_json::to_vec(key).ok()?.len();
        // `,` + the key's JSON + `:` come before the value.
        let value = self.body.get(start + 1 + key_len + 1..*end)?;
        serde_json::from_slice(value).ok()
    }
}

/// One audit record as read back from the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Position in the chain; set by the writer.
    #[serde(default)]
    pub seq: u64,
    /// SHA-256 (hex) of the previous record's line; set by the writer.
    #[serde(default)]
    pub prev: String,
    /// RFC 3339 UTC time.
    pub ts: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub session: Option<String>,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
}

/// When a written record is also made durable (fdatasync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Group commit every `sync_interval`: a host crash (not an agent crash)
    /// can lose the records of that last interval.
    Interval,
    /// A statement's result waits for its record's fdatasync (group-committed
    /// across sessions).
    Statement,
}

/// Warn when the audit filesystem has less than this left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceLeft {
    Percent(u8),
    Bytes(u64),
}

impl SpaceLeft {
    /// Parse `"10%"` or a byte count with an optional K/M/G suffix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n) if (1..=99).contains(&n) => Ok(Self::Percent(n)),
                _ => Err(format!("{s:?}: a percentage from 1% to 99%")),
            };
        }
        let upper = s.to_ascii_uppercase();
        let upper = upper.trim_end_matches('B');
        let (num, mult) = [('K', 1u64 << 10), ('M', 1 << 20), ('G', 1 << 30)]
            .into_iter()
            .find_map(|(suffix, mult)| upper.strip_suffix(suffix).map(|n| (n, mult)))
            .unwrap_or((upper, 1));
        match num.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Self::Bytes(n.saturating_mul(mult))),
            _ => Err(format!("{s:?}: a percentage (\"10%\") or a size (\"512MB\", \"2G\")")),
        }
    }

    fn threshold(self, total: u64) -> u64 {
        match self {
            Self::Percent(p) => total / 100 * u64::from(p),
            Self::Bytes(b) => b,
        }
    }
}

impl fmt::Display for SpaceLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Percent(p) => write!(f, "{p}%"),
            Self::Bytes(b) => write!(f, "{b} bytes"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A segment is closed once it is larger than this.
    pub segment_max_bytes: u64,
    /// Whole segments whose newest record is older than this are pruned.
    pub retention: Option<Duration>,
    pub durability: Durability,
    /// Longest a written record waits for its fdatasync.
    pub sync_interval: Duration,
    /// Below this much free space, warn (log and an `audit_space_low` record).
    pub space_left: Option<SpaceLeft>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            segment_max_bytes: 64 * 1024 * 1024,
            retention: None,
            durability: Durability::Interval,
            sync_interval: Duration::from_millis(10),
            space_left: Some(SpaceLeft::Percent(10)),
        }
    }
}

/// Why the log cannot be written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    NoSpace,
    ReadOnly,
    DirectoryMissing,
    Io,
    /// The directory holds a chain that does not end where cordon's does.
    Diverged,
}

/// The audit log cannot be written: every session and statement is refused
/// with this, in the client's protocol, until it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub cause: Cause,
    /// What failed, on which path, with the OS error.
    pub detail: String,
    /// What the operator should do.
    pub action: String,
}

impl Unavailable {
    fn from_io(e: &std::io::Error, what: &str, dir: &std::path::Path) -> Self {
        let cause = match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => Cause::NoSpace,
            Some(libc::EROFS) => Cause::ReadOnly,
            Some(libc::ENOENT) => Cause::DirectoryMissing,
            _ => Cause::Io,
        };
        Self::new(cause, format!("{what}: {e}"), dir)
    }

    fn new(cause: Cause, detail: String, dir: &std::path::Path) -> Self {
        let d = dir.display();
        let action = match cause {
            Cause::NoSpace => format!("free space on the filesystem that holds {d}, or point agent.audit_dir at a larger one"),
            Cause::ReadOnly => format!("the filesystem that holds {d} is read-only: check the kernel log, repair it and mount it read-write"),
            Cause::DirectoryMissing => format!("recreate {d} (mode 0700, owned by the agent's user) or restore it; cordon continues the chain there"),
            Cause::Io => format!("check the disk that holds {d} and the kernel log (dmesg)"),
            Cause::Diverged => format!("{d} holds records cordon did not write: move them aside; cordon then continues its chain in the empty directory"),
        };
        Self { cause, detail, action }
    }

    fn cause_text(&self) -> &'static str {
        match self.cause {
            Cause::NoSpace => "no space left",
            Cause::ReadOnly => "read-only filesystem",
            Cause::DirectoryMissing => "audit directory missing",
            Cause::Io => "I/O error",
            Cause::Diverged => "the audit directory holds another chain",
        }
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the audit log is unavailable ({}): {}. Operator: {}. Until it can be written, cordon refuses new sessions and statements; it resumes by itself",
            self.cause_text(),
            self.detail,
            self.action
        )
    }
}

impl std::error::Error for Unavailable {}

fn sha256_hex(line: &[u8]) -> String {
    let mut hex = [0u8; 64];
    // Cannot fail: 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(line), &mut hex);
    // Hex digits are ASCII: one copy, not a char at a time.
    std::str::from_utf8(&hex).map(str::to_owned).unwrap_or_default()
}

fn segment_name(first_seq: u64) -> String {
    format!("audit-{first_seq:012}.jsonl")
}

#[cfg(test)]
#[path = "../tests/audit.rs"]
mod tests;
