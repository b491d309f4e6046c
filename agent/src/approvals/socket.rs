//! The approvals socket: where approvers on this host list, inspect, approve
//! and deny held requests, and watch new ones arrive. It sits beside the
//! control socket but is open to every local user (0666): each connection
//! is identified by SO_PEERCRED and served only if that uid is root or is
//! named (as a user or through a group) in some profile's `approvers` or
//! `break_glass`. Everything else cordon does stays on the root-only
//! control socket.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::Approver;
use crate::state::Shared;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    List,
    Show {
        id: String,
    },
    Approve {
        id: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        break_glass: bool,
    },
    Deny {
        id: String,
        reason: String,
    },
    Watch,
}

const MAX_REQUEST: u64 = 16 * 1024;

/// The approvals socket's path: beside the control socket.
pub fn path_beside(control_socket: &Path) -> std::path::PathBuf {
    control_socket.with_file_name("approvals.sock")
}

/// Open to every local user: each request is authorised by its caller's uid.
pub fn bind(path: &Path) -> Result<UnixListener> {
    crate::control::bind_socket(path, 0o666)
}

/// Open connections one uid may hold (watchers included).
const PER_UID: usize = 8;
/// Open connections in all.
const TOTAL: usize = 128;
/// How long a connection may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection slots: the socket is open to every local user, and each
/// connection costs the agent a descriptor and a task, so one user must
/// not be able to hold enough of them to starve the proxy.
#[derive(Default)]
pub(crate) struct Slots {
    open: Mutex<HashMap<u32, usize>>,
}

/// A taken slot, given back when the connection ends.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    pub(crate) fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.get(&uid).copied().unwrap_or(0);
        if mine >= PER_UID {
            return Err(format!(
                "uid {uid} already has {mine} open connections to the approvals socket (at most {PER_UID}); close some (e.g. extra `cordon approvals watch`) and retry"
            ));
        }
        if total >= TOTAL {
            return Err(format!("the approvals socket has {total} open connections (at most {TOTAL}); retry shortly"));
        }
        *open.entry(uid).or_insert(0) += 1;
        Ok(Slot { slots: self.clone(), uid })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// `approval_refused` records one uid may cause per window.
const REFUSALS_PER_WINDOW: u32 = 10;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Uids tracked before old windows are forgotten.
const REFUSAL_UIDS: usize = 1024;

/// Per uid: refusal records written in the current window, and attempts
/// left unrecorded since the last record.
#[derive(Default)]
pub(crate) struct Refusals {
    by_uid: Mutex<HashMap<u32, (Instant, u32, u64)>>,
}

impl Refusals {
    /// Some(n): write the record, noting `n` attempts left out before it;
    /// None: over the limit, counted instead.
    pub(crate) fn admit(&self, uid: u32, now: Instant) -> Option<u64> {
        let mut m = self.by_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= REFUSAL_UIDS && !m.contains_key(&uid) {
            m.retain(|_, (start, _, left)| now.duration_since(*start) < REFUSAL_WINDOW || *left > 0);
        }
        let e = m.entry(uid).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= REFUSAL_WINDOW {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 >= REFUSALS_PER_WINDOW {
            e.2 += 1;
            return None;
        }
        e.1 += 1;
        Some(std::mem::take(&mut e.2))
    }
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Slots::default());
    let refusals = Arc::new(Refusals::default());
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let Ok(cred) = stream.peer_cred() else { continue };
        let slot = match slots.take(cred.uid()) {
            Ok(s) => s,
            Err(e) => {
                warn!("approvals socket: {e}");
                // Told, not left hanging; the write is bounded so a client
                // that never reads cannot hold the accept loop.
                let line = format!("{}\n", json!({"ok": false, "error": e}));
                let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(line.as_bytes())).await;
                continue;
            }
        };
        let (shared, refusals) = (shared.clone(), refusals.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = handle(stream, &shared, &refusals).await {
                warn!("approvals request failed: {e:#}");
            }
        });
    }
}

/// Whether the policy names this person anywhere as an approver.
fn named_in_policy(shared: &Shared, who: &Approver) -> bool {
    who.uid == 0 || shared.policy().profiles.iter().filter_map(|p| p.approvals.as_ref()).any(|s| s.concerns(who))
}

