//! The writer: appends under one lock, group commit on one thread, and the
//! fault handling that keeps the chain intact.
//!
//! Why appends are synchronous: the caller's record must be in the kernel
//! before it goes on (a statement before it is relayed, so a statement that
//! ran always has its record). A `write(2)` into the page cache costs a few
//! microseconds; a hop to a writer thread and back costs more than that on
//! two cores. fdatasync is the slow part, and it runs on its own thread,
//! over every record written since the last one (group commit).
//!
//! Faults: a record is committed (seq and hash advanced) only once its bytes
//! are written whole into a file that is still linked. Otherwise the file is
//! cut back to the end of the last complete record, the writer drops its
//! file handles (so the operator can unmount and repair), and every append
//! fails with [`Unavailable`] until the sync thread, retrying every second,
//! can reopen the directory, finds the chain's end there, and writes the
//! outage record.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::sync::watch;

use super::{
    format_rfc3339, read, segment_name, sha256_hex, Cause, Durability, Record, Settings, Unavailable, ANCHOR, GENESIS,
    HEAD,
};

mod outage;
mod sync;

use outage::Failure;
use sync::sync_loop;

/// Size of the head file; written in place (one sector) with pwrite.
const HEAD_LEN: usize = 128;
/// How often a failed log is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often a log that stays down is said again (with the latest retry's error).
const REMIND: Duration = Duration::from_secs(10);
/// How often free space is checked against `space_left`.
const SPACE_CHECK: Duration = Duration::from_secs(1);
/// Lazily queued records (statement ends) written at the latest with this
/// many queued.
const LAZY_MAX: usize = 256;
/// While the log is down, statement ends are kept up to this many, then
/// counted as lost.
const LAZY_KEEP: usize = 65_536;
/// (seq, hash) of unsynced records kept, to resume after a filesystem lost
/// its unsynced tail.
const UNSYNCED_KEEP: usize = 1 << 20;
/// (seq, hash) of the latest synced records kept: a filesystem that fails
/// while syncing can come back from repair without records fdatasync had
/// confirmed (ext4 with an aborted journal, seen in tests/faults.rs).
const SYNCED_KEEP: usize = 4096;

/// Handle to the log; cheap to clone. The sync thread stops when the last
/// handle is dropped (after a final sync).
#[derive(Clone)]
pub struct AuditLog {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.inner.core).stop = true;
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = t.join();
        }
    }
}

struct Inner {
    dir: PathBuf,
    settings: Settings,
    core: Mutex<Core>,
    /// Wakes the sync thread: someone waits for durability, or stop.
    wake: Condvar,
    synced: watch::Sender<Synced>,
    /// Set while the log is down: a cheap check without the lock.
    failed: AtomicBool,
}

/// What the sync thread publishes to waiters.
#[derive(Debug, Clone, Default)]
struct Synced {
    seq: u64,
    /// Counts failures: a record written before one is not known durable
    /// until proven by a sync in its own epoch.
    epoch: u64,
    failure: Option<Unavailable>,
}

/// A record written into the log (in the kernel): the caller may go on.
/// [`Ticket::durable`] waits for its fdatasync.
#[must_use]
pub struct Ticket {
    seq: u64,
    epoch: u64,
    synced: watch::Receiver<Synced>,
}

impl Ticket {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Wait until the record is on disk.
    pub async fn durable(mut self) -> Result<(), Unavailable> {
        let (seq, epoch) = (self.seq, self.epoch);
        let state = self.synced.wait_for(|s| s.epoch != epoch || s.seq >= seq).await;
        match state {
            Ok(s) if s.epoch == epoch => Ok(()),
            Ok(s) => Err(s.failure.clone().unwrap_or_else(|| Unavailable {
                cause: Cause::Io,
                detail: format!("record {seq} was written before an outage and is not known to be on disk"),
                action: "see the agent's audit_outage record".into(),
            })),
            Err(_) => Err(Unavailable {
                cause: Cause::Io,
                detail: "the audit sync thread has stopped".into(),
                action: "restart the agent".into(),
            }),
        }
    }
}

