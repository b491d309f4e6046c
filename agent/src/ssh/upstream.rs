//! cordon as an SSH client: it connects from its own cgroup (SO_MARK),
//! checks the server's host key against the intercept's pinned
//! `known_hosts` (plain keys, `@cert-authority`, `@revoked`), and logs in
//! with a credential only it holds. An unknown or changed key fails closed.

use std::{path::Path, sync::Arc};

use anyhow::{bail, Context, Result};
use russh::{
    client,
    keys::{
        ssh_key::{
            known_hosts::{HostPatterns, Marker},
            Certificate, HashAlg, PublicKey,
        },
        PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate,
    },
};

use crate::{secrets::Credential, state::Shared};

/// What the pin check saw, for the refusal message and the audit.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub offered: Option<String>,
    pub refused: Option<String>,
}

pub struct Pins {
    host: String,
    port: u16,
    entries: Vec<russh::keys::ssh_key::known_hosts::Entry>,
    file: String,
    seen: Arc<std::sync::Mutex<Seen>>,
}

impl Pins {
    pub fn load(file: &Path, addr: std::net::SocketAddr) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the pinned host keys {}", file.display()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            match russh::keys::ssh_key::known_hosts::KnownHosts::new(t).next() {
                Some(Ok(e)) => entries.push(e),
                Some(Err(e)) => bail!("{}:{}: not a known_hosts line ({e})", file.display(), n + 1),
                None => {}
            }
        }
        Ok(Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            entries,
            file: file.display().to_string(),
            seen: Arc::default(),
        })
    }

    /// Whether an entry's host patterns name this server (`host`, or
    /// `[host]:port` off port 22; `*`/`?` globs; a `!` negation excludes).
    fn names(&self, p: &HostPatterns) -> bool {
        let HostPatterns::Patterns(list) = p else { return false };
        let name = if self.port == 22 { self.host.clone() } else { format!("[{}]:{}", self.host, self.port) };
        let mut hit = false;
        for pat in list {
            if let Some(neg) = pat.strip_prefix('!') {
                if glob(neg, &name) || glob(neg, &self.host) {
                    return false;
                }
            } else if glob(pat, &name) || (self.port == 22 && glob(pat, &self.host)) {
                hit = true;
            }
        }
        hit
    }

    fn check(&self, offered: &PublicKeyOrCertificate) -> std::result::Result<(), String> {
        let here: Vec<_> = self.entries.iter().filter(|e| self.names(e.host_patterns())).collect();
        let revoked = |k: &russh::keys::ssh_key::public::KeyData| {
            here.iter().any(|e| e.marker() == Some(&Marker::Revoked) && e.public_key().key_data() == k)
        };
        match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if revoked(key.key_data()) {
                    return Err(format!("the key {} is marked @revoked", fingerprint(key)));
                }
                if here.iter().any(|e| e.marker().is_none() && e.public_key().key_data() == key.key_data()) {
                    return Ok(());
                }
                Err(format!("its host key {} is not pinned for {} in {}", fingerprint(key), self.host, self.file))
            }
            PublicKeyOrCertificate::Certificate(cert) => self.check_cert(cert, &here, &revoked),
        }
    }

    fn check_cert(
        &self,
        cert: &Certificate,
        here: &[&russh::keys::ssh_key::known_hosts::Entry],
        revoked: &dyn Fn(&russh::keys::ssh_key::public::KeyData) -> bool,
    ) -> std::result::Result<(), String> {
        if revoked(cert.public_key()) || revoked(cert.signature_key()) {
            return Err("its host certificate's key or CA is marked @revoked".into());
        }
        let cas: Vec<_> = here
            .iter()
            .filter(|e| e.marker() == Some(&Marker::CertAuthority) && e.public_key().key_data() == cert.signature_key())
            .map(|e| e.public_key().fingerprint(HashAlg::Sha256))
            .collect();
        if cas.is_empty() {
            // A plain pin of the certificate's own key also holds.
            if here.iter().any(|e| e.marker().is_none() && e.public_key().key_data() == cert.public_key()) {
                return Ok(());
            }
            return Err(format!(
                "its host certificate is signed by a CA not pinned for {} in {}",
                self.host, self.file
            ));
        }
        cert.validate(cas.iter()).map_err(|e| format!("its host certificate does not validate ({e})"))?;
        if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::Host {
            return Err("the certificate it presented is not a host certificate".into());
        }
        let principals = cert.valid_principals();
        if !principals.is_empty() && !principals.iter().any(|p| glob(p, &self.host)) {
            return Err(format!("its host certificate names {principals:?}, not {}", self.host));
        }
        Ok(())
    }
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

