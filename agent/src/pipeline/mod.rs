//! The protocol-agnostic pipeline every governed session runs through.
//!
//! A protocol adapter (PostgreSQL today; MySQL and SSH next) turns its wire
//! traffic into these calls and never writes audit records itself:
//!
//! - [`SessionPipeline::statement`]: a statement is about to go upstream.
//!   Its `statement` record is written into the audit log before the call
//!   returns, so a statement that ran is in the audit even after `kill -9`
//!   of the agent. If the log cannot be written the statement must be
//!   refused (the adapter says why, in its protocol). With
//!   `audit_durability = "statement"` the adapter also awaits the returned
//!   [`Ticket`] before the client sees any result (the fsync overlaps the
//!   server's execution).
//! - [`SessionPipeline::columns`] / [`SessionPipeline::row`]: the result, for
//!   the session recording (when the profile records results) and, in the
//!   next step, for classification and masking.
//! - [`SessionPipeline::finish`]: rows, timing, error → `statement_end`.
//! - [`SessionPipeline::notice`]: notices and notifications, for replay.

pub mod classify;
pub mod detect;
pub mod fingerprint;
pub mod guard;
pub mod literals;
pub mod mask;
pub mod params;
pub mod plan;
pub mod recorder;
pub mod stream_mask;

use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::audit::{AuditLog, Durability, Record, Ticket, Unavailable};
pub use params::{Param, ParamMode, ParamPolicy};
pub use recorder::Recorder;

/// What a profile asks the pipeline to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordPolicy {
    pub params: ParamPolicy,
    /// How statement text is recorded (literals as keyed hashes).
    pub text: literals::TextMode,
    /// Keep result rows, notices and errors as the client received them.
    pub results: bool,
}

/// Why a statement reached the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    /// A simple-protocol query (possibly several statements).
    Simple,
    /// An Execute of a bound portal.
    Execute,
    /// A fast-path function call.
    FunctionCall,
    /// An SSH exec request (the command sshd would run).
    Command,
    /// An SSH interactive shell, subsystem (sftp) or transfer.
    Channel,
}

pub struct Statement<'a> {
    pub text: &'a str,
    /// The literals in `text`, found by the adapter.
    pub literals: &'a [literals::Literal],
    pub kind: StatementKind,
    pub params: &'a [Param<'a>],
    /// Prepared-statement name, when named.
    pub prepared: Option<&'a str>,
    /// The approval that released it, if it was held.
    pub approval: Option<&'a crate::approvals::Decision>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with the rule that refused it and a message for the client.
    Deny {
        rule: String,
        message: String,
    },
    /// Held until people approve it (`approvals`); the rule that asked, and
    /// why, for the approvers and the client's notice.
    Approve {
        rule: String,
        message: String,
    },
}

impl Verdict {
    /// The stricter of two verdicts: deny, then approve, then allow.
    pub fn and(self, other: Verdict) -> Verdict {
        match (&self, &other) {
            (Verdict::Deny { .. }, _) => self,
            (_, Verdict::Deny { .. }) => other,
            (Verdict::Approve { .. }, _) => self,
            _ => other,
        }
    }

    pub fn is_deny(&self) -> bool {
        matches!(self, Verdict::Deny { .. })
    }
}

/// A statement that was let through.
pub struct Admitted {
    pub id: u64,
    pub started: Instant,
    /// The statement record was written (false: refused, the log is down;
    /// no `statement_end` follows).
    pub recorded: bool,
}

/// How a statement ended, as the server reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Command tags, e.g. ["SELECT 3"] (several for a multi-statement query).
    pub tags: Vec<String>,
    pub rows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ServerError>,
    /// Not executed: an earlier error in the same pipeline aborted it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Suspended by a row limit (portal still open).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// Refused by cordon (guardrail, label or classification failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<Denied>,
    /// Values masked, by "column/strategy" or "column/detector:kind".
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub masked: std::collections::BTreeMap<String, u64>,
    /// Bytes sent to the workload (SSH channels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denied {
    pub rule: String,
    pub message: String,
    /// Why, for the protocol's error code.
    #[serde(skip)]
    pub kind: DenyKind,
}

/// Why a statement was refused, for the protocol's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyKind {
    /// A policy rule (guardrails, masking, classification).
    #[default]
    Policy,
    /// The audit log cannot be written.
    AuditUnavailable,
    /// An agent limit (message size, connections, timeouts).
    Limit,
    /// The workload cancelled it (a held statement's request withdrawn).
    Cancelled,
}

impl Denied {
    pub fn policy(rule: &str, message: impl Into<String>) -> Self {
        Self { rule: rule.to_string(), message: message.into(), kind: DenyKind::Policy }
    }

