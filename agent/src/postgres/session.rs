//! The PostgreSQL session after authentication: both directions relayed at
//! once, statements judged and recorded by the pipeline, results masked on
//! their way back.
//!
//! Two loops share one `Tracker` behind a mutex, held only while a batch of
//! frames is examined and never across I/O. One loop reads the client and
//! one the server, so neither side can stall the other, and each loop writes
//! its whole batch in one call. Lookups that need I/O (the catalog) are done
//! for a whole batch before the lock is taken.
//!
//! The tracker keeps a FIFO of the client's requests in order (Parse, Bind,
//! Describe, Execute, Sync, Query…). Each server message is matched to the
//! request at the head, so a DataRow always meets the mask plan of the
//! statement that produced it. A denied statement never reaches the server:
//! its ErrorResponse (SQLSTATE 42501, naming the rule) waits in the FIFO for
//! its turn. Extended-protocol messages are then skipped until Sync, and the
//! server's ReadyForQuery carries the real transaction status.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::{
    catalog::Catalog,
    frame::{Body, Frame, FrameReader},
    read_mask::ReadNotes,
    startup::ClientHello,
    types, upstream, wire, CancelTarget, Ctx, End,
};
use crate::{
    config::{PgAuth, Profile},
    net::Stream,
    pipeline::{
        classify::Classifier,
        guard::{self, LabelLookup, StmtFacts, StmtKind, TableRef},
        literals::Literal,
        mask::ValueType,
        plan::{self, ColAction, ColumnDesc, Plan, Source},
        recorder, Admitted, Denied, Outcome, Param, SessionPipeline, Statement, StatementKind, Verdict,
    },
    secrets::Credential,
};

/// Most prepared statements / portals one session may hold.
const MAX_NAMED: usize = 100_000;

/// One column of a RowDescription.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    table_oid: u32,
    attnum: i16,
    type_oid: u32,
    typmod: i32,
    binary: bool,
}

/// A result description with its mask plan.
#[derive(Debug, Clone)]
struct Described {
    fields: Vec<Field>,
    plan: Arc<Plan>,
}

struct Prepared {
    /// Which Parse this is: a Describe answer applies only to the
    /// statement that was current when the Describe was sent.
    gen: u64,
    text: Arc<str>,
    label: Option<String>,
    described: Option<Arc<Described>>,
    /// cordon's notices for each execution (mask at read).
    notes: Arc<ReadNotes>,
    /// The literals in `text`, for the records.
    literals: Arc<[Literal]>,
}

struct Portal {
    gen: u64,
    /// The statement's generation when it was bound.
    statement_gen: u64,
    text: Arc<str>,
    prepared: Option<String>,
    statement: Bytes,
    params: Vec<(Option<Bytes>, bool)>,
    result_formats: Vec<i16>,
    described: Option<Arc<Described>>,
    notes: Arc<ReadNotes>,
    literals: Arc<[Literal]>,
}

/// A statement whose results are on their way.
struct Running {
    admitted: Admitted,
    outcome: Outcome,
    /// The plan and per-column binary flags for DataRows (None: not yet known).
    described: Option<Arc<Described>>,
    binary: Vec<bool>,
    /// Results refused after the fact (a denied label): swallow them and
    /// answer with this error instead.
    refused: Option<Denied>,
    copy_out: bool,
    /// The portal an Execute runs (its description may arrive after the
    /// Execute was sent, from a Describe earlier in the same batch).
    portal: Option<Bytes>,
    /// The portal's generation when the Execute was sent.
    portal_gen: u64,
    /// cordon's notices (sent before the first response) and what the
    /// rewrite masked.
    notes: Arc<ReadNotes>,
    noticed: bool,
}

enum Req {
    Parse,
    Bind,
    /// Closing a statement (true) or portal, forgotten when the server
    /// confirms: results of an Execute sent before the Close still need
    /// its description (sqlx sends Bind, Execute, Close, Sync).
    Close {
        statement: bool,
        name: Bytes,
        gen: u64,
    },
    DescribeStmt(Bytes, u64),
    DescribePortal(Bytes, u64),
    Exec(Box<Running>),
    Simple(Box<Running>),
    Func(Box<Running>),
    Sync,
    /// Refused by cordon: the error to send when its turn comes, and for a
    /// simple query the ReadyForQuery that follows it.
    Denied {
        admitted: Admitted,
        denied: Denied,
        simple: bool,
    },
}

struct Governance {
    classifier: Arc<Classifier>,
    profile: Profile,
    catalog: Option<Arc<Catalog>>,
    db: String,
    key: Option<Vec<u8>>,
}