fn glob(p: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                go(p.get(1..).unwrap_or_default(), s) || (!s.is_empty() && go(p, s.get(1..).unwrap_or_default()))
            }
            (Some(b'?'), Some(_)) => go(p.get(1..).unwrap_or_default(), s.get(1..).unwrap_or_default()),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => {
                go(p.get(1..).unwrap_or_default(), s.get(1..).unwrap_or_default())
            }
            _ => false,
        }
    }
    p.len() <= 256 && go(p.as_bytes(), s.as_bytes())
}

pub struct Checker {
    pins: Pins,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let verdict = self.pins.check(key);
        if let Ok(mut s) = self.pins.seen.lock() {
            s.offered = Some(match key {
                PublicKeyOrCertificate::PublicKey { key, .. } => fingerprint(key),
                PublicKeyOrCertificate::Certificate(c) => format!("certificate {:?}", c.key_id()),
            });
            s.refused = verdict.as_ref().err().cloned();
        }
        Ok(verdict.is_ok())
    }
}

pub type Upstream = client::Handle<Checker>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_certificates_carry_the_command_the_source_and_no_forwarding() {
        let seed: [u8; 32] = [7; 32];
        let ca = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed));
        let pem = ca.to_openssh(russh::keys::ssh_key::LineEnding::LF).expect("pem");
        let scope = Scope {
            key_id: "cordon session s1".into(),
            force_command: Some("uptime".into()),
            pty: false,
            forwarding: false,
        };
        let (key, cert) = user_certificate(&pem, "deploy", "127.0.0.1".parse().expect("ip"), &scope).expect("cert");
        assert_eq!(cert.public_key(), key.public_key().key_data());
        assert_eq!(cert.valid_principals(), ["deploy".to_string()]);
        assert_eq!(cert.critical_options().get("force-command").map(String::as_str), Some("uptime"));
        assert_eq!(cert.critical_options().get("source-address").map(String::as_str), Some("127.0.0.1"));
        assert!(cert.extensions().is_empty(), "no permit-* extension: {:?}", cert.extensions());
        assert!(cert.valid_before() - cert.valid_after() <= 360);
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        cert.validate([&fp]).expect("signed by the CA");
        let shell = Scope { force_command: None, pty: true, ..scope };
        let (_, cert) = user_certificate(&pem, "deploy", "127.0.0.1".parse().expect("ip"), &shell).expect("cert");
        assert_eq!(cert.extensions().keys().collect::<Vec<_>>(), ["permit-pty"]);
    }
}

/// Why the upstream login failed, for the workload and the audit.
#[derive(Debug)]
pub struct Failure {
    /// `host_key`, `connect`, `auth`.
    pub kind: &'static str,
    pub message: String,
}

/// What a per-session user certificate allows (sshd enforces it even if
/// cordon had a bug): one command, a pty or not, from cordon's address.
#[derive(Debug, Clone)]
pub struct Scope {
    pub key_id: String,
    pub force_command: Option<String>,
    pub pty: bool,
    /// `permit-port-forwarding`, for a forwarding the profile lists.
    pub forwarding: bool,
}

