//! The PostgreSQL session after authentication: both directions relayed at
//! once, statements fed to the pipeline, results followed back.
//!
//! Two loops share one `Tracker` behind a mutex (held only while a batch of
//! frames is examined, never across I/O): one reads the client, one the
//! server, so neither side can stall the other, and each loop writes its
//! whole batch in one call. Bytes are forwarded as received; only
//! BackendKeyData is rewritten (cordon hands out its own cancel keys).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::{
    frame::{Body, Frame, FrameReader},
    startup::ClientHello,
    upstream, wire, CancelTarget, Ctx, End,
};
use crate::{
    net::Stream,
    pipeline::{recorder, Admitted, Outcome, Param, SessionPipeline, Statement, StatementKind},
};

/// Most prepared statements / portals one session may hold.
const MAX_NAMED: usize = 100_000;

struct Portal {
    text: Arc<str>,
    prepared: Option<String>,
    params: Vec<(Option<Bytes>, bool)>,
}

enum Entry {
    Stmt { admitted: Admitted, simple: bool, outcome: Outcome },
    Sync,
}

struct Tracker {
    pipeline: SessionPipeline,
    prepared: HashMap<Bytes, (Arc<str>, Option<String>)>,
    portals: HashMap<Bytes, Portal>,
    queue: VecDeque<Entry>,
    unconfirmed: Vec<crate::audit::Pending>,
    cancel: Option<(i32, Vec<u8>)>,
    bytes_up: u64,
    bytes_down: u64,
    last_activity: Instant,
}

pub async fn run(mut hello: ClientHello, ctx: &Ctx) -> End {
    let client_tls = hello.stream.is_tls();
    let database = hello.params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.clone());
    let mut end = End { client_tls, database, ..End::default() };
    let up = match upstream::start(&mut hello, ctx).await {
        Ok(u) => u,
        Err(e) => {
            // Tell the client why, in its own protocol, then close.
            let mut buf = BytesMut::new();
            wire::error(&mut buf, "FATAL", "08006", &format!("cordon: cannot start the session upstream: {e:#}"));
            let _ = hello.stream.write_all(&buf).await;
            end.outcome = "upstream_failed";
            end.error = Some(format!("{e:#}"));
            return end;
        }
    };
    end.upstream_tls = up.stream.is_tls();
    end.upstream_user = Some(up.user.clone());

    let recorder = if ctx.profile.record.results {
        match recorder::Recorder::create(&ctx.shared.recordings_dir(), &ctx.session) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("cannot create the session recording: {e}");
                None
            }
        }
    } else {
        None
    };
    let pipeline = SessionPipeline::new(ctx.shared.audit.clone(), &ctx.session, ctx.profile.record, recorder);
    let tracker = Arc::new(Mutex::new(Tracker {
        pipeline,
        prepared: HashMap::new(),
        portals: HashMap::new(),
        queue: VecDeque::new(),
        unconfirmed: Vec::new(),
        cancel: None,
        bytes_up: 0,
        bytes_down: 0,
        last_activity: Instant::now(),
    }));

    let (cr, cw) = tokio::io::split(hello.stream);
    let (ur, uw) = tokio::io::split(up.stream);
    let c2s = client_to_server(cr, hello.reader, uw, &tracker, ctx);
    let s2c = server_to_client(ur, up.reader, cw, &tracker, ctx);
    tokio::pin!(c2s, s2c);
    let idle = ctx.shared.idle_timeout();
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    let result: Result<&'static str> = loop {
        tokio::select! {
            r = &mut c2s => match r {
                // The client finished (Terminate or EOF): let the server's
                // last words through, briefly.
                Ok(()) => match tokio::time::timeout(Duration::from_secs(5), &mut s2c).await {
                    Ok(Ok(())) | Err(_) => break Ok("closed"),
                    Ok(Err(e)) => break Err(e),
                },
                Err(e) => break Err(e),
            },
            r = &mut s2c => match r {
                Ok(()) => break Ok("server_closed"),
                Err(e) => break Err(e),
            },
            _ = tick.tick() => {
                let quiet = tracker.lock().map(|t| t.last_activity.elapsed()).unwrap_or_default();
                if quiet >= idle {
                    break Ok("idle_timeout");
                }
            }
        }
    };

    let Ok(mut t) = tracker.lock() else {
        end.outcome = "internal_error";
        return end;
    };
    // Statements still open when the session ends.
    let open: Vec<Entry> = t.queue.drain(..).collect();
    for e in open {
        if let Entry::Stmt { admitted, outcome, .. } = e {
            let mut o = outcome;
            o.skipped = o.tags.is_empty() && o.error.is_none();
            t.pipeline.finish(&admitted, &o);
        }
    }
    if let Some((pid, key)) = t.cancel.take() {
        ctx.shared.forget_cancel(pid, &key);
    }
    end.bytes_up = t.bytes_up;
    end.bytes_down = t.bytes_down;
    end.statements = t.pipeline.statements();
    end.recording = t.pipeline.close();
    match result {
        Ok(o) => end.outcome = o,
        Err(e) => {
            end.outcome = if e.downcast_ref::<super::frame::FrameError>().is_some()
                || e.to_string().starts_with("protocol violation")
            {
                "protocol_error"
            } else {
                "error"
            };
            end.error = Some(format!("{e:#}"));
        }
    }
    end
}