struct Core {
    file: Option<File>,
    head: Option<File>,
    /// The current segment.
    path: PathBuf,
    /// End of the last complete record in the current segment.
    size: u64,
    seq: u64,
    hash: String,
    /// Reused for every batch of lines.
    buf: Vec<u8>,
    /// Records nobody waits for (statement ends): written with the next
    /// append or sync.
    lazy: Vec<Record>,
    synced_seq: u64,
    /// Hash of record `synced_seq`.
    synced_hash: String,
    epoch: u64,
    /// Records written since the last sync, oldest first.
    unsynced: VecDeque<(u64, String)>,
    /// The latest synced records, newest last (at most `SYNCED_KEEP`).
    synced_recent: VecDeque<(u64, String)>,
    sync_wanted: bool,
    last_sync: Instant,
    failure: Option<Failure>,
    /// The wall clock at the last append, to notice it stepping backwards.
    last_clock: SystemTime,
    space_low: bool,
    last_space_check: Instant,
    prune_due: bool,
    stop: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditLog {
    /// Open (or create) the log in `dir`, recovering the chain's end from the
    /// last segment (a torn final line from a crash is cut off).
    pub fn open(dir: &Path, settings: Settings) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating the audit directory {}", dir.display()))?;
        let core = Core::open(dir)?;
        let synced = Synced { seq: core.seq, epoch: 0, failure: None };
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            settings,
            core: Mutex::new(core),
            wake: Condvar::new(),
            synced: watch::Sender::new(synced),
            failed: AtomicBool::new(false),
        });
        let for_thread = inner.clone();
        let thread = thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || sync_loop(&for_thread))
            .context("starting the audit sync thread")?;
        Ok(Self { handle: Arc::new(Handle { inner, thread: Mutex::new(Some(thread)) }) })
    }

    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    pub fn dir(&self) -> &Path {
        &self.inner().dir
    }

    pub fn durability(&self) -> Durability {
        self.inner().settings.durability
    }

    /// Why the log cannot be written now, if it cannot.
    pub fn unavailable(&self) -> Option<Unavailable> {
        if !self.inner().failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.inner().core).failure.as_ref().map(|f| f.error.clone())
    }

    /// Write a record into the log before returning. With
    /// `audit_durability = "statement"` the sync thread starts a group
    /// commit at once; [`Ticket::durable`] waits for it.
    pub fn append(&self, record: &Record) -> Result<Ticket, Unavailable> {
        let statement = self.durability() == Durability::Statement;
        self.append_inner(record, statement)
    }

    fn append_inner(&self, record: &Record, sync_now: bool) -> Result<Ticket, Unavailable> {
        let inner = self.inner();
        let mut core = lock(&inner.core);
        if let Some(f) = &mut core.failure {
            f.refuse(&record.event);
            return Err(f.error.clone());
        }
        match core.write(Some(record), inner) {
            Ok(seq) => {
                let epoch = core.epoch;
                if sync_now {
                    core.sync_wanted = true;
                    inner.wake.notify_one();
                }
                drop(core);
                Ok(Ticket { seq, epoch, synced: inner.synced.subscribe() })
            }
            Err(e) => {
                core.fail(e.clone(), inner);
                if let Some(f) = &mut core.failure {
                    f.refuse(&record.event);
                }
                Err(e)
            }
        }
    }

    /// Queue a record nobody waits for (a statement's end): it is written
    /// with the next append or sync, within `sync_interval`. It never delays
    /// the caller.
    pub fn append_lazy(&self, record: Record) {
        let inner = self.inner();
        let mut core = lock(&inner.core);
        if core.lazy.len() >= LAZY_KEEP {
            if let Some(f) = &mut core.failure {
                f.dropped += 1;
            }
            return;
        }
        core.lazy.push(record);
        if core.lazy.len() >= LAZY_MAX && core.failure.is_none() {
            if let Err(e) = core.write(None, inner) {
                core.fail(e, inner);
            }
        }
    }

    /// Write a record; with `audit_durability = "statement"`, also wait for
    /// its sync. For session opens, closes and rejections.
    pub async fn write(&self, record: Record) -> Result<(), Unavailable> {
        let ticket = self.append(&record)?;
        if self.durability() == Durability::Statement {
            ticket.durable().await?;
        }
        Ok(())
    }

    /// Write a record and wait until it is on disk, whatever the durability
    /// setting (agent start and stop).
    pub async fn write_durable(&self, record: Record) -> Result<(), Unavailable> {
        self.append_inner(&record, true)?.durable().await
    }

    /// Apply retention now (the sync thread also does it after a rotation).
    pub async fn prune(&self) -> Result<()> {
        let inner = self.handle.inner.clone();
        tokio::task::spawn_blocking(move || prune(&inner.dir, inner.settings)).await.context("the prune task failed")?
    }
}

