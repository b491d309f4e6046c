//! The shared approval store: one PostgreSQL table that many agents put
//! their held requests in, and that approvers decide in from any machine
//! with their own database login.
//!
//! - An agent INSERTs a pending row when it holds a statement, LISTENs on
//!   `cordon_approvals` for wake-ups, and also polls (a NOTIFY sent while it
//!   was reconnecting is lost).
//! - A decision is one conditional UPDATE (pending → approved/denied) run
//!   as the approver's own role: it happens exactly once, counts distinct
//!   roles, never the role mapped to the workload, and never after expiry.
//! - Who may decide is the database's business (GRANT, row-level security).
//! - If the store is unreachable, requests wait until their hold timeout
//!   and are then denied: nothing is approved by default. The outage is
//!   logged, and the agent keeps reconnecting.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config};

/// Where the store is and how the agent logs in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// A libpq URL without a password: `postgresql://host:port/db?sslmode=require`.
    pub url: String,
    /// `[credentials.NAME]` in the secrets file: the agent's own role.
    pub credentials: Option<String>,
    /// CA file the store's certificate is checked against (default: the
    /// system's roots).
    pub ca: Option<std::path::PathBuf>,
}

/// The table and the trigger that wakes listening agents. Idempotent.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cordon_approvals (
    id              text PRIMARY KEY,
    agent           text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'withdrawn')),
    created         timestamptz NOT NULL DEFAULT now(),
    expires         timestamptz NOT NULL,
    profile         text NOT NULL,
    rule            text NOT NULL,
    reason          text NOT NULL,
    statement       text NOT NULL,
    binding         text NOT NULL,
    workload        jsonb NOT NULL,
    target          jsonb NOT NULL,
    requester_role  text,
    required        int NOT NULL DEFAULT 1 CHECK (required >= 1),
    approvals       text[] NOT NULL DEFAULT '{}',
    decided_by      text,
    decision_reason text,
    decided_at      timestamptz
);
CREATE INDEX IF NOT EXISTS cordon_approvals_pending ON cordon_approvals (state) WHERE state = 'pending';
CREATE OR REPLACE FUNCTION cordon_approvals_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cordon_approvals', NEW.id);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS cordon_approvals_notify ON cordon_approvals;
CREATE TRIGGER cordon_approvals_notify AFTER INSERT OR UPDATE ON cordon_approvals
    FOR EACH ROW EXECUTE FUNCTION cordon_approvals_notify();
";

/// An approver's approval: one statement, counted once per role, never by
/// the workload's role, never after expiry; the row turns `approved` when
/// enough distinct roles have approved.
const APPROVE: &str = "
UPDATE cordon_approvals
   SET approvals = array_append(approvals, current_user::text),
       state = CASE WHEN cardinality(approvals) + 1 >= required THEN 'approved' ELSE 'pending' END,
       decided_by = CASE WHEN cardinality(approvals) + 1 >= required THEN current_user::text END,
       decision_reason = $2,
       decided_at = CASE WHEN cardinality(approvals) + 1 >= required THEN now() END
 WHERE id = $1 AND state = 'pending' AND expires > now()
   AND NOT (current_user::text = ANY (approvals))
   AND current_user::text IS DISTINCT FROM requester_role
RETURNING state, cardinality(approvals), required";

const DENY: &str = "
UPDATE cordon_approvals
   SET state = 'denied', decided_by = current_user::text, decision_reason = $2, decided_at = now()
 WHERE id = $1 AND state = 'pending' AND expires > now()
   AND current_user::text IS DISTINCT FROM requester_role
RETURNING state";

