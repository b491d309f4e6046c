//! The client's side of a session: its messages judged (guardrails,
//! sensitive literals), rewritten for mask at read, recorded, and queued in
//! the request FIFO the server's answers are matched against. Judging a
//! statement text is `judge.rs`.

use super::*;
use crate::postgres::sql::Reading;

pub(super) async fn client_to_server(
    mut cr: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut uw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
    (wake, wake_up): (&tokio::sync::Notify, &tokio::sync::Notify),
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut memo = crate::postgres::sql::ReadMemo::default();
    loop {
        let (frames, violation) = take_frames(&mut reader);
        // Read each statement once; look up, before taking the lock, the
        // tables these statements touch.
        let mut prepared = prepare_all(&frames, ctx, &mut memo);
        let lookup_error = resolve_statement_tables(&prepared, tracker, ctx, cred).await.err();
        let mut terminate = false;
        // A message held for approval splits the batch: what precedes it
        // goes upstream, then the held one is judged again with its
        // decision, and the rest follows.
        let mut start = 0;
        loop {
            let mut denied_any = false;
            // A Parse cordon answers itself: its ParseComplete goes out
            // ahead of the next server response (see `drain_refusals`), so
            // the server side is woken for it only when nothing sent after
            // it in this batch brings a response. pgbench -M extended and
            // most drivers send Parse, Bind, Describe, Execute and Sync
            // together: waking the server side for the Parse wrote the
            // client twice per statement.
            let mut answered_parse = false;
            let mut held = None;
            let waits = {
                let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
                // What cordon sends the server on its own goes first: the
                // client's messages after it were not sent yet.
                if !t.to_server.is_empty() {
                    let mine = t.to_server.split();
                    out.extend_from_slice(&mine);
                }
                for (i, frame) in frames.iter().enumerate().skip(start) {
                    let rerun = t.decision.is_some();
                    if !rerun {
                        t.bytes_up += frame.bytes.len() as u64;
                    }
                    let p = prepared.get_mut(i).and_then(Option::take);
                    let forward = on_client_frame(&mut t, frame, ctx, p, lookup_error.as_ref());
                    if forward.is_err() && t.fatal.is_some() {
                        wake.notify_one();
                    }
                    // A decision applies to the message it was asked for only.
                    t.decision = None;
                    let forward = forward?;
                    if matches!(forward, Forward::AsIs | Forward::Rewritten(_)) && b"BDEPSCQF".contains(&frame.tag) {
                        answered_parse = false;
                    }
                    match forward {
                        Forward::AsIs => out.extend_from_slice(&frame.bytes),
                        Forward::Rewritten(b) => out.extend_from_slice(&b),
                        Forward::Drop
                            if frame.tag == b'P'
                                && matches!(t.queue.back(), Some(Req::Parse { answered: true, .. })) =>
                        {
                            answered_parse = true;
                        }
                        Forward::Drop => denied_any = true,
                        Forward::Hold(h) => {
                            held = Some((i, h));
                            break;
                        }
                    }
                    if frame.tag == b'X' {
                        terminate = true;
                    }
                }
                t.last_activity = Instant::now();
                std::mem::take(&mut t.unconfirmed)
            };
            if denied_any || answered_parse {
                wake.notify_one();
            }
            // audit_durability = "statement": a statement's record is on disk
            // before the statement runs (group-committed with other sessions').
            for w in waits {
                if let Err(u) = w.durable().await {
                    fatal(tracker, wire::code::AUDIT_UNAVAILABLE, format!("cordon: {u}"), wake);
                    bail!("{u}");
                }
            }
            if !out.is_empty() {
                uw.write_all(&out).await.context("writing to the server")?;
                out.clear();
            }
            let Some((i, h)) = held else { break };
            let settled = super::hold::wait(&h, tracker, ctx, &mut reader, &mut cr, wake).await?;
            tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?.decision = Some(settled);
            start = i;
        }
        if let Some(e) = violation {
            let (code, message) = framing_message(&e, "the client");
            fatal(tracker, code, message, wake);
            let _ = uw.shutdown().await;
            return Err(anyhow::Error::new(e).context("from the client"));
        }
        if terminate {
            let _ = uw.shutdown().await;
            return Ok(());
        }
        let n = tokio::select! {
            n = reader.fill(&mut cr) => n.context("reading from the client")?,
            // Something of cordon's for the server: sent at the loop's top.
            () = wake_up.notified() => continue,
        };
        if n == 0 {
            if reader.buffered() > 0 {
                bail!("protocol violation: the client closed mid-message ({} bytes of a message)", reader.buffered());
            }
            let _ = uw.shutdown().await;
            return Ok(());
        }
    }
}

