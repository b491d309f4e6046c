//! Data both ways on a started channel. The workload's input goes up as
//! it came (keystrokes are never masked); the server's output and errors
//! come down through the stream masker (`pipeline::stream_mask`) when the
//! profile masks anything, with a short idle flush so typed echo stays
//! interactive, and into the channel's recording. Output that is not text
//! is blocked when the profile masks anything (`ssh.binary = "pass"` lets
//! it through unmasked): a masked profile never sends unmasked bytes.

use std::time::Duration;

use bytes::Bytes;
use russh::{client, server, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use super::{record::Cast, Ctx};
use crate::pipeline::{stream_mask::StreamMask, Outcome};

/// How long held output waits for more before it is released anyway.
const IDLE_FLUSH: Duration = Duration::from_millis(30);

#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &Ctx,
    handle: &server::Handle,
    id: ChannelId,
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<server::Msg>,
    urx: &mut ChannelReadHalf,
    utx: &ChannelWriteHalf<client::Msg>,
    mask: bool,
    mut cast: Option<Cast>,
    mut sftp: Option<super::sftp::ReadOnly>,
) -> Outcome {
    let policy = ctx.shared.policy();
    let classifier = policy.classifier.clone();
    let masking = mask && StreamMask::needed(&classifier, &ctx.profile);
    let block_binary = masking && !ctx.profile.ssh.binary_passes;
    let mut out_mask = masking.then(|| StreamMask::new(&classifier, &ctx.profile));
    let mut err_mask = masking.then(|| StreamMask::new(&classifier, &ctx.profile));
    let idle = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(idle);
    let mut armed = false;
    let mut bytes_down = 0u64;
    let mut exit: Option<u32> = None;
    let mut signal: Option<String> = None;
    let mut blocked = false;
    // The server's EOF waits for its exit status. An OpenSSH client whose
    // input is done closes the channel as soon as output ends; russh
    // answers that close at once, so an exit status sent after it is lost
    // and the client reports 255 (a ControlMaster client does, every time
    // sshd happens to send EOF first). sshd itself never closes before the
    // exit status; holding the EOF keeps that order through cordon.
    let mut eof_held = false;
    // Send masked output of one stream (0 = stdout, 1 = stderr).
    macro_rules! emit {
        ($ext:expr, $bytes:expr) => {{
            let b: Bytes = $bytes;
            if !b.is_empty() {
                bytes_down += b.len() as u64;
                if let Some(c) = cast.as_mut() {
                    if out_mask.as_ref().is_some_and(|m| m.binary) || err_mask.as_ref().is_some_and(|m| m.binary) {
                        c.binary();
                    }
                    c.output(&b);
                }
                let sent = if $ext == 0 { tx.data_bytes(b).await } else { tx.extended_data_bytes($ext, b).await };
                if sent.is_err() {
                    break;
                }
            }
        }};
    }
    // Release what the maskers hold (exit, end of output).
    macro_rules! flush {
        () => {{
            let mut b = Vec::new();
            if let Some(mk) = out_mask.as_mut() {
                mk.flush(&mut b);
            }
            emit!(0u32, Bytes::from(b));
            let mut b = Vec::new();
            if let Some(mk) = err_mask.as_mut() {
                mk.flush(&mut b);
            }
            emit!(1u32, Bytes::from(b));
        }};
    }
    loop {
        tokio::select! {
            m = rx.wait() => match m {
                Some(ChannelMsg::Data { data }) => {
                    ctx.bytes_up.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    match sftp.as_mut().map(|f| f.feed(&data)) {
                        None => if utx.data_bytes(data).await.is_err() { break; },
                        Some(Ok(f)) => {
                            if !f.forward.is_empty() && utx.data_bytes(Bytes::from(f.forward)).await.is_err() { break; }
                            if !f.reply.is_empty() && tx.data_bytes(Bytes::from(f.reply)).await.is_err() { break; }
                        }
                        Some(Err(e)) => {
                            tracing::warn!("sftp: {e}; closing the channel");
                            let _ = utx.close().await;
                            let _ = tx.close().await;
                            break;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => { let _ = utx.eof().await; }
                Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                    if let Some(c) = cast.as_mut() { c.resize(col_width, row_height); }
                    let _ = utx.window_change(col_width, row_height, pix_width, pix_height).await;
                }
                Some(ChannelMsg::Signal { signal }) => { let _ = utx.signal(signal).await; }
                Some(ChannelMsg::Exec { .. } | ChannelMsg::RequestShell { .. } | ChannelMsg::RequestSubsystem { .. }
                    | ChannelMsg::AgentForward { .. } | ChannelMsg::RequestX11 { .. } | ChannelMsg::SetEnv { .. } | ChannelMsg::RequestPty { .. }) => {
                    // One program per channel; anything asked later is refused.
                    let _ = handle.channel_failure(id).await;
                }
                Some(ChannelMsg::Close) | None => { let _ = utx.close().await; break; }
                Some(_) => {}
            },
            m = urx.wait() => match m {
                Some(ChannelMsg::Data { data }) => match out_mask.as_mut() {
                    // Once a stream is binary the masker holds nothing and
                    // passes it as it came: the frame goes on uncopied.
                    Some(mk) if !mk.binary || block_binary => {
                        let mut b = Vec::with_capacity(data.len() + 64);
                        mk.push(&data, &mut b);
                        if mk.binary && block_binary { blocked = true; break; }
                        if mk.holding() { idle.as_mut().reset(tokio::time::Instant::now() + IDLE_FLUSH); armed = true; }
                        emit!(0u32, Bytes::from(b));
                    }
                    _ => emit!(0u32, data),
                },
                Some(ChannelMsg::ExtendedData { data, ext }) => match err_mask.as_mut() {
                    Some(mk) if !mk.binary || block_binary => {
                        let mut b = Vec::with_capacity(data.len() + 64);
                        mk.push(&data, &mut b);
                        if mk.binary && block_binary { blocked = true; break; }
                        if mk.holding() { idle.as_mut().reset(tokio::time::Instant::now() + IDLE_FLUSH); armed = true; }
                        emit!(ext, Bytes::from(b));
                    }
                    _ => emit!(ext, data),
                },
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exit = Some(exit_status);
                    if let Some(c) = cast.as_mut() { c.exit(exit_status); }
                    flush!();
                    let _ = handle.exit_status_request(id, exit_status).await;
                    if std::mem::take(&mut eof_held) { let _ = tx.eof().await; }
                }
                Some(ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag }) => {
                    signal = Some(format!("{signal_name:?}"));
                    flush!();
                    let _ = handle.exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag).await;
                    if std::mem::take(&mut eof_held) { let _ = tx.eof().await; }
                }
                Some(ChannelMsg::Eof) => {
                    flush!();
                    eof_held = true;
                }
                Some(ChannelMsg::Close) | None => {
                    flush!();
                    if eof_held { let _ = tx.eof().await; }
                    let _ = tx.close().await;
                    break;
                }
                Some(_) => {}
            },
            () = &mut idle, if armed => {
                armed = false;
                flush!();
            }
        }
    }
    if blocked {
        let _ = utx.close().await;
        let msg = "\r\ncordon: the output is not text, and this profile masks what it shows: blocked (profiles.*.ssh.binary = \"pass\" lets binary output through unmasked)\r\n";
        let _ = tx.extended_data_bytes(1, Bytes::from(msg)).await;
        let _ = handle.exit_status_request(id, 126).await;
        let _ = tx.eof().await;
        let _ = tx.close().await;
    }
    ctx.bytes_down.fetch_add(bytes_down, std::sync::atomic::Ordering::Relaxed);
    let mut tags = Vec::new();
    if let Some(s) = exit {
        tags.push(format!("exit {s}"));
    }
    if let Some(s) = signal {
        tags.push(format!("signal {s}"));
    }
    if blocked {
        tags.push("blocked: binary output".into());
    }
    let mut masked = std::collections::BTreeMap::new();
    for mk in [&out_mask, &err_mask].into_iter().flatten() {
        for (k, v) in &mk.masked {
            *masked.entry(format!("output/{k}")).or_default() += *v;
        }
    }
    if let Some(f) = &sftp {
        if !f.refused.is_empty() {
            tags.push(format!("refused: {}", f.refused.join("; ")));
        }
    }
    let recording = cast.and_then(Cast::finish);
    if let Some(r) = recording {
        if let Ok(mut list) = ctx.recordings.lock() {
            list.push(r);
        }
    }
    Outcome { tags, bytes: Some(bytes_down), masked, ..Outcome::default() }
}