async fn handle(stream: UnixStream, shared: &Shared, refusals: &Refusals) -> Result<()> {
    let cred = stream.peer_cred().context("reading the peer's credentials")?;
    let who = Approver::of_uid(cred.uid());
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line))
        .await
        .with_context(|| format!("no request line within {REQUEST_TIMEOUT:?}"))??;
    let req = match serde_json::from_str::<Request>(&line) {
        Ok(r) => r,
        Err(e) => {
            let resp = json!({"ok": false, "error": format!("bad request: {e}")});
            w.write_all(format!("{resp}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    if !named_in_policy(shared, &who) {
        // A decision attempt by someone the policy does not name is
        // recorded: it is what an attempt to approve one's own way in
        // looks like.
        if let Request::Approve { id, .. } | Request::Deny { id, .. } = &req {
            // Bounded per uid, so a loop of attempts cannot fill the audit
            // disk; the next record written says how many were left out.
            if let Some(left_out) = refusals.admit(cred.uid(), Instant::now()) {
                let mut rec = crate::audit::Record::new("approval_refused", None)
                    .with("request", id)
                    .with("approver", &who)
                    .with("channel", "local")
                    .with("why", "not an approver in the policy");
                if left_out > 0 {
                    rec = rec.with("earlier_attempts_not_recorded", left_out);
                }
                let _ = shared.audit.append(&rec);
            }
        }
        let resp = json!({"ok": false, "error": format!("{} is not an approver in the policy ({})", who.display(), shared.policy().source.display())});
        w.write_all(format!("{resp}\n").as_bytes()).await?;
        bail!("refused an approvals request from {}", who.display());
    }
    let hub = &shared.approvals;
    let resp = match req {
        Request::List => json!({"ok": true, "requests": hub.list(&who)}),
        Request::Show { id } => match hub.show(&id, &who) {
            Some(r) => json!({"ok": true, "request": r}),
            None => json!({"ok": false, "error": format!("no pending request {id} that you may see")}),
        },
        Request::Approve { id, reason, break_glass } => {
            answer(hub.decide(&id, &who, true, reason.as_deref(), break_glass, "local"))
        }
        Request::Deny { id, reason } => answer(hub.decide(&id, &who, false, Some(&reason), false, "local")),
        Request::Watch => {
            let mut rx = hub.subscribe();
            // What is already pending first, then each event as it happens.
            for r in hub.list(&who) {
                let line = json!({"event": "pending", "request": r});
                w.write_all(format!("{line}\n").as_bytes()).await?;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => w.write_all(format!("{ev}\n").as_bytes()).await?,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let line = json!({"event": "lagged", "missed": n});
                        w.write_all(format!("{line}\n").as_bytes()).await?;
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
    };
    w.write_all(format!("{resp}\n").as_bytes()).await?;
    Ok(())
}

fn answer(r: Result<super::Answer, String>) -> Value {
    match r {
        Ok(a) => json!({"ok": true, "state": a.state, "message": a.message}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Client side: one request, one response.
pub async fn request(path: &Path, req: &Request) -> Result<Value> {
    crate::control::exchange(connect(path).await?, req).await
}

/// Client side of `watch`: each event line to `each` until the agent
/// closes the stream.
pub async fn watch(path: &Path, mut each: impl FnMut(Value) -> Result<()>) -> Result<()> {
    let mut stream = connect(path).await?;
    stream.write_all(b"{\"cmd\":\"watch\"}\n").await?;
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await? {
        let v: Value = serde_json::from_str(&line).with_context(|| format!("bad event from the agent: {line:?}"))?;
        if v.get("ok") == Some(&Value::Bool(false)) {
            bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("unknown error"));
        }
        each(v)?;
    }
    Ok(())
}

async fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).await.with_context(|| {
        format!("cannot reach the agent's approvals socket {}: is `cordon run` running?", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_records_are_bounded_per_uid_and_say_what_was_left_out() {
        let r = Refusals::default();
        let t0 = Instant::now();
        for _ in 0..REFUSALS_PER_WINDOW {
            assert_eq!(r.admit(7, t0), Some(0));
        }
        assert_eq!(r.admit(7, t0), None);
        assert_eq!(r.admit(7, t0), None);
        // Another uid is not affected.
        assert_eq!(r.admit(8, t0), Some(0));
        // The next window's first record carries the count.
        let later = t0 + REFUSAL_WINDOW;
        assert_eq!(r.admit(7, later), Some(2));
        assert_eq!(r.admit(7, later), Some(0));
    }

    #[test]
    fn one_uid_cannot_take_every_slot() {
        let slots = Arc::new(Slots::default());
        let mine: Vec<Slot> = (0..PER_UID).map(|_| slots.take(1000).unwrap_or_else(|e| panic!("{e}"))).collect();
        let refused = slots.take(1000).err().unwrap_or_default();
        assert!(refused.contains("at most 8"), "{refused}");
        // Someone else still gets in; a closed connection gives its slot back.
        assert!(slots.take(1001).is_ok());
        drop(mine);
        assert!(slots.take(1000).is_ok());
        // And the total is bounded across many uids.
        let many: Vec<Slot> = (0..TOTAL as u32).filter_map(|u| slots.take(2000 + u).ok()).collect();
        assert_eq!(many.len(), TOTAL);
        assert!(slots.take(1).err().unwrap_or_default().contains("retry shortly"));
    }
}
