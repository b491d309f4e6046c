//! `cargo xtask bench ssh`: SSH through cordon against direct, in one run,
//! interleaved: 1 GiB of output (`head -c 1G /dev/zero`, binary: passed,
//! never masked), and connect + `true` (setup and exec round trip). The
//! section sits between markers in BENCHMARKS.md, kept by the other
//! benchmarks and replaced by this one.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use cordon_tests::{Agent, Cgroup, Sshd};

use crate::util::say;

pub const BEGIN: &str = "<!-- ssh: begin (cargo xtask bench ssh) -->";
pub const END: &str = "<!-- ssh: end -->";

const HOST: &str = "127.0.0.5";
const BYTES: u64 = 1 << 30;
const REPS: usize = 5;

pub fn run() -> Result<String> {
    let sshd = Sshd::start(HOST, cordon_tests::free_port());
    let cg = Cgroup::create(&format!("cordon-bench-ssh-{}", std::process::id()))?;
    let pins = sshd.path("pins");
    std::fs::write(&pins, sshd.pin(None) + "\n")?;
    let body = format!(
        "[[intercept]]\nname = \"hosts\"\nprotocol = \"ssh\"\nport = {port}\ndestinations = [\"{HOST}/32\"]\n\
         credentials = \"deploy\"\nknown_hosts = \"{pins}\"\n\n[profiles.bench]\n[profiles.bench.ssh]\n\
         commands = [\"head -c * /dev/zero\", \"true\"]\nbinary = \"pass\"\n\n[[tag]]\ncgroup = \"{cg}\"\nprofile = \"bench\"\n",
        port = sshd.port,
        pins = pins.display(),
        cg = cg.rel,
    );
    std::env::set_var("CORDON_BIN", crate::bench::release_bin());
    let mut agent = Agent::new(&body)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(agent.dir.path().join("secrets.toml"))?;
        writeln!(
            f,
            "\n[credentials.deploy]\nuser = \"{}\"\nkey_file = \"{}\"",
            cordon_tests::SSH_DEPLOY_USER,
            sshd.path("cordon_key").display()
        )?;
    }
    agent.start()?;
    let known = sshd.path("workload_known_hosts");
    let out = agent.cli(&["ssh", "known-hosts"]);
    std::fs::write(&known, &out.stdout)?;
    let direct_known = sshd.path("direct_known_hosts");
    std::fs::write(&direct_known, sshd.pin(None) + "\n")?;
    std::fs::set_permissions(sshd.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&known, std::fs::Permissions::from_mode(0o644))?;
    let port = sshd.port.to_string();
    // CORDON_BENCH_SSH_CIPHER: another cipher for the workload's client (both paths).
    let cipher = format!(
        "Ciphers={}",
        std::env::var("CORDON_BENCH_SSH_CIPHER").unwrap_or_else(|_| "aes256-gcm@openssh.com".into())
    );
    let common = |kh: &std::path::Path| -> Vec<String> {
        let mut v = cordon_tests::ssh_strict_opts(kh);
        // One key exchange for every leg: OpenSSH alone would pick the
        // post-quantum sntrup761 hybrid, which russh does not offer.
        v.extend(["-o", &cipher, "-o", "KexAlgorithms=curve25519-sha256", "-p", &port].iter().map(|s| s.to_string()));
        v
    };
    // Direct: the same unprivileged user, from an untagged cgroup, with a
    // copy of cordon's key it can read: the same client doing the same
    // work, only without cordon in between.
    let direct_cg = Cgroup::create(&format!("cordon-bench-ssh-direct-{}", std::process::id()))?;
    let key = sshd.path("direct_key");
    std::fs::copy(sshd.path("cordon_key"), &key)?;
    std::os::unix::fs::chown(&key, Some(cordon_tests::WORKLOAD_UID), Some(cordon_tests::WORKLOAD_UID))?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    std::fs::set_permissions(&direct_known, std::fs::Permissions::from_mode(0o644))?;
    let user_at = |user: &str| format!("{user}@{HOST}");
    let direct_cmd = |extra: &[String]| {
        let mut c = direct_cg.command("ssh");
        c.args(common(&direct_known))
            .arg("-i")
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
            .args(extra)
            .arg(user_at(cordon_tests::SSH_DEPLOY_USER));
        c
    };
    let governed_cmd = |extra: &[String]| {
        let mut c = cg.command("ssh");
        c.args(common(&known)).args(["-o", "IdentityAgent=none"]).args(extra).arg(user_at("anyone"));
        c
    };
    let timed = |mut c: Command, remote: &str, what: &str| -> Result<f64> {
        let t = Instant::now();
        let out = c.arg(remote).stdout(Stdio::null()).stderr(Stdio::piped()).output().context("ssh")?;
        if !out.status.success() {
            bail!("{what} failed ({}): {}\n{}", out.status, String::from_utf8_lossy(&out.stderr), agent.log_text());
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let agent_pid = agent.pid().context("agent pid")?;
    let big = format!("head -c {BYTES} /dev/zero");
    // CORDON_BENCH_SSH_PERF=fp|dwarf|syscalls: profile the agent over one
    // governed 1 GiB transfer instead of measuring (perf's report is printed).
    if let Ok(mode) = std::env::var("CORDON_BENCH_SSH_PERF") {
        let run = || timed(governed_cmd(&[]), &big, "ssh through cordon");
        let (secs, cpu, report) = perf_during(agent_pid, &mode, run)?;
        println!("1 GiB in {secs:.2} s; agent CPU {cpu:.2} s\n{report}");
        if mode == "flat" {
            for (part, share) in buckets(&report) {
                println!("{:5.1} %  {part}", share * 100.0);
            }
        }
        return Ok(String::new());
    }
    // Per 1 GiB: wall seconds, CPU seconds of the whole machine, and of cordon.
    let (mut d_mb, mut c_mb, mut d_cpu, mut c_cpu, mut c_agent) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..REPS {
        say(&format!("ssh: 1 GiB, round {} of {REPS}", i + 1));
        // Alternate which path goes first, so neither always runs warm.
        for governed in if i % 2 == 0 { [false, true] } else { [true, false] } {
            if governed {
                let (busy, mine) = (machine_cpu_seconds(), crate::bench::cpu_seconds(agent_pid));
                let secs = timed(governed_cmd(&[]), &big, "ssh through cordon")?;
                c_cpu.push(machine_cpu_seconds() - busy);
                c_agent.push(crate::bench::cpu_seconds(agent_pid) - mine);
                c_mb.push(BYTES as f64 / 1e6 / secs);
            } else {
                let busy = machine_cpu_seconds();
                let secs = timed(direct_cmd(&[]), &big, "direct ssh")?;
                d_cpu.push(machine_cpu_seconds() - busy);
                d_mb.push(BYTES as f64 / 1e6 / secs);
            }
        }
    }
    let (mut d_t, mut c_t) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        d_t.push(timed(direct_cmd(&[]), "true", "direct ssh")? * 1000.0);
        c_t.push(timed(governed_cmd(&[]), "true", "ssh through cordon")? * 1000.0);
    }
    // The masters (as `nobody`) make their control sockets here.
    let mux_dir = tempfile::Builder::new().prefix("cordon-ssh-mux-").tempdir()?;
    std::fs::set_permissions(mux_dir.path(), std::fs::Permissions::from_mode(0o777))?;
    // Exec round trip on an open connection: a multiplexing master per
    // path, then `true` over it (a new channel, exec, exit status).
    let mux = |master: &dyn Fn(&[String]) -> Command, name: &str| -> Result<Vec<f64>> {
        let sock = mux_dir.path().join(name);
        let opts = vec!["-o".to_string(), format!("ControlPath={}", sock.display())];
        let mut m = master(&[opts.clone(), vec!["-M".into(), "-N".into(), "-f".into()]].concat());
        let st = m.stdout(Stdio::null()).stderr(Stdio::null()).status().context("ssh -M")?;
        if !st.success() {
            bail!("the {name} multiplexing master did not start");
        }
        // `-f` returns once logged in; wait until the master answers on its socket.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while !master(&[opts.clone(), vec!["-O".into(), "check".into()]].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            if Instant::now() > deadline {
                bail!("the {name} multiplexing master does not answer on its socket");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut times = Vec::new();
        for _ in 0..20 {
            times.push(timed(master(&opts), "true", name)? * 1000.0);
        }
        let _ = master(&[opts, vec!["-O".into(), "exit".into()]].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(times)
    };
    // Not fatal: the other figures stand without it, and the row says why.
    let round_trip = mux(&direct_cmd, "direct").and_then(|d| Ok((d, mux(&governed_cmd, "cordon")?)));
    let (mut d_rt, mut c_rt, rt_error) = match round_trip {
        Ok((d, c)) => (d, c, None),
        Err(e) => {
            say(&format!("ssh: exec round trip not measured: {e:#}"));
            (Vec::new(), Vec::new(), Some(format!("{e:#}").lines().next().unwrap_or_default().to_string()))
        }
    };
    // Where cordon's own CPU goes, from one more transfer under perf.
    let profile = perf_during(agent_pid, "flat", || timed(governed_cmd(&[]), &big, "ssh through cordon"))
        .map(|(_, cpu, flat)| (cpu, buckets(&flat)));
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (dm, cm, dt, ct) = (med(&mut d_mb), med(&mut c_mb), med(&mut d_t), med(&mut c_t));
    let (drt, crt) = (med(&mut d_rt), med(&mut c_rt));
    let (dcpu, ccpu, acpu) = (med(&mut d_cpu), med(&mut c_cpu), med(&mut c_agent));
    let ratio = if dm > 0.0 { cm / dm } else { 0.0 };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}\n## SSH\n");
    let _ = writeln!(
        s,
        "OpenSSH 9.2 client and server on loopback, AES-256-GCM, curve25519-sha256 key exchange. Both paths run the same `ssh` as the same unprivileged \
         user (`nobody`) with no agent: direct from an untagged cgroup with a copy of the key, through cordon from a \
         tagged one (cordon logs in with its key). Medians of {REPS} interleaved rounds (1 GiB), 10 (connect + `true`) \
         and 20 (`true` over an open multiplexed connection).\n"
    );
    let _ = writeln!(s, "| figure | direct | cordon | cordon/direct | goal |\n|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| 1 GiB of output, MB/s | {dm:.0} | {cm:.0} | {ratio:.2} | ≥ 0.8 {} |",
        if ratio >= 0.8 { "(met)" } else { "(missed)" }
    );
    let _ = writeln!(
        s,
        "| CPU seconds per GiB, whole machine | {dcpu:.2} | {ccpu:.2} (cordon: {acpu:.2}) | {:.2} | |",
        ccpu / dcpu.max(1e-9)
    );
    let _ = writeln!(s, "| connection setup: connect + exec `true`, ms | {dt:.1} | {ct:.1} | {:+.1} ms | |", ct - dt);
    match rt_error {
        None => {
            let _ = writeln!(
                s,
                "| exec round trip on an open connection, ms | {drt:.1} | {crt:.1} | {:+.1} ms | |",
                crt - drt
            );
        }
        Some(e) => {
            let _ = writeln!(s, "| exec round trip on an open connection | not measured: {e} | | | |");
        }
    }
    let _ = writeln!(
        s,
        "\n{}the transfer is CPU-bound on this {cores:.0}-core machine. Direct, ssh and \
         sshd use {dcpu:.2} CPU seconds per GiB ({:.0} % of both cores over the transfer); through cordon every byte is \
         decrypted and encrypted once more (russh, AES-256-GCM), and cordon's own {acpu:.2} s per GiB come from the \
         same two cores, so the machine needs {ccpu:.2} s per GiB. At the same CPU budget the throughput ratio cannot \
         exceed {:.2}; cordon reaches {ratio:.2}. Binary output is passed without masking and counted, not recorded; \
         window 8 MiB, packets 64 KiB, TCP_NODELAY on both sides.\n",
        if ratio >= 0.8 { "The 1 GiB goal is met, with little room: " } else { "Where the 1 GiB goal is missed: " },
        100.0 * dcpu / (cores * BYTES as f64 / 1e6 / dm.max(1e-9)),
        dcpu / ccpu.max(1e-9)
    );
    match profile {
        Ok((cpu, rows)) => {
            let _ = writeln!(
                s,
                "Where cordon's CPU goes (`perf record` of the agent over one more 1 GiB transfer, {cpu:.2} CPU s; \
                 `CORDON_BENCH_SSH_PERF=dwarf cargo xtask bench ssh` prints the call graphs):\n\n| part | share | CPU s per GiB |\n|---|---|---|"
            );
            for (part, share) in rows {
                let _ = writeln!(s, "| {part} | {:.0} % | {:.2} |", share * 100.0, share * cpu);
            }
            let _ = writeln!(
                s,
                "\nThe kernel's socket work and the second AES-GCM pass are what any terminating SSH proxy pays; the \
                 copy into russh's packet buffer is its in-place encryption (cordon passes binary output on as the \
                 frame it came in)."
            );
        }
        Err(e) => {
            let _ = writeln!(s, "No profile: {e:#}.");
        }
    }
    let _ = writeln!(s, "{END}");
    agent.stop();
    Ok(s)
}

