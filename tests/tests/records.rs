//! Nothing protected in cordon's own records: a session types card numbers,
//! a cloud key and an SSN (in literals, in a comment, in bind parameters,
//! in an error it provokes, in a statement that is refused). Afterwards no
//! file under the state directory holds any of them in clear, and
//! `cordon audit find` still finds who sent them. `sensitive_literals =
//! "deny"` keeps them from the database altogether.

use cordon_tests::{require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, TEST_PYTHON};

const SCHEMA: &str = "\
create table customers(id int primary key, name text, card text);
insert into customers values (1, 'ada', '4539 1488 0343 6467');
grant all on all tables in schema public to app;";

const CARD_TYPED: &str = "4111 1111 1111 1111";
const CARD_BOUND: &str = "4539 1488 0343 6467";
const AWS_KEY: &str = "AKIAQWERTYUIOPASDFGH";
const SSN: &str = "123-45-6789";
const CARD_IN_COMMENT: &str = "5500 0000 0000 0004";

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
}

fn setup(test: &str, profile_extra: &str) -> Setup {
    let policy = format!(
        r#"
[[classify]]
column = "*.public.customers.name"
label = "confidential"

[profiles.ci]
record_results = true
{profile_extra}
"#
    );
    let (pg, cg, agent) = cordon_tests::governed(&format!("rec-{test}"), SCHEMA, &policy).expect("governed postgres");
    Setup { pg, cg, agent }
}

