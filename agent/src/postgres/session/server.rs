//! The server's side of a session: each answer matched to the request at
//! the head of the FIFO, result descriptions classified, rows and server
//! text masked, refusals emitted in their turn.

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
    let mut frames = Vec::new();
    loop {
        frames.clear();
        let err = take_frames_into(&mut reader, &mut frames);
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
        // Table OIDs in result descriptions, looked up before the lock.
        let lookup_error = resolve_result_tables(&frames, tracker, ctx, cred).await.err();
        let fatal = {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            // cordon's own messages (a hold's notice) go out first.
            if !t.to_client.is_empty() {
                let mine = t.to_client.split();
                out.extend_from_slice(&mine);
            }
            for frame in &frames {
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

pub(super) async fn resolve_result_tables(
    frames: &[Frame],
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
) -> Result<()> {
    let oids: Vec<(u32, i16)> = frames
        .iter()
        .filter(|f| f.tag == b'T')
        .flat_map(|f| row_description(f.body()))
        .map(|f| (f.table_oid, f.attnum))
        .collect();
    if oids.iter().all(|(o, _)| *o == 0) {
        return Ok(());
    }
    let (Some(cred), Some(catalog)) = (cred, tracker.lock().ok().and_then(|t| t.gov.catalog.clone())) else {
        return Ok(());
    };
    catalog.resolve_oids(ctx, cred, &oids).await
}

pub(super) fn row_description(body: &[u8]) -> Vec<Field> {
    let mut b = Body::new(body);
    let n = b.i16().unwrap_or(0).max(0) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let Some(name) = b.cstr() else { break };
        let (Some(table_oid), Some(attnum), Some(type_oid), Some(_len), Some(typmod), Some(format)) =
            (b.i32(), b.i16(), b.i32(), b.i16(), b.i32(), b.i16())
        else {
            break;
        };
        out.push(Field {
            name: String::from_utf8_lossy(name).into_owned(),
            table_oid: table_oid as u32,
            attnum,
            type_oid: type_oid as u32,
            typmod,
            binary: format == 1,
        });
    }
    out
}

/// Classify a result description into a plan.
pub(super) fn describe(t: &Tracker, fields: Vec<Field>, lookup_error: Option<&anyhow::Error>) -> Arc<Described> {
    let g = &t.gov;
    // A statement released (or to be released) by approval reads the
    // labels sent for approval in clear; any other, as the profile says.
    let profile = match &g.approved {
        Some(p) if head_approved(t) => p,
        _ => &g.profile,
    };
    let cols: Vec<ColumnDesc> = fields
        .iter()
        .map(|f| {
            let ty = types::value_type(f.type_oid, f.typmod);
            let source = if f.table_oid == 0 {
                Source::Computed
            } else if let Some(e) = lookup_error {
                Source::Unresolved(format!("the catalog lookup failed: {e:#}"))
            } else {
                match g.catalog.as_ref() {
                    // Passthrough: no catalog session; policy rules cannot
                    // name the column, detectors still run.
                    None => Source::Computed,
                    Some(c) => match c
                        .table(f.table_oid)
                        .and_then(|ti| ti.column(f.attnum).map(|col| (ti.clone(), col.clone())))
                    {
                        Some((ti, col)) => Source::Table {
                            db: ti.db.clone(),
                            schema: ti.schema.clone(),
                            table: ti.name.clone(),
                            column: col.name.clone(),
                            db_label: g.classifier.labels.from_comment(&col.labels_text),
                            table_db_label: g.classifier.labels.from_comment(&ti.labels_text),
                        },
                        None => Source::Unresolved(format!("table OID {} is not in the catalog", f.table_oid)),
                    },
                }
            };
            // A masked binary value must be writable in the binary format;
            // the plan refuses a column where it is not.
            let encodable = !f.binary
                || types::text_to_binary(f.type_oid, &crate::pipeline::mask::redact(ty).unwrap_or_default()).is_some();
            ColumnDesc { name: f.name.clone(), source, ty, encodable }
        })
        .collect();
    let plan = plan::plan(&cols, &g.classifier, profile, g.key.is_some());
    Arc::new(Described { fields, plan: Arc::new(plan) })
}

/// Whether the request at the head of the FIFO is approved or is held at
/// each execution (its description then applies to approved runs only).
fn head_approved(t: &Tracker) -> bool {
    match t.queue.front() {
        Some(Req::Exec(r) | Req::Simple(r) | Req::Func(r)) => r.approved,
        Some(Req::DescribeStmt(name, gen)) => {
            t.prepared.get(name).is_some_and(|p| p.gen == *gen && p.approval.is_some())
        }
        Some(Req::DescribePortal(name, gen)) => {
            t.portals.get(name).is_some_and(|p| p.gen == *gen && p.approval.is_some())
        }
        _ => false,
    }
}

/// An Execute's description: its portal's own (Describe P), else its
/// statement's (Describe S) with the Bind's result formats.
pub(super) fn resolve_portal_description(t: &mut Tracker) {
    let Some(Req::Exec(run)) = t.queue.front() else { return };
    if run.described.is_some() {
        return;
    }
    let want = run.portal_gen;
    let Some(p) = run.portal.as_ref().and_then(|name| t.portals.get(name)).filter(|p| p.gen == want) else { return };
    let described = p.described.clone().or_else(|| {
        t.prepared.get(&p.statement).filter(|s| s.gen == p.statement_gen).and_then(|s| s.described.clone())
    });
    let n = described.as_ref().map_or(0, |d| d.fields.len());
    let binary: Vec<bool> = match (&p.described, p.result_formats.len()) {
        (Some(d), _) => d.fields.iter().map(|f| f.binary).collect(),
        (None, 0) => vec![false; n],
        (None, 1) => vec![p.result_formats.first() == Some(&1); n],
        (None, _) => (0..n).map(|i| p.result_formats.get(i) == Some(&1)).collect(),
    };
    if let Some(Req::Exec(run)) = t.queue.front_mut() {
        run.described = described;
        run.binary = binary;
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
    f: &Frame,
    out: &mut BytesMut,
    ctx: &Ctx,
    lookup_error: Option<&anyhow::Error>,
) {
    // Refusals queued before this response go out first.
    drain_refusals(t, out);
    // PostgreSQL's own words (a cast error echoing its input, a duplicate
    // key, a notification payload) pass the detectors like any value, held
    // ones too.
    let masked = matches!(f.tag, b'E' | b'N' | b'A')
        .then(|| crate::postgres::read_mask::mask_server_text(f.tag, f.body(), &t.gov.classifier, &t.gov.profile))
        .flatten()
        .map(|bytes| Frame { tag: f.tag, bytes });
    let f = masked.as_ref().unwrap_or(f);
    if upstream_prepared_reply(t, f, out) {
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

pub(super) fn on_server_frame_inner(
    t: &mut Tracker,
    f: &Frame,
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
    out.extend_from_slice(&f.bytes);
}

/// A simple query cordon sent as a prepared statement: the answers the
/// client did not ask for are dropped (ParseComplete, BindComplete,
/// CloseComplete, NoData), a failed Parse is forgotten, and a statement
/// that went stale (dropped by the workload's own DEALLOCATE in a function,
/// or a result type changed by DDL) is sent again as the simple query it
/// was, when nothing else is in flight and no transaction block is open.
/// True: the message was handled here.
fn upstream_prepared_reply(t: &mut Tracker, f: &Frame, out: &mut BytesMut) -> bool {
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
            if stale && retry_ok {
                sent.retrying = Some(f.bytes.clone());
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
pub(super) fn swallow(t: &mut Tracker, f: &Frame, out: &mut BytesMut) {
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

/// One DataRow of the statement at the head: checked against its
/// description, masked, recorded if asked, and copied out. Err(None): a row
/// cordon cannot attribute to a statement; Err(Some): the result is refused.
/// This runs once per row: it borrows what it needs from the tracker and
/// allocates nothing for a row that passes unchanged.
fn data_row(t: &mut Tracker, f: &Frame, out: &mut BytesMut) -> std::result::Result<(), Option<Denied>> {
    let Tracker { queue, gov, row_values, pipeline, .. } = t;
    let Some(Req::Exec(run) | Req::Simple(run) | Req::Func(run)) = queue.front_mut() else {
        // The books are out of step with the server. Never pass it on unread.
        return Err(None);
    };
    let run: &mut Running = run;
    run.outcome.rows = run.outcome.rows.saturating_add(1);
    let Some(described) = run.described.as_deref() else {
        // Rows with no description at all (the client never asked for one):
        // cordon cannot classify them, so they do not pass.
        return Err(Some(Denied::policy(
            "classification",
            "result rows arrived without a row description; describe the statement or portal",
        )));
    };
    if let Some(d) = &described.plan.deny {
        return Err(Some(d.clone()));
    }
    let columns = Body::new(f.body()).i16().unwrap_or(-1);
    if usize::try_from(columns).ok() != Some(described.fields.len()) {
        return Err(Some(Denied::policy("classification", "a result row does not match its row description")));
    }
    // Counted per description, not per row (see `settle_read_masked`).
    run.read_masked_rows += 1;
    let rewritten = if described.plan.active() {
        mask_row(f.body(), described, &run.binary, gov, &mut run.outcome.masked, row_values)
    } else {
        Ok(None)
    };
    // An unchanged row is copied out from the frame as it came.
    let bytes: &[u8] = match &rewritten {
        Ok(Some(b)) => b,
        Ok(None) => &f.bytes,
        Err(e) => return Err(Some(Denied::policy("mask", e.clone()))),
    };
    if pipeline.wants_rows() {
        pipeline.row(run.admitted.id, &wire::data_row(bytes.get(5..).unwrap_or_default()));
    }
    out.extend_from_slice(bytes);
    Ok(())
}

/// Values PostgreSQL masked as it read them (mask at read) are counted for
/// every result column computed from a masked one, by name: once per
/// description for the rows that passed under it, not per row.
pub(super) fn settle_read_masked(run: &mut Running) {
    let rows = std::mem::take(&mut run.read_masked_rows);
    let Some(described) = run.described.as_deref() else { return };
    if rows == 0 {
        return;
    }
    for m in &run.notes.masked {
        let col = m.split('/').next().unwrap_or_default();
        if described.fields.iter().any(|f| f.table_oid == 0 && f.name == col) {
            match run.outcome.masked.get_mut(m) {
                Some(n) => *n += rows,
                None => {
                    run.outcome.masked.insert(m.clone(), rows);
                }
            }
        }
    }
}

/// Rewrite a DataRow with masked values; Ok(None) when nothing changed.
/// `spans` is the session's scratch for the row's value positions (reused
/// row after row: a large result allocates nothing for the rows it passes).
pub(super) fn mask_row(
    body: &[u8],
    d: &Described,
    binary: &[bool],
    g: &Governance,
    counts: &mut BTreeMap<String, u64>,
    spans: &mut Vec<Option<(usize, usize)>>,
) -> std::result::Result<Option<Bytes>, String> {
    let mut b = Body::new(body);
    let n = b.i16().ok_or("a DataRow without a column count")?.max(0) as usize;
    spans.clear();
    for _ in 0..n {
        let len = b.i32().ok_or("a DataRow cut short")?;
        spans.push(if len < 0 {
            None
        } else {
            let start = body.len() - b.remaining();
            b.bytes(len as usize).ok_or("a DataRow value cut short")?;
            Some((start, len as usize))
        });
    }
    let value = |i: usize| -> Option<&[u8]> {
        spans.get(i).copied().flatten().and_then(|(start, len)| body.get(start..start.checked_add(len)?))
    };
    // Only a row that changes allocates its replacements.
    let mut changed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
    for (i, action) in d.plan.cols.iter().enumerate() {
        if *action == ColAction::Keep {
            continue;
        }
        let (Some(v), Some(field)) = (value(i), d.fields.get(i)) else { continue };
        let is_binary = binary.get(i).copied().unwrap_or(false);
        let ty = types::value_type(field.type_oid, field.typmod);
        let text: std::borrow::Cow<'_, str> = if is_binary {
            match types::binary_to_text(field.type_oid, v) {
                Some(t) => t.into(),
                // Masking by constant needs no reading; detection does.
                None if matches!(action, ColAction::Mask { .. }) => "".into(),
                None => continue,
            }
        } else {
            match std::str::from_utf8(v) {
                Ok(s) => s.into(),
                // Not readable: masked whole rather than passed unread.
                Err(_) => match action {
                    ColAction::Mask { .. } => "".into(),
                    _ => {
                        let redacted =
                            crate::pipeline::mask::redact(ty).map_err(|e| format!("column {:?}: {e}", field.name))?;
                        changed.push((i, Some(redacted.into_bytes())));
                        continue;
                    }
                },
            }
        };
        let masked = plan::apply(action, ty, &text, &g.classifier, &g.profile, g.key.as_deref(), counts)
            .map_err(|e| format!("column {:?}: {e}", field.name))?;
        if let Some(m) = masked {
            let bytes = match m {
                None => None,
                Some(s) if is_binary => Some(
                    types::text_to_binary(field.type_oid, &s)
                        .ok_or_else(|| format!("column {:?}: cannot encode the masked value in binary", field.name))?,
                ),
                Some(s) => Some(s.into_bytes()),
            };
            changed.push((i, bytes));
        }
    }
    if changed.is_empty() {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(body.len() + 32);
    out.put_u8(b'D');
    out.put_i32(0);
    out.put_i16(n as i16);
    for i in 0..n {
        let v: Option<&[u8]> = match changed.iter().find(|(c, _)| *c == i) {
            Some((_, c)) => c.as_deref(),
            None => value(i),
        };
        match v {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
    let len = (out.len() - 1) as i32;
    if let Some(slot) = out.get_mut(1..5) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
    Ok(Some(out.freeze()))
}

/// COPY TO STDOUT text lines: detected spans are masked field by field.
pub(super) fn mask_copy_line(body: &[u8], t: &mut Tracker) -> Option<Bytes> {
    let line = std::str::from_utf8(body).ok()?;
    let g = &t.gov;
    let mut counts = BTreeMap::new();
    let mut changed = false;
    let fields: Vec<String> = line
        .split('\t')
        .map(|field| {
            let action = ColAction::Detect { ctx: Default::default(), counter: "copy".into() };
            let ty = ValueType::Text { max_chars: None, fixed: false };
            match plan::apply(&action, ty, field, &g.classifier, &g.profile, None, &mut counts) {
                Ok(Some(Some(m))) => {
                    changed = true;
                    m
                }
                _ => field.to_string(),
            }
        })
        .collect();
    if !changed {
        return None;
    }
    if let Some(run) = current_run(t) {
        for (k, v) in counts {
            *run.outcome.masked.entry(k).or_default() += v;
        }
    }
    let text = fields.join("\t");
    let mut out = BytesMut::with_capacity(text.len() + 5);
    out.put_u8(b'd');
    out.put_i32((text.len() + 4) as i32);
    out.put_slice(text.as_bytes());
    Some(out.freeze())
}
