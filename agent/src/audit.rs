//! Append-only, hash-chained audit log.
//!
//! Layout under the audit directory:
//! - `audit-<first seq, 12 digits>.jsonl`: segments of JSON Lines. Each
//!   record carries `seq` (one more than the previous) and `prev`, the
//!   SHA-256 of the previous record's line. The first record ever has
//!   `prev` = 64 zeros.
//! - `audit.head`: seq and hash of the last record written. It is rewritten
//!   after every batch, so removing records from the end is detected.
//! - `audit.anchor`: seq and hash of the last record that retention pruned,
//!   so the chain stays verifiable from its new start.
//!
//! One writer thread owns the files. Queued records are batched under one
//! `fdatasync`, and a caller can wait until its record is durable.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HEAD: &str = "audit.head";
const ANCHOR: &str = "audit.anchor";
/// Size of the head file; written in place (one sector) with pwrite.
const HEAD_LEN: usize = 128;
/// Longest a lazily submitted record stays written but not synced.
const LAZY_SYNC: Duration = Duration::from_millis(50);

/// One audit record. `event` says which: `open`, `close`, `reject`,
/// `statement`, `statement_end`, `cancel`, `agent`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Position in the chain; set by the writer.
    #[serde(default)]
    pub seq: u64,
    /// SHA-256 (hex) of the previous record's line; set by the writer.
    #[serde(default)]
    pub prev: String,
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
            seq: 0,
            prev: String::new(),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A segment is closed once it is larger than this.
    pub segment_max_bytes: u64,
    /// Whole segments whose newest record is older than this are pruned.
    pub retention: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { segment_max_bytes: 64 * 1024 * 1024, retention: None }
    }
}

type Done = oneshot::Sender<Result<(), String>>;

enum Job {
    Write(Record, Option<Done>),
    Prune(Option<Done>),
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    dir: PathBuf,
}

/// A record queued but not yet known to be durable.
pub struct Pending(oneshot::Receiver<Result<(), String>>);

impl Pending {
    pub async fn durable(self) -> Result<()> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => Err(anyhow::anyhow!("the audit writer has stopped")),
        }
    }
}

impl AuditLog {
    pub fn open(dir: &Path, settings: Settings) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating the audit directory {}", dir.display()))?;
        let mut writer = Writer::open(dir, settings)?;
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || writer.run(&rx))
            .context("starting the audit writer thread")?;
        Ok(Self { tx, dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queue a record; `Pending::durable` waits until it is on disk.
    pub fn submit(&self, record: Record) -> Pending {
        let (done, wait) = oneshot::channel();
        // A stopped writer drops `done`, which `durable` reports.
        let _ = self.tx.send(Job::Write(record, Some(done)));
        Pending(wait)
    }

    /// Queue a record nobody waits for: it is written at once and made
    /// durable with the next record someone does wait for (or within
    /// `LAZY_SYNC`), so statement ends do not each cost an fsync.
    pub fn submit_lazy(&self, record: Record) {
        let _ = self.tx.send(Job::Write(record, None));
    }

    /// Write and wait until the record is on disk.
    pub async fn write(&self, record: Record) -> Result<()> {
        self.submit(record).durable().await
    }

    /// Apply retention now (the writer also does it when it rotates).
    pub async fn prune(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        let _ = self.tx.send(Job::Prune(Some(done)));
        Pending(wait).durable().await
    }
}

struct Writer {
    dir: PathBuf,
    settings: Settings,
    file: File,
    size: u64,
    head: File,
    seq: u64,
    last_hash: String,
    /// Written but not yet synced.
    dirty: bool,
}

fn segment_name(first_seq: u64) -> String {
    format!("audit-{first_seq:012}.jsonl")
}

/// Segments in chain order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing the audit directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn sha256_hex(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Mark {
    seq: u64,
    hash: String,
}

