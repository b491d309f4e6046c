//! SCRAM-SHA-256 client side (RFC 5802 / RFC 7677), without channel binding:
//! what cordon uses to authenticate upstream with an injected credential.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub struct Client {
    password: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    expected_server_signature: Option<[u8; 32]>,
    verified: std::cell::Cell<bool>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("the server's SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server's signature is wrong: it does not know the password (possible impostor)")]
    ServerSignature,
    #[error("the server rejected the SCRAM exchange: {0}")]
    Server(String),
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else { return [0; 32] };
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA256 with one 32-byte block ("Hi" in RFC 5802).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

impl Client {
    pub fn new(password: &str) -> Self {
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::rng(), &mut raw);
        Self::with_nonce(password, &B64.encode(raw))
    }

    pub fn with_nonce(password: &str, nonce: &str) -> Self {
        Self {
            password: password.as_bytes().to_vec(),
            nonce: nonce.to_string(),
            // The user name is taken from the startup packet by PostgreSQL.
            client_first_bare: format!("n=,r={nonce}"),
            expected_server_signature: None,
            verified: std::cell::Cell::new(false),
        }
    }

    /// client-first-message: gs2 header "n,," (no channel binding).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Given server-first-message, the client-final-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| ScramError::Malformed("salt"))?),
                Some(("i=", v)) => {
                    iterations = Some(v.parse::<u32>().map_err(|_| ScramError::Malformed("iterations"))?)
                }
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        let salt = salt.ok_or(ScramError::Malformed("no salt"))?;
        let iterations = iterations.ok_or(ScramError::Malformed("no iteration count"))?;
        if !(1..=10_000_000).contains(&iterations) {
            return Err(ScramError::Malformed("iteration count out of range"));
        }
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salted = hi(&self.password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(client_signature.iter()).map(|(a, b)| a ^ b).collect();
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Check server-final-message: the server proves it knew the password.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::Server(e.to_string()));
        }
        let v = text.strip_prefix("v=").ok_or(ScramError::Malformed("no verifier"))?;
        let v = v.split(',').next().unwrap_or("");
        let got = B64.decode(v).map_err(|_| ScramError::Malformed("verifier"))?;
        match self.expected_server_signature {
            Some(exp) if got == exp => {
                self.verified.set(true);
                Ok(())
            }
            _ => Err(ScramError::ServerSignature),
        }
    }

    /// The server proved it knows the password.
    pub fn verified(&self) -> bool {
        self.verified.get()
    }
}

/// PostgreSQL's md5 password response: "md5" + md5(md5(password + user) + salt).
pub fn md5_password(user: &str, password: &str, salt: &[u8]) -> String {
    use md5::Md5;
    let inner = hex::encode(Md5::digest(format!("{password}{user}").as_bytes()));
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex::encode(h.finalize()))
}

#[cfg(test)]
#[path = "../tests/pg_scram.rs"]
mod tests;
