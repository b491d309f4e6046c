//! Just-in-time approval end to end: a real psql (and pgjdbc) in a tagged
//! cgroup, held by a rule that says `approve`; real local users deciding
//! through the approvals socket, identified by the kernel (SO_PEERCRED);
//! every step checked in the hash-chained audit. Written the way someone
//! trying to get a statement through without the approval would: another
//! literal, a second run, self-approval, one person twice, a late approval,
//! a denied rule riding along with an approved one.

use std::{
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use cordon_tests::{
    finish, local_user, require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, WORKLOAD_UID,
};
use serde_json::Value;

const SCHEMA: &str = "\
create table accounts(id int primary key, owner text, ssn text, balance int);
insert into accounts values (1, 'ada', '123-45-6789', 100), (2, 'grace', '219-09-9999', 200);
create table scratch(id int);
create table audit_me(id int);
grant all on all tables in schema public to app;
alter table scratch owner to app;";

/// The approvers group and the people in it (created once on this host).
const GROUP: &str = "cordon-approvers";

struct People {
    alice: u32,
    bob: u32,
    mallory: u32,
    oncall: u32,
}

fn people() -> People {
    People {
        alice: local_user("cordon-alice", &[GROUP]).expect("user alice"),
        bob: local_user("cordon-bob", &[GROUP]).expect("user bob"),
        mallory: local_user("cordon-mallory", &[]).expect("user mallory"),
        oncall: local_user("cordon-oncall", &[]).expect("user oncall"),
    }
}

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    agent: Agent,
    who: People,
}

fn setup(test: &str, profile: &str, approvals: &str) -> Setup {
    setup_with(test, profile, approvals, "")
}

fn setup_with(test: &str, profile: &str, approvals: &str, agent_settings: &str) -> Setup {
    let who = people();
    let policy = format!(
        "[[classify]]\ncolumn = \"*.public.accounts.ssn\"\nlabel = \"restricted\"\nmask = \"partial\"\n\n\
         [profiles.ci]\ndescription = \"CI\"\n{profile}\n\n[profiles.ci.approvals]\n{approvals}\n"
    );
    let (pg, cg, agent) =
        cordon_tests::governed_with(&format!("ap-{test}"), SCHEMA, &policy, agent_settings).expect("governed postgres");
    Setup { pg, cg, agent, who }
}

impl Setup {
    fn dsn(&self) -> String {
        format!("host=127.0.0.2 port={} dbname=postgres user=app", self.pg.port)
    }