fn read_mark(path: &Path) -> Result<Option<Mark>> {
    match fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let text = text.trim_end_matches(['\0', ' ', '\n']);
            if text.is_empty() {
                return Ok(None);
            }
            let m = serde_json::from_str(text).with_context(|| format!("{} is corrupt", path.display()))?;
            Ok(Some(m))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Writer {
    fn open(dir: &Path, settings: Settings) -> Result<Self> {
        let segs = segments(dir)?;
        let anchor = read_mark(&dir.join(ANCHOR))?;
        let (mut seq, mut last_hash) = match &anchor {
            Some(a) => (a.seq, a.hash.clone()),
            None => (0, GENESIS.to_string()),
        };
        let path = match segs.last() {
            Some(last) => {
                // Recover the chain position from the log itself; a torn last
                // line (crash mid-write) is cut off, not chained onto.
                let (s, h, good_len) = scan_tail(last)?;
                if let Some((s, h)) = s.zip(h) {
                    seq = s;
                    last_hash = h;
                }
                let len = fs::metadata(last)?.len();
                if good_len < len {
                    tracing::warn!(segment = %last.display(), "cutting a torn final audit record ({} bytes)", len - good_len);
                    OpenOptions::new().write(true).open(last)?.set_len(good_len)?;
                }
                last.clone()
            }
            None => dir.join(segment_name(seq + 1)),
        };
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let head = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(dir.join(HEAD))
            .with_context(|| format!("opening {}", dir.join(HEAD).display()))?;
        Ok(Self { dir: dir.to_owned(), settings, file, size, head, seq, last_hash, dirty: false })
    }

    fn run(&mut self, rx: &mpsc::Receiver<Job>) {
        loop {
            let first = if self.dirty {
                match rx.recv_timeout(LAZY_SYNC) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.sync() {
                            tracing::error!("audit log: {e:#}");
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = self.sync();
                        return;
                    }
                }
            } else {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            };
            let mut batch = vec![first];
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let mut done = Vec::new();
            let mut records = Vec::new();
            let mut prune = false;
            for job in batch {
                match job {
                    Job::Write(r, d) => {
                        records.push(r);
                        done.extend(d);
                    }
                    Job::Prune(d) => {
                        prune = true;
                        done.extend(d);
                    }
                }
            }
            // Only a batch someone waits for is synced now.
            let waited = !done.is_empty();
            let mut result = self.append(records, waited);
            if prune && result.is_ok() {
                result = self.prune();
            }
            let result = result.map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                tracing::error!("audit log: {e}");
            }
            for d in done {
                let _ = d.send(result.clone());
            }
        }
    }

    fn append(&mut self, records: Vec<Record>, sync: bool) -> Result<()> {
        if records.is_empty() {
            return if sync { self.sync() } else { Ok(()) };
        }
        if self.size >= self.settings.segment_max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(records.len() * 256);
        for mut r in records {
            r.seq = self.seq + 1;
            r.prev = std::mem::take(&mut self.last_hash);
            let start = buf.len();
            serde_json::to_writer(&mut buf, &r).context("encoding an audit record")?;
            self.last_hash = sha256_hex(buf.get(start..).unwrap_or_default());
            self.seq = r.seq;
            buf.push(b'\n');
        }
        self.file.write_all(&buf).context("appending to the audit log")?;
        self.size += buf.len() as u64;
        self.dirty = true;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// fdatasync the log, then record the new end in the head. The head is
    /// not synced: after a crash it can only be behind the log, which
    /// `verify` accepts; removing records still leaves it ahead.
    fn sync(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.file.sync_data().context("syncing the audit log")?;
        self.dirty = false;
        self.write_head()
    }

    fn write_head(&mut self) -> Result<()> {
        let mark = serde_json::to_vec(&Mark { seq: self.seq, hash: self.last_hash.clone() })?;
        let mut block = [b' '; HEAD_LEN];
        if let Some(dst) = block.get_mut(..mark.len()) {
            dst.copy_from_slice(&mark);
        }
        self.head.write_all_at(&block, 0).context("writing the audit head")
    }

    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let path = self.dir.join(segment_name(self.seq + 1));
        self.file = open_append(&path)?;
        self.size = 0;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.prune()
    }

    /// Remove whole closed segments whose newest record is older than the
    /// retention, oldest first, recording where the chain now starts.
    fn prune(&mut self) -> Result<()> {
        let Some(retention) = self.settings.retention else { return Ok(()) };
        let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let segs = segments(&self.dir)?;
        let mut current_len = segs.len();
        for seg in segs.iter().take(segs.len().saturating_sub(1)) {
            let (last_seq, last_hash, _) = scan_tail(seg)?;
            let newest_ts = last_ts(seg)?;
            let old = newest_ts.as_deref().and_then(parse_rfc3339).is_some_and(|t| t < cutoff);
            let (Some(seq), Some(hash), true) = (last_seq, last_hash, old) else { break };
            let anchor = serde_json::to_vec(&Mark { seq, hash })?;
            let tmp = self.dir.join("audit.anchor.tmp");
            fs::write(&tmp, &anchor)?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, self.dir.join(ANCHOR))?;
            fs::remove_file(seg)?;
            current_len -= 1;
            tracing::info!(segment = %seg.display(), "pruned an audit segment past retention");
        }
        let _ = current_len;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the audit segment {}", path.display()))
}

