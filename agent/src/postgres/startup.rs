//! The client's startup phase: SSLRequest (TLS from cordon's certificate),
//! GSSENCRequest (refused with 'N'; the client falls back), CancelRequest
//! (routed to the right backend), and the StartupMessage (3.0 or 3.2).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{frame::Body, frame::FrameReader, wire, Ctx, End};
use crate::net::Stream;

/// A client past negotiation, ready to be started upstream.
pub struct ClientHello {
    pub stream: Stream,
    pub reader: FrameReader,
    pub version: i32,
    pub params: Vec<(String, String)>,
}

pub enum Hello {
    Startup(ClientHello),
    Cancel { pid: i32, key: Bytes },
}

/// Negotiate within `agent.handshake_timeout_secs`. A client refused here
/// (a timeout, a malformed or forbidden startup) reads a FATAL saying why,
/// wherever the protocol still allows one.
pub async fn negotiate(stream: Stream, ctx: &Ctx) -> Result<Hello> {
    let limit = ctx.shared.handshake_timeout();
    let mut slot = Some(stream);
    let result = match tokio::time::timeout(limit, negotiate_inner(&mut slot, ctx)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the client did not complete its startup within {} s, the limit agent.handshake_timeout_secs",
            limit.as_secs()
        )),
    };
    if let (Err(e), Some(mut stream)) = (&result, slot) {
        let code = if e.to_string().contains("handshake_timeout") { wire::code::LIMIT } else { "08P01" };
        let mut buf = BytesMut::new();
        wire::error(&mut buf, "FATAL", code, &format!("cordon: {e:#}"));
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
    }
    result
}

async fn negotiate_inner(slot: &mut Option<Stream>, ctx: &Ctx) -> Result<Hello> {
    let mut reader = FrameReader::new(ctx.shared.max_message_bytes());
    loop {
        let Some(stream) = slot.as_mut() else { bail!("the client's connection is gone") };
        let packet = loop {
            if let Some(p) = reader.next_startup()? {
                break p;
            }
            if reader.fill(stream).await? == 0 {
                bail!("the client closed the connection during startup");
            }
        };
        match parse_packet(&packet)? {
            Packet::Ssl => {
                if stream.is_tls() {
                    bail!("SSLRequest inside TLS");
                }
                if reader.buffered() > 0 {
                    // Bytes sent before the TLS handshake would be read as if
                    // they came over TLS (CVE-2021-23222): refuse.
                    bail!("the client sent data after SSLRequest before the TLS handshake");
                }
                let Some(tls) = ctx.shared.client_tls() else {
                    stream.write_all(b"N").await?;
                    continue;
                };
                stream.write_all(b"S").await?;
                let Some(Stream::Plain(tcp)) = slot.take() else { bail!("SSLRequest inside TLS") };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let tls = acceptor.accept(tcp).await.context("TLS handshake with the client")?;
                *slot = Some(Stream::Server(Box::new(tls)));
            }
            Packet::GssEnc => {
                // No GSSAPI encryption: 'N' makes libpq fall back to TLS or
                // plain, as with a server built without GSSAPI.
                stream.write_all(b"N").await?;
            }
            Packet::Cancel { pid, key } => return Ok(Hello::Cancel { pid, key }),
            Packet::Startup { version, params } => {
                let Some(stream) = slot.take() else { bail!("the client's connection is gone") };
                return Ok(Hello::Startup(ClientHello { stream, reader, version, params }));
            }
        }
    }
}

/// A startup-phase packet, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: Bytes },
    Startup { version: i32, params: Vec<(String, String)> },
}

/// Decode one startup-phase packet (length included), refusing what a
/// governed session may not do.
pub fn parse_packet(packet: &[u8]) -> Result<Packet> {
    let mut body = Body::new(packet.get(4..).unwrap_or_default());
    let code = body.i32().context("startup packet without a code")?;
    match code {
        wire::SSL_REQUEST => Ok(Packet::Ssl),
        wire::GSSENC_REQUEST => Ok(Packet::GssEnc),
        wire::CANCEL_REQUEST => {
            let pid = body.i32().context("CancelRequest without a process id")?;
            let key = Bytes::copy_from_slice(body.rest());
            if key.is_empty() || key.len() > 256 {
                bail!("CancelRequest with a {}-byte key", key.len());
            }
            Ok(Packet::Cancel { pid, key })
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            while let Some(k) = body.cstr() {
                if k.is_empty() {
                    break;
                }
                let v = body.cstr().context("startup parameter without a value")?;
                let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
                    bail!("startup parameters are not UTF-8");
                };
                params.push((k.to_string(), v.to_string()));
            }
            if !params.iter().any(|(k, _)| k == "user") {
                bail!("the startup message names no user");
            }
            // Settings that would make the server read statements, names
            // or values differently from cordon are refused here as they
            // are by SET; PostgreSQL folds case and '-' to '_' in names.
            // client_encoding is overridden upstream (UTF8), not refused.
            let fold = |s: &str| s.to_ascii_lowercase().replace('-', "_");
            for (k, v) in &params {
                let key = fold(k);
                let pinned = super::sql::PINNED_SETTINGS
                    .iter()
                    .filter(|p| **p != "client_encoding")
                    .any(|p| key == *p || (key == "options" && fold(v).contains(p)));
                if pinned || (key == "options" && fold(v).contains("client_encoding")) {
                    bail!("the startup message sets {k}={v:?}, which a governed session may not change");
                }
            }
            Ok(Packet::Startup { version: v, params })
        }
        other => bail!("unsupported protocol version or request code {other}"),
    }
}

/// A CancelRequest arrived (on its own connection, redirected like any
/// other): map cordon's key back to the backend's and send it upstream.
pub async fn forward_cancel(pid: i32, key: &[u8], ctx: &Ctx) -> End {
    let target = ctx.pg.cancel_target(pid, key);
    // A statement held for approval has not reached the server: the cancel
    // withdraws its request, and the session answers 57014.
    if let Some(t) = &target {
        if ctx.shared.approvals.cancel_session(&t.session) {
            let rec = ctx
                .base
                .clone()
                .with_event("cancel")
                .with("outcome", "withdrew_held_statement")
                .with("target_session", &t.session);
            let _ = ctx.shared.audit.append(&rec);
            return End { outcome: "cancel", ..End::default() };
        }
    }
    let rec = |outcome: &str| ctx.base.clone().with_event("cancel").with("outcome", outcome);
    let Some(target) = target else {
        let _ = ctx.shared.audit.write(rec("unknown_key")).await;
        return End { outcome: "cancel_unknown_key", ..End::default() };
    };
    let result = async {
        let mut up = crate::proxy::connect_upstream(target.upstream, &ctx.shared).await?;
        let mut buf = BytesMut::new();
        wire::cancel_request(&mut buf, target.pid, &target.key);
        up.write_all(&buf).await.context("sending the cancel request upstream")?;
        up.shutdown().await.ok();
        anyhow::Ok(())
    }
    .await;
    let outcome = if result.is_ok() { "forwarded" } else { "upstream_failed" };
    let _ = ctx.shared.audit.write(rec(outcome).with("target_session", &target.session)).await;
    End { outcome: "cancel", error: result.err().map(|e| format!("{e:#}")), ..End::default() }
}
