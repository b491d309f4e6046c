//! cordon in front of a transaction pooler (pgbouncer, `pool_mode =
//! transaction`), where one server backend serves many sessions in turn
//! and a session's next transaction may run on another backend. cordon
//! prepares repeated statements upstream (see `postgres::prepare`); behind
//! a pooler that must neither fail a statement (a prepared statement the
//! backend lacks, a name another session already took) nor, ever, run one
//! session's statement for another: two workloads with different profiles
//! share the pool here, one reading a restricted column in clear and the
//! other masked, while a third connection pins backends so the two keep
//! changing backends.

use cordon_tests::{require_e2e, workload_script, Agent, Cgroup, Pgbouncer, Postgres, TEST_PYTHON};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

const SCHEMA: &str = "\
create table s(id int primary key, secret text, n int);
insert into s select g, 'clear-secret-' || g, g % 3 from generate_series(1, 20) g;
comment on column s.secret is 'classification: restricted';";

/// One session: JSON commands on stdin, one JSON answer per line.
/// "simple": a Query message; "extended": PQexecParams (Parse of the
/// unnamed statement, Bind, Describe, Execute, Sync).
const SESSION: &str = r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
for line in sys.stdin:
    op, sql = json.loads(line)
    try:
        if op == "extended":
            r = c.pgconn.exec_params(sql.encode(), [])
            if r.status == 7:
                out = {"error": r.error_field(ord("C")).decode() + " " + r.error_message.decode().strip()}
            else:
                out = {"rows": [[None if r.get_value(j, k) is None else r.get_value(j, k).decode() for k in range(r.nfields)] for j in range(r.ntuples)]}
        else:
            cur = c.execute(sql, prepare=False)
            out = {"rows": [[None if v is None else str(v) for v in r] for r in cur.fetchall()] if cur.description else []}
    except psycopg.Error as e:
        out = {"error": f"{e.sqlstate} {e}".strip()}
    print(json.dumps(out), flush=True)
"#;

struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    name: &'static str,
}

impl Session {
    fn start(name: &'static str, cg: Option<&Cgroup>, script: &std::path::Path, conninfo: &str) -> Self {
        let mut cmd = match cg {
            Some(cg) => cg.command(TEST_PYTHON),
            None => std::process::Command::new(TEST_PYTHON),
        };
        let mut child = cmd.arg(script).arg(conninfo).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, stdout, name }
    }

    fn run(&mut self, op: &str, sql: &str) -> Value {
        writeln!(self.stdin, "{}", json!([op, sql])).unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| json!({"error": format!("{} said {line:?}", self.name)}))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn behind_a_transaction_pooler_no_statement_fails_and_none_runs_for_another_session() {
    require_e2e!();
    let pg = Postgres::start(&["127.0.0.2"], cordon_tests::free_port()).unwrap();
    pg.admin_sql(SCHEMA).unwrap();
    // Two server connections: the pinning session holds one at times.
    let pool = Pgbouncer::start("127.0.0.4", pg.port, "transaction", 100, 2).unwrap();
    let tag = format!("cordon-pooler-{}", std::process::id());
    let open = Cgroup::create(&format!("{tag}-open")).unwrap();
    let ci = Cgroup::create(&format!("{tag}-ci")).unwrap();
    let body = format!(
        "[[intercept]]\nname = \"pool\"\nprotocol = \"postgres\"\nport = {port}\ndestinations = [\"127.0.0.4/32\"]\n\
         credentials = \"pool\"\nupstream_tls = \"disable\"\n\n\
         [profiles.open.labels]\nrestricted = \"allow\"\n\n[profiles.ci]\n\n\
         [[tag]]\ncgroup = \"{open}\"\nprofile = \"open\"\n\n[[tag]]\ncgroup = \"{ci}\"\nprofile = \"ci\"\n",
        port = pool.port,
        open = open.rel,
        ci = ci.rel,
    );
    let mut agent = Agent::new(&body).unwrap();
    std::fs::write(
        agent.dir.path().join("secrets.toml"),
        "[credentials.pool]\nuser = \"postgres\"\npassword = \"unused-with-trust-auth\"\n",
    )
    .unwrap();
    agent.start().unwrap();

    let (_d, script) = workload_script("session.py", SESSION).unwrap();
    let conninfo = format!("host=127.0.0.4 port={} dbname=postgres sslmode=disable", pool.port);
    let mut a = Session::start("open", Some(&open), &script, &conninfo);
    let mut b = Session::start("ci", Some(&ci), &script, &conninfo);
    // Not in a tagged cgroup: straight to pgbouncer.
    let mut pin = Session::start("pin", None, &script, &conninfo);

    let mut errors = Vec::new();
    let mut seen_by_b = Vec::new();
    let mut clear_for_a = 0;
    for round in 0..4 {
        // The pinning session alternately holds a backend in a transaction
        // and lets it go, so the sessions through cordon change backends.
        let pinned = round % 2 == 1;
        if pinned {
            for sql in ["begin", "select 1"] {
                pin.run("simple", sql);
            }
        }
        for (s, reads_clear) in [(&mut a, true), (&mut b, false)] {
            let mut steps: Vec<(&str, String)> = Vec::new();
            for id in 1..=3 {
                steps.push(("simple", format!("select id, secret from s where id = {id}")));
                steps.push(("extended", "select id, secret from s where id = 2".into()));
                steps.push(("simple", format!("select count(*) from s where n = {}", id % 3)));
            }
            steps.push(("simple", "begin".into()));
            steps.push(("simple", "select id, secret from s where id = 3".into()));
            steps.push(("extended", "select id, secret from s where id = 2".into()));
            steps.push(("simple", "commit".into()));
            for (op, sql) in &steps {
                let got = s.run(op, sql);
                if let Some(e) = got.get("error") {
                    errors.push(format!("{} round {round} {op} {sql:?}: {e}", s.name));
                    continue;
                }
                for row in got["rows"].as_array().into_iter().flatten() {
                    let Some(secret) = row.get(1).and_then(Value::as_str) else { continue };
                    if reads_clear {
                        assert!(secret.starts_with("clear-secret-"), "open reads in clear: {row}");
                        clear_for_a += 1;
                    } else {
                        seen_by_b.push(secret.to_string());
                    }
                }
            }
        }
        if pinned {
            pin.run("simple", "commit");
        }
    }
    assert!(errors.is_empty(), "statements failed behind the pooler:\n{}\n{}", errors.join("\n"), agent.log_text());
    assert_eq!(clear_for_a, 32, "every read of the open profile answered");
    assert!(!seen_by_b.is_empty());
    assert!(
        seen_by_b.iter().all(|v| !v.contains("clear-secret")),
        "the masked profile read a clear value (another session's statement?): {seen_by_b:?}"
    );
    assert!(
        agent.wait_log("connection pooler", std::time::Duration::from_secs(5)),
        "cordon says why it prepares nothing there: {}",
        agent.log_text()
    );
}
