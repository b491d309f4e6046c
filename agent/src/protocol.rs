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
//! protocol adds its folder and one line in [`serve`].

use std::{fmt, net::SocketAddr, str::FromStr, sync::Arc};

use serde::Serialize;

use crate::{
    audit::{Pending, Record},
    config::{Intercept, Profile},
    state::Shared,
};

/// What the proxy hands a protocol for one identified connection.
pub struct Session {
    pub shared: Arc<Shared>,
    /// The session id in the audit log.
    pub id: String,
    pub rule: Intercept,
    pub profile: Profile,
    pub upstream: SocketAddr,
    /// Base for the session's audit records (workload, destination).
    pub base: Record,
    /// The open record: durable before any of the workload's data is relayed
    /// (its fsync overlaps the upstream connect).
    pub open_durable: Pending,
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

/// The one place a connection is dispatched to its protocol.
pub async fn serve(protocol: Protocol, client: tokio::net::TcpStream, session: Session) -> End {
    match protocol {
        Protocol::Tcp => crate::relay::serve(client, session).await,
        Protocol::Postgres => crate::postgres::serve(client, session).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Byte relay, audited per connection (bytes each way, duration).
    Tcp,
    /// PostgreSQL wire protocol: statements through the pipeline.
    Postgres,
}

/// Protocols that are planned but not built yet. Naming one is an error, not
/// a silent fallback to a byte relay: a policy that asks for statement-level
/// governance must not get less without saying so.
const PLANNED: [&str; 2] = ["mysql", "ssh"];

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "postgres" => Ok(Self::Postgres),
            p if PLANNED.contains(&p) => Err(format!(
                "protocol {p:?} is not available in this build yet; use \"tcp\" (byte relay, audited per connection)"
            )),
            other => Err(format!("unknown protocol {other:?}; known: \"tcp\", \"postgres\"")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Postgres => "postgres",
        })
    }
}
