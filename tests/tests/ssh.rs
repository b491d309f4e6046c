//! SSH end to end: a real sshd (Debian's openssh-server) on 127.0.0.5, the
//! real OpenSSH client as an unprivileged workload in a tagged cgroup,
//! cordon in between with credentials only it holds. Written the way a
//! workload trying to get around the command policy would: substitutions,
//! shells, forwarding, a changed upstream key, the files cordon writes.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use cordon_tests::{finish, keygen, require_e2e, stderr, stdout, Agent, Cgroup, Sshd, WORKLOAD_UID};
use serde_json::Value;

const HOST: &str = "127.0.0.5";
const DEPLOY: &str = cordon_tests::SSH_DEPLOY_USER;

struct Setup {
    sshd: Sshd,
    cg: Cgroup,
    agent: Agent,
    /// The workload's known_hosts (what an admin installs once).
    known: PathBuf,
}

fn setup(test: &str, profile: &str) -> Setup {
    setup_pinned(test, profile, None)
}

fn setup_pinned(test: &str, profile: &str, pin: Option<String>) -> Setup {
    setup_full(test, profile, pin, false)
}

fn setup_full(test: &str, profile: &str, pin: Option<String>, ca: bool) -> Setup {
    setup_users(test, profile, pin, ca, "")
}

