//! PostgreSQL adapter: the first protocol on the pipeline.
//!
//! Shape (as every adapter): client negotiation (`startup`) → upstream client
//! (`upstream`: TLS, authentication) → framing (`frame`) → session state
//! machine (`session`: statements into the pipeline, results back) → errors
//! that close only this session, with an audited reason.

pub mod catalog;
pub mod frame;
pub mod prepare;
pub mod read_mask;
pub mod scram;
pub mod session;
pub mod shape;
pub mod shared;
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
    protocol::Session,
    state::Shared,
};

/// What the adapter needs for one session: the proxy's [`Session`] and
/// what PostgreSQL sessions share.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub pg: Arc<shared::PgShared>,
    pub session: String,
    pub workload: crate::identity::Workload,
    pub rule: Intercept,
    pub profile: Profile,
    pub upstream: SocketAddr,
    /// Base for this session's audit records (workload, destination).
    pub base: Record,
    /// The session's open record as written (see `protocol::Session::open`),
    /// taken once by the session.
    pub admission: std::sync::Mutex<Option<Result<crate::audit::Ticket, crate::protocol::Refused>>>,
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

/// The protocol's entry point (see `protocol::serve`).
pub async fn serve(client: tokio::net::TcpStream, s: Session) -> crate::protocol::End {
    let ctx = Ctx {
        pg: s.shared.protocol_state::<shared::PgShared>(),
        shared: s.shared,
        session: s.id,
        workload: s.workload,
        rule: s.rule,
        profile: s.profile,
        upstream: s.upstream,
        base: s.base,
        admission: std::sync::Mutex::new(Some(s.admission)),
    };
    let end = session_end(client, &ctx).await;
    let mut fields: Vec<(&'static str, serde_json::Value)> = vec![
        ("statements", end.statements.into()),
        ("client_tls", end.client_tls.into()),
        ("upstream_tls", end.upstream_tls.into()),
    ];
    if let Some(u) = end.upstream_user {
        fields.push(("upstream_user", u.into()));
    }
    if let Some(d) = end.database {
        fields.push(("database", d.into()));
    }
    if let Some(r) = end.recording {
        fields.push(("recording", r));
    }
    crate::protocol::End {
        outcome: end.outcome,
        error: end.error,
        bytes_up: end.bytes_up,
        bytes_down: end.bytes_down,
        fields,
    }
}

async fn session_end(client: tokio::net::TcpStream, ctx: &Ctx) -> End {
    let client = Stream::Plain(client);
    // The server's connection opens while the client sends its startup (see
    // `upstream::Early`), for a session that is to be admitted.
    let admitted = ctx.admission.lock().is_ok_and(|a| matches!(a.as_ref(), Some(Ok(_))));
    let mut early = upstream::Early::new(ctx, admitted && session::passthrough_cannot_mask(ctx).is_none());
    let hello = {
        let negotiate = startup::negotiate(client, ctx);
        tokio::pin!(negotiate);
        loop {
            tokio::select! {
                biased;
                r = &mut negotiate => break r,
                () = early.progress() => {}
            }
        }
    };
    match hello {
        Ok(startup::Hello::Startup(hello)) => session::run(hello, ctx, early).await,
        Ok(startup::Hello::Cancel { pid, key }) => startup::forward_cancel(pid, &key, ctx).await,
        Err(e) => End { outcome: "protocol_error", error: Some(format!("{e:#}")), ..End::default() },
    }
}