/// How many names `file` has (0: its directory entry is gone). It runs
/// once per statement, so it asks statx(2) for the link count alone: an
/// fstat(2) also reads the change time, and on kernels with multigrain
/// timestamps (6.13+, ext4, xfs, btrfs, tmpfs) a change time read forces
/// the next write to stamp the inode anew, which dirties it and opens a
/// journal handle on every append (ext4_dirty_inode, seen under pgbench).
fn links(file: &File) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH (the descriptor itself), and a statx the kernel fills.
    let r = unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_NLINK, &mut stx) };
    if r == 0 && stx.stx_mask & libc::STATX_NLINK != 0 {
        return Ok(stx.stx_nlink);
    }
    let e = std::io::Error::last_os_error();
    if r != 0 && e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    // Kernels before 4.11 (no statx), or a filesystem that did not say.
    nix::sys::stat::fstat(file).map(|m| m.st_nlink as u32).map_err(std::io::Error::from)
}

impl Core {
    fn open(dir: &Path) -> Result<Self> {
        let (seq, hash, path, size) = chain_end(dir)?;
        let file = open_append(&path).with_context(|| format!("opening the audit segment {}", path.display()))?;
        let len = file.metadata()?.len();
        if len > size {
            // A crash mid-write: the torn line is cut off, never chained onto.
            tracing::warn!(segment = %path.display(), "cutting a torn final audit record ({} bytes)", len - size);
            file.set_len(size).with_context(|| format!("cutting a torn record off {}", path.display()))?;
        }
        let head = open_head(dir)?;
        Ok(Self {
            file: Some(file),
            head: Some(head),
            path,
            size,
            seq,
            hash: hash.clone(),
            buf: Vec::with_capacity(64 * 1024),
            lazy: Vec::new(),
            synced_seq: seq,
            synced_hash: hash,
            epoch: 0,
            unsynced: VecDeque::new(),
            synced_recent: VecDeque::new(),
            sync_wanted: false,
            last_sync: Instant::now(),
            failure: None,
            last_clock: SystemTime::now(),
            space_low: false,
            last_space_check: Instant::now() - SPACE_CHECK,
            prune_due: false,
            stop: false,
        })
    }