/// Busy CPU seconds of the whole machine so far (all but idle and iowait).
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user, nice, system, irq, softirq (guest time is inside user; steal is
    // the hypervisor's, not ours).
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum();
    // SAFETY: sysconf reads a constant; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy / hz.max(1.0)
}

/// Put the SSH section into BENCHMARKS.md (replacing an older one).
pub fn write(section: &str) -> Result<()> {
    if section.is_empty() {
        return Ok(()); // a profiling run: nothing measured
    }
    let path = cordon_tests::workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &old[..a], section.trim_end(), &old[b + END.len()..]),
        _ => format!("{}\n\n{}\n", old.trim_end(), section.trim_end()),
    };
    std::fs::write(&path, new)?;
    say(&format!("wrote the SSH section of {}", path.display()));
    Ok(())
}

/// The SSH section of an existing BENCHMARKS.md, for the other benchmarks
/// to keep.
pub fn keep(old: &str, new: &mut String) {
    if let (Some(a), Some(b)) = (old.find(BEGIN), old.find(END)) {
        if b > a && !new.contains(BEGIN) {
            new.push_str("\n\n");
            new.push_str(&old[a..b + END.len()]);
            new.push('\n');
        }
    }
}

/// Run `work` with perf attached to the agent: (its result, the agent's CPU
/// seconds meanwhile, perf's report). `mode`: fp or dwarf (call graphs),
/// syscalls (counts), flat (self time per symbol, for `buckets`).
fn perf_during(pid: u32, mode: &str, work: impl FnOnce() -> Result<f64>) -> Result<(f64, f64, String)> {
    let data = std::env::temp_dir().join(format!("cordon-ssh-perf-{}.data", std::process::id()));
    let trace = std::env::temp_dir().join(format!("cordon-ssh-syscalls-{}.txt", std::process::id()));
    let mut perf = Command::new("perf");
    match mode {
        "syscalls" => perf.args(["trace", "-s", "-o"]).arg(&trace),
        "dwarf" => {
            perf.args(["record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384", "-o"]).arg(&data)
        }
        "flat" => perf.args(["record", "-e", "cpu-clock", "-F", "999", "-o"]).arg(&data),
        _ => perf.args(["record", "-e", "cpu-clock", "-F", "999", "--call-graph", "fp", "-o"]).arg(&data),
    };
    let mut perf = perf
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = crate::bench::cpu_seconds(pid);
    let done = work();
    let cpu = crate::bench::cpu_seconds(pid) - before;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(perf.id() as i32), nix::sys::signal::Signal::SIGINT);
    let status = perf.wait()?;
    let secs = done?;
    // perf ends on the SIGINT it was sent; what matters is its data file.
    if mode != "syscalls" && !data.exists() {
        bail!("perf record wrote nothing ({status})");
    }
    let report = if mode == "syscalls" {
        std::fs::read_to_string(&trace).unwrap_or_default()
    } else {
        let mut out = String::new();
        let modes: &[&str] = if mode == "flat" { &["--no-children"] } else { &["--no-children", "--children"] };
        for m in modes {
            let mut c = Command::new("perf");
            c.args(["report", m, "--stdio", "--percent-limit", "0.1", "-i"]).arg(&data);
            if mode == "flat" {
                c.args(["--sort", "sym", "--no-call-graph"]);
            } else {
                c.arg("--no-call-graph");
            }
            let o = c.output()?;
            out.push_str(&format!("==== perf report {m}\n{}", String::from_utf8_lossy(&o.stdout)));
        }
        out
    };
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&trace);
    Ok((secs, cpu, report))
}

