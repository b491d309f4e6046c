//! Just-in-time approval, for every protocol: a statement (or, later, an
//! SSH exec) that a rule sends for approval is held by its session until
//! enough distinct people approve it, someone denies it, its hold times
//! out, or the workload withdraws it (a cancel, a disconnect).
//!
//! The hub keeps the pending requests and window grants. A protocol
//! submits a [`Request`] and awaits its [`Hold`]; approvers decide through
//! [`Hub::decide`] (the local approvals socket, `socket.rs`). Every step is
//! an audit record in the hash chain: `approval_request`,
//! `approval_decision` (each approver), `approval_granted`,
//! `approval_consumed` / `approval_grant_used`, `approval_denied`,
//! `approval_expired`, `approval_withdrawn`, and `approval_refused` for a
//! decision that was not accepted (self-approval, not an approver, late).
//!
//! An approval is bound exactly: the session releases the very message it
//! held (its bytes never leave the session), and the request carries a
//! hash of the statement text and parameters with the database, upstream
//! user, workload and session. A `once` grant is consumed by that one
//! execution; only a window grant (`grant = "30m"`) covers repeats, of the
//! same fingerprint and rule, from the same workload to the same target.

pub mod cli;
mod fleet;
pub mod identity;
pub mod socket;
pub mod store;
pub mod webhook;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};

use crate::audit::{AuditLog, Record, Unavailable};
pub use fleet::run_store;
pub use identity::Approver;

/// Who may approve: a Unix user, or `%group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Principal {
    User(String),
    Group(String),
}

impl std::str::FromStr for Principal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = |n: &str| {
            !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        match s.strip_prefix('%') {
            Some(g) if ok(g) => Ok(Self::Group(g.to_string())),
            None if ok(s) => Ok(Self::User(s.to_string())),
            _ => Err(format!("{s:?} is not a Unix user name or %group")),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(u) => f.write_str(u),
            Self::Group(g) => write!(f, "%{g}"),
        }
    }
}

/// What an approval covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// That one execution.
    Once,
    /// Repeats of the same fingerprint and rule, by the same workload to the
    /// same target, for this long.
    Window(Duration),
}

/// A profile's `[approvals]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub approvers: Vec<Principal>,
    /// Distinct people who must approve.
    pub required: u32,
    pub hold_timeout: Duration,
    pub grant: Grant,
    /// Who may approve alone, with a reason.
    pub break_glass: Vec<Principal>,
    /// Decisions come from a shared PostgreSQL store instead of this
    /// host's approvals socket (approvers are database roles there).
    pub store: Option<store::StoreSettings>,
    /// The database role each workload user maps to in the store (default:
    /// the same name); that role may not approve the workload's requests.
    pub workload_roles: BTreeMap<String, String>,
    /// Notified on request, decision, expiry and withdrawal.
    pub webhooks: Vec<webhook::Hook>,
}

impl Settings {
    fn names(list: &[Principal], who: &Approver) -> bool {
        list.iter().any(|p| match p {
            Principal::User(u) => who.user.as_deref() == Some(u.as_str()),
            Principal::Group(g) => who.groups.iter().any(|x| x == g),
        })
    }

    pub fn may_approve(&self, who: &Approver) -> bool {
        Self::names(&self.approvers, who)
    }

    pub fn may_break_glass(&self, who: &Approver) -> bool {
        Self::names(&self.break_glass, who)
    }

    /// Whether this person can see requests of this profile at all.
    pub fn concerns(&self, who: &Approver) -> bool {
        who.uid == 0 || self.may_approve(who) || self.may_break_glass(who)
    }
}

/// Who and what a held statement is about, as the protocol describes it.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub session: String,
    pub protocol: &'static str,
    pub profile: String,
    pub workload: crate::identity::Workload,
    /// Where the statement would run: server, database, upstream user.
    pub upstream: String,
    pub database: Option<String>,
    pub upstream_user: Option<String>,
    /// The rule that asked for approval, and why.
    pub rule: String,
    pub reason: String,
    /// The statement as the audit records it (literals hashed per the
    /// profile's record_text).
    pub text: String,
    /// The statement as the workload sent it: shown to approvers only,
    /// never written to disk or sent to a webhook.
    #[serde(skip)]
    pub full_text: String,
    pub param_count: usize,
    /// sha256 over statement, parameters, database, user, workload, session.
    pub binding: String,
    pub fingerprint: String,
}

