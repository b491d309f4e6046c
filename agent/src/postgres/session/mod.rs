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
    frame::{Body, Frame, FrameError, FrameReader, FrameRef},
    read_mask::ReadNotes,
    startup::ClientHello,
    types, upstream, wire, CancelTarget, Ctx, End,
};
use crate::{
    config::{AuthMode, Profile},
    net::Stream,
    pipeline::{
        classify::Classifier,
        guard::{self, LabelLookup, StmtFacts, StmtKind, TableRef},
        literals::Literal,
        mask::ValueType,
        plan::{self, ColAction, ColumnDesc, Plan, Source},
        recorder, Admitted, Denied, DenyKind, Outcome, Param, SessionPipeline, Statement, StatementKind, Verdict,
    },
    secrets::Credential,
};

mod client;
mod hold;
mod judge;
mod results;
mod server;

use client::*;
use judge::*;
use results::*;
use server::*;

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
    /// A rule asked for approval: each execution is held.
    approval: Option<Arc<hold::Need>>,
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
    approval: Option<Arc<hold::Need>>,
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
    /// Released by an approval: its results are classified with the
    /// approved profile (labels sent for approval read in clear).
    approved: bool,
    /// Rows passed under `described` not yet counted for mask at read.
    read_masked_rows: u64,
    /// A simple query sent as a prepared statement (see `prepare`).
    sent: Option<Box<super::prepare::Sent>>,
}

