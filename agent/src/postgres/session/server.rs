//! The server's side of a session: each answer matched to the request at
//! the head of the FIFO, server text masked, refusals emitted in their
//! turn, the replies to what cordon sent on its own kept from the client.
//! Result descriptions and rows are `results.rs`.

use super::*;

pub(super) async fn server_to_client(
    mut ur: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut cw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
    (wake, wake_up): (&tokio::sync::Notify, &tokio::sync::Notify),
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut eof = false;
    loop {
        // The complete messages are handled where they lie in the read
        // buffer, then dropped from it.
        let (framed, err) = reader.complete();
        if let Some(e) = err {
            // What was framed before it is not delivered (it may be part of
            // a result cordon could not see whole); the client is told why.
            let (code, message) = framing_message(&e, "the server");
            out.clear();
            wire::error(&mut out, "FATAL", code, &message);
            let _ = cw.write_all(&out).await;
            let _ = cw.shutdown().await;
            return Err(anyhow::Error::new(e).context("from the server"));
        }
        let batch = reader.peek(framed);
        // Table OIDs in result descriptions, looked up before the lock.
        let lookup_error = resolve_result_tables(batch, tracker, ctx, cred).await.err();
        let fatal = {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            // cordon's own messages (a hold's notice) go out first.
            if !t.to_client.is_empty() {
                let mine = t.to_client.split();
                out.extend_from_slice(&mine);
            }
            for frame in crate::postgres::frame::frames(batch) {
                t.bytes_down += frame.bytes.len() as u64;
                on_server_frame(&mut t, frame, &mut out, ctx, lookup_error.as_ref());
            }
            drain_refusals(&mut t, &mut out);
            if !t.to_server.is_empty() {
                wake_up.notify_one();
            }
            t.last_activity = Instant::now();
            if t.desync {
                bail!("protocol violation: the server sent a row cordon cannot attribute to a statement (request tracking out of step); ending the session");
            }
            // The session ends with an error the client can read.
            t.fatal.take().inspect(|(code, message)| wire::error(&mut out, "FATAL", code, message))
        };
        reader.consume(framed);
        if !out.is_empty() {
            cw.write_all(&out).await.context("writing to the client")?;
            out.clear();
        }
        if let Some((_, message)) = fatal {
            let _ = cw.shutdown().await;
            bail!("{message}");
        }
        if eof {
            let _ = cw.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            n = reader.fill(&mut ur) => {
                if n.context("reading from the server")? == 0 {
                    eof = true;
                }
            }
            () = wake.notified() => {}
        }
    }
}

/// Emit what cordon answers itself that has reached the head of the
/// queue: refusals, and the ParseComplete of an unnamed statement that
/// stands for one of cordon's (none while a refused result is swallowed:
/// the client reads nothing more up to Sync).
pub(super) fn drain_refusals(t: &mut Tracker, out: &mut BytesMut) {
    loop {
        match t.queue.front() {
            Some(Req::Parse { answered: true, .. }) => {
                t.queue.pop_front();
                if !t.swallowing {
                    out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
                }
                continue;
            }
            Some(Req::Denied { .. }) => {}
            _ => break,
        }
        if let Some(Req::Denied { admitted, denied, simple }) = t.queue.pop_front() {
            refuse(out, &denied);
            if simple {
                ready_for_query(out, t.status);
            }
            let code = wire::sqlstate(denied.kind);
            let outcome = Outcome { denied: Some(denied), ..Outcome::default() };
            t.pipeline.notice(admitted.id, "error", serde_json::json!({"severity": "ERROR", "code": code, "message": outcome.denied.as_ref().map(|d| d.message.clone())}));
            t.pipeline.finish(&admitted, &outcome);
        }
    }
}

pub(super) fn refuse(out: &mut BytesMut, d: &Denied) {
    wire::error(out, "ERROR", wire::sqlstate(d.kind), &format!("cordon: {} (rule {})", d.message, d.rule));
}

pub(super) fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

