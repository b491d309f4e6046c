//! Which cgroups are tagged, with which profile.
//!
//! Tags come from the policy (cgroup path globs, systemd unit names) and from
//! `cordon tag` at runtime (kept in the state directory so they outlive the
//! agent). They are resolved against the live cgroup tree into the kernel's
//! tag map (cgroup id → profile); a tag covers the cgroup and everything below
//! it, which the kernel checks by walking ancestors.
//!
//! New cgroups that match a glob are tagged by the watcher (inotify on the
//! tree, plus a periodic rescan as a backstop). Between a cgroup's creation
//! and that rescan there is a short window: tag a parent cgroup, not a glob of
//! children, when a workload must be covered from its first instruction.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup,
    config::{Policy, TagTarget, UNIT_SUFFIXES},
    kernel::Kernel,
};

/// A runtime tag as given to `cordon tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct RuntimeTag {
    pub target: String,
    pub profile: String,
}

/// Interpret a `cordon tag` target: a bare unit name, or a cgroup path.
pub fn parse_target(root: &Path, given: &str) -> TagTarget {
    if !given.contains('/') && UNIT_SUFFIXES.iter().any(|s| given.ends_with(s)) {
        TagTarget::Unit(given.to_string())
    } else {
        TagTarget::CgroupGlob(glob_escape(&cgroup::normalise(root, given)))
    }
}

/// A literal path used as a glob must not have its metacharacters interpreted.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}') {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out
}

/// One resolved tag, as shown by `cordon tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub profile: String,
    /// "policy: cgroup ci/*", "runtime: unit x.service"…
    pub source: String,
}

struct Matcher {
    target: TargetMatcher,
    profile: String,
    profile_id: u32,
    source: String,
}

enum TargetMatcher {
    Glob(GlobMatcher),
    Unit(String),
}

impl TargetMatcher {
    fn new(t: &TagTarget) -> Result<Self> {
        Ok(match t {
            TagTarget::CgroupGlob(g) => Self::Glob(
                GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .with_context(|| format!("bad cgroup glob {g:?}"))?
                    .compile_matcher(),
            ),
            TagTarget::Unit(u) => Self::Unit(u.clone()),
        })
    }

    fn matches(&self, rel: &str) -> bool {
        match self {
            Self::Glob(g) => !rel.is_empty() && g.is_match(rel),
            Self::Unit(u) => rel.rsplit('/').next() == Some(u.as_str()),
        }
    }
}

pub struct Tagger {
    root: PathBuf,
    state_file: PathBuf,
    runtime: Vec<RuntimeTag>,
    /// What the last reconcile wrote.
    resolved: Vec<Resolved>,
}

impl Tagger {
    pub fn new(root: &Path, state_dir: &Path) -> Result<Self> {
        let state_file = state_dir.join("runtime-tags.json");
        let runtime = match std::fs::read(&state_file) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a runtime tag list", state_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
        };
        Ok(Self { root: root.to_owned(), state_file, runtime, resolved: Vec::new() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn resolved(&self) -> &[Resolved] {
        &self.resolved
    }

    pub fn runtime(&self) -> &[RuntimeTag] {
        &self.runtime
    }

    fn save(&self) -> Result<()> {
        let tmp = self.state_file.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&self.runtime)?;
        std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.state_file).with_context(|| format!("replacing {}", self.state_file.display()))
    }

    /// Add a runtime tag. The target must exist now and the profile must be
    /// in the policy.
    pub fn add(&mut self, policy: &Policy, kernel: &mut Kernel, target: &str, profile: &str) -> Result<Vec<Resolved>> {
        if policy.profile_id(profile).is_none() {
            let known: Vec<&str> = policy.profiles.iter().map(|p| p.name.as_str()).collect();
            bail!("unknown profile {profile:?}; the policy defines [{}]", known.join(", "));
        }
        let parsed = parse_target(&self.root, target);
        let m = TargetMatcher::new(&parsed)?;
        let matched: Vec<(String, u64)> =
            cgroup::walk(&self.root)?.into_iter().filter(|(rel, _)| m.matches(rel)).collect();
        if matched.is_empty() {
            bail!("no cgroup matches {target:?} under {}", self.root.display());
        }
        let canonical = match &parsed {
            TagTarget::Unit(u) => u.clone(),
            TagTarget::CgroupGlob(_) => cgroup::normalise(&self.root, target),
        };
        if canonical.is_empty() {
            bail!("refusing to tag the cgroup root: that would govern every process, the agent's own included");
        }
        self.runtime.retain(|t| t.target != canonical);
        self.runtime.push(RuntimeTag { target: canonical, profile: profile.to_string() });
        self.save()?;
        self.reconcile(policy, kernel)?;
        Ok(self.resolved.iter().filter(|r| matched.iter().any(|(_, id)| *id == r.cgroup_id)).cloned().collect())
    }