struct Tracker {
    pipeline: SessionPipeline,
    gov: Governance,
    prepared: HashMap<Bytes, Prepared>,
    portals: HashMap<Bytes, Portal>,
    queue: VecDeque<Req>,
    unconfirmed: Vec<crate::audit::Pending>,
    cancel: Option<(i32, Vec<u8>)>,
    bytes_up: u64,
    bytes_down: u64,
    last_activity: Instant,
    /// Transaction status from the server's last ReadyForQuery.
    status: u8,
    /// After a refused extended-protocol message: drop until Sync.
    skipping: bool,
    /// After an error replaced a result: drop server messages until the
    /// next ReadyForQuery.
    swallowing: bool,
    /// The request FIFO lost step with the server: the session ends.
    desync: bool,
    /// Generation counter for Parse and Bind.
    next_gen: u64,
}

pub async fn run(mut hello: ClientHello, ctx: &Ctx) -> End {
    let client_tls = hello.stream.is_tls();
    let database = hello
        .params
        .iter()
        .find(|(k, _)| k == "database")
        .or_else(|| hello.params.iter().find(|(k, _)| k == "user"))
        .map(|(_, v)| v.clone());
    let mut end = End { client_tls, database: database.clone(), ..End::default() };
    let up = match upstream::start(&mut hello, ctx).await {
        Ok(u) => u,
        Err(e) => {
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
    let open = ctx.open_durable.lock().ok().and_then(|mut p| p.take());
    if let Some(p) = open {
        if let Err(e) = p.durable().await {
            end.outcome = "audit_failed";
            end.error = Some(format!("{e:#}"));
            return end;
        }
    }

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
    let db = database.unwrap_or_default();
    let credential = credential(ctx);
    let gov = Governance {
        classifier: ctx.shared.policy().classifier.clone(),
        profile: ctx.profile.clone(),
        catalog: credential.as_ref().map(|_| ctx.shared.catalog(ctx.upstream, &db)),
        db,
        key: ctx.shared.secrets().pseudonym_key.as_ref().map(|k| k.expose().as_bytes().to_vec()),
    };
    let pipeline = SessionPipeline::new(
        ctx.shared.audit.clone(),
        &ctx.session,
        ctx.profile.record,
        ctx.shared.literal_key(),
        recorder,
    );
    let tracker = Arc::new(Mutex::new(Tracker {
        pipeline,
        gov,
        prepared: HashMap::new(),
        portals: HashMap::new(),
        queue: VecDeque::new(),
        unconfirmed: Vec::new(),
        cancel: None,
        bytes_up: 0,
        bytes_down: 0,
        last_activity: Instant::now(),
        status: b'I',
        skipping: false,
        swallowing: false,
        desync: false,
        next_gen: 0,
    }));

    let wake = tokio::sync::Notify::new();
    let (cr, cw) = tokio::io::split(hello.stream);
    let (ur, uw) = tokio::io::split(up.stream);
    let c2s = client_to_server(cr, hello.reader, uw, &tracker, ctx, credential.as_ref(), &wake);
    let s2c = server_to_client(ur, up.reader, cw, &tracker, ctx, credential.as_ref(), &wake);
    tokio::pin!(c2s, s2c);
    let idle = ctx.shared.idle_timeout();
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    let result: Result<&'static str> = loop {
        tokio::select! {
            r = &mut c2s => match r {
                // The client finished: let the server's last words through.
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
    let open: Vec<Req> = t.queue.drain(..).collect();
    for r in open {
        match r {
            Req::Exec(run) | Req::Simple(run) | Req::Func(run) => {
                let mut o = run.outcome;
                o.skipped = o.tags.is_empty() && o.error.is_none();
                t.pipeline.finish(&run.admitted, &o);
            }
            Req::Denied { admitted, denied, .. } => {
                let o = Outcome { denied: Some(denied), ..Outcome::default() };
                t.pipeline.finish(&admitted, &o);
            }
            _ => {}
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
                || format!("{e:#}").contains("protocol violation")
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

/// The credential cordon reads the catalog with: the injected one.
fn credential(ctx: &Ctx) -> Option<Credential> {
    match ctx.rule.postgres.as_ref().map(|p| &p.auth) {
        Some(PgAuth::Inject { credentials }) => ctx.shared.secrets().get(credentials).cloned(),
        _ => None,
    }
}

fn take_frames(reader: &mut FrameReader) -> (Vec<Frame>, Option<anyhow::Error>) {
    let mut frames = Vec::new();
    loop {
        match reader.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e.into())),
        }
    }
}

async fn client_to_server(
    mut cr: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut uw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
    wake: &tokio::sync::Notify,
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let (frames, violation) = take_frames(&mut reader);
        // Look up, before taking the lock, the tables these statements touch.
        let lookup_error = resolve_statement_tables(&frames, tracker, ctx, cred).await.err();
        let mut terminate = false;
        let mut denied_any = false;
        {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            for frame in &frames {
                t.bytes_up += frame.bytes.len() as u64;
                match on_client_frame(&mut t, frame, ctx, lookup_error.as_ref())? {
                    Forward::AsIs => out.extend_from_slice(&frame.bytes),
                    Forward::Rewritten(b) => out.extend_from_slice(&b),
                    Forward::Drop => denied_any = true,
                }
                if frame.tag == b'X' {
                    terminate = true;
                }
            }
            t.last_activity = Instant::now();
        }
        if denied_any {
            wake.notify_one();
        }
        if !out.is_empty() {
            uw.write_all(&out).await.context("writing to the server")?;
            out.clear();
        }
        if let Some(e) = violation {
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
    }
}

/// The SQL text of a Query or Parse message.
fn sql_of(f: &Frame) -> Option<String> {
    let mut b = Body::new(f.body());
    match f.tag {
        b'Q' => Some(String::from_utf8_lossy(b.cstr()?).into_owned()),
        b'P' => {
            b.cstr()?;
            Some(String::from_utf8_lossy(b.cstr()?).into_owned())
        }
        _ => None,
    }
}

async fn resolve_statement_tables(
    frames: &[Frame],
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
) -> Result<()> {
    let (Some(cred), Some(catalog)) = (cred, tracker.lock().ok().and_then(|t| t.gov.catalog.clone())) else {
        return Ok(());
    };
    let mut tables = Vec::new();
    let mut functions = Vec::new();
    let mut operators = Vec::new();
    for f in frames {
        let Some(sql) = sql_of(f) else { continue };
        if let Ok(facts) = ctx.shared.sql.analyse(&sql) {
            for s in facts.iter() {
                tables.extend(s.reads.iter().cloned());
                tables.extend(s.writes.iter().map(|(t, _)| t.clone()));
                functions.extend(s.calls.iter().map(|(_, n)| n.clone()));
                operators.extend(s.operators.iter().cloned());
            }
        }
    }
    if !functions.is_empty() || !operators.is_empty() {
        functions.sort();
        functions.dedup();
        operators.sort();
        operators.dedup();
        catalog.resolve_code(ctx, cred, &functions, &operators).await?;
    }
    if tables.is_empty() {
        return Ok(());
    }
    super::read_mask::resolve(&catalog, ctx, cred, tables).await
}

/// Labels for the guardrails, from the catalog cache and the policy.
struct Lookup<'a>(&'a Governance);

impl Lookup<'_> {
    fn info(&self, t: &TableRef) -> Option<Arc<super::catalog::TableInfo>> {
        self.0.catalog.as_ref()?.by_name(t).flatten()
    }
}

impl LabelLookup for Lookup<'_> {
    fn table_label(&self, t: &TableRef) -> Option<usize> {
        let c = &self.0.classifier;
        match self.info(t) {
            Some(i) => c.table(&i.db, &i.schema, &i.name, c.labels.from_comment(&i.labels_text)),
            None => c.table(&self.0.db, t.schema.as_deref().unwrap_or("public"), &t.name, None),
        }
    }
    fn column_labels(&self, t: &TableRef) -> Vec<(String, usize)> {
        let c = &self.0.classifier;
        let Some(i) = self.info(t) else { return Vec::new() };
        i.columns
            .iter()
            .filter_map(|col| {
                c.column(&i.db, &i.schema, &i.name, &col.name, c.labels.from_comment(&col.labels_text))
                    .map(|l| (col.name.clone(), l.label))
            })
            .collect()
    }
    fn label_name(&self, rank: usize) -> String {
        self.0.classifier.labels.name(rank).to_string()
    }
    fn user_function(&self, schema: Option<&str>, name: &str) -> Option<guard::UserCode> {
        let found = self.0.catalog.as_ref()?.user_code('f', name)?;
        user_code(&found, schema)
    }
    fn user_operator(&self, name: &str) -> Option<guard::UserCode> {
        let found = self.0.catalog.as_ref()?.user_code('o', name)?;
        user_code(&found, None)
    }
    fn protects_anything(&self) -> bool {
        self.0.profile.protects_anything()
    }
}

/// The user-defined definitions a name may reach: in the schema written,
/// or in any schema when unqualified (overloads resolve by argument types,
/// which cordon does not know; any of them may be the one called).
fn user_code(found: &[super::catalog::UserCodeInfo], schema: Option<&str>) -> Option<guard::UserCode> {
    let mut hits = found.iter().filter(|f| schema.is_none_or(|s| s == f.schema)).peekable();
    let first = hits.peek().map(|f| format!("{}.{}", f.schema, f.name))?;
    let may_write = hits.any(|f| f.may_write);
    Some(guard::UserCode { qualified: first, may_write })
}

/// The guardrails' verdict on a statement text.
fn judge(
    t: &Tracker,
    ctx: &Ctx,
    sql: &str,
    lookup_error: Option<&anyhow::Error>,
) -> (Verdict, Option<Arc<Vec<StmtFacts>>>) {
    let facts = match ctx.shared.sql.analyse(sql) {
        Ok(f) => f,
        Err(e) => {
            let v = Verdict::Deny {
                rule: "parse_error".into(),
                message: format!("the statement does not parse ({e}); cordon lets through only what it can read"),
            };
            return (v, None);
        }
    };
    if let Some(e) = lookup_error {
        let v = Verdict::Deny {
            rule: "catalog".into(),
            message: format!("cannot read the database catalog to classify this statement: {e:#}"),
        };
        return (v, Some(facts));
    }
    let lookup = Lookup(&t.gov);
    let verdict = guard::check(&t.gov.profile.guardrails, &facts, &lookup);
    (verdict, Some(facts))
}

fn not_utf8() -> Verdict {
    Verdict::Deny {
        rule: "encoding".into(),
        message: "the statement is not valid UTF-8; the session's client_encoding is UTF8".into(),
    }
}

fn changes_catalog(facts: &[StmtFacts]) -> bool {
    facts.iter().any(|s| matches!(s.kind, StmtKind::Ddl { .. }))
}

/// `sensitive_literals`: a statement whose literals or parameters carry
/// what the detectors flag (a card, an SSN, a cloud or private key) at or
/// above the profile's minimum label.
fn sensitive_values<'a>(t: &Tracker, values: impl IntoIterator<Item = &'a str>, what: &str) -> Verdict {
    let g = &t.gov.profile.guardrails;
    if g.sensitive_literals == guard::Outcome::Allow {
        return Verdict::Allow;
    }
    match crate::pipeline::literals::sensitive(values, &t.gov.classifier, g.sensitive_literals_min_label) {
        Some(kind) => guard::fire(
            g.sensitive_literals,
            "sensitive_literals",
            format!(
                "the statement carries a {} in {what}; this profile does not send such values to the database (they would land in its logs and pg_stat_activity)",
                kind.name()
            ),
        )
        .unwrap_or(Verdict::Allow),
        None => Verdict::Allow,
    }
}

