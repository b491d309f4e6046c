//! Local port forwarding (`ssh -L`, `-W`) to a destination the profile
//! lists in `ssh.forwarding` ("host:port" globs): opened from the upstream
//! server, bytes relayed as they are (never masked), recorded as a
//! `statement` of kind channel with its byte counts. Everything else is
//! refused in `server.rs`.

use std::sync::Arc;

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
