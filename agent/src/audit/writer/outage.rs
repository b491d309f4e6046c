//! When the log cannot be written: failing closed (`Core::fail`), and the
//! sync thread's recovery, which reopens the directory, finds where the
//! chain really ends there (the filesystem may have lost records) and
//! writes the `audit_outage` record.

use super::*;

pub(super) struct Failure {
    /// What started the outage (the outage record's cause).
    first: Unavailable,
    /// The latest retry's error (a repair passes through others: an
    /// unmounted filesystem is a missing directory for a while).
    pub(super) error: Unavailable,
    started: SystemTime,
    since: Instant,
    last_try: Instant,
    /// When the operator was last told it is still down (every
    /// `REMIND` while retries fail the same way).
    last_said: Instant,
    retries: u64,
    refused_sessions: u64,
    refused_statements: u64,
    refused_other: u64,
    /// Statement ends dropped because too many were waiting.
    pub(super) dropped: u64,
}

impl Failure {
    pub(super) fn refuse(&mut self, event: &str) {
        match event {
            "open" => self.refused_sessions += 1,
            "statement" => self.refused_statements += 1,
            _ => self.refused_other += 1,
        }
    }
}

impl Core {
    /// Stop writing: drop the file handles (so a broken filesystem can be
    /// unmounted and repaired) and tell every waiter.
    pub(super) fn fail(&mut self, error: Unavailable, inner: &Inner) {
        tracing::error!("{error}");
        self.file = None;
        self.head = None;
        self.epoch += 1;
        let now = Instant::now();
        self.failure = Some(Failure {
            first: error.clone(),
            error: error.clone(),
            started: SystemTime::now(),
            since: now,
            last_try: now,
            last_said: now,
            retries: 0,
            refused_sessions: 0,
            refused_statements: 0,
            refused_other: 0,
            dropped: 0,
        });
        inner.failed.store(true, Ordering::Release);
        let (seq, epoch) = (self.synced_seq, self.epoch);
        inner.synced.send_replace(Synced { seq, epoch, failure: Some(error) });
    }

    /// Reopen the directory, find the chain's end there, and write the
    /// outage record. On success the log is back.
    pub(super) fn recover(&mut self, inner: &Inner) -> Result<(), Unavailable> {
        let dir = &inner.dir;
        if !dir.is_dir() {
            return Err(Unavailable::new(Cause::DirectoryMissing, format!("{} does not exist", dir.display()), dir));
        }
        let segs = read::segments(dir).map_err(|e| any_of(&e, dir))?;
        let mut lost = 0u64;
        let mut lost_synced = 0u64;
        let (path, size) = match segs.last() {
            None => {
                // An empty directory (recreated, or a fresh filesystem): the
                // chain continues here from an anchor at cordon's position.
                write_anchor(dir, self.seq, &self.hash).map_err(|e| any_of(&e, dir))?;
                (dir.join(segment_name(self.seq + 1)), 0)
            }
            Some(last) => {
                // Records of a batch that failed part-way may have landed
                // whole before the error; they were never committed, so the
                // segment is cut back to cordon's end first.
                if *last == self.path {
                    self.cut_back_uncommitted(dir)?;
                }
                let (end_seq, end_hash, path, good_len) = chain_end(dir).map_err(|e| any_of(&e, dir))?;
                if end_seq == self.seq && end_hash == self.hash {
                } else if end_seq == self.synced_seq && end_hash == self.synced_hash {
                    // The filesystem lost everything since the last sync.
                    lost = self.seq - end_seq;
                    self.unsynced.clear();
                    self.seq = end_seq;
                    self.hash = end_hash;
                } else if let Some(pos) = self.unsynced.iter().position(|(s, h)| *s == end_seq && *h == end_hash) {
                    // The filesystem lost records it had not synced: resume
                    // after the last one it kept, and say how many went.
                    lost = self.seq - end_seq;
                    self.unsynced.truncate(pos + 1);
                    self.seq = end_seq;
                    self.hash = end_hash;
                } else if let Some(pos) = self.synced_recent.iter().position(|(s, h)| *s == end_seq && *h == end_hash) {
                    // The repaired filesystem ends at an earlier record of
                    // this chain, before records fdatasync had confirmed: it
                    // broke its promise (an aborted ext4 journal does). The
                    // chain goes on from what is really there, and the
                    // outage record says how many confirmed records went.
                    lost = self.seq - end_seq;
                    lost_synced = self.synced_seq - end_seq;
                    tracing::error!(
                        lost_synced_records = lost_synced,
                        from_seq = end_seq + 1,
                        "the repaired audit filesystem lost records it had confirmed as synced; the chain continues from record {end_seq} and the outage record says so"
                    );
                    self.synced_recent.truncate(pos + 1);
                    self.unsynced.clear();
                    self.seq = end_seq;
                    self.hash.clone_from(&end_hash);
                    self.synced_seq = end_seq;
                    self.synced_hash = end_hash;
                } else {
                    return Err(Unavailable::new(
                        Cause::Diverged,
                        format!(
                            "{} ends at record {end_seq}, but cordon's chain ends at record {}",
                            last.display(),
                            self.seq
                        ),
                        dir,
                    ));
                }
                (path, good_len)
            }
        };
        let file = open_append(&path).map_err(|e| io_of(&e, dir))?;
        let len = file.metadata().map_err(|e| Unavailable::from_io(&e, "reading the segment's size", dir))?.len();
        if len > size {
            file.set_len(size)
                .map_err(|e| Unavailable::from_io(&e, &format!("cutting a torn record off {}", path.display()), dir))?;
            tracing::warn!(segment = %path.display(), "cut {} bytes of a partly written audit record", len - size);
        }
        self.file = Some(file);
        self.head = Some(open_head(dir).map_err(|e| any_of(&e, dir))?);
        self.path = path;
        self.size = size;
        let Some(f) = &self.failure else { return Ok(()) };
        let mut outage = Record::new("agent", None)
            .with("action", "audit_outage")
            .with("cause", f.first.cause)
            .with("detail", &f.first.detail)
            .with("started", format_rfc3339(f.started))
            .with("duration_ms", f.since.elapsed().as_millis() as u64)
            .with("refused_sessions", f.refused_sessions)
            .with("refused_statements", f.refused_statements)
            .with("refused_other", f.refused_other)
            .with("dropped_statement_ends", f.dropped)
            .with("lost_unsynced_records", lost - lost_synced)
            .with("lost_synced_records", lost_synced);
        if f.error != f.first {
            outage = outage.with("last_cause", f.error.cause).with("last_detail", &f.error.detail);
        }
        let (outage_ms, statements, sessions) =
            (f.since.elapsed().as_millis() as u64, f.refused_statements, f.refused_sessions);
        let seq = self.write(Some(&outage), inner)?;
        self.sync_now(inner, seq)?;
        tracing::info!(
            outage_ms,
            refused_statements = statements,
            refused_sessions = sessions,
            "the audit log is writable again"
        );
        self.failure = None;
        inner.failed.store(false, Ordering::Release);
        Ok(())
    }

