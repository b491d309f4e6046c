//! The policy file: TOML, typed with serde, validated into a [`Policy`].
//!
//! Every error names the file, the line and column, and the field, so that
//! `cordon policy check` and a failed SIGHUP reload point at the mistake.
//! Validation never touches the running state: a bad file leaves the previous
//! policy in force.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::protocol::Protocol;

/// A policy error located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, e.g. `intercept[1].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "`{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// All the errors found in one file (validation does not stop at the first).
#[derive(Debug, Clone)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

// ---------------------------------------------------------------------------
// Raw, as written in the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    agent: Option<Spanned<RawAgent>>,
    #[serde(default)]
    intercept: Vec<Spanned<RawIntercept>>,
    #[serde(default)]
    profiles: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    tag: Vec<Spanned<RawTag>>,
    labels: Option<Spanned<RawLabels>>,
    #[serde(default)]
    classify: Vec<Spanned<RawClassify>>,
    detectors: Option<Spanned<RawDetectors>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabels {
    order: Spanned<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassify {
    column: Option<Spanned<String>>,
    table: Option<Spanned<String>>,
    label: Spanned<String>,
    mask: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
struct RawDetectors {
    enabled: Option<bool>,
    /// detector name → label (flattened: spans are not available per entry,
    /// errors point at the [detectors] table).
    #[serde(flatten)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    listen: Option<Spanned<String>>,
    listen6: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    audit_dir: Option<Spanned<String>>,
    audit_segment_max_bytes: Option<Spanned<i64>>,
    audit_retention_days: Option<Spanned<i64>>,
    audit_durability: Option<Spanned<String>>,
    audit_sync_interval_ms: Option<Spanned<i64>>,
    audit_space_left: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    bpffs_dir: Option<Spanned<String>>,
    socket_mark: Option<Spanned<i64>>,
    agent_cgroup: Option<Spanned<String>>,
    idle_timeout_secs: Option<Spanned<i64>>,
    handshake_timeout_secs: Option<Spanned<i64>>,
    connect_timeout_secs: Option<Spanned<i64>>,
    rescan_interval_ms: Option<Spanned<i64>>,
    secrets_file: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    max_message_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntercept {
    name: Spanned<String>,
    protocol: Spanned<String>,
    port: Spanned<i64>,
    #[serde(default)]
    destinations: Vec<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    auth: Option<Spanned<String>>,
    credentials: Option<Spanned<String>>,
    upstream_tls: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<String>>,
    upstream_server_name: Option<Spanned<String>>,
    /// SSH: the pinned host keys of the servers behind this intercept.
    known_hosts: Option<Spanned<String>>,
    /// SSH: the user the workload typed → `[credentials.NAME]`.
    #[serde(default)]
    users: BTreeMap<String, Spanned<String>>,
    /// PostgreSQL: repeated statements run as prepared statements upstream.
    prepare_statements: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    #[serde(default)]
    description: Option<String>,
    record_results: Option<bool>,
    record_params: Option<Spanned<String>>,
    record_text: Option<Spanned<String>>,
    params_max_bytes: Option<Spanned<i64>>,
    /// Concurrent connections per tagged cgroup.
    max_connections: Option<Spanned<i64>>,
    /// label name → allow | mask | deny
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    /// label name → equality | none
    #[serde(default)]
    lookups: BTreeMap<String, Spanned<String>>,
    guardrails: Option<Spanned<RawGuardrails>>,
    approvals: Option<Spanned<approvals::RawApprovals>>,
    ssh: Option<Spanned<ssh::RawSsh>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGuardrails {
    ddl: Option<Spanned<String>>,
    unbounded_write: Option<Spanned<String>>,
    copy_out: Option<Spanned<String>>,
    copy_out_min_label: Option<Spanned<String>>,
    restricted_read: Option<Spanned<String>>,
    restricted_read_min_label: Option<Spanned<String>>,
    labeled_write: Option<Spanned<String>>,
    labeled_write_min_label: Option<Spanned<String>>,
    dangerous_functions: Option<Spanned<String>>,
    functions: Option<Vec<String>>,
    do_block: Option<Spanned<String>>,
    user_functions: Option<Spanned<String>>,
    allowed_functions: Option<Vec<String>>,
    sensitive_literals: Option<Spanned<String>>,
    sensitive_literals_min_label: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    profile: Spanned<String>,
}

// ---------------------------------------------------------------------------
// Validated.

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Where it was read from, for messages.
    pub source: PathBuf,
    pub agent: AgentSettings,
    pub intercepts: Vec<Intercept>,
    /// Profile names; a profile's id is its index here.
    pub profiles: Vec<Profile>,
    pub tags: Vec<TagRule>,
    /// Labels, the policy catalog and the detectors' labels.
    pub classifier: std::sync::Arc<crate::pipeline::classify::Classifier>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub listen: SocketAddr,
    pub listen6: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// Hash-chained audit segments (see audit.rs).
    pub audit_dir: PathBuf,
    pub audit: crate::audit::Settings,
    pub control_socket: PathBuf,
    /// Parent of the versioned pin directory.
    pub bpffs_dir: PathBuf,
    pub socket_mark: u32,
    /// cgroup (relative to the cgroup2 root) the agent moves itself into;
    /// None = stay where started (systemd already gives it its own).
    pub agent_cgroup: Option<String>,
    pub idle_timeout: Duration,
    /// A client must finish its protocol's startup (TLS, startup packet)
    /// within this.
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub rescan_interval: Duration,
    /// Root-only file with upstream credentials (see secrets.rs).
    pub secrets_file: PathBuf,
    /// Client-facing TLS; None = generated into `<state_dir>/tls/`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest protocol message accepted from either side.
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Intercept {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Empty = any destination on that port.
    pub destinations: Vec<Cidr>,
    /// Fixed upstream; None = the original destination.
    pub upstream: Option<SocketAddr>,
    /// How cordon logs in upstream; set for protocols that terminate the
    /// connection (`Spec::logs_in`), None for byte relays.
    pub login: Option<Login>,
    /// SSH: a known_hosts file (plain keys and `@cert-authority` lines)
    /// pinning the upstream servers' host keys; anything else fails closed.
    pub known_hosts: Option<PathBuf>,
    /// SSH: which credential each typed user gets (`*` for any other); empty:
    /// every user gets `credentials`.
    pub users: BTreeMap<String, String>,
    /// PostgreSQL: a simple query seen again runs as a prepared statement
    /// upstream (see `postgres::prepare`). Off behind a pooler that does not
    /// keep prepared statements (pgbouncer before 1.21 in transaction mode).
    pub prepare_statements: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub auth: AuthMode,
    pub tls: UpstreamTls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// cordon authenticates upstream with these credentials (secrets file).
    Inject { credentials: String },
    /// The client's own authentication is relayed.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    Disable,
    /// Chain verified against `ca_file` (pinned) or the system roots, and
    /// the name against `server_name` (default: the upstream IP).
    VerifyFull {
        ca_file: Option<PathBuf>,
        server_name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// The prefix in IPv6 form: IPv4 as IPv4-mapped with the length + 96,
    /// which is how the kernel side compares addresses.
    pub fn to_v6_form(self) -> ([u8; 16], u8) {
        match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), self.prefix_len.saturating_add(96)),
            IpAddr::V6(a) => (a.octets(), self.prefix_len),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub record: crate::pipeline::RecordPolicy,
    /// What happens to values of each label (index = label rank).
    pub actions: Vec<crate::pipeline::classify::Action>,
    /// Whether equality lookups may compare the stored value of a masked
    /// column, per label rank.
    pub lookups: Vec<bool>,
    pub guardrails: crate::pipeline::guard::Guardrails,
    /// Concurrent connections one tagged cgroup may hold through cordon
    /// (None: no cap). A runaway job cannot exhaust the agent for others.
    pub max_connections: Option<u32>,
    /// Who releases statements a rule or label sends for approval.
    pub approvals: Option<crate::approvals::Settings>,
    /// What SSH sessions may do (exec, shell, transfers, forwarding).
    pub ssh: crate::ssh::policy::SshPolicy,
}

impl Profile {
    pub fn lookups(&self, rank: usize) -> bool {
        self.lookups.get(rank).copied().unwrap_or(false)
    }

    /// Whether any label is masked or denied.
    pub fn protects_anything(&self) -> bool {
        self.actions.iter().any(|a| *a != crate::pipeline::classify::Action::Allow)
    }

    /// Whether some label's values are released by approval.
    pub fn approves_labels(&self) -> bool {
        self.actions.contains(&crate::pipeline::classify::Action::Approve)
    }

    /// This profile as it applies to a statement whose approval is asked
    /// for: labels sent for approval read in clear (the statement is held
    /// until people approve exactly it). Its own name keeps its rewrites
    /// apart in the caches.
    pub fn approved(&self) -> Profile {
        use crate::pipeline::classify::Action;
        let mut p = self.clone();
        p.name = format!("{}\u{0}approved", self.name);
        for a in &mut p.actions {
            if *a == Action::Approve {
                *a = Action::Allow;
            }
        }
        p
    }

    pub fn action(&self, rank: usize) -> crate::pipeline::classify::Action {
        // Past the end cannot happen for a validated policy; fail closed.
        self.actions.get(rank).copied().unwrap_or(crate::pipeline::classify::Action::Deny)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagTarget {
    /// Glob over cgroup paths relative to the cgroup2 root (`ci/*`, `**/x.scope`).
    CgroupGlob(String),
    /// A systemd unit name, found anywhere in the tree.
    Unit(String),
}

impl fmt::Display for TagTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CgroupGlob(g) => write!(f, "cgroup {g}"),
            Self::Unit(u) => write!(f, "unit {u}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    pub target: TagTarget,
    pub profile: String,
}

impl Policy {
    pub fn profile_id(&self, name: &str) -> Option<u32> {
        self.profiles.iter().position(|p| p.name == name).and_then(|i| u32::try_from(i).ok())
    }

    pub fn profile_name(&self, id: u32) -> Option<&str> {
        self.profiles.get(id as usize).map(|p| p.name.as_str())
    }

    /// Kernel rule count: one per (intercept, destination) pair.
    pub fn kernel_rule_count(&self) -> usize {
        self.intercepts.iter().map(|i| i.destinations.len().max(1)).sum()
    }
}

pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read the policy file: {e}"),
        }])
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyErrors> {
    let mut v = Validator { file: path.to_owned(), text, errors: Vec::new() };
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            v.error(span, "", e.message().trim().to_string());
            return Err(PolicyErrors(v.errors));
        }
    };
    let policy = v.policy(raw);
    if v.errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors(v.errors))
    }
}

