//! One SSH session channel, driven by its own task: requests before the
//! program starts (pty, env) are collected; the exec command, shell or
//! subsystem is judged and recorded through the pipeline; an allowed one
//! is opened upstream with the same requests, and data flows both ways
//! until either side closes. Stdin that arrives before the upstream is
//! ready is kept (bounded), not dropped: scp, rsync and Ansible send early.

use std::sync::Arc;

use bytes::Bytes;
use russh::{server, Channel, ChannelId, ChannelMsg};

use super::{
    policy::{self, Judgement, ShellMode, Transfer, TransferMode},
    Ctx,
};
use crate::{
    approvals::{self, Decision, Submitted},
    pipeline::{Outcome, ServerError, Statement, StatementKind, Verdict},
};

/// Stdin kept before the program starts.
const EARLY_MAX: usize = 1024 * 1024;

/// What the channel asked to run.
enum Start {
    Exec(String),
    Shell,
    Subsystem(String),
}

struct Pty {
    term: String,
    cols: u32,
    rows: u32,
    px_w: u32,
    px_h: u32,
    modes: Vec<(russh::Pty, u32)>,
}

pub async fn run(ctx: Arc<Ctx>, down: Channel<server::Msg>, open: server::ChannelOpenHandle) {
    open.accept().await;
    let Some(handle) = ctx.handle.get().cloned() else { return };
    let id = down.id();
    let (mut rx, tx) = down.split();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut pty: Option<Pty> = None;
    let mut early: Vec<Bytes> = Vec::new();
    let mut early_len = 0usize;
    let mut early_eof = false;
    let start = loop {
        let Some(msg) = rx.wait().await else { return };
        match msg {
            ChannelMsg::RequestPty { term, col_width, row_height, pix_width, pix_height, terminal_modes, .. } => {
                pty = Some(Pty {
                    term,
                    cols: col_width,
                    rows: row_height,
                    px_w: pix_width,
                    px_h: pix_height,
                    modes: terminal_modes,
                });
                let _ = handle.channel_success(id).await;
            }
            // Only the locale passes: BASH_ENV, LD_PRELOAD and the like
            // would run code before the judged command. No reply: clients
            // send env without asking for one, and russh keeps only the
            // latest request's want-reply, so a reply here could be read as
            // the answer to the exec that follows.
            ChannelMsg::SetEnv { variable_name, variable_value, .. }
                if variable_name == "LANG" || variable_name.starts_with("LC_") =>
            {
                env.push((variable_name, variable_value));
            }
            ChannelMsg::SetEnv { .. } => {}
            ChannelMsg::Exec { command, .. } => break Start::Exec(String::from_utf8_lossy(&command).into_owned()),
            ChannelMsg::RequestShell { .. } => break Start::Shell,
            ChannelMsg::RequestSubsystem { name, .. } => break Start::Subsystem(name),
            ChannelMsg::Data { data } => {
                early_len += data.len();
                if early_len > EARLY_MAX {
                    let _ = tx.close().await;
                    return;
                }
                early.push(data);
            }
            ChannelMsg::Eof => early_eof = true,
            // Refused (russh answers agent forwarding through the handler);
            // no reply from here, for the same reason as env.
            ChannelMsg::AgentForward { .. } | ChannelMsg::RequestX11 { .. } => {}
            ChannelMsg::Close => return,
            _ => {}
        }
    };

    let (text, kind) = match &start {
        Start::Exec(c) => (c.clone(), StatementKind::Command),
        Start::Shell => ("<interactive shell>".to_string(), StatementKind::Channel),
        Start::Subsystem(n) => (format!("<subsystem {n}>"), StatementKind::Channel),
    };
    let mut waiting = Waiting { rx: &mut rx, early: &mut early, early_len: &mut early_len, early_eof: &mut early_eof };
    let (verdict, decision) = decide(&ctx, &start, &text, &rx_notice(&handle, id), &mut waiting).await;
    let stmt = Statement { text: &text, literals: &[], kind, params: &[], prepared: None, approval: decision.as_ref() };
    let (admitted, written) = match ctx.pipeline.lock() {
        Ok(mut p) => p.statement(&stmt, &verdict),
        Err(_) => return,
    };
    let verdict = match written {
        Err(u) => Verdict::Deny { rule: "audit".into(), message: u.to_string() },
        Ok(Some(ticket)) => match ticket.durable().await {
            Ok(()) => verdict,
            Err(u) => Verdict::Deny { rule: "audit".into(), message: u.to_string() },
        },
        Ok(None) => verdict,
    };
    if let Verdict::Deny { rule, message } | Verdict::Approve { rule, message } = &verdict {
        refuse(&handle, id, &tx, &format!("cordon: refused: {message} (rule {rule})")).await;
        let outcome =
            Outcome { denied: Some(crate::pipeline::Denied::policy(rule, message.clone())), ..Outcome::default() };
        finish(&ctx, &admitted, outcome);
        return;
    }

    // Upstream: one connection per workload connection, opened on first
    // use; with a user CA, one per channel, its certificate scoped to what
    // the channel runs (sshd enforces the forced command).
    let scoped = ctx.uses_certificates();
    let up = if scoped {
        let scope = super::upstream::Scope {
            key_id: format!("cordon session {} uid {} channel {}", ctx.session, ctx.workload.uid, u32::from(id)),
            force_command: match &start {
                Start::Exec(c) => Some(c.clone()),
                Start::Subsystem(n) if n == "sftp" => Some("internal-sftp".into()),
                Start::Subsystem(_) | Start::Shell => None,
            },
            pty: pty.is_some() && ctx.profile.ssh.shell != ShellMode::Deny,
            forwarding: false,
        };
        ctx.connect_scoped(scope).await
    } else {
        ctx.upstream().await
    };
    let up = match up {
        Ok(u) => u,
        Err(message) => {
            return upstream_failed(&ctx, &admitted, &handle, id, &tx, message).await;
        }
    };
    let upc = match up.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            let message = format!("the server refused a session channel: {e}");
            return upstream_failed(&ctx, &admitted, &handle, id, &tx, message).await;
        }
    };
    for (k, v) in &env {
        let _ = upc.set_env(false, k.clone(), v.clone()).await;
    }
    if let Some(p) = &pty {
        let _ = upc.request_pty(false, &p.term, p.cols, p.rows, p.px_w, p.px_h, &p.modes).await;
    }
    let started = match &start {
        Start::Exec(c) => upc.exec(true, c.as_bytes()).await,
        Start::Shell => upc.request_shell(true).await,
        Start::Subsystem(n) => upc.request_subsystem(true, n.clone()).await,
    };
    if let Err(e) = started {
        let message = format!("the server did not start it: {e}");
        return upstream_failed(&ctx, &admitted, &handle, id, &tx, message).await;
    }
    let _ = handle.channel_success(id).await;
    let (mut urx, utx) = upc.split();
    for d in early {
        let _ = utx.data_bytes(d).await;
    }
    if early_eof {
        let _ = utx.eof().await;
    }
    let mask = matches!(start, Start::Exec(_) | Start::Shell) && policy::transfer(&text).is_none();
    let recording = matches!(start, Start::Shell | Start::Exec(_)) && policy::transfer(&text).is_none();
    let cast = if recording {
        super::record::Cast::create(&ctx, id, &text, pty.as_ref().map(|p| (p.cols, p.rows, p.term.as_str())))
    } else {
        None
    };
    let sftp_read_only =
        matches!(&start, Start::Subsystem(n) if n == "sftp") && ctx.profile.ssh.transfer == TransferMode::ReadOnly;
    let filter = sftp_read_only.then(super::sftp::ReadOnly::default);
    let outcome = super::relay::run(&ctx, &handle, id, &mut rx, &tx, &mut urx, &utx, mask, cast, filter).await;
    if scoped {
        let _ = up.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
    finish(&ctx, &admitted, outcome);
}

