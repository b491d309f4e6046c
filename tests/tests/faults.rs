//! The audit log under faults injected from outside the agent, each under
//! concurrent writes from governed workloads: a full filesystem (a small
//! tmpfs), a filesystem the kernel turns read-only (ext4 on a loop device,
//! `errors=remount-ro`, a real ext4 error), the audit directory removed, and
//! the agent's wall clock stepping backwards (libfaketime).
//!
//! For each: every statement that took effect has its `statement` record;
//! `cordon audit verify` passes afterwards; the workload was told why, in
//! its protocol (SQLSTATE CD001, "the audit log is unavailable"); sessions
//! resume by themselves once the fault is gone, and the outage is recorded.
//!
//! The faults are host-wide (mounts, loop devices), so the tests here run
//! one at a time.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use cordon_tests::{require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, TEST_PYTHON};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const SCHEMA: &str = "create table events(tag text primary key); grant all on events to app;";

/// Workers insert `w<worker>-<n>` one statement at a time, reconnecting
/// after a failed session, until the stop file appears; each attempt is
/// printed as a JSON line.
const WORKLOAD: &str = r#"
import json, os, sys, threading, time
import psycopg
dsn, workers, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = threading.Lock()
def say(**kw):
    with out:
        print(json.dumps(kw), flush=True)
def work(w):
    n, conn = 0, None
    while not os.path.exists(stop):
        n += 1
        tag = f"w{w}-{n}"
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
            conn.execute(f"insert into events(tag) values ('{tag}')")
            say(tag=tag, ok=True)
            time.sleep(0.003)
        except psycopg.Error as e:
            say(tag=tag, ok=False, code=getattr(e, "sqlstate", None), message=str(e))
            if conn is not None and conn.closed:
                conn = None
            time.sleep(0.05)
threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
"#;

struct Attempt {
    tag: String,
    ok: bool,
    code: Option<String>,
    message: String,
}

struct Run {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
    script_dir: tempfile::TempDir,
    script: PathBuf,
    stop: PathBuf,
    workload: Option<Child>,
}

impl Run {
    fn start(test: &str, audit_dir: &Path, agent_settings: &str, env: &[(&str, &str)]) -> Self {
        let pg = Postgres::start_secure(&["127.0.0.2"], cordon_tests::free_port()).expect("postgres");
        pg.admin_sql(SCHEMA).expect("schema");
        let name = format!("cordon-fault-{test}-{}", std::process::id());
        let cg = Cgroup::create(&name).expect("cgroup");
        let body = format!(
            "[[intercept]]\nname = \"shop\"\nprotocol = \"postgres\"\nport = {port}\ndestinations = [\"127.0.0.2/32\"]\n\
             credentials = \"app\"\nupstream_ca = \"{ca}\"\n\n[profiles.ci]\n\n[[tag]]\ncgroup = \"{name}\"\nprofile = \"ci\"\n",
            port = pg.port,
            ca = pg.ca_file.as_ref().expect("ca").display(),
        );
        let settings = format!("audit_dir = \"{}\"\n{agent_settings}", audit_dir.display());
        let mut agent = Agent::new_with(&body, &settings).expect("agent");
        agent.set_audit_path(audit_dir);
        agent.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        agent.start().expect("agent start");
        let (script_dir, script) = workload_script("workload.py", WORKLOAD).expect("script");
        let stop = script_dir.path().join("stop");
        let mut run = Self { pg, cg, agent, script_dir: script_dir, script, stop, workload: None };
        run.spawn_workload();
        run
    }

    fn spawn_workload(&mut self) {
        let dsn = format!("host=127.0.0.2 port={} dbname=postgres user=app sslmode=prefer", self.pg.port);
        // Into a file, not a pipe: a pipe nobody reads until the end would
        // block the workload once it is full.
        let out = fs::File::create(self.script_dir.path().join("attempts.jsonl")).expect("attempts file");
        let child = self
            .cg
            .command(TEST_PYTHON)
            .args([self.script.to_str().expect("utf-8 path"), &dsn, "4", self.stop.to_str().expect("utf-8 path")])
            .stdout(Stdio::from(out))
            .stderr(Stdio::piped())
            .spawn()
            .expect("workload");
        self.workload = Some(child);
    }