    pub fn audit(u: &Unavailable) -> Self {
        Self { rule: "audit".into(), message: u.to_string(), kind: DenyKind::AuditUnavailable }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// How a held statement's request ended, for its statement record.
fn approval_fields(d: &crate::approvals::Decision) -> serde_json::Value {
    use crate::approvals::Decision;
    match d {
        Decision::Approved { id, by, break_glass, window } => json!({
            "request": id,
            "decision": "approved",
            "by": by,
            "break_glass": break_glass,
            "grant": if *window { "window" } else { "once" },
        }),
        Decision::Denied { id, by, .. } => json!({"request": id, "decision": "denied", "by": by}),
        Decision::Expired { id, after } => json!({"request": id, "decision": "expired", "after_s": after.as_secs()}),
        Decision::Withdrawn { id, cause } => json!({"request": id, "decision": "withdrawn", "cause": cause}),
    }
}

pub struct SessionPipeline {
    audit: AuditLog,
    session: String,
    policy: RecordPolicy,
    key: literals::LiteralKey,
    recorder: Option<Recorder>,
    next_id: u64,
    statements: u64,
}

impl SessionPipeline {
    pub fn new(
        audit: AuditLog,
        session: &str,
        policy: RecordPolicy,
        key: literals::LiteralKey,
        recorder: Option<Recorder>,
    ) -> Self {
        Self { audit, session: session.to_string(), policy, key, recorder, next_id: 0, statements: 0 }
    }

    pub fn session(&self) -> &str {
        &self.session
    }

    /// A statement's text as this session's records hold it (literals
    /// hashed per `record_text`).
    pub fn recorded_text(&self, text: &str, literals: &[literals::Literal]) -> String {
        literals::render(text, literals, self.policy.text, &self.key).0
    }

    pub fn statements(&self) -> u64 {
        self.statements
    }

    /// A statement arrived, with the guardrails' verdict on it; if allowed
    /// it is about to go upstream.
    pub fn statement(
        &mut self,
        s: &Statement<'_>,
        verdict: &Verdict,
    ) -> (Admitted, Result<Option<Ticket>, Unavailable>) {
        self.next_id += 1;
        self.statements += 1;
        let id = self.next_id;
        let normalized = fingerprint::normalize(s.text);
        // What the workload typed is recorded as keyed hashes where it
        // matters (record_text): the audit never holds a card in clear.
        let (text, hashed) = literals::render(s.text, s.literals, self.policy.text, &self.key);
        let mut rec = Record::new("statement", Some(&self.session))
            .with("stmt", id)
            .with("kind", s.kind)
            .with("text", &text)
            .with("fingerprint", fingerprint::fingerprint(&normalized))
            .with("normalized", &normalized);
        if !hashed.is_empty() {
            rec = rec.with("literals", &hashed);
        }
        if let Some(p) = s.prepared {
            rec = rec.with("prepared", p);
        }
        if !s.params.is_empty() {
            rec = rec.with("param_count", s.params.len());
            if let Some(rendered) = self.policy.params.render(s.params, &self.key) {
                rec = rec.with("params", rendered);
            }
        }
        match verdict {
            Verdict::Deny { rule, message } | Verdict::Approve { rule, message } => {
                rec = rec.with("verdict", "deny").with("rule", rule).with("reason", literals::scrub(message));
            }
            Verdict::Allow => {}
        }
        if let Some(d) = s.approval {
            rec = rec.with("approval", approval_fields(d));
        }
        if let Some(r) = &mut self.recorder {
            r.event(id, "query", json!({"text": text}));
        }
        let written = self.audit.append(&rec);
        // A once grant is used up by this execution.
        if let (Ok(_), Some(crate::approvals::Decision::Approved { id: request, window: false, .. })) =
            (&written, s.approval)
        {
            let used = Record::new("approval_consumed", Some(&self.session)).with("request", request).with("stmt", id);
            self.audit.append_lazy(used);
        }
        let recorded = written.is_ok();
        let wait = written.map(|t| (self.audit.durability() == Durability::Statement).then_some(t));
        (Admitted { id, started: Instant::now(), recorded }, wait)
    }

    /// A statement held for approval, and how its hold ended, in the
    /// session recording (under the id it gets when admitted).
    pub fn hold_event(&mut self, kind: &str, body: serde_json::Value) {
        let id = self.next_id + 1;
        if let Some(r) = &mut self.recorder {
            r.event(id, kind, body);
        }
    }

    pub fn columns(&mut self, id: u64, names: &[String]) {
        if let Some(r) = &mut self.recorder {
            r.event(id, "columns", json!({"names": names}));
        }
    }

    pub fn wants_rows(&self) -> bool {
        self.recorder.is_some()
    }

    pub fn row(&mut self, id: u64, values: &[Option<String>]) {
        if let Some(r) = &mut self.recorder {
            r.event(id, "row", json!({"values": values}));
        }
    }

    pub fn notice(&mut self, id: u64, kind: &str, body: serde_json::Value) {
        if let Some(r) = &mut self.recorder {
            r.event(id, kind, body);
        }
    }

    /// The statement ended; its `statement_end` record is queued (written
    /// with the next record or sync; nothing waits for it).
    pub fn finish(&mut self, admitted: &Admitted, outcome: &Outcome) {
        if !admitted.recorded {
            return;
        }
        let duration_us = admitted.started.elapsed().as_micros() as u64;
        if let Some(r) = &mut self.recorder {
            r.event(admitted.id, "end", json!({"outcome": outcome}));
        }
        let rec = Record::new("statement_end", Some(&self.session))
            .with("stmt", admitted.id)
            .with("duration_us", duration_us)
            .with("outcome", outcome);
        self.audit.append_lazy(rec);
    }

    /// Close the recording; its hash goes into the session's close record.
    pub fn close(&mut self) -> Option<serde_json::Value> {
        self.recorder.take().and_then(Recorder::finish)
    }
}