/// Connect, with TLS unless the URL says `sslmode=disable`. Notifications
/// (LISTEN) arrive on the returned channel.
pub async fn connect(
    url: &str,
    login: Option<(&str, &str)>,
    ca: Option<&std::path::Path>,
) -> Result<(Client, mpsc::UnboundedReceiver<String>)> {
    let mut config: Config = url.parse().with_context(|| format!("the store URL {url:?} does not parse"))?;
    if let Some((user, password)) = login {
        config.user(user).password(password);
    }
    config.connect_timeout(Duration::from_secs(10));
    config.application_name("cordon");
    let (tx, rx) = mpsc::unbounded_channel();
    let client = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.context("connecting to the approval store")?;
        tokio::spawn(drive(conn, tx));
        client
    } else {
        let tls = crate::net::client_config(ca)?;
        let make = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        let (client, conn) = config.connect(make).await.context("connecting to the approval store (TLS)")?;
        tokio::spawn(drive(conn, tx));
        client
    };
    Ok((client, rx))
}

async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, tx: mpsc::UnboundedSender<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
        match m {
            Ok(AsyncMessage::Notification(n)) => {
                let _ = tx.send(n.payload().to_string());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("approval store connection: {e}");
                break;
            }
        }
    }
}

/// `cordon approvals init-store`.
pub async fn init(client: &Client) -> Result<()> {
    client.batch_execute(SCHEMA).await.context("creating the approvals table")
}

/// A pending request, as the store holds it.
pub struct Row<'a> {
    pub id: &'a str,
    pub agent: &'a str,
    pub expires_in: Duration,
    pub req: &'a super::Request,
    pub required: u32,
    pub requester_role: Option<String>,
}

pub async fn insert(client: &Client, r: &Row<'_>) -> Result<()> {
    let workload = serde_json::to_value(&r.req.workload)?;
    let target = json!({
        "protocol": r.req.protocol,
        "upstream": r.req.upstream,
        "database": r.req.database,
        "upstream_user": r.req.upstream_user,
        "session": r.req.session,
    });
    let expires = format!("{} milliseconds", r.expires_in.as_millis());
    client
        .execute(
            "INSERT INTO cordon_approvals (id, agent, expires, profile, rule, reason, statement, binding, workload, target, requester_role, required)
             VALUES ($1, $2, now() + $3::text::interval, $4, $5, $6, $7, $8, $9::text::jsonb, $10::text::jsonb, $11, $12)",
            &[
                &r.id,
                &r.agent,
                &expires,
                &r.req.profile,
                &r.req.rule,
                &r.req.reason,
                &r.req.text,
                &r.req.binding,
                &workload.to_string(),
                &target.to_string(),
                &r.requester_role,
                &(r.required as i32),
            ],
        )
        .await
        .context("inserting the request into the approval store")?;
    Ok(())
}

