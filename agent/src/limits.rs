//! Per-workload connection caps: how many connections one tagged cgroup
//! holds through cordon at once (`profiles.<name>.max_connections`), so a
//! runaway job cannot exhaust the agent for every other workload.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// Open connections per tagged cgroup id.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, u32>>,
}

/// One counted connection; the count drops with it.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Connections>,
    key: u64,
}

impl Connections {
    /// Count a connection of `key`, unless `cap` connections are already
    /// open (then `Err` with that count).
    pub fn acquire(self: &Arc<Self>, key: u64, cap: Option<u32>) -> Result<Slot, u32> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key).or_insert(0);
        if cap.is_some_and(|c| *n >= c) {
            return Err(*n);
        }
        *n += 1;
        Ok(Slot { owner: self.clone(), key })
    }

    pub fn open(&self, key: u64) -> u32 {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(&key).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
#[path = "tests/limits.rs"]
mod tests;