async fn client_to_server(
    mut cr: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut uw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let mut terminate = false;
        let mut violation = None;
        {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        violation = Some(anyhow::Error::from(e));
                        break;
                    }
                };
                t.bytes_up += frame.bytes.len() as u64;
                match on_client_frame(&mut t, &frame) {
                    Ok(()) => {}
                    Err(e) => {
                        violation = Some(e);
                        break;
                    }
                }
                if frame.tag == b'X' {
                    terminate = true;
                }
                out.extend_from_slice(&frame.bytes);
            }
            t.last_activity = Instant::now();
        }
        if !out.is_empty() {
            uw.write_all(&out).await.context("writing to the server")?;
            out.clear();
        }
        if let Some(e) = violation {
            // Tell the client, then close only this session.
            let _ = uw.shutdown().await;
            return Err(e.context("protocol violation from the client"));
        }
        if terminate {
            let _ = uw.shutdown().await;
            return Ok(());
        }
        if reader.fill(&mut cr).await.context("reading from the client")? == 0 {
            if reader.buffered() > 0 {
                bail!("protocol violation: the client closed mid-message ({} bytes of a message)", reader.buffered());
            }
            let _ = uw.shutdown().await;
            return Ok(());
        }
        let _ = ctx;
    }
}

fn on_client_frame(t: &mut Tracker, f: &Frame) -> Result<()> {
    let mut b = Body::new(f.body());
    match f.tag {
        b'Q' => {
            let text = String::from_utf8_lossy(b.cstr().context("Query without a terminated string")?).into_owned();
            let (_verdict, admitted, pending) = t.pipeline.statement(&Statement {
                text: &text,
                kind: StatementKind::Simple,
                params: &[],
                prepared: None,
            });
            t.unconfirmed.push(pending);
            t.queue.push_back(Entry::Stmt { admitted, simple: true, outcome: Outcome::default() });
        }
        b'P' => {
            let name = Bytes::copy_from_slice(b.cstr().context("Parse without a name")?);
            let text: Arc<str> = String::from_utf8_lossy(b.cstr().context("Parse without a query")?).into();
            if t.prepared.len() >= MAX_NAMED && !t.prepared.contains_key(&name) {
                bail!("protocol violation: more than {MAX_NAMED} prepared statements in one session");
            }
            let label = (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned());
            t.prepared.insert(name, (text, label));
        }
        b'B' => {
            let portal = Bytes::copy_from_slice(b.cstr().context("Bind without a portal")?);
            let stmt = b.cstr().context("Bind without a statement")?;
            let nfmt = b.i16().context("Bind without format count")?.max(0) as usize;
            let mut formats = Vec::with_capacity(nfmt.min(1024));
            for _ in 0..nfmt {
                formats.push(b.i16().context("Bind format codes cut short")? == 1);
            }
            let n = b.i16().context("Bind without parameter count")?.max(0) as usize;
            let mut params = Vec::with_capacity(n.min(1024));
            for i in 0..n {
                let len = b.i32().context("Bind parameters cut short")?;
                let v = if len < 0 { None } else { Some(Bytes::copy_from_slice(b.bytes(len as usize).context("Bind parameter cut short")?)) };
                let binary = match formats.len() {
                    0 => false,
                    1 => formats.first().copied().unwrap_or(false),
                    _ => formats.get(i).copied().unwrap_or(false),
                };
                params.push((v, binary));
            }
            let (text, prepared) =
                t.prepared.get(stmt).cloned().unwrap_or_else(|| (Arc::from("<unknown prepared statement>"), None));
            if t.portals.len() >= MAX_NAMED && !t.portals.contains_key(&portal) {
                bail!("protocol violation: more than {MAX_NAMED} portals in one session");
            }
            t.portals.insert(portal, Portal { text, prepared, params });
        }
        b'E' => {
            let portal = b.cstr().context("Execute without a portal")?;
            let (text, prepared, params) = match t.portals.get(portal) {
                Some(p) => (p.text.clone(), p.prepared.clone(), p.params.clone()),
                None => (Arc::from("<unknown portal>"), None, Vec::new()),
            };
            let ps: Vec<Param<'_>> = params.iter().map(|(v, bin)| Param { value: v.as_deref(), binary: *bin }).collect();
            let (_verdict, admitted, pending) = t.pipeline.statement(&Statement {
                text: &text,
                kind: StatementKind::Execute,
                params: &ps,
                prepared: prepared.as_deref(),
            });
            t.unconfirmed.push(pending);
            t.queue.push_back(Entry::Stmt { admitted, simple: false, outcome: Outcome::default() });
        }
        b'F' => {
            let oid = b.i32().context("FunctionCall without an oid")?;
            let text = format!("<function call oid {oid}>");
            let (_verdict, admitted, pending) = t.pipeline.statement(&Statement {
                text: &text,
                kind: StatementKind::FunctionCall,
                params: &[],
                prepared: None,
            });
            t.unconfirmed.push(pending);
            // Answered by FunctionCallResponse then ReadyForQuery, like a query.
            t.queue.push_back(Entry::Stmt { admitted, simple: true, outcome: Outcome::default() });
        }
        b'C' => {
            let kind = b.u8().context("Close without a kind")?;
            let name = b.cstr().context("Close without a name")?;
            if kind == b'S' {
                t.prepared.remove(name);
            } else {
                t.portals.remove(name);
            }
        }
        b'S' => t.queue.push_back(Entry::Sync),
        b'D' | b'H' | b'X' | b'd' | b'c' | b'f' | b'p' => {}
        other => bail!("protocol violation: unknown message type {:?} from the client", other as char),
    }
    Ok(())
}

