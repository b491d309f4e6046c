//! Loading, attaching, pinning and re-adopting the kernel programs, and
//! typed access to their maps.
//!
//! Programs are attached at the cgroup v2 root as multi-attach bpf_links (so other
//! tools' programs keep working) through bpf_links pinned under
//! `<bpffs_dir>/v<ABI>-<object hash>/`. The pins keep enforcement in place
//! when the agent crashes or restarts: a tagged workload then gets
//! ECONNREFUSED from the empty proxy port, never a direct connection. A new
//! agent with the same object re-adopts the pins (and the tags in the pinned
//! map); one with a different object attaches its own, then removes the old.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use agent_common::{maps, programs, ConnMeta, InterceptRule, ProxyConfig, SockTuple, TagValue, ABI_VERSION, MAX_RULES};
use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};

/// The compiled kernel programs (built by build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cordon.bpf.o"));

pub struct Kernel {
    pin_dir: PathBuf,
    config: Array<MapData, ProxyConfig>,
    rules: Array<MapData, InterceptRule>,
    tags: HashMap<MapData, u64, TagValue>,
    by_tuple: HashMap<MapData, SockTuple, ConnMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Links were already pinned by an earlier agent with this object.
    Adopted,
    /// This agent attached and pinned them.
    Attached,
}

/// `v<ABI>-<fnv64 of the object>`: an agent never adopts maps whose layout it
/// might not share.
pub fn version_dir_name() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("v{ABI_VERSION}-{h:016x}")
}

fn link_pin(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("link_{prog}"))
}

impl Kernel {
    /// Attach (or re-adopt) the programs at the cgroup v2 root.
    pub fn attach_or_adopt(bpffs_dir: &Path, cgroup_root: &Path) -> Result<(Self, Attachment)> {
        ensure_bpffs(bpffs_dir)?;
        let pin_dir = bpffs_dir.join(version_dir_name());
        fs::create_dir_all(&pin_dir).with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)
            .context("loading cordon's eBPF object (needs root: CAP_BPF and CAP_NET_ADMIN)")?;

        let all_pinned = programs::ALL.iter().all(|p| {
            let path = link_pin(&pin_dir, p);
            path.exists() && PinnedLink::from_pin(&path).is_ok()
        });
        let attachment = if all_pinned {
            Attachment::Adopted
        } else {
            // A partial set (crash during attach) is replaced whole.
            for p in programs::ALL {
                let _ = fs::remove_file(link_pin(&pin_dir, p));
            }
            attach_all(&mut ebpf, cgroup_root, &pin_dir)?;
            Attachment::Attached
        };

        // Older versions: attach-then-remove, so enforcement never lapses.
        remove_other_versions(bpffs_dir, &pin_dir);

        let kernel = Self {
            config: Array::try_from(take_map(&mut ebpf, maps::CONFIG)?)?,
            rules: Array::try_from(take_map(&mut ebpf, maps::RULES)?)?,
            tags: HashMap::try_from(take_map(&mut ebpf, maps::TAGS)?)?,
            by_tuple: HashMap::try_from(take_map(&mut ebpf, maps::BY_TUPLE)?)?,
            pin_dir,
        };
        Ok((kernel, attachment))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn set_config(&mut self, cfg: &ProxyConfig) -> Result<()> {
        self.config.set(0, *cfg, 0).context("writing the proxy configuration map")
    }

    /// Replace the rule table. Entries are written past-the-end first so the
    /// kernel never scans a half-written table past its end marker.
    pub fn set_rules(&mut self, rules: &[InterceptRule]) -> Result<()> {
        if rules.len() > MAX_RULES as usize {
            bail!("{} kernel rules; at most {MAX_RULES}", rules.len());
        }
        for i in (rules.len() as u32..MAX_RULES).rev() {
            self.rules.set(i, InterceptRule::EMPTY, 0).context("clearing a rule slot")?;
        }
        for (i, r) in rules.iter().enumerate().rev() {
            self.rules.set(i as u32, *r, 0).context("writing a rule slot")?;
        }
        Ok(())
    }

    pub fn tags(&self) -> Vec<(u64, TagValue)> {
        self.tags.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn set_tag(&mut self, cgroup_id: u64, profile_id: u32) -> Result<()> {
        let v = TagValue { profile_id, _pad: 0 };
        self.tags.insert(cgroup_id, v, 0).with_context(|| format!("tagging cgroup id {cgroup_id}"))
    }

    pub fn remove_tag(&mut self, cgroup_id: u64) -> Result<()> {
        match self.tags.remove(&cgroup_id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("untagging cgroup id {cgroup_id}")),
        }
    }

    /// Take (read and delete) the metadata the kernel published for an
    /// accepted connection.
    pub fn take_meta(&mut self, tuple: &SockTuple) -> Option<ConnMeta> {
        let meta = self.by_tuple.get(tuple, 0).ok()?;
        let _ = self.by_tuple.remove(tuple);
        Some(meta)
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("the eBPF object has no map {name}; rebuild the agent"))
}