mod agent;
mod approvals;
mod intercepts;
mod ssh;
pub use approvals::parse_duration;
mod profiles;

pub const MAX_KERNEL_RULES: usize = agent_common::MAX_RULES as usize;

struct Validator<'a> {
    file: PathBuf,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(PolicyError {
            file: self.file.clone(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn policy(&mut self, raw: RawPolicy) -> Policy {
        let agent = self.agent(raw.agent);
        let mut intercepts = Vec::new();
        for (i, ic) in raw.intercept.into_iter().enumerate() {
            if let Some(ic) = self.intercept(i, ic, &intercepts) {
                intercepts.push(ic);
            }
        }
        let classifier = self.classifier(raw.labels, raw.classify, raw.detectors);
        let mut profiles = Vec::new();
        for (name, p) in raw.profiles {
            if !valid_name(&name) {
                self.error(p.span(), &format!("profiles.{name}"), "a profile name uses letters, digits, '-' and '_'");
            }
            let whole = p.span();
            let p = p.into_inner();
            let mut record =
                crate::pipeline::RecordPolicy { results: p.record_results.unwrap_or(false), ..Default::default() };
            if let Some(m) = &p.record_params {
                match m.get_ref().parse() {
                    Ok(mode) => record.params.mode = mode,
                    Err(e) => self.error(m.span(), &format!("profiles.{name}.record_params"), e),
                }
            }
            if let Some(m) = &p.record_text {
                match m.get_ref().parse() {
                    Ok(mode) => record.text = mode,
                    Err(e) => self.error(m.span(), &format!("profiles.{name}.record_text"), e),
                }
            }
            if let Some(n) = &p.params_max_bytes {
                match usize::try_from(*n.get_ref()) {
                    Ok(v) if (1..=4096).contains(&v) => record.params.max_bytes = v,
                    _ => self.error(n.span(), &format!("profiles.{name}.params_max_bytes"), "between 1 and 4096"),
                }
            }
            let max_connections = p.max_connections.as_ref().and_then(|n| match u32::try_from(*n.get_ref()) {
                Ok(v) if (1..=1_000_000).contains(&v) => Some(v),
                _ => {
                    self.error(n.span(), &format!("profiles.{name}.max_connections"), "between 1 and 1000000");
                    None
                }
            });
            let actions = self.actions(&name, &p.labels, &classifier.labels);
            let lookups = self.lookups(&name, &p.lookups, &classifier.labels);
            let guardrails = self.guardrails(&name, p.guardrails, &classifier.labels);
            let profile_span = p.approvals.as_ref().map(Spanned::span);
            let approvals = self.approvals(&name, p.approvals);
            let mut approving: Vec<String> =
                guardrails.approving().into_iter().map(|r| format!("guardrails.{r}")).collect();
            approving.extend(
                actions
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| **a == crate::pipeline::classify::Action::Approve)
                    .map(|(rank, _)| format!("labels.{}", classifier.labels.name(rank))),
            );
            let ssh = self.ssh(&name, p.ssh);
            if ssh.approves() {
                approving.push("ssh.approve".into());
            }
            if approvals.is_none() && !approving.is_empty() {
                self.error(
                    profile_span.unwrap_or(whole),
                    &format!("profiles.{name}.approvals"),
                    format!(
                        "{} = \"approve\" needs [profiles.{name}.approvals] with approvers (Unix users or %groups) to release held statements",
                        approving.join(", ")
                    ),
                );
            }
            profiles.push(Profile {
                name,
                description: p.description.unwrap_or_default(),
                record,
                actions,
                lookups,
                guardrails,
                max_connections,
                approvals,
                ssh,
            });
        }
        let mut tags = Vec::new();
        for (i, t) in raw.tag.into_iter().enumerate() {
            if let Some(t) = self.tag(i, t, &profiles) {
                tags.push(t);
            }
        }
        let policy = Policy {
            source: self.file.clone(),
            agent,
            intercepts,
            profiles,
            tags,
            classifier: std::sync::Arc::new(classifier),
        };
        if policy.kernel_rule_count() > MAX_KERNEL_RULES {
            self.error(
                0..0,
                "intercept",
                format!(
                    "{} (intercept, destination) pairs; the kernel side holds at most {MAX_KERNEL_RULES}",
                    policy.kernel_rule_count()
                ),
            );
        }
        policy
    }
}

impl AgentSettings {
    /// What an empty `[agent]` table means.
    pub fn defaults() -> Self {
        let mut v = Validator { file: PathBuf::new(), text: "", errors: Vec::new() };
        v.agent(None)
    }
}

pub const UNIT_SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];
pub const DEFAULT_MARK: u32 = 0x0c0d_0a01;
/// 64 MiB: above any realistic query or row, far below PostgreSQL's 1 GiB.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

fn default_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7431)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|e| format!("{s:?} is not an IP address or CIDR ({e})"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        None => max,
    };
    Ok(Cidr { addr, prefix_len })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
#[path = "../tests/config.rs"]
mod tests;