/// An ephemeral Ed25519 key and its user certificate: valid from a minute
/// ago for five minutes, for `user` only, from `source` only, no
/// forwarding, `permit-pty` only when asked.
pub fn user_certificate(
    ca_pem: &str,
    user: &str,
    source: std::net::IpAddr,
    scope: &Scope,
) -> Result<(PrivateKey, Certificate)> {
    use russh::keys::ssh_key::{
        certificate::{Builder, CertType},
        private::Ed25519Keypair,
    };
    let ca = PrivateKey::from_openssh(ca_pem).context("the credential's user_ca_file is not an OpenSSH private key")?;
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let nonce: [u8; 32] = rand::random();
    let mut b = Builder::new(nonce.to_vec(), key.public_key().key_data().clone(), now.saturating_sub(60), now + 300)?;
    b.cert_type(CertType::User)?;
    b.serial(rand::random())?;
    b.key_id(scope.key_id.clone())?;
    b.valid_principal(user)?;
    b.critical_option("source-address", source.to_string())?;
    if let Some(c) = &scope.force_command {
        b.critical_option("force-command", c.clone())?;
    }
    if scope.pty {
        b.extension("permit-pty", "")?;
    }
    if scope.forwarding {
        b.extension("permit-port-forwarding", "")?;
    }
    let cert = b.sign(&ca).context("signing the user certificate")?;
    Ok((key, cert))
}

/// Connect, check the pins, log in: with a per-session user certificate
/// when the credential holds a user CA (`scope` says what it allows),
/// else with its key or password.
/// Ciphers offered to upstream servers, most preferred first.
const UPSTREAM_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

pub async fn connect(
    shared: &Shared,
    addr: std::net::SocketAddr,
    known_hosts: &Path,
    cred: &Credential,
    scope: Option<&Scope>,
) -> std::result::Result<Upstream, Failure> {
    let fail = |kind, message: String| Failure { kind, message };
    let pins = Pins::load(known_hosts, addr).map_err(|e| fail("host_key", format!("{e:#}")))?;
    let seen = pins.seen.clone();
    let tcp = crate::proxy::connect_upstream(addr, shared).await.map_err(|e| fail("connect", format!("{e:#}")))?;
    let source = tcp.local_addr().map(|a| a.ip()).map_err(|e| fail("connect", format!("{e}")))?;
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(std::time::Duration::from_secs(30)),
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 65_535,
        nodelay: true,
        // cordon's own leg, so cordon's choice: AES-GCM runs on the CPU's AES
        // instructions, while ring's ChaCha20-Poly1305 (russh's first choice)
        // was over a third of the agent's CPU in a 1 GiB transfer.
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(UPSTREAM_CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..client::Config::default()
    });
    let mut handle = match client::connect_stream(config, tcp, Checker { pins }).await {
        Ok(h) => h,
        Err(e) => {
            let s = seen.lock().map(|s| s.clone()).unwrap_or_default();
            if let Some(why) = s.refused {
                return Err(fail("host_key", format!("refused the server at {addr}: {why}")));
            }
            return Err(fail("connect", format!("SSH handshake with {addr} failed: {e}")));
        }
    };
    let ok = match (cred.user_ca.as_ref(), cred.key.as_ref()) {
        (Some(ca), _) => {
            let scope = scope.cloned().unwrap_or(Scope {
                key_id: "cordon".into(),
                force_command: None,
                pty: false,
                forwarding: false,
            });
            let (key, cert) = user_certificate(ca.expose(), &cred.user, source, &scope)
                .map_err(|e| fail("auth", format!("{e:#}")))?;
            handle
                .authenticate_openssh_cert(&cred.user, Arc::new(key), cert)
                .await
                .map_err(|e| fail("auth", format!("certificate login as {} failed: {e}", cred.user)))?
                .success()
        }
        (None, Some(pem)) => {
            let key = PrivateKey::from_openssh(pem.expose())
                .map_err(|e| fail("auth", format!("the credential's key_file is not an OpenSSH private key ({e})")))?;
            let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
            handle
                .authenticate_publickey(&cred.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(|e| fail("auth", format!("public-key login as {} failed: {e}", cred.user)))?
                .success()
        }
        (None, None) => handle
            .authenticate_password(&cred.user, cred.password.expose())
            .await
            .map_err(|e| fail("auth", format!("password login as {} failed: {e}", cred.user)))?
            .success(),
    };
    if !ok {
        return Err(fail("auth", format!("the server at {addr} refused cordon's credential for {}", cred.user)));
    }
    Ok(handle)
}
