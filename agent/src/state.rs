//! State shared by the proxy, the control socket and the reload path.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use crate::{
    audit::AuditLog, config::Policy, identity::Resolver, kernel::Kernel, postgres::CancelTarget, secrets::Secrets,
    tagging::Tagger,
};

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
    cancel: Mutex<std::collections::HashMap<(i32, Vec<u8>), CancelTarget>>,
    /// Parsed statements, by text (shared by all sessions).
    pub sql: crate::postgres::sql::Cache,
    catalogs: Mutex<std::collections::HashMap<(std::net::SocketAddr, String), Arc<crate::postgres::catalog::Catalog>>>,
    literal_key: std::sync::OnceLock<crate::pipeline::literals::LiteralKey>,
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
            cancel: Mutex::new(std::collections::HashMap::new()),
            sql: crate::postgres::sql::Cache::default(),
            catalogs: Mutex::new(std::collections::HashMap::new()),
            literal_key: std::sync::OnceLock::new(),
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

    /// The shared catalog of one database on one server.
    pub fn catalog(&self, upstream: std::net::SocketAddr, database: &str) -> Arc<crate::postgres::catalog::Catalog> {
        let key = (upstream, database.to_string());
        match self.catalogs.lock() {
            Ok(mut m) => m
                .entry(key)
                .or_insert_with(|| Arc::new(crate::postgres::catalog::Catalog::new(upstream, database)))
                .clone(),
            Err(_) => Arc::new(crate::postgres::catalog::Catalog::new(upstream, database)),
        }
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

    /// Issue a cancel key for a backend: random, of the backend key's length
    /// (4 bytes under protocol 3.0, longer under 3.2).
    pub fn register_cancel(&self, target: CancelTarget, key_len: usize) -> (i32, Vec<u8>) {
        use rand::Rng;
        let mut rng = rand::rng();
        let len = key_len.clamp(4, 256);
        let Ok(mut map) = self.cancel.lock() else { return (0, vec![0; len]) };
        loop {
            let pid: i32 = rng.random_range(1..i32::MAX);
            let key: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry((pid, key.clone())) {
                v.insert(target);
                return (pid, key);
            }
        }
    }

    pub fn cancel_target(&self, pid: i32, key: &[u8]) -> Option<CancelTarget> {
        self.cancel.lock().ok()?.get(&(pid, key.to_vec())).cloned()
    }

    pub fn forget_cancel(&self, pid: i32, key: &[u8]) {
        if let Ok(mut m) = self.cancel.lock() {
            m.remove(&(pid, key.to_vec()));
        }
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

    pub fn connect_timeout(&self) -> Duration {
        self.policy().agent.connect_timeout
    }

    pub fn socket_mark(&self) -> u32 {
        self.policy().agent.socket_mark
    }
}