/// How a hold ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approved { id: String, by: Vec<String>, break_glass: bool, window: bool },
    Denied { id: String, by: String, reason: String },
    Expired { id: String, after: Duration },
    Withdrawn { id: String, cause: &'static str },
}

impl Decision {
    pub fn id(&self) -> &str {
        match self {
            Self::Approved { id, .. }
            | Self::Denied { id, .. }
            | Self::Expired { id, .. }
            | Self::Withdrawn { id, .. } => id,
        }
    }
}

struct Pending {
    req: Arc<Request>,
    settings: Settings,
    created: SystemTime,
    started: Instant,
    deadline: Instant,
    /// (uid, name) of each distinct person who approved.
    approvals: Vec<(u32, String)>,
    tx: Option<oneshot::Sender<Decision>>,
    /// In the shared store (inserted), when the profile uses one.
    published: bool,
}

/// A window grant: repeats pass without a hold until it expires.
struct Window {
    id: String,
    key: WindowKey,
    expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct WindowKey {
    profile: String,
    cgroup: Option<String>,
    uid: u32,
    upstream: String,
    database: Option<String>,
    upstream_user: Option<String>,
    fingerprint: String,
    rule: String,
}

impl WindowKey {
    fn of(r: &Request) -> Self {
        Self {
            profile: r.profile.clone(),
            cgroup: r.workload.tagged_cgroup.clone().or_else(|| r.workload.cgroup.clone()),
            uid: r.workload.uid,
            upstream: r.upstream.clone(),
            database: r.database.clone(),
            upstream_user: r.upstream_user.clone(),
            fingerprint: r.fingerprint.clone(),
            rule: r.rule.clone(),
        }
    }
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<String, Pending>,
    windows: Vec<Window>,
}

/// The agent's approval hub (one per agent, in `Shared`).
pub struct Hub {
    inner: Mutex<Inner>,
    /// Requests the agent ended, to close in the shared store.
    closing: Mutex<Vec<(store::StoreSettings, String, &'static str)>>,
    /// Work for the store task (a new request, a notification).
    pub store_wake: Arc<tokio::sync::Notify>,
    audit: AuditLog,
    /// Events for `cordon approvals watch` (and notifications).
    events: broadcast::Sender<Value>,
}

/// What submitting a request gave.
pub enum Submitted {
    /// A window grant already covers it.
    Granted(Decision),
    /// Held: await the decision.
    Held(Hold),
}

/// A held statement's claim on its request. Dropping it without a decision
/// withdraws the request (the session ended).
pub struct Hold {
    pub id: String,
    pub deadline: Instant,
    pub timeout: Duration,
    rx: oneshot::Receiver<Decision>,
    hub: Arc<Hub>,
    done: bool,
}

impl Hold {
    /// The decision: an approver's, or expiry at the hold timeout.
    pub async fn decision(&mut self) -> Decision {
        let d = match tokio::time::timeout_at(self.deadline.into(), &mut self.rx).await {
            Ok(Ok(d)) => d,
            // The hub dropped the sender without deciding: fail closed.
            Ok(Err(_)) => Decision::Withdrawn { id: self.id.clone(), cause: "agent_shutdown" },
            Err(_) => self.hub.end(&self.id, End::Expired).unwrap_or_else(|| self.late()),
        };
        self.done = true;
        d
    }

    /// The workload withdrew the request (disconnect, cancel).
    pub fn withdraw(&mut self, cause: &'static str) -> Decision {
        self.done = true;
        self.hub.end(&self.id, End::Withdrawn(cause)).unwrap_or_else(|| self.late())
    }

