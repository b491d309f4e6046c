//! End-to-end tests of the data policy on PostgreSQL: labels from the
//! policy catalog, from COMMENT ON COLUMN and from detectors; masking in
//! text and binary results; COPY; guardrails on the parsed SQL. Real server,
//! real clients, workloads as `nobody` in tagged cgroups.

use std::process::{Command, Output};

use cordon_tests::{require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, TEST_PYTHON};
use serde_json::Value;

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
}

const SCHEMA: &str = "\
create table customers(id int primary key, name text, ssn text, card varchar(19), email text, note text, tier int);
insert into customers values
  (1, 'ada', '123-45-6789', '4111 1111 1111 1111', 'ada@example.com', 'call me at +44 20 7946 0958', 1),
  (2, 'grace', '219-09-9999', '5500 0000 0000 0004', 'grace@example.org', 'no contact details', 2);
comment on column customers.email is 'contact address. classification: confidential';
create table salaries(id int, amount int);
insert into salaries values (1, 100);
create table notes(id int, body text);
insert into notes values (1, 'my ssn is 123-45-6789 ok'), (2, 'nothing here');
create table orders(id int, total int);
insert into orders values (1, 10), (2, 20);
grant all on all tables in schema public to app;";

fn setup(test: &str, profile_extra: &str) -> Setup {
    let policy = format!(
        r#"
[[classify]]
column = "*.public.customers.ssn"
label = "restricted"
mask = "partial"

[[classify]]
column = "*.public.customers.card"
label = "confidential"
mask = "partial"

[[classify]]
table = "*.public.salaries"
label = "restricted"

[profiles.ci]
description = "CI"
record_results = true
{profile_extra}
"#
    );
    let (pg, cg, agent) = cordon_tests::governed(&format!("dp-{test}"), SCHEMA, &policy).expect("governed postgres");
    Setup { pg, cg, agent }
}

impl Setup {
    fn conn(&self) -> String {
        format!("host=127.0.0.2 port={} dbname=postgres", self.pg.port)
    }

    /// psql through cordon, one connection, several commands, not stopping on errors.
    fn psql(&self, commands: &[&str]) -> Output {
        let mut cmd = self.cg.command("psql");
        cmd.args(["-X", "-At", &self.conn()]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        cmd.output().expect("psql")
    }

    fn direct(&self, sql: &str) -> String {
        self.pg.admin_sql(sql).expect("direct query")
    }
}

#[test]
fn labels_from_policy_comments_and_detectors_mask_text_results() {
    require_e2e!();
    let s = setup("mask", "");
    let sql = "select id, name, ssn, card, email, note, tier from customers order by id";
    let out = s.psql(&[sql]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Vec<String>> = stdout(&out).lines().map(|l| l.split('|').map(str::to_string).collect()).collect();
    let direct: Vec<Vec<String>> = s.direct(sql).lines().map(|l| l.split('|').map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), 2);
    // Unlabeled, undetected columns are byte-for-byte what the server sent.
    for (r, d) in rows.iter().zip(&direct) {
        assert_eq!((&r[0], &r[1], &r[6]), (&d[0], &d[1], &d[6]));
    }
    assert_eq!(rows[0][2], "1********", "ssn: policy label, partial mask");
    assert_eq!(rows[0][3], "**** **** **** 1111", "card: last four only");
    assert_eq!(rows[0][4], "REDACTED", "email: labeled by COMMENT ON COLUMN");
    assert_eq!(rows[0][5], "call me at [redacted:phone]", "note: detector span only");
    assert_eq!(rows[1][5], "no contact details");
    assert!(!stdout(&out).contains("123-45-6789") && !stdout(&out).contains("ada@example.com"));

    // A computed column is computed from masked values (mask at read).
    let out = s.psql(&["select ssn || '' as x, 'mail ' || email as y from customers where id = 1"]);
    assert_eq!(stdout(&out), "1********|mail REDACTED", "{}", stderr(&out));
    // Free text in an unlabeled table.
    let out = s.psql(&["select body from notes order by id"]);
    assert_eq!(stdout(&out), "my ssn is [redacted:ssn] ok\nnothing here");

    // Cursor FETCH and RETURNING results are masked too.
    let out = s.psql(&["begin; declare c cursor for select ssn from customers order by id; fetch all from c; commit"]);
    assert_eq!(stdout(&out), "BEGIN\nDECLARE CURSOR\n1********\n2********\nCOMMIT", "{}", stderr(&out));
    let out = s.psql(&["update customers set tier = tier where id = 2 returning ssn, email"]);
    assert!(stdout(&out).starts_with("2********|REDACTED"), "{}\n{}", stdout(&out), stderr(&out));

    // Every masked value is counted, per column and rule.
    let ends = s.agent.audit_events("statement_end");
    let first = ends.iter().find(|e| !e["outcome"]["masked"].is_null()).expect("masked counts");
    assert_eq!(first["outcome"]["masked"]["ssn/partial"], 2);
    assert_eq!(first["outcome"]["masked"]["email/redact"], 2);
    assert_eq!(first["outcome"]["masked"]["note/detector:phone"], 1);
}

#[test]
fn binary_results_are_masked_and_keep_their_types() {
    require_e2e!();
    let s = setup("binary", "");
    // tokio-postgres: extended protocol, binary results; then simple (text).
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cordon-pgclient"));
    let (_d, bin) = cordon_tests::workload_copy(bin).unwrap();
    let out =
        s.cg.command(bin.to_str().unwrap())
            .arg(s.conn())
            .arg("select id, ssn, card, email, tier from customers order by id")
            .output()
            .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["binary"][0], serde_json::json!([1, "1********", "**** **** **** 1111", "REDACTED", 1]));
    assert_eq!(v["text"][0], serde_json::json!(["1", "1********", "**** **** **** 1111", "REDACTED", "1"]));