enum Req {
    /// `key`: the statement of cordon's this Parse creates (confirmed by
    /// its ParseComplete); `answered`: cordon answers it itself (the
    /// statement was prepared before, see `prepare`).
    Parse {
        key: Option<String>,
        answered: bool,
    },
    /// `key`: the statement of cordon's it binds (forgotten if stale).
    Bind {
        key: Option<String>,
    },
    /// Closing a statement (true) or portal, forgotten when the server
    /// confirms: results of an Execute sent before the Close still need
    /// its description (sqlx sends Bind, Execute, Close, Sync).
    Close {
        statement: bool,
        name: Bytes,
        gen: u64,
    },
    /// A Close of cordon's own (an evicted prepared statement): its
    /// CloseComplete is not the client's.
    Internal,
    /// cordon's question which backend answers (`prepare::BACKEND_PROBE`):
    /// its answer is not the client's. `startup`: the process id of the
    /// BackendKeyData; `pid`: the one the probe returned.
    Probe {
        startup: i32,
        pid: Option<i32>,
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
    /// The profile for statements released by approval, when some label's
    /// action is `approve` (see `Profile::approved`).
    approved: Option<Profile>,
    /// The role cordon logged in upstream as.
    upstream_user: String,
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
    /// Records to be on disk before the statements they describe are
    /// forwarded (`audit_durability = "statement"`).
    unconfirmed: Vec<crate::audit::Ticket>,
    /// A FATAL for the client, written by the server side before the session
    /// ends (a limit, the audit log): the client is told why.
    fatal: Option<(&'static str, String)>,
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
    /// The decision on the held message being run again (see `hold`).
    decision: Option<hold::Settled>,
    /// A statement is held for approval: the session is not idle.
    holding: bool,
    /// Where each value of the DataRow being masked lies (scratch, reused).
    row_values: Vec<Option<(usize, usize)>>,
    /// Messages from cordon for the client, written by the server side in
    /// turn (a hold's notice).
    to_client: BytesMut,
    /// Statements prepared upstream for simple queries.
    ups: super::prepare::Upstream,
    /// The statement of cordon's (name, key) the client's unnamed
    /// statement stands for upstream, if any.
    unnamed: Option<(String, String)>,
    /// The server may hold an unnamed statement of its own (one was parsed
    /// unnamed and not closed since).
    server_unnamed: bool,
    /// Messages from cordon for the server, written by the client side
    /// before anything else (a stale prepared statement sent again).
    to_server: BytesMut,
    /// Preparing upstream waits on the backend probe: the process id the
    /// server named at startup (BackendKeyData), until the probe is sent.
    probe_due: Option<Option<i32>>,
    /// The server's startup ended (its first ReadyForQuery came).
    started: bool,
}

pub async fn run(mut hello: ClientHello, ctx: &Ctx, early: upstream::Early<'_>) -> End {
    let client_tls = hello.stream.is_tls();
    let database = hello
        .params
        .iter()
        .find(|(k, _)| k == "database")
        .or_else(|| hello.params.iter().find(|(k, _)| k == "user"))
        .map(|(_, v)| v.clone());
    let mut end = End { client_tls, database: database.clone(), ..End::default() };
    let admission = ctx.admission.lock().ok().and_then(|mut p| p.take());
    let open = match admission {
        Some(Ok(ticket)) => Some(ticket),
        Some(Err(r)) => {
            let mut buf = BytesMut::new();
            wire::error(&mut buf, "FATAL", wire::sqlstate(r.kind), &format!("cordon: {}", r.message));
            let _ = hello.stream.write_all(&buf).await;
            end.outcome = r.outcome;
            end.error = Some(r.message);
            return end;
        }
        None => None,
    };
    if let Some(msg) = passthrough_cannot_mask(ctx) {
        let mut buf = BytesMut::new();
        wire::error(&mut buf, "FATAL", "28000", &format!("cordon: {msg}"));
        let _ = hello.stream.write_all(&buf).await;
        end.outcome = "policy_refused";
        end.error = Some(msg);
        return end;
    }
    let up = match upstream::start(&mut hello, ctx, early).await {
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
    if let Some(ticket) = open.filter(|_| ctx.shared.audit.durability() == crate::audit::Durability::Statement) {
        if let Err(u) = ticket.durable().await {
            let mut buf = BytesMut::new();
            wire::error(&mut buf, "FATAL", wire::code::AUDIT_UNAVAILABLE, &format!("cordon: {u}"));
            let _ = hello.stream.write_all(&buf).await;
            end.outcome = "audit_unavailable";
            end.error = Some(u.to_string());
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
        approved: ctx.profile.approves_labels().then(|| ctx.profile.approved()),
        upstream_user: up.user.clone(),
        catalog: credential.as_ref().map(|_| ctx.pg.catalog(ctx.upstream, &db)),
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
        fatal: None,
        cancel: None,
        bytes_up: 0,
        bytes_down: 0,
        last_activity: Instant::now(),
        status: b'I',
        skipping: false,
        swallowing: false,
        desync: false,
        next_gen: 0,
        decision: None,
        holding: false,
        row_values: Vec::new(),
        to_client: BytesMut::new(),
        // Off until the server proves it keeps the session's statements.
        ups: super::prepare::Upstream::new(false),
        unnamed: None,
        server_unnamed: false,
        to_server: BytesMut::new(),
        probe_due: ctx.rule.prepare_statements.then_some(None),
        started: false,
    }));

    // `wake` wakes the server side (cordon has something for the client),
    // `wake_up` the client side (cordon has something for the server).
    let wake = tokio::sync::Notify::new();
    let wake_up = tokio::sync::Notify::new();
    let (cr, cw) = tokio::io::split(hello.stream);
    let (ur, uw) = tokio::io::split(up.stream);
    let c2s = client_to_server(cr, hello.reader, uw, &tracker, ctx, credential.as_ref(), (&wake, &wake_up));
    let s2c = server_to_client(ur, up.reader, cw, &tracker, ctx, credential.as_ref(), (&wake, &wake_up));
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
                Err(e) => {
                    // A FATAL for the client goes out on the server side.
                    if tracker.lock().is_ok_and(|t| t.fatal.is_some()) {
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut s2c).await;
                    }
                    break Err(e);
                }
            },
            r = &mut s2c => match r {
                Ok(()) => break Ok("server_closed"),
                Err(e) => break Err(e),
            },
            _ = tick.tick() => {
                // Idle means nothing in flight: a long statement the server is
                // still running, or one held for approval, is not idle.
                let quiet = tracker
                    .lock()
                    .map(|t| if t.queue.is_empty() && !t.holding { t.last_activity.elapsed() } else { Duration::ZERO })
                    .unwrap_or_default();
                if quiet >= idle {
                    let message = format!(
                        "cordon: the session was idle for {} s, the limit agent.idle_timeout_secs; reconnect, or raise it in the policy",
                        idle.as_secs()
                    );
                    fatal(&tracker, wire::code::LIMIT, message, &wake);
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut s2c).await;
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
            Req::Exec(mut run) | Req::Simple(mut run) | Req::Func(mut run) => {
                results::settle_read_masked(&mut run);
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
        ctx.pg.forget_cancel(pid, &key);
    }
    end.bytes_up = t.bytes_up;
    end.bytes_down = t.bytes_down;
    end.statements = t.pipeline.statements();
    end.recording = t.pipeline.close();
    match result {
        Ok(o) => end.outcome = o,
        Err(e) => {
            end.outcome = if matches!(e.downcast_ref::<FrameError>(), Some(FrameError::Oversized { .. })) {
                "message_too_large"
            } else if e.downcast_ref::<FrameError>().is_some() || format!("{e:#}").contains("protocol violation") {
                "protocol_error"
            } else {
                "error"
            };
            end.error = Some(format!("{e:#}"));
        }
    }
    end
}

/// Mask at read needs cordon's own catalog session, which only `inject`
/// has. A passthrough session of a profile that masks or denies labeled
/// data would be masked at result only, which a computed expression
/// (`reverse(ssn)`) defeats: it is refused instead.
pub(super) fn passthrough_cannot_mask(ctx: &Ctx) -> Option<String> {
    let labeled = !ctx.shared.policy().classifier.rules.is_empty();
    (credential(ctx).is_none() && labeled && ctx.profile.protects_anything()).then(|| {
        format!(
            "profile {} masks labeled data, which needs cordon's own catalog session: intercept {} uses auth = \"passthrough\"; set auth = \"inject\" with a credential (passthrough would only mask results, which computed expressions get around)",
            ctx.profile.name, ctx.rule.name
        )
    })
}

/// The credential cordon reads the catalog with: the injected one.
fn credential(ctx: &Ctx) -> Option<Credential> {
    match ctx.rule.login.as_ref().map(|p| &p.auth) {
        Some(AuthMode::Inject { credentials }) => ctx.shared.secrets().get(credentials).cloned(),
        _ => None,
    }
}

fn take_frames(reader: &mut FrameReader) -> (Vec<Frame>, Option<FrameError>) {
    let mut frames = Vec::new();
    let err = take_frames_into(reader, &mut frames);
    (frames, err)
}

/// Every complete frame buffered, appended to `frames` (a vector reused
/// batch after batch where results stream).
fn take_frames_into(reader: &mut FrameReader, frames: &mut Vec<Frame>) -> Option<FrameError> {
    loop {
        match reader.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// What the client reads when a message breaks the framing: for a message
/// over the limit, the setting that would let it through.
fn framing_message(e: &FrameError, from: &str) -> (&'static str, String) {
    match e {
        FrameError::Oversized { tag, len, max } => (
            wire::code::LIMIT,
            format!(
                "cordon: {from} sent a {tag:?} message of {len} bytes, more than agent.max_message_bytes ({max}); \
                 send less in one message (fewer or smaller rows, smaller values), or raise agent.max_message_bytes in the policy"
            ),
        ),
        FrameError::BadLength { .. } => ("08P01", format!("cordon: protocol violation: {from} sent {e}")),
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

fn finish_run(t: &mut Tracker, mut run: Box<Running>) {
    results::settle_read_masked(&mut run);
    t.pipeline.finish(&run.admitted, &run.outcome);
}

/// End the session with a FATAL the client reads: the server side writes it
/// in turn (it owns the client's write half) and stops.
fn fatal(tracker: &Mutex<Tracker>, code: &'static str, message: String, wake: &tokio::sync::Notify) {
    if let Ok(mut t) = tracker.lock() {
        t.fatal = Some((code, message));
    }
    wake.notify_one();
}

/// The SQL text of a Query or Parse message (fuzzing entry point).
#[doc(hidden)]
pub fn sql_text(f: &Frame) -> Option<String> {
    judge::sql_of(f)
}

/// The fields of a RowDescription as the server side reads them (fuzzing
/// entry point): (name, table OID, column number, type OID).
#[doc(hidden)]
pub fn result_fields(body: &[u8]) -> Vec<(String, u32, i16, u32)> {
    results::row_description(body).into_iter().map(|f| (f.name, f.table_oid, f.attnum, f.type_oid)).collect()
}
