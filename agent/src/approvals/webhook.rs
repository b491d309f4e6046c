//! Approval notifications: an HTTP POST per event (request, approval,
//! grant, denial, expiry, withdrawal) to each webhook of the request's
//! profile, signed per the Standard Webhooks spec:
//!
//! - `webhook-id`: stable across retries (the receiver's idempotency key);
//! - `webhook-timestamp`: Unix seconds;
//! - `webhook-signature`: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`
//!   with the secret named in the secrets file (`whsec_` + base64 is
//!   decoded, as the spec says).
//!
//! `format = "slack"` posts a Slack incoming-webhook message instead, naming
//! the request and the command that approves it. Deliveries never block a
//! session: events go through a bounded queue (full → dropped, with a
//! warning), each is retried with backoff, and an endpoint that answers 410
//! is not called again.

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One webhook of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub url: String,
    /// `[webhooks] NAME = "whsec_…"` in the secrets file.
    pub secret: Option<String>,
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Standard,
    Slack,
}

/// Events waiting for delivery.
const QUEUE: usize = 1024;
/// Concurrent deliveries.
const PARALLEL: usize = 8;
/// Attempts per delivery (backoff 1, 2, 4, 8, 16 s between them).
const ATTEMPTS: u32 = 6;

/// The delivery task: hub events → each profile's webhooks.
pub async fn run(shared: Arc<crate::state::Shared>) {
    let mut events = shared.approvals.subscribe();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Hook, Value)>(QUEUE);
    let sender = shared.clone();
    tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let gone: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
        while let Some((hook, ev)) = rx.recv().await {
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            let shared = sender.clone();
            let gone = gone.clone();
            tokio::spawn(async move {
                deliver(&shared, &hook, &ev, &gone).await;
                drop(permit);
            });
        }
    });
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("approval webhooks missed {n} events (too many at once)");
                continue;
            }
            Err(_) => return,
        };
        let Some(profile) = ev.get("profile").and_then(Value::as_str) else { continue };
        let policy = shared.policy();
        let hooks = policy
            .profiles
            .iter()
            .find(|p| p.name == profile)
            .and_then(|p| p.approvals.as_ref())
            .map(|a| a.webhooks.clone())
            .unwrap_or_default();
        for hook in hooks {
            if tx.try_send((hook.clone(), ev.clone())).is_err() {
                tracing::warn!(url = %hook.url, "approval webhook queue full; an event was dropped");
            }
        }
    }
}

