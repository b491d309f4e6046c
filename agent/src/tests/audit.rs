//! Unit tests for `audit.rs`.
use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::*;

#[test]
fn rfc3339_round_trip() {
    let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    assert_eq!(format_rfc3339(t), "2023-11-14T22:13:20.123456Z");
    assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    assert_eq!(parse_rfc3339("2023-11-14T22:13:20.123456Z"), Some(t));
    assert_eq!(parse_rfc3339("2024-02-29"), Some(UNIX_EPOCH + Duration::from_secs(1_709_164_800)));
    assert_eq!(parse_rfc3339("garbage"), None);
    // Every field at its edges, and far-future years, round-trip.
    for micros in [
        0u64,
        951_782_399_999_999,     // 2000-02-28T23:59:59.999999
        951_868_800_000_001,     // 2000-03-01
        4_107_542_400_000_000,   // 2100-03-01
        253_402_300_799_999_999, // 9999-12-31T23:59:59.999999
        253_402_300_800_000_000, // year 10000: the general path
    ] {
        let t = UNIX_EPOCH + Duration::from_micros(micros);
        let text = format_rfc3339(t);
        assert_eq!(parse_rfc3339(&text), Some(t), "{text}");
    }
    assert_eq!(format_rfc3339(UNIX_EPOCH + Duration::from_micros(951_782_399_999_999)), "2000-02-28T23:59:59.999999Z");
}

/// Settings for tests that count records: the host's free space must not
/// matter (a CI machine with less than `space_left` free would add an
/// `audit_space_low` record and shift every seq). The watermark has its own
/// test below and an end-to-end one in tests/faults.rs.
fn settings() -> Settings {
    Settings { space_left: None, ..Settings::default() }
}

async fn write_n(log: &AuditLog, n: usize) {
    for i in 0..n {
        log.write_durable(Record::new("open", Some(&format!("s{i}"))).with("i", i)).await.unwrap();
    }
}

#[tokio::test]
async fn chain_verifies_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 5).await;
    drop(log);
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 2).await;
    let v = verify(dir.path()).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (7, 1, 7));
    let recs = read_all(dir.path()).unwrap();
    assert_eq!(recs[0].prev, GENESIS);
    assert_eq!(recs[6].fields["i"], 1);
}

fn only_segment(dir: &Path) -> PathBuf {
    let segs = segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    segs[0].clone()
}

#[tokio::test]
async fn one_changed_byte_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 4).await;
    let seg = only_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let pos = bytes.windows(4).position(|w| w == b"\"s1\"").unwrap() + 2;
    bytes[pos] = b'9';
    fs::write(&seg, &bytes).unwrap();
    let err = verify(dir.path()).unwrap_err().to_string();
    assert!(err.contains("modified"), "{err}");
}

#[tokio::test]
async fn removed_last_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 3).await;
    let seg = only_segment(dir.path());
    let text = fs::read_to_string(&seg).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    fs::write(&seg, format!("{}\n", kept.join("\n"))).unwrap();
    let err = verify(dir.path()).unwrap_err().to_string();
    assert!(err.contains("removed from the end"), "{err}");
}

#[tokio::test]
async fn removed_middle_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 3).await;
    let seg = only_segment(dir.path());
    let text = fs::read_to_string(&seg).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    fs::write(&seg, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    assert!(verify(dir.path()).is_err());
}

#[tokio::test]
async fn torn_tail_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 2).await;
    drop(log);
    let seg = only_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
    drop(f);
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 1).await;
    let v = verify(dir.path()).unwrap();
    assert_eq!(v.last_seq, 3);
}

#[tokio::test]
async fn retention_prunes_whole_segments_and_keeps_the_chain_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let keep_all = Settings { segment_max_bytes: 300, retention: None, ..settings() };
    let log = AuditLog::open(dir.path(), keep_all).unwrap();
    // Old records, back-dated two hours, then fresh ones.
    let old = format_rfc3339(SystemTime::now() - Duration::from_secs(7200));
    for i in 0..6 {
        let mut r = Record::new("open", Some(&format!("old{i}")));
        r.ts = old.clone();
        log.write(r).await.unwrap();
    }
    write_n(&log, 3).await;
    drop(log);
    let before = segments(dir.path()).unwrap().len();
    assert!(before >= 4, "expected rotation, got {before} segments");

    let settings = Settings { segment_max_bytes: 300, retention: Some(Duration::from_secs(3600)), ..settings() };
    let log = AuditLog::open(dir.path(), settings).unwrap();
    log.prune().await.unwrap();
    let after = segments(dir.path()).unwrap().len();
    assert!(after < before, "nothing pruned ({before} segments before and after)");
    let v = verify(dir.path()).unwrap();
    assert!(v.first_seq > 1, "{v:?}");
    assert_eq!(v.last_seq, 9);
    // Every fresh record survived; the chain still extends.
    let recs = read_all(dir.path()).unwrap();
    assert_eq!(recs.iter().filter(|r| r.ts != old).count(), 3);
    write_n(&log, 1).await;
    assert_eq!(verify(dir.path()).unwrap().last_seq, 10);
}