    /// The request was decided just before: the decision is in the channel.
    fn late(&mut self) -> Decision {
        self.rx.try_recv().unwrap_or(Decision::Withdrawn { id: self.id.clone(), cause: "agent_shutdown" })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.hub.end(&self.id, End::Withdrawn("session_ended"));
        }
    }
}

enum End {
    Expired,
    Withdrawn(&'static str),
}

/// The answer to an approver's decision.
#[derive(Debug, Serialize)]
pub struct Answer {
    pub state: &'static str,
    pub message: String,
}

fn now_rfc3339(t: SystemTime) -> String {
    crate::audit::time::format_rfc3339(t)
}

impl Hub {
    pub fn new(audit: AuditLog) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            closing: Mutex::new(Vec::new()),
            store_wake: Arc::new(tokio::sync::Notify::new()),
            audit,
            events,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is one insert or remove): keep serving.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Submit a held statement. Its request record is written first: if
    /// the audit log is down the statement is refused, never held unrecorded.
    pub fn submit(self: &Arc<Self>, req: Request, settings: &Settings) -> Result<Submitted, Unavailable> {
        let key = WindowKey::of(&req);
        let now = Instant::now();
        {
            let mut inner = self.lock();
            inner.windows.retain(|w| w.expires > now);
            if let Some(w) = inner.windows.iter().find(|w| w.key == key) {
                let id = w.id.clone();
                let left = w.expires.saturating_duration_since(now);
                drop(inner);
                let rec = Record::new("approval_grant_used", Some(&req.session))
                    .with("request", &id)
                    .with("rule", &req.rule)
                    .with("fingerprint", &req.fingerprint)
                    .with("binding", &req.binding)
                    .with("window_left_s", left.as_secs());
                let _recorded = self.audit.append(&rec)?;
                return Ok(Submitted::Granted(Decision::Approved {
                    id,
                    by: Vec::new(),
                    break_glass: false,
                    window: true,
                }));
            }
        }
        let id = new_id();
        let rec = Record::new("approval_request", Some(&req.session))
            .with("request", &id)
            .with("workload", &req.workload)
            .with("protocol", req.protocol)
            .with("profile", &req.profile)
            .with("upstream", &req.upstream)
            .with("database", &req.database)
            .with("upstream_user", &req.upstream_user)
            .with("rule", &req.rule)
            .with("reason", crate::pipeline::literals::scrub(&req.reason))
            .with("text", &req.text)
            .with("param_count", req.param_count)
            .with("binding", &req.binding)
            .with("fingerprint", &req.fingerprint)
            .with("required", settings.required)
            .with("hold_timeout_s", settings.hold_timeout.as_secs());
        let _recorded = self.audit.append(&rec)?;
        let (tx, rx) = oneshot::channel();
        let deadline = now + settings.hold_timeout;
        let req = Arc::new(req);
        let pending = Pending {
            req: req.clone(),
            settings: settings.clone(),
            created: SystemTime::now(),
            started: now,
            deadline,
            approvals: Vec::new(),
            tx: Some(tx),
            published: false,
        };
        let summary = summary(&id, &pending, false);
        let stored = pending.settings.store.is_some();
        self.lock().pending.insert(id.clone(), pending);
        if stored {
            self.store_wake.notify_one();
        }
        let _ = self.events.send(json!({"event": "request", "request": summary, "profile": req.profile}));
        tracing::warn!(request = %id, rule = %req.rule, session = %req.session, "statement held for approval");
        Ok(Submitted::Held(Hold { id, deadline, timeout: settings.hold_timeout, rx, hub: self.clone(), done: false }))
    }

    /// End a pending request without approval; None if it was already
    /// decided (its decision is in the hold's channel).
    fn end(&self, id: &str, how: End) -> Option<Decision> {
        let p = self.lock().pending.remove(id)?;
        self.close_in_store(&p, id, if matches!(how, End::Expired) { "expired" } else { "withdrawn" });
        let held = p.started.elapsed();
        let (event, decision) = match how {
            End::Expired => ("approval_expired", Decision::Expired { id: id.to_string(), after: held }),
            End::Withdrawn(cause) => ("approval_withdrawn", Decision::Withdrawn { id: id.to_string(), cause }),
        };
        let mut rec = Record::new(event, Some(&p.req.session))
            .with("request", id)
            .with("held_ms", held.as_millis() as u64)
            .with("approvals", p.approvals.len());
        if let Decision::Withdrawn { cause, .. } = &decision {
            rec = rec.with("cause", *cause);
        }
        // The statement is refused either way; a failed write is logged by
        // the writer and counted in its outage record.
        let _ = self.audit.append(&rec);
        self.emit(json!({"event": event.trim_start_matches("approval_"), "request": id}), &p);
        Some(decision)
    }

    /// The client's cancel (CancelRequest, Ctrl-C) for a session: withdraw
    /// its held request, if any. True if one was withdrawn.
    pub fn cancel_session(&self, session: &str) -> bool {
        let mut inner = self.lock();
        let Some(id) = inner.pending.iter().find(|(_, p)| p.req.session == session).map(|(id, _)| id.clone()) else {
            return false;
        };
        let Some(mut p) = inner.pending.remove(&id) else { return false };
        drop(inner);
        self.close_in_store(&p, &id, "withdrawn");
        let rec = Record::new("approval_withdrawn", Some(&p.req.session))
            .with("request", &id)
            .with("cause", "cancel")
            .with("held_ms", p.started.elapsed().as_millis() as u64)
            .with("approvals", p.approvals.len());
        let _ = self.audit.append(&rec);
        self.emit(json!({"event": "withdrawn", "request": id}), &p);
        if let Some(tx) = p.tx.take() {
            let _ = tx.send(Decision::Withdrawn { id, cause: "cancel" });
        }
        true
    }