/// Tell the workload why, in its terminal, and end the channel with exit
/// status 126 (the shell's "cannot execute").
async fn refuse(handle: &server::Handle, id: ChannelId, tx: &russh::ChannelWriteHalf<server::Msg>, message: &str) {
    let _ = handle.channel_success(id).await;
    let _ = tx.extended_data_bytes(1, Bytes::from(format!("{message}\r\n"))).await;
    let _ = handle.exit_status_request(id, 126).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// The upstream could not run what was admitted: the workload reads why,
/// and the statement ends with that error.
async fn upstream_failed(
    ctx: &Ctx,
    admitted: &crate::pipeline::Admitted,
    handle: &server::Handle,
    id: ChannelId,
    tx: &russh::ChannelWriteHalf<server::Msg>,
    message: String,
) {
    refuse(handle, id, tx, &format!("cordon: {message}")).await;
    let error = ServerError { severity: "ERROR".into(), code: "upstream".into(), message };
    finish(ctx, admitted, Outcome { error: Some(error), ..Outcome::default() });
}

fn finish(ctx: &Ctx, admitted: &crate::pipeline::Admitted, outcome: Outcome) {
    if let Ok(mut p) = ctx.pipeline.lock() {
        p.finish(admitted, &outcome);
    }
}

/// A line on the workload's stderr while a command is held.
struct Notice<'a> {
    handle: &'a server::Handle,
    id: ChannelId,
}