/// Literals compared with or written to a labeled column are recorded as
/// hashes too (record_text = "redacted"), whatever the detectors say.
fn mark_labeled(t: &Tracker, facts: Option<&[StmtFacts]>, text: &str, literals: &mut [Literal]) {
    let Some(facts) = facts else { return };
    if literals.is_empty() {
        return;
    }
    let lookup = Lookup(&t.gov);
    let mut names = std::collections::BTreeSet::new();
    let mut tables = Vec::new();
    for s in facts {
        for tbl in s.reads.iter().chain(s.writes.iter().map(|(t, _)| t)) {
            let cols: Vec<String> =
                lookup.column_labels(tbl).into_iter().filter(|(_, l)| *l > 0).map(|(c, _)| c).collect();
            let whole = lookup.table_label(tbl).is_some_and(|l| l > 0);
            if whole || !cols.is_empty() {
                tables.push((tbl.name.clone(), whole));
            }
            names.extend(cols);
        }
    }
    if tables.is_empty() {
        return;
    }
    let whole_table = tables.iter().any(|(_, w)| *w);
    let Ok(parsed) = pg_query::parse(text, 0) else { return };
    let labeled = |c: &str| whole_table || names.contains(c);
    let table_labeled = |r: &pg_query::protobuf::RangeVar| tables.iter().any(|(n, _)| *n == r.relname);
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_deref() else { continue };
        for at in super::sqltree::labeled_literals(stmt, &labeled, &table_labeled) {
            // A negative number's constant starts at its minus sign.
            if let Some(l) = literals.iter_mut().find(|l| l.start == at || l.start == at + 1) {
                l.labeled = true;
            }
        }
    }
}