/// A decided row.
#[derive(Debug, Clone)]
pub struct Decided {
    pub id: String,
    pub state: String,
    pub approvals: Vec<String>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

/// The rows among `ids` that are no longer pending.
pub async fn decided(client: &Client, ids: &[String]) -> Result<Vec<Decided>> {
    let rows = client
        .query(
            "SELECT id, state, approvals, decided_by, decision_reason FROM cordon_approvals WHERE id = ANY($1) AND state <> 'pending'",
            &[&ids],
        )
        .await
        .context("polling the approval store")?;
    Ok(rows
        .iter()
        .map(|r| Decided { id: r.get(0), state: r.get(1), approvals: r.get(2), decided_by: r.get(3), reason: r.get(4) })
        .collect())
}

/// Mark a request the agent ended (expired, withdrawn) so approvers see it.
pub async fn close(client: &Client, id: &str, state: &str) -> Result<()> {
    client
        .execute(
            "UPDATE cordon_approvals SET state = $2, decided_at = now() WHERE id = $1 AND state = 'pending'",
            &[&id, &state],
        )
        .await
        .context("closing the request in the approval store")?;
    Ok(())
}

/// An approver's decision, as their own role. The answer says what came of it.
pub async fn decide(client: &Client, id: &str, approve: bool, reason: Option<&str>) -> Result<String> {
    if approve {
        let rows = client.query(APPROVE, &[&id, &reason]).await.context("approving")?;
        let Some(r) = rows.first() else {
            return Ok(why_not(client, id).await);
        };
        let (state, have, need): (String, i32, i32) = (r.get(0), r.get(1), r.get(2));
        Ok(if state == "approved" {
            format!("request {id} approved; the statement runs now")
        } else {
            format!("approved: {have} of {need} distinct approvals")
        })
    } else {
        let rows = client.query(DENY, &[&id, &reason]).await.context("denying")?;
        if rows.is_empty() {
            return Ok(why_not(client, id).await);
        }
        Ok(format!("request {id} denied"))
    }
}

/// Why a conditional UPDATE matched nothing.
async fn why_not(client: &Client, id: &str) -> String {
    let row = client
        .query_opt(
            "SELECT state, expires <= now(), current_user::text = ANY (approvals), current_user::text IS NOT DISTINCT FROM requester_role FROM cordon_approvals WHERE id = $1",
            &[&id],
        )
        .await;
    match row {
        Ok(Some(r)) => {
            let (state, expired, again, own): (String, bool, bool, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
            if own {
                format!("refused: your role is mapped to the workload that made request {id}; nobody approves their own statement")
            } else if state != "pending" {
                format!("refused: request {id} is not pending (it is {state}); nothing was changed")
            } else if expired {
                format!("refused: request {id} has expired")
            } else if again {
                format!("refused: you already approved request {id}; it needs distinct people")
            } else {
                format!("refused: request {id} was not changed")
            }
        }
        Ok(None) => format!("refused: no request {id} that your role may see"),
        Err(e) => format!("refused: {e}"),
    }
}

/// Pending rows, for `list` and `show`.
pub async fn pending(client: &Client, id: Option<&str>) -> Result<Vec<Value>> {
    let rows = client
        .query(
            "SELECT json_build_object('id', id, 'agent', agent, 'profile', profile, 'rule', rule, 'reason', reason,
                    'text', statement, 'statement', statement, 'binding', binding, 'workload', workload, 'target', target,
                    'required', required, 'approvals', approvals, 'created', created,
                    'held_s', extract(epoch from now() - created)::bigint,
                    'expires_in_s', greatest(0, extract(epoch from expires - now())::bigint))::text
               FROM cordon_approvals
              WHERE state = 'pending' AND expires > now() AND ($1::text IS NULL OR id = $1)
              ORDER BY created",
            &[&id],
        )
        .await
        .context("listing the approval store")?;
    Ok(rows.iter().filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()).collect())
}

/// The agent's side: one connection per store, reconnected when lost.
pub struct Link {
    settings: StoreSettings,
    client: Option<Client>,
}

impl Link {
    pub fn new(settings: StoreSettings) -> Self {
        Self { settings, client: None }
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// The connected client, reconnecting (and LISTENing again) if needed.
    /// Notifications wake `wake`.
    pub async fn client(&mut self, shared: &crate::state::Shared, wake: Arc<tokio::sync::Notify>) -> Result<&Client> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let secrets = shared.secrets();
            let login =
                match &self.settings.credentials {
                    Some(name) => Some(secrets.get(name).with_context(|| {
                        format!("approvals store credentials {name:?} are not in the secrets file")
                    })?),
                    None => None,
                };
            let (client, mut notes) = connect(
                &self.settings.url,
                login.map(|c| (c.user.as_str(), c.password.expose())),
                self.settings.ca.as_deref(),
            )
            .await?;
            client.batch_execute("LISTEN cordon_approvals").await.context("LISTEN on the approval store")?;
            // Wake-ups only; the rows are the truth.
            tokio::spawn(async move {
                while notes.recv().await.is_some() {
                    wake.notify_one();
                }
            });
            self.client = Some(client);
        }
        self.client.as_ref().context("no store connection")
    }
}

/// Which agent wrote a row: host name and process, for approvers.
pub fn agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{host}/{}", std::process::id())
}
