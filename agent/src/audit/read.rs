//! Reading the log: segments in order, the last complete record of a
//! segment, every record, and `verify` (the whole chain against the anchor
//! and the head).

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{sha256_hex, Entry, ANCHOR, GENESIS, HEAD};

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Mark {
    pub seq: u64,
    pub hash: String,
}

pub(super) fn read_mark(path: &Path) -> Result<Option<Mark>> {
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

/// Last complete record's (seq, hash) and the length up to its end.
pub(super) fn scan_tail(path: &Path) -> Result<(Option<u64>, Option<String>, u64)> {
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
                let rec: Entry = serde_json::from_slice(line)
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

pub(super) fn last_ts(path: &Path) -> Result<Option<String>> {
    let mut last = None;
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        if let Ok(r) = serde_json::from_str::<Entry>(&line) {
            last = Some(r.ts);
        }
    }
    Ok(last)
}

/// Every record, in chain order; a line that does not parse is an error
/// naming the segment and line.
pub fn read_all(dir: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for seg in segments(dir)? {
        let file = File::open(&seg).with_context(|| format!("opening {}", seg.display()))?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", seg.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let rec: Entry = serde_json::from_str(&line)
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
            let rec: Entry = serde_json::from_slice(body)
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
