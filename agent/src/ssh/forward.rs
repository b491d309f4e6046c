//! Local port forwarding (`ssh -L`, `-W`) to a destination the profile
//! lists in `ssh.forwarding` ("host:port" globs): opened from the upstream
//! server, bytes relayed as they are (never masked), recorded as a
//! `statement` of kind channel with its byte counts. Everything else is
//! refused in `server.rs`.

use std::sync::Arc;

/// Whether the profile's `ssh.forwarding` list admits `host:port`; Err says
/// why not. A port one of cordon's intercepts governs (PostgreSQL, SSH, …)
/// is admitted only by an entry that names that port exactly: the forward
/// is opened from the remote host, past the eBPF redirect, so a broad glob
/// like `*:*` or `db:*` would carry a database session cordon never reads,
/// or a nested `ssh -J` session it cannot see into.
pub fn admits(list: &[String], governed_ports: &[u16], host: &str, port: u32) -> Result<(), String> {
    let dest = format!("{host}:{port}");
    let matching: Vec<&String> = list.iter().filter(|p| super::policy::glob_str(p, &dest)).collect();
    if matching.is_empty() {
        return Err(format!("local port forwarding to {dest} is not allowed"));
    }
    let governed = u16::try_from(port).is_ok_and(|p| governed_ports.contains(&p));
    if !governed {
        return Ok(());
    }
    let explicit = |entry: &str| entry.rsplit_once(':').is_some_and(|(_, p)| p == port.to_string());
    if matching.iter().any(|e| explicit(e)) {
        return Ok(());
    }
    Err(format!(
        "forwarding to {dest} would carry a connection on a port cordon governs ({port}) past its pipeline; connect to it \
         directly (cordon intercepts it), or list \"{host}:{port}\" in ssh.forwarding with the port written out"
    ))
}

use russh::{server, Channel, ChannelMsg};

use super::Ctx;
use crate::pipeline::{Outcome, ServerError, Statement, StatementKind, Verdict};

pub async fn run(
    ctx: Arc<Ctx>,
    down: Channel<server::Msg>,
    open: server::ChannelOpenHandle,
    (host, port, orig, orig_port): (String, u32, String, u32),
) {
    let text = format!("<forward to {host}:{port}>");
    let stmt = Statement {
        text: &text,
        literals: &[],
        kind: StatementKind::Channel,
        params: &[],
        prepared: None,
        approval: None,
    };
    let (admitted, written) = match ctx.pipeline.lock() {
        Ok(mut p) => p.statement(&stmt, &Verdict::Allow),
        Err(_) => return,
    };
    if written.is_err() {
        open.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
        return;
    }
    let scoped = ctx.uses_certificates();
    let up = if scoped {
        let scope = super::upstream::Scope {
            key_id: format!("cordon session {} uid {} forward {host}:{port}", ctx.session, ctx.workload.uid),
            force_command: None,
            pty: false,
            forwarding: true,
        };
        ctx.connect_scoped(scope).await
    } else {
        ctx.upstream().await
    };
    let finish = |outcome: Outcome| {
        if let Ok(mut p) = ctx.pipeline.lock() {
            p.finish(&admitted, &outcome);
        }
    };
    let conn = up.clone().ok();
    let upc = match up {
        Ok(u) => u.channel_open_direct_tcpip(host.clone(), port, orig, orig_port).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let upc = match upc {
        Ok(c) => c,
        Err(message) => {
            open.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            finish(Outcome {
                error: Some(ServerError { severity: "ERROR".into(), code: "upstream".into(), message }),
                ..Outcome::default()
            });
            return;
        }
    };
    open.accept().await;
    let (mut rx, tx) = down.split();
    let (mut urx, utx) = upc.split();
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    loop {
        tokio::select! {
            m = rx.wait() => match m {
                Some(ChannelMsg::Data { data }) => {
                    up_bytes += data.len() as u64;
                    if utx.data_bytes(data).await.is_err() { break; }
                }
                Some(ChannelMsg::Eof) => { let _ = utx.eof().await; }
                Some(ChannelMsg::Close) | None => { let _ = utx.close().await; break; }
                Some(_) => {}
            },
            m = urx.wait() => match m {
                Some(ChannelMsg::Data { data }) => {
                    down_bytes += data.len() as u64;
                    if tx.data_bytes(data).await.is_err() { break; }
                }
                Some(ChannelMsg::Eof) => { let _ = tx.eof().await; }
                Some(ChannelMsg::Close) | None => { let _ = tx.close().await; break; }
                Some(_) => {}
            },
        }
    }
    if let (true, Some(c)) = (scoped, conn) {
        let _ = c.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
    ctx.bytes_up.fetch_add(up_bytes, std::sync::atomic::Ordering::Relaxed);
    ctx.bytes_down.fetch_add(down_bytes, std::sync::atomic::Ordering::Relaxed);
    finish(Outcome {
        tags: vec![format!("forwarded {up_bytes} up, {down_bytes} down")],
        bytes: Some(down_bytes),
        ..Outcome::default()
    });
}

#[cfg(test)]
mod tests {
    use super::admits;

    #[test]
    fn governed_ports_need_an_entry_that_names_them() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let governed = [22u16, 5432];
        // A broad glob reaches ordinary ports, never governed ones.
        assert!(admits(&list(&["*:*"]), &governed, "10.0.0.9", 8080).is_ok());
        for (host, port) in [("10.0.0.9", 22), ("db.internal", 5432)] {
            let e = admits(&list(&["*:*", "db.internal:*", "*:5?32", "*:2*"]), &governed, host, port)
                .err()
                .unwrap_or_default();
            assert!(e.contains("port cordon governs"), "{e}");
        }
        // Written out, the operator meant it.
        assert!(admits(&list(&["db.internal:5432"]), &governed, "db.internal", 5432).is_ok());
        assert!(admits(&list(&["10.0.0.*:22"]), &governed, "10.0.0.9", 22).is_ok());
        // Not listed at all.
        assert!(admits(&list(&["db.internal:5432"]), &governed, "db.internal", 5433).is_err());
        assert!(admits(&[], &governed, "x", 1).is_err());
    }
}