pub(super) fn on_server_frame(
    t: &mut Tracker,
    f: FrameRef<'_>,
    out: &mut BytesMut,
    ctx: &Ctx,
    lookup_error: Option<&anyhow::Error>,
) {
    if f.tag == b'Z' && !t.started {
        startup_ready(t, f, out);
        return;
    }
    // Refusals queued before this response go out first.
    drain_refusals(t, out);
    // PostgreSQL's own words (a cast error echoing its input, a duplicate
    // key, a notification payload) pass the detectors like any value, held
    // ones too.
    let masked = matches!(f.tag, b'E' | b'N' | b'A')
        .then(|| crate::postgres::read_mask::mask_server_text(f.tag, f.body(), &t.gov.classifier, &t.gov.profile))
        .flatten();
    let f = masked.as_deref().map_or(f, |bytes| FrameRef { tag: f.tag, bytes });
    if probe_reply(t, f, ctx) || upstream_prepared_reply(t, f, out) {
        return;
    }
    // cordon's notices for the statement whose response this starts.
    if let Some(run) = current_run(t) {
        if !run.noticed {
            run.noticed = true;
            for n in &run.notes.notices {
                crate::postgres::read_mask::notice(out, n);
            }
        }
    }
    on_server_frame_inner(t, f, out, ctx, lookup_error)
}

/// The ReadyForQuery that ends the startup answers no request of the
/// client's: one the client sent before it (pipelined behind its startup
/// message) is answered after it. The backend probe goes out here, behind
/// whatever the client sent so far, so its answer comes in turn.
fn startup_ready(t: &mut Tracker, f: FrameRef<'_>, out: &mut BytesMut) {
    t.started = true;
    t.status = Body::new(f.body()).u8().unwrap_or(b'I');
    out.extend_from_slice(f.bytes);
    if let Some(Some(pid)) = t.probe_due.take() {
        t.to_server.extend_from_slice(&client::query_frame(crate::postgres::prepare::BACKEND_PROBE));
        t.queue.push_back(Req::Probe { startup: pid, pid: None });
    }
}

/// The answer to cordon's backend probe, kept from the client: preparing
/// upstream starts when the backend that answers is the one the server
/// named at startup (see `prepare`). True: the message was handled here.
fn probe_reply(t: &mut Tracker, f: FrameRef<'_>, ctx: &Ctx) -> bool {
    let Some(Req::Probe { startup, pid }) = t.queue.front_mut() else { return false };
    match f.tag {
        b'D' => {
            *pid = wire::data_row(f.body()).into_iter().next().flatten().and_then(|v| v.parse().ok());
        }
        b'T' | b'C' | b'E' | b'I' => {}
        b'Z' => {
            let same = *pid == Some(*startup);
            t.status = Body::new(f.body()).u8().unwrap_or(b'I');
            t.queue.pop_front();
            if same {
                t.ups.enable();
            } else if ctx.pg.first_pooled(ctx.upstream) {
                tracing::info!(
                    upstream = %ctx.upstream,
                    "the upstream answers from another backend than the one it named at startup (a connection pooler?): \
                     cordon prepares no statements there, so every statement is planned by the server"
                );
            }
        }
        // Asynchronous messages (a parameter change, a notice) are the
        // client's.
        _ => return false,
    }
    true
}