/// What happens to a client message.
enum Forward {
    AsIs,
    /// The statement text was rewritten (mask at read).
    Rewritten(Bytes),
    /// Refused or skipped: not sent.
    Drop,
}

/// The mask-at-read rewrite of an admitted statement: the text to send
/// instead (None = unchanged) and the notices, or the refusal.
fn mask_at_read(t: &Tracker, text: &str) -> std::result::Result<(Option<String>, Arc<ReadNotes>), Verdict> {
    let Some(catalog) = t.gov.catalog.as_deref() else {
        // Passthrough: no catalog session; results are masked as they
        // come back (README: limits).
        return Ok((None, Arc::default()));
    };
    match super::read_mask::rewrite(catalog, &t.gov.classifier, &t.gov.profile, t.gov.key.is_some(), text) {
        Ok(r) => Ok((r.text, Arc::new(ReadNotes { notices: r.notices, masked: r.masked }))),
        Err(e) => Err(Verdict::Deny { rule: e.rule.to_string(), message: e.message }),
    }
}

/// A Query message with new text.
fn query_frame(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 6);
    out.put_u8(b'Q');
    out.put_i32((4 + text.len() + 1) as i32);
    out.put_slice(text.as_bytes());
    out.put_u8(0);
    out.freeze()
}

/// A Parse message with new text and the client's parameter types.
fn parse_frame(name: &[u8], text: &str, rest: &[u8]) -> Bytes {
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

/// Handle one client message.
fn on_client_frame(t: &mut Tracker, f: &Frame, ctx: &Ctx, lookup_error: Option<&anyhow::Error>) -> Result<Forward> {
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
            let (mut verdict, facts) =
                if std::str::from_utf8(raw).is_err() { (not_utf8(), None) } else { judge(t, ctx, &text, lookup_error) };
            let mut notes = Arc::default();
            let mut literals = super::sql::literals(&text);
            mark_labeled(t, facts.as_deref().map(|f| f.as_slice()), &text, &mut literals);
            if verdict == Verdict::Allow {
                verdict = sensitive_values(t, literals.iter().map(|l| l.value.as_str()), "its text");
            }
            if verdict == Verdict::Allow {
                match mask_at_read(t, &text) {
                    Ok((new_text, n)) => {
                        notes = n;
                        if let Some(new_text) = new_text {
                            forward = Forward::Rewritten(query_frame(&new_text));
                        }
                    }
                    Err(v) => verdict = v,
                }
            }
            let stmt = Statement {
                text: &text,
                literals: &literals,
                kind: StatementKind::Simple,
                params: &[],
                prepared: None,
            };
            let (admitted, pending) = t.pipeline.statement(&stmt, &verdict);
            t.unconfirmed.push(pending);
            if let Verdict::Deny { rule, message } = verdict {
                t.queue.push_back(Req::Denied { admitted, denied: Denied { rule, message }, simple: true });
                return Ok(Forward::Drop);
            }
            if facts.as_deref().is_some_and(|f| changes_catalog(f)) {
                if let Some(c) = &t.gov.catalog {
                    c.invalidate();
                }
            }
            let mut run = running(admitted);
            run.notes = notes;
            t.queue.push_back(Req::Simple(Box::new(run)));
        }
        b'P' => {
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Parse without a name")?);
            let raw = b.cstr().context("protocol violation: Parse without a query")?;
            let text: Arc<str> = String::from_utf8_lossy(raw).into();
            let (mut verdict, facts) =
                if std::str::from_utf8(raw).is_err() { (not_utf8(), None) } else { judge(t, ctx, &text, lookup_error) };
            let mut notes = Arc::default();
            let mut found = super::sql::literals(&text);
            mark_labeled(t, facts.as_deref().map(|f| f.as_slice()), &text, &mut found);
            let literals: Arc<[Literal]> = found.into();
            if verdict == Verdict::Allow {
                verdict = sensitive_values(t, literals.iter().map(|l| l.value.as_str()), "its text");
            }
            if verdict == Verdict::Allow {
                match mask_at_read(t, &text) {
                    Ok((new_text, n)) => {
                        notes = n;
                        if let Some(new_text) = new_text {
                            forward = Forward::Rewritten(parse_frame(&name, &new_text, b.rest()));
                        }
                    }
                    Err(v) => verdict = v,
                }
            }
            if let Verdict::Deny { rule, message } = verdict.clone() {
                let stmt = Statement {
                    text: &text,
                    literals: &literals,
                    kind: StatementKind::Execute,
                    params: &[],
                    prepared: None,
                };
                let (admitted, pending) = t.pipeline.statement(&stmt, &verdict);
                t.unconfirmed.push(pending);
                t.queue.push_back(Req::Denied { admitted, denied: Denied { rule, message }, simple: false });
                t.skipping = true;
                return Ok(Forward::Drop);
            }
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
            t.prepared.insert(name, Prepared { gen, text, label, described: None, notes, literals });
            t.queue.push_back(Req::Parse);
        }
        b'B' => {
            let portal = Bytes::copy_from_slice(b.cstr().context("protocol violation: Bind without a portal")?);
            let statement = Bytes::copy_from_slice(b.cstr().context("protocol violation: Bind without a statement")?);
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
            let (text, prepared, statement_gen, notes, literals) = match t.prepared.get(&statement) {
                Some(p) => (p.text.clone(), p.label.clone(), p.gen, p.notes.clone(), p.literals.clone()),
                None => (Arc::from("<unknown prepared statement>"), None, 0, Arc::default(), Arc::from(Vec::new())),
            };
            // Values a workload binds are checked like the ones it types:
            // refused before they reach the server (and its logs).
            let verdict = sensitive_values(
                t,
                params.iter().filter_map(|(v, _)| v.as_deref().and_then(|v| std::str::from_utf8(v).ok())),
                "its parameters",
            );
            if let Verdict::Deny { rule, message } = verdict.clone() {
                let ps: Vec<Param<'_>> =
                    params.iter().map(|(v, bin)| Param { value: v.as_deref(), binary: *bin }).collect();
                let stmt = Statement {
                    text: &text,
                    literals: &literals,
                    kind: StatementKind::Execute,
                    params: &ps,
                    prepared: prepared.as_deref(),
                };
                let (admitted, pending) = t.pipeline.statement(&stmt, &verdict);
                t.unconfirmed.push(pending);
                t.queue.push_back(Req::Denied { admitted, denied: Denied { rule, message }, simple: false });
                t.skipping = true;
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
                },
            );
            t.queue.push_back(Req::Bind);
        }
        b'D' => {
            let kind = b.u8().context("protocol violation: Describe without a kind")?;
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Describe without a name")?);
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
            let (text, prepared, params, literals) = match t.portals.get(&portal) {
                Some(p) => (p.text.clone(), p.prepared.clone(), p.params.clone(), p.literals.clone()),
                None => (Arc::from("<unknown portal>"), None, Vec::new(), Arc::from(Vec::new())),
            };
            let ps: Vec<Param<'_>> =
                params.iter().map(|(v, bin)| Param { value: v.as_deref(), binary: *bin }).collect();
            let stmt = Statement {
                text: &text,
                literals: &literals,
                kind: StatementKind::Execute,
                params: &ps,
                prepared: prepared.as_deref(),
            };
            let (admitted, pending) = t.pipeline.statement(&stmt, &Verdict::Allow);
            t.unconfirmed.push(pending);
            let mut run = running(admitted);
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
            };
            let (admitted, pending) = t.pipeline.statement(&stmt, &verdict);
            t.unconfirmed.push(pending);
            if let Verdict::Deny { rule, message } = verdict {
                t.queue.push_back(Req::Denied { admitted, denied: Denied { rule, message }, simple: true });
                return Ok(Forward::Drop);
            }
            t.queue.push_back(Req::Func(Box::new(running(admitted))));
        }
        b'C' => {
            let kind = b.u8().context("protocol violation: Close without a kind")?;
            let name = Bytes::copy_from_slice(b.cstr().context("protocol violation: Close without a name")?);
            let statement = kind == b'S';
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

fn running(admitted: Admitted) -> Running {
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
    }
}

