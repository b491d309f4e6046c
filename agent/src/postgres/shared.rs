//! What PostgreSQL sessions share across the agent: parsed statements, the
//! catalogs of the databases they reach, and the cancel keys cordon handed
//! out. Held in `Shared` through the protocol seam (`protocol_state`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::{catalog::Catalog, sql, CancelTarget};

#[derive(Default)]
pub struct PgShared {
    /// Parsed statements, by text (shared by all sessions).
    pub sql: sql::Cache,
    /// Which numbers of a statement shape may be sent as parameters.
    pub prepare: super::prepare::Plans,
    catalogs: Mutex<HashMap<(SocketAddr, String), Arc<Catalog>>>,
    cancel: Mutex<HashMap<(i32, Vec<u8>), CancelTarget>>,
    /// Servers found not to keep a session on one backend (said once each).
    pooled: Mutex<std::collections::HashSet<SocketAddr>>,
}

impl PgShared {
    /// The shared catalog of one database on one server.
    pub fn catalog(&self, upstream: std::net::SocketAddr, database: &str) -> Arc<Catalog> {
        let key = (upstream, database.to_string());
        match self.catalogs.lock() {
            Ok(mut m) => m.entry(key).or_insert_with(|| Arc::new(Catalog::new(upstream, database))).clone(),
            Err(_) => Arc::new(Catalog::new(upstream, database)),
        }
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

    /// True the first time `upstream` is found pooled (see `prepare`).
    pub fn first_pooled(&self, upstream: SocketAddr) -> bool {
        self.pooled.lock().is_ok_and(|mut s| s.len() < 4096 && s.insert(upstream))
    }

    pub fn cancel_target(&self, pid: i32, key: &[u8]) -> Option<CancelTarget> {
        self.cancel.lock().ok()?.get(&(pid, key.to_vec())).cloned()
    }

    pub fn forget_cancel(&self, pid: i32, key: &[u8]) {
        if let Ok(mut m) = self.cancel.lock() {
            m.remove(&(pid, key.to_vec()));
        }
    }
}