/// `pin`: a host key to pin instead of the server's own; `ca`: cordon logs
/// in with per-session certificates from a user CA (and the server no
/// longer accepts its plain key).
/// …and `users`: the intercept's typed-user map, as TOML lines.
fn setup_users(test: &str, profile: &str, pin: Option<String>, ca: bool, users: &str) -> Setup {
    let sshd = Sshd::start(HOST, cordon_tests::free_port());
    // `@SSHD_PORT@` in the profile: the test server's port, known only now.
    let profile = &profile.replace("@SSHD_PORT@", &sshd.port.to_string());
    let name = format!("cordon-ssh-{test}-{}", std::process::id());
    let cg = Cgroup::create(&name).expect("cgroup");
    let pins = sshd.path("pins");
    fs::write(&pins, sshd.pin(pin.as_deref()) + "\n").expect("pins");
    let body = format!(
        "[[intercept]]\nname = \"hosts\"\nprotocol = \"ssh\"\nport = {port}\ndestinations = [\"{HOST}/32\"]\n\
         credentials = \"deploy\"\nknown_hosts = \"{pins}\"\n{users}\n\n[profiles.ci]\n{profile}\n\n\
         [[tag]]\ncgroup = \"{name}\"\nprofile = \"ci\"\n",
        port = sshd.port,
        pins = pins.display(),
    );
    let mut agent = Agent::new(&body).expect("agent");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(agent.dir.path().join("secrets.toml")).expect("secrets");
        let (field, file) = if ca { ("user_ca_file", "user_ca") } else { ("key_file", "cordon_key") };
        writeln!(f, "\n[credentials.deploy]\nuser = \"{DEPLOY}\"\n{field} = \"{}\"", sshd.path(file).display())
            .expect("write");
    }
    if ca {
        fs::write(sshd.path("authorized_keys"), "").expect("no plain key");
    }
    agent.start().expect("agent start");
    // What an admin installs once on the workload host.
    let out = agent.cli(&["ssh", "known-hosts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let known = sshd.path("ssh_known_hosts");
    fs::write(&known, stdout(&out)).expect("known_hosts");
    fs::set_permissions(sshd.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(&known, fs::Permissions::from_mode(0o644)).expect("chmod");
    Setup { sshd, cg, agent, known }
}

impl Setup {
    /// OpenSSH as the workload: strict host key checking against the
    /// installed lines only, no key of its own, no password.
    fn ssh_cmd(&self, extra: &[&str], remote: &[&str]) -> Command {
        let mut cmd = self.cg.command("ssh");
        // ssh keeps the first value of an option: the test's own go first.
        cmd.args(extra);
        cmd.args(self.opts())
            .args(["-o", "ConnectTimeout=10", "-p", &self.sshd.port.to_string()])
            .arg(format!("anyone@{HOST}"))
            .args(remote);
        cmd
    }

    fn ssh(&self, remote: &str) -> Output {
        self.ssh_cmd(&[], &[remote]).output().expect("ssh")
    }

    fn events(&self, event: &str) -> Vec<Value> {
        self.agent.audit_events(event)
    }
}

#[test]
fn exec_allowed_runs_upstream_with_cordons_credential_and_is_recorded() {
    require_e2e!();
    let s = setup("allow", "[profiles.ci.ssh]\ncommands = [\"echo *\", \"id -un\"]");
    let out = s.ssh("echo hello from the workload");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from the workload");
    // It ran upstream as the deploy account, which the workload has no key for.
    let out = s.ssh("id -un");
    assert_eq!(stdout(&out), DEPLOY, "{}", stderr(&out));
    let stmts = s.events("statement");
    assert!(stmts.iter().any(|r| r["text"] == "echo hello from the workload" && r["kind"] == "command"), "{stmts:?}");
    let ends = s.events("statement_end");
    assert!(ends.iter().any(|r| r["outcome"]["tags"][0] == "exit 0"), "{ends:?}");
    let opens = s.events("open");
    assert_eq!(opens[0]["workload"]["uid"], WORKLOAD_UID);
    let closes = s.events("close");
    assert_eq!(closes[0]["upstream_user"], DEPLOY);
    let out = s.agent.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn commands_outside_the_policy_are_refused_before_anything_runs() {
    require_e2e!();
    let s = setup("deny", "[profiles.ci.ssh]\ncommands = [\"echo *\", \"cat *\", \"touch /tmp/cordon-ssh-*\"]");
    let marker = format!("/tmp/cordon-ssh-marker-{}", std::process::id());
    fs::write(&marker, "x").expect("marker");
    for attack in [
        format!("rm -f {marker}"),
        format!("echo $(rm -f {marker})"),
        format!("echo `rm -f {marker}`"),
        format!("echo ok; rm -f {marker}"),
        format!("cat /dev/null && rm -f {marker}"),
        format!("sh -c 'rm -f {marker}'"),
        format!("echo rm -f {marker} | sh"),
        format!("cat <(rm -f {marker})"),
        format!("X=1 rm -f {marker}"),
        "echo $HOME".to_string(),
        format!("echo x > {marker}"),
        "find / -maxdepth 0 -exec id ;".to_string(),
        "echo 'unterminated".to_string(),
    ] {
        let out = s.ssh(&attack);
        assert_eq!(out.status.code(), Some(126), "{attack}: {}{}", stdout(&out), stderr(&out));
        assert!(stderr(&out).contains("cordon: refused"), "{attack}: {}", stderr(&out));
        assert!(Path::new(&marker).exists(), "{attack} ran");
    }
    let denied = s.events("statement").into_iter().filter(|r| r["verdict"] == "deny").count();
    assert_eq!(denied, 13);
    let _ = fs::remove_file(&marker);
}

#[test]
fn the_installed_ca_line_is_enough_for_strict_host_key_checking() {
    require_e2e!();
    let s = setup("trust", "[profiles.ci.ssh]\ncommands = [\"echo *\"]");
    let all = fs::read_to_string(&s.known).expect("known");
    assert!(all.starts_with("@cert-authority * ssh-ed25519 "), "{all}");
    // Only the CA line: the per-connection certificate proves the host.
    let ca_only = s.sshd.path("ca_only");
    fs::write(&ca_only, all.lines().next().unwrap_or_default().to_string() + "\n").expect("write");
    fs::set_permissions(&ca_only, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = s
        .ssh_cmd(&["-v", "-o", &format!("GlobalKnownHostsFile={}", ca_only.display())], &["echo via-cert"])
        .output()
        .expect("ssh");
    assert_eq!(stdout(&out), "via-cert", "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Server host certificate") && stderr(&out).contains("cordon session"),
        "{}",
        stderr(&out)
    );
    // Only the plain line, for clients that do not take certificates.
    let plain = s.sshd.path("plain_only");
    fs::write(&plain, all.lines().nth(1).unwrap_or_default().to_string() + "\n").expect("write");
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = s
        .ssh_cmd(
            &["-o", &format!("GlobalKnownHostsFile={}", plain.display()), "-o", "HostKeyAlgorithms=ssh-ed25519"],
            &["echo via-key"],
        )
        .output()
        .expect("ssh");
    assert_eq!(stdout(&out), "via-key", "{}", stderr(&out));
    // Nothing installed: strict checking refuses, as it should.
    let out = s.ssh_cmd(&["-o", "GlobalKnownHostsFile=/dev/null"], &["echo nope"]).output().expect("ssh");
    assert!(!out.status.success() && stderr(&out).contains("Host key verification failed"), "{}", stderr(&out));
}

#[test]
fn a_changed_upstream_host_key_is_refused_and_audited() {
    require_e2e!();
    let other = tempfile::tempdir().expect("tempdir");
    keygen(&other.path().join("k"));
    let wrong = fs::read_to_string(other.path().join("k.pub")).expect("key");
    // The pin names the right server with a key it does not have.
    let s = setup_pinned("mismatch", "[profiles.ci.ssh]\ncommands = [\"echo *\"]", Some(wrong));
    let out = s.ssh("echo should-not-run");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not pinned"), "{}", stderr(&out));
    let refused = s.events("upstream_refused");
    assert_eq!(refused[0]["kind"], "host_key", "{refused:?}");
}

#[test]
fn shells_forwarding_and_agent_are_refused_by_default() {
    require_e2e!();
    let s = setup("shell", "[profiles.ci.ssh]\ncommands = [\"echo *\"]");
    let out = s.ssh_cmd(&["-tt"], &[]).stdin(Stdio::null()).output().expect("ssh");
    assert!(
        stdout(&out).contains("interactive shells are not allowed")
            || stderr(&out).contains("interactive shells are not allowed"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // -W opens a direct-tcpip channel: forwarding.
    let out = s.ssh_cmd(&["-W", &format!("{HOST}:{}", s.sshd.port)], &[]).stdin(Stdio::null()).output().expect("ssh");
    assert!(!out.status.success(), "{}", stderr(&out));
    let refused = s.events("ssh_refused");
    assert!(refused.iter().any(|r| r["what"] == "port_forwarding"), "{refused:?}");
    // Remote forwarding, of a port and of a Unix socket: refused, and the
    // client is told (ExitOnForwardFailure turns that into its exit status).
    for spec in ["0:127.0.0.1:1", "/tmp/cordon-rfwd.sock:127.0.0.1:1"] {
        let out = s
            .ssh_cmd(&["-o", "ExitOnForwardFailure=yes", "-R", spec], &["echo forwarded"])
            .stdin(Stdio::null())
            .output()
            .expect("ssh");
        assert!(!stdout(&out).contains("forwarded"), "-R {spec} was accepted: {}", stderr(&out));
    }
    let refused = s.events("ssh_refused");
    for what in ["port", "Unix socket"] {
        assert!(
            refused.iter().any(|r| r["what"] == "remote_forwarding" && r.to_string().contains(what)),
            "no remote_forwarding refusal naming a {what}: {refused:?}"
        );
    }
    // Workloads are offered AES-GCM only; a client without it is told why.
    let out = s.ssh_cmd(&["-o", "Ciphers=chacha20-poly1305@openssh.com"], &["echo hi"]).output().expect("ssh");
    assert!(!out.status.success() && stderr(&out).contains("no matching cipher"), "{}", stderr(&out));
    let out = s.ssh_cmd(&["-o", "Ciphers=aes128-gcm@openssh.com"], &["echo hi"]).output().expect("ssh");
    assert_eq!(stdout(&out), "hi", "{}", stderr(&out));
    let out = s.ssh_cmd(&["-A", "-o", "ForwardAgent=yes"], &["echo $SSH_AUTH_SOCK"]).output().expect("ssh");
    assert_eq!(out.status.code(), Some(126), "an expansion is refused either way: {}", stderr(&out));
}

#[test]
fn no_credential_reaches_anything_cordon_writes_or_the_workload() {
    require_e2e!();
    let s = setup("secrets", "[profiles.ci.ssh]\ncommands = [\"echo *\"]");
    let _ = s.ssh("echo one");
    let _ = s.ssh("rm -rf /");
    s.agent.wait_synced();
    let key = fs::read_to_string(s.sshd.path("cordon_key")).expect("key");
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect::<Vec<_>>().join("");
    // The end of the body is the private part (the start is the same for
    // every Ed25519 key).
    let chunk = body.get(body.len() - 80..body.len() - 40).expect("key body").to_string();
    let mut files = Vec::new();
    let mut stack = vec![s.agent.dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "secrets.toml") {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 3, "{files:?}");
    for f in files {
        let text = fs::read(&f).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&text).contains(&chunk), "{} holds the upstream key", f.display());
    }
}

#[test]
fn an_exec_that_needs_approval_is_held_then_runs_or_is_refused() {
    require_e2e!();
    let alice = cordon_tests::local_user("cordon-alice", &["cordon-approvers"]).expect("alice");
    let s = setup(
        "approve",
        "[profiles.ci.ssh]\ncommands = [\"echo *\"]\napprove = [\"touch /tmp/cordon-ssh-approved-*\"]\n\
         [profiles.ci.approvals]\napprovers = [\"%cordon-approvers\"]\nhold_timeout = \"60s\"",
    );
    let file = format!("/tmp/cordon-ssh-approved-{}", std::process::id());
    let _ = fs::remove_file(&file);
    let held =
        s.ssh_cmd(&[], &[&format!("touch {file}")]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ssh");
    let id = s.agent.wait_request(1);
    thread::sleep(Duration::from_millis(300));
    assert!(!Path::new(&file).exists(), "ran before approval");
    let out = s.agent.approvals_as(alice, &["show", &id]);
    assert!(stdout(&out).contains(&format!("touch {file}")), "{}", stdout(&out));
    assert!(s.agent.approvals_as(alice, &["approve", &id]).status.success());
    let out = finish(held, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("held for approval (request {id})")), "{}", stderr(&out));
    assert!(Path::new(&file).exists());
    fs::remove_file(&file).expect("cleanup");
    // Denied: refused with the reason, nothing runs.
    let held =
        s.ssh_cmd(&[], &[&format!("touch {file}")]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ssh");
    let id = s.agent.wait_request(2);
    assert!(s.agent.approvals_as(alice, &["deny", &id, "--reason", "not now"]).status.success());
    let out = finish(held, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(126));
    assert!(stderr(&out).contains("not now"), "{}", stderr(&out));
    assert!(!Path::new(&file).exists());
    // A disconnect withdraws.
    let mut held =
        s.ssh_cmd(&[], &[&format!("touch {file}")]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ssh");
    let id = s.agent.wait_request(3);
    held.kill().expect("kill");
    let _ = held.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.events("approval_withdrawn").iter().any(|r| r["request"] == id.as_str()) {
        assert!(Instant::now() < deadline, "not withdrawn");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!s.agent.approvals_as(alice, &["approve", &id]).status.success());
    assert!(!Path::new(&file).exists());
}

#[test]
fn output_is_masked_across_chunk_boundaries_and_the_recording_matches() {
    require_e2e!();
    let s = setup("mask", "[profiles.ci.ssh]\ncommands = [\"cat /tmp/cordon-ssh-cards-*\", \"echo *\"]");
    let file = format!("/tmp/cordon-ssh-cards-{}", std::process::id());
    // Many lines: SSH packets (32 KiB) end inside cards at arbitrary places.
    let mut body = String::new();
    for i in 0..5000 {
        body.push_str(&format!("row {i:05} card 4111 1111 1111 1111 and key AKIAIOSFODNN7ABCDEFG end\n"));
    }
    fs::write(&file, &body).expect("cards");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = s.ssh(&format!("cat {file}"));
    let _ = fs::remove_file(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 5000);
    assert!(
        !text.contains("4111 1111") && !text.contains("AKIAIOSFODNN7ABCDEFG"),
        "a secret got through: {}",
        text.lines().find(|l| l.contains("4111 1111") || l.contains("AKIA")).unwrap_or_default()
    );
    assert!(
        text.contains("row 04999 card **** **** **** **** and key ******************** end"),
        "{}",
        &text[text.len() - 200..]
    );
    let ends = s.events("statement_end");
    let masked = &ends.iter().find(|r| r["outcome"]["masked"].is_object()).expect("masked counts")["outcome"]["masked"];
    assert_eq!(masked["output/detector:card"], 5000, "{masked}");
    // The recording holds what the workload saw, hashed into the close record.
    let close = s.events("close").into_iter().next().expect("close");
    let rec = &close["recordings"][0];
    let cast = fs::read_to_string(rec["path"].as_str().expect("path")).expect("cast");
    assert!(cast.starts_with("{\"version\":3") || cast.contains("\"version\":3"), "{}", &cast[..200.min(cast.len())]);
    assert!(!cast.contains("4111 1111") && !cast.contains("AKIAIOSFODNN7ABCDEFG"));
    let session = close["session"].as_str().expect("session");
    let out = s.agent.cli(&["replay", session, "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let replayed = stdout(&out);
    assert!(replayed.contains(text.lines().last().unwrap_or("?")), "{}", &replayed[..300.min(replayed.len())]);
    assert_eq!(replayed.matches("**** **** **** ****").count(), 5000);
}

impl Setup {
    /// The options every client here uses (the workload changes nothing
    /// but trusts the installed lines).
    fn opts(&self) -> Vec<String> {
        cordon_tests::ssh_strict_opts(&self.known)
    }

    fn scp(&self, extra: &[&str], from: &str, to: &str) -> Output {
        let mut cmd = self.cg.command("scp");
        cmd.args(self.opts()).args(["-P", &self.sshd.port.to_string()]).args(extra).args([from, to]);
        cmd.output().expect("scp")
    }

    fn sftp(&self, batch: &str) -> Output {
        let mut cmd = self.cg.command("sftp");
        cmd.args(self.opts())
            .args(["-P", &self.sshd.port.to_string(), "-b", "-"])
            .arg(format!("x@{HOST}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("sftp");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            let _ = stdin.write_all(batch.as_bytes());
        }
        finish(child, Duration::from_secs(30))
    }

    fn rsync(&self, from: &str, to: &str) -> Output {
        let ssh = format!("ssh {} -p {}", self.opts().join(" "), self.sshd.port);
        self.cg.command("rsync").args(["-a", "-e", &ssh, from, to]).output().expect("rsync")
    }
}

/// A world-writable scratch directory for the workload (runs as nobody).
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/cordon-ssh-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("scratch");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

#[test]
fn transfers_follow_the_profile_deny_read_only_allow() {
    require_e2e!();
    let remote = scratch("remote");
    fs::write(remote.join("report.txt"), "quarterly numbers\n").expect("remote file");
    fs::set_permissions(remote.join("report.txt"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let local = scratch("local");
    let up = local.join("upload.txt");
    fs::write(&up, "from the workload\n").expect("local file");
    fs::set_permissions(&up, fs::Permissions::from_mode(0o644)).expect("chmod");
    let src = |f: &str| format!("x@{HOST}:{}/{f}", remote.display());

    // Denied (the default): scp in both protocols, sftp and rsync fail.
    let s = setup("xfer-deny", "[profiles.ci.ssh]\ncommands = [\"echo *\"]");
    assert!(!s.scp(&[], &src("report.txt"), &local.join("a").display().to_string()).status.success());
    assert!(!s.scp(&["-O"], &src("report.txt"), &local.join("b").display().to_string()).status.success());
    assert!(!s.rsync(&src("report.txt"), &local.join("c").display().to_string()).status.success());
    assert!(!local.join("a").exists() && !local.join("b").exists() && !local.join("c").exists());
    drop(s);

    // Read-only: downloads work, every upload is refused.
    let s = setup("xfer-ro", "[profiles.ci.ssh]\ncommands = [\"echo *\"]\ntransfer = \"read-only\"");
    let out = s.scp(&[], &src("report.txt"), &local.join("sftp-dl").display().to_string());
    assert!(out.status.success(), "scp (sftp): {}", stderr(&out));
    let out = s.scp(&["-O"], &src("report.txt"), &local.join("scp-dl").display().to_string());
    assert!(out.status.success(), "scp -O: {}", stderr(&out));
    let out = s.rsync(&src("report.txt"), &local.join("rsync-dl").display().to_string());
    assert!(out.status.success(), "rsync: {}", stderr(&out));
    for f in ["sftp-dl", "scp-dl", "rsync-dl"] {
        assert_eq!(fs::read_to_string(local.join(f)).unwrap_or_default(), "quarterly numbers\n", "{f}");
    }
    let out = s.scp(&[], &up.display().to_string(), &src("up-sftp.txt"));
    assert!(!out.status.success(), "an sftp upload went through");
    let out = s.scp(&["-O"], &up.display().to_string(), &src("up-scp.txt"));
    assert!(!out.status.success(), "an scp -O upload went through");
    let out = s.rsync(&up.display().to_string(), &src("up-rsync.txt"));
    assert!(!out.status.success(), "an rsync upload went through");
    let out = s.sftp(&format!(
        "-rm {}/report.txt\n-mkdir {}/newdir\nget {}/report.txt {}/sftp-get\n",
        remote.display(),
        remote.display(),
        remote.display(),
        local.display()
    ));
    assert!(stderr(&out).contains("Permission denied"), "{}{}", stdout(&out), stderr(&out));
    assert!(remote.join("report.txt").exists() && !remote.join("newdir").exists());
    let ends = s.events("statement_end");
    assert!(
        ends.iter().any(|r| r["outcome"]["tags"].to_string().contains("refused: remove; mkdir")),
        "the refusals are recorded: {ends:?}"
    );
    assert!(local.join("sftp-get").exists(), "a read in the same session still works");
    for f in ["up-sftp.txt", "up-scp.txt", "up-rsync.txt"] {
        assert!(!remote.join(f).exists(), "{f} was written");
    }
    drop(s);

    // Allowed: uploads work.
    let s = setup("xfer-allow", "[profiles.ci.ssh]\ncommands = [\"echo *\"]\ntransfer = \"allow\"");
    let out = s.scp(&[], &up.display().to_string(), &src("up-ok.txt"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(remote.join("up-ok.txt")).unwrap_or_default(), "from the workload\n");
    let _ = fs::remove_dir_all(&remote);
    let _ = fs::remove_dir_all(&local);
}

#[test]
fn an_allowed_shell_is_recorded_and_masked_on_screen() {
    require_e2e!();
    let s = setup("shell-rec", "[profiles.ci.ssh]\ncommands = [\"echo *\"]\nshell = \"record\"");
    let sock = scratch("tmux");
    // The workload user's login shell is nologin; without SHELL (CI's environment is
    // bare) tmux would run the pane through it and the server would exit at once.
    let tmux = |args: &[&str]| {
        s.cg.command("tmux")
            .env("SHELL", "/bin/sh")
            .env("TERM", "xterm")
            .arg("-f")
            .arg("/dev/null")
            .arg("-S")
            .arg(sock.join("s"))
            .args(args)
            .output()
            .expect("tmux")
    };
    // If ssh ends early, the pane keeps its error on the screen for the failure message.
    let ssh = format!(
        "ssh {} -tt -p {} anyone@{HOST} 2>&1; echo ssh ended with status $?; sleep 60",
        s.opts().iter().map(|o| format!("'{o}'")).collect::<Vec<_>>().join(" "),
        s.sshd.port
    );
    let out = tmux(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &ssh]);
    assert!(out.status.success(), "{}", stderr(&out));
    let screen = || {
        let out = tmux(&["capture-pane", "-p", "-t", "t"]);
        format!("{}{}", stdout(&out), stderr(&out))
    };
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = screen();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {needle:?} on the screen:\n{text}");
            thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("$");
    tmux(&["send-keys", "-t", "t", "echo card 4111 1111 1111 1111 done", "Enter"]);
    let text = wait_for("card **** **** **** **** done\n");
    assert!(!text.contains("4111 1111"), "{text}");
    tmux(&["send-keys", "-t", "t", "exit", "Enter"]);
    wait_for("ssh ended with status 0");
    let _ = tmux(&["kill-server"]);
    let close = s.events("close").into_iter().next().expect("close");
    let session = close["session"].as_str().expect("session").to_string();
    let out = s.agent.cli(&["replay", &session, "--no-wait"]);
    let replayed = stdout(&out);
    assert!(replayed.contains("card **** **** **** **** done") && !replayed.contains("4111 1111"), "{replayed}");
    let stmts = s.events("statement");
    assert!(stmts.iter().any(|r| r["text"] == "<interactive shell>" && r["verdict"].is_null()), "{stmts:?}");
    let _ = fs::remove_dir_all(&sock);
}

#[test]
fn kill_9_of_the_agent_fails_closed_for_ssh() {
    require_e2e!();
    let mut s = setup("kill9", "[profiles.ci.ssh]\ncommands = [\"echo *\", \"touch /tmp/cordon-ssh-kill9-*\"]");
    assert_eq!(stdout(&s.ssh("echo up")), "up");
    s.agent.kill();
    let marker = format!("/tmp/cordon-ssh-kill9-{}", std::process::id());
    let out = s.ssh(&format!("touch {marker}"));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(!Path::new(&marker).exists(), "a governed ssh reached the server with the agent dead");
    // The programs stayed pinned: the connect went to the dead proxy.
    assert!(stderr(&out).contains("Connection refused") || stderr(&out).contains("closed"), "{}", stderr(&out));
}

const PARAMIKO: &str = r#"
import sys, paramiko
host, port, known, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = paramiko.SSHClient()
c.load_host_keys(known)
c.set_missing_host_key_policy(paramiko.RejectPolicy())
# No key and no agent: the workload has nothing; cordon accepts "none".
t = paramiko.Transport((host, port))
t.connect()
key = t.get_remote_server_key()
name = "[%s]:%d" % (host, port)
ok = c.get_host_keys().check(name, key)
print("hostkey", "ok" if ok else "UNKNOWN")
t.auth_none("anyone")
ch = t.open_session()
ch.exec_command(cmd)
out = ch.makefile("rb").read().decode()
err = ch.makefile_stderr("rb").read().decode()
print("status", ch.recv_exit_status())
print("out", out.strip())
print("err", err.strip())
"#;

const ASYNCSSH: &str = r#"
import sys, asyncio, asyncssh
host, port, known, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def main():
    async with asyncssh.connect(host, port, username="anyone", known_hosts=known, client_keys=None, agent_path=None, password=None) as c:
        r = await c.run(cmd)
        print("status", r.exit_status)
        print("out", (r.stdout or "").strip())
        print("err", (r.stderr or "").strip())
asyncio.run(main())
"#;

#[test]
fn paramiko_and_asyncssh_work_as_clients() {
    require_e2e!();
    let s = setup("pyclients", "[profiles.ci.ssh]\ncommands = [\"echo *\"]");
    // paramiko matches exact names only and cannot read @cert-authority
    // lines: the per-destination line is for it.
    let out = s.agent.cli(&["ssh", "known-hosts", &format!("[{HOST}]:{}", s.sshd.port)]);
    let known = s.sshd.path("known_exact");
    let lines = stdout(&out);
    let exact = lines.lines().filter(|l| l.starts_with('[')).collect::<Vec<_>>().join("\n") + "\n";
    fs::write(&known, exact).expect("known");
    fs::set_permissions(&known, fs::Permissions::from_mode(0o644)).expect("chmod");
    for (name, script, kh) in [("paramiko", PARAMIKO, &known), ("asyncssh", ASYNCSSH, &s.known)] {
        let (_d, path) = cordon_tests::workload_script(&format!("client_{name}.py"), script).expect("script");
        let run = |cmd: &str| {
            s.cg.command(cordon_tests::TEST_PYTHON)
                .args([
                    path.display().to_string(),
                    HOST.to_string(),
                    s.sshd.port.to_string(),
                    kh.display().to_string(),
                    cmd.to_string(),
                ])
                .output()
                .expect("python")
        };
        let out = run("echo from python");
        let text = stdout(&out);
        assert!(text.contains("status 0") && text.contains("out from python"), "{name}: {text}\n{}", stderr(&out));
        if name == "paramiko" {
            assert!(text.contains("hostkey ok"), "{text}");
        }
        let out = run("echo $(id)");
        let text = stdout(&out);
        assert!(text.contains("status 126") && text.contains("cordon: refused"), "{name}: {text}\n{}", stderr(&out));
    }
}

#[test]
fn per_session_user_certificates_scope_each_login_to_its_command() {
    require_e2e!();
    let s = setup_full("usercert", "[profiles.ci.ssh]\ncommands = [\"echo *\", \"id -un\"]", None, true);
    let out = s.ssh("echo with a certificate");
    assert_eq!(stdout(&out), "with a certificate", "{}", stderr(&out));
    let out = s.ssh("id -un");
    assert_eq!(stdout(&out), DEPLOY, "{}", stderr(&out));
    // sshd saw a certificate naming the session and the workload.
    let log = fs::read_to_string(s.sshd.path("sshd.log")).unwrap_or_default();
    assert!(log.contains("ED25519-CERT") && log.contains("cordon session") && log.contains("uid 65534"), "{log}");
    // Nothing of the CA key reaches what cordon writes.
    let ca = fs::read_to_string(s.sshd.path("user_ca")).expect("ca");
    let body: String = ca.lines().filter(|l| !l.starts_with("-----")).collect();
    let chunk = body.get(body.len() - 80..body.len() - 40).expect("ca body").to_string();
    s.agent.wait_synced();
    let mut stack = vec![s.agent.dir.path().join("state")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                assert!(!fs::read_to_string(e.path()).unwrap_or_default().contains(&chunk), "{}", e.path().display());
            }
        }
    }
}

#[test]
fn only_the_locale_reaches_the_server_from_the_environment() {
    require_e2e!();
    // This sshd accepts any variable: only cordon stands in between.
    let s = setup("env", "[profiles.ci.ssh]\ncommands = [\"printenv *\"]");
    let out = s
        .ssh_cmd(
            &["-o", "SendEnv=LC_CORDON_TEST", "-o", "SendEnv=BASH_ENV", "-o", "SendEnv=PROMPT_COMMAND"],
            &["printenv LC_CORDON_TEST BASH_ENV PROMPT_COMMAND"],
        )
        .env("LC_CORDON_TEST", "locale-ok")
        .env("BASH_ENV", "/tmp/evil.sh")
        .env("PROMPT_COMMAND", "evil")
        .output()
        .expect("ssh");
    let text = stdout(&out);
    assert!(text.contains("locale-ok"), "{text}\n{}\n{:?}", stderr(&out), s.events("statement"));
    assert!(!text.contains("evil"), "{text}");
}

#[test]
fn forwarding_reaches_only_the_destinations_the_profile_lists() {
    require_e2e!();
    for ca in [false, true] {
        // The SSH port is one cordon governs (the intercept's port): listed
        // with the port written out it may be forwarded to (`ssh -J`);
        // through a glob it may not, since the nested session would be
        // invisible to cordon.
        let s = setup_full(
            "fwd",
            &format!(
                "[profiles.ci.ssh]\ncommands = [\"echo *\"]\nforwarding = [\"{HOST}:@SSHD_PORT@\", \"127.0.0.*:*\"]"
            ),
            None,
            ca,
        );
        // -W to a listed destination: the stream is that server's banner.
        let out =
            s.ssh_cmd(&["-W", &format!("{HOST}:{}", s.sshd.port)], &[]).stdin(Stdio::null()).output().expect("ssh");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("SSH-2.0-OpenSSH"), "ca={ca}: {}", stderr(&out));
        // Anything else is refused: an unlisted destination, and a governed
        // port reached only through the glob.
        for dest in ["127.0.1.1:22".to_string(), format!("127.0.0.9:{}", s.sshd.port)] {
            let out = s.ssh_cmd(&["-W", &dest], &[]).stdin(Stdio::null()).output().expect("ssh");
            assert!(!String::from_utf8_lossy(&out.stdout).starts_with("SSH-2.0"), "ca={ca} {dest}");
        }
        let refused = s.events("ssh_refused");
        assert!(refused.iter().any(|r| r["what"] == "port_forwarding"), "{refused:?}");
        assert!(
            refused.iter().any(|r| r.to_string().contains("port cordon governs")),
            "the glob did not reach the governed port: {refused:?}"
        );
        let stmts = s.events("statement");
        assert!(stmts.iter().any(|r| r["text"].as_str().is_some_and(|t| t.starts_with("<forward to"))), "{stmts:?}");
    }
}

#[test]
fn the_typed_user_picks_the_upstream_credential_and_unmapped_users_are_refused() {
    require_e2e!();
    let s = setup_users(
        "users",
        "[profiles.ci.ssh]\ncommands = [\"id -un\"]",
        None,
        false,
        "[intercept.users]\ndeploy = \"deploy\"",
    );
    let run = |user: &str| {
        let mut cmd = s.cg.command("ssh");
        cmd.args(s.opts()).args(["-p", &s.sshd.port.to_string()]).arg(format!("{user}@{HOST}")).arg("id -un");
        cmd.output().expect("ssh")
    };
    let out = run("deploy");
    assert_eq!(stdout(&out), DEPLOY, "{}", stderr(&out));
    let out = run("root");
    assert!(!out.status.success() && stderr(&out).contains("no credential for the user \"root\""), "{}", stderr(&out));
}

#[test]
fn a_multiplexed_connection_runs_each_exec_on_its_own_channel() {
    // Ansible and many CI scripts keep one connection open (ControlMaster,
    // ControlPersist) and open a channel per command. Every command over
    // it is judged on its own; the idle master is not cut in between.
    require_e2e!();
    let s = setup("mux", "[profiles.ci.ssh]\ncommands = [\"echo *\", \"true\"]");
    let dir = scratch("mux");
    let sock = dir.join("ctl");
    let path = format!("ControlPath={}", sock.display());
    let master = s
        .ssh_cmd(&["-o", &path, "-M", "-N", "-f"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("ssh -M");
    assert!(master.status.success(), "the master did not start: {}", stderr(&master));
    let check = |what: &str| {
        let out = s.ssh_cmd(&["-o", &path, "-O", "check"], &[]).output().expect("ssh -O check");
        assert!(out.status.success(), "{what}: the master does not answer: {}", stderr(&out));
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.ssh_cmd(&["-o", &path, "-O", "check"], &[]).output().is_ok_and(|o| o.status.success()) {
        assert!(Instant::now() < deadline, "the master never answered on its socket");
        thread::sleep(Duration::from_millis(50));
    }
    // One exec over the master that must succeed; its output.
    let exec = |what: &str, command: &str| {
        let out = s.ssh_cmd(&["-o", &path], &[command]).output().expect("ssh");
        assert!(
            out.status.success(),
            "{what} over the master: {:?} {}\n{}",
            out.status,
            stderr(&out),
            s.agent.log_text()
        );
        stdout(&out)
    };
    for i in 0..12 {
        assert_eq!(exec(&format!("exec {i}"), &format!("echo over the master {i}")), format!("over the master {i}"));
        if i == 5 {
            // Idle for a while between commands, as a ControlPersist master is.
            thread::sleep(Duration::from_secs(3));
            check("after an idle pause");
        }
    }
    // A command with no output: its exit status must still reach the
    // client before the channel closes (a mux client without one exits 255).
    for i in 0..30 {
        exec(&format!("silent exec {i}"), "true");
    }
    let out = s.ssh_cmd(&["-o", &path], &["echo $(id)"]).output().expect("ssh");
    assert!(!out.status.success() && stderr(&out).contains("cordon: refused"), "{}", stderr(&out));
    check("after a refusal");
    exec("an allowed exec after a refusal", "true");
    let _ = s.ssh_cmd(&["-o", &path, "-O", "exit"], &[]).output();
    let opens = s.events("open");
    assert_eq!(opens.len(), 1, "one workload connection: {opens:?}");
    let stmts = s.events("statement");
    assert_eq!(stmts.iter().filter(|r| r["text"].as_str().is_some_and(|t| t.starts_with("echo over"))).count(), 12);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn output_made_binary_cannot_carry_secrets_past_the_masker() {
    // The masker passes binary streams unread: a workload that puts a NUL
    // or a byte that is not UTF-8 in front of secrets must not get them
    // out in clear that way. A profile that masks blocks binary output
    // unless it says `binary = "pass"`.
    require_e2e!();
    let s = setup("binary", "[profiles.ci.ssh]\ncommands = [\"cat /tmp/cordon-ssh-binary-*\"]");
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let cards = "card 4111 1111 1111 1111\n".repeat(200);
    cases.push(("nul", [b"header\n\0".as_slice(), cards.as_bytes()].concat()));
    cases.push(("latin1", [b"caf\xe9\n".as_slice(), cards.as_bytes()].concat()));
    cases.push(("late nul", [cards.as_bytes(), b"\0tail\n".as_slice(), cards.as_bytes()].concat()));
    for (name, body) in cases {
        let file = format!("/tmp/cordon-ssh-binary-{}-{}", name.replace(' ', "_"), std::process::id());
        fs::write(&file, &body).expect("file");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = s.ssh(&format!("cat {file}"));
        let _ = fs::remove_file(&file);
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(!seen.contains("4111 1111"), "{name}: a card got through in clear ({} bytes out)", out.stdout.len());
        if name != "latin1" {
            assert_eq!(out.status.code(), Some(126), "{name}: {}", stderr(&out));
            assert!(stderr(&out).contains("not text"), "{name}: {}", stderr(&out));
        }
    }
}