/// Last complete record's (seq, hash) and the length up to its end.
fn scan_tail(path: &Path) -> Result<(Option<u64>, Option<String>, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    // Read the tail in growing windows until one holds a full line.
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let good_end = buf.iter().rposition(|b| *b == b'\n').map(|i| i + 1);
        if let Some(end) = good_end {
            let body = buf.get(..end.saturating_sub(1)).unwrap_or_default();
            let line_start = body.iter().rposition(|b| *b == b'\n').map(|i| i + 1);
            if line_start.is_some() || start == 0 {
                let line = body.get(line_start.unwrap_or(0)..).unwrap_or_default();
                let rec: Record = serde_json::from_slice(line)
                    .with_context(|| format!("the last record of {} does not parse", path.display()))?;
                return Ok((Some(rec.seq), Some(sha256_hex(line)), start + end as u64));
            }
        } else if start == 0 {
            return Ok((None, None, 0));
        }
        if start == 0 {
            return Ok((None, None, 0));
        }
        window = window.saturating_mul(4);
    }
}

fn last_ts(path: &Path) -> Result<Option<String>> {
    let mut last = None;
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        if let Ok(r) = serde_json::from_str::<Record>(&line) {
            last = Some(r.ts);
        }
    }
    Ok(last)
}

/// Every record, in chain order; a line that does not parse is an error
/// naming the segment and line.
pub fn read_all(dir: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for seg in segments(dir)? {
        let file = File::open(&seg).with_context(|| format!("opening {}", seg.display()))?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", seg.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let rec: Record = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not an audit record", seg.display(), i + 1))?;
            out.push(rec);
        }
    }
    Ok(out)
}

/// The result of `cordon audit verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub segments: usize,
}

/// Check the whole chain: every record's `prev` is the hash of the one
/// before, seqs are consecutive, the start matches the anchor (or genesis)
/// and the end matches the head.
pub fn verify(dir: &Path) -> Result<Verified> {
    let anchor = read_mark(&dir.join(ANCHOR))?;
    let head = read_mark(&dir.join(HEAD))?;
    let (mut seq, mut hash) = match &anchor {
        Some(a) => (a.seq, a.hash.clone()),
        None => (0, GENESIS.to_string()),
    };
    let first_seq = seq + 1;
    let segs = segments(dir)?;
    let mut records = 0;
    for seg in &segs {
        let mut reader = BufReader::new(File::open(seg).with_context(|| format!("opening {}", seg.display()))?);
        let mut line = Vec::new();
        let mut n = 0;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            n += 1;
            let at = format!("{}:{n}", seg.display());
            if line.last() != Some(&b'\n') {
                bail!("{at}: the record is cut off (no newline): the log was truncated");
            }
            let body = line.get(..line.len() - 1).unwrap_or_default();
            let rec: Record = serde_json::from_slice(body)
                .with_context(|| format!("{at}: the record does not parse: it was modified"))?;
            if rec.seq != seq + 1 {
                bail!("{at}: seq {} follows {seq}: records were removed or reordered", rec.seq);
            }
            if rec.prev != hash {
                bail!("{at}: seq {}: prev does not match the hash of record {seq}: a record before it was modified or removed", rec.seq);
            }
            hash = sha256_hex(body);
            seq = rec.seq;
            records += 1;
        }
    }
    match head {
        Some(h) if h.seq > seq => bail!(
            "the log ends at record {seq} but the head says {} records were written: records were removed from the end",
            h.seq
        ),
        Some(h) if h.seq == seq && h.hash != hash => {
            bail!("record {seq} does not match the head's hash: the last record was modified")
        }
        None if records > 0 => bail!("{} is missing", dir.join(HEAD).display()),
        _ => {}
    }
    Ok(Verified { records, first_seq, last_seq: seq, segments: segs.len() })
}

pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

/// RFC 3339 with microseconds, UTC, without a date library.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!("{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, (rem / 60) % 60, rem % 60, d.subsec_micros())
}

/// Parse what `format_rfc3339` writes (and whole-second or date-only forms).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim_end_matches('Z');
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00"));
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next().flatten().unwrap_or(0));
    let micros: u64 = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    let days = days_from_civil(y, u32::try_from(m).ok()?, u32::try_from(dd).ok()?);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
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

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
#[path = "tests/audit.rs"]
mod tests;