/// bpf_link cgroup attachments are always multi-attach (the kernel passes
/// BPF_F_ALLOW_MULTI itself) and refuse any flag with EINVAL, so the mode
/// that maps to flags = 0 is the one that coexists with other tools.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn attach_all(ebpf: &mut Ebpf, cgroup_root: &Path, pin_dir: &Path) -> Result<()> {
    let root =
        fs::File::open(cgroup_root).with_context(|| format!("opening the cgroup v2 root {}", cgroup_root.display()))?;
    for name in [programs::CONNECT4, programs::CONNECT6, programs::GETPEERNAME4, programs::GETPEERNAME6] {
        let prog: &mut CgroupSockAddr =
            ebpf.program_mut(name).ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?.try_into()?;
        prog.load().with_context(|| format!("loading {name} (the verifier rejected it?)"))?;
        let id = prog
            .attach(&root, LINK_ATTACH_MODE)
            .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        link.pin(link_pin(pin_dir, name)).with_context(|| format!("pinning the {name} link"))?;
    }
    let name = programs::SOCKOPS;
    let prog: &mut SockOps =
        ebpf.program_mut(name).ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?.try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;
    let id = prog
        .attach(&root, LINK_ATTACH_MODE)
        .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
    let link = FdLink::try_from(prog.take_link(id)?)?;
    link.pin(link_pin(pin_dir, name)).with_context(|| format!("pinning the {name} link"))?;
    Ok(())
}

/// The pin directory must be on bpffs. Where none is mounted at
/// /sys/fs/bpf (minimal hosts, containers), mount it, as systemd would.
fn ensure_bpffs(bpffs_dir: &Path) -> Result<()> {
    let on_bpffs = |mounts: &str| {
        mounts.lines().any(|l| {
            let mut it = l.split_whitespace();
            let (_, dir, ty) = (it.next(), it.next(), it.next());
            ty == Some("bpf") && dir.is_some_and(|d| bpffs_dir.starts_with(d))
        })
    };
    if on_bpffs(&fs::read_to_string("/proc/mounts").unwrap_or_default()) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !bpffs_dir.starts_with(default) {
        bail!(
            "{} is not on a bpf filesystem; mount one there (`mount -t bpf bpf DIR`) or use a bpffs_dir under /sys/fs/bpf",
            bpffs_dir.display()
        );
    }
    fs::create_dir_all(default).with_context(|| format!("creating {}", default.display()))?;
    nix::mount::mount(Some("bpf"), default, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .context("mounting bpffs at /sys/fs/bpf (needs root)")?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Remove one version directory: link pins first (that detaches the
/// programs once no agent holds them), then the map pins.
fn remove_version_dir(dir: &Path) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    entries.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
    for e in entries {
        fs::remove_file(&e)?;
        removed.push(e.display().to_string());
    }
    fs::remove_dir(dir)?;
    Ok(removed)
}

fn remove_other_versions(bpffs_dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(bpffs_dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p != keep && p.is_dir() {
            match remove_version_dir(&p) {
                Ok(_) => tracing::info!(dir = %p.display(), "removed an older version's programs and maps"),
                Err(e) => tracing::warn!(dir = %p.display(), "could not remove an older version: {e}"),
            }
        }
    }
}

/// `cordon detach`: unpin every version's links and maps. With no pins and
/// no agent holding them, the kernel detaches the programs.
pub fn detach(bpffs_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(bpffs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("listing {}", bpffs_dir.display())),
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            removed.extend(remove_version_dir(&p).with_context(|| format!("removing {}", p.display()))?);
        }
    }
    fs::remove_dir(bpffs_dir).with_context(|| format!("removing {}", bpffs_dir.display()))?;
    Ok(removed)
}

/// Build the configuration the programs read.
pub fn proxy_config(listen: SocketAddr, listen6: Option<SocketAddr>, mark: u32, agent_cgroup_id: u64) -> ProxyConfig {
    let ip4 = match listen.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    let ip6 = match listen6.map(|a| a.ip()) {
        Some(IpAddr::V6(a)) => a,
        _ => Ipv6Addr::LOCALHOST,
    };
    let o = ip6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    ProxyConfig {
        proxy_ip4: u32::from_ne_bytes(ip4.octets()),
        proxy_ip6: [word(0), word(4), word(8), word(12)],
        proxy_port: listen.port(),
        ready: 1,
        _pad0: 0,
        socket_mark: mark,
        _pad1: 0,
        agent_cgroup_id,
    }
}

/// The key under which the kernel published an accepted connection.
pub fn tuple_for(peer: SocketAddr, local: SocketAddr) -> SockTuple {
    SockTuple {
        src_addr: v6_form(peer.ip()),
        dst_addr: v6_form(local.ip()),
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
    }
}

fn v6_form(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

#[cfg(test)]
#[path = "tests/kernel.rs"]
mod tests;