pub(super) fn on_server_frame_inner(
    t: &mut Tracker,
    f: FrameRef<'_>,
    out: &mut BytesMut,
    ctx: &Ctx,
    lookup_error: Option<&anyhow::Error>,
) {
    if t.swallowing && f.tag != b'Z' {
        // Results replaced by an error: drop until ReadyForQuery. Statements
        // still complete (and are finished) as the server reports them.
        swallow(t, f, out);
        return;
    }
    match f.tag {
        b'K' => {
            let mut b = Body::new(f.body());
            if let Some(pid) = b.i32() {
                if let Some(due) = &mut t.probe_due {
                    *due = Some(pid);
                }
                let real_key = b.rest().to_vec();
                let (my_pid, my_key) = ctx.pg.register_cancel(
                    CancelTarget { session: ctx.session.clone(), upstream: ctx.upstream, pid, key: real_key.clone() },
                    real_key.len(),
                );
                wire::backend_key(out, my_pid, &my_key);
                t.cancel = Some((my_pid, my_key));
                return;
            }
        }
        b'3' if matches!(t.queue.front(), Some(Req::Internal)) => {
            // cordon's own Close: not the client's to read.
            t.queue.pop_front();
            return;
        }
        b'1' | b'2' | b'3' => {
            // ParseComplete, BindComplete, CloseComplete.
            complete(t);
        }
        b't' => {}
        b'n' => {
            if matches!(t.queue.front(), Some(Req::DescribeStmt(..) | Req::DescribePortal(..))) {
                t.queue.pop_front();
            }
        }
        b'T' => {
            let fields = row_description(f.body());
            let names: Vec<String> = fields.iter().map(|c| c.name.clone()).collect();
            let described = describe(t, fields, lookup_error);
            match t.queue.front() {
                Some(Req::DescribeStmt(name, gen)) => {
                    let (name, gen) = (name.clone(), *gen);
                    if let Some(p) = t.prepared.get_mut(&name).filter(|p| p.gen == gen) {
                        p.described = Some(described);
                    }
                    t.queue.pop_front();
                }
                Some(Req::DescribePortal(name, gen)) => {
                    let (name, gen) = (name.clone(), *gen);
                    let mut statement = None;
                    if let Some(p) = t.portals.get_mut(&name).filter(|p| p.gen == gen) {
                        statement = Some((p.statement.clone(), p.statement_gen));
                        p.described = Some(described.clone());
                    }
                    // The row description belongs to the statement too: a
                    // driver that described a portal once (pgjdbc) binds the
                    // same named statement again and executes without a
                    // Describe. Later Binds apply their own result formats.
                    if let Some((stmt, stmt_gen)) = statement {
                        if let Some(p) = t.prepared.get_mut(&stmt).filter(|p| p.gen == stmt_gen) {
                            if p.described.is_none() {
                                let mut fields = described.fields.clone();
                                for f in &mut fields {
                                    f.binary = false;
                                }
                                p.described = Some(Arc::new(Described { fields, plan: described.plan.clone() }));
                            }
                        }
                    }
                    t.queue.pop_front();
                }
                Some(Req::Simple(_)) => {
                    let id = head_id(t);
                    if let Some(run) = current_run(t) {
                        // Rows of an earlier result of the same query are
                        // counted against its own description.
                        settle_read_masked(run);
                        run.binary = described.fields.iter().map(|f| f.binary).collect();
                        if let Some(d) = described.plan.deny.clone() {
                            run.refused = Some(d);
                        }
                        run.described = Some(described.clone());
                    }
                    if described.plan.deny.is_some() {
                        swallow_start(t);
                        return;
                    }
                    t.pipeline.columns(id, &names);
                }
                _ => {}
            }
        }
        b'D' => {
            resolve_portal_description(t);
            match data_row(t, f, out) {
                Ok(()) => {}
                Err(None) => t.desync = true,
                Err(Some(refused)) => {
                    if let Some(run) = current_run(t) {
                        run.refused = Some(refused);
                    }
                    swallow_start(t);
                }
            }
            return;
        }
        b'H' => {
            if let Some(run) = current_run(t) {
                run.copy_out = true;
            }
        }
        b'd' => {
            let detectors = t.gov.classifier.detectors;
            if detectors && current_run(t).is_some_and(|r| r.copy_out) {
                if let Some(bytes) = mask_copy_line(f.body(), t) {
                    if t.pipeline.wants_rows() {
                        let id = head_id(t);
                        let line = String::from_utf8_lossy(bytes.get(5..).unwrap_or_default())
                            .trim_end_matches('\n')
                            .to_string();
                        t.pipeline.row(id, &[Some(line)]);
                    }
                    out.extend_from_slice(&bytes);
                    return;
                }
            }
            if t.pipeline.wants_rows() {
                let id = head_id(t);
                let line = String::from_utf8_lossy(f.body()).trim_end_matches('\n').to_string();
                t.pipeline.row(id, &[Some(line)]);
            }
        }
        b'C' | b'I' | b's' => {
            let tag = if f.tag == b'C' {
                String::from_utf8_lossy(Body::new(f.body()).cstr().unwrap_or_default()).into_owned()
            } else {
                String::new()
            };
            // The server dropped every prepared statement, cordon's too.
            if tag == "DISCARD ALL" || tag == "DEALLOCATE ALL" {
                t.ups.cleared();
                t.unnamed = None;
            }
            let simple = matches!(t.queue.front(), Some(Req::Simple(_) | Req::Func(_)));
            if let Some(run) = current_run(t) {
                if f.tag == b's' {
                    run.outcome.suspended = true;
                }
                if let Some(n) = wire::tag_rows(&tag) {
                    if !(tag.starts_with("SELECT") || tag.starts_with("FETCH")) {
                        run.outcome.rows = run.outcome.rows.saturating_add(n);
                    }
                }
                if f.tag != b's' {
                    run.outcome.tags.push(tag);
                }
            }
            if !simple {
                if let Some(Req::Exec(run)) = t.queue.pop_front() {
                    finish_run(t, run);
                }
            }
        }
        b'E' => {
            let e = wire::server_error(f.body());
            let id = head_id(t);
            t.pipeline.notice(
                id,
                "error",
                serde_json::json!({"severity": e.severity, "code": e.code, "message": e.message}),
            );
            let simple = matches!(t.queue.front(), Some(Req::Simple(_) | Req::Func(_)));
            if let Some(run) = current_run(t) {
                run.outcome.error = Some(e.clone());
            }
            if !simple {
                // The failing request, then everything up to Sync is skipped.
                // An error answering Sync itself (a deferred constraint at
                // commit) leaves the Sync for its ReadyForQuery.
                if !matches!(t.queue.front(), Some(Req::Sync) | None) {
                    match t.queue.pop_front() {
                        Some(Req::Exec(run)) => finish_run(t, run),
                        Some(req) => upstream_failed(t, &req, Some(&e)),
                        None => {}
                    }
                    skip_to_sync(t);
                }
            }
        }
        b'N' => {
            let e = wire::server_error(f.body());
            let id = head_id(t);
            t.pipeline.notice(
                id,
                "notice",
                serde_json::json!({"severity": e.severity, "code": e.code, "message": e.message}),
            );
        }
        b'A' => {
            let mut b = Body::new(f.body());
            let pid = b.i32().unwrap_or(0);
            let channel = String::from_utf8_lossy(b.cstr().unwrap_or_default()).into_owned();
            let payload = String::from_utf8_lossy(b.cstr().unwrap_or_default()).into_owned();
            t.pipeline.notice(
                0,
                "notification",
                serde_json::json!({"pid": pid, "channel": channel, "payload": payload}),
            );
        }
        b'Z' => {
            t.status = Body::new(f.body()).u8().unwrap_or(b'I');
            if t.swallowing {
                t.swallowing = false;
            }
            ready(t, out);
        }
        _ => {}
    }
    out.extend_from_slice(f.bytes);
}

