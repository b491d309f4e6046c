//! The sync thread: group commit, retention after rotation, free space,
//! and retrying a failed log (`outage.rs`).

use super::*;

/// The sync thread: group commit, retention after rotation, free space,
/// and retrying a failed log.
pub(super) fn sync_loop(inner: &Inner) {
    let interval = inner.settings.sync_interval;
    let mut core = lock(&inner.core);
    loop {
        if core.stop {
            if core.failure.is_none() {
                if !core.lazy.is_empty() {
                    let _ = core.write(None, inner);
                }
                let seq = core.seq;
                let _ = core.sync_now(inner, seq);
            }
            return;
        }
        if core.retry_due() {
            core.retry(inner);
            continue;
        }
        let due = core.last_sync.elapsed() >= interval;
        let pending = core.seq > core.synced_seq || !core.lazy.is_empty();
        if core.failure.is_none() && pending && (core.sync_wanted || due) {
            core = group_commit(inner, core);
            continue;
        }
        if core.prune_due {
            core.prune_due = false;
            drop(core);
            if let Err(e) = prune(&inner.dir, inner.settings) {
                tracing::error!("audit retention: {e:#}");
            }
            core = lock(&inner.core);
            continue;
        }
        if core.failure.is_none() && core.last_space_check.elapsed() >= SPACE_CHECK {
            core.last_space_check = Instant::now();
            drop(core);
            let space = space_check(inner);
            core = lock(&inner.core);
            if let Some((low, avail, total)) = space {
                space_crossed(inner, &mut core, low, avail, total);
            }
            continue;
        }
        let wait = if core.failure.is_some() {
            RETRY
        } else if pending {
            interval.saturating_sub(core.last_sync.elapsed()).max(Duration::from_micros(100))
        } else {
            interval.max(Duration::from_millis(100))
        };
        core = inner.wake.wait_timeout(core, wait).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// One group commit: flush lazy records, then fdatasync outside the lock so
/// appends go on meanwhile.
fn group_commit<'a>(inner: &'a Inner, mut core: MutexGuard<'a, Core>) -> MutexGuard<'a, Core> {
    if !core.lazy.is_empty() {
        if let Err(e) = core.write(None, inner) {
            core.fail(e, inner);
            return core;
        }
    }
    core.sync_wanted = false;
    let (seq, hash, epoch) = (core.seq, core.hash.clone(), core.epoch);
    let file = core.file.as_ref().and_then(|f| f.try_clone().ok());
    drop(core);
    let result = match &file {
        Some(f) => f.sync_data().map_err(|e| Unavailable::from_io(&e, "syncing the audit log", &inner.dir)),
        None => Err(Unavailable::new(Cause::Io, "the audit segment is not open".into(), &inner.dir)),
    };
    let mut core = lock(&inner.core);
    core.last_sync = Instant::now();
    if core.epoch != epoch || core.failure.is_some() {
        return core;
    }
    match result.and_then(|()| core.synced(inner, seq, hash)) {
        Ok(()) => {}
        // The records stay in the page cache and the file; the outage says
        // the sync failed. Linux may have dropped the dirty pages: the
        // recovery's reopen then finds where the file really ends.
        Err(e) => core.fail(e, inner),
    }
    core
}

/// Free space against `space_left`: (below it, available, total).
fn space_check(inner: &Inner) -> Option<(bool, u64, u64)> {
    let watermark = inner.settings.space_left?;
    let st = nix::sys::statvfs::statvfs(&inner.dir).ok()?;
    let frsize = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frsize;
    let avail = st.blocks_available() as u64 * frsize;
    Some((avail < watermark.threshold(total), avail, total))
}

/// Say so when free space crosses `space_left`, either way: a warning in
/// the log and, going below, an `audit_space_low` record (auditd's
/// `space_left_action = SYSLOG`).
fn space_crossed(inner: &Inner, core: &mut Core, low: bool, avail: u64, total: u64) {
    if low == core.space_low {
        return;
    }
    core.space_low = low;
    let Some(watermark) = inner.settings.space_left else { return };
    let dir = inner.dir.display();
    if low {
        tracing::warn!(
            dir = %dir,
            available_bytes = avail,
            "the audit filesystem is below space_left ({watermark}): free space or move agent.audit_dir; when it is full, cordon refuses sessions and statements"
        );
        core.lazy.push(
            Record::new("agent", None)
                .with("action", "audit_space_low")
                .with("available_bytes", avail)
                .with("total_bytes", total)
                .with("space_left", watermark.to_string()),
        );
    } else {
        tracing::info!(dir = %dir, available_bytes = avail, "the audit filesystem is above space_left again");
    }
}