async fn server_to_client(
    mut ur: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut cw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let waits = {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(anyhow::Error::from(e).context("from the server")),
                };
                t.bytes_down += frame.bytes.len() as u64;
                on_server_frame(&mut t, &frame, &mut out, ctx);
            }
            t.last_activity = Instant::now();
            std::mem::take(&mut t.unconfirmed)
        };
        // No result reaches the client before its statement is durable.
        for w in waits {
            w.durable().await.context("the audit log failed; refusing to deliver unaudited results")?;
        }
        if !out.is_empty() {
            cw.write_all(&out).await.context("writing to the client")?;
            out.clear();
        }
        if reader.fill(&mut ur).await.context("reading from the server")? == 0 {
            let _ = cw.shutdown().await;
            return Ok(());
        }
    }
}

fn head(t: &mut Tracker) -> Option<(&Admitted, &mut Outcome)> {
    t.queue.iter_mut().find_map(|e| match e {
        Entry::Stmt { admitted, outcome, .. } => Some((&*admitted, outcome)),
        Entry::Sync => None,
    })
}

fn head_id(t: &Tracker) -> u64 {
    match t.queue.front() {
        Some(Entry::Stmt { admitted, .. }) => admitted.id,
        _ => 0,
    }
}

/// Finish the statement at the head of the queue.
fn finish_head(t: &mut Tracker) {
    if let Some(Entry::Stmt { admitted, outcome, .. }) = t.queue.pop_front() {
        t.pipeline.finish(&admitted, &outcome);
    }
}

