//! State shared by the proxy, the control socket and the reload path.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use crate::{audit::AuditLog, config::Policy, identity::Resolver, kernel::Kernel, secrets::Secrets, tagging::Tagger};

pub struct Shared {
    pub cgroup_root: PathBuf,
    pub policy: RwLock<Arc<Policy>>,
    pub kernel: Mutex<Kernel>,
    pub tagger: Mutex<Tagger>,
    pub resolver: Mutex<Resolver>,
    pub audit: AuditLog,
    pub sessions_open: AtomicU64,
    session_seq: AtomicU64,
    /// Start time of this agent, so session ids stay unique across restarts.
    epoch: u64,
    pub shutdown: tokio::sync::Notify,
    pub secrets: RwLock<Arc<Secrets>>,
    client_tls: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: Mutex<std::collections::HashMap<Option<PathBuf>, Arc<rustls::ClientConfig>>>,
    /// Each protocol's own shared state, by type.
    protocols: Mutex<std::collections::HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>>,
    literal_key: std::sync::OnceLock<crate::pipeline::literals::LiteralKey>,
    /// Open connections per tagged cgroup (`max_connections`).
    pub connections: Arc<crate::limits::Connections>,
    /// Held statements and approval grants.
    pub approvals: Arc<crate::approvals::Hub>,
}

impl Shared {
    pub fn new(
        cgroup_root: PathBuf,
        policy: Policy,
        kernel: Kernel,
        tagger: Tagger,
        audit: AuditLog,
        secrets: Secrets,
        client_tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let audit_for_approvals = audit.clone();
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            cgroup_root,
            policy: RwLock::new(Arc::new(policy)),
            kernel: Mutex::new(kernel),
            tagger: Mutex::new(tagger),
            resolver: Mutex::new(Resolver::default()),
            audit,
            sessions_open: AtomicU64::new(0),
            session_seq: AtomicU64::new(0),
            epoch,
            shutdown: tokio::sync::Notify::new(),
            secrets: RwLock::new(Arc::new(secrets)),
            client_tls,
            upstream_tls: Mutex::new(std::collections::HashMap::new()),
            protocols: Mutex::new(std::collections::HashMap::new()),
            literal_key: std::sync::OnceLock::new(),
            connections: Arc::default(),
            approvals: crate::approvals::Hub::new(audit_for_approvals),
        }
    }

    /// The key literals and parameters are hashed with in cordon's records:
    /// `[audit] literal_key` from the secrets file, else one generated once
    /// into `<state_dir>/literal.key` (0600).
    pub fn literal_key(&self) -> crate::pipeline::literals::LiteralKey {
        self.literal_key
            .get_or_init(|| {
                let from_secrets = self.secrets().literal_key.as_ref().map(|k| k.expose().as_bytes().to_vec());
                let key = match from_secrets {
                    Some(k) => k,
                    None => {
                        let dir = self.policy().agent.state_dir.clone();
                        crate::pipeline::literals::state_key(&dir).unwrap_or_else(|e| {
                            tracing::warn!("no literal key: {e:#}; using a key for this run only (set [audit] literal_key in the secrets file)");
                            rand::random::<[u8; 32]>().to_vec()
                        })
                    }
                };
                crate::pipeline::literals::LiteralKey::new(&key)
            })
            .clone()
    }

    /// A protocol's own shared state (its caches and registries), created
    /// on first use: the seam keeps protocol types out of this file.
    pub fn protocol_state<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let id = std::any::TypeId::of::<T>();
        let mut map = match self.protocols.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let any =
            map.entry(id).or_insert_with(|| Arc::new(T::default()) as Arc<dyn std::any::Any + Send + Sync>).clone();
        drop(map);
        any.downcast::<T>().unwrap_or_else(|_| Arc::new(T::default()))
    }

    pub fn secrets(&self) -> Arc<Secrets> {
        match self.secrets.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn client_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.client_tls.clone()
    }

    /// Upstream TLS configuration for a CA file (None = system roots),
    /// built once and cached.
    pub fn upstream_tls(&self, ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let key = ca_file.map(std::path::Path::to_path_buf);
        let mut cache = self.upstream_tls.lock().map_err(|_| anyhow::anyhow!("TLS cache poisoned"))?;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let c = crate::net::client_config(ca_file)?;
        cache.insert(key, c.clone());
        Ok(c)
    }

    pub fn max_message_bytes(&self) -> usize {
        self.policy().agent.max_message_bytes
    }

    pub fn recordings_dir(&self) -> PathBuf {
        self.policy().agent.state_dir.join("recordings")
    }

    /// The policy in force (a cheap clone of an Arc).
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn next_session_id(&self) -> String {
        let n = self.session_seq.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{:x}-{n}", self.epoch)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.policy().agent.idle_timeout
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.policy().agent.handshake_timeout
    }

    pub fn connect_timeout(&self) -> Duration {
        self.policy().agent.connect_timeout
    }

    pub fn socket_mark(&self) -> u32 {
        self.policy().agent.socket_mark
    }
}