    /// Write the queued lazy records and `extra` as one batch. Committed
    /// (seq and hash advanced) only if every byte landed in a linked file;
    /// otherwise the file is cut back and nothing changed.
    fn write(&mut self, extra: Option<&Record>, inner: &Inner) -> Result<u64, Unavailable> {
        let dir = &inner.dir;
        if self.file.is_none() {
            return Err(Unavailable::new(Cause::Io, "the audit segment is not open".into(), dir));
        }
        if self.size >= inner.settings.segment_max_bytes {
            self.rotate(dir)?;
        }
        let now = SystemTime::now();
        let stepped_back = self.last_clock.duration_since(now).ok().filter(|d| *d >= Duration::from_secs(1));
        let clock = stepped_back.map(|back| {
            Record::new("agent", None)
                .with("action", "clock_stepped_back")
                .with("from", format_rfc3339(self.last_clock))
                .with("to", format_rfc3339(now))
                .with("by_ms", back.as_millis() as u64)
        });
        if let Some(back) = stepped_back {
            tracing::warn!("the wall clock stepped back by {back:?}: audit timestamps go backwards here (seq order stays authoritative)");
        }
        self.last_clock = now;

        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut seq = self.seq;
        let mut lines: Vec<(u64, String)> = Vec::with_capacity(self.lazy.len() + 1);
        let records = self.lazy.iter().chain(clock.as_ref()).chain(extra);
        let mut encoded = Ok(());
        for r in records {
            seq += 1;
            let start = buf.len();
            // Each record links to the hash of the line before it.
            let prev = lines.last().map_or(&self.hash, |(_, h)| h);
            if let Err(e) = r.write_line(seq, prev, &mut buf) {
                encoded = Err(e);
                break;
            }
            let h = sha256_hex(buf.get(start..).unwrap_or_default());
            buf.push(b'\n');
            lines.push((seq, h));
        }
        let hash = lines.last().map_or_else(|| self.hash.clone(), |(_, h)| h.clone());
        let result = match encoded {
            Err(e) => Err(Unavailable::new(Cause::Io, format!("encoding an audit record: {e}"), dir)),
            Ok(()) => self.write_bytes(&buf, dir),
        };
        self.buf = buf;
        match result {
            Ok(len) => {
                self.size += len;
                self.seq = seq;
                self.hash = hash;
                self.lazy.clear();
                if self.unsynced.len() + lines.len() > UNSYNCED_KEEP {
                    let excess = (self.unsynced.len() + lines.len()).saturating_sub(UNSYNCED_KEEP);
                    self.unsynced.drain(..excess.min(self.unsynced.len()));
                }
                self.unsynced.extend(lines);
                Ok(seq)
            }
            // Nothing advanced: the chain still ends at the last whole record.
            Err(e) => Err(e),
        }
    }

