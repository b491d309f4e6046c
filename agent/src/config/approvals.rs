//! `[profiles.X.approvals]`: who may release a held statement, how many
//! people must, for how long a statement waits, and what an approval covers.

use super::*;
use crate::approvals::{Grant, Principal, Settings};

/// A pending request's longest wait, and a window grant's longest life.
const MAX_HOLD: Duration = Duration::from_secs(24 * 3600);
const MAX_WINDOW: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApprovals {
    approvers: Option<Spanned<Vec<String>>>,
    required: Option<Spanned<i64>>,
    hold_timeout: Option<Spanned<String>>,
    grant: Option<Spanned<String>>,
    break_glass: Option<Spanned<Vec<String>>>,
    /// A shared PostgreSQL store: `postgresql://host:port/db`.
    store: Option<Spanned<String>>,
    /// `[credentials.NAME]` in the secrets file for the store.
    store_credentials: Option<Spanned<String>>,
    /// CA file for the store's certificate.
    store_ca: Option<Spanned<String>>,
    /// Workload Unix user → its database role in the store.
    #[serde(default)]
    workload_roles: BTreeMap<String, String>,
    /// `[[profiles.X.approvals.webhook]]`
    #[serde(default)]
    webhook: Vec<Spanned<RawHook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    url: Spanned<String>,
    secret: Option<String>,
    format: Option<Spanned<String>>,
}

/// "90s", "10m", "2h", "1d" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 =
        n.parse().map_err(|_| format!("{s:?} is not a duration; use e.g. \"90s\", \"10m\", \"2h\", \"1d\""))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        u => return Err(format!("unknown unit {u:?} in {s:?}; use s, m, h or d")),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

impl Validator<'_> {
    pub(super) fn approvals(&mut self, profile: &str, raw: Option<Spanned<RawApprovals>>) -> Option<Settings> {
        let raw = raw?;
        let table = raw.span();
        let raw = raw.into_inner();
        let field = |f: &str| format!("profiles.{profile}.approvals.{f}");
        let mut principals = |v: &Option<Spanned<Vec<String>>>, name: &str| -> Vec<Principal> {
            let Some(v) = v else { return Vec::new() };
            let mut out = Vec::new();
            for p in v.get_ref() {
                match p.parse::<Principal>() {
                    Ok(p) => out.push(p),
                    Err(e) => self.error(v.span(), &field(name), e),
                }
            }
            out
        };
        let approvers = principals(&raw.approvers, "approvers");
        let break_glass = principals(&raw.break_glass, "break_glass");
        let required = match &raw.required {
            None => 1,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) if (1..=10).contains(&v) => v,
                _ => {
                    self.error(n.span(), &field("required"), "how many distinct people must approve: 1 to 10");
                    1
                }
            },
        };
        let users = approvers.iter().filter(|p| matches!(p, Principal::User(_))).count();
        let groups = approvers.iter().any(|p| matches!(p, Principal::Group(_)));
        if let Some(n) = raw.required.as_ref().filter(|_| raw.store.is_none()) {
            if !groups && users < required as usize {
                self.error(
                    n.span(),
                    &field("required"),
                    format!("{required} distinct approvers are required but approvers names only {users} user(s) and no group; no request could ever be approved"),
                );
            }
        }
        let hold_timeout = match &raw.hold_timeout {
            None => Duration::from_secs(600),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) if d >= Duration::from_secs(1) && d <= MAX_HOLD => d,
                Ok(_) => {
                    self.error(s.span(), &field("hold_timeout"), "between 1s and 24h");
                    Duration::from_secs(600)
                }
                Err(e) => {
                    self.error(s.span(), &field("hold_timeout"), e);
                    Duration::from_secs(600)
                }
            },
        };
        let grant = match &raw.grant {
            None => Grant::Once,
            Some(s) if s.get_ref() == "once" => Grant::Once,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) if d >= Duration::from_secs(1) && d <= MAX_WINDOW => Grant::Window(d),
                Ok(_) => {
                    self.error(s.span(), &field("grant"), "\"once\", or a window between 1s and 14d such as \"30m\"");
                    Grant::Once
                }
                Err(e) => {
                    self.error(s.span(), &field("grant"), format!("\"once\", or a window such as \"30m\": {e}"));
                    Grant::Once
                }
            },
        };
        let store = raw.store.as_ref().and_then(|u| {
            let url = u.get_ref();
            match url.parse::<tokio_postgres::Config>() {
                Ok(c) if c.get_password().is_some() => {
                    self.error(u.span(), &field("store"), "no password in the URL: put the agent's login in the secrets file and name it with store_credentials");
                    None
                }
                Ok(_) => Some(crate::approvals::store::StoreSettings {
                    url: url.clone(),
                    credentials: raw.store_credentials.as_ref().map(|c| c.get_ref().clone()),
                    ca: raw.store_ca.as_ref().map(|c| std::path::PathBuf::from(c.get_ref())),
                }),
                Err(e) => {
                    self.error(u.span(), &field("store"), format!("not a PostgreSQL URL ({e}); e.g. \"postgresql://approvals.internal:5432/cordon?sslmode=require\""));
                    None
                }
            }
        });
        if let (Some(c), None) = (&raw.store_credentials, &raw.store) {
            self.error(c.span(), &field("store_credentials"), "store_credentials without store");
        }
        if approvers.is_empty() && raw.store.is_none() {
            let span = raw.approvers.as_ref().map(Spanned::span).unwrap_or(table);
            self.error(span, &field("approvers"), "name at least one approver: a Unix user, or %group");
        }
        let mut webhooks = Vec::new();
        for (i, h) in raw.webhook.into_iter().enumerate() {
            use crate::approvals::webhook::{Format, Hook};
            let h = h.into_inner();
            let f = |x: &str| format!("profiles.{profile}.approvals.webhook[{i}].{x}");
            let url = h.url.get_ref();
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                self.error(h.url.span(), &f("url"), "an http:// or https:// URL");
                continue;
            }
            let format = match h.format.as_ref().map(|s| s.get_ref().as_str()) {
                None | Some("standard") => Format::Standard,
                Some("slack") => Format::Slack,
                Some(o) => {
                    let span = h.format.as_ref().map(Spanned::span).unwrap_or(0..0);
                    self.error(span, &f("format"), format!("unknown format {o:?}; use \"standard\" or \"slack\""));
                    continue;
                }
            };
            if format == Format::Standard && h.secret.is_none() {
                self.error(
                    h.url.span(),
                    &f("secret"),
                    "a standard webhook is signed: name its secret in the secrets file's [webhooks]",
                );
                continue;
            }
            webhooks.push(Hook { url: url.clone(), secret: h.secret, format });
        }
        Some(Settings {
            approvers,
            required,
            hold_timeout,
            grant,
            break_glass,
            store,
            workload_roles: raw.workload_roles,
            webhooks,
        })
    }
}
