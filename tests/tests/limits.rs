//! Every limit answers in the protocol: the client reads an error naming
//! the limit and the setting to change, and the audit says why the session
//! ended. Message size (both directions), idle and handshake timeouts, and
//! the per-workload connection cap.

use std::{thread, time::Duration};

use cordon_tests::{require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, TEST_PYTHON};
use serde_json::Value;

const SCHEMA: &str = "create table t(id int); grant all on t to app;";

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
}

fn setup(test: &str, profile: &str, agent_settings: &str) -> Setup {
    let policy = format!("[profiles.ci]\n{profile}\n");
    let (pg, cg, agent) = cordon_tests::governed_with(&format!("lim-{test}"), SCHEMA, &policy, agent_settings)
        .expect("governed postgres");
    Setup { pg, cg, agent }
}

impl Setup {
    fn dsn(&self) -> String {
        format!("host=127.0.0.2 port={} dbname=postgres user=app", self.pg.port)
    }

    fn psql(&self, cg: &Cgroup, sql: &str) -> std::process::Output {
        cg.command("psql").args(["-X", "-At", &self.dsn(), "-c", sql]).output().expect("psql")
    }

    fn closes(&self, outcome: &str) -> Vec<Value> {
        self.agent.audit_events("close").into_iter().filter(|c| c["outcome"] == outcome).collect()
    }

    fn python(&self, script: &str, args: &[&str]) -> std::process::Output {
        let (_d, path) = workload_script("limit.py", script).expect("script");
        let mut cmd = self.cg.command(TEST_PYTHON);
        cmd.arg(&path).args(args);
        cmd.output().expect("python")
    }
}

#[test]
fn oversized_messages_are_refused_with_the_setting_named() {
    require_e2e!();
    let s = setup("size", "", "max_message_bytes = 65536\n");
    // From the client: an 80 kB query.
    let big = format!("select '{}'", "x".repeat(80 * 1024));
    let out = s.psql(&s.cg, &big);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("agent.max_message_bytes") && err.contains("the client sent"), "{err}");
    // From the server: a 200 kB value in one row.
    let out = s.psql(&s.cg, "select repeat('y', 200000)");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("agent.max_message_bytes") && err.contains("the server sent"), "{err}");
    assert!(!stdout(&out).contains("yyyy"), "part of the oversized row reached the client");
    // Both audited with the reason, and the next session works.
    let closes = s.closes("message_too_large");
    assert_eq!(closes.len(), 2, "{closes:?}");
    let ok = s.psql(&s.cg, "select 1");
    assert_eq!(stdout(&ok), "1", "{}", stderr(&ok));
}

#[test]
fn idle_and_handshake_timeouts_tell_the_client() {
    require_e2e!();
    let s = setup("timeouts", "", "idle_timeout_secs = 1\nhandshake_timeout_secs = 1\n");
    let idle = s.python(
        r#"
import sys, time, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
# A statement running longer than the idle timeout is not idle.
print("slept", c.execute("select pg_sleep(2.5)::text").fetchone()[0] == "")
time.sleep(3)
try:
    c.execute("select 1")
    print("no error")
except psycopg.Error as e:
    print(e)
"#,
        &[&s.dsn()],
    );
    let said = stdout(&idle);
    assert!(said.contains("slept True"), "a running statement was cut as idle: {said}\n{}", stderr(&idle));
    assert!(said.contains("agent.idle_timeout_secs"), "{said}\n{}", stderr(&idle));
    // A client that connects and says nothing.
    let quiet = s.python(
        r#"
import socket, sys
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])))
s.settimeout(10)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode("utf-8", "replace"))
"#,
        &[&s.pg.port.to_string()],
    );
    let said = stdout(&quiet);
    assert!(said.contains("agent.handshake_timeout_secs"), "{said}\n{}", stderr(&quiet));
    assert!(!s.closes("idle_timeout").is_empty(), "no idle_timeout close record");
}

#[test]
fn the_connection_cap_is_per_workload_and_says_which_setting() {
    require_e2e!();
    let s = setup("cap", "max_connections = 2", "");
    let other = Cgroup::create(&format!("cordon-lim-cap-other-{}", std::process::id())).expect("cgroup");
    // Tag the second cgroup with the same profile: its own count.
    let body = std::fs::read_to_string(&s.agent.config).expect("policy");
    std::fs::write(&s.agent.config, format!("{body}\n[[tag]]\ncgroup = \"{}\"\nprofile = \"ci\"\n", other.rel))
        .expect("policy");
    s.agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(s.agent.wait_log("policy reloaded", Duration::from_secs(10)), "{}", s.agent.log_text());
    thread::sleep(Duration::from_millis(500));
    let (dir, path) = workload_script(
        "hold.py",
        r#"
import os, sys, time, psycopg
dsn, go = sys.argv[1], sys.argv[2]
a = psycopg.connect(dsn, autocommit=True)
b = psycopg.connect(dsn, autocommit=True)
try:
    psycopg.connect(dsn, autocommit=True)
    print("third connected", flush=True)
except psycopg.Error as e:
    print("refused:", str(e).replace("\n", " "), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
b.close()
c = psycopg.connect(dsn, autocommit=True)
print("after close:", c.execute("select 1").fetchone()[0], flush=True)
"#,
    )
    .expect("script");
    let go = dir.path().join("go");
    let mut child =
        s.cg.command(TEST_PYTHON)
            .arg(&path)
            .arg(s.dsn())
            .arg(&go)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python");
    let mut lines = cordon_tests::lines_of(&mut child);
    let first = lines.next().unwrap_or_default();
    assert!(first.starts_with("refused:") && first.contains("profiles.ci.max_connections"), "{first}");
    // While this workload is at its cap, another with the same profile is
    // not affected.
    let out = s.psql(&other, "select 2");
    assert_eq!(stdout(&out), "2", "{}", stderr(&out));
    std::fs::write(&go, "").expect("go");
    assert_eq!(lines.next().as_deref(), Some("after close: 1"));
    let _ = child.wait();
    let rejects: Vec<Value> =
        s.agent.audit_events("reject").into_iter().filter(|r| r["reason"] == "connection_limit").collect();
    // libpq retries a refused connection (without TLS, sslmode=prefer):
    // each attempt is refused and audited.
    assert!(!rejects.is_empty() && rejects.len() <= 3, "{rejects:?}");
}