/// Record a statement with its verdict (durably, before any of its result
/// reaches the client). A refused one is queued for its error in turn and
/// None is returned; in the extended protocol the rest up to Sync is
/// skipped.
fn admit(t: &mut Tracker, stmt: &Statement<'_>, verdict: Verdict, simple: bool, kind: DenyKind) -> Option<Admitted> {
    // An approval that was never settled must not let anything through.
    let verdict = match verdict {
        Verdict::Approve { rule, message } => {
            Verdict::Deny { rule, message: format!("{message}; it needs an approval it did not get") }
        }
        v => v,
    };
    let (admitted, written) = t.pipeline.statement(stmt, &verdict);
    let verdict = match written {
        Ok(wait) => {
            t.unconfirmed.extend(wait);
            verdict
        }
        // The log is down: nothing runs that cordon cannot record.
        Err(u) => {
            t.queue.push_back(Req::Denied { admitted, denied: Denied::audit(&u), simple });
            if !simple {
                t.skipping = true;
            }
            return None;
        }
    };
    match verdict {
        Verdict::Allow => Some(admitted),
        Verdict::Deny { rule, message } | Verdict::Approve { rule, message } => {
            t.queue.push_back(Req::Denied { admitted, denied: Denied { rule, message, kind }, simple });
            if !simple {
                t.skipping = true;
            }
            None
        }
    }
}

/// What happens to a client message.
pub(super) enum Forward {
    AsIs,
    /// The statement text was rewritten (mask at read).
    Rewritten(Bytes),
    /// Refused or skipped: not sent.
    Drop,
    /// Held for approval: nothing is sent until it is decided.
    Hold(Box<super::hold::Held>),
}

/// A Query message with new text.
pub(super) fn query_frame(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 6);
    out.put_u8(b'Q');
    out.put_i32((4 + text.len() + 1) as i32);
    out.put_slice(text.as_bytes());
    out.put_u8(0);
    out.freeze()
}

