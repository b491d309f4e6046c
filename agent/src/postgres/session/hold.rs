//! A statement held for approval, in PostgreSQL's terms.
//!
//! A simple Query, or an Execute whose statement needs approval, stops the
//! client's batch: what came before it goes upstream, it and everything
//! behind it wait. The client hears at once (a WARNING notice, SQLSTATE
//! CD003, with the request id and the command that approves it); the
//! session keeps reading the client only to notice a disconnect, and a
//! CancelRequest withdraws the request through the hub. When the hub
//! decides, the held message is judged again with the decision: approved,
//! it goes upstream exactly as it was held; otherwise it is answered with
//! 42501 (denied, expired) or 57014 (cancelled) and the rest of the batch
//! goes on as usual.

use super::*;
use crate::{
    approvals::{self, Decision, Submitted},
    audit::Unavailable,
    pipeline::DenyKind,
};

/// Why a statement needs approval (kept with a prepared statement, so each
/// execution is held).
#[derive(Debug)]
pub(super) struct Need {
    pub rule: String,
    pub message: String,
}

/// A client message waiting for approval.
pub(super) struct Held {
    pub need: Arc<Need>,
    pub text: Arc<str>,
    pub literals: Arc<[Literal]>,
    pub params: Vec<(Option<Bytes>, bool)>,
}

/// SQL's own PREPARE and EXECUTE would get around a hold: a statement
/// PREPAREd once (approved once) could be EXECUTEd any number of times, and
/// SQL EXECUTE runs a protocol-level prepared statement without the
/// Execute message cordon holds. So: a statement that needs approval may
/// not be PREPAREd in SQL, and SQL may not EXECUTE (anywhere in a
/// statement: EXPLAIN ANALYZE, CREATE TABLE AS) a prepared statement that
/// needs approval.
pub(super) fn sql_prepare_loopholes(t: &Tracker, text: &str, verdict: Verdict) -> Verdict {
    let approving = matches!(verdict, Verdict::Approve { .. });
    let held_prepared = t.prepared.values().any(|p| p.approval.is_some());
    if verdict.is_deny() || (!approving && !held_prepared) {
        return verdict;
    }
    let Ok(parsed) = pg_query::parse(text, 0) else { return verdict };
    let mut refusal = None;
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_deref() else { continue };
        crate::postgres::sqltree::each_node(stmt, &mut |n| {
            if refusal.is_some() {
                return;
            }
            match n {
                pg_query::NodeEnum::PrepareStmt(p) if approving => {
                    refusal = Some(format!(
                        "PREPARE {} of a statement that needs approval: each execution must be approved, so run it directly or with the protocol's Parse/Execute",
                        p.name
                    ));
                }
                pg_query::NodeEnum::ExecuteStmt(e)
                    if t.prepared.get(e.name.as_bytes()).is_some_and(|p| p.approval.is_some()) =>
                {
                    refusal = Some(format!(
                        "SQL EXECUTE of prepared statement {:?}, which needs approval at each execution: execute it with the protocol's Execute, where cordon holds it",
                        e.name
                    ));
                }
                _ => {}
            }
        });
    }
    match refusal {
        Some(message) => Verdict::Deny { rule: "approval".into(), message },
        None => verdict,
    }
}

/// How a hold ended, for the held message's second judgement.
pub(super) enum Settled {
    Decided(Decision),
    /// The request could not be recorded: refused, like any statement
    /// while the audit log is down.
    AuditDown(Unavailable),
}

/// The verdict a held statement is admitted with, the decision for its
/// record, and the error class if refused.
pub(super) fn settle(need: &Need, s: Settled) -> (Verdict, Option<Decision>, DenyKind) {
    let deny = |message: String| Verdict::Deny { rule: need.rule.clone(), message };
    match s {
        Settled::AuditDown(u) => {
            (Verdict::Deny { rule: "audit".into(), message: u.to_string() }, None, DenyKind::AuditUnavailable)
        }
        Settled::Decided(d) => {
            let (verdict, kind) = match &d {
                Decision::Approved { .. } => (Verdict::Allow, DenyKind::Policy),
                Decision::Denied { id, by, reason } => {
                    (deny(format!("{}; request {id} was denied by {by}: {reason}", need.message)), DenyKind::Policy)
                }
                Decision::Expired { id, after } => (
                    deny(format!(
                        "{}; request {id} was not approved within {} s (approvals.hold_timeout), so it is denied",
                        need.message,
                        after.as_secs()
                    )),
                    DenyKind::Policy,
                ),
                Decision::Withdrawn { id, cause } => (
                    Verdict::Deny {
                        rule: "cancel".into(),
                        message: format!(
                            "canceling statement due to user request (approval request {id} withdrawn: {cause})"
                        ),
                    },
                    DenyKind::Cancelled,
                ),
            };
            (verdict, Some(d), kind)
        }
    }
}