    fn finish(&mut self) -> Vec<Attempt> {
        fs::write(&self.stop, "").expect("stop file");
        let child = self.workload.take().expect("workload running");
        let out = child.wait_with_output().expect("workload output");
        assert!(out.status.success(), "the workload failed: {}", String::from_utf8_lossy(&out.stderr));
        fs::read_to_string(self.script_dir.path().join("attempts.jsonl"))
            .expect("attempts")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| Attempt {
                tag: v["tag"].as_str().unwrap_or_default().to_string(),
                ok: v["ok"].as_bool().unwrap_or(false),
                code: v["code"].as_str().map(str::to_string),
                message: v["message"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    fn wait_log(&self, needle: &str, secs: u64) {
        assert!(
            self.agent.wait_log(needle, Duration::from_secs(secs)),
            "the agent never logged {needle:?}:\n{}",
            self.agent.log_text()
        );
    }

    fn rows(&self) -> BTreeSet<String> {
        self.pg.admin_sql("select tag from events").expect("rows").lines().map(str::to_string).collect()
    }

    /// Tags of every `statement` record in the audit.
    fn recorded(&self) -> BTreeSet<String> {
        self.agent
            .audit_events("statement")
            .iter()
            .filter_map(|r| r["text"].as_str())
            .filter_map(|t| t.split('\'').nth(1).map(str::to_string))
            .collect()
    }

    fn verify(&self) -> String {
        let out = self.agent.cli(&["audit", "verify"]);
        assert!(out.status.success(), "audit verify failed after the fault: {}{}", stdout(&out), stderr(&out));
        stdout(&out)
    }

    fn outage(&self) -> Value {
        self.agent
            .audit_events("agent")
            .into_iter()
            .find(|r| r["action"] == "audit_outage")
            .unwrap_or_else(|| panic!("no audit_outage record:\n{}", self.agent.log_text()))
    }

    /// The assertions every fault shares. `lost_with_the_files`: records
    /// that were in files the fault destroyed (the removed directory).
    fn check(&mut self, attempts: &[Attempt], cause: &str, lost_with_the_files: bool) {
        let rows = self.rows();
        let recorded = self.recorded();
        // Every success the client saw took effect.
        for a in attempts.iter().filter(|a| a.ok) {
            assert!(rows.contains(&a.tag), "{} was acknowledged but is not in the table", a.tag);
        }
        // Every statement that took effect has its record (after the outage
        // where the fault destroyed the files themselves).
        let outage = self.outage();
        let missing: Vec<&String> = rows.iter().filter(|t| !recorded.contains(*t)).collect();
        // Records the repaired filesystem lost although fdatasync had
        // confirmed them (ext4 whose journal aborted mid-sync): the outage
        // record counts them, and only that many may be missing.
        let lost_confirmed = outage["lost_synced_records"].as_u64().unwrap_or(0);
        if lost_with_the_files {
            let kept: Vec<&Attempt> = attempts.iter().filter(|a| a.ok && recorded.contains(&a.tag)).collect();
            assert!(!kept.is_empty(), "no statement after the outage was recorded");
        } else if lost_confirmed > 0 {
            assert!(
                missing.len() as u64 <= lost_confirmed,
                "{} statements took effect without a record, more than the {lost_confirmed} the outage record says the filesystem lost: {missing:?}",
                missing.len()
            );
        } else {
            assert!(missing.is_empty(), "{} statements took effect without a record: {missing:?}", missing.len());
        }
        // The client was told why, in its protocol.
        let told: Vec<&Attempt> =
            attempts.iter().filter(|a| !a.ok && a.message.contains("the audit log is unavailable")).collect();
        assert!(
            !told.is_empty(),
            "no client was told the audit log is unavailable; errors seen: {:?}",
            attempts.iter().filter(|a| !a.ok).map(|a| &a.message).take(5).collect::<Vec<_>>()
        );
        assert!(
            told.iter().any(|a| a.code.as_deref() == Some("CD001")) || told.iter().any(|a| a.message.contains("FATAL")),
            "the refusal carries neither SQLSTATE CD001 nor a FATAL: {:?}",
            told.first().map(|a| &a.message)
        );
        // Refused statements did not run.
        for a in &told {
            if a.code.as_deref() == Some("CD001") {
                assert!(!rows.contains(&a.tag), "{} was refused with CD001 but took effect", a.tag);
            }
        }
        // Sessions resumed: the last attempts succeeded.
        assert!(
            attempts.iter().rev().take(4).any(|a| a.ok),
            "no statement succeeded after the fault was gone; last attempts: {:?}",
            attempts.iter().rev().take(4).map(|a| (&a.tag, &a.code, &a.message)).collect::<Vec<_>>()
        );
        // The kernel may report the fault first as something else (ext4
        // whose journal aborts fails the running fdatasync with EIO before
        // it is remounted read-only): the cause then shows as the last one.
        assert!(outage["cause"] == cause || outage["last_cause"] == cause, "{outage}");
        let refused =
            outage["refused_statements"].as_u64().unwrap_or(0) + outage["refused_sessions"].as_u64().unwrap_or(0);
        assert!(refused > 0, "the outage record counts no refusals: {outage}");
        self.verify();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, "");
        if let Some(mut c) = self.workload.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(out.status.success(), "{cmd}: {}{}", stdout(&out), stderr(&out));
}

/// A mount point that is unmounted when the test ends, however it ends.
struct Mount(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {} 2>/dev/null", self.0.display()));
    }
}

fn mount_point() -> (PathBuf, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix("cordon-fault-").tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mount point");
    (mnt, dir)
}

#[test]
fn a_full_filesystem_refuses_in_the_protocol_and_never_tears_the_chain() {
    require_e2e!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mnt, keep) = mount_point();
    must(&format!("mount -t tmpfs -o size=4m,mode=0755 cordon-fault {}", mnt.display()));
    let _m = Mount(mnt.clone(), keep);
    let audit = mnt.join("audit");
    let mut run = Run::start("enospc", &audit, "audit_space_left = \"25%\"\n", &[]);
    thread::sleep(Duration::from_millis(1500));
    // Below the watermark first: a warning, not a refusal.
    let avail: u64 =
        stdout(&sh(&format!("df --output=avail -B1 {} | tail -1", mnt.display()))).trim().parse().expect("df");
    must(&format!(
        "dd if=/dev/zero of={}/ballast bs=4096 count={} 2>/dev/null",
        mnt.display(),
        avail.saturating_sub(512 * 1024) / 4096
    ));
    run.wait_log("below space_left", 20);
    // Then fill what is left; the agent's next append hits ENOSPC mid-record.
    let _ = sh(&format!("dd if=/dev/zero of={}/filler bs=64k 2>/dev/null", mnt.display()));
    run.wait_log("no space left", 20);
    thread::sleep(Duration::from_millis(1500));
    must(&format!("rm -f {0}/filler {0}/ballast", mnt.display()));
    run.wait_log("the audit log is writable again", 20);
    thread::sleep(Duration::from_millis(1500));
    let attempts = run.finish();
    run.check(&attempts, "no_space", false);
    let low = run.agent.audit_events("agent").into_iter().find(|r| r["action"] == "audit_space_low");
    assert!(low.is_some_and(|r| r["space_left"] == "25%"), "no audit_space_low record");
}

#[test]
fn a_filesystem_gone_read_only_refuses_and_resumes_after_repair() {
    require_e2e!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mnt, keep) = mount_point();
    let img = keep.path().join("audit.img");
    must(&format!("truncate -s 64M {0} && mkfs.ext4 -q -F {0}", img.display()));
    must(&format!("mount -o loop,errors=remount-ro {} {}", img.display(), mnt.display()));
    let _m = Mount(mnt.clone(), keep);
    let dev = stdout(&sh(&format!("findmnt -n -o SOURCE {}", mnt.display())));
    let dev_name = Path::new(&dev).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let audit = mnt.join("audit");
    // "statement": every result waits for its record's fsync, so a
    // filesystem that drops its unsynced pages loses no answered statement.
    let mut run = Run::start("erofs", &audit, "audit_durability = \"statement\"\n", &[]);
    thread::sleep(Duration::from_millis(1500));
    // A real ext4 error: the kernel turns the filesystem read-only.
    must(&format!("echo 1 > /sys/fs/ext4/{dev_name}/trigger_fs_error"));
    run.wait_log("read-only", 20);
    thread::sleep(Duration::from_millis(1000));
    // The operator's repair: unmount (cordon let go of its files), fsck,
    // mount again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sh(&format!("umount {}", mnt.display())).status.success() {
        assert!(Instant::now() < deadline, "cordon kept the read-only filesystem busy");
        thread::sleep(Duration::from_millis(200));
    }
    let _ = sh(&format!("e2fsck -fy {} >/dev/null 2>&1", img.display()));
    must(&format!("mount -o loop,errors=remount-ro {} {}", img.display(), mnt.display()));
    // Recovery retries every second (and says so every 10 s while it
    // fails). One run in six or so saw none within 60 s of the remount: if
    // it happens again, say what the mount and the kernel looked like.
    if !run.agent.wait_log("the audit log is writable again", Duration::from_secs(60)) {
        let probe = sh(&format!("touch {0}/probe && rm {0}/probe && echo writable", audit.display()));
        let mount = sh(&format!("findmnt -n -o SOURCE,OPTIONS {}", mnt.display()));
        let kernel = sh("dmesg | grep -iE 'ext4|loop' | tail -15");
        panic!(
            "the agent never logged that the audit log is writable again\nthe directory: {} {}\nthe mount: {}\nthe kernel:\n{}\nthe agent:\n{}",
            stdout(&probe),
            stderr(&probe),
            stdout(&mount),
            stdout(&kernel),
            run.agent.log_text()
        );
    }
    thread::sleep(Duration::from_millis(1500));
    let attempts = run.finish();
    run.check(&attempts, "read_only", false);
}

