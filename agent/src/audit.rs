//! Append-only audit log: JSON Lines, one record per event, each fsync'd
//! before the writer reports it written.
//!
//! One writer thread owns the file, so records from concurrent sessions never
//! interleave, and a caller can wait until its record is durable.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

/// One audit record. `event` says which: `open`, `close`, `reject`, `agent`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// RFC 3339 UTC time.
    pub ts: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub session: Option<String>,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
}

impl Record {
    pub fn new(event: &str, session: Option<&str>) -> Self {
        Self {
            ts: now_rfc3339(),
            event: event.to_string(),
            session: session.map(str::to_string),
            fields: serde_json::Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        let v = serde_json::to_value(value).unwrap_or(Value::Null);
        self.fields.insert(key.to_string(), v);
        self
    }
}

type Job = (Record, Option<oneshot::Sender<Result<(), String>>>);

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = open_append(path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let p = path.to_owned();
        thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || writer(file, &p, rx))
            .context("starting the audit writer thread")?;
        Ok(Self { tx, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write and wait until the record is on disk.
    pub async fn write(&self, record: Record) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send((record, Some(done))).map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => Err(anyhow::anyhow!("the audit writer has stopped")),
        }
    }
}

fn open_append(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the audit log {}", path.display()))
}

fn writer(mut file: File, path: &Path, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        // Batch what is already queued under one fsync.
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 256 {
                break;
            }
        }
        let mut buf = Vec::new();
        for (rec, _) in &batch {
            if serde_json::to_writer(&mut buf, rec).is_ok() {
                buf.push(b'\n');
            }
        }
        let result = file
            .write_all(&buf)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("writing the audit log {}: {e}", path.display()));
        if let Err(e) = &result {
            tracing::error!("{e}");
        }
        for (_, done) in batch {
            if let Some(done) = done {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Read every record; a line that does not parse is reported, not skipped
/// silently.
pub fn read_all(path: &Path) -> Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("opening the audit log {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an audit record", path.display(), i + 1))?;
        out.push(rec);
    }
    Ok(out)
}

pub fn now_rfc3339() -> String {
    format_rfc3339(std::time::SystemTime::now())
}

/// RFC 3339 with microseconds, UTC, without a date library.
pub fn format_rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!("{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, (rem / 60) % 60, rem % 60, d.subsec_micros())
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[path = "tests/audit.rs"]
mod tests;
