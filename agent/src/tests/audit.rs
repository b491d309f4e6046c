//! Unit tests for `audit.rs`.
use std::time::{Duration, UNIX_EPOCH};

use super::*;

#[test]
fn rfc3339_round_trip() {
    let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    assert_eq!(format_rfc3339(t), "2023-11-14T22:13:20.123456Z");
    assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    assert_eq!(parse_rfc3339("2023-11-14T22:13:20.123456Z"), Some(t));
    assert_eq!(parse_rfc3339("2024-02-29"), Some(UNIX_EPOCH + Duration::from_secs(1_709_164_800)));
    assert_eq!(parse_rfc3339("garbage"), None);
}

async fn write_n(log: &AuditLog, n: usize) {
    for i in 0..n {
        log.write(Record::new("open", Some(&format!("s{i}"))).with("i", i)).await.unwrap();
    }
}

#[tokio::test]
async fn chain_verifies_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
    write_n(&log, 5).await;
    drop(log);
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
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
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
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
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
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
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
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
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
    write_n(&log, 2).await;
    drop(log);
    let seg = only_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
    drop(f);
    let log = AuditLog::open(dir.path(), Settings::default()).unwrap();
    write_n(&log, 1).await;
    let v = verify(dir.path()).unwrap();
    assert_eq!(v.last_seq, 3);
}

#[tokio::test]
async fn retention_prunes_whole_segments_and_keeps_the_chain_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let keep_all = Settings { segment_max_bytes: 300, retention: None };
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

    let settings = Settings { segment_max_bytes: 300, retention: Some(Duration::from_secs(3600)) };
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