/// perf's flat report (self time per symbol) put into parts, largest first.
fn buckets(report: &str) -> Vec<(&'static str, f64)> {
    const PARTS: &[(&str, &[&str])] = &[
        (
            "AES-GCM: decrypt from the server, encrypt to the workload",
            &["aes_gcm", "gcm_", "aes_hw", "ghash", "chacha", "poly1305"],
        ),
        ("memory copies (russh's packet buffers)", &["memmove", "memcpy", "memset"]),
        (
            "kernel: TCP send and receive, copies to and from user space",
            &[
                "tcp_",
                "skb",
                "_copy_to_iter",
                "_copy_from_iter",
                "ip_",
                "__dev_",
                "net_",
                "napi",
                "sock_",
                "__check_object_size",
                "softirq",
                "inet_",
                "kmem_cache",
                "slab",
                "page",
                "__pv_queued_spin_lock",
                "fdget",
                "__sys_sendto",
                "__sys_recvfrom",
                "copy_user",
            ],
        ),
        (
            "waking and switching threads (kernel wakeups, tokio tasks, futex, epoll)",
            &[
                "finish_task_switch",
                "_raw_spin_unlock",
                "schedule",
                "futex",
                "epoll",
                "irqentry",
                "try_to_wake_up",
                "read_tsc",
                "pthread",
                "syscall",
                "tokio::runtime",
                "mio::",
                "eventfd",
                "ep_",
            ],
        ),
        ("allocation", &["malloc", "_int_free", "cfree", "realloc", "alloc::"]),
        ("russh and cordon's relay: framing, channel messages", &["russh", "cordon::", "bytes::", "tokio::sync"]),
    ];
    let mut shares = vec![0.0f64; PARTS.len() + 1];
    for line in report.lines() {
        let mut cols = line.split_whitespace();
        let Some(pct) = cols.next().and_then(|c| c.strip_suffix('%')).and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        let sym = line.rsplit("] ").next().unwrap_or(line);
        let i = PARTS.iter().position(|(_, keys)| keys.iter().any(|k| sym.contains(k))).unwrap_or(PARTS.len());
        if let Some(s) = shares.get_mut(i) {
            *s += pct / 100.0;
        }
    }
    // What perf's limit left out goes to "other" with what no part named.
    let named: f64 = shares.iter().take(PARTS.len()).sum();
    if let Some(other) = shares.get_mut(PARTS.len()) {
        *other = (1.0 - named).max(0.0);
    }
    let mut rows: Vec<(&'static str, f64)> =
        PARTS.iter().map(|(name, _)| *name).chain(["other"]).zip(shares).filter(|(_, s)| *s > 0.0).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}