/// A Parse message with new text and the client's parameter types.
pub(super) fn parse_frame(name: &[u8], text: &str, rest: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(name.len() + text.len() + rest.len() + 7);
    out.put_u8(b'P');
    out.put_i32((4 + name.len() + 1 + text.len() + 1 + rest.len()) as i32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(text.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    out.freeze()
}

/// A message whose statement name is replaced: `tag`, then `head` (a
/// portal, or a Describe's kind) and its NUL unless it is one byte, the
/// new name, and the rest of the message as it came.
pub(super) fn renamed(tag: u8, head: &[u8], name: &str, rest: &[u8]) -> Bytes {
    let head_len = if tag == b'D' { head.len() } else { head.len() + 1 };
    let mut out = BytesMut::with_capacity(5 + head_len + name.len() + 1 + rest.len());
    out.put_u8(tag);
    out.put_i32((4 + head_len + name.len() + 1 + rest.len()) as i32);
    out.put_slice(head);
    if tag != b'D' {
        out.put_u8(0);
    }
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    out.freeze()
}

/// Handle one client message.
pub(super) fn on_client_frame(
    t: &mut Tracker,
    f: &Frame,
    ctx: &Ctx,
    prepared: Option<Reading>,
    lookup_error: Option<&anyhow::Error>,
) -> Result<Forward> {
    let mut b = Body::new(f.body());
    if t.skipping {
        if f.tag == b'S' {
            t.skipping = false;
            t.queue.push_back(Req::Sync);
            return Ok(Forward::AsIs);
        }
        return Ok(if f.tag == b'X' { Forward::AsIs } else { Forward::Drop });
    }
    let mut forward = Forward::AsIs;
    match f.tag {
        b'Q' => {
            let raw = b.cstr().context("protocol violation: Query without a terminated string")?;
            let text = String::from_utf8_lossy(raw).into_owned();
            let Assessed { verdict, facts, literals, notes, rewritten } =
                assess(t, ctx, raw, &text, prepared, lookup_error);
            let (verdict, decision, kind) = match verdict {
                Verdict::Approve { rule, message } => {
                    let need = super::hold::Need { rule, message };
                    match t.decision.take() {
                        None => {
                            return Ok(Forward::Hold(Box::new(super::hold::Held {
                                need: Arc::new(need),
                                text: Arc::from(text.as_str()),
                                literals: literals.into(),
                                params: Vec::new(),
                            })))
                        }
                        Some(s) => super::hold::settle(&need, s),
                    }
                }
                v => (v, None, DenyKind::Policy),
            };
            let stmt = Statement {
                text: &text,
                literals: &literals,
                kind: StatementKind::Simple,
                params: &[],
                prepared: None,
                approval: decision.as_ref(),
            };
            let Some(admitted) = admit(t, &stmt, verdict, true, kind) else { return Ok(Forward::Drop) };
            if facts.as_deref().is_some_and(|f| changes_catalog(f)) {
                if let Some(c) = &t.gov.catalog {
                    c.invalidate();
                }
            }
            let mut run = running(admitted);
            run.notes = notes;
            run.approved = matches!(decision, Some(crate::approvals::Decision::Approved { .. }));
            // A simple query drops the unnamed statement (PostgreSQL's
            // exec_simple_query): a later Bind of it must fail as it would.
            t.unnamed = None;
            // What goes upstream: the text (rewritten to mask at read), as
            // a prepared statement when it came before (see `prepare`).
            let upstream_text = rewritten.unwrap_or(text);
            let mut frames = BytesMut::new();
            if let Some(mut sent) = t.ups.send(&ctx.pg.prepare, &upstream_text, &mut frames) {
                forward = Forward::Rewritten(frames.freeze());
                sent.text = upstream_text;
                run.sent = Some(Box::new(sent));
            } else if upstream_text.as_bytes() != raw {
                forward = Forward::Rewritten(query_frame(&upstream_text));
            }
            t.queue.push_back(Req::Simple(Box::new(run)));
        }
        b'P' => {
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Parse without a name")?);
            reserved_name(t, &name, "Parse")?;
            let raw = b.cstr().context("protocol violation: Parse without a query")?;
            let text: Arc<str> = String::from_utf8_lossy(raw).into();
            let Assessed { verdict, facts, literals, notes, rewritten } =
                assess(t, ctx, raw, &text, prepared, lookup_error);
            let literals: Arc<[Literal]> = literals.into();
            let types = b.rest();
            if let Some(new_text) = &rewritten {
                forward = Forward::Rewritten(parse_frame(&name, new_text, types));
            }
            // Approval is asked for at each Execute, with its parameters.
            let approval = match verdict {
                Verdict::Approve { rule, message } => Some(Arc::new(super::hold::Need { rule, message })),
                Verdict::Allow => None,
                verdict @ Verdict::Deny { .. } => {
                    let stmt = Statement {
                        text: &text,
                        literals: &literals,
                        kind: StatementKind::Execute,
                        params: &[],
                        prepared: None,
                        approval: None,
                    };
                    admit(t, &stmt, verdict, false, DenyKind::Policy);
                    return Ok(Forward::Drop);
                }
            };
            if facts.as_deref().is_some_and(|f| changes_catalog(f)) {
                if let Some(c) = &t.gov.catalog {
                    c.invalidate();
                }
            }
            if t.prepared.len() >= MAX_NAMED && !t.prepared.contains_key(&name) {
                bail!("protocol violation: more than {MAX_NAMED} prepared statements in one session");
            }
            let label = (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned());
            t.next_gen += 1;
            let gen = t.next_gen;
            let mut req = Req::Parse { key: None, answered: false };
            if name.is_empty() {
                let upstream_text = rewritten.as_deref().unwrap_or(&text);
                let single_dml = facts.as_deref().is_some_and(
                    |f| matches!(f.as_slice(), [one] if matches!(one.kind, StmtKind::Read | StmtKind::Write)),
                );
                let how = if single_dml {
                    t.ups.parse_unnamed(upstream_text, types)
                } else {
                    crate::postgres::prepare::ParseAs::Unnamed
                };
                // While the unnamed statement stands for one of cordon's, the
                // server's own unnamed statement is closed: were the mapping
                // dropped (DEALLOCATE ALL, a stale statement), a Bind of it
                // must fail, never run an older text the session no longer
                // tracks (one that needs approval, say).
                let mut upstream = BytesMut::new();
                let close_unnamed = |t: &mut Tracker, upstream: &mut BytesMut| {
                    if std::mem::take(&mut t.server_unnamed) {
                        crate::postgres::prepare::close(upstream, "");
                        t.queue.push_back(Req::Internal);
                    }
                };
                forward = match how {
                    crate::postgres::prepare::ParseAs::Unnamed => {
                        t.unnamed = None;
                        t.server_unnamed = true;
                        forward
                    }
                    crate::postgres::prepare::ParseAs::Named { name: ours, key } => {
                        close_unnamed(t, &mut upstream);
                        for c in t.ups.take_closes() {
                            crate::postgres::prepare::close(&mut upstream, &c);
                            t.queue.push_back(Req::Internal);
                        }
                        upstream.extend_from_slice(&parse_frame(ours.as_bytes(), upstream_text, types));
                        req = Req::Parse { key: Some(key.clone()), answered: false };
                        t.unnamed = Some((ours, key));
                        Forward::Rewritten(upstream.freeze())
                    }
                    crate::postgres::prepare::ParseAs::Prepared { name: ours, key } => {
                        close_unnamed(t, &mut upstream);
                        req = Req::Parse { key: None, answered: true };
                        t.unnamed = Some((ours, key));
                        if upstream.is_empty() {
                            Forward::Drop
                        } else {
                            Forward::Rewritten(upstream.freeze())
                        }
                    }
                };
            }
            t.prepared.insert(name, Prepared { gen, text, label, described: None, notes, literals, approval });
            t.queue.push_back(req);
        }
        b'B' => {
            let portal = Bytes::copy_from_slice(b.cstr().context("protocol violation: Bind without a portal")?);
            let statement = Bytes::copy_from_slice(b.cstr().context("protocol violation: Bind without a statement")?);
            reserved_name(t, &statement, "Bind")?;
            // The unnamed statement may stand for one of cordon's upstream.
            let mut bind_key = None;
            if statement.is_empty() {
                if let Some((ours, key)) = &t.unnamed {
                    let rest = f.body().get(portal.len() + 2..).unwrap_or_default();
                    forward = Forward::Rewritten(renamed(b'B', &portal, ours, rest));
                    bind_key = Some(key.clone());
                }
            }
            let nfmt = b.i16().context("protocol violation: Bind without format count")?.max(0) as usize;
            let mut formats = Vec::with_capacity(nfmt.min(1024));
            for _ in 0..nfmt {
                formats.push(b.i16().context("protocol violation: Bind format codes cut short")? == 1);
            }
            let n = b.i16().context("protocol violation: Bind without parameter count")?.max(0) as usize;
            let mut params = Vec::with_capacity(n.min(1024));
            for i in 0..n {
                let len = b.i32().context("protocol violation: Bind parameters cut short")?;
                let v = if len < 0 {
                    None
                } else {
                    Some(Bytes::copy_from_slice(
                        b.bytes(len as usize).context("protocol violation: Bind parameter cut short")?,
                    ))
                };
                let binary = match formats.len() {
                    0 => false,
                    1 => formats.first().copied().unwrap_or(false),
                    _ => formats.get(i).copied().unwrap_or(false),
                };
                params.push((v, binary));
            }
            let nres = b.i16().unwrap_or(0).max(0) as usize;
            let mut result_formats = Vec::with_capacity(nres.min(1600));
            for _ in 0..nres {
                result_formats.push(b.i16().unwrap_or(0));
            }
            let (text, prepared, statement_gen, notes, literals, mut approval) = match t.prepared.get(&statement) {
                Some(p) => {
                    (p.text.clone(), p.label.clone(), p.gen, p.notes.clone(), p.literals.clone(), p.approval.clone())
                }
                None => {
                    (Arc::from("<unknown prepared statement>"), None, 0, Arc::default(), Arc::from(Vec::new()), None)
                }
            };
            // Values a workload binds are checked like the ones it types:
            // refused before they reach the server (and its logs).
            let verdict = sensitive_values(
                t,
                params.iter().filter_map(|(v, _)| v.as_deref().and_then(|v| std::str::from_utf8(v).ok())),
                "its parameters",
            );
            if let Verdict::Approve { rule, message } = &verdict {
                approval.get_or_insert_with(|| {
                    Arc::new(super::hold::Need { rule: rule.clone(), message: message.clone() })
                });
            } else if verdict != Verdict::Allow {
                let ps: Vec<Param<'_>> =
                    params.iter().map(|(v, bin)| Param { value: v.as_deref(), binary: *bin }).collect();
                let stmt = Statement {
                    text: &text,
                    literals: &literals,
                    kind: StatementKind::Execute,
                    params: &ps,
                    prepared: prepared.as_deref(),
                    approval: None,
                };
                admit(t, &stmt, verdict, false, DenyKind::Policy);
                return Ok(Forward::Drop);
            }
            if t.portals.len() >= MAX_NAMED && !t.portals.contains_key(&portal) {
                bail!("protocol violation: more than {MAX_NAMED} portals in one session");
            }
            t.next_gen += 1;
            let gen = t.next_gen;
            t.portals.insert(
                portal,
                Portal {
                    gen,
                    statement_gen,
                    text,
                    prepared,
                    statement,
                    params,
                    result_formats,
                    described: None,
                    notes,
                    literals,
                    approval,
                },
            );
            t.queue.push_back(Req::Bind { key: bind_key });
        }
        b'D' => {
            let kind = b.u8().context("protocol violation: Describe without a kind")?;
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Describe without a name")?);
            if kind == b'S' {
                reserved_name(t, &name, "Describe")?;
                if let (true, Some((ours, _))) = (name.is_empty(), &t.unnamed) {
                    forward = Forward::Rewritten(renamed(b'D', b"S", ours, &[]));
                }
            }
            let req = if kind == b'S' {
                let gen = t.prepared.get(&name).map_or(0, |p| p.gen);
                Req::DescribeStmt(name, gen)
            } else {
                let gen = t.portals.get(&name).map_or(0, |p| p.gen);
                Req::DescribePortal(name, gen)
            };
            t.queue.push_back(req);
        }
        b'E' => {
            let portal = Bytes::copy_from_slice(b.cstr().context("protocol violation: Execute without a portal")?);
            let (text, prepared, params, literals, approval) = match t.portals.get(&portal) {
                Some(p) => {
                    (p.text.clone(), p.prepared.clone(), p.params.clone(), p.literals.clone(), p.approval.clone())
                }
                None => (Arc::from("<unknown portal>"), None, Vec::new(), Arc::from(Vec::new()), None),
            };
            let (verdict, decision, kind) = match approval {
                None => (Verdict::Allow, None, DenyKind::Policy),
                Some(need) => match t.decision.take() {
                    None => return Ok(Forward::Hold(Box::new(super::hold::Held { need, text, literals, params }))),
                    Some(s) => super::hold::settle(&need, s),
                },
            };
            let ps: Vec<Param<'_>> =
                params.iter().map(|(v, bin)| Param { value: v.as_deref(), binary: *bin }).collect();
            let stmt = Statement {
                text: &text,
                literals: &literals,
                kind: StatementKind::Execute,
                params: &ps,
                prepared: prepared.as_deref(),
                approval: decision.as_ref(),
            };
            let Some(admitted) = admit(t, &stmt, verdict, false, kind) else { return Ok(Forward::Drop) };
            let mut run = running(admitted);
            run.approved = matches!(decision, Some(crate::approvals::Decision::Approved { .. }));
            run.portal_gen = t.portals.get(&portal).map_or(0, |p| p.gen);
            run.notes = t.portals.get(&portal).map_or_else(Arc::default, |p| p.notes.clone());
            run.portal = Some(portal);
            t.queue.push_back(Req::Exec(Box::new(run)));
        }
        b'F' => {
            let oid = b.i32().context("protocol violation: FunctionCall without an oid")?;
            let text = format!("<fast-path function call, oid {oid}>");
            // Fast-path calls name functions by OID only: the guardrails
            // cannot see which function runs, so they are refused unless the
            // profile allows dangerous functions.
            let verdict = if t.gov.profile.guardrails.dangerous_functions == guard::Outcome::Allow {
                Verdict::Allow
            } else {
                Verdict::Deny {
                    rule: "dangerous_function".into(),
                    message: "fast-path function calls cannot be inspected and are not allowed".into(),
                }
            };
            let stmt = Statement {
                text: &text,
                literals: &[],
                kind: StatementKind::FunctionCall,
                params: &[],
                prepared: None,
                approval: None,
            };
            let Some(admitted) = admit(t, &stmt, verdict, true, DenyKind::Policy) else { return Ok(Forward::Drop) };
            t.queue.push_back(Req::Func(Box::new(running(admitted))));
        }
        b'C' => {
            let kind = b.u8().context("protocol violation: Close without a kind")?;
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Close without a name")?);
            let statement = kind == b'S';
            if statement {
                reserved_name(t, &name, "Close")?;
            }
            // Closing the unnamed statement that stands for one of cordon's:
            // cordon's stays prepared; the Close goes on to the server's own
            // unnamed statement (already closed), which answers it.
            if statement && name.is_empty() {
                t.unnamed = None;
                t.server_unnamed = false;
            }
            let gen = if statement {
                t.prepared.get(&name).map_or(0, |p| p.gen)
            } else {
                t.portals.get(&name).map_or(0, |p| p.gen)
            };
            t.queue.push_back(Req::Close { statement, name, gen });
        }
        b'S' => t.queue.push_back(Req::Sync),
        b'H' | b'X' | b'd' | b'c' | b'f' | b'p' => {}
        other => bail!("protocol violation: unknown message type {:?} from the client", other as char),
    }
    Ok(forward)
}

/// A client's protocol message naming one of cordon's own prepared
/// statements ends the session: it could run or drop a statement cordon
/// judged for another text.
fn reserved_name(t: &mut Tracker, name: &[u8], message: &str) -> Result<()> {
    if !crate::postgres::prepare::reserved(name) {
        return Ok(());
    }
    let text = format!(
        "cordon: {message} names statement {:?}: {}; cordon's names start with {}, use another name",
        String::from_utf8_lossy(name),
        crate::postgres::prepare::RESERVED,
        crate::postgres::prepare::PREFIX
    );
    t.fatal = Some(("42501", text.clone()));
    bail!("{text}")
}

pub(super) fn running(admitted: Admitted) -> Running {
    Running {
        admitted,
        outcome: Outcome::default(),
        described: None,
        binary: Vec::new(),
        refused: None,
        copy_out: false,
        portal: None,
        portal_gen: 0,
        notes: Arc::default(),
        noticed: false,
        approved: false,
        read_masked_rows: 0,
        sent: None,
    }
}