/// A simple query cordon sent as a prepared statement: the answers the
/// client did not ask for are dropped (ParseComplete, BindComplete,
/// CloseComplete, NoData), a failed Parse is forgotten, and a statement
/// that went stale (dropped by the workload's own DEALLOCATE in a function,
/// or a result type changed by DDL) is sent again as the simple query it
/// was, when nothing else is in flight and no transaction block is open.
/// True: the message was handled here.
fn upstream_prepared_reply(t: &mut Tracker, f: FrameRef<'_>, out: &mut BytesMut) -> bool {
    let Tracker { queue, ups, status, to_server, swallowing, .. } = t;
    let alone = queue.len() == 1;
    let Some(Req::Simple(run)) = queue.front_mut() else { return false };
    let retry_ok = alone && *status == b'I' && run.described.is_none() && run.outcome.rows == 0 && !*swallowing;
    let Some(sent) = run.sent.as_deref_mut() else { return false };
    match f.tag {
        b'1' => {
            sent.parsed = true;
            ups.confirmed(&sent.key);
            true
        }
        b'2' | b'3' | b'n' => true,
        b'E' => {
            let e = wire::server_error(f.body());
            let changed = stale_result(&e);
            // 26000 to a Bind of a statement prepared before: it is gone.
            let stale = changed || (e.code == "26000" && !sent.parse);
            if stale || (sent.parse && !sent.parsed) {
                ups.forget(&sent.key, changed);
            }
            if stale && !changed {
                // It vanished: this server may not keep statements between
                // transactions (a pooler the probe did not catch).
                ups.vanished();
            }
            if stale && retry_ok {
                sent.retrying = Some(Bytes::copy_from_slice(f.bytes));
                return true;
            }
            false
        }
        b'Z' => {
            let Some(error) = sent.retrying.take() else { return false };
            let now = Body::new(f.body()).u8().unwrap_or(b'I');
            if now == b'I' {
                to_server.extend_from_slice(&client::query_frame(&sent.text));
                run.sent = None;
                return true;
            }
            // Not retried after all: the client reads what happened.
            out.extend_from_slice(&error);
            false
        }
        _ => false,
    }
}

