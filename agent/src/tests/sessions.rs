//! Unit tests for `sessions.rs`.
use super::*;
use crate::audit::Record;

/// A record as `cordon sessions` reads it back from the log.
fn entry(r: Record) -> Entry {
    let mut line = Vec::new();
    r.write_line(1, audit::GENESIS, &mut line).unwrap();
    serde_json::from_slice(&line).unwrap()
}

#[test]
fn pairs_open_and_close() {
    let recs = vec![
        entry(Record::new("open", Some("a-1")).with("workload", serde_json::json!({"cgroup": "ci/x", "pid": 5}))),
        entry(Record::new("reject", None).with("reason", "unidentified").with("peer", "127.0.0.1:5")),
        entry(Record::new("close", Some("a-1")).with("outcome", "closed").with("bytes_up", 10)),
    ];
    let s = assemble(&recs);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].outcome, "closed");
    assert_eq!(s[0].bytes_up, 10);
    assert_eq!(s[1].outcome, "rejected: unidentified");
    let table = render_table(&s);
    assert!(table.contains("ci/x") && table.contains("(unidentified)"), "{table}");
}
