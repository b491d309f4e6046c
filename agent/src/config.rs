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
}

impl Profile {
    pub fn lookups(&self, rank: usize) -> bool {
        self.lookups.get(rank).copied().unwrap_or(false)
    }

    /// Whether any label is masked or denied.
    pub fn protects_anything(&self) -> bool {
        self.actions.iter().any(|a| *a != crate::pipeline::classify::Action::Allow)
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
            profiles.push(Profile {
                name,
                description: p.description.unwrap_or_default(),
                record,
                actions,
                lookups,
                guardrails,
                max_connections,
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

    fn classifier(
        &mut self,
        labels: Option<Spanned<RawLabels>>,
        rules: Vec<Spanned<RawClassify>>,
        detectors: Option<Spanned<RawDetectors>>,
    ) -> crate::pipeline::classify::Classifier {
        use crate::pipeline::{
            classify::{Classifier, Labels, Rule, Strategy},
            detect::Kind,
        };
        let mut c = Classifier::default();
        if let Some(l) = labels {
            let l = l.into_inner();
            let names = l.order.get_ref().clone();
            let mut seen = std::collections::BTreeSet::new();
            if names.len() < 2 || names.iter().any(|n| !valid_name(n) || !seen.insert(n.to_ascii_lowercase())) {
                self.error(
                    l.order.span(),
                    "labels.order",
                    "at least two distinct names (letters, digits, '-', '_'), lowest first",
                );
            } else {
                c.labels = Labels::new(names);
                c.detector_labels = Kind::ALL.iter().map(|k| (*k, c.labels.scaled(k.default_rank()))).collect();
            }
        }
        for (i, r) in rules.into_iter().enumerate() {
            let span = r.span();
            let r = r.into_inner();
            let field = |f: &str| format!("classify[{i}].{f}");
            let (pattern, pspan, parts) = match (&r.column, &r.table) {
                (Some(c), None) => (c.get_ref().clone(), c.span(), 4),
                (None, Some(t)) => (t.get_ref().clone(), t.span(), 3),
                _ => {
                    self.error(
                        span,
                        &format!("classify[{i}]"),
                        "give exactly one of `column` (db.schema.table.column) or `table` (db.schema.table)",
                    );
                    continue;
                }
            };
            if pattern.split('.').count() != parts {
                let what =
                    if parts == 4 { "column = \"db.schema.table.column\"" } else { "table = \"db.schema.table\"" };
                self.error(
                    pspan,
                    &field(if parts == 4 { "column" } else { "table" }),
                    format!("use {what} (globs allowed, e.g. \"*.public.customers.ssn\")"),
                );
                continue;
            }
            let strategy = match &r.mask {
                Some(m) => match m.get_ref().parse::<Strategy>() {
                    Ok(s) => Some(s),
                    Err(e) => {
                        self.error(m.span(), &field("mask"), e);
                        None
                    }
                },
                None => Some(Strategy::Redact),
            };
            let label = c.labels.rank(r.label.get_ref());
            if label.is_none() {
                let known: Vec<&str> = (0..c.labels.len()).map(|k| c.labels.name(k)).collect();
                self.error(
                    r.label.span(),
                    &field("label"),
                    format!("unknown label {:?}; labels are [{}]", r.label.get_ref(), known.join(", ")),
                );
            }
            let (Some(label), Some(strategy)) = (label, strategy) else { continue };
            match Rule::new(&pattern, label, strategy) {
                Ok(rule) => c.rules.push(rule),
                Err(e) => self.error(pspan, &field("column"), e),
            }
        }
        if let Some(d) = detectors {
            let span = d.span();
            let d = d.into_inner();
            c.detectors = d.enabled.unwrap_or(true);
            for (k, v) in d.labels {
                let Some(kind) = Kind::from_name(&k) else {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                    self.error(
                        span.clone(),
                        &format!("detectors.{k}"),
                        format!("unknown detector; known: [{}]", known.join(", ")),
                    );
                    continue;
                };
                match c.labels.rank(&v) {
                    Some(r) => {
                        c.detector_labels.insert(kind, r);
                    }
                    None => self.error(span.clone(), &format!("detectors.{k}"), format!("unknown label {v:?}")),
                }
            }
        }
        c
    }

    fn actions(
        &mut self,
        profile: &str,
        raw: &BTreeMap<String, Spanned<String>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> Vec<crate::pipeline::classify::Action> {
        use crate::pipeline::classify::Action;
        // Default: the lowest label is allowed, every other one masked.
        let mut out: Vec<Action> =
            (0..labels.len()).map(|r| if r == 0 { Action::Allow } else { Action::Mask }).collect();
        for (name, v) in raw {
            let field = format!("profiles.{profile}.labels.{name}");
            let Some(rank) = labels.rank(name) else {
                self.error(v.span(), &field, format!("unknown label {name:?}"));
                continue;
            };
            match v.get_ref().parse::<Action>() {
                Ok(a) => {
                    if let Some(slot) = out.get_mut(rank) {
                        *slot = a;
                    }
                }
                Err(e) => self.error(v.span(), &field, e),
            }
        }
        out
    }

    fn lookups(
        &mut self,
        profile: &str,
        raw: &BTreeMap<String, Spanned<String>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> Vec<bool> {
        let mut out = vec![true; labels.len()];
        for (name, v) in raw {
            let field = format!("profiles.{profile}.lookups.{name}");
            let Some(rank) = labels.rank(name) else {
                self.error(v.span(), &field, format!("unknown label {name:?}"));
                continue;
            };
            let on = match v.get_ref().as_str() {
                "equality" => true,
                "none" => false,
                other => {
                    self.error(
                        v.span(),
                        &field,
                        format!("unknown lookup mode {other:?}; use \"equality\" or \"none\""),
                    );
                    continue;
                }
            };
            if let Some(slot) = out.get_mut(rank) {
                *slot = on;
            }
        }
        out
    }

    fn guardrails(
        &mut self,
        profile: &str,
        raw: Option<Spanned<RawGuardrails>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> crate::pipeline::guard::Guardrails {
        use crate::pipeline::guard::{Guardrails, Outcome};
        let mut g = Guardrails::defaults(labels.highest());
        let Some(raw) = raw else { return g };
        let raw = raw.into_inner();
        let mut outcome = |v: &Option<Spanned<String>>, name: &str, slot: &mut Outcome| {
            if let Some(v) = v {
                match v.get_ref().parse() {
                    Ok(o) => *slot = o,
                    Err(e) => self.error(v.span(), &format!("profiles.{profile}.guardrails.{name}"), e),
                }
            }
        };
        outcome(&raw.ddl, "ddl", &mut g.ddl);
        outcome(&raw.unbounded_write, "unbounded_write", &mut g.unbounded_write);
        outcome(&raw.copy_out, "copy_out", &mut g.copy_out);
        outcome(&raw.restricted_read, "restricted_read", &mut g.restricted_read);
        outcome(&raw.labeled_write, "labeled_write", &mut g.labeled_write);
        outcome(&raw.dangerous_functions, "dangerous_functions", &mut g.dangerous_functions);
        outcome(&raw.do_block, "do_block", &mut g.do_block);
        outcome(&raw.user_functions, "user_functions", &mut g.user_functions);
        outcome(&raw.sensitive_literals, "sensitive_literals", &mut g.sensitive_literals);
        for (v, name, slot) in [
            (&raw.copy_out_min_label, "copy_out_min_label", &mut g.copy_out_min_label),
            (&raw.restricted_read_min_label, "restricted_read_min_label", &mut g.restricted_read_min_label),
            (&raw.labeled_write_min_label, "labeled_write_min_label", &mut g.labeled_write_min_label),
            (&raw.sensitive_literals_min_label, "sensitive_literals_min_label", &mut g.sensitive_literals_min_label),
        ] {
            if let Some(v) = v {
                match labels.rank(v.get_ref()) {
                    Some(r) => *slot = r,
                    None => self.error(
                        v.span(),
                        &format!("profiles.{profile}.guardrails.{name}"),
                        format!("unknown label {:?}", v.get_ref()),
                    ),
                }
            }
        }
        if let Some(f) = raw.functions {
            g.functions = f.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        if let Some(f) = raw.allowed_functions {
            g.allowed_functions = f.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        g
    }

    fn agent(&mut self, raw: Option<Spanned<RawAgent>>) -> AgentSettings {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let state_dir = raw
            .state_dir
            .as_ref()
            .map(|s| PathBuf::from(s.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/var/lib/cordon"));
        let path = |v: &Option<Spanned<String>>, default: PathBuf| {
            v.as_ref().map(|s| PathBuf::from(s.get_ref())).unwrap_or(default)
        };
        let listen = match &raw.listen {
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv4() && a.ip().is_loopback() => a,
                Ok(_) => {
                    self.error(
                        s.span(),
                        "agent.listen",
                        "the proxy listens on an IPv4 loopback address, e.g. \"127.0.0.1:7431\"",
                    );
                    default_listen()
                }
                Err(e) => {
                    self.error(s.span(), "agent.listen", format!("not an address:port: {e}"));
                    default_listen()
                }
            },
            None => default_listen(),
        };
        let listen6 = match &raw.listen6 {
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv6() && a.ip().is_loopback() => Some(a),
                Ok(_) => {
                    self.error(s.span(), "agent.listen6", "the IPv6 listener is on ::1, e.g. \"[::1]:7431\"");
                    None
                }
                Err(e) => {
                    self.error(s.span(), "agent.listen6", format!("not an address:port: {e}"));
                    None
                }
            },
            None => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())),
        };
        if let Some(l6) = listen6 {
            if l6.port() != listen.port() {
                let span = raw.listen6.as_ref().map(Spanned::span).unwrap_or(0..0);
                self.error(
                    span,
                    "agent.listen6",
                    "must use the same port as agent.listen (the kernel rewrites to one port)",
                );
            }
        }
        let socket_mark = match &raw.socket_mark {
            Some(m) => match u32::try_from(*m.get_ref()) {
                Ok(0) | Err(_) => {
                    self.error(m.span(), "agent.socket_mark", "a non-zero 32-bit value");
                    DEFAULT_MARK
                }
                Ok(v) => v,
            },
            None => DEFAULT_MARK,
        };
        let agent_cgroup = match &raw.agent_cgroup {
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => {
                let v = s.get_ref().trim_matches('/').to_string();
                if v.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
                    self.error(s.span(), "agent.agent_cgroup", "a relative cgroup path without '.' or '..' components");
                }
                Some(v)
            }
            // Under systemd (INVOCATION_ID is set for services) the unit's
            // own cgroup in cordon.slice is already the agent's; leaving it
            // would hide the process from systemd. Elsewhere, make one.
            None if std::env::var_os("INVOCATION_ID").is_some() => None,
            None => Some("cordon.agent".to_string()),
        };
        let idle_timeout = self.seconds(&raw.idle_timeout_secs, "agent.idle_timeout_secs", 900);
        let handshake_timeout = self.seconds(&raw.handshake_timeout_secs, "agent.handshake_timeout_secs", 30);
        let connect_timeout = self.seconds(&raw.connect_timeout_secs, "agent.connect_timeout_secs", 10);
        let rescan_interval = match &raw.rescan_interval_ms {
            Some(v) if (50..=600_000).contains(v.get_ref()) => Duration::from_millis(*v.get_ref() as u64),
            Some(v) => {
                self.error(v.span(), "agent.rescan_interval_ms", "between 50 and 600000");
                Duration::from_secs(1)
            }
            None => Duration::from_secs(1),
        };
        let mut audit = crate::audit::Settings::default();
        if let Some(v) = &raw.audit_segment_max_bytes {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if n >= 256 => audit.segment_max_bytes = n,
                _ => self.error(v.span(), "agent.audit_segment_max_bytes", "at least 256 bytes"),
            }
        }
        if let Some(v) = &raw.audit_retention_days {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if n >= 1 => audit.retention = Some(Duration::from_secs(n * 86_400)),
                _ => self.error(v.span(), "agent.audit_retention_days", "a whole number of days, at least 1"),
            }
        }
        if let Some(v) = &raw.audit_durability {
            match v.get_ref().as_str() {
                "interval" => audit.durability = crate::audit::Durability::Interval,
                "statement" => audit.durability = crate::audit::Durability::Statement,
                other => self.error(
                    v.span(),
                    "agent.audit_durability",
                    format!("unknown mode {other:?}; use \"interval\" (group commit every audit_sync_interval_ms) or \"statement\" (each result waits for its record's fsync)"),
                ),
            }
        }
        if let Some(v) = &raw.audit_sync_interval_ms {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if (1..=1000).contains(&n) => audit.sync_interval = Duration::from_millis(n),
                _ => self.error(v.span(), "agent.audit_sync_interval_ms", "between 1 and 1000 milliseconds"),
            }
        }
        if let Some(v) = &raw.audit_space_left {
            match v.get_ref().as_str() {
                "off" => audit.space_left = None,
                s => match crate::audit::SpaceLeft::parse(s) {
                    Ok(w) => audit.space_left = Some(w),
                    Err(msg) => self.error(v.span(), "agent.audit_space_left", format!("{msg}, or \"off\"")),
                },
            }
        }
        let max_message_bytes = match &raw.max_message_bytes {
            Some(v) => match usize::try_from(*v.get_ref()) {
                Ok(n) if (64 * 1024..=1 << 30).contains(&n) => n,
                _ => {
                    self.error(v.span(), "agent.max_message_bytes", "between 65536 and 1073741824");
                    DEFAULT_MAX_MESSAGE
                }
            },
            None => DEFAULT_MAX_MESSAGE,
        };
        if raw.tls_cert.is_some() != raw.tls_key.is_some() {
            let span = raw.tls_cert.as_ref().or(raw.tls_key.as_ref()).map_or(0..0, Spanned::span);
            self.error(span, "agent.tls_cert", "tls_cert and tls_key go together");
        }
        AgentSettings {
            secrets_file: path(&raw.secrets_file, PathBuf::from("/etc/cordon/secrets.toml")),
            tls_cert: raw.tls_cert.as_ref().map(|s| PathBuf::from(s.get_ref())),
            tls_key: raw.tls_key.as_ref().map(|s| PathBuf::from(s.get_ref())),
            max_message_bytes,
            listen,
            listen6,
            audit_dir: path(&raw.audit_dir, state_dir.join("audit")),
            audit,
            control_socket: path(&raw.control_socket, PathBuf::from("/run/cordon/control.sock")),
            bpffs_dir: path(&raw.bpffs_dir, PathBuf::from("/sys/fs/bpf/cordon")),
            state_dir,
            socket_mark,
            agent_cgroup,
            idle_timeout,
            handshake_timeout,
            connect_timeout,
            rescan_interval,
        }
    }

    fn seconds(&mut self, v: &Option<Spanned<i64>>, field: &str, default: u64) -> Duration {
        match v {
            Some(s) if (1..=86_400 * 7).contains(s.get_ref()) => Duration::from_secs(*s.get_ref() as u64),
            Some(s) => {
                self.error(s.span(), field, "between 1 and 604800 seconds");
                Duration::from_secs(default)
            }
            None => Duration::from_secs(default),
        }
    }

    fn intercept(&mut self, i: usize, raw: Spanned<RawIntercept>, seen: &[Intercept]) -> Option<Intercept> {
        let raw = raw.into_inner();
        let field = |f: &str| format!("intercept[{i}].{f}");
        let mut ok = true;
        let name = raw.name.get_ref().clone();
        if !valid_name(&name) {
            self.error(raw.name.span(), &field("name"), "letters, digits, '-' and '_'");
            ok = false;
        } else if seen.iter().any(|s| s.name == name) {
            self.error(raw.name.span(), &field("name"), format!("duplicate intercept name {name:?}"));
            ok = false;
        }
        let protocol = match raw.protocol.get_ref().parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(msg) => {
                self.error(raw.protocol.span(), &field("protocol"), msg);
                ok = false;
                None
            }
        };
        let port = match u16::try_from(*raw.port.get_ref()) {
            Ok(p) if p != 0 => p,
            _ => {
                self.error(raw.port.span(), &field("port"), "a TCP port from 1 to 65535");
                ok = false;
                0
            }
        };
        let mut destinations = Vec::new();
        for (j, d) in raw.destinations.iter().enumerate() {
            match parse_cidr(d.get_ref()) {
                Ok(c) => destinations.push(c),
                Err(msg) => {
                    self.error(d.span(), &format!("intercept[{i}].destinations[{j}]"), msg);
                    ok = false;
                }
            }
        }
        let upstream = match &raw.upstream {
            Some(u) => match u.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    self.error(
                        u.span(),
                        &field("upstream"),
                        format!("not an address:port ({e}), e.g. \"10.1.2.3:5432\""),
                    );
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let logs_in = protocol.is_some_and(|p| p.spec().logs_in);
        let login = self.login_settings(i, &raw, protocol);
        if logs_in && login.is_none() {
            ok = false;
        }
        for other in seen {
            if other.port == port && (other.destinations.is_empty() || destinations.is_empty()) {
                self.error(
                    raw.port.span(),
                    &field("port"),
                    format!(
                        "overlaps intercept {:?} on port {port}; the first matching rule would always win",
                        other.name
                    ),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        // inject sends a credential to whoever answers: the destination
        // must be pinned, not "any address the workload dials".
        if let Some(Login { auth: AuthMode::Inject { .. }, .. }) = &login {
            let pinned = upstream.is_some()
                || (!destinations.is_empty()
                    && destinations.iter().all(|d| d.prefix_len == if d.addr.is_ipv4() { 32 } else { 128 }));
            if !pinned {
                self.error(
                    raw.port.span(),
                    &field("destinations"),
                    "auth = \"inject\" sends a credential upstream: pin the server with `upstream` or with exact \
                     addresses in `destinations` (a /32 or /128 each)",
                );
                return None;
            }
        }
        Some(Intercept { name, protocol: protocol?, port, destinations, upstream, login })
    }

    /// `auth`, `credentials` and `upstream_*` apply to protocols that log in
    /// upstream themselves.
    fn login_settings(&mut self, i: usize, raw: &RawIntercept, protocol: Option<Protocol>) -> Option<Login> {
        let field = |f: &str| format!("intercept[{i}].{f}");
        let Some(protocol) = protocol.filter(|p| p.spec().logs_in) else {
            for (name, v) in [
                ("auth", &raw.auth),
                ("credentials", &raw.credentials),
                ("upstream_tls", &raw.upstream_tls),
                ("upstream_ca", &raw.upstream_ca),
                ("upstream_server_name", &raw.upstream_server_name),
            ] {
                if let Some(v) = v {
                    let which = protocol.map_or_else(|| "this protocol".to_string(), |p| format!("protocol {p:?}"));
                    self.error(
                        v.span(),
                        &field(name),
                        format!("{which} relays bytes and never logs in upstream; this setting applies to protocols that terminate the connection (e.g. \"postgres\")"),
                    );
                }
            }
            return None;
        };
        let _ = protocol;
        let auth = match (raw.auth.as_ref().map(|a| a.get_ref().as_str()), &raw.credentials) {
            (None | Some("inject"), Some(c)) => AuthMode::Inject { credentials: c.get_ref().clone() },
            (None | Some("inject"), None) => {
                let span = raw.auth.as_ref().map_or(raw.protocol.span(), Spanned::span);
                self.error(
                    span,
                    &field("credentials"),
                    "auth = \"inject\" (the default) needs `credentials`, a name in the secrets file",
                );
                return None;
            }
            (Some("passthrough"), None) => AuthMode::Passthrough,
            (Some("passthrough"), Some(c)) => {
                self.error(
                    c.span(),
                    &field("credentials"),
                    "auth = \"passthrough\" relays the client's own login; remove `credentials`",
                );
                return None;
            }
            (Some(other), _) => {
                let span = raw.auth.as_ref().map_or(0..0, Spanned::span);
                self.error(
                    span,
                    &field("auth"),
                    format!("unknown auth mode {other:?}; use \"inject\" or \"passthrough\""),
                );
                return None;
            }
        };
        let tls = match raw.upstream_tls.as_ref().map(|t| t.get_ref().as_str()) {
            Some("disable") => {
                if let Some(ca) = &raw.upstream_ca {
                    self.error(ca.span(), &field("upstream_ca"), "upstream_tls = \"disable\" uses no CA");
                    return None;
                }
                UpstreamTls::Disable
            }
            None | Some("verify-full") => UpstreamTls::VerifyFull {
                ca_file: raw.upstream_ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
                server_name: raw.upstream_server_name.as_ref().map(|n| n.get_ref().clone()),
            },
            Some(other) => {
                let span = raw.upstream_tls.as_ref().map_or(0..0, Spanned::span);
                self.error(
                    span,
                    &field("upstream_tls"),
                    format!("unknown mode {other:?}; use \"verify-full\" (default) or \"disable\""),
                );
                return None;
            }
        };
        Some(Login { auth, tls })
    }

    fn tag(&mut self, i: usize, raw: Spanned<RawTag>, profiles: &[Profile]) -> Option<TagRule> {
        let span = raw.span();
        let raw = raw.into_inner();
        let target = match (&raw.cgroup, &raw.unit) {
            (Some(c), None) => {
                let g = c.get_ref().trim_matches('/').to_string();
                if let Err(e) = globset::Glob::new(&g) {
                    self.error(c.span(), &format!("tag[{i}].cgroup"), format!("bad glob: {e}"));
                    return None;
                }
                if g.split('/').any(|c| c == ".." || c == ".") {
                    self.error(c.span(), &format!("tag[{i}].cgroup"), "no '.' or '..' components");
                    return None;
                }
                TagTarget::CgroupGlob(g)
            }
            (None, Some(u)) => {
                let u = u.get_ref();
                if u.contains('/') || !UNIT_SUFFIXES.iter().any(|s| u.ends_with(s)) {
                    let span = raw.unit.as_ref().map(Spanned::span).unwrap_or(span.clone());
                    self.error(
                        span,
                        &format!("tag[{i}].unit"),
                        "a systemd unit name such as \"backup.service\" (.service, .scope or .slice)",
                    );
                    return None;
                }
                TagTarget::Unit(u.clone())
            }
            _ => {
                self.error(span, &format!("tag[{i}]"), "give exactly one of `cgroup` or `unit`");
                return None;
            }
        };
        let profile = raw.profile.get_ref();
        if !profiles.iter().any(|p| &p.name == profile) {
            let known: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            self.error(
                raw.profile.span(),
                &format!("tag[{i}].profile"),
                format!("unknown profile {profile:?}; defined: [{}]", known.join(", ")),
            );
            return None;
        }
        Some(TagRule { target, profile: profile.clone() })
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
#[path = "tests/config.rs"]
mod tests;