    /// Cut the current segment back to the end of the last committed record
    /// when it is longer (a failed batch's lines), once that end is
    /// confirmed to be cordon's record.
    pub(super) fn cut_back_uncommitted(&mut self, dir: &Path) -> Result<(), Unavailable> {
        let Ok(meta) = fs::metadata(&self.path) else { return Ok(()) };
        if meta.len() <= self.size {
            return Ok(());
        }
        let f = OpenOptions::new().read(true).write(true).open(&self.path).map_err(|e| io_of(&e, dir))?;
        // The committed end must be a line boundary whose line is ours.
        let from = self.size.saturating_sub(64 * 1024);
        let mut tail = vec![0u8; usize::try_from(self.size - from).unwrap_or(0)];
        f.read_exact_at(&mut tail, from).map_err(|e| Unavailable::from_io(&e, "reading the audit segment", dir))?;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let line = body.rsplit(|b| *b == b'\n').next().unwrap_or(body);
        let ours = (self.size == 0 && self.seq == self.synced_seq) || sha256_hex(line) == self.hash;
        if !ours {
            return Ok(());
        }
        f.set_len(self.size).map_err(|e| {
            Unavailable::from_io(&e, &format!("cutting uncommitted records off {}", self.path.display()), dir)
        })?;
        tracing::warn!(segment = %self.path.display(), "cut {} bytes of records from a batch that failed", meta.len() - self.size);
        Ok(())
    }

    /// A failed log whose next retry is due (every `RETRY`).
    pub(super) fn retry_due(&self) -> bool {
        self.failure.as_ref().is_some_and(|f| f.last_try.elapsed() >= RETRY)
    }

    /// One recovery attempt. A new error is logged and published at once;
    /// the same error again is said every `REMIND`.
    pub(super) fn retry(&mut self, inner: &Inner) {
        if let Some(f) = &mut self.failure {
            f.last_try = Instant::now();
        }
        let Err(e) = self.recover(inner) else { return };
        self.file = None;
        self.head = None;
        let (seq, epoch) = (self.synced_seq, self.epoch);
        let Some(f) = &mut self.failure else { return };
        f.retries += 1;
        if f.error != e {
            tracing::error!("{e}");
            f.error = e.clone();
            f.last_said = Instant::now();
            inner.synced.send_replace(Synced { seq, epoch, failure: Some(e) });
        } else if f.last_said.elapsed() >= REMIND {
            f.last_said = Instant::now();
            tracing::warn!(
                down_for_s = f.since.elapsed().as_secs(),
                retries = f.retries,
                refused_sessions = f.refused_sessions,
                refused_statements = f.refused_statements,
                "the audit log is still unavailable; the last retry: {e}"
            );
        }
    }
}
