//! PostgreSQL adapter: the first protocol on the pipeline.
//!
//! Shape (as every adapter): client negotiation (`startup`) → upstream client
//! (`upstream`: TLS, authentication) → framing (`frame`) → session state
//! machine (`session`: statements into the pipeline, results back) → errors
//! that close only this session, with an audited reason.

pub mod catalog;
pub mod frame;
pub mod read_mask;
pub mod scram;
pub mod session;
pub mod sql;
pub mod sqltree;
pub mod startup;
pub mod types;
pub mod upstream;
pub mod wire;

use std::{net::SocketAddr, sync::Arc};

use crate::{
    audit::Record,
    config::{Intercept, Profile},
    net::Stream,
    state::Shared,
};

/// What the adapter needs from the proxy for one session.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub session: String,
    pub rule: Intercept,
    pub profile: Profile,
    pub upstream: SocketAddr,
    /// Base for this session's audit records (workload, destination).
    pub base: Record,
    /// The session's open record, awaited before the first statement is
    /// relayed (its fsync overlaps connecting and authenticating upstream).
    pub open_durable: std::sync::Mutex<Option<crate::audit::Pending>>,
}

/// How a PostgreSQL session ended, for the close record.
#[derive(Debug, Default)]
pub struct End {
    pub outcome: &'static str,
    pub error: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub statements: u64,
    pub recording: Option<serde_json::Value>,
    pub client_tls: bool,
    pub upstream_tls: bool,
    pub upstream_user: Option<String>,
    pub database: Option<String>,
}

/// Cancel keys cordon handed to clients, mapped to the real backend's.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub session: String,
    pub upstream: SocketAddr,
    pub pid: i32,
    pub key: Vec<u8>,
}

pub async fn serve(client: tokio::net::TcpStream, ctx: Ctx) -> End {
    let client = Stream::Plain(client);
    match startup::negotiate(client, &ctx).await {
        Ok(startup::Hello::Startup(hello)) => session::run(hello, &ctx).await,
        Ok(startup::Hello::Cancel { pid, key }) => startup::forward_cancel(pid, &key, &ctx).await,
        Err(e) => End { outcome: "protocol_error", error: Some(format!("{e:#}")), ..End::default() },
    }
}