/// Wait (bounded) until the writer has recovered from an outage.
async fn until_available(log: &AuditLog) {
    for _ in 0..100 {
        if log.unavailable().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the audit log did not recover: {:?}", log.unavailable());
}

#[tokio::test]
async fn a_removed_directory_fails_closed_and_the_chain_continues_anchored() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("audit");
    let log = AuditLog::open(&dir, settings()).unwrap();
    write_n(&log, 3).await;
    fs::remove_dir_all(&dir).unwrap();
    // The first append after the removal notices the unlinked segment: it
    // fails, and so does everything after it, naming the cause.
    let err = log.append(&Record::new("statement", Some("s"))).err().expect("must fail closed");
    assert_eq!(err.cause, Cause::DirectoryMissing, "{err}");
    assert!(err.to_string().contains("recreate"), "{err}");
    let again = log.append(&Record::new("open", Some("t"))).err().expect("still down");
    assert_eq!(again.cause, Cause::DirectoryMissing);
    // The operator recreates it: the writer resumes by itself, anchored.
    fs::create_dir(&dir).unwrap();
    until_available(&log).await;
    write_n(&log, 1).await;
    let v = verify(&dir).unwrap();
    assert_eq!((v.first_seq, v.last_seq), (4, 5), "{v:?}");
    let recs = read_all(&dir).unwrap();
    let outage = recs.iter().find(|r| r.fields.get("action").and_then(|a| a.as_str()) == Some("audit_outage")).unwrap();
    assert_eq!(outage.fields["cause"], "directory_missing");
    assert_eq!(outage.fields["refused_statements"], 1);
    assert_eq!(outage.fields["refused_sessions"], 1);
}

#[tokio::test]
async fn a_torn_record_is_cut_and_never_chained_onto() {
    // A partly written record (what a full disk leaves) is cut back on
    // reopen, and the chain continues from the last whole record.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 2).await;
    let seg = only_segment(dir.path());
    // Simulate a torn append while the log is failed (directory made
    // unwritable is not possible as root, so tear it by hand and force a
    // recovery through a removed-and-restored segment).
    let good = fs::read(&seg).unwrap();
    let mut torn = good.clone();
    torn.extend_from_slice(b"{\"seq\":3,\"prev\":\"ab");
    fs::remove_file(&seg).unwrap();
    assert!(log.append(&Record::new("statement", None)).is_err());
    fs::write(&seg, &torn).unwrap();
    until_available(&log).await;
    write_n(&log, 1).await;
    let v = verify(dir.path()).unwrap();
    assert_eq!(v.last_seq, 4, "{v:?}");
}

#[tokio::test]
async fn a_repaired_filesystem_that_lost_synced_records_continues_from_cordons_own_record_and_says_so() {
    // ext4 whose journal aborts during a sync can come back from e2fsck
    // without records fdatasync had confirmed. What is left is the start of
    // cordon's own chain: it goes on from there and counts the loss.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 3).await;
    let seg = only_segment(dir.path());
    let first_three = fs::read(&seg).unwrap();
    write_n(&log, 2).await; // synced: seq 4 and 5
    fs::remove_file(&seg).unwrap();
    assert!(log.append(&Record::new("statement", None)).is_err());
    fs::write(&seg, &first_three).unwrap();
    until_available(&log).await;
    write_n(&log, 1).await;
    let v = verify(dir.path()).unwrap();
    assert_eq!((v.first_seq, v.last_seq), (1, 5), "3 kept, the outage record, 1 new: {v:?}");
    let recs = read_all(dir.path()).unwrap();
    let outage = recs.iter().find(|r| r.fields.get("action").and_then(|a| a.as_str()) == Some("audit_outage")).unwrap();
    assert_eq!(outage.seq, 4);
    assert_eq!(outage.fields["lost_synced_records"], 2, "{outage:?}");
    assert_eq!(outage.fields["lost_unsynced_records"], 0, "{outage:?}");
    drop(log);

    // A file that ends at a record cordon never wrote stays refused.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), settings()).unwrap();
    write_n(&log, 3).await;
    let seg = only_segment(dir.path());
    let mut forged = fs::read(&seg).unwrap();
    write_n(&log, 2).await;
    let mut lines: Vec<Vec<u8>> = forged.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    lines.retain(|l| !l.is_empty());
    let last = lines.pop().unwrap();
    let mut other: Value = serde_json::from_slice(&last).unwrap();
    other["event"] = "close".into();
    forged = lines.join(&b'\n');
    forged.push(b'\n');
    forged.extend_from_slice(serde_json::to_string(&other).unwrap().as_bytes());
    forged.push(b'\n');
    fs::remove_file(&seg).unwrap();
    assert!(log.append(&Record::new("statement", None)).is_err());
    fs::write(&seg, &forged).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let down = log.unavailable().expect("a changed record is not cordon's chain: still down");
    assert_eq!(down.cause, Cause::Diverged, "{down}");
}

