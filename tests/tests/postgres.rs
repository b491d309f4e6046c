//! End-to-end tests of the PostgreSQL adapter: a real server that requires
//! TLS and SCRAM-SHA-256, real clients (psql, pgbench, psycopg,
//! tokio-postgres) running as `nobody` in tagged cgroups, and cordon in
//! between injecting the credential.

use std::{
    process::{Command, Output},
    thread,
    time::Duration,
};

use cordon_tests::{
    require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, APP_PASSWORD, LEGACY_PASSWORD, TEST_PYTHON,
};
use serde_json::Value;

fn cg_name(test: &str) -> String {
    format!("cordon-pg-{}-{test}", std::process::id())
}

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
}

/// A secure server, a tagged cgroup, and cordon injecting `credentials`
/// ("" = passthrough: the client's own login is relayed).
fn setup(test: &str, credentials: &str, extra_profile: &str) -> Setup {
    let pg = Postgres::start_secure(&["127.0.0.2"], cordon_tests::free_port()).expect("postgres");
    let name = cg_name(test);
    let cg = Cgroup::create(&name).expect("cgroup");
    let ca = pg.ca_file.clone().expect("secure server has a CA");
    let body = format!(
        r#"
[[intercept]]
name = "orders"
protocol = "postgres"
port = {port}
destinations = ["127.0.0.2/32"]
{auth}
upstream_ca = "{ca}"

[profiles.ci]
description = "CI"
{extra_profile}

[[tag]]
cgroup = "{name}"
profile = "ci"
"#,
        port = pg.port,
        ca = ca.display(),
        auth = if credentials.is_empty() {
            "auth = \"passthrough\"".to_string()
        } else {
            format!("credentials = \"{credentials}\"")
        },
    );
    let mut agent = Agent::new(&body).expect("agent");
    agent.start().expect("agent start");
    Setup { pg, cg, agent }
}

fn psql_env(cg: &Cgroup, conninfo: &str, sql: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = cg.command("psql");
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run psql")
}

/// Everything cordon wrote: log, audit, recordings, state.
fn everything_written(agent: &Agent) -> String {
    let mut all = agent.log_text();
    let mut stack = vec![agent.dir.path().join("state")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                all.push_str(&String::from_utf8_lossy(&b));
            }
        }
    }
    all
}

fn statements(agent: &Agent) -> Vec<Value> {
    agent.audit_events("statement")
}

#[test]
fn psql_with_no_or_a_wrong_password_gets_in_and_never_sees_the_secret() {
    require_e2e!();
    let s = setup("inject", "app", "");
    let conn = format!("host=127.0.0.2 port={} user=whoever dbname=postgres", s.pg.port);
    // No password at all.
    let out = psql_env(&s.cg, &conn, "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app|t", "cordon logged in as app over TLS");
    // A wrong one: never asked for.
    let out = psql_env(&s.cg, &conn, "select 1", &[("PGPASSWORD", "wrong")]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Direct, the server requires the password and TLS.
    let direct = Command::new("psql")
        .args([
            "-X",
            "-At",
            &format!("host=127.0.0.2 port={} user=app dbname=postgres sslmode=disable", s.pg.port),
            "-c",
            "select 1",
        ])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!direct.status.success(), "the server must refuse direct plain connections");

    let stmts = statements(&s.agent);
    assert!(stmts.iter().any(|r| r["text"].as_str().is_some_and(|t| t.contains("pg_stat_ssl"))), "{stmts:?}");
    let close = s.agent.wait_audit("close", 2);
    assert_eq!(close[0]["upstream_user"], "app");
    assert_eq!(close[0]["upstream_tls"], true);
    let written = everything_written(&s.agent);
    assert!(!written.contains(APP_PASSWORD), "the secret leaked into cordon's output");
    assert!(!written.contains(LEGACY_PASSWORD));
}

