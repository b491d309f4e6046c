//! Session recordings: what the client received (result columns and rows,
//! notices, errors), for `cordon replay`. One JSON Lines file per session in
//! `<state_dir>/recordings/`, written through a buffer; its SHA-256 goes into
//! the hash-chained close record, so a recording cannot be altered unnoticed.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
    started: Instant,
    failed: bool,
}

pub fn path_for(dir: &Path, session: &str) -> PathBuf {
    // Session ids are "<hex>-<n>": safe as a file name.
    let safe: String = session.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    dir.join(format!("{safe}.jsonl"))
}

impl Recorder {
    pub fn create(dir: &Path, session: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let path = path_for(dir, session);
        let f = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&path)?;
        Ok(Self {
            path,
            out: BufWriter::with_capacity(64 * 1024, f),
            hash: Sha256::new(),
            bytes: 0,
            started: Instant::now(),
            failed: false,
        })
    }

    pub fn event(&mut self, stmt: u64, ev: &str, body: Value) {
        if self.failed {
            return;
        }
        let mut line = json!({"t_us": self.started.elapsed().as_micros() as u64, "stmt": stmt, "ev": ev});
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), body) {
            obj.extend(extra);
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.bytes += bytes.len() as u64;
        if let Err(e) = self.out.write_all(&bytes) {
            tracing::warn!(path = %self.path.display(), "recording stopped: {e}");
            self.failed = true;
        }
    }

    /// Flush and sync; the summary for the close record.
    pub fn finish(mut self) -> Option<Value> {
        let ok = self.out.flush().and_then(|()| self.out.get_ref().sync_data()).is_ok() && !self.failed;
        Some(json!({
            "path": self.path,
            "bytes": self.bytes,
            "sha256": hex::encode(self.hash.finalize()),
            "complete": ok,
        }))
    }
}
