//! Channel recordings in asciicast v3: the masked output the workload saw
//! (never its input: passwords are typed at prompts), resizes and the exit
//! status. Event times are intervals since the previous event, in
//! milliseconds, quantized with the error carried forward so they do not
//! drift. One file per channel, 0600, in the recordings directory; its
//! SHA-256 goes into the session's hash-chained close record.

use std::{
    io::Write,
    path::PathBuf,
    time::{Instant, SystemTime},
};

use russh::ChannelId;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::Ctx;

pub struct Cast {
    path: PathBuf,
    file: std::fs::File,
    hash: Sha256,
    bytes: u64,
    started: Instant,
    /// Milliseconds already written (the quantized clock).
    written_ms: u128,
    /// An incomplete UTF-8 character at the end of the last output.
    carry: Vec<u8>,
    channel: u32,
    failed: bool,
    /// The output turned out binary: not written as terminal text (a
    /// marker says so and how many bytes followed).
    binary: Option<u64>,
}

impl Cast {
    pub fn create(ctx: &Ctx, id: ChannelId, command: &str, pty: Option<(u32, u32, &str)>) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = ctx.shared.recordings_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("cannot create {}: {e}", dir.display());
            return None;
        }
        let channel = u32::from(id);
        let path = dir.join(format!("{}-ch{channel}.cast", ctx.session));
        let file = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot create the recording {}: {e}", path.display());
                return None;
            }
        };
        let (cols, rows, term) = pty.unwrap_or((80, 24, "dumb"));
        let ts = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let header = json!({
            "version": 3,
            "term": {"cols": cols, "rows": rows, "type": term},
            "timestamp": ts,
            "command": command,
            "title": format!("cordon session {} channel {channel}", ctx.session),
            "env": {"SHELL": "/bin/sh"},
        });
        let mut c = Self {
            path,
            file,
            hash: Sha256::new(),
            bytes: 0,
            started: Instant::now(),
            written_ms: 0,
            carry: Vec::new(),
            channel,
            failed: false,
            binary: None,
        };
        c.line(&header.to_string());
        Some(c)
    }

    fn line(&mut self, s: &str) {
        if self.failed {
            return;
        }
        let mut b = s.as_bytes().to_vec();
        b.push(b'\n');
        if let Err(e) = self.file.write_all(&b) {
            // The audit says the recording is incomplete (its hash covers
            // what was written); the session is not stopped for it.
            tracing::warn!("writing the recording {}: {e}", self.path.display());
            self.failed = true;
            return;
        }
        self.hash.update(&b);
        self.bytes += b.len() as u64;
    }

    /// The interval since the previous event, in seconds with 3 decimals,
    /// quantized against the total written so rounding does not drift.
    fn interval(&mut self) -> String {
        let now = self.started.elapsed().as_millis();
        let step = now.saturating_sub(self.written_ms);
        self.written_ms += step;
        format!("{}.{:03}", step / 1000, step % 1000)
    }

    fn event(&mut self, code: &str, data: &str) {
        let t = self.interval();
        let line = format!("[{t}, {}, {}]", Value::from(code), Value::from(data));
        self.line(&line);
    }

    pub fn output(&mut self, b: &[u8]) {
        // Not text (a NUL, invalid UTF-8): counted from here, not recorded
        // (and not scanned again once the stream is binary).
        if self.binary.is_none() && (b.contains(&0) || std::str::from_utf8(b).is_err_and(|e| e.error_len().is_some())) {
            self.binary();
        }
        if let Some(n) = self.binary.as_mut() {
            *n += b.len() as u64;
            return;
        }
        self.carry.extend_from_slice(b);
        let (text, rest) = decode(&self.carry);
        self.carry = rest;
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    /// From here on the output is binary: it is counted, not recorded (a
    /// terminal recording of it would be neither readable nor small).
    pub fn binary(&mut self) {
        if self.binary.is_none() {
            self.event("m", "binary output follows: not recorded");
            self.binary = Some(0);
        }
    }

    pub fn resize(&mut self, cols: u32, rows: u32) {
        self.event("r", &format!("{cols}x{rows}"));
    }

    pub fn exit(&mut self, status: u32) {
        self.event("x", &status.to_string());
    }

    /// Close the file; what goes into the close record.
    pub fn finish(mut self) -> Option<Value> {
        if !self.carry.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned();
            self.event("o", &rest);
        }
        let _ = self.file.sync_all();
        Some(json!({
            "channel": self.channel,
            "path": self.path.display().to_string(),
            "format": "asciicast-v3",
            "sha256": hex::encode(self.hash.finalize()),
            "bytes": self.bytes,
            "complete": !self.failed,
            "binary_bytes_not_recorded": self.binary,
        }))
    }
}

/// Valid UTF-8 text (invalid bytes as U+FFFD) and an incomplete tail.
fn decode(b: &[u8]) -> (String, Vec<u8>) {
    let mut out = String::new();
    let mut rest = b;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return (out, Vec::new());
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    None => return (out, bad.to_vec()),
                    Some(n) => {
                        out.push('\u{fffd}');
                        rest = bad.get(n..).unwrap_or_default();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utf8_carry_and_replacement() {
        let s = "é".as_bytes();
        let (t, rest) = super::decode(&s[..1]);
        assert_eq!((t.as_str(), rest.as_slice()), ("", &s[..1]));
        let (t, rest) = super::decode(b"a\xffb");
        assert_eq!((t.as_str(), rest.len()), ("a\u{fffd}b", 0));
    }
}
