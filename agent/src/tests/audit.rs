//! Unit tests for `audit.rs`.
use super::*;
use std::time::{Duration, UNIX_EPOCH};

#[test]
fn rfc3339() {
    let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    assert_eq!(format_rfc3339(t), "2023-11-14T22:13:20.123456Z");
    assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
}

#[tokio::test]
async fn writes_are_durable_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    log.write(Record::new("open", Some("s1")).with("bytes", 3)).await.unwrap();
    log.write(Record::new("close", Some("s1"))).await.unwrap();
    let recs = read_all(&path).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].fields["bytes"], 3);
    assert_eq!(recs[1].event, "close");
    std::fs::write(&path, "{not json}\n").unwrap();
    let err = read_all(&path).unwrap_err().to_string();
    assert!(err.contains(":1: not an audit record"), "{err}");
}