    /// An approver's decision. Refusals (not an approver, self-approval, a
    /// request no longer pending) are recorded too: they are what an
    /// attacker's attempts look like.
    pub fn decide(
        &self,
        id: &str,
        who: &Approver,
        approve: bool,
        reason: Option<&str>,
        break_glass: bool,
        channel: &str,
    ) -> Result<Answer, String> {
        let reason = reason.map(str::trim).filter(|r| !r.is_empty());
        let mut inner = self.lock();
        let refuse = |inner: std::sync::MutexGuard<'_, Inner>, session: Option<&str>, why: String| {
            drop(inner);
            let rec = Record::new("approval_refused", session)
                .with("request", id)
                .with("approver", who)
                .with("channel", channel)
                .with("decision", if approve { "approve" } else { "deny" })
                .with("why", &why);
            let _ = self.audit.append(&rec);
            Err(why)
        };
        let Some(p) = inner.pending.get(id) else {
            return refuse(
                inner,
                None,
                format!("request {id} is not pending (unknown, or already decided, expired or withdrawn); nothing was changed"),
            );
        };
        let session = p.req.session.clone();
        let name = who.display();
        let (workload_uid, profile) = (p.req.workload.uid, p.req.profile.clone());
        let (may_approve, may_break_glass, required) =
            (p.settings.may_approve(who), p.settings.may_break_glass(who), p.settings.required);
        let already = p.approvals.iter().any(|(uid, _)| *uid == who.uid);
        if let Some(st) = &p.settings.store {
            let why = format!(
                "profile {profile} is decided in the shared store: cordon approvals --store {} approve {id}, with your own database login",
                st.url
            );
            return refuse(inner, Some(&session), why);
        }
        if who.uid == workload_uid {
            return refuse(
                inner,
                Some(&session),
                format!(
                    "{name} (uid {}) runs the workload that made request {id}: nobody approves their own statement",
                    who.uid
                ),
            );
        }
        if break_glass {
            if !may_break_glass {
                return refuse(
                    inner,
                    Some(&session),
                    format!("{name} is not in profiles.{profile}.approvals.break_glass"),
                );
            }
            if reason.is_none() || !approve {
                return refuse(inner, Some(&session), "break-glass approves alone and needs --reason".into());
            }
        } else if !may_approve {
            return refuse(
                inner,
                Some(&session),
                format!("{name} is not an approver of profile {profile} (profiles.{profile}.approvals.approvers)"),
            );
        }
        if !approve && reason.is_none() {
            return refuse(inner, Some(&session), "a denial needs --reason: the workload is told why".into());
        }
        if approve && already {
            return refuse(
                inner,
                Some(&session),
                format!("{name} already approved request {id}; it needs {required} distinct people"),
            );
        }
        let decision_rec = Record::new("approval_decision", Some(&session))
            .with("request", id)
            .with("approver", who)
            .with("channel", channel)
            .with("decision", if approve { "approve" } else { "deny" })
            .with("reason", reason)
            .with("break_glass", break_glass);
        if let Err(u) = self.audit.append(&decision_rec) {
            return Err(format!("the decision was not taken: {u}"));
        }
        let Some(p) = inner.pending.get_mut(id) else {
            return Err(format!("request {id} is no longer pending"));
        };
        if !approve {
            let Some(mut p) = inner.pending.remove(id) else {
                return Err(format!("request {id} is no longer pending"));
            };
            drop(inner);
            let reason = reason.unwrap_or_default().to_string();
            let rec = Record::new("approval_denied", Some(&session)).with("request", id).with("by", &name);
            let _ = self.audit.append(&rec);
            self.emit(json!({"event": "denied", "request": id, "by": name, "reason": reason}), &p);
            if let Some(tx) = p.tx.take() {
                let _ = tx.send(Decision::Denied { id: id.to_string(), by: name.clone(), reason });
            }
            return Ok(Answer { state: "denied", message: format!("request {id} denied") });
        }
        p.approvals.push((who.uid, name.clone()));
        let have = p.approvals.len() as u32;
        if !break_glass && have < p.settings.required {
            let msg = format!("approved by {name}: {have} of {} distinct approvals", p.settings.required);
            let ev = json!({"event": "approval", "request": id, "by": name, "have": have});
            self.emit(ev, p);
            return Ok(Answer { state: "pending", message: msg });
        }
        let Some(p) = inner.pending.remove(id) else { return Err(format!("request {id} is no longer pending")) };
        if break_glass {
            tracing::warn!(request = %id, by = %name, "break-glass approval");
        }
        let by: Vec<String> = p.approvals.iter().map(|(_, n)| n.clone()).collect();
        if !self.grant(inner, p, id, by, break_glass, "local") {
            return Ok(Answer {
                state: "withdrawn",
                message: format!("request {id} was approved, but its session had already ended"),
            });
        }
        Ok(Answer { state: "approved", message: format!("request {id} approved; the statement runs now") })
    }

