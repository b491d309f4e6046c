//! Unit tests for `tagging.rs`.
use super::*;

#[test]
fn targets() {
    let root = Path::new("/sys/fs/cgroup/unified");
    assert_eq!(parse_target(root, "x.service"), TagTarget::Unit("x.service".into()));
    assert_eq!(parse_target(root, "/sys/fs/cgroup/unified/ci/a"), TagTarget::CgroupGlob("ci/a".into()));
    assert_eq!(parse_target(root, "ci/a*b"), TagTarget::CgroupGlob("ci/a[*]b".into()));
}

#[test]
fn glob_does_not_cross_separators() {
    let m = TargetMatcher::new(&TagTarget::CgroupGlob("ci/*".into())).unwrap();
    assert!(m.matches("ci/job1"));
    assert!(!m.matches("ci/job1/step"));
    assert!(!m.matches("ci"));
    let m = TargetMatcher::new(&TagTarget::CgroupGlob("**/batch-*.scope".into())).unwrap();
    assert!(m.matches("a/b/batch-1.scope"));
    let u = TargetMatcher::new(&TagTarget::Unit("etl.service".into())).unwrap();
    assert!(u.matches("system.slice/etl.service"));
    assert!(!u.matches("system.slice/etl.service.d"));
}