/// Submit the held message and wait for its decision. Errors end the
/// session (the client went away while it waited).
pub(super) async fn wait(
    held: &Held,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    reader: &mut FrameReader,
    cr: &mut ReadHalf<Stream>,
    wake: &tokio::sync::Notify,
) -> Result<Settled> {
    let Some(settings) = ctx.profile.approvals.as_ref() else {
        // A validated policy has approvers wherever a rule approves; fail
        // closed if not.
        let id = String::from("none");
        return Ok(Settled::Decided(Decision::Denied {
            id,
            by: "cordon".into(),
            reason: format!("profile {} names no approvers", ctx.profile.name),
        }));
    };
    let request = {
        let t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
        request(&t, held, ctx)
    };
    let mut hold = match ctx.shared.approvals.submit(request, settings) {
        Err(u) => return Ok(Settled::AuditDown(u)),
        Ok(Submitted::Granted(d)) => return Ok(Settled::Decided(d)),
        Ok(Submitted::Held(h)) => h,
    };
    {
        let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
        t.holding = true;
        let text = t.pipeline.recorded_text(&held.text, &held.literals);
        t.pipeline.hold_event(
            "held",
            serde_json::json!({"request": hold.id, "rule": held.need.rule, "reason": held.need.message, "text": text}),
        );
        let detail = format!(
            "request {}; rule {}: {}; approvers: {}; {} of them must approve within {} s",
            hold.id,
            held.need.rule,
            held.need.message,
            settings.approvers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            settings.required,
            hold.timeout.as_secs()
        );
        let hint = format!(
            "approve it with: cordon approvals approve {}   (or deny: cordon approvals deny {} --reason …)",
            hold.id, hold.id
        );
        let message = format!("cordon: statement held for approval (request {})", hold.id);
        wire::notice_with(
            &mut t.to_client,
            &[
                (b'S', "WARNING"),
                (b'V', "WARNING"),
                (b'C', wire::code::HELD),
                (b'M', &message),
                (b'D', &detail),
                (b'H', &hint),
            ],
        );
    }
    wake.notify_one();
    // Messages pipelined behind the held one wait in the reader, up to a
    // bound; reading on only tells whether the client is still there.
    let cap = ctx.shared.max_message_bytes().max(64 * 1024);
    let decided = loop {
        tokio::select! {
            d = hold.decision() => break d,
            n = reader.fill(cr), if reader.buffered() < cap => match n {
                Ok(0) | Err(_) => {
                    hold.withdraw("client_disconnected");
                    bail!("the client disconnected while statement {} was held for approval", hold.id);
                }
                Ok(_) => {}
            },
        }
    };
    if let Ok(mut t) = tracker.lock() {
        t.holding = false;
        t.last_activity = Instant::now();
        t.pipeline.hold_event("decision", decision_json(&decided));
    }
    Ok(Settled::Decided(decided))
}

fn decision_json(d: &Decision) -> serde_json::Value {
    use serde_json::json;
    match d {
        Decision::Approved { id, by, break_glass, window } => {
            json!({"request": id, "decision": "approved", "by": by, "break_glass": break_glass, "window": window})
        }
        Decision::Denied { id, by, reason } => json!({"request": id, "decision": "denied", "by": by, "reason": reason}),
        Decision::Expired { id, after } => json!({"request": id, "decision": "expired", "after_s": after.as_secs()}),
        Decision::Withdrawn { id, cause } => json!({"request": id, "decision": "withdrawn", "cause": cause}),
    }
}

/// The statement as approvers see it: its text, then each parameter.
fn shown(held: &Held) -> String {
    let mut s = held.text.to_string();
    for (i, (v, binary)) in held.params.iter().enumerate() {
        let v = match v {
            None => "NULL".to_string(),
            Some(b) if *binary => format!("(binary) {}", hex::encode(b)),
            Some(b) => format!("'{}'", String::from_utf8_lossy(b).replace('\'', "''")),
        };
        s.push_str(&format!("\n-- ${} = {v}", i + 1));
    }
    s
}

/// The request the hub records and approvers see.
fn request(t: &Tracker, held: &Held, ctx: &Ctx) -> approvals::Request {
    let text = t.pipeline.recorded_text(&held.text, &held.literals);
    let w = &ctx.workload;
    let identity = format!("{}|{}|{}|{}", w.cgroup_id, w.uid, w.pid, w.cgroup.as_deref().unwrap_or(""));
    let mut parts: Vec<&[u8]> = vec![
        held.text.as_bytes(),
        t.gov.db.as_bytes(),
        t.gov.upstream_user.as_bytes(),
        identity.as_bytes(),
        ctx.session.as_bytes(),
    ];
    let flags: Vec<[u8; 2]> = held.params.iter().map(|(v, bin)| [u8::from(v.is_some()), u8::from(*bin)]).collect();
    for ((v, _), f) in held.params.iter().zip(&flags) {
        parts.push(f);
        parts.push(v.as_deref().unwrap_or(&[]));
    }
    let binding = approvals::binding(&parts);
    // A window grant covers texts that differ only in their constants, as
    // PostgreSQL's own scanner reads them (comments and spacing do not
    // count; anything else does). A text the scanner cannot read gets its
    // binding: it matches only itself.
    let fingerprint = match crate::postgres::shape::scan(&held.text).key {
        Some(key) => approvals::binding(&[b"shape", key.as_bytes()]),
        None => binding.clone(),
    };
    approvals::Request {
        session: ctx.session.clone(),
        protocol: "postgres",
        profile: ctx.profile.name.clone(),
        workload: ctx.workload.clone(),
        upstream: ctx.upstream.to_string(),
        database: Some(t.gov.db.clone()),
        upstream_user: Some(t.gov.upstream_user.clone()),
        rule: held.need.rule.clone(),
        reason: held.need.message.clone(),
        text,
        full_text: shown(held),
        param_count: held.params.len(),
        binding,
        fingerprint,
    }
}