    /// psql as the workload, in the background.
    fn spawn_psql(&self, commands: &[&str]) -> Child {
        let mut cmd = self.cg.command("psql");
        cmd.args(["-X", "-At", &self.dsn()]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("psql")
    }

    fn psql(&self, commands: &[&str]) -> Output {
        self.spawn_psql(commands).wait_with_output().expect("psql")
    }

    fn approvals(&self, uid: u32, args: &[&str]) -> Output {
        self.agent.approvals_as(uid, args)
    }

    fn direct(&self, sql: &str) -> String {
        self.pg.admin_sql(sql).expect("direct query")
    }

    fn table_exists(&self, name: &str) -> bool {
        self.direct(&format!("select count(*) from pg_class where relname = '{name}'")).trim() == "1"
    }

    /// The audit chain is intact.
    fn verify(&self) {
        self.agent.wait_synced();
        let out = self.agent.cli(&["audit", "verify"]);
        assert!(out.status.success(), "audit verify: {}{}", stdout(&out), stderr(&out));
    }

    fn events(&self, event: &str, request: &str) -> Vec<Value> {
        self.agent.audit_events(event).into_iter().filter(|r| r["request"] == request).collect()
    }
}

fn still_running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

#[test]
fn held_statement_runs_once_a_group_member_approves() {
    require_e2e!();
    let s = setup_with(
        "basic",
        "[profiles.ci.guardrails]\nddl = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
        "idle_timeout_secs = 2",
    );
    // An approver watching sees the request arrive.
    let mut watch = s
        .agent
        .approvals_command(s.who.bob, &["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch");
    thread::sleep(Duration::from_millis(300));
    let mut held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(1);
    let mut lines = cordon_tests::lines_of(&mut watch);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(lines.next().unwrap_or_default());
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = watch.kill();
    let _ = watch.wait();
    let ev: Value = serde_json::from_str(&first).unwrap_or(Value::Null);
    assert_eq!(ev["event"], "request", "{first}");
    assert_eq!(ev["request"]["id"], id.as_str(), "{first}");

    // Nothing reached the server, and the hold outlives the idle timeout.
    thread::sleep(Duration::from_secs(3));
    assert!(still_running(&mut held), "the held psql returned early");
    assert!(s.table_exists("scratch"), "the held DROP ran before approval");

    // Other sessions of the same workload are not held.
    let out = s.psql(&["select count(*) from accounts"]);
    assert_eq!(stdout(&out), "2", "{}", stderr(&out));

    // The approver sees it with the statement, the rule and the workload.
    let out = s.approvals(s.who.alice, &["list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let r = list.as_array().and_then(|l| l.iter().find(|r| r["id"] == id.as_str())).expect("listed").clone();
    assert_eq!(r["rule"], "ddl");
    assert_eq!(r["workload"]["uid"], WORKLOAD_UID);
    assert_eq!(r["text"], "drop table scratch");
    let out = s.approvals(s.who.alice, &["show", &id]);
    assert!(stdout(&out).contains("drop table scratch") && stdout(&out).contains("ddl"), "{}", stdout(&out));

    // Someone outside the approvers cannot even use the socket.
    let out = s.approvals(s.who.mallory, &["approve", &id]);
    assert!(!out.status.success() && stderr(&out).contains("not an approver"), "{}", stderr(&out));
    assert!(still_running(&mut held));

    let out = s.approvals(s.who.alice, &["approve", &id, "--reason", "planned cleanup"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("approved"), "{}", stdout(&out));
    let out = finish(held, Duration::from_secs(20));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "DROP TABLE");
    // psql printed the hold while it waited: the request and how to approve.
    let err = stderr(&out);
    assert!(err.contains("WARNING") && err.contains(&id) && err.contains("cordon approvals approve"), "{err}");
    assert!(!s.table_exists("scratch"));

    // Every step is in the chain.
    assert_eq!(s.events("approval_request", &id).len(), 1);
    let d = s.events("approval_decision", &id);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["approver"]["user"], "cordon-alice");
    assert_eq!(d[0]["reason"], "planned cleanup");
    assert_eq!(s.events("approval_granted", &id).len(), 1);
    assert_eq!(s.events("approval_consumed", &id).len(), 1);
    let stmt = s
        .agent
        .audit_events("statement")
        .into_iter()
        .find(|r| r["approval"]["request"] == id.as_str())
        .expect("statement record names its approval");
    assert_eq!(stmt["approval"]["by"][0], "cordon-alice");
    assert!(stmt["verdict"].is_null(), "{stmt}");
    // Replay shows the hold and the decision inline.
    let session = stmt["session"].as_str().expect("session");
    let out = s.agent.cli(&["replay", session]);
    let text = stdout(&out);
    let held_at = text.find(&format!("held for approval: request {id}")).expect("hold in replay");
    let approved_at = text.find("approved by cordon-alice").expect("decision in replay");
    let ran_at = text.find("=> drop table scratch").expect("statement in replay");
    assert!(held_at < approved_at && approved_at < ran_at, "{text}");
    let refused = s.events("approval_refused", &id);
    assert!(refused.iter().any(|r| r["approver"]["user"] == "cordon-mallory"), "{refused:?}");

    // A late approval changes nothing.
    let out = s.approvals(s.who.bob, &["approve", &id]);
    assert!(!out.status.success() && stderr(&out).contains("not pending"), "{}", stderr(&out));
    s.verify();
}

#[test]
fn denial_timeout_and_cancel_each_refuse_and_a_late_approval_is_a_no_op() {
    require_e2e!();
    let s = setup(
        "deny",
        "[profiles.ci.guardrails]\nddl = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"4s\""),
    );

    // Denied, with the approver's reason.
    let held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(1);
    let out = s.approvals(s.who.alice, &["deny", &id]);
    assert!(!out.status.success(), "a denial without a reason went through");
    let out = s.approvals(s.who.alice, &["deny", &id, "--reason", "not during the freeze"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = finish(held, Duration::from_secs(20));
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("not during the freeze") && err.contains("cordon-alice"), "{err}");
    assert!(s.table_exists("scratch"));
    let end = s.agent.audit_events("statement").into_iter().find(|r| r["approval"]["request"] == id.as_str());
    assert_eq!(end.expect("statement record")["verdict"], "deny");

    // Timed out: denied, and an approval after that does nothing.
    let started = Instant::now();
    let out = finish(s.spawn_psql(&["drop table scratch"]), Duration::from_secs(30));
    let id = s.agent.wait_request(2);
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert!(stderr(&out).contains("not approved within 4 s"), "{}", stderr(&out));
    assert_eq!(s.events("approval_expired", &id).len(), 1);
    let out = s.approvals(s.who.alice, &["approve", &id]);
    assert!(!out.status.success() && stderr(&out).contains("not pending"), "{}", stderr(&out));
    assert!(s.table_exists("scratch"));

    // Ctrl-C while held: psql sends a CancelRequest; 57014; withdrawn.
    let held = s.spawn_psql(&["\\set VERBOSITY verbose", "drop table scratch"]);
    let id = s.agent.wait_request(3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(held.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let out = finish(held, Duration::from_secs(20));
    assert!(stderr(&out).contains("57014") && stderr(&out).contains("canceling statement"), "{}", stderr(&out));
    let w = s.events("approval_withdrawn", &id);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0]["cause"], "cancel");
    let out = s.approvals(s.who.alice, &["approve", &id]);
    assert!(!out.status.success(), "a late approval of a withdrawn request went through");
    thread::sleep(Duration::from_millis(300));
    assert!(s.table_exists("scratch"));

    // A disconnect withdraws too.
    let mut held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(4);
    held.kill().expect("kill psql");
    let _ = held.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.events("approval_withdrawn", &id).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.events("approval_withdrawn", &id)[0]["cause"], "client_disconnected");
    assert!(s.table_exists("scratch"));
    s.verify();
}

#[test]
fn two_distinct_people_no_self_approval_and_break_glass() {
    require_e2e!();
    let s = setup(
        "threshold",
        "[profiles.ci.guardrails]\nddl = \"approve\"",
        &format!(
            "approvers = [\"%{GROUP}\", \"nobody\"]\nrequired = 2\nhold_timeout = \"60s\"\nbreak_glass = [\"cordon-oncall\"]"
        ),
    );
    let mut held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(1);

    // The workload's own user is an approver on paper, and still cannot.
    let out = s.approvals(WORKLOAD_UID, &["approve", &id]);
    assert!(!out.status.success() && stderr(&out).contains("own statement"), "{}", stderr(&out));
    // One person, twice, is one approval.
    let out = s.approvals(s.who.alice, &["approve", &id]);
    assert!(out.status.success() && stdout(&out).contains("1 of 2"), "{}{}", stdout(&out), stderr(&out));
    let out = s.approvals(s.who.alice, &["approve", &id]);
    assert!(!out.status.success() && stderr(&out).contains("already approved"), "{}", stderr(&out));
    thread::sleep(Duration::from_millis(500));
    assert!(still_running(&mut held) && s.table_exists("scratch"));
    let out = s.approvals(s.who.bob, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = finish(held, Duration::from_secs(20));
    assert_eq!(stdout(&out), "DROP TABLE", "{}", stderr(&out));
    let g = s.events("approval_granted", &id);
    assert_eq!(g[0]["by"], serde_json::json!(["cordon-alice", "cordon-bob"]));

    // Break-glass: alone, only with a reason, flagged.
    s.direct("create table scratch(id int); alter table scratch owner to app");
    let held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(2);
    let out = s.approvals(s.who.alice, &["approve", &id, "--break-glass", "--reason", "x"]);
    assert!(!out.status.success() && stderr(&out).contains("break_glass"), "{}", stderr(&out));
    let out = s.approvals(s.who.oncall, &["approve", &id, "--break-glass"]);
    assert!(!out.status.success() && stderr(&out).contains("--reason"), "{}", stderr(&out));
    let out = s.approvals(s.who.oncall, &["approve", &id]);
    assert!(!out.status.success(), "break-glass user approved without --break-glass: {}", stdout(&out));
    let out = s.approvals(s.who.oncall, &["approve", &id, "--break-glass", "--reason", "INC-4242 outage"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = finish(held, Duration::from_secs(20));
    assert_eq!(stdout(&out), "DROP TABLE", "{}", stderr(&out));
    let g = s.events("approval_granted", &id);
    assert_eq!(g[0]["break_glass"], true);
    let d = s.events("approval_decision", &id);
    assert!(d.iter().any(|r| r["break_glass"] == true && r["reason"] == "INC-4242 outage"));
    s.verify();
}

#[test]
fn a_once_grant_binds_one_execution_and_a_window_covers_its_fingerprint_until_it_expires() {
    require_e2e!();
    let s = setup(
        "once",
        "[profiles.ci.guardrails]\nunbounded_write = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
    );
    // The same statement twice in one session: each run is held.
    let held = s.spawn_psql(&["update accounts set balance = 1", "update accounts set balance = 1"]);
    let first = s.agent.wait_request(1);
    assert!(s.approvals(s.who.alice, &["approve", &first]).status.success());
    let second = s.agent.wait_request(2);
    assert_ne!(first, second);
    let out = s.approvals(s.who.alice, &["deny", &second, "--reason", "once means once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = finish(held, Duration::from_secs(20));
    assert!(stdout(&out).starts_with("UPDATE 2") && stderr(&out).contains("once means once"), "{}", stderr(&out));

    // Another literal is another request, with another binding.
    let held = s.spawn_psql(&["update accounts set balance = 999"]);
    let third = s.agent.wait_request(3);
    let reqs = s.agent.audit_events("approval_request");
    assert_ne!(reqs[0]["binding"], reqs[2]["binding"]);
    assert_eq!(reqs[0]["binding"], reqs[1]["binding"], "same text, same session: same binding");
    assert!(s.approvals(s.who.alice, &["deny", &third, "--reason", "no"]).status.success());
    finish(held, Duration::from_secs(20));
    assert_eq!(s.direct("select sum(balance) from accounts").trim(), "2");
    s.verify();
}

#[test]
fn a_window_grant_releases_repeats_of_its_fingerprint_then_expires() {
    require_e2e!();
    let s = setup(
        "window",
        "[profiles.ci.guardrails]\nunbounded_write = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\"\ngrant = \"5s\""),
    );
    let held = s.spawn_psql(&["update accounts set balance = 10"]);
    let id = s.agent.wait_request(1);
    assert!(s.approvals(s.who.alice, &["approve", &id]).status.success());
    assert!(finish(held, Duration::from_secs(20)).status.success());
    // Same fingerprint, another literal, another session: passes at once.
    let out = s.psql(&["update accounts set balance = 20"]);
    assert_eq!(stdout(&out), "UPDATE 2", "{}", stderr(&out));
    assert_eq!(s.events("approval_grant_used", &id).len(), 1);
    // Another statement shape is not covered.
    let held = s.spawn_psql(&["update accounts set owner = 'x'"]);
    let other = s.agent.wait_request(2);
    assert!(s.approvals(s.who.alice, &["deny", &other, "--reason", "different"]).status.success());
    finish(held, Duration::from_secs(20));
    // After the window, held again.
    thread::sleep(Duration::from_secs(5));
    let held = s.spawn_psql(&["update accounts set balance = 30"]);
    let again = s.agent.wait_request(3);
    assert!(s.approvals(s.who.alice, &["deny", &again, "--reason", "expired"]).status.success());
    let out = finish(held, Duration::from_secs(20));
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    assert_eq!(s.direct("select sum(balance) from accounts").trim(), "40");
    s.verify();
}

#[test]
fn nothing_in_a_held_query_runs_and_a_denying_rule_is_never_held() {
    require_e2e!();
    let s = setup(
        "adversary",
        "[profiles.ci.guardrails]\nddl = \"approve\"\nunbounded_write = \"deny\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
    );
    // A denied statement riding with one that asks for approval: denied at
    // once, no request.
    let out = s.psql(&["drop table scratch; delete from accounts"]);
    assert!(stderr(&out).contains("unbounded_write"), "{}", stderr(&out));
    assert!(s.agent.audit_events("approval_request").is_empty());
    // A harmless statement in front of a held one waits with it.
    let held = s.spawn_psql(&["insert into audit_me values (1); drop table scratch"]);
    let id = s.agent.wait_request(1);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(s.direct("select count(*) from audit_me").trim(), "0", "part of a held query ran");
    assert!(s.approvals(s.who.alice, &["deny", &id, "--reason", "no"]).status.success());
    finish(held, Duration::from_secs(20));
    assert_eq!(s.direct("select count(*) from audit_me").trim(), "0");
    // DDL hidden in a DO block or a multi-statement string is caught as
    // what it is (do_block is denied by default, never held).
    let out = s.psql(&["do $$ begin execute 'drop table scratch'; end $$"]);
    assert!(!out.status.success() && stderr(&out).contains("do_block"), "{}", stderr(&out));
    assert_eq!(s.agent.audit_events("approval_request").len(), 1);
    assert!(s.table_exists("scratch"));
    s.verify();
}

#[test]
fn a_restricted_label_reads_in_clear_only_for_the_approved_statement() {
    require_e2e!();
    let s = setup(
        "label",
        "record_results = true\n[profiles.ci.labels]\nrestricted = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
    );
    // Unlabeled columns are not held.
    let out = s.psql(&["select owner from accounts order by id"]);
    assert_eq!(stdout(&out), "ada\ngrace", "{}", stderr(&out));
    let held = s.spawn_psql(&["select ssn from accounts order by id"]);
    let id = s.agent.wait_request(1);
    assert!(s.approvals(s.who.alice, &["approve", &id]).status.success());
    let out = finish(held, Duration::from_secs(20));
    assert_eq!(stdout(&out), "123-45-6789\n219-09-9999", "{}", stderr(&out));
    // Denied: nothing comes back; a computed expression is held the same way.
    let held = s.spawn_psql(&["select reverse(ssn) from accounts"]);
    let id = s.agent.wait_request(2);
    assert!(s.approvals(s.who.alice, &["deny", &id, "--reason", "no need"]).status.success());
    let out = finish(held, Duration::from_secs(20));
    assert!(!stdout(&out).contains("6789") && !stdout(&out).contains("9876"), "{}", stdout(&out));
    assert!(stderr(&out).contains("no need"), "{}", stderr(&out));
    // The recording shows both holds and their decisions.
    let session = s.agent.audit_events("approval_request")[1]["session"].as_str().expect("session").to_string();
    let out = s.agent.cli(&["replay", &session]);
    let text = stdout(&out);
    assert!(text.contains("held for approval") && text.contains("denied by cordon-alice: no need"), "{text}");
    s.verify();
}

const JAVA: &str = r#"
import java.sql.*;
public class Main {
  public static void main(String[] a) throws Exception {
    try (Connection c = DriverManager.getConnection(a[0])) {
      String mode = a[1];
      try (PreparedStatement p = c.prepareStatement("update accounts set balance = ?")) {
        p.setInt(1, Integer.parseInt(a[2]));
        if (mode.equals("timeout")) p.setQueryTimeout(2);
        try {
          int n = p.executeUpdate();
          System.out.println("updated " + n);
        } catch (SQLException e) {
          System.out.println("error " + e.getSQLState() + " " + e.getMessage());
        }
        SQLWarning w = p.getWarnings();
        while (w != null) { System.out.println("warning " + w.getSQLState()); w = w.getNextWarning(); }
      }
      try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select 1")) {
        r.next();
        System.out.println("after " + r.getInt(1));
      }
    }
  }
}
"#;

#[test]
fn pgjdbc_query_timeout_cancels_a_held_execute_and_an_approved_one_runs_with_its_parameters() {
    require_e2e!();
    let s = setup(
        "jdbc",
        "[profiles.ci.guardrails]\nunbounded_write = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
    );
    let (_d, src) = workload_script("Main.java", JAVA).expect("java source");
    let url = format!("jdbc:postgresql://127.0.0.2:{}/postgres?user=nobody&sslmode=disable", s.pg.port);
    let java = |mode: &str, value: &str| {
        s.cg.command("java")
            .args(["-cp", "/usr/share/java/postgresql.jar", &src.display().to_string(), &url, mode, value])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("java")
    };
    // setQueryTimeout while held: pgjdbc's CancelRequest withdraws it.
    let out = finish(java("timeout", "7"), Duration::from_secs(60));
    let text = stdout(&out);
    assert!(text.contains("error 57014"), "{text}\n{}", stderr(&out));
    assert!(text.contains("after 1"), "the connection was not usable after the cancel: {text}");
    let id = s.agent.wait_request(1);
    assert_eq!(s.events("approval_withdrawn", &id)[0]["cause"], "cancel");
    assert_eq!(s.direct("select sum(balance) from accounts").trim(), "300");

    // Held at Execute with its parameter; approved; runs.
    let held = java("plain", "5");
    let id = s.agent.wait_request(2);
    let out = s.approvals(s.who.alice, &["show", &id]);
    assert!(
        stdout(&out).contains("$1 = (binary) 00000005"),
        "the approver does not see the parameter: {}",
        stdout(&out)
    );
    assert!(s.approvals(s.who.alice, &["approve", &id]).status.success());
    let out = finish(held, Duration::from_secs(60));
    let text = stdout(&out);
    assert!(text.contains("updated 2") && text.contains("warning CD003"), "{text}\n{}", stderr(&out));
    assert_eq!(s.direct("select sum(balance) from accounts").trim(), "10");
    s.verify();
}

/// `cordon policy check` names the file, line and field of approval mistakes.
#[test]
fn policy_check_names_approval_mistakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).expect("write");
        let out = Command::new(cordon_tests::cordon_bin()).args(["policy", "check"]).arg(&path).output().expect("run");
        (out.status.success(), stderr(&out) + &stdout(&out))
    };
    let (ok, msg) = check("[profiles.ci.guardrails]\nddl = \"approve\"\n");
    assert!(!ok && msg.contains("profiles.ci.approvals") && msg.contains("guardrails.ddl"), "{msg}");
    let (ok, msg) = check("[profiles.ci.approvals]\napprovers = [\"alice\"]\nrequired = 2\n");
    assert!(!ok && msg.contains(":3:") && msg.contains("profiles.ci.approvals.required"), "{msg}");
    let (ok, msg) = check("[profiles.ci.approvals]\napprovers = [\"%dba\"]\nhold_timeout = \"10 minutes\"\n");
    assert!(!ok && msg.contains("hold_timeout"), "{msg}");
    let (ok, msg) = check("[profiles.ci.approvals]\napprovers = [\"%dba\"]\ngrant = \"forever\"\n");
    assert!(!ok && msg.contains("grant"), "{msg}");
    let (ok, msg) = check("[profiles.ci.approvals]\napprovers = [\"bad name!\"]\n");
    assert!(!ok && msg.contains("approvers"), "{msg}");
    let (ok, msg) = check(
        "[profiles.ci.labels]\nrestricted = \"approve\"\n[profiles.ci.approvals]\napprovers = [\"%dba\"]\ngrant = \"30m\"\n",
    );
    assert!(ok, "{msg}");
}

/// `cordon approvals --store URL …` as a database role, from a process
/// that is neither agent: a plain local user with its own login.
fn store_cli(uid: u32, url: &str, password: &str, ca: &std::path::Path, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(cordon_tests::cordon_bin())
        .arg("approvals")
        .arg("--store")
        .arg(url)
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGSSLROOTCERT", ca)
        .uid(uid)
        .gid(cordon_tests::WORKLOAD_GID)
        .current_dir("/tmp")
        .output()
        .expect("cordon approvals --store")
}

#[test]
fn one_shared_store_decides_for_two_agents() {
    require_e2e!();
    let who = people();
    let store = Postgres::start_secure(&["127.0.0.3"], cordon_tests::free_port()).expect("store server");
    let ca = store.ca_file.clone().expect("store CA");
    store
        .admin_sql(
            "grant create on schema public to app; \
             create role appr_alice login password 'alice-pw-1'; create role appr_bob login password 'bob-pw-2'; \
             create role nobody login password 'nobody-pw-3';",
        )
        .expect("store roles");
    let url = |role: &str| format!("postgresql://{role}@127.0.0.3:{}/postgres?sslmode=require", store.port);
    // The store's owner creates the table with the CLI, then grants.
    let out = store_cli(who.mallory, &url("app"), cordon_tests::APP_PASSWORD, &ca, &["init-store"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    store.admin_sql("grant select, update on cordon_approvals to appr_alice, appr_bob, nobody").expect("grants");

    let approvals = format!(
        "store = \"{}\"\nstore_credentials = \"app\"\nstore_ca = \"{}\"\nhold_timeout = \"60s\"",
        url("app"),
        ca.display()
    );
    let a = setup("store-a", "[profiles.ci.guardrails]\nddl = \"approve\"", &approvals);
    let b = setup("store-b", "[profiles.ci.guardrails]\nddl = \"approve\"", &approvals);
    assert_ne!(a.agent.bpffs_dir, b.agent.bpffs_dir);
    let held_a = a.spawn_psql(&["drop table scratch"]);
    let id_a = a.agent.wait_request(1);
    let held_b = b.spawn_psql(&["drop table scratch"]);
    let id_b = b.agent.wait_request(1);

    // The approver sees both agents' requests in one queue.
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let out = store_cli(who.mallory, &url("appr_alice"), "alice-pw-1", &ca, &["list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let ids: Vec<String> =
            v.as_array().into_iter().flatten().filter_map(|r| r["id"].as_str().map(str::to_string)).collect();
        if (ids.contains(&id_a) && ids.contains(&id_b)) || Instant::now() > deadline {
            break ids;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(listed.contains(&id_a) && listed.contains(&id_b), "{listed:?}");

    // The workload's own role may not approve; a wrong password gets nowhere.
    let out = store_cli(who.mallory, &url("nobody"), "nobody-pw-3", &ca, &["approve", &id_a]);
    assert!(!out.status.success() && stdout(&out).contains("own statement"), "{}{}", stdout(&out), stderr(&out));
    let out = store_cli(who.mallory, &url("appr_alice"), "guess", &ca, &["approve", &id_a]);
    assert!(!out.status.success());

    let out = store_cli(who.mallory, &url("appr_alice"), "alice-pw-1", &ca, &["approve", &id_a, "--reason", "ok"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = store_cli(who.mallory, &url("appr_bob"), "bob-pw-2", &ca, &["deny", &id_b, "--reason", "not on b"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // Exactly once: a second decision on a decided row changes nothing.
    let out = store_cli(who.mallory, &url("appr_bob"), "bob-pw-2", &ca, &["deny", &id_a, "--reason", "late"]);
    assert!(!out.status.success() && stdout(&out).contains("not pending"), "{}", stdout(&out));

    let out = finish(held_a, Duration::from_secs(30));
    assert_eq!(stdout(&out), "DROP TABLE", "{}", stderr(&out));
    let out = finish(held_b, Duration::from_secs(30));
    assert!(stderr(&out).contains("not on b") && stderr(&out).contains("appr_bob"), "{}", stderr(&out));
    assert!(!a.table_exists("scratch") && b.table_exists("scratch"));
    let g = a.events("approval_granted", &id_a);
    assert_eq!(g[0]["by"], serde_json::json!(["appr_alice"]));
    assert_eq!(g[0]["channel"], "store");
    // A local approver cannot bypass the store.
    a.verify();
    b.verify();
    drop(store);
}

#[test]
fn an_unreachable_store_approves_nothing_and_the_hold_times_out() {
    require_e2e!();
    let port = cordon_tests::free_port();
    let approvals = format!(
        "store = \"postgresql://app@127.0.0.3:{port}/postgres?sslmode=disable\"\nstore_credentials = \"app\"\nhold_timeout = \"3s\""
    );
    let s = setup("store-down", "[profiles.ci.guardrails]\nddl = \"approve\"", &approvals);
    let out = finish(s.spawn_psql(&["drop table scratch"]), Duration::from_secs(30));
    assert!(stderr(&out).contains("not approved within 3 s"), "{}", stderr(&out));
    let id = s.agent.wait_request(1);
    assert_eq!(s.events("approval_store_unreachable", &id).len(), 1);
    assert!(s.table_exists("scratch"));
    s.verify();
}

/// A receiving end: accepts HTTP POSTs on loopback, answers 500 to the
/// first one (the sender must retry, with the same webhook-id) and 200
/// after, and keeps (headers, body) of each.
struct Receiver {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<(Vec<(String, String)>, String)>>>,
}

impl Receiver {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got: std::sync::Arc<std::sync::Mutex<Vec<(Vec<(String, String)>, String)>>> = Default::default();
        let keep = got.clone();
        thread::spawn(move || {
            let mut n = 0;
            for conn in listener.incoming().flatten() {
                n += 1;
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut headers = Vec::new();
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.trim().split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let len =
                    headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let status = if n == 1 { "500 Internal Server Error" } else { "200 OK" };
                let mut w = conn;
                let _ = w.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                );
                if let Ok(mut g) = keep.lock() {
                    g.push((headers, String::from_utf8_lossy(&body).into_owned()));
                }
            }
        });
        Self { port, got }
    }

    fn wait(&self, n: usize) -> Vec<(Vec<(String, String)>, String)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got.lock().map(|g| g.clone()).unwrap_or_default();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

#[test]
fn webhooks_are_signed_retried_and_verified_by_the_receiver() {
    use base64::Engine;
    use hmac::{Mac, SimpleHmac};
    require_e2e!();
    let who = people();
    let hook = Receiver::start();
    let slack = Receiver::start();
    let key = [7u8; 32];
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret = format!("whsec_{}", b64.encode(key));
    let policy = format!(
        "[profiles.ci]\n[profiles.ci.guardrails]\nddl = \"approve\"\n[profiles.ci.approvals]\napprovers = [\"%{GROUP}\"]\n\
         [[profiles.ci.approvals.webhook]]\nurl = \"http://127.0.0.1:{}/cordon\"\nsecret = \"ops\"\n\
         [[profiles.ci.approvals.webhook]]\nurl = \"http://127.0.0.1:{}/services/T0/B0/x\"\nformat = \"slack\"\n",
        hook.port, slack.port
    );
    let (pg, cg, agent) =
        cordon_tests::governed_full("ap-hook", SCHEMA, &policy, "", &format!("[webhooks]\nops = \"{secret}\""))
            .expect("governed");
    let s = Setup { pg, cg, agent, who };
    let held = s.spawn_psql(&["drop table scratch"]);
    let id = s.agent.wait_request(1);
    assert!(s.approvals(s.who.alice, &["approve", &id]).status.success());
    assert!(finish(held, Duration::from_secs(20)).status.success());

    // request (500, retried) + request again + granted.
    let got = hook.wait(3);
    assert!(got.len() >= 3, "{got:?}\n{}", s.agent.log_text());
    let first = header(&got[0].0, "webhook-id");
    assert_eq!(
        got.iter().filter(|(h, _)| header(h, "webhook-id") == first).count(),
        2,
        "the refused delivery was retried with its webhook-id"
    );
    for (h, body) in &got {
        let id = header(h, "webhook-id");
        let ts = header(h, "webhook-timestamp");
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        let want = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
        let sigs = header(h, "webhook-signature");
        assert!(sigs.split(' ').any(|s| s == want), "signature {sigs} does not verify (want {want})");
        let age = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now").as_secs() as i64
            - ts.parse::<i64>().expect("timestamp");
        assert!(age.abs() < 300, "timestamp outside tolerance");
        // A statement's literals never leave in clear, and neither does the
        // full text the approver sees; the body is the recorded one.
        let v: Value = serde_json::from_str(body).expect("json body");
        assert!(v["type"].as_str().is_some_and(|t| t.starts_with("approval.")), "{v}");
    }
    let types: Vec<String> = got
        .iter()
        .filter_map(|(_, b)| serde_json::from_str::<Value>(b).ok()?["type"].as_str().map(str::to_string))
        .collect();
    assert!(
        types.contains(&"approval.requested".to_string()) && types.contains(&"approval.granted".to_string()),
        "{types:?}"
    );
    // A tampered body does not verify.
    let (h, body) = &got[2];
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{}.{}.{}x", header(h, "webhook-id"), header(h, "webhook-timestamp"), body).as_bytes());
    assert_ne!(format!("v1,{}", b64.encode(mac.finalize().into_bytes())), header(h, "webhook-signature"));

    // Slack: a message naming the request and the approve command.
    let got = slack.wait(2);
    let texts: Vec<String> = got
        .iter()
        .filter_map(|(_, b)| serde_json::from_str::<Value>(b).ok()?["text"].as_str().map(str::to_string))
        .collect();
    assert!(texts.iter().any(|t| t.contains(&id) && t.contains("cordon approvals approve")), "{texts:?}");
}

/// A raw protocol client: Parse a named statement that needs approval
/// (nothing holds a Parse: it runs nothing), then try to run it with SQL.
const RAW: &str = r#"
import socket, struct, sys
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])))
def send(t, body):
    s.sendall((t.encode() if t else b"") + struct.pack("!i", len(body) + 4) + body)
def read():
    t = s.recv(1)
    n = struct.unpack("!i", s.recv(4))[0] - 4
    b = b""
    while len(b) < n:
        b += s.recv(n - len(b))
    return t.decode(), b
def until_ready():
    out = []
    while True:
        t, b = read()
        if t == "E":
            out.append("ERROR " + b.decode(errors="replace"))
        elif t == "C":
            out.append("OK " + b.decode(errors="replace").rstrip("\0"))
        if t == "Z":
            return out
params = b"user\0nobody\0database\0postgres\0\0"
send("", struct.pack("!i", 196608) + params)
until_ready()
def query(q):
    send("Q", q.encode() + b"\0")
    print(q, "=>", until_ready())
send("P", b"s1\0drop table scratch\0" + struct.pack("!h", 0))
send("S", b"")
print("parse =>", until_ready())
query("EXECUTE s1")
query("EXPLAIN ANALYZE EXECUTE s1")
query("PREPARE p AS drop table scratch")
query("select count(*) from scratch")
"#;

#[test]
fn sql_prepare_and_execute_cannot_get_around_a_hold() {
    require_e2e!();
    let s = setup(
        "prepare",
        "[profiles.ci.guardrails]\nddl = \"approve\"",
        &format!("approvers = [\"%{GROUP}\"]\nhold_timeout = \"60s\""),
    );
    let (_d, script) = workload_script("raw.py", RAW).expect("script");
    let out =
        s.cg.command(cordon_tests::TEST_PYTHON)
            .args([script.display().to_string(), s.pg.port.to_string()])
            .output()
            .expect("python");
    let text = stdout(&out);
    assert!(text.contains("EXECUTE s1 => ['ERROR") && text.contains("SQL EXECUTE"), "{text}\n{}", stderr(&out));
    assert!(text.contains("EXPLAIN ANALYZE EXECUTE s1 => ['ERROR"), "{text}");
    assert!(text.contains("PREPARE p AS drop table scratch => ['ERROR") && text.contains("PREPARE p"), "{text}");
    assert!(text.contains("OK SELECT 1"), "{text}");
    assert!(s.table_exists("scratch"), "the DROP ran without approval");
    assert!(s.agent.audit_events("approval_request").is_empty());
    s.verify();
}