fn on_server_frame(t: &mut Tracker, f: &Frame, out: &mut BytesMut, ctx: &Ctx) {
    match f.tag {
        b'K' => {
            // Hand the client cordon's own key; keep the backend's.
            let mut b = Body::new(f.body());
            if let Some(pid) = b.i32() {
                let real_key = b.rest().to_vec();
                let (my_pid, my_key) = ctx.shared.register_cancel(CancelTarget {
                    session: ctx.session.clone(),
                    upstream: ctx.upstream,
                    pid,
                    key: real_key.clone(),
                }, real_key.len());
                wire::backend_key(out, my_pid, &my_key);
                t.cancel = Some((my_pid, my_key));
                return;
            }
        }
        b'T' => {
            let names = wire::row_description(f.body());
            let id = head_id(t);
            t.pipeline.columns(id, &names);
        }
        b'D' => {
            let record = t.pipeline.wants_rows();
            let id = head_id(t);
            if record {
                let values = wire::data_row(f.body());
                t.pipeline.row(id, &values);
            }
            if let Some((_, o)) = head(t) {
                o.rows += 1;
            }
        }
        b'd' => {
            // COPY TO STDOUT data.
            if t.pipeline.wants_rows() {
                let id = head_id(t);
                let line = String::from_utf8_lossy(f.body()).trim_end_matches('\n').to_string();
                t.pipeline.row(id, &[Some(line)]);
            }
        }
        b'C' => {
            let tag = String::from_utf8_lossy(Body::new(f.body()).cstr().unwrap_or_default()).into_owned();
            let simple = matches!(t.queue.front(), Some(Entry::Stmt { simple: true, .. }));
            if let Some((_, o)) = head(t) {
                if let Some(n) = wire::tag_rows(&tag) {
                    if tag.starts_with("SELECT") || tag.starts_with("FETCH") {
                        // Already counted from DataRows.
                    } else {
                        o.rows += n;
                    }
                }
                o.tags.push(tag);
            }
            if !simple {
                finish_head(t);
            }
        }
        b'I' | b's' => {
            let simple = matches!(t.queue.front(), Some(Entry::Stmt { simple: true, .. }));
            if let Some((_, o)) = head(t) {
                if f.tag == b's' {
                    o.suspended = true;
                } else {
                    o.tags.push(String::new());
                }
            }
            if !simple {
                finish_head(t);
            }
        }
        b'E' => {
            let e = wire::server_error(f.body());
            let id = head_id(t);
            t.pipeline.notice(id, "error", serde_json::json!({"severity": e.severity, "code": e.code, "message": e.message}));
            let simple = matches!(t.queue.front(), Some(Entry::Stmt { simple: true, .. }));
            let is_stmt = matches!(t.queue.front(), Some(Entry::Stmt { .. }));
            if let Some((_, o)) = head(t) {
                o.error = Some(e);
            }
            if is_stmt && !simple {
                finish_head(t);
                // The server skips the rest of the pipeline until Sync.
                while let Some(Entry::Stmt { .. }) = t.queue.front() {
                    if let Some(Entry::Stmt { admitted, mut outcome, .. }) = t.queue.pop_front() {
                        outcome.skipped = true;
                        t.pipeline.finish(&admitted, &outcome);
                    }
                }
            }
        }
        b'N' => {
            let e = wire::server_error(f.body());
            let id = head_id(t);
            t.pipeline.notice(id, "notice", serde_json::json!({"severity": e.severity, "code": e.code, "message": e.message}));
        }
        b'A' => {
            let mut b = Body::new(f.body());
            let pid = b.i32().unwrap_or(0);
            let channel = String::from_utf8_lossy(b.cstr().unwrap_or_default()).into_owned();
            let payload = String::from_utf8_lossy(b.cstr().unwrap_or_default()).into_owned();
            t.pipeline.notice(0, "notification", serde_json::json!({"pid": pid, "channel": channel, "payload": payload}));
        }
        b'Z' => {
            // Ends a simple query, or everything up to the first Sync.
            match t.queue.front() {
                Some(Entry::Stmt { simple: true, .. }) => finish_head(t),
                _ => loop {
                    match t.queue.pop_front() {
                        Some(Entry::Sync) | None => break,
                        Some(Entry::Stmt { admitted, mut outcome, .. }) => {
                            outcome.skipped = outcome.tags.is_empty() && outcome.error.is_none() && !outcome.suspended;
                            t.pipeline.finish(&admitted, &outcome);
                        }
                    }
                },
            }
        }
        _ => {}
    }
    out.extend_from_slice(&f.bytes);
}
