//! Upstream credentials, from a root-only secrets file.
//!
//! ```toml
//! [credentials.orders-app]
//! user = "app"
//! password = "…"            # or password_file = "/etc/cordon/orders.pw"
//!                           # or password_env = "ORDERS_PW"
//! ```
//!
//! The file must belong to root (or the agent's user) and be unreadable by
//! group and others. Passwords live in [`Secret`], whose Debug and Display
//! never show the value, so they cannot reach a log or an audit record.

use std::{collections::BTreeMap, fmt, os::unix::fs::MetadataExt, path::Path};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    /// Empty for a key-only credential.
    pub password: Secret,
    /// An OpenSSH private key (SSH intercepts), from `key_file`.
    pub key: Option<Secret>,
    /// An SSH user CA's private key (`user_ca_file`): cordon signs a
    /// short-lived certificate for each session instead of using a key.
    pub user_ca: Option<Secret>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    pub credentials: BTreeMap<String, Credential>,
    /// HMAC key for the pseudonym masking strategy.
    pub pseudonym_key: Option<Secret>,
    /// HMAC key for literals and parameters in cordon's own records.
    pub literal_key: Option<Secret>,
    /// Signing secrets of approval webhooks, by name (`whsec_…`).
    pub webhooks: BTreeMap<String, Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
    masking: Option<RawMasking>,
    audit: Option<RawAudit>,
    #[serde(default)]
    webhooks: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    literal_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasking {
    pseudonym_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: String,
    password: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    /// An OpenSSH private key file (0600), for SSH.
    key_file: Option<String>,
    /// An SSH user CA's private key file (0600).
    user_ca_file: Option<String>,
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| format!("reading the secrets file {}", path.display()))?;
        check_private(path, &meta)?;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: RawFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text.get(..s.start).unwrap_or("").matches('\n').count() + 1).unwrap_or(0);
            // toml's message can quote the offending value: keep only its
            // first line, which names the problem, not the secret.
            let msg = e.message().lines().next().unwrap_or("syntax error").to_string();
            anyhow::anyhow!("{}:{line}: {msg}", path.display())
        })?;
        let mut credentials = BTreeMap::new();
        for (name, c) in raw.credentials {
            let user_ca = match &c.user_ca_file {
                Some(f) => {
                    let fp = Path::new(f);
                    let m = std::fs::metadata(fp).with_context(|| format!("credentials.{name}.user_ca_file {f}"))?;
                    check_private(fp, &m)?;
                    Some(Secret(
                        std::fs::read_to_string(fp)
                            .with_context(|| format!("reading credentials.{name}.user_ca_file {f}"))?,
                    ))
                }
                None => None,
            };
            let key = match &c.key_file {
                Some(f) => {
                    let fp = Path::new(f);
                    let m = std::fs::metadata(fp).with_context(|| format!("credentials.{name}.key_file {f}"))?;
                    check_private(fp, &m)?;
                    Some(Secret(
                        std::fs::read_to_string(fp)
                            .with_context(|| format!("reading credentials.{name}.key_file {f}"))?,
                    ))
                }
                None => None,
            };
            let password = match (c.password, c.password_file, c.password_env) {
                (None, None, None) if key.is_some() || user_ca.is_some() => String::new(),
                (Some(p), None, None) => p,
                (None, Some(f), None) => {
                    let fp = Path::new(&f);
                    let m = std::fs::metadata(fp).with_context(|| format!("credentials.{name}.password_file {f}"))?;
                    check_private(fp, &m)?;
                    std::fs::read_to_string(fp)
                        .with_context(|| format!("reading credentials.{name}.password_file {f}"))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string()
                }
                (None, None, Some(v)) => std::env::var(&v).with_context(|| {
                    format!("credentials.{name}.password_env: ${v} is not set in the agent's environment")
                })?,
                _ => bail!(
                    "{}: credentials.{name}: give exactly one of password, password_file, password_env (or only key_file or user_ca_file)",
                    path.display()
                ),
            };
            credentials.insert(name, Credential { user: c.user, password: Secret(password), key, user_ca });
        }
        let pseudonym_key = match raw.masking {
            Some(m) if m.pseudonym_key.len() < 16 => {
                bail!("{}: masking.pseudonym_key must be at least 16 characters", path.display())
            }
            Some(m) => Some(Secret(m.pseudonym_key)),
            None => None,
        };
        let literal_key = match raw.audit {
            Some(a) if a.literal_key.len() < 16 => {
                bail!("{}: audit.literal_key must be at least 16 characters", path.display())
            }
            Some(a) => Some(Secret(a.literal_key)),
            None => None,
        };
        let mut webhooks = BTreeMap::new();
        for (name, secret) in raw.webhooks {
            if secret.len() < 16 {
                bail!(
                    "{}: webhooks.{name} must be at least 16 characters (e.g. whsec_ + base64 of 32 random bytes)",
                    path.display()
                );
            }
            webhooks.insert(name, Secret(secret));
        }
        Ok(Self { credentials, pseudonym_key, literal_key, webhooks })
    }

    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.credentials.get(name)
    }
}

fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        bail!("{} must be owned by root (it holds credentials); it is owned by uid {}", path.display(), meta.uid());
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "{} is readable by group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
#[path = "tests/secrets.rs"]
mod tests;