    // psycopg, binary cursor, server-side binding.
    let (_d2, script) = workload_script(
        "bin.py",
        r#"
import json, sys, psycopg
with psycopg.connect(sys.argv[1]) as c:
    with c.cursor(binary=True) as cur:
        rows = cur.execute("select id, ssn, email, note from customers where id = %s", (1,)).fetchall()
print(json.dumps([list(r) for r in rows]))
"#,
    )
    .unwrap();
    let out = s.cg.command(TEST_PYTHON).arg(&script).arg(s.conn()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v, serde_json::json!([[1, "1********", "REDACTED", "call me at [redacted:phone]"]]));
}

#[test]
fn copy_of_labeled_table_is_denied_and_free_text_copy_is_masked() {
    require_e2e!();
    let s = setup("copy", "");
    let out =
        s.psql(&["copy customers to stdout", "copy (select id, ssn from customers) to stdout", "select 'still here'"]);
    let err = stderr(&out);
    assert!(err.contains("42501") || err.contains("rule copy_out"), "{err}");
    assert_eq!(err.matches("rule copy_out").count(), 2, "{err}");
    assert_eq!(stdout(&out), "still here");
    let out = s.psql(&["copy notes to stdout"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\tmy ssn is [redacted:ssn] ok\n2\tnothing here");
}

#[test]
fn guardrails_deny_ddl_unbounded_writes_and_hidden_drops_and_the_session_goes_on() {
    require_e2e!();
    let s = setup("guard", "");
    let out = s.psql(&[
        "drop table orders",
        "truncate orders",
        "delete from orders",
        "select 1; drop table orders",
        "select 'drop table orders' /* drop table orders */",
        "delete from orders where id = 2",
        "selec 1",
        "select pg_read_file('/etc/passwd')",
        "select * from salaries",
        "set search_path = hr",
        "with d as (delete from orders returning *) select count(*) from d",
        "select table_to_xml('salaries', true, false, '')",
        "select count(*) from orders",
    ]);
    let err = stderr(&out);
    for rule in
        ["rule ddl", "rule unbounded_write", "rule parse_error", "rule dangerous_function", "rule restricted_read"]
    {
        assert!(err.contains(rule), "{rule} missing in:\n{err}");
    }
    assert_eq!(err.matches("rule ddl").count(), 4, "DROP, TRUNCATE, the hidden DROP, SET search_path: {err}");
    assert_eq!(err.matches("rule unbounded_write").count(), 2, "DELETE, and DELETE inside a CTE: {err}");
    assert_eq!(err.matches("rule dangerous_function").count(), 2, "pg_read_file, table_to_xml: {err}");
    // The literal and comment mention passed; the bounded delete ran; the
    // table is still there with one row; the session answered to the end.
    assert_eq!(stdout(&out), "drop table orders\nDELETE 1\n1", "{err}");
    assert_eq!(s.direct("select count(*) from orders"), "1");
    // Denials are in the audit with their rule, never sent upstream.
    let denied: Vec<Value> = s.agent.audit_events("statement").into_iter().filter(|r| r["verdict"] == "deny").collect();
    assert_eq!(denied.len(), 10, "{denied:?}");
    assert!(denied.iter().any(|r| r["text"] == "select 1; drop table orders" && r["rule"] == "ddl"));
}

#[test]
fn extended_protocol_denial_resyncs_and_transactions_keep_their_status() {
    require_e2e!();
    let s = setup("extended", "");
    let (_d, script) = workload_script(
        "ext.py",
        r#"
import json, sys, psycopg
out = {}
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    try:
        c.execute("drop table orders")
    except psycopg.Error as e:
        out["drop"] = [e.sqlstate, str(e)]
    out["after"] = c.execute("select count(*) from orders where id > %s", (0,)).fetchone()[0]
    # Inside a transaction: the denial is an error, and the server's status is kept.
    c.autocommit = False
    c.execute("select 1")
    try:
        c.execute("delete from orders")
    except psycopg.Error as e:
        out["delete"] = e.sqlstate
    out["status"] = str(c.info.transaction_status)
    c.rollback()
    out["final"] = c.execute("select count(*) from orders").fetchone()[0]
print(json.dumps(out))
"#,
    )
    .unwrap();
    let out = s.cg.command(TEST_PYTHON).arg(&script).arg(s.conn()).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["drop"][0], "42501");
    assert!(v["drop"][1].as_str().is_some_and(|m| m.contains("rule ddl")), "{v}");
    assert_eq!(v["after"], 2);
    assert_eq!(v["delete"], "42501");
    assert_eq!(v["final"], 2);
}

#[test]
fn deny_label_action_and_ddl_rule() {
    // (The `approve` outcome is tests/approvals.rs's.)
    require_e2e!();
    let s = setup("deny", "[profiles.ci.labels]\nrestricted = \"deny\"\n[profiles.ci.guardrails]\nddl = \"deny\"");
    let out = s.psql(&[
        "select name from customers where id = 1",
        "select ssn from customers",
        "create table x(i int)",
        "select 2",
    ]);
    let err = stderr(&out);
    assert!(err.contains("rule label") && err.contains("labeled restricted"), "{err}");
    assert!(err.contains("does not allow") && err.contains("rule ddl"), "{err}");
    assert_eq!(stdout(&out), "ada\n2");
    assert!(!stdout(&out).contains("123-45"));
}

#[test]
fn policy_check_validates_labels_globs_and_rules() {
    require_e2e!();
    let s = setup("check", "");
    let good = std::fs::read_to_string(&s.agent.config).unwrap();
    let bad = good
        .replace("label = \"confidential\"", "label = \"secret\"")
        .replace("mask = \"partial\"\n\n[[classify]]\ntable", "mask = \"blur\"\n\n[[classify]]\ntable");
    s.agent.write_raw_policy(&format!("{bad}\n[profiles.ci.guardrails]\nddl = \"maybe\"\n")).unwrap();
    let out = Command::new(cordon_tests::cordon_bin()).args(["policy", "check"]).arg(&s.agent.config).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown label \"secret\""), "{err}");
    assert!(err.contains("unknown mask \"blur\""), "{err}");
    assert!(err.contains("guardrails.ddl") && err.contains("unknown outcome \"maybe\""), "{err}");
}
