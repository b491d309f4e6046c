//! The local control socket: `cordon tag`, `untag`, `tags`, `status`, and the
//! shutdown that `cordon detach` asks for. One JSON request line, one JSON
//! response line. Root only: the socket is 0600, and the peer's uid is
//! checked with SO_PEERCRED as well. Its directory is 0755 so that approvers
//! reach the approvals socket beside it (`approvals::socket`).

use std::{path::Path, sync::Arc};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use crate::state::Shared;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Tag { target: String, profile: String },
    Untag { target: String },
    Tags,
    Status,
    Shutdown,
}

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    bind_socket(path, 0o600)
}

/// Bind a Unix socket at `path` (replacing a stale one) with this mode.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale socket {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding the socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                warn!("control request failed: {e:#}");
            }
        });
    }
}

async fn handle(stream: UnixStream, shared: &Shared) -> Result<()> {
    let cred = stream.peer_cred().context("reading the peer's credentials")?;
    let (r, mut w) = stream.into_split();
    if cred.uid() != 0 {
        let resp = json!({"ok": false, "error": "the control socket is for root only"});
        w.write_all(format!("{resp}\n").as_bytes()).await?;
        bail!("refused a control connection from uid {}", cred.uid());
    }
    let mut line = String::new();
    BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match execute(req, shared) {
            Ok(v) => v,
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    w.write_all(format!("{resp}\n").as_bytes()).await?;
    Ok(())
}

use tokio::io::AsyncReadExt as _;

fn execute(req: Request, shared: &Shared) -> Result<Value> {
    let policy = shared.policy();
    let lock_err = || anyhow::anyhow!("agent state is unavailable (a thread panicked); restart cordon");
    match req {
        Request::Tag { target, profile } => {
            let mut tagger = shared.tagger.lock().map_err(|_| lock_err())?;
            let mut kernel = shared.kernel.lock().map_err(|_| lock_err())?;
            let tagged = tagger.add(&policy, &mut kernel, &target, &profile)?;
            info!(%target, %profile, "runtime tag added");
            Ok(json!({"ok": true, "tagged": tagged}))
        }
        Request::Untag { target } => {
            let mut tagger = shared.tagger.lock().map_err(|_| lock_err())?;
            let mut kernel = shared.kernel.lock().map_err(|_| lock_err())?;
            tagger.remove(&policy, &mut kernel, &target)?;
            info!(%target, "runtime tag removed");
            Ok(json!({"ok": true}))
        }
        Request::Tags => {
            let tagger = shared.tagger.lock().map_err(|_| lock_err())?;
            Ok(json!({"ok": true, "tags": tagger.resolved(), "runtime": tagger.runtime()}))
        }
        Request::Status => {
            let kernel = shared.kernel.lock().map_err(|_| lock_err())?;
            Ok(json!({
                "ok": true,
                "policy": policy.source,
                "pin_dir": kernel.pin_dir(),
                "cgroup_root": shared.cgroup_root,
                "sessions_open": shared.sessions_open.load(std::sync::atomic::Ordering::Relaxed),
                "pid": std::process::id(),
            }))
        }
        Request::Shutdown => {
            shared.shutdown.notify_one();
            Ok(json!({"ok": true}))
        }
    }
}

/// Client side, for the CLI.
pub async fn request(path: &Path, req: &Request) -> Result<Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!("cannot reach the agent at {}: is `cordon run` running (and are you root)?", path.display())
    })?;
    exchange(stream, req).await
}

/// One JSON request line out, one JSON response line back; a response
/// without `"ok": true` is its `error`. Shared by the control and approvals
/// sockets' clients.
pub async fn exchange(mut stream: UnixStream, req: &impl Serialize) -> Result<Value> {
    let line = serde_json::to_string(req)?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut resp = String::new();
    BufReader::new(stream).take(16 * 1024 * 1024).read_line(&mut resp).await?;
    let v: Value = serde_json::from_str(&resp).with_context(|| format!("bad response from the agent: {resp:?}"))?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        let msg = v.get("error").and_then(Value::as_str).unwrap_or("unknown error");
        bail!("{msg}");
    }
    Ok(v)
}
