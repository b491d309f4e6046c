//! The agent's side of the shared store: which held requests to insert,
//! poll and close (`Hub::store_work`), the store task that does it
//! (`run_store`), and decisions read back from the store
//! (`Hub::store_decided`). The SQL is in `store.rs`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;

use super::{store, Decision, Hub, Pending, Request};
use crate::audit::Record;

/// One store's share of the store task's work.
pub struct StoreWork {
    pub store: store::StoreSettings,
    pub insert: Vec<Insert>,
    pub poll: Vec<String>,
    pub close: Vec<(String, &'static str)>,
}

pub struct Insert {
    pub id: String,
    pub req: Arc<Request>,
    pub required: u32,
    pub expires_in: Duration,
    pub requester_role: Option<String>,
}

/// The store task: inserts held requests, polls (and is woken by NOTIFY)
/// for decisions, closes what the agent ended. One per agent; it only runs
/// while some profile uses a store.
pub async fn run_store(shared: Arc<crate::state::Shared>) {
    let hub = shared.approvals.clone();
    let mut links: Vec<store::Link> = Vec::new();
    let mut reported: std::collections::HashSet<String> = std::collections::HashSet::new();
    let agent = store::agent_name();
    loop {
        tokio::select! {
            () = hub.store_wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for work in hub.store_work() {
            let i = match links.iter().position(|l| l.settings() == &work.store) {
                Some(i) => i,
                None => {
                    links.push(store::Link::new(work.store.clone()));
                    links.len() - 1
                }
            };
            let Some(link) = links.get_mut(i) else { continue };
            let client = match link.client(&shared, hub.store_wake.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    let e = format!("{e:#}");
                    for ins in &work.insert {
                        if reported.insert(ins.id.clone()) {
                            tracing::warn!(request = %ins.id, "approval store unreachable; the request waits for its timeout, then is denied: {e}");
                            hub.store_unreachable(&ins.id, &e);
                        }
                    }
                    continue;
                }
            };
            for ins in &work.insert {
                let row = store::Row {
                    id: &ins.id,
                    agent: &agent,
                    expires_in: ins.expires_in,
                    req: &ins.req,
                    required: ins.required,
                    requester_role: ins.requester_role.clone(),
                };
                match store::insert(client, &row).await {
                    Ok(()) => hub.mark_published(&ins.id),
                    Err(e) => {
                        if reported.insert(ins.id.clone()) {
                            hub.store_unreachable(&ins.id, &format!("{e:#}"));
                        }
                    }
                }
            }
            if !work.poll.is_empty() {
                match store::decided(client, &work.poll).await {
                    Ok(rows) => rows.into_iter().for_each(|d| hub.store_decided(d)),
                    Err(e) => tracing::warn!("polling the approval store: {e:#}"),
                }
            }
            for (id, state) in &work.close {
                if let Err(e) = store::close(client, id, state).await {
                    tracing::warn!(request = %id, "closing the request in the approval store: {e:#}");
                }
            }
        }
    }
}

impl Hub {
    pub(super) fn close_in_store(&self, p: &Pending, id: &str, state: &'static str) {
        if let (Some(st), true) = (&p.settings.store, p.published) {
            if let Ok(mut c) = self.closing.lock() {
                c.push((st.clone(), id.to_string(), state));
            }
            self.store_wake.notify_one();
        }
    }

    /// A request the store says was decided (by approvers' roles).
    pub fn store_decided(&self, d: store::Decided) {
        let mut inner = self.lock();
        let Some(mut p) = inner.pending.remove(&d.id) else { return };
        let id = d.id.clone();
        let session = p.req.session.clone();
        let decision = match d.state.as_str() {
            "approved" => {
                for role in &d.approvals {
                    let rec = Record::new("approval_decision", Some(&session))
                        .with("request", &id)
                        .with("approver", json!({"role": role}))
                        .with("channel", "store")
                        .with("decision", "approve")
                        .with("reason", &d.reason);
                    let _ = self.audit.append(&rec);
                }
                self.grant(inner, p, &id, d.approvals.clone(), false, "store");
                return;
            }
            "denied" => {
                let by = d.decided_by.clone().unwrap_or_default();
                let rec = Record::new("approval_decision", Some(&session))
                    .with("request", &id)
                    .with("approver", json!({"role": by}))
                    .with("channel", "store")
                    .with("decision", "deny")
                    .with("reason", &d.reason);
                let _ = self.audit.append(&rec);
                let rec = Record::new("approval_denied", Some(&session)).with("request", &id).with("by", &by);
                let _ = self.audit.append(&rec);
                Decision::Denied { id: id.clone(), by, reason: d.reason.clone().unwrap_or_default() }
            }
            // Closed by someone else in the store: fail closed.
            other => {
                let rec = Record::new("approval_withdrawn", Some(&session))
                    .with("request", &id)
                    .with("cause", format!("store_{other}"));
                let _ = self.audit.append(&rec);
                Decision::Withdrawn { id: id.clone(), cause: "closed_in_store" }
            }
        };
        drop(inner);
        self.emit(json!({"event": d.state, "request": id, "channel": "store"}), &p);
        if let Some(tx) = p.tx.take() {
            let _ = tx.send(decision);
        }
    }

    /// What the store task has to do: requests to insert, ids to poll, and
    /// requests to close, per store.
    pub fn store_work(&self) -> Vec<StoreWork> {
        let inner = self.lock();
        let mut out: Vec<StoreWork> = Vec::new();
        for (id, p) in &inner.pending {
            let Some(st) = &p.settings.store else { continue };
            let slot = match out.iter().position(|w| &w.store == st) {
                Some(i) => i,
                None => {
                    out.push(StoreWork { store: st.clone(), insert: Vec::new(), poll: Vec::new(), close: Vec::new() });
                    out.len() - 1
                }
            };
            let Some(w) = out.get_mut(slot) else { continue };
            if p.published {
                w.poll.push(id.clone());
            } else {
                let role = p
                    .req
                    .workload
                    .user
                    .as_ref()
                    .map(|u| p.settings.workload_roles.get(u).cloned().unwrap_or_else(|| u.clone()));
                w.insert.push(Insert {
                    id: id.clone(),
                    req: p.req.clone(),
                    required: p.settings.required,
                    expires_in: p.deadline.saturating_duration_since(Instant::now()),
                    requester_role: role,
                });
            }
        }
        drop(inner);
        let closing = self.closing.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default();
        for (st, id, state) in closing {
            match out.iter_mut().find(|w| w.store == st) {
                Some(w) => w.close.push((id, state)),
                None => {
                    out.push(StoreWork { store: st, insert: Vec::new(), poll: Vec::new(), close: vec![(id, state)] })
                }
            }
        }
        out
    }

    pub fn mark_published(&self, id: &str) {
        if let Some(p) = self.lock().pending.get_mut(id) {
            p.published = true;
        }
    }

    /// Note a store outage once per request (the request still waits for
    /// its timeout, then is denied).
    pub fn store_unreachable(&self, id: &str, error: &str) {
        let session = self.lock().pending.get(id).map(|p| p.req.session.clone());
        if let Some(session) = session {
            let rec =
                Record::new("approval_store_unreachable", Some(&session)).with("request", id).with("error", error);
            let _ = self.audit.append(&rec);
        }
    }
}