#[test]
fn a_removed_audit_directory_refuses_until_it_is_back_and_the_new_chain_verifies() {
    require_e2e!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let parent = tempfile::Builder::new().prefix("cordon-fault-").tempdir().expect("tempdir");
    let audit = parent.path().join("audit");
    let mut run = Run::start("rmdir", &audit, "", &[]);
    thread::sleep(Duration::from_millis(1500));
    must(&format!("rm -rf {}", audit.display()));
    run.wait_log("audit directory missing", 20);
    thread::sleep(Duration::from_millis(1500));
    fs::create_dir(&audit).expect("recreate");
    run.wait_log("the audit log is writable again", 20);
    thread::sleep(Duration::from_millis(1500));
    let attempts = run.finish();
    run.check(&attempts, "directory_missing", true);
    // The new directory's chain starts at an anchor where the old one ended.
    assert!(audit.join("audit.anchor").exists(), "the recreated directory has no anchor");
}

#[test]
fn the_wall_clock_stepping_back_is_recorded_and_nothing_is_refused() {
    require_e2e!();
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(Path::new(lib).exists(), "libfaketime is missing: run `cargo xtask setup` (package faketime)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let parent = tempfile::Builder::new().prefix("cordon-fault-").tempdir().expect("tempdir");
    let audit = parent.path().join("audit");
    let offset = parent.path().join("faketime");
    fs::write(&offset, "+0\n").expect("faketime file");
    // Only the wall clock moves: timers (monotonic) keep running.
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().expect("utf-8 path")),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut run = Run::start("clock", &audit, "", &env);
    thread::sleep(Duration::from_millis(1500));
    fs::write(&offset, "-3600\n").expect("step the clock back an hour");
    run.wait_log("the wall clock stepped back", 20);
    thread::sleep(Duration::from_millis(1500));
    let attempts = run.finish();
    let refused: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(refused.is_empty(), "statements failed across a clock step: {:?}", refused.first().map(|a| &a.message));
    let rows = run.rows();
    let recorded = run.recorded();
    assert!(rows.iter().all(|t| recorded.contains(t)), "a statement took effect without a record");
    let step = run
        .agent
        .audit_events("agent")
        .into_iter()
        .find(|r| r["action"] == "clock_stepped_back")
        .expect("a clock_stepped_back record");
    assert!(step["by_ms"].as_u64().unwrap_or(0) >= 3_500_000, "{step}");
    run.verify();
}
