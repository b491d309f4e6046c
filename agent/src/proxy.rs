//! The proxy: accept what the kernel redirected, find out from the kernel who
//! it is, connect upstream from outside every tagged cgroup, and hand both
//! streams to the intercept rule's protocol.
//!
//! Fail closed: a connection with no kernel metadata (a direct dial of the
//! proxy port, an evicted entry), or whose rule left the policy, is closed
//! and audited; it is never relayed.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn, Instrument};

use crate::{
    audit::Record,
    config::Intercept,
    identity::{self, Workload},
    kernel,
    pipeline::DenyKind,
    protocol::Refused,
    relay,
    state::Shared,
};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move { accept_one(stream, peer, shared).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_one(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, "cannot read the accepted socket's local address: {e}");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let tuple = kernel::tuple_for(peer, local);
    let meta = shared.kernel.lock().ok().and_then(|mut k| k.take_meta(&tuple));
    let Some(meta) = meta else {
        warn!(%peer, %local, "connection without kernel metadata refused (unidentified)");
        let rec = Record::new("reject", None)
            .with("reason", "unidentified")
            .with("detail", "no kernel metadata for this connection: it did not come through cordon's connect hook (a direct dial of the proxy port), or its entry was evicted")
            .with("peer", peer.to_string())
            .with("local", local.to_string());
        if let Err(e) = shared.audit.write(rec).await {
            warn!("audit write failed: {e:#}");
        }
        return;
    };

    let policy = shared.policy();
    let profile = policy.profile_name(meta.profile_id).unwrap_or("<unknown>").to_string();
    let workload = match shared.resolver.lock() {
        Ok(mut r) => r.workload(&shared.cgroup_root, &meta, &profile),
        Err(_) => return,
    };
    let orig = identity::original_destination(&meta);
    let id = shared.next_session_id();
    let span = tracing::info_span!(
        "session",
        id = %id,
        cgroup = workload.cgroup.as_deref().unwrap_or("?"),
        pid = workload.pid,
        uid = workload.uid,
        dest = %orig,
    );
    let ids = Ids { rule: meta.rule_id, profile: meta.profile_id, tagged_cgroup: meta.tagged_cgroup_id };
    session(stream, id, workload, orig, ids, shared).instrument(span).await;
}

/// What the kernel matched: rule, profile, and the tagged cgroup.
struct Ids {
    rule: u32,
    profile: u32,
    tagged_cgroup: u64,
}

async fn session(client: TcpStream, id: String, workload: Workload, orig: SocketAddr, ids: Ids, shared: Arc<Shared>) {
    let started = Instant::now();
    let policy = shared.policy();
    // The rule the kernel matched, if the policy still has it for this port.
    let rule: Option<Intercept> = policy.intercepts.get(ids.rule as usize).filter(|r| r.port == orig.port()).cloned();
    let base =
        |event: &str| Record::new(event, Some(&id)).with("workload", &workload).with("destination", orig.to_string());
    let Some(rule) = rule else {
        let rec = base("reject")
            .with("reason", "no_rule")
            .with("detail", "the intercept rule that matched in the kernel is no longer in the policy");
        audit(&shared, rec).await;
        return;
    };
    let upstream_addr = rule.upstream.unwrap_or(orig);
    let Some(profile) = policy.profiles.get(ids.profile as usize).cloned() else {
        let rec =
            base("reject").with("reason", "no_profile").with("detail", "the tag's profile is no longer in the policy");
        audit(&shared, rec).await;
        return;
    };
    // The per-workload cap, counted per tagged cgroup; the slot is held for
    // the session's life.
    let slot = shared.connections.acquire(ids.tagged_cgroup, profile.max_connections);
    let admission = match &slot {
        Ok(_) => {
            let open = base("open")
                .with("rule", &rule.name)
                .with("protocol", rule.protocol)
                .with("upstream", upstream_addr.to_string());
            // Written before anything is relayed; if the log is down the
            // protocol refuses the session in its own words.
            shared.audit.append(&open).map_err(Refused::from)
        }
        Err(open) => {
            let cap = profile.max_connections.unwrap_or(0);
            let message = format!(
                "workload cgroup {} already holds {open} connections through cordon, the cap of profile {:?} \
                 (profiles.{}.max_connections = {cap}); close idle connections or raise the cap",
                workload.tagged_cgroup.as_deref().unwrap_or("?"),
                profile.name,
                profile.name,
            );
            warn!("{message}");
            let rec = base("reject").with("reason", "connection_limit").with("detail", &message).with("limit", cap);
            audit(&shared, rec).await;
            Err(Refused { kind: DenyKind::Limit, message, outcome: "connection_limit" })
        }
    };
    let refused = admission.is_err();
    info!(rule = %rule.name, upstream = %upstream_addr, "session open");
    shared.sessions_open.fetch_add(1, Ordering::Relaxed);
    let session = crate::protocol::Session {
        shared: shared.clone(),
        id: id.clone(),
        workload: workload.clone(),
        rule: rule.clone(),
        profile,
        upstream: upstream_addr,
        base: base("statement"),
        admission,
    };
    let end = crate::protocol::serve(rule.protocol, client, session).await;
    drop(slot);
    if refused && end.outcome == "connection_limit" {
        // The reject record says it all.
        shared.sessions_open.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let mut close = base("close");
    for (k, v) in end.fields {
        close = close.with(k, v);
    }
    let (outcome, counts, error) =
        (end.outcome, relay::Counts { bytes_up: end.bytes_up, bytes_down: end.bytes_down }, end.error);
    shared.sessions_open.fetch_sub(1, Ordering::Relaxed);
    close = close
        .with_event("close")
        .with("outcome", outcome)
        .with("bytes_up", counts.bytes_up)
        .with("bytes_down", counts.bytes_down)
        .with("duration_ms", started.elapsed().as_millis() as u64);
    if let Some(e) = &error {
        close = close.with("error", e);
        warn!(outcome, "session closed: {e}");
    } else {
        info!(outcome, bytes_up = counts.bytes_up, bytes_down = counts.bytes_down, "session closed");
    }
    audit(&shared, close).await;
}

async fn audit(shared: &Shared, rec: Record) {
    if let Err(e) = shared.audit.write(rec).await {
        warn!("audit write failed: {e:#}");
    }
}

/// Connect from the agent's own (untagged) cgroup, with SO_MARK set, so the
/// kernel programs let the connection through unchanged.
pub async fn connect_upstream(addr: SocketAddr, shared: &Shared) -> Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .context("creating the upstream socket")?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &shared.socket_mark())
        .context("setting SO_MARK on the upstream socket (needs CAP_NET_ADMIN)")?;
    socket.set_nodelay(true).context("setting TCP_NODELAY")?;
    // A session held for approval sends nothing for minutes: keepalives
    // keep NAT and firewall state (and a dead peer is noticed).
    socket.set_keepalive(true).context("setting SO_KEEPALIVE")?;
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&socket, sockopt::TcpKeepIdle, &60).context("setting TCP_KEEPIDLE")?;
    setsockopt(&socket, sockopt::TcpKeepInterval, &10).context("setting TCP_KEEPINTVL")?;
    setsockopt(&socket, sockopt::TcpKeepCount, &6).context("setting TCP_KEEPCNT")?;
    match tokio::time::timeout(shared.connect_timeout(), socket.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e).with_context(|| format!("connecting to {addr}")),
        Err(_) => anyhow::bail!("connecting to {addr}: timed out after {:?}", shared.connect_timeout()),
    }
}
