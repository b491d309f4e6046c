//! State shared by the proxy, the control socket and the reload path.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use crate::{audit::AuditLog, config::Policy, identity::Resolver, kernel::Kernel, tagging::Tagger};

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
}

impl Shared {
    pub fn new(cgroup_root: PathBuf, policy: Policy, kernel: Kernel, tagger: Tagger, audit: AuditLog) -> Self {
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
