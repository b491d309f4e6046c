//! Who opened a connection, from what the kernel recorded at connect time.
//!
//! Only kernel-derived facts go in: the cgroup id (strong identity), the
//! tgid/pid and uid/gid of the calling task, and `comm` (informational; a
//! process can change it). Paths, unit and user names are resolved here.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use agent_common::{ConnMeta, AF_INET};
use serde::Serialize;

use crate::cgroup::{self, PathInfo};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Workload {
    pub cgroup_id: u64,
    /// Relative to the cgroup2 root; None if the cgroup is already gone.
    pub cgroup: Option<String>,
    /// The tagged cgroup (the workload's own or an ancestor).
    pub tagged_cgroup: Option<String>,
    pub profile: String,
    #[serde(flatten)]
    pub path_info: PathInfo,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub gid: u32,
    pub comm: String,
}

/// Resolves ids to names, with caches (a uid's name and a cgroup's path are
/// looked up once, not per connection).
#[derive(Default)]
pub struct Resolver {
    cgroups: cgroup::Index,
    users: HashMap<u32, Option<String>>,
}

impl Resolver {
    pub fn workload(&mut self, root: &Path, meta: &ConnMeta, profile: &str) -> Workload {
        let cgroup = self.cgroups.path_of(root, meta.cgroup_id);
        let tagged_cgroup = if meta.tagged_cgroup_id == meta.cgroup_id {
            cgroup.clone()
        } else {
            self.cgroups.path_of(root, meta.tagged_cgroup_id)
        };
        let path_info = cgroup.as_deref().map(cgroup::describe).unwrap_or_default();
        let user = self
            .users
            .entry(meta.uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid)).ok().flatten().map(|u| u.name)
            })
            .clone();
        let comm_len = meta.comm.iter().position(|b| *b == 0).unwrap_or(meta.comm.len());
        let comm = String::from_utf8_lossy(meta.comm.get(..comm_len).unwrap_or(&[])).into_owned();
        Workload {
            cgroup_id: meta.cgroup_id,
            cgroup,
            tagged_cgroup,
            profile: profile.to_string(),
            path_info,
            pid: meta.tgid,
            tid: meta.pid,
            uid: meta.uid,
            user,
            gid: meta.gid,
            comm,
        }
    }
}

/// The destination the workload dialled, as it dialled it.
pub fn original_destination(meta: &ConnMeta) -> SocketAddr {
    let v6 = Ipv6Addr::from(meta.orig_addr);
    let ip = match (meta.family, v6.to_ipv4_mapped()) {
        (AF_INET, Some(v4)) => IpAddr::V4(v4),
        // A dual-stack socket dialled ::ffff:a.b.c.d: report the IPv4 address,
        // which is where the connection goes.
        (_, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, meta.orig_port)
}