    /// Append `buf` whole, or cut the segment back to where it was.
    fn write_bytes(&mut self, buf: &[u8], dir: &Path) -> Result<u64, Unavailable> {
        let Some(file) = self.file.as_mut() else {
            return Err(Unavailable::new(Cause::Io, "the audit segment is not open".into(), dir));
        };
        let path = &self.path;
        let written =
            file.write_all(buf).map_err(|e| Unavailable::from_io(&e, &format!("appending to {}", path.display()), dir));
        // Every write checks that its segment is still linked: a record is
        // never committed into a file that a removed directory took with it.
        let linked = written.and_then(|()| match links(file) {
            Ok(0) => Err(Unavailable::new(
                Cause::DirectoryMissing,
                format!("{} was removed while cordon was writing it", path.display()),
                dir,
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(Unavailable::from_io(&e, &format!("checking {}", path.display()), dir)),
        });
        match linked {
            Ok(()) => Ok(buf.len() as u64),
            Err(e) => {
                // A torn record must not stay: cut back to the last whole one.
                // If that fails too (read-only), recovery cuts it on reopen.
                if let Err(t) = file.set_len(self.size) {
                    tracing::error!(segment = %path.display(), "cannot cut a partly written audit record yet ({t}); it is cut when the log is reopened");
                }
                Err(e)
            }
        }
    }

    fn rotate(&mut self, dir: &Path) -> Result<(), Unavailable> {
        if let Some(f) = &self.file {
            f.sync_data().map_err(|e| Unavailable::from_io(&e, "syncing the audit segment before rotation", dir))?;
        }
        self.synced_seq = self.seq;
        self.synced_hash.clone_from(&self.hash);
        self.unsynced.clear();
        self.synced_recent.clear();
        let path = dir.join(segment_name(self.seq + 1));
        let file = open_append(&path).map_err(|e| io_of(&e, dir))?;
        self.file = Some(file);
        self.path = path;
        self.size = 0;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        self.prune_due = true;
        Ok(())
    }

    /// fdatasync under the lock (recovery and rotation only), then the head.
    fn sync_now(&mut self, inner: &Inner, seq: u64) -> Result<(), Unavailable> {
        let dir = &inner.dir;
        if let Some(f) = &self.file {
            f.sync_data().map_err(|e| Unavailable::from_io(&e, "syncing the audit segment", dir))?;
        }
        self.synced(inner, seq, self.hash.clone())
    }

    /// Record that everything up to `seq` is on disk.
    fn synced(&mut self, inner: &Inner, seq: u64, hash: String) -> Result<(), Unavailable> {
        if seq >= self.synced_seq {
            self.synced_seq = seq;
            self.synced_hash.clone_from(&hash);
        }
        while self.unsynced.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some(done) = self.unsynced.pop_front() {
                if self.synced_recent.len() >= SYNCED_KEEP {
                    self.synced_recent.pop_front();
                }
                self.synced_recent.push_back(done);
            }
        }
        self.write_head(seq, &hash, &inner.dir)?;
        inner.synced.send_replace(Synced { seq: self.synced_seq, epoch: self.epoch, failure: None });
        Ok(())
    }

    fn write_head(&mut self, seq: u64, hash: &str, dir: &Path) -> Result<(), Unavailable> {
        let Some(head) = &self.head else { return Ok(()) };
        let mark = serde_json::to_vec(&read::Mark { seq, hash: hash.to_string() }).unwrap_or_default();
        let mut block = [b' '; HEAD_LEN];
        if let Some(dst) = block.get_mut(..mark.len()) {
            dst.copy_from_slice(&mark);
        }
        head.write_all_at(&block, 0).map_err(|e| Unavailable::from_io(&e, "writing the audit head", dir))
    }
}

/// Where the chain in `dir` ends: (seq, hash, segment to append to, length
/// of its complete records). A torn final line is not counted.
fn chain_end(dir: &Path) -> Result<(u64, String, PathBuf, u64)> {
    let anchor = read::read_mark(&dir.join(ANCHOR))?;
    let (mut seq, mut hash) = match anchor {
        Some(a) => (a.seq, a.hash),
        None => (0, GENESIS.to_string()),
    };
    let segs = read::segments(dir)?;
    let Some(last) = segs.last() else { return Ok((seq, hash, dir.join(segment_name(seq + 1)), 0)) };
    // The last segment may be empty (just rotated): the end is then in the
    // one before it (or the anchor).
    for seg in segs.iter().rev() {
        let (s, h, good_len) = read::scan_tail(seg)?;
        if let (Some(s), Some(h)) = (s, h) {
            seq = s;
            hash = h;
            let size = if seg == last { good_len } else { 0 };
            return Ok((seq, hash, last.clone(), size));
        }
    }
    Ok((seq, hash, last.clone(), 0))
}

fn write_anchor(dir: &Path, seq: u64, hash: &str) -> Result<()> {
    let anchor = serde_json::to_vec(&read::Mark { seq, hash: hash.to_string() })?;
    let tmp = dir.join("audit.anchor.tmp");
    fs::write(&tmp, &anchor).with_context(|| format!("writing {}", tmp.display()))?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, dir.join(ANCHOR))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Remove whole closed segments whose newest record is older than the
/// retention, oldest first, recording where the chain now starts.
fn prune(dir: &Path, settings: Settings) -> Result<()> {
    let Some(retention) = settings.retention else { return Ok(()) };
    let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    let segs = read::segments(dir)?;
    for seg in segs.iter().take(segs.len().saturating_sub(1)) {
        let (last_seq, last_hash, _) = read::scan_tail(seg)?;
        let newest_ts = read::last_ts(seg)?;
        let old = newest_ts.as_deref().and_then(super::parse_rfc3339).is_some_and(|t| t < cutoff);
        let (Some(seq), Some(hash), true) = (last_seq, last_hash, old) else { break };
        write_anchor(dir, seq, &hash)?;
        fs::remove_file(seg)?;
        tracing::info!(segment = %seg.display(), "pruned an audit segment past retention");
    }
    Ok(())
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

fn open_head(dir: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(dir.join(HEAD))
        .with_context(|| format!("opening {}", dir.join(HEAD).display()))
}

fn io_of(e: &std::io::Error, dir: &Path) -> Unavailable {
    Unavailable::from_io(e, &format!("opening an audit segment in {}", dir.display()), dir)
}

/// An anyhow error from reading the directory: keep the OS error's cause.
fn any_of(e: &anyhow::Error, dir: &Path) -> Unavailable {
    match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
        Some(io) => Unavailable::from_io(io, &format!("{e:#}"), dir),
        None => Unavailable::new(Cause::Io, format!("{e:#}"), dir),
    }
}
