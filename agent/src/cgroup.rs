//! cgroup v2: finding the mount, mapping ids to paths, moving the agent into
//! its own cgroup, and naming what a cgroup path says about a workload.
//!
//! A cgroup v2 id is the inode number of its directory in cgroupfs (the
//! kernfs node id), which is what `bpf_get_current_cgroup_id()` returns.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on pure-v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. Read from /proc/mounts.
pub fn find_v2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    find_v2_root_in(&mounts).with_context(|| {
        "no cgroup2 filesystem is mounted (checked /proc/mounts); cordon needs cgroup v2 \
         (mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` on hybrid hosts)"
            .to_string()
    })
}

pub fn find_v2_root_in(mounts: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_dev, dir, fstype) = (it.next()?, it.next()?, it.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .collect();
    // Prefer the canonical location when several are mounted.
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found.into_iter().next()
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
}

pub fn id_of(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// Relative cgroup v2 path of a process, from /proc/PID/cgroup ("0::/a/b").
pub fn of_pid(pid: &str) -> Result<String> {
    let text =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("0::") {
            return Ok(p.trim_start_matches('/').to_string());
        }
    }
    bail!("/proc/{pid}/cgroup has no cgroup v2 line")
}

/// Create `rel` under the v2 root if needed and move this whole process into
/// it. Must run before any thread is spawned, so every thread moves.
pub fn move_self_into(root: &Path, rel: &str) -> Result<PathBuf> {
    let dir = root.join(rel);
    fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the agent into {}", dir.display()))?;
    Ok(dir)
}

/// Normalise a user-given cgroup path: relative to the v2 root, no leading or
/// trailing '/'. Accepts an absolute path under the mount too.
pub fn normalise(root: &Path, given: &str) -> String {
    let p = Path::new(given);
    let rel = p.strip_prefix(root).unwrap_or(p);
    rel.to_string_lossy().trim_matches('/').to_string()
}

/// Most cgroup directories walked in one scan; a host with more is refused
/// loudly rather than scanned without bound.
pub const MAX_CGROUPS: usize = 200_000;

/// Every cgroup directory under the root: (relative path, id). The root
/// itself is "" (the agent never tags it implicitly).
pub fn walk(root: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let id = match id_of(&dir) {
            Ok(id) => id,
            // Removed while we walked: not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat {}", dir.display())),
        };
        out.push((rel.clone(), id));
        if out.len() > MAX_CGROUPS {
            bail!("more than {MAX_CGROUPS} cgroups under {}; refusing to scan", root.display());
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                stack.push((entry.path(), child_rel));
            }
        }
    }
    Ok(out)
}

/// id → path, refreshed by a walk when an id is not known.
#[derive(Default)]
pub struct Index {
    by_id: HashMap<u64, String>,
}

impl Index {
    pub fn path_of(&mut self, root: &Path, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            // Still the same directory? (ids are not reused while it exists)
            if id_of(&root.join(p)).ok() == Some(id) {
                return Some(p.clone());
            }
        }
        self.refresh(root);
        self.by_id.get(&id).cloned()
    }

    pub fn refresh(&mut self, root: &Path) {
        if let Ok(all) = walk(root) {
            self.by_id = all.into_iter().map(|(p, id)| (id, p)).collect();
        }
    }
}

/// What a cgroup path says about the workload: systemd unit and slice, and a
/// container id where a runtime's naming is recognised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PathInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

pub fn describe(rel: &str) -> PathInfo {
    let mut info = PathInfo::default();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if comp.ends_with(".slice") {
            info.slice = Some(comp.to_string());
        } else if comp.ends_with(".service") || comp.ends_with(".scope") {
            info.unit = Some(comp.to_string());
        }
        if let Some(id) = container_id(comp) {
            info.container = Some(id);
        }
    }
    info
}

fn container_id(comp: &str) -> Option<String> {
    let stem = comp.strip_suffix(".scope").unwrap_or(comp);
    let id = ["docker-", "libpod-", "cri-containerd-", "crio-", "containerd-"]
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .unwrap_or(stem);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

#[cfg(test)]
#[path = "tests/cgroup.rs"]
mod tests;