impl Setup {
    fn psql(&self, commands: &[&str]) -> std::process::Output {
        let mut cmd = self.cg.command("psql");
        cmd.args(["-X", "-At", &format!("host=127.0.0.2 port={} dbname=postgres", self.pg.port)]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        cmd.output().expect("psql")
    }

    fn bind(&self, value: &str) -> std::process::Output {
        let (_d, script) = workload_script(
            "bind.py",
            r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as c:
    try:
        print(c.execute("select id from customers where card = %s", (sys.argv[2],)).fetchall())
    except psycopg.Error as e:
        print("ERROR", e.sqlstate, e.diag.message_primary)
"#,
        )
        .unwrap();
        self.cg
            .command(TEST_PYTHON)
            .arg(&script)
            .arg(format!("host=127.0.0.2 port={} dbname=postgres", self.pg.port))
            .arg(value)
            .output()
            .unwrap()
    }
}

/// Every file under `dir`, recursively, with its bytes.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

#[test]
fn state_directory_holds_no_typed_or_bound_value_and_audit_find_still_finds_them() {
    require_e2e!();
    let s = setup("records", "");
    let out = s.psql(&[
        &format!("select '{CARD_TYPED}' as card, '{AWS_KEY}' as key"),
        &format!("select id from customers where card = '{CARD_BOUND}' -- the one from {CARD_IN_COMMENT}"),
        &format!("select '{SSN}'::int"),
        &format!("drop table customers /* {CARD_TYPED} */"),
    ]);
    let err = stderr(&out);
    assert!(err.contains("invalid input syntax for type integer"), "{err}");
    // (psql prints the text it sent under "LINE 1:" itself.)
    assert!(err.contains("type integer: \"[redacted:ssn]\""), "the error is masked for the client too: {err}");
    assert!(err.contains("rule ddl"), "{err}");
    let bound = s.bind(CARD_BOUND);
    assert!(stdout(&bound).contains("[(1,)]"), "{}\n{}", stdout(&bound), stderr(&bound));
    assert!(s.agent.wait_audit("close", 2).len() >= 2);

    let state = s.agent.dir.path().join("state");
    let all = files(&state);
    assert!(all.iter().any(|(p, _)| p.to_string_lossy().contains("recordings")), "a recording was written");
    for (path, bytes) in &all {
        let text = String::from_utf8_lossy(bytes);
        for v in [CARD_TYPED, CARD_BOUND, AWS_KEY, SSN, CARD_IN_COMMENT] {
            let digits: String = v.chars().filter(char::is_ascii_alphanumeric).collect();
            assert!(!text.contains(v) && !text.contains(&digits), "{} holds {v} in clear:\n{text}", path.display());
        }
    }

    // Found by keyed hash: typed (with or without spaces) and bound.
    let find = |v: &str| s.agent.cli(&["audit", "find", "--json", "--value", v]);
    for (v, place) in [(CARD_TYPED, "text"), ("4111111111111111", "text"), (AWS_KEY, "text"), (CARD_BOUND, "parameter")]
    {
        let out = find(v);
        assert!(out.status.success(), "{v}: {}\n{}", stdout(&out), stderr(&out));
        let hits: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
        assert!(hits.as_array().is_some_and(|h| h.iter().any(|x| x["in"] == place)), "{v}: {hits}");
    }
    assert!(!find("4000 0000 0000 0002").status.success(), "a value nobody sent is not found");
}

#[test]
fn sensitive_literals_deny_keeps_them_from_the_database() {
    require_e2e!();
    let s = setup("deny", "[profiles.ci.guardrails]\nsensitive_literals = \"deny\"");
    s.pg.admin_sql("alter system set log_statement = 'all'").expect("log_statement");
    s.pg.admin_sql("select pg_reload_conf()").expect("reload");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = s.psql(&[
        &format!("select '{CARD_TYPED}'"),
        &format!("select 1 where '{AWS_KEY}' <> ''"),
        "select 'nothing sensitive'",
    ]);
    let err = stderr(&out);
    assert_eq!(err.matches("rule sensitive_literals").count(), 2, "{err}");
    assert!(err.contains("carries a card") && err.contains("carries a aws_key"), "{err}");
    assert_eq!(stdout(&out), "nothing sensitive");
    let bound = s.bind(CARD_BOUND);
    assert!(
        stdout(&bound).contains("ERROR 42501") && stdout(&bound).contains("sensitive_literals"),
        "{}",
        stdout(&bound)
    );
    let fine = s.bind("not a card");
    assert!(stdout(&fine).contains("[]"), "{}\n{}", stdout(&fine), stderr(&fine));
    // The server never saw them: it logs every statement it gets.
    let log = std::fs::read_to_string(s.pg.log_path()).unwrap_or_default();
    assert!(log.contains("nothing sensitive"), "the server logs statements: {log}");
    assert!(
        !log.contains(CARD_TYPED) && !log.contains(AWS_KEY) && !log.contains(CARD_BOUND),
        "the server log has them"
    );
}

#[test]
fn policy_check_warns_about_full_text_and_rejects_unknown_modes() {
    require_e2e!();
    let s = setup("check", "record_text = \"full\"");
    let out = std::process::Command::new(cordon_tests::cordon_bin())
        .args(["policy", "check"])
        .arg(&s.agent.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("record_text = \"full\"") && stderr(&out).contains("in clear"), "{}", stderr(&out));
    let bad =
        std::fs::read_to_string(&s.agent.config).unwrap().replace("record_text = \"full\"", "record_text = \"some\"");
    s.agent.write_raw_policy(&bad).unwrap();
    let out = std::process::Command::new(cordon_tests::cordon_bin())
        .args(["policy", "check"])
        .arg(&s.agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("profiles.ci.record_text"), "{}", stderr(&out));
}

#[test]
fn literals_compared_with_or_written_to_labeled_columns_are_hashed_too() {
    require_e2e!();
    let s = setup(
        "labeled",
        "[profiles.ci.labels]\nconfidential = \"allow\"\n[profiles.ci.guardrails]\nlabeled_write = \"allow\"",
    );
    let out = s.psql(&[
        "select id from customers where name = 'zebulon'",
        "update customers set name = 'quincy' where id = 1",
        "insert into customers (id, name, card) values (7, 'xavier', 'none')",
        "select 'plain', id from customers where id = 1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let texts: Vec<String> =
        s.agent.audit_events("statement").iter().filter_map(|r| r["text"].as_str().map(str::to_string)).collect();
    let all = texts.join("\n");
    for v in ["zebulon", "quincy", "xavier"] {
        assert!(!all.contains(v), "{v} is recorded in clear:\n{all}");
    }
    assert!(all.contains("where name = $L1"), "{all}");
    assert!(all.contains("'plain'") && all.contains("where id = 1"), "other literals stay readable:\n{all}");
    let find = s.agent.cli(&["audit", "find", "--value", "zebulon"]);
    assert!(find.status.success(), "{}", stdout(&find));
}
