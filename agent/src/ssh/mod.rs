//! SSH adapter: the second protocol on the pipeline.
//!
//! Shape (as every adapter): the workload's connection is terminated by
//! cordon's own SSH server (`server`: host key and per-connection host
//! certificate from `hostkey`, `none` authentication: the identity is the
//! kernel's) → upstream client (`upstream`: pinned host keys, credentials
//! only cordon holds) → each session channel relayed by its own task
//! (`channel`), with exec commands judged (`policy`) and recorded through
//! the pipeline → errors that close only this session, with an audited
//! reason.

mod bounded;
pub mod channel;
pub mod forward;
pub mod hostkey;
pub mod policy;
pub mod record;
pub mod relay;
pub mod server;
pub mod sftp;
pub mod upstream;

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex, OnceLock},
    time::Duration,
};

pub use policy::SshPolicy;

use crate::{
    audit::Record,
    config::{AuthMode, Intercept, Profile},
    identity::Workload,
    pipeline::SessionPipeline,
    protocol::{Refused, Session},
    secrets::Credential,
    state::Shared,
};

/// What SSH sessions share across the agent: the host identity, loaded once.
#[derive(Default)]
pub struct SshShared {
    identity: OnceLock<Arc<hostkey::HostIdentity>>,
}

/// Ciphers offered to workloads (see the server config below).
const WORKLOAD_CIPHERS: &[russh::cipher::Name] = &[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM];

/// One workload connection.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub session: String,
    pub workload: Workload,
    pub rule: Intercept,
    pub profile: Profile,
    pub upstream_addr: SocketAddr,
    pub base: Record,
    /// Why the session is refused (audit down, connection cap): told to the
    /// client in the authentication banner, and every login is refused.
    pub refused: Option<Refused>,
    pub handle: OnceLock<russh::server::Handle>,
    pub typed_user: Mutex<Option<String>>,
    pub pipeline: Mutex<SessionPipeline>,
    upstream: tokio::sync::Mutex<Option<Result<Arc<upstream::Upstream>, String>>>,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Each channel's recording (path, hash), for the close record.
    pub recordings: Mutex<Vec<serde_json::Value>>,
    /// The channel tasks: the close record waits for their records.
    pub tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Ctx {
    /// The credential for the user the workload typed: `users.<typed>`,
    /// else `users."*"`, else (no map) the intercept's `credentials`. A map
    /// that names neither the user nor `*` gives none: refused.
    pub fn credential(&self) -> Option<Credential> {
        let name = if self.rule.users.is_empty() {
            match self.rule.login.as_ref().map(|l| &l.auth) {
                Some(AuthMode::Inject { credentials }) => credentials.clone(),
                _ => return None,
            }
        } else {
            let typed = self.typed_user.lock().ok().and_then(|u| u.clone()).unwrap_or_default();
            self.rule.users.get(&typed).or_else(|| self.rule.users.get("*"))?.clone()
        };
        self.shared.secrets().get(&name).cloned()
    }

    /// The upstream connection, opened once (a failure is kept: every
    /// channel of this connection gets the same answer).
    pub async fn upstream(&self) -> Result<Arc<upstream::Upstream>, String> {
        let mut slot = self.upstream.lock().await;
        if let Some(r) = slot.as_ref() {
            return r.clone();
        }
        let r = self.connect().await;
        *slot = Some(r.clone());
        r
    }

    /// Whether upstream logins use per-session user certificates (then each
    /// channel gets its own connection, with a certificate for exactly
    /// what it runs).
    pub fn uses_certificates(&self) -> bool {
        self.credential().is_some_and(|c| c.user_ca.is_some())
    }

    /// A connection for one channel, with a certificate scoped to it.
    pub async fn connect_scoped(&self, scope: upstream::Scope) -> Result<Arc<upstream::Upstream>, String> {
        self.connect_with(Some(&scope)).await
    }

    async fn connect(&self) -> Result<Arc<upstream::Upstream>, String> {
        self.connect_with(None).await
    }

    async fn connect_with(&self, scope: Option<&upstream::Scope>) -> Result<Arc<upstream::Upstream>, String> {
        let Some(cred) = self.credential() else {
            let typed = self.typed_user.lock().ok().and_then(|u| u.clone()).unwrap_or_default();
            return Err(format!(
                "intercept {} has no credential for the user {typed:?} (intercept.users, or credentials in the secrets file)",
                self.rule.name
            ));
        };
        let Some(known_hosts) = self.rule.known_hosts.as_ref() else {
            return Err(format!("intercept {} pins no host keys", self.rule.name));
        };
        match upstream::connect(&self.shared, self.upstream_addr, known_hosts, &cred, scope).await {
            Ok(h) => Ok(Arc::new(h)),
            Err(f) => {
                let rec =
                    self.base.clone().with_event("upstream_refused").with("kind", f.kind).with("detail", &f.message);
                let _ = self.shared.audit.append(&rec);
                tracing::warn!(kind = f.kind, "{}", f.message);
                Err(f.message)
            }
        }
    }
}