    /// Remove a runtime tag. Policy tags are changed in the policy file.
    pub fn remove(&mut self, policy: &Policy, kernel: &mut Kernel, target: &str) -> Result<()> {
        let canonical = match parse_target(&self.root, target) {
            TagTarget::Unit(u) => u,
            TagTarget::CgroupGlob(_) => cgroup::normalise(&self.root, target),
        };
        let before = self.runtime.len();
        self.runtime.retain(|t| t.target != canonical);
        if self.runtime.len() == before {
            let from_policy = self.resolved.iter().any(|r| r.cgroup == canonical && r.source.starts_with("policy"));
            if from_policy {
                bail!(
                    "{target:?} is tagged by the policy file {}; change it there and reload",
                    policy.source.display()
                );
            }
            bail!("{target:?} has no runtime tag (see `cordon tags`)");
        }
        self.save()?;
        self.reconcile(policy, kernel)
    }

    /// Make the kernel's tag map equal to what the policy and runtime tags
    /// resolve to now. Runtime tags win over policy tags for the same cgroup.
    pub fn reconcile(&mut self, policy: &Policy, kernel: &mut Kernel) -> Result<()> {
        let mut matchers = Vec::new();
        for t in &policy.tags {
            let Some(profile_id) = policy.profile_id(&t.profile) else { continue };
            matchers.push(Matcher {
                target: TargetMatcher::new(&t.target)?,
                profile: t.profile.clone(),
                profile_id,
                source: format!("policy: {}", t.target),
            });
        }
        for t in &self.runtime {
            // A runtime tag whose profile left the policy stops applying,
            // loudly; the tag is kept in case the profile comes back.
            let Some(profile_id) = policy.profile_id(&t.profile) else {
                tracing::warn!(target = %t.target, profile = %t.profile, "runtime tag names a profile the policy no longer has; not applied");
                continue;
            };
            let target = parse_target(&self.root, &t.target);
            matchers.push(Matcher {
                target: TargetMatcher::new(&target)?,
                profile: t.profile.clone(),
                profile_id,
                source: format!("runtime: {target}"),
            });
        }

        let mut want: BTreeMap<u64, Resolved> = BTreeMap::new();
        let mut ids: BTreeMap<u64, u32> = BTreeMap::new();
        for (rel, id) in cgroup::walk(&self.root)? {
            // Later matchers (runtime) override earlier ones (policy).
            if let Some(m) = matchers.iter().rev().find(|m| m.target.matches(&rel)) {
                ids.insert(id, m.profile_id);
                want.insert(
                    id,
                    Resolved { cgroup: rel, cgroup_id: id, profile: m.profile.clone(), source: m.source.clone() },
                );
            }
        }
        let have = kernel.tags();
        for (id, _) in &have {
            if !ids.contains_key(id) {
                kernel.remove_tag(*id)?;
            }
        }
        for (id, profile_id) in &ids {
            if !have.iter().any(|(h, v)| h == id && v.profile_id == *profile_id) {
                kernel.set_tag(*id, *profile_id)?;
            }
        }
        let resolved: Vec<Resolved> = want.into_values().collect();
        if resolved != self.resolved {
            for r in resolved.iter().filter(|r| !self.resolved.contains(r)) {
                tracing::info!(cgroup = %r.cgroup, profile = %r.profile, source = %r.source, "tagged");
            }
            for r in self.resolved.iter().filter(|r| !resolved.contains(r)) {
                tracing::info!(cgroup = %r.cgroup, profile = %r.profile, "untagged");
            }
        }
        self.resolved = resolved;
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/tagging.rs"]
mod tests;
