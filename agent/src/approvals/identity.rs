//! An approver's identity, authenticated by the kernel: the uid of the
//! process at the other end of the approvals socket (SO_PEERCRED), and the
//! user name and groups the system's user database gives that uid. What a
//! client claims about itself is never read.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approver {
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Approver {
    /// The user and groups of a uid (primary and supplementary, from
    /// getpwuid/getgrouplist: what `id` prints).
    pub fn of_uid(uid: u32) -> Self {
        use nix::unistd::{Gid, Group, Uid, User};
        let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) else {
            return Self { uid, user: None, groups: Vec::new() };
        };
        let mut groups = Vec::new();
        if let Ok(name) = std::ffi::CString::new(u.name.clone()) {
            let gids = nix::unistd::getgrouplist(&name, u.gid).unwrap_or_else(|_| vec![u.gid]);
            for g in gids {
                if let Ok(Some(group)) = Group::from_gid(Gid::from_raw(g.as_raw())) {
                    groups.push(group.name);
                }
            }
        }
        groups.sort();
        groups.dedup();
        Self { uid, user: Some(u.name), groups }
    }

    /// "alice" or "uid 1234".
    pub fn display(&self) -> String {
        self.user.clone().unwrap_or_else(|| format!("uid {}", self.uid))
    }
}