/// The protocol's entry point (see `protocol::serve`).
pub async fn serve(client: tokio::net::TcpStream, s: Session) -> crate::protocol::End {
    let ssh = s.shared.protocol_state::<SshShared>();
    let identity = match ssh.identity.get() {
        Some(i) => i.clone(),
        None => match hostkey::HostIdentity::load_or_create(&s.shared.policy().agent.state_dir) {
            Ok(i) => ssh.identity.get_or_init(|| Arc::new(i)).clone(),
            Err(e) => {
                return crate::protocol::End {
                    outcome: "internal_error",
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                }
            }
        },
    };
    let banner = peek_banner(&client).await;
    let cert = match identity.certificate(&s.id, &banner) {
        Ok(c) => vec![c],
        Err(e) => {
            tracing::warn!("no host certificate for this connection: {e:#}");
            Vec::new()
        }
    };
    let config = Arc::new(russh::server::Config {
        keys: vec![identity.key.clone()],
        certificates: cert,
        methods: russh::MethodSet::from(
            &[russh::MethodKind::None, russh::MethodKind::PublicKey, russh::MethodKind::Password][..],
        ),
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 65_535,
        nodelay: true,
        // AES-GCM only: the client picks the first of its own list that we
        // offer, and OpenSSH lists ChaCha20-Poly1305 and AES-CTR first, which
        // cost cordon (ring) about twice the CPU of AES-GCM on the CPU's AES
        // instructions. OpenSSH ≥ 6.2, paramiko, asyncssh, Go and libssh
        // all speak AES-GCM; a client that does not is told no cipher matched.
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(WORKLOAD_CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..russh::server::Config::default()
    });
    let pipeline = SessionPipeline::new(s.shared.audit.clone(), &s.id, s.profile.record, s.shared.literal_key(), None);
    let ctx = Arc::new(Ctx {
        shared: s.shared.clone(),
        session: s.id.clone(),
        workload: s.workload,
        rule: s.rule,
        profile: s.profile,
        upstream_addr: s.upstream,
        base: s.base,
        refused: s.admission.err(),
        handle: OnceLock::new(),
        typed_user: Mutex::new(None),
        pipeline: Mutex::new(pipeline),
        upstream: tokio::sync::Mutex::new(None),
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        recordings: Mutex::new(Vec::new()),
        tasks: Mutex::new(Vec::new()),
    });
    let handler = server::Server { ctx: ctx.clone() };
    let result = match russh::server::run_stream(config, client, handler).await {
        Ok(running) => {
            let _ = ctx.handle.set(running.handle());
            running.await
        }
        Err(e) => Err(e),
    };
    // Each channel ends with the connection; its statement_end and
    // recording come before the close record.
    let tasks: Vec<_> = ctx.tasks.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), t).await.is_err() {
            abort.abort();
        }
    }
    if let Some(up) = ctx.upstream.lock().await.take().and_then(Result::ok) {
        let _ = up.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
    let statements = ctx.pipeline.lock().map(|p| p.statements()).unwrap_or(0);
    let mut fields: Vec<(&'static str, serde_json::Value)> = vec![("commands", statements.into())];
    if let Some(u) = ctx.typed_user.lock().ok().and_then(|u| u.clone()) {
        fields.push(("ssh_user", u.into()));
    }
    if let Some(c) = ctx.credential() {
        fields.push(("upstream_user", c.user.into()));
    }
    let casts = ctx.recordings.lock().map(|r| r.clone()).unwrap_or_default();
    if !casts.is_empty() {
        fields.push(("recordings", casts.into()));
    }
    let (outcome, error) = match (&ctx.refused, result) {
        (Some(r), _) => (r.outcome, Some(r.message.clone())),
        (None, Ok(())) => ("closed", None),
        (None, Err(e)) => ("error", Some(e.to_string())),
    };
    crate::protocol::End {
        outcome,
        error,
        bytes_up: ctx.bytes_up.load(std::sync::atomic::Ordering::Relaxed),
        bytes_down: ctx.bytes_down.load(std::sync::atomic::Ordering::Relaxed),
        fields,
    }
}

/// The client's identification line, if it sends one first (OpenSSH does),
/// without consuming it.
async fn peek_banner(client: &tokio::net::TcpStream) -> String {
    let mut buf = [0u8; 255];
    match tokio::time::timeout(Duration::from_millis(1500), client.peek(&mut buf)).await {
        Ok(Ok(n)) => {
            let text = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
            text.lines().next().unwrap_or_default().to_string()
        }
        _ => String::new(),
    }
}