#[tokio::test]
async fn statement_durability_waits_for_the_sync_and_interval_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Settings { sync_interval: Duration::from_secs(3600), ..settings() };
    let log = AuditLog::open(dir.path(), slow).unwrap();
    // Interval: written at once, durable only at the next group commit.
    let t = log.append(&Record::new("statement", None)).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), t.durable()).await.is_err());
    assert_eq!(read_all(dir.path()).unwrap().len(), 1, "written into the file before append returned");
    drop(log);
    let strict = Settings { durability: Durability::Statement, sync_interval: Duration::from_secs(3600), ..settings() };
    let log = AuditLog::open(dir.path(), strict).unwrap();
    let t = log.append(&Record::new("statement", None)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), t.durable()).await.expect("a statement sync is not delayed").unwrap();
    assert_eq!(verify(dir.path()).unwrap().last_seq, 2);
}

#[test]
fn space_left_parses_percent_and_sizes() {
    assert_eq!(SpaceLeft::parse("10%"), Ok(SpaceLeft::Percent(10)));
    assert_eq!(SpaceLeft::parse("512MB"), Ok(SpaceLeft::Bytes(512 << 20)));
    assert_eq!(SpaceLeft::parse("2g"), Ok(SpaceLeft::Bytes(2 << 30)));
    assert_eq!(SpaceLeft::parse("4096"), Ok(SpaceLeft::Bytes(4096)));
    assert!(SpaceLeft::parse("0%").is_err());
    assert!(SpaceLeft::parse("lots").is_err());
}

#[tokio::test]
async fn a_filesystem_below_space_left_is_said_once_in_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    // No filesystem has u64::MAX bytes free: always below the watermark.
    let low = Settings { space_left: Some(SpaceLeft::Bytes(u64::MAX)), ..settings() };
    let log = AuditLog::open(dir.path(), low).unwrap();
    write_n(&log, 3).await;
    let recs = read_all(dir.path()).unwrap();
    let said: Vec<_> =
        recs.iter().filter(|r| r.fields.get("action").and_then(|a| a.as_str()) == Some("audit_space_low")).collect();
    assert_eq!(said.len(), 1, "said once, not per write: {recs:?}");
    assert!(said[0].fields["available_bytes"].as_u64().is_some());
    assert_eq!(verify(dir.path()).unwrap().records, 4);
}

#[test]
fn records_serialise_once_and_a_key_added_again_replaces_the_value() {
    let rec = Record::new("statement", Some("s\"1"))
        .with("text", "select 1; -- \"quoted\" \u{2028}")
        .with("stmt", 7)
        .with("key:with:colons", vec![1, 2])
        .with("stmt", 8)
        .with("nested", serde_json::json!({"a": [true, null]}));
    assert_eq!(rec.field("stmt"), Some(Value::from(8)));
    assert_eq!(rec.field("key:with:colons"), Some(serde_json::json!([1, 2])));
    assert_eq!(rec.field("absent"), None);
    let mut line = Vec::new();
    rec.write_line(3, GENESIS, &mut line).unwrap();
    let back: Entry = serde_json::from_slice(&line).unwrap();
    assert_eq!((back.seq, back.prev.as_str(), back.event.as_str()), (3, GENESIS, "statement"));
    assert_eq!(back.session.as_deref(), Some("s\"1"));
    assert_eq!(back.fields["text"], "select 1; -- \"quoted\" \u{2028}");
    assert_eq!(back.fields["stmt"], 8);
    assert_eq!(back.fields["nested"]["a"][1], Value::Null);
    assert_eq!(back.fields.len(), 4, "stmt once: {back:?}");
    assert_eq!(std::str::from_utf8(&line).unwrap().matches("\"stmt\"").count(), 1);
}