/// ReadyForQuery: ends a simple query (or function call), or everything up
/// to the first Sync.
pub(super) fn ready(t: &mut Tracker, out: &mut BytesMut) {
    match t.queue.front() {
        Some(Req::Simple(_) | Req::Func(_)) => {
            if let Some(Req::Simple(run) | Req::Func(run)) = t.queue.pop_front() {
                if let Some(d) = &run.refused {
                    refuse(out, d);
                }
                let mut run = run;
                if let Some(d) = run.refused.take() {
                    run.outcome.denied = Some(d);
                }
                finish_run(t, run);
            }
        }
        _ => loop {
            match t.queue.pop_front() {
                Some(Req::Sync) | None => break,
                Some(Req::Exec(mut run)) => {
                    run.outcome.skipped =
                        run.outcome.tags.is_empty() && run.outcome.error.is_none() && !run.outcome.suspended;
                    finish_run(t, run);
                }
                Some(Req::Denied { admitted, denied, .. }) => {
                    t.pipeline.finish(&admitted, &Outcome { denied: Some(denied), ..Outcome::default() });
                }
                Some(_) => {}
            }
        },
    }
}

/// Start dropping this statement's results; its error goes out when it
/// completes.
pub(super) fn swallow_start(t: &mut Tracker) {
    t.swallowing = true;
}

/// While swallowing: keep the books, forward nothing until ReadyForQuery.
pub(super) fn swallow(t: &mut Tracker, f: FrameRef<'_>, out: &mut BytesMut) {
    match f.tag {
        b'D' => {
            if let Some(run) = current_run(t) {
                run.outcome.rows += 1;
            }
        }
        b'C' | b'I' | b's' | b'E' => {
            if matches!(t.queue.front(), Some(Req::Exec(_))) {
                // Extended: answer this Execute with the refusal now; later
                // ones before Sync are not executed as far as the client knows.
                if let Some(Req::Exec(mut run)) = t.queue.pop_front() {
                    if let Some(d) = run.refused.take() {
                        refuse(out, &d);
                        run.outcome.denied = Some(d);
                    }
                    finish_run(t, run);
                }
            }
        }
        b'1' | b'2' | b'3' => complete(t),
        _ => {}
    }
}

/// ParseComplete, BindComplete or CloseComplete for the request at the
/// head; a confirmed Close forgets its statement or portal (unless a later
/// Parse or Bind already replaced it).
pub(super) fn complete(t: &mut Tracker) {
    if !matches!(t.queue.front(), Some(Req::Parse { .. } | Req::Bind { .. } | Req::Close { .. } | Req::Internal)) {
        return;
    }
    match t.queue.pop_front() {
        Some(Req::Parse { key: Some(key), .. }) => t.ups.confirmed(&key),
        Some(Req::Close { statement, name, gen }) => closed(t, statement, &name, gen),
        _ => {}
    }
}

/// A Close took effect: its statement or portal is forgotten, unless a
/// later Parse or Bind already replaced it.
fn closed(t: &mut Tracker, statement: bool, name: &Bytes, gen: u64) {
    if statement {
        if t.prepared.get(name).is_some_and(|p| p.gen == gen) {
            t.prepared.remove(name);
        }
    } else if t.portals.get(name).is_some_and(|p| p.gen == gen) {
        t.portals.remove(name);
    }
}

/// A request of the FIFO that never reached the server or failed there:
/// a statement of cordon's it was to create, or found stale, is forgotten.
fn upstream_failed(t: &mut Tracker, req: &Req, e: Option<&crate::pipeline::ServerError>) {
    match req {
        Req::Parse { key: Some(key), .. } => {
            t.ups.forget(key, false);
            if t.unnamed.as_ref().is_some_and(|(_, k)| k == key) {
                t.unnamed = None;
            }
        }
        Req::Bind { key: Some(key) } => {
            let changed = e.is_some_and(stale_result);
            if changed || e.is_some_and(|e| e.code == "26000") {
                t.ups.forget(key, changed);
                if !changed {
                    t.ups.vanished();
                }
                if t.unnamed.as_ref().is_some_and(|(_, k)| k == key) {
                    t.unnamed = None;
                }
            }
        }
        _ => {}
    }
}

/// PostgreSQL refusing a prepared statement whose result columns changed.
fn stale_result(e: &crate::pipeline::ServerError) -> bool {
    e.code == "0A000" && e.message.starts_with("cached plan must not change result type")
}

pub(super) fn skip_to_sync(t: &mut Tracker) {
    while !matches!(t.queue.front(), Some(Req::Sync) | None) {
        match t.queue.pop_front() {
            Some(req @ Req::Parse { .. }) => upstream_failed(t, &req, None),
            Some(Req::Exec(mut run)) => {
                run.outcome.skipped = true;
                finish_run(t, run);
            }
            Some(Req::Denied { admitted, denied, .. }) => {
                t.pipeline.finish(&admitted, &Outcome { denied: Some(denied), ..Outcome::default() });
            }
            _ => {}
        }
    }
}