async fn deliver(
    shared: &crate::state::Shared,
    hook: &Hook,
    ev: &Value,
    gone: &std::sync::Mutex<std::collections::HashSet<String>>,
) {
    if gone.lock().is_ok_and(|g| g.contains(&hook.url)) {
        return;
    }
    let id = format!("msg_{}", hex::encode(rand::random::<[u8; 12]>()));
    let body = match hook.format {
        Format::Standard => standard_body(ev),
        Format::Slack => slack_body(ev),
    };
    let secret = hook.secret.as_ref().and_then(|n| shared.secrets().webhooks.get(n).map(|s| s.expose().to_string()));
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut headers = vec![("content-type", "application/json".to_string())];
        if hook.format == Format::Standard {
            headers.push(("webhook-id", id.clone()));
            headers.push(("webhook-timestamp", ts.to_string()));
            if let Some(s) = &secret {
                headers.push(("webhook-signature", sign(s, &id, ts, &body)));
            }
        }
        match post(&hook.url, &headers, &body).await {
            Ok(code) if (200..300).contains(&code) => return,
            Ok(410) => {
                tracing::warn!(url = %hook.url, "approval webhook answered 410 Gone; not calling it again");
                if let Ok(mut g) = gone.lock() {
                    g.insert(hook.url.clone());
                }
                return;
            }
            Ok(code) => tracing::warn!(url = %hook.url, attempt, "approval webhook answered HTTP {code}"),
            Err(e) => tracing::warn!(url = %hook.url, attempt, "approval webhook failed: {e:#}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    tracing::warn!(url = %hook.url, "approval webhook gave up after {ATTEMPTS} attempts");
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(secret: &str, id: &str, ts: u64, body: &str) -> String {
    use base64::Engine;
    use hmac::{Mac, SimpleHmac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = match secret.strip_prefix("whsec_").map(|k| b64.decode(k)) {
        Some(Ok(k)) => k,
        _ => secret.as_bytes().to_vec(),
    };
    let Ok(mut mac) = SimpleHmac::<sha2::Sha256>::new_from_slice(&key) else { return String::new() };
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    format!("v1,{}", b64.encode(mac.finalize().into_bytes()))
}

fn event_type(ev: &Value) -> String {
    let e = ev.get("event").and_then(Value::as_str).unwrap_or("unknown");
    let e = match e {
        "request" => "requested",
        "approval" => "approved_partly",
        other => other,
    };
    if ev.get("break_glass") == Some(&Value::Bool(true)) {
        return "approval.break_glass".into();
    }
    format!("approval.{e}")
}

fn request_id(ev: &Value) -> String {
    match ev.get("request") {
        Some(Value::String(s)) => s.clone(),
        Some(r) => r.get("id").and_then(Value::as_str).unwrap_or("").to_string(),
        None => String::new(),
    }
}

fn standard_body(ev: &Value) -> String {
    json!({
        "type": event_type(ev),
        "timestamp": crate::audit::time::now_rfc3339(),
        "data": ev,
    })
    .to_string()
}

fn slack_body(ev: &Value) -> String {
    let id = request_id(ev);
    let profile = ev.get("profile").and_then(Value::as_str).unwrap_or("?");
    let text =
        ev.get("text").or_else(|| ev.get("request").and_then(|r| r.get("text"))).and_then(Value::as_str).unwrap_or("");
    let rule =
        ev.get("rule").or_else(|| ev.get("request").and_then(|r| r.get("rule"))).and_then(Value::as_str).unwrap_or("?");
    let what = match ev.get("event").and_then(Value::as_str).unwrap_or("") {
        "request" => format!(
            ":hourglass: cordon holds a statement for approval (profile {profile}, rule {rule}): request *{id}*\n```{}```\nApprove: `cordon approvals approve {id}` · deny: `cordon approvals deny {id} --reason …`",
            text.chars().take(1500).collect::<String>()
        ),
        "granted" if ev.get("break_glass") == Some(&Value::Bool(true)) => {
            format!(":rotating_light: request *{id}* was approved by BREAK-GLASS ({profile}, rule {rule})")
        }
        other => format!("request *{id}* ({profile}, rule {rule}): {other}"),
    };
    json!({ "text": what }).to_string()
}

/// One HTTP/1.1 POST; the status code.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> Result<u16> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("webhook URL {url:?} is neither http:// nor https://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().context("bad port in the webhook URL")?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: {}\r\nconnection: close\r\nuser-agent: cordon\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let io = async {
        let tcp =
            tokio::net::TcpStream::connect((host, port)).await.with_context(|| format!("connecting to {authority}"))?;
        let mut response = Vec::new();
        if tls {
            let config = crate::net::client_config(None)?;
            let name = crate::net::server_name(host)?;
            let mut s =
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.context("TLS with the webhook")?;
            s.write_all(req.as_bytes()).await?;
            s.take(64 * 1024).read_to_end(&mut response).await?;
        } else {
            let mut s = tcp;
            s.write_all(req.as_bytes()).await?;
            s.take(64 * 1024).read_to_end(&mut response).await?;
        }
        anyhow::Ok(response)
    };
    let response =
        tokio::time::timeout(Duration::from_secs(15), io).await.context("the webhook did not answer within 15 s")??;
    let head = String::from_utf8_lossy(response.get(..response.len().min(64)).unwrap_or_default()).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))
}