fn rx_notice(handle: &server::Handle, id: ChannelId) -> Notice<'_> {
    Notice { handle, id }
}

impl Notice<'_> {
    async fn say(&self, text: String) {
        let _ = self.handle.extended_data(self.id, 1, Bytes::from(text)).await;
    }
}

/// The channel while its command is held: stdin is kept (bounded), a close
/// or disconnect withdraws the request.
struct Waiting<'a> {
    rx: &'a mut russh::ChannelReadHalf,
    early: &'a mut Vec<Bytes>,
    early_len: &'a mut usize,
    early_eof: &'a mut bool,
}

/// The verdict on what the channel asked to run, after approval if the
/// profile asks for it.
async fn decide(
    ctx: &Arc<Ctx>,
    start: &Start,
    text: &str,
    notice: &Notice<'_>,
    waiting: &mut Waiting<'_>,
) -> (Verdict, Option<Decision>) {
    let p = &ctx.profile.ssh;
    let deny = |rule: &str, message: String| (Verdict::Deny { rule: rule.into(), message }, None);
    match start {
        Start::Shell => match p.shell {
            ShellMode::Deny => deny(
                "shell",
                format!(
                    "interactive shells are not allowed for profile {} (profiles.{}.ssh.shell); run the command itself",
                    ctx.profile.name, ctx.profile.name
                ),
            ),
            ShellMode::Record | ShellMode::Allow => (Verdict::Allow, None),
        },
        Start::Subsystem(name) if name == "sftp" => match p.transfer {
            TransferMode::Allow => (Verdict::Allow, None),
            // Writes are answered "permission denied" by the relay.
            TransferMode::ReadOnly => (Verdict::Allow, None),
            TransferMode::Deny => {
                deny("transfer", format!("file transfer is not allowed for profile {}", ctx.profile.name))
            }
        },
        Start::Subsystem(name) => deny("subsystem", format!("the subsystem {name:?} is not allowed")),
        Start::Exec(cmd) => {
            // Parsing is bounded (length, parentheses) but still CPU work:
            // off the async workers, refused if it takes too long, and no
            // new reads once some never came back (see `bounded`).
            static JUDGES: std::sync::LazyLock<super::bounded::Bounded> =
                std::sync::LazyLock::new(|| super::bounded::Bounded::new(2, std::time::Duration::from_secs(2)));
            let (c, pol) = (cmd.clone(), p.clone());
            let (transfer, judgement) = match JUDGES.run(move || (policy::transfer(&c), policy::judge(&c, &pol))).await
            {
                Ok(j) => j,
                Err(refused) => return deny("parse_error", refused.message()),
            };
            if let Some(t) = transfer {
                return match (t, p.transfer) {
                    (_, TransferMode::Allow) | (Transfer::Download, TransferMode::ReadOnly) => (Verdict::Allow, None),
                    (Transfer::Upload, TransferMode::ReadOnly) => {
                        deny("transfer", "uploads are refused under transfer = \"read-only\"".into())
                    }
                    (_, TransferMode::Deny) => {
                        deny("transfer", format!("file transfer is not allowed for profile {}", ctx.profile.name))
                    }
                };
            }
            match judgement {
                Judgement::Allow => (Verdict::Allow, None),
                Judgement::Deny { rule, reason } => deny(rule, reason),
                Judgement::Approve { reason } => hold(ctx, text, reason, notice, waiting).await,
            }
        }
    }
}