#[test]
fn md5_upstream_and_client_tls_and_gssenc() {
    require_e2e!();
    let s = setup("md5", "legacy", "");
    // sslmode=require from the client: TLS to cordon, with its generated certificate.
    let conn = format!("host=127.0.0.2 port={} user=x dbname=postgres sslmode=require", s.pg.port);
    let out = psql_env(&s.cg, &conn, "select current_user", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "legacy");
    let close = s.agent.wait_audit("close", 1);
    assert_eq!(close[0]["client_tls"], true);

    // GSSENCRequest is refused with 'N'; the same connection then starts normally.
    let (_d, script) = workload_script(
        "gss.py",
        r#"
import socket, struct, sys
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=10)
s.sendall(struct.pack("!ii", 8, 80877104))
print(s.recv(1).decode())
params = b"user\x00x\x00database\x00postgres\x00\x00"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
print(s.recv(1).decode())
"#,
    )
    .unwrap();
    let out = s.cg.command("python3").arg(&script).arg(s.pg.port.to_string()).output().unwrap();
    assert_eq!(stdout(&out), "N\nR", "GSSENC refused, then authentication went on: {}", stderr(&out));
}

#[test]
fn pgbench_simple_extended_and_prepared() {
    require_e2e!();
    let s = setup("pgbench", "app", "");
    let init = Command::new(cordon_tests::pg_bin("pgbench").unwrap())
        .args(["-i", "-s", "1", "-q", "-U", "postgres", "-h"])
        .arg(s.pg.dir.path())
        .args(["-p", &s.pg.port.to_string(), "postgres"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    s.pg.admin_sql("grant select, update, insert on all tables in schema public to app").unwrap();
    let pgbench = cordon_tests::pg_bin("pgbench").unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let out =
            s.cg.command(pgbench.to_str().unwrap())
                .args([
                    "-n",
                    "-S",
                    "-M",
                    mode,
                    "-c",
                    "2",
                    "-t",
                    "50",
                    "-h",
                    "127.0.0.2",
                    "-p",
                    &s.pg.port.to_string(),
                    "postgres",
                ])
                .env("PGUSER", "nobody-at-all")
                .output()
                .unwrap();
        assert!(out.status.success(), "pgbench -M {mode}: {}\n{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("number of transactions actually processed: 100/100"), "{}", stdout(&out));
    }
    let stmts = statements(&s.agent);
    let selects = stmts.iter().filter(|r| r["text"].as_str().is_some_and(|t| t.contains("pgbench_accounts"))).count();
    assert!(selects >= 300, "every transaction's statement is recorded: {selects}");
    assert!(
        stmts.iter().any(|r| r["kind"] == "execute" && r["prepared"].is_string()),
        "prepared mode names statements"
    );
    assert!(stmts
        .iter()
        .any(|r| r["param_count"] == 1 && r["params"][0].as_str().is_some_and(|p| p.starts_with("hmac:"))));
    let ends = s.agent.audit_events("statement_end");
    assert!(ends.iter().filter(|e| e["outcome"]["rows"] == 1).count() >= 300);
}

const PSYCOPG: &str = r#"
import json, sys, threading, time
import psycopg
port = int(sys.argv[1])
conninfo = f"host=127.0.0.2 port={port} dbname=postgres user=someone"
out = {}
with psycopg.connect(conninfo, autocommit=True) as c:
    c.execute("create table if not exists t (id int primary key, name text, amount numeric, at timestamptz)")
    # Server-side binding: parameters travel in Bind messages.
    c.execute("insert into t values (%s, %s, %s, now()) on conflict do nothing", (1, "ada", 12.5))
    c.execute("insert into t values (%s, %s, %s, now()) on conflict do nothing", (2, "grace", 7))
    text = c.execute("select id, name, amount from t order by id").fetchall()
    with c.cursor(binary=True) as cur:
        binary = cur.execute("select id, name, amount from t where id = %s", (2,)).fetchall()
    out["text"] = [[r[0], r[1], str(r[2])] for r in text]
    out["binary"] = [[r[0], r[1], str(r[2])] for r in binary]
    # COPY in and out.
    with c.cursor().copy("copy t (id, name) from stdin") as cp:
        for i in range(10, 15):
            cp.write_row((i, f"n{i}"))
    lines = []
    with c.cursor().copy("copy (select id, name from t where id >= 10 order by id) to stdout") as cp:
        for row in cp.rows():
            lines.append(list(row))
    out["copy"] = lines
    # LISTEN/NOTIFY through cordon.
    c.execute("listen chan")
    def notify():
        time.sleep(0.3)
        with psycopg.connect(conninfo, autocommit=True) as c2:
            c2.execute("notify chan, 'hello'")
    threading.Thread(target=notify).start()
    got = None
    for n in c.notifies(timeout=10):
        got = [n.channel, n.payload]
        break
    out["notify"] = got
    # Cancel a long query: CancelRequest on a new connection, routed by cordon.
    def cancel():
        time.sleep(0.5)
        c.cancel_safe()
    threading.Thread(target=cancel).start()
    t0 = time.time()
    try:
        c.execute("select pg_sleep(20)")
        out["cancel"] = "not cancelled"
    except psycopg.errors.QueryCanceled:
        out["cancel"] = "cancelled"
    out["cancel_seconds"] = time.time() - t0
    # Still usable after the cancel.
    out["after"] = c.execute("select 41 + 1").fetchone()[0]
print(json.dumps(out))
"#;

#[test]
fn psycopg_binding_binary_copy_notify_and_cancel() {
    require_e2e!();
    let s = setup("psycopg", "app", "[profiles.ci.guardrails]\nddl = \"allow\"");
    let (_d, script) = workload_script("client.py", PSYCOPG).unwrap();
    let out = s.cg.command(TEST_PYTHON).arg(&script).arg(s.pg.port.to_string()).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["text"], serde_json::json!([[1, "ada", "12.5"], [2, "grace", "7"]]));
    assert_eq!(v["binary"], serde_json::json!([[2, "grace", "7"]]));
    assert_eq!(v["copy"].as_array().map(Vec::len), Some(5));
    assert_eq!(v["notify"], serde_json::json!(["chan", "hello"]));
    assert_eq!(v["cancel"], "cancelled");
    assert!(v["cancel_seconds"].as_f64().unwrap_or(99.0) < 10.0);
    assert_eq!(v["after"], 42);

    let cancels = s.agent.audit_events("cancel");
    assert!(cancels.iter().any(|c| c["outcome"] == "forwarded"), "{cancels:?}");
    let stmts = statements(&s.agent);
    assert!(stmts.iter().any(|r| r["text"].as_str().is_some_and(|t| t.starts_with("copy t (id, name) from stdin"))));
    let ends = s.agent.audit_events("statement_end");
    assert!(ends.iter().any(|e| e["outcome"]["tags"][0] == "COPY 5"), "COPY IN counted");
    assert!(ends.iter().any(|e| e["outcome"]["error"]["code"] == "57014"), "the cancel is recorded as an error");
}

#[test]
fn replay_matches_what_the_client_saw_and_audit_verifies() {
    require_e2e!();
    let mut s = setup("replay", "app", "record_results = true");
    s.pg.admin_sql(
        "create table people(id int, name text, note text); \
                    insert into people values (1, 'ada', null), (2, 'grace', 'x|y'); \
                    grant select on people to app",
    )
    .unwrap();
    let conn = format!("host=127.0.0.2 port={} dbname=postgres", s.pg.port);
    let out = psql_env(&s.cg, &conn, "select id, name, note from people order by id", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = stdout(&out);
    let err = psql_env(&s.cg, &conn, "select * from nope", &[]);
    assert!(!err.status.success());

    let sessions = s.agent.cli(&["sessions", "list", "--json", "--identity", &s.cg.rel]);
    let list: Value = serde_json::from_slice(&sessions.stdout).expect("sessions json");
    let ids: Vec<&str> = list.as_array().unwrap().iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids.len(), 2, "{list}");
    let replay = s.agent.cli(&["replay", ids[0]]);
    assert!(replay.status.success(), "{}", stderr(&replay));
    let text = stdout(&replay);
    assert!(text.contains("=> select id, name, note from people order by id"), "{text}");
    for line in seen.lines() {
        assert!(text.lines().any(|l| l == line), "replay lacks the client's row {line:?}:\n{text}");
    }
    assert!(text.contains("id|name|note") && text.contains("-- SELECT 2"), "{text}");
    let replay2 = stdout(&s.agent.cli(&["replay", ids[1]]));
    assert!(replay2.contains("42P01") && replay2.contains("relation \"nope\" does not exist"), "{replay2}");

    // `sessions list --since` in the future finds nothing.
    let none = s.agent.cli(&["sessions", "list", "--json", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(serde_json::from_slice::<Value>(&none.stdout).unwrap(), serde_json::json!([]));

    // The chain verifies; one changed byte, or a removed last record, fails it.
    let verify = |a: &Agent| a.cli(&["audit", "verify"]);
    let ok = verify(&s.agent);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Records written in the last sync interval before a crash may not be
    // in the head yet; removing a synced one is always detected.
    s.agent.wait_synced();
    s.agent.kill();
    let seg = std::fs::read_dir(s.agent.audit_path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .max()
        .unwrap();
    let original = std::fs::read(&seg).unwrap();
    let mut tampered = original.clone();
    let at = tampered
        .windows(5)
        .position(|w| w == b"grace")
        .or_else(|| tampered.windows(6).position(|w| w == b"people"))
        .unwrap();
    tampered[at] ^= 0x20;
    std::fs::write(&seg, &tampered).unwrap();
    let bad = verify(&s.agent);
    assert!(!bad.status.success(), "a modified byte passed: {}", stdout(&bad));
    std::fs::write(&seg, &original).unwrap();
    assert!(verify(&s.agent).status.success());
    let text = String::from_utf8(original).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&seg, format!("{}\n", lines.join("\n"))).unwrap();
    let bad = verify(&s.agent);
    assert!(!bad.status.success(), "a removed last record passed");
    assert!(stderr(&bad).contains("removed from the end"), "{}", stderr(&bad));
}

#[test]
fn garbage_truncated_and_oversized_messages_close_only_their_session() {
    require_e2e!();
    let s = setup("garbage", "app", "");
    // A long-lived healthy session alongside.
    let (_d, script) = workload_script(
        "steady.py",
        r#"
import psycopg, sys, time
c = psycopg.connect(f"host=127.0.0.2 port={sys.argv[1]} dbname=postgres", autocommit=True)
print(c.execute("select 1").fetchone()[0], flush=True)
sys.stdin.readline()
print(c.execute("select 2").fetchone()[0], flush=True)
"#,
    )
    .unwrap();
    let mut steady =
        s.cg.command(TEST_PYTHON)
            .arg(&script)
            .arg(s.pg.port.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut lines = cordon_tests::lines_of(&mut steady);
    assert_eq!(lines.next().as_deref(), Some("1"));

    let (_d2, bad) = workload_script(
        "bad.py",
        r#"
import socket, struct, sys, time
port, kind = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.2", port), timeout=10)
if kind == "garbage":
    s.sendall(b"\xde\xad\xbe\xef" * 8)
else:
    params = b"user\x00x\x00database\x00postgres\x00\x00"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = b""
    while not buf.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    if kind == "oversized":
        s.sendall(b"Q" + struct.pack("!i", 0x7ffffff0))
    else:
        s.sendall(b"Q" + struct.pack("!i", 100) + b"select")
        s.shutdown(socket.SHUT_WR)
try:
    print(s.recv(65536))
except OSError as e:
    print("error", e)
"#,
    )
    .unwrap();
    for kind in ["garbage", "oversized", "truncated"] {
        let out = s.cg.command("python3").arg(&bad).arg(s.pg.port.to_string()).arg(kind).output().unwrap();
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
    }
    // The healthy session is unaffected.
    use std::io::Write;
    steady.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(lines.next().as_deref(), Some("2"));
    let _ = steady.wait();
    thread::sleep(Duration::from_millis(300));
    let closes = s.agent.audit_events("close");
    let errors: Vec<&Value> = closes.iter().filter(|c| c["outcome"] == "protocol_error").collect();
    assert_eq!(errors.len(), 2, "each bad session closed with a reason: {closes:?}");
    let oversized: Vec<&Value> = closes.iter().filter(|c| c["outcome"] == "message_too_large").collect();
    assert_eq!(oversized.len(), 1, "{closes:?}");
    assert!(oversized.iter().any(|c| c["error"].as_str().is_some_and(|e| e.contains("limit"))), "{oversized:?}");
    assert!(closes.iter().any(|c| c["outcome"] == "closed"), "the steady session closed normally");
}

#[test]
fn tokio_postgres_text_and_binary_results() {
    require_e2e!();
    let s = setup("tokio", "app", "[profiles.ci.guardrails]\nddl = \"allow\"");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cordon-pgclient"));
    let (_d, bin) = cordon_tests::workload_copy(bin).unwrap();
    let conninfo = format!("host=127.0.0.2 port={} user=anyone dbname=postgres", s.pg.port);
    let out = s.cg.command(bin.to_str().unwrap()).arg(&conninfo).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["binary"], serde_json::json!([42, "héllo", 2.5, true, null]));
    assert_eq!(v["text"], serde_json::json!([["1", "x"], ["2", null]]));
    assert_eq!(v["counts"], serde_json::json!([3, 5]));
    assert_eq!(v["inserted"], 10);
    s.agent.wait_audit("close", 1);
    s.agent.wait_synced();
    let ends = s.agent.audit_events("statement_end");
    assert!(
        ends.iter().any(|e| e["outcome"]["tags"] == serde_json::json!(["SELECT 1", "SELECT 1"])),
        "multi-statement simple query: {ends:?}"
    );
    assert!(ends.iter().any(|e| e["outcome"]["tags"][0] == "ROLLBACK"));
}

#[test]
fn protocol_3_2_startup_is_negotiated_and_kill_9_keeps_answered_statements() {
    require_e2e!();
    let mut s = setup("v32", "app", "");
    // A 3.2 client against a 3.0 server: NegotiateProtocolVersion is
    // forwarded, then authentication completes as usual.
    let (_d, script) = workload_script(
        "v32.py",
        r#"
import socket, struct, sys
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=10)
params = b"user\x00x\x00database\x00postgres\x00\x00"
s.sendall(struct.pack("!ii", 8 + len(params), 196610) + params)
buf = b""
while b"Z\x00\x00\x00\x05" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
tags = []
i = 0
while i + 5 <= len(buf):
    tags.append(chr(buf[i]))
    i += 1 + struct.unpack("!i", buf[i+1:i+5])[0]
print("".join(t for t in tags if t in "vRKZ"))
"#,
    )
    .unwrap();
    let out = s.cg.command("python3").arg(&script).arg(s.pg.port.to_string()).output().unwrap();
    assert_eq!(stdout(&out), "vRKZ", "{}", stderr(&out));

    // A statement whose result the client received survives kill -9.
    let conn = format!("host=127.0.0.2 port={} dbname=postgres", s.pg.port);
    let out = psql_env(&s.cg, &conn, "select 'durable-marker-42'", &[]);
    assert_eq!(stdout(&out), "durable-marker-42");
    s.agent.kill();
    let found = statements(&s.agent).iter().any(|r| r["text"] == "select 'durable-marker-42'");
    assert!(found, "the answered statement is not in the audit after kill -9");
    let verify = s.agent.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

#[test]
fn passthrough_relays_the_clients_own_scram_login() {
    require_e2e!();
    let s = setup("passthrough", "", "");
    // Plain to cordon (SCRAM channel binding cannot cross a proxy; see README).
    let conn = format!("host=127.0.0.2 port={} user=app dbname=postgres sslmode=disable", s.pg.port);
    let out = psql_env(&s.cg, &conn, "select current_user", &[("PGPASSWORD", APP_PASSWORD)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app");
    let out = psql_env(&s.cg, &conn, "select 1", &[("PGPASSWORD", "wrong")]);
    assert!(!out.status.success(), "a wrong password must fail in passthrough mode");
    assert!(stderr(&out).contains("password authentication failed"), "{}", stderr(&out));
    let closes = s.agent.wait_audit("close", 2);
    assert!(closes.iter().any(|c| c["outcome"] == "upstream_failed"), "{closes:?}");
}

#[test]
fn passthrough_refuses_a_profile_that_masks_labeled_data() {
    require_e2e!();
    // Without cordon's own catalog session there is no mask at read, and
    // masking results alone is defeated by reverse(ssn): refused, and said.
    let s = setup(
        "passthrough-masking",
        "",
        "\n[[classify]]\ncolumn = \"*.public.customers.ssn\"\nlabel = \"restricted\"\n",
    );
    let conn = format!("host=127.0.0.2 port={} user=app dbname=postgres sslmode=disable", s.pg.port);
    let out = psql_env(&s.cg, &conn, "select 1", &[("PGPASSWORD", APP_PASSWORD)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("auth = \"inject\""), "{}", stderr(&out));
    let closes = s.agent.wait_audit("close", 1);
    assert!(closes.iter().any(|c| c["outcome"] == "policy_refused"), "{closes:?}");
    let check =
        Command::new(cordon_tests::cordon_bin()).args(["policy", "check"]).arg(&s.agent.config).output().unwrap();
    assert!(stderr(&check).contains("passthrough"), "{}", stderr(&check));
}
