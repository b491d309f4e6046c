//! cordon's SSH host identity: one stable Ed25519 host key and an Ed25519
//! host CA, kept in `<state_dir>/ssh/` (0600), and a short-lived host
//! certificate for each connection.
//!
//! `cordon ssh known-hosts` prints what to install once per workload host
//! in /etc/ssh/ssh_known_hosts: an `@cert-authority *` line for the CA and a
//! plain `*` line for the host key (clients without certificate support,
//! and OpenSSH's retry with the plain key when a certificate is refused).
//!
//! Certificate principals depend on the client: OpenSSH up to 10.2 accepts
//! an empty principal list for any host and matches a non-empty one
//! exactly; from 10.3 an empty list is refused and principals are patterns,
//! so `*` matches any name. The client's banner, read before cordon's SSH
//! server starts, says which.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use russh::keys::ssh_key::{
    certificate::{Builder, CertType},
    private::Ed25519Keypair,
    Certificate, LineEnding, PrivateKey,
};

pub struct HostIdentity {
    pub key: PrivateKey,
    pub ca: PrivateKey,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh")
}

impl HostIdentity {
    /// Load the host key and CA, creating them on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        let dir = dir(state_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            key: load_or_create(&dir.join("host_ed25519"), "cordon host key")?,
            ca: load_or_create(&dir.join("host_ca_ed25519"), "cordon host CA")?,
        })
    }

    /// Only read them (for `cordon ssh known-hosts` without a running agent).
    pub fn load(state_dir: &Path) -> Result<Self> {
        let dir = dir(state_dir);
        let read = |name: &str| -> Result<PrivateKey> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("reading {} (it is created when `cordon run` first serves an ssh intercept)", path.display())
            })?;
            PrivateKey::from_openssh(text).with_context(|| format!("{} is not an OpenSSH private key", path.display()))
        };
        Ok(Self { key: read("host_ed25519")?, ca: read("host_ca_ed25519")? })
    }

    /// The lines for /etc/ssh/ssh_known_hosts.
    pub fn known_hosts_lines(&self, destinations: &[String]) -> Result<Vec<String>> {
        let ca = self.ca.public_key().to_openssh().context("encoding the CA key")?;
        let key = self.key.public_key().to_openssh().context("encoding the host key")?;
        let mut out = vec![format!("@cert-authority * {ca}"), format!("* {key}")];
        for d in destinations {
            out.push(format!("{d} {key}"));
        }
        Ok(out)
    }

    /// A host certificate for one connection: valid from 5 minutes ago to
    /// an hour from now, key id = the session, principals per client.
    pub fn certificate(&self, session: &str, client_banner: &str) -> Result<Certificate> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let nonce: [u8; 32] = rand::random();
        let mut b =
            Builder::new(nonce.to_vec(), self.key.public_key().key_data().clone(), now.saturating_sub(300), now + 3600)
                .context("building the host certificate")?;
        b.cert_type(CertType::Host)?;
        b.serial(rand::random())?;
        b.key_id(format!("cordon session {session}"))?;
        if wildcard_principals(client_banner) {
            b.valid_principal("*")?;
        } else {
            b.all_principals_valid()?;
        }
        b.sign(&self.ca).context("signing the host certificate")
    }
}

/// OpenSSH 10.3 and later treat host-certificate principals as patterns
/// and refuse an empty list.
pub fn wildcard_principals(banner: &str) -> bool {
    let Some(v) = banner.split_whitespace().next().and_then(|id| id.strip_prefix("SSH-2.0-OpenSSH_")) else {
        return false;
    };
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut parts = digits.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (10, 3)
}

fn load_or_create(path: &Path, what: &str) -> Result<PrivateKey> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            return PrivateKey::from_openssh(text).with_context(|| {
                format!("{} ({what}) is not an OpenSSH private key; remove it to make a new one", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(what);
    let text = key.to_openssh(LineEnding::LF).context("encoding a new key")?;
    // Written whole to a new file, then renamed: a crash never leaves half a key.
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    tracing::info!(path = %path.display(), "created the {what}");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_follow_the_client_version() {
        assert!(!wildcard_principals("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"));
        assert!(!wildcard_principals("SSH-2.0-OpenSSH_10.2"));
        assert!(wildcard_principals("SSH-2.0-OpenSSH_10.3"));
        assert!(wildcard_principals("SSH-2.0-OpenSSH_11.0p1"));
        assert!(!wildcard_principals("SSH-2.0-paramiko_3.4.0"));
        assert!(!wildcard_principals("SSH-2.0-AsyncSSH_2.14.0"));
    }

    #[test]
    fn certificates_are_signed_by_the_ca_and_short_lived() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = HostIdentity::load_or_create(dir.path()).expect("identity");
        let again = HostIdentity::load_or_create(dir.path()).expect("identity");
        assert_eq!(id.key.public_key(), again.key.public_key(), "the host key is stable");
        let cert = id.certificate("s1", "SSH-2.0-OpenSSH_9.2p1").expect("cert");
        assert_eq!(cert.cert_type(), CertType::Host);
        assert!(cert.valid_principals().is_empty());
        assert_eq!(cert.public_key(), id.key.public_key().key_data());
        assert!(cert.valid_before() - cert.valid_after() <= 3900);
        let cert = id.certificate("s1", "SSH-2.0-OpenSSH_10.3").expect("cert");
        assert_eq!(cert.valid_principals(), ["*".to_string()]);
        let lines = id.known_hosts_lines(&[]).expect("lines");
        assert!(lines[0].starts_with("@cert-authority * ssh-ed25519 "));
        let _ = russh::keys::ssh_key::PublicKey::from_openssh(lines[1].trim_start_matches("* ")).expect("plain line");
    }
}
