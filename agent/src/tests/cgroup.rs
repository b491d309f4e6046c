//! Unit tests for `cgroup.rs`.
use super::*;

#[test]
fn hybrid_and_pure_mounts() {
    let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
    assert_eq!(find_v2_root_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
    assert_eq!(find_v2_root_in(pure), Some(PathBuf::from("/sys/fs/cgroup")));
    assert_eq!(find_v2_root_in("proc /proc proc rw 0 0\n"), None);
}

#[test]
fn describes_systemd_and_containers() {
    let d = describe("system.slice/nightly-etl.service");
    assert_eq!(d.unit.as_deref(), Some("nightly-etl.service"));
    assert_eq!(d.slice.as_deref(), Some("system.slice"));
    let id = "a".repeat(64);
    let d = describe(&format!("system.slice/docker-{id}.scope"));
    assert_eq!(d.container.as_deref(), Some(id.as_str()));
    assert_eq!(describe("ci/job-1"), PathInfo::default());
}

#[test]
fn normalises_paths() {
    let root = Path::new("/sys/fs/cgroup/unified");
    assert_eq!(normalise(root, "/sys/fs/cgroup/unified/ci/a/"), "ci/a");
    assert_eq!(normalise(root, "/ci/a"), "ci/a");
    assert_eq!(normalise(root, "ci"), "ci");
}
