//! The protocol seam: an intercept rule names a protocol, and the proxy hands
//! each identified connection to that protocol's entry point, here and only
//! here ([`serve`]).
//!
//! Every protocol has the same shape: an entry point that takes the accepted
//! stream and a [`Session`] (workload, rule, profile, the audit base and the
//! pending open record), and returns an [`End`] for the close record. Its
//! session state machine, upstream client, framing and errors live in its
//! own folder, and whatever its sessions share across the agent (caches,
//! registries) in a state it registers with `Shared::protocol_state`. A new
//! protocol adds its folder and one line in [`REGISTRY`].

use std::{fmt, future::Future, net::SocketAddr, pin::Pin, str::FromStr, sync::Arc};

use serde::Serialize;

use crate::{
    audit::{Record, Ticket, Unavailable},
    config::{Intercept, Profile},
    pipeline::DenyKind,
    state::Shared,
};

/// What the proxy hands a protocol for one identified connection.
pub struct Session {
    pub shared: Arc<Shared>,
    /// The session id in the audit log.
    pub id: String,
    /// Who opened the connection, from the kernel.
    pub workload: crate::identity::Workload,
    pub rule: Intercept,
    pub profile: Profile,
    pub upstream: SocketAddr,
    /// Base for the session's audit records (workload, destination).
    pub base: Record,
    /// The open record, written; or why the session is refused (the audit
    /// log cannot take it, a connection cap), which the protocol tells the
    /// client in its own words before closing. With
    /// `audit_durability = "statement"` the protocol awaits the ticket
    /// before relaying any of the workload's data (overlapping the upstream
    /// connect).
    pub admission: Result<Ticket, Refused>,
}

/// Why a session is refused before it starts.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: DenyKind,
    /// For the client and the close record: what, and what to do.
    pub message: String,
    /// The close record's outcome.
    pub outcome: &'static str,
}

impl From<Unavailable> for Refused {
    fn from(u: Unavailable) -> Self {
        Self { kind: DenyKind::AuditUnavailable, message: u.to_string(), outcome: "audit_unavailable" }
    }
}

/// How a session ended, for its close record.
#[derive(Debug, Default)]
pub struct End {
    pub outcome: &'static str,
    pub error: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The protocol's own fields of the close record.
    pub fields: Vec<(&'static str, serde_json::Value)>,
}

type Serve = fn(tokio::net::TcpStream, Session) -> Pin<Box<dyn Future<Output = End> + Send>>;

/// What the rest of the agent knows about a protocol.
pub struct Spec {
    /// The name in `intercept.protocol`.
    pub name: &'static str,
    /// The protocol terminates the connection and logs in upstream itself:
    /// the intercept's `auth`, `credentials` and `upstream_tls*` apply, and
    /// clients are offered cordon's TLS certificate.
    pub logs_in: bool,
    pub serve: Serve,
}

/// The registry: the one place a protocol is added.
const REGISTRY: &[Spec] = &[
    Spec { name: "tcp", logs_in: false, serve: |c, s| Box::pin(crate::relay::serve(c, s)) },
    Spec { name: "postgres", logs_in: true, serve: |c, s| Box::pin(crate::postgres::serve(c, s)) },
    Spec { name: "ssh", logs_in: true, serve: |c, s| Box::pin(crate::ssh::serve(c, s)) },
];

/// Protocols that are planned but not built yet. Naming one is an error, not
/// a silent fallback to a byte relay: a policy that asks for statement-level
/// governance must not get less without saying so.
const PLANNED: [&str; 1] = ["mysql"];

/// A registered protocol.
#[derive(Clone, Copy)]
pub struct Protocol(&'static Spec);

impl Protocol {
    pub fn spec(self) -> &'static Spec {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }
}

/// The one place a connection is dispatched to its protocol.
pub async fn serve(protocol: Protocol, client: tokio::net::TcpStream, session: Session) -> End {
    (protocol.0.serve)(client, session).await
}

impl PartialEq for Protocol {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Protocol {}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(spec) = REGISTRY.iter().find(|p| p.name == s) {
            return Ok(Self(spec));
        }
        if PLANNED.contains(&s) {
            return Err(format!(
                "protocol {s:?} is not available in this build yet; use \"tcp\" (byte relay, audited per connection)"
            ));
        }
        let known: Vec<String> = REGISTRY.iter().map(|p| format!("{:?}", p.name)).collect();
        Err(format!("unknown protocol {s:?}; known: {}", known.join(", ")))
    }
}
