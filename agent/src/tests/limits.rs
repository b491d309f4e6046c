//! Unit tests for `limits.rs`.
use super::*;

#[test]
fn a_cap_counts_per_key_and_frees_on_drop() {
    let c = Arc::new(Connections::default());
    let a = c.acquire(1, Some(2)).unwrap();
    let _b = c.acquire(1, Some(2)).unwrap();
    assert_eq!(c.acquire(1, Some(2)).unwrap_err(), 2);
    // Another workload is not affected.
    let _other = c.acquire(2, Some(2)).unwrap();
    drop(a);
    assert!(c.acquire(1, Some(2)).is_ok());
    assert_eq!(c.open(1), 1);
    // No cap: counted, never refused.
    let many: Vec<Slot> = (0..10).map(|_| c.acquire(3, None).unwrap()).collect();
    assert_eq!(c.open(3), 10);
    drop(many);
    assert_eq!(c.open(3), 0);
}