    /// Enough people approved: record the grant (a window is kept for its
    /// repeats), tell watchers and webhooks, release the hold. False if the
    /// session had already gone.
    fn grant(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        mut p: Pending,
        id: &str,
        by: Vec<String>,
        break_glass: bool,
        channel: &str,
    ) -> bool {
        let window = match p.settings.grant {
            Grant::Window(d) => {
                inner.windows.push(Window {
                    id: id.to_string(),
                    key: WindowKey::of(&p.req),
                    expires: Instant::now() + d,
                });
                Some(d)
            }
            Grant::Once => None,
        };
        drop(inner);
        let rec = Record::new("approval_granted", Some(&p.req.session))
            .with("request", id)
            .with("by", &by)
            .with("channel", channel)
            .with("break_glass", break_glass)
            .with("grant", if window.is_some() { "window" } else { "once" })
            .with("window_s", window.map(|d| d.as_secs()))
            .with("held_ms", p.started.elapsed().as_millis() as u64);
        let _ = self.audit.append(&rec);
        let mut event =
            json!({"event": "granted", "request": id, "by": by, "break_glass": break_glass, "channel": channel});
        if break_glass {
            // Every approver hears of a break-glass approval.
            event["notify"] = json!(p.settings.approvers.iter().map(ToString::to_string).collect::<Vec<_>>());
        }
        self.emit(event, &p);
        let decision = Decision::Approved { id: id.to_string(), by, break_glass, window: window.is_some() };
        p.tx.take().is_some_and(|tx| tx.send(decision).is_ok())
    }

    /// Send an event to watchers and webhooks, with the profile it concerns
    /// and (for webhooks) the request as recorded.
    fn emit(&self, mut ev: Value, p: &Pending) {
        ev["profile"] = json!(p.req.profile);
        ev["text"] = json!(p.req.text);
        ev["rule"] = json!(p.req.rule);
        let _ = self.events.send(ev);
    }

    /// Pending requests this person may see.
    pub fn list(&self, who: &Approver) -> Vec<Value> {
        let inner = self.lock();
        inner.pending.iter().filter(|(_, p)| p.settings.concerns(who)).map(|(id, p)| summary(id, p, false)).collect()
    }

    /// One pending request, with the statement as the workload sent it.
    pub fn show(&self, id: &str, who: &Approver) -> Option<Value> {
        let inner = self.lock();
        let p = inner.pending.get(id).filter(|p| p.settings.concerns(who))?;
        Some(summary(id, p, true))
    }
}

fn summary(id: &str, p: &Pending, full: bool) -> Value {
    let r = &p.req;
    let mut v = json!({
        "id": id,
        "session": r.session,
        "protocol": r.protocol,
        "profile": r.profile,
        "rule": r.rule,
        "reason": r.reason,
        "workload": {
            "cgroup": r.workload.cgroup,
            "unit": r.workload.path_info.unit,
            "pid": r.workload.pid,
            "uid": r.workload.uid,
            "user": r.workload.user,
            "comm": r.workload.comm,
        },
        "upstream": r.upstream,
        "database": r.database,
        "upstream_user": r.upstream_user,
        "text": r.text,
        "param_count": r.param_count,
        "binding": r.binding,
        "created": now_rfc3339(p.created),
        "held_s": p.started.elapsed().as_secs(),
        "expires_in_s": p.deadline.saturating_duration_since(Instant::now()).as_secs(),
        "approvals": p.approvals.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        "required": p.settings.required,
    });
    if full {
        v["statement"] = json!(r.full_text);
    }
    v
}

/// A request id: short enough to type, random enough not to guess.
fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("ap-{:012x}", n & 0xffff_ffff_ffff)
}

/// The binding hash of a held statement.
pub fn binding(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed: no two part lists hash alike.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}