async fn server_to_client(
    mut ur: ReadHalf<Stream>,
    mut reader: FrameReader,
    mut cw: WriteHalf<Stream>,
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
    wake: &tokio::sync::Notify,
) -> Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut eof = false;
    loop {
        let (frames, err) = take_frames(&mut reader);
        if let Some(e) = err {
            return Err(e.context("from the server"));
        }
        // Table OIDs in result descriptions, looked up before the lock.
        let lookup_error = resolve_result_tables(&frames, tracker, ctx, cred).await.err();
        let waits = {
            let mut t = tracker.lock().map_err(|_| anyhow::anyhow!("session state poisoned"))?;
            for frame in &frames {
                t.bytes_down += frame.bytes.len() as u64;
                on_server_frame(&mut t, frame, &mut out, ctx, lookup_error.as_ref());
            }
            drain_refusals(&mut t, &mut out);
            t.last_activity = Instant::now();
            if t.desync {
                bail!("protocol violation: the server sent a row cordon cannot attribute to a statement (request tracking out of step); ending the session");
            }
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

async fn resolve_result_tables(
    frames: &[Frame],
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
) -> Result<()> {
    let oids: Vec<u32> =
        frames.iter().filter(|f| f.tag == b'T').flat_map(|f| row_description(f.body())).map(|f| f.table_oid).collect();
    if oids.iter().all(|o| *o == 0) {
        return Ok(());
    }
    let (Some(cred), Some(catalog)) = (cred, tracker.lock().ok().and_then(|t| t.gov.catalog.clone())) else {
        return Ok(());
    };
    catalog.resolve_oids(ctx, cred, &oids).await
}

fn row_description(body: &[u8]) -> Vec<Field> {
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
fn describe(t: &Tracker, fields: Vec<Field>, lookup_error: Option<&anyhow::Error>) -> Arc<Described> {
    let g = &t.gov;
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
    let plan = plan::plan(&cols, &g.classifier, &g.profile, g.key.is_some());
    Arc::new(Described { fields, plan: Arc::new(plan) })
}

/// An Execute's description: its portal's own (Describe P), else its
/// statement's (Describe S) with the Bind's result formats.
fn resolve_portal_description(t: &mut Tracker) {
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

fn current_run(t: &mut Tracker) -> Option<&mut Running> {
    match t.queue.front_mut() {
        Some(Req::Exec(r) | Req::Simple(r) | Req::Func(r)) => Some(r),
        _ => None,
    }
}

fn head_id(t: &Tracker) -> u64 {
    match t.queue.front() {
        Some(Req::Exec(r) | Req::Simple(r) | Req::Func(r)) => r.admitted.id,
        _ => 0,
    }
}

fn finish_run(t: &mut Tracker, run: &Running) {
    t.pipeline.finish(&run.admitted, &run.outcome);
}

/// Emit refusals that have reached the head of the queue.
fn drain_refusals(t: &mut Tracker, out: &mut BytesMut) {
    while matches!(t.queue.front(), Some(Req::Denied { .. })) {
        if let Some(Req::Denied { admitted, denied, simple }) = t.queue.pop_front() {
            refuse(out, &denied);
            if simple {
                ready_for_query(out, t.status);
            }
            let outcome = Outcome { denied: Some(denied), ..Outcome::default() };
            t.pipeline.notice(admitted.id, "error", serde_json::json!({"severity": "ERROR", "code": "42501", "message": outcome.denied.as_ref().map(|d| d.message.clone())}));
            t.pipeline.finish(&admitted, &outcome);
        }
    }
}

fn refuse(out: &mut BytesMut, d: &Denied) {
    wire::error(out, "ERROR", "42501", &format!("cordon: {} (rule {})", d.message, d.rule));
}

fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

fn on_server_frame(t: &mut Tracker, f: &Frame, out: &mut BytesMut, ctx: &Ctx, lookup_error: Option<&anyhow::Error>) {
    // Refusals queued before this response go out first.
    drain_refusals(t, out);
    // cordon's notices for the statement whose response this starts.
    if let Some(run) = current_run(t) {
        if !run.noticed {
            run.noticed = true;
            for n in &run.notes.notices {
                super::read_mask::notice(out, n);
            }
        }
    }
    // PostgreSQL's own words (a cast error echoing its input, a duplicate
    // key, a notification payload) pass the detectors like any value.
    if matches!(f.tag, b'E' | b'N' | b'A') {
        if let Some(masked) = super::read_mask::mask_server_text(f.tag, f.body(), &t.gov.classifier, &t.gov.profile) {
            let masked = Frame { tag: f.tag, bytes: masked };
            return on_server_frame_inner(t, &masked, out, ctx, lookup_error);
        }
    }
    on_server_frame_inner(t, f, out, ctx, lookup_error)
}

fn on_server_frame_inner(
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
                let (my_pid, my_key) = ctx.shared.register_cancel(
                    CancelTarget { session: ctx.session.clone(), upstream: ctx.upstream, pid, key: real_key.clone() },
                    real_key.len(),
                );
                wire::backend_key(out, my_pid, &my_key);
                t.cancel = Some((my_pid, my_key));
                return;
            }
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
            let id = head_id(t);
            let record = t.pipeline.wants_rows();
            resolve_portal_description(t);
            let Some(run) = current_run(t) else {
                // A row cordon cannot attribute to a statement: the books are
                // out of step with the server. Never pass it on unread.
                t.desync = true;
                return;
            };
            run.outcome.rows = run.outcome.rows.saturating_add(1);
            let Some(described) = run.described.clone() else {
                // Rows with no description at all (the client never asked
                // for one): cordon cannot classify them, so they do not pass.
                run.refused = Some(Denied {
                    rule: "classification".into(),
                    message: "result rows arrived without a row description; describe the statement or portal".into(),
                });
                swallow_start(t);
                return;
            };
            if let Some(d) = described.plan.deny.clone() {
                run.refused = Some(d);
                swallow_start(t);
                return;
            }
            let columns = Body::new(f.body()).i16().unwrap_or(-1);
            if usize::try_from(columns).ok() != Some(described.fields.len()) {
                run.refused = Some(Denied {
                    rule: "classification".into(),
                    message: "a result row does not match its row description".into(),
                });
                swallow_start(t);
                return;
            }
            let binary = run.binary.clone();
            let mut counts = std::mem::take(&mut run.outcome.masked);
            // Values PostgreSQL masked as it read them (mask at read): a
            // result column computed from a masked one, by name.
            for m in &run.notes.masked {
                let col = m.split('/').next().unwrap_or_default();
                if described.fields.iter().any(|f| f.table_oid == 0 && f.name == col) {
                    *counts.entry(m.clone()).or_default() += 1;
                }
            }
            let rewritten = if described.plan.active() {
                mask_row(f.body(), &described, &binary, &t.gov, &mut counts)
            } else {
                Ok(None)
            };
            if let Some(run) = current_run(t) {
                run.outcome.masked = counts;
            }
            let bytes = match rewritten {
                Ok(Some(b)) => b,
                Ok(None) => f.bytes.clone(),
                Err(e) => {
                    if let Some(run) = current_run(t) {
                        run.refused = Some(Denied { rule: "mask".into(), message: e });
                    }
                    swallow_start(t);
                    return;
                }
            };
            if record {
                let values = wire::data_row(bytes.get(5..).unwrap_or_default());
                t.pipeline.row(id, &values);
            }
            out.extend_from_slice(&bytes);
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
                    finish_run(t, &run);
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
                run.outcome.error = Some(e);
            }
            if !simple {
                // The failing request, then everything up to Sync is skipped.
                // An error answering Sync itself (a deferred constraint at
                // commit) leaves the Sync for its ReadyForQuery.
                if !matches!(t.queue.front(), Some(Req::Sync) | None) {
                    if let Some(Req::Exec(run)) = t.queue.pop_front() {
                        finish_run(t, &run);
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

/// ReadyForQuery: ends a simple query (or function call), or everything up
/// to the first Sync.
fn ready(t: &mut Tracker, out: &mut BytesMut) {
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
                finish_run(t, &run);
            }
        }
        _ => loop {
            match t.queue.pop_front() {
                Some(Req::Sync) | None => break,
                Some(Req::Exec(mut run)) => {
                    run.outcome.skipped =
                        run.outcome.tags.is_empty() && run.outcome.error.is_none() && !run.outcome.suspended;
                    finish_run(t, &run);
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
fn swallow_start(t: &mut Tracker) {
    t.swallowing = true;
}

/// While swallowing: keep the books, forward nothing until ReadyForQuery.
fn swallow(t: &mut Tracker, f: &Frame, out: &mut BytesMut) {
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
                    finish_run(t, &run);
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
fn complete(t: &mut Tracker) {
    if !matches!(t.queue.front(), Some(Req::Parse | Req::Bind | Req::Close { .. })) {
        return;
    }
    if let Some(Req::Close { statement, name, gen }) = t.queue.pop_front() {
        if statement {
            if t.prepared.get(&name).is_some_and(|p| p.gen == gen) {
                t.prepared.remove(&name);
            }
        } else if t.portals.get(&name).is_some_and(|p| p.gen == gen) {
            t.portals.remove(&name);
        }
    }
}

fn skip_to_sync(t: &mut Tracker) {
    while !matches!(t.queue.front(), Some(Req::Sync) | None) {
        match t.queue.pop_front() {
            Some(Req::Exec(mut run)) => {
                run.outcome.skipped = true;
                finish_run(t, &run);
            }
            Some(Req::Denied { admitted, denied, .. }) => {
                t.pipeline.finish(&admitted, &Outcome { denied: Some(denied), ..Outcome::default() });
            }
            _ => {}
        }
    }
}

/// Rewrite a DataRow with masked values; Ok(None) when nothing changed.
fn mask_row(
    body: &[u8],
    d: &Described,
    binary: &[bool],
    g: &Governance,
    counts: &mut BTreeMap<String, u64>,
) -> std::result::Result<Option<Bytes>, String> {
    let mut b = Body::new(body);
    let n = b.i16().ok_or("a DataRow without a column count")?.max(0) as usize;
    let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(n);
    for _ in 0..n {
        let len = b.i32().ok_or("a DataRow cut short")?;
        values.push(if len < 0 { None } else { Some(b.bytes(len as usize).ok_or("a DataRow value cut short")?) });
    }
    let mut changed: Vec<Option<Option<Vec<u8>>>> = vec![None; n];
    for (i, action) in d.plan.cols.iter().enumerate() {
        if *action == ColAction::Keep {
            continue;
        }
        let (Some(Some(v)), Some(field)) = (values.get(i), d.fields.get(i)) else { continue };
        let is_binary = binary.get(i).copied().unwrap_or(false);
        let ty = types::value_type(field.type_oid, field.typmod);
        let text = if is_binary {
            match types::binary_to_text(field.type_oid, v) {
                Some(t) => t,
                // Masking by constant needs no reading; detection does.
                None if matches!(action, ColAction::Mask { .. }) => String::new(),
                None => continue,
            }
        } else {
            match std::str::from_utf8(v) {
                Ok(s) => s.to_string(),
                // Not readable: masked whole rather than passed unread.
                Err(_) => match action {
                    ColAction::Mask { .. } => String::new(),
                    _ => {
                        let redacted =
                            crate::pipeline::mask::redact(ty).map_err(|e| format!("column {:?}: {e}", field.name))?;
                        if let Some(slot) = changed.get_mut(i) {
                            *slot = Some(Some(redacted.into_bytes()));
                        }
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
            if let Some(slot) = changed.get_mut(i) {
                *slot = Some(bytes);
            }
        }
    }
    if changed.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(body.len() + 32);
    out.put_u8(b'D');
    out.put_i32(0);
    out.put_i16(n as i16);
    for (i, v) in values.iter().enumerate() {
        let v: Option<&[u8]> = match changed.get(i) {
            Some(Some(c)) => c.as_deref(),
            _ => *v,
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
fn mask_copy_line(body: &[u8], t: &mut Tracker) -> Option<Bytes> {
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