/// Hold an exec command for approval, off russh's loop.
async fn hold(
    ctx: &Arc<Ctx>,
    text: &str,
    reason: String,
    notice: &Notice<'_>,
    waiting: &mut Waiting<'_>,
) -> (Verdict, Option<Decision>) {
    let deny = |message: String| Verdict::Deny { rule: "approval".into(), message };
    let Some(settings) = ctx.profile.approvals.as_ref() else {
        return (deny(format!("{reason}; profile {} names no approvers", ctx.profile.name)), None);
    };
    let w = &ctx.workload;
    let identity = format!("{}|{}|{}", w.cgroup_id, w.uid, w.pid);
    let upstream_user = ctx.credential().map(|c| c.user);
    let req = approvals::Request {
        session: ctx.session.clone(),
        protocol: "ssh",
        profile: ctx.profile.name.clone(),
        workload: ctx.workload.clone(),
        upstream: ctx.upstream_addr.to_string(),
        database: None,
        upstream_user: upstream_user.clone(),
        rule: "ssh.approve".into(),
        reason: reason.clone(),
        text: text.to_string(),
        full_text: text.to_string(),
        param_count: 0,
        binding: approvals::binding(&[
            text.as_bytes(),
            identity.as_bytes(),
            ctx.session.as_bytes(),
            upstream_user.unwrap_or_default().as_bytes(),
        ]),
        fingerprint: approvals::binding(&[b"command", text.as_bytes()]),
    };
    let mut hold = match ctx.shared.approvals.submit(req, settings) {
        Err(u) => return (Verdict::Deny { rule: "audit".into(), message: u.to_string() }, None),
        Ok(Submitted::Granted(d)) => return (Verdict::Allow, Some(d)),
        Ok(Submitted::Held(h)) => h,
    };
    notice
        .say(format!(
            "cordon: held for approval (request {}): {reason}\r\ncordon: approve it with: cordon approvals approve {}\r\n",
            hold.id, hold.id
        ))
        .await;
    let d = loop {
        tokio::select! {
            d = hold.decision() => break d,
            m = waiting.rx.wait() => match m {
                Some(ChannelMsg::Data { data }) if *waiting.early_len + data.len() <= EARLY_MAX => {
                    *waiting.early_len += data.len();
                    waiting.early.push(data);
                }
                Some(ChannelMsg::Eof) => *waiting.early_eof = true,
                Some(ChannelMsg::Close) | None => break hold.withdraw("client_disconnected"),
                Some(ChannelMsg::Data { .. }) => break hold.withdraw("too_much_input_while_held"),
                Some(_) => {}
            },
        }
    };
    let v = match &d {
        Decision::Approved { .. } => Verdict::Allow,
        Decision::Denied { by, reason: why, .. } => deny(format!("{reason}; denied by {by}: {why}")),
        Decision::Expired { after, .. } => deny(format!("{reason}; not approved within {} s", after.as_secs())),
        Decision::Withdrawn { cause, .. } => deny(format!("{reason}; withdrawn ({cause})")),
    };
    (v, Some(d))
}
