//! Harness for the end-to-end tests and the demo: throwaway PostgreSQL
//! servers, a cordon agent under test, cgroups, and workloads run inside
//! them as an unprivileged user. Everything is real: the kernel hooks, the
//! server, the clients. Every guard cleans up on drop.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where e2e prerequisites are missing: skip loudly, or fail where the run
/// says they must be there (`cargo xtask test` as root sets
/// CORDON_E2E_REQUIRED=1).
pub fn e2e_prerequisites() -> Option<String> {
    let missing = missing_prerequisite();
    if let Some(why) = &missing {
        if std::env::var_os("CORDON_E2E_REQUIRED").is_some() {
            panic!("end-to-end prerequisite missing ({why}) although CORDON_E2E_REQUIRED is set");
        }
        eprintln!("\n!!! SKIPPED: {why} — this end-to-end test did NOT run !!!\n");
    }
    missing
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: eBPF programs and cgroups need root (run `sudo -E cargo xtask test`)".into());
    }
    if cgroup_root().is_none() {
        return Some("no cgroup v2 filesystem mounted".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() && !Path::new("/proc/sys/net").exists() {
        return Some("no kernel networking".into());
    }
    if pg_bin("initdb").is_none() {
        return Some("PostgreSQL server binaries not found (run `cargo xtask setup`)".into());
    }
    if !cordon_bin().exists() {
        return Some(format!("{} not built (run `cargo build -p cordon`)", cordon_bin().display()));
    }
    None
}

/// Skip the calling test (loudly) when prerequisites are missing.
#[macro_export]
macro_rules! require_e2e {
    () => {
        if $crate::e2e_prerequisites().is_some() {
            return;
        }
    };
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn cordon_bin() -> PathBuf {
    std::env::var_os("CORDON_BIN").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target/debug/cordon"))
}

pub fn cgroup_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_, dir, ty) = (it.next()?, it.next()?, it.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect();
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found.into_iter().next()
}

pub fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter().rev().map(|d| d.join(name)).find(|p| p.exists())
}

/// Unique ports per process run, so tests never collide with each other or
/// with a leftover from an earlier run.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

pub fn free_port() -> u16 {
    let base = 20000 + (std::process::id() % 2000) as u16 * 10;
    loop {
        let p = base + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.2", p)).is_ok()
        {
            return p;
        }
    }
}

/// The Python with psycopg that `cargo xtask setup` installs.
pub const TEST_PYTHON: &str = "/opt/cordon-test-venv/bin/python3";

/// A copy of a file in a world-readable temporary directory, so a workload
/// running as `nobody` can execute it wherever the checkout lives.
pub fn workload_copy(path: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new().prefix("cordon-bin-").tempdir()?;
    fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let to = dir.path().join(path.file_name().context("no file name")?);
    fs::copy(path, &to)?;
    fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok((dir, to))
}

/// Write a script into a world-readable temporary file.
pub fn workload_script(name: &str, body: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new().prefix("cordon-script-").tempdir()?;
    fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let to = dir.path().join(name);
    fs::write(&to, body)?;
    fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok((dir, to))
}

/// The unprivileged user workloads run as.
pub const WORKLOAD_UID: u32 = 65534;
pub const WORKLOAD_GID: u32 = 65534;

// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL server on loopback addresses.
pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub hosts: Vec<String>,
    /// CA that signed the server certificate (secure servers).
    pub ca_file: Option<PathBuf>,
}

/// A governed PostgreSQL: a throwaway secure server on 127.0.0.2 (TLS,
/// SCRAM) with `schema` loaded, a cgroup `cordon-<test>-<pid>` tagged with
/// profile `ci`, and a running agent whose policy intercepts the server
/// with the `app` credential and adds `policy` (classify rules, the `ci`
/// profile).
pub fn governed(test: &str, schema: &str, policy: &str) -> Result<(Postgres, Cgroup, Agent)> {
    governed_with(test, schema, policy, "")
}

/// As [`governed`], with more `[agent]` settings.
pub fn governed_with(
    test: &str,
    schema: &str,
    policy: &str,
    agent_settings: &str,
) -> Result<(Postgres, Cgroup, Agent)> {
    governed_full(test, schema, policy, agent_settings, "")
}

/// As [`governed_with`], with more of the secrets file (e.g. `[webhooks]`).
pub fn governed_full(
    test: &str,
    schema: &str,
    policy: &str,
    agent_settings: &str,
    secrets: &str,
) -> Result<(Postgres, Cgroup, Agent)> {
    let pg = Postgres::start_secure(&["127.0.0.2"], free_port())?;
    pg.admin_sql(schema)?;
    let name = format!("cordon-{test}-{}", std::process::id());
    let cg = Cgroup::create(&name)?;
    let body = format!(
        "[[intercept]]\nname = \"shop\"\nprotocol = \"postgres\"\nport = {port}\ndestinations = [\"127.0.0.2/32\"]\n\
         credentials = \"app\"\nupstream_ca = \"{ca}\"\n\n{policy}\n\n[[tag]]\ncgroup = \"{name}\"\nprofile = \"ci\"\n",
        port = pg.port,
        ca = pg.ca_file.as_ref().context("a secure server has a CA")?.display(),
    );
    let mut agent = Agent::new_with(&body, agent_settings)?;
    if !secrets.is_empty() {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(agent.dir.path().join("secrets.toml"))?;
        writeln!(f, "\n{secrets}")?;
    }
    agent.start()?;
    Ok((pg, cg, agent))
}

/// Passwords of the roles a secure server has; tests grep for them.
pub const APP_PASSWORD: &str = "app-Secret-7f3e91c2";
pub const LEGACY_PASSWORD: &str = "legacy-Secret-0b8d4a6e";

impl Postgres {
    /// Trust authentication: for tests of the transport, not of auth.
    pub fn start(hosts: &[&str], port: u16) -> Result<Self> {
        Self::start_mode(hosts, port, false, false)
    }

    /// TLS required and SCRAM-SHA-256 (role `app`) or md5 (role `legacy`)
    /// for every TCP connection; trust only on the unix socket (admin).
    pub fn start_secure(hosts: &[&str], port: u16) -> Result<Self> {
        Self::start_mode(hosts, port, true, true)
    }

    /// Trust authentication, with TLS offered (not required): the
    /// benchmarks' server, where one path measures TLS to the server.
    pub fn start_tls_optional(hosts: &[&str], port: u16) -> Result<Self> {
        Self::start_mode(hosts, port, false, true)
    }

    /// `tls`: the server offers TLS; `secure`: it also requires TLS and
    /// passwords on TCP.
    fn start_mode(hosts: &[&str], port: u16, secure: bool, tls: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cordon-pg-").tempdir()?;
        let (uid, gid) = postgres_user()?;
        nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into()))?;
        let data = dir.path().join("data");
        let initdb = pg_bin("initdb").context("initdb not found")?;
        let out = as_user(
            Command::new(initdb).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"]).arg(&data),
            uid,
            gid,
        )
        .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut conf = format!(
            "listen_addresses = '{}'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 100\n",
            hosts.join(","),
            dir.path().display()
        );
        let mut ca_file = None;
        if tls {
            let (ca_pem, cert_pem, key_pem) = server_certificates(hosts)?;
            let ca = dir.path().join("ca.crt");
            fs::write(&ca, ca_pem)?;
            fs::write(data.join("server.crt"), cert_pem)?;
            fs::write(data.join("server.key"), key_pem)?;
            for f in ["server.crt", "server.key"] {
                nix::unistd::chown(&data.join(f), Some(uid.into()), Some(gid.into()))?;
                fs::set_permissions(data.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            ca_file = Some(ca);
        }
        if secure {
            fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all legacy 127.0.0.0/8 md5\n\
                 hostssl all legacy ::1/128 md5\n\
                 hostssl all all 127.0.0.0/8 scram-sha-256\n\
                 hostssl all all ::1/128 scram-sha-256\n\
                 host all all 0.0.0.0/0 reject\n\
                 host all all ::/0 reject\n",
            )?;
        }
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))?;
        let pg_ctl = pg_bin("pg_ctl").context("pg_ctl not found")?;
        let log = dir.path().join("log");
        let out = as_user(
            Command::new(pg_ctl).args(["-w", "-t", "60", "-D"]).arg(&data).arg("-l").arg(&log).arg("start"),
            uid,
            gid,
        )
        .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let pg = Self { dir, port, hosts: hosts.iter().map(|h| h.to_string()).collect(), ca_file };
        if secure {
            pg.admin_sql(&format!(
                "create role app login password '{APP_PASSWORD}'; \
                 set password_encryption = 'md5'; create role legacy login password '{LEGACY_PASSWORD}'; \
                 grant all on schema public to app, legacy"
            ))?;
        }
        Ok(pg)
    }

    /// The server's log file.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("log")
    }

    /// Run SQL as the superuser over the unix socket (never intercepted).
    pub fn admin_sql(&self, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let (Some(pg_ctl), Ok((uid, gid))) = (pg_bin("pg_ctl"), postgres_user()) {
            let _ = as_user(
                Command::new(pg_ctl).args(["-m", "immediate", "-D"]).arg(self.dir.path().join("data")).arg("stop"),
                uid,
                gid,
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        }
    }
}

/// A CA and a server certificate for the given IP addresses, as PEM.
fn server_certificates(hosts: &[&str]) -> Result<(String, String, String)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "cordon test CA");
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    for h in hosts {
        if let Ok(ip) = h.parse::<std::net::IpAddr>() {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        }
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

fn postgres_user() -> Result<(u32, u32)> {
    let u = nix::unistd::User::from_name("postgres")?.context("no `postgres` user (install postgresql)")?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// std drops supplementary groups (setgroups(0)) itself when uid is set.
fn as_user(cmd: &mut Command, uid: u32, gid: u32) -> &mut Command {
    cmd.uid(uid).gid(gid)
}

/// pgbouncer (installed by `cargo xtask setup`) as the postgres user on
/// `listen`, in front of the server on 127.0.0.2:`pg_port`, trusting every
/// client. `mode`: session or transaction pooling; `pool`: server
/// connections per database and user.
pub struct Pgbouncer {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl Pgbouncer {
    pub fn start(listen: &str, pg_port: u16, mode: &str, max_clients: usize, pool: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cordon-pgb-").tempdir()?;
        let (uid, gid) = postgres_user()?;
        nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into()))?;
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.2 port={pg_port} user=postgres dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = {listen}\nlisten_port = {port}\nauth_type = any\npool_mode = {mode}\n\
                 max_client_conn = {max_clients}\ndefault_pool_size = {pool}\nunix_socket_dir =\nlogfile = {}/log\n",
                dir.path().display()
            ),
        )?;
        let bin = Path::new("/usr/sbin/pgbouncer");
        if !bin.exists() {
            bail!("{} is missing: run `cargo xtask setup`, which installs pgbouncer", bin.display());
        }
        let child = as_user(Command::new(bin).arg(&ini), uid, gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?;
        let mut b = Self { child, _dir: dir, port };
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((listen, port)).is_err() {
            if Instant::now() > until || b.child.try_wait().ok().flatten().is_some() {
                bail!("pgbouncer did not listen on {listen}:{port} within 10 s: {}", b.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(b)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------

/// A cgroup v2 directory created for a test, removed on drop.
pub struct Cgroup {
    pub rel: String,
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(rel: &str) -> Result<Self> {
        let root = cgroup_root().context("no cgroup2 mount")?;
        let path = root.join(rel);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { rel: rel.to_string(), path })
    }

    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }

    /// A command that joins this cgroup, then drops to the workload user,
    /// before exec: the workload never runs as root and never outside.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let procs = std::ffi::CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes())
            .unwrap_or_default();
        // SAFETY: only async-signal-safe calls (open/write/close, setgroups,
        // setgid, setuid) between fork and exec; no allocation.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(WORKLOAD_GID) != 0
                    || libc::setuid(WORKLOAD_UID) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.env("HOME", "/tmp").current_dir("/tmp");
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children first; a short retry for processes still exiting.
        let mut dirs = vec![];
        let mut stack = vec![self.path.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// psql against host:port as the workload, in a cgroup (or none: direct).
pub fn psql(cg: Option<&Cgroup>, host: &str, port: u16, sql: &str) -> Output {
    let mut cmd = match cg {
        Some(c) => c.command("psql"),
        None => Command::new("psql"),
    };
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h", host, "-p", &port.to_string(), "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

// ---------------------------------------------------------------------------

/// A cordon agent under test, with its own pins, ports, state and sockets.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    pub bpffs_dir: PathBuf,
    audit: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// More `[agent]` settings (e.g. `audit_dir`).
    extra: String,
    /// Environment for the agent process (e.g. libfaketime).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Write a policy: `[agent]` settings for isolation are prepended, the
    /// caller gives intercepts, profiles and tags.
    pub fn new(body: &str) -> Result<Self> {
        Self::new_with(body, "")
    }

    /// As [`Agent::new`], with more `[agent]` settings.
    pub fn new_with(body: &str, agent_settings: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cordon-agent-").tempdir()?;
        let port = free_port();
        let name = dir.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let config = dir.path().join("policy.toml");
        let agent = Self {
            config,
            port,
            bpffs_dir,
            audit: dir.path().join("state/audit"),
            child: None,
            log: dir.path().join("agent.log"),
            extra: agent_settings.to_string(),
            env: Vec::new(),
            dir,
        };
        agent.write_policy(body)?;
        agent.write_secrets()?;
        Ok(agent)
    }

    /// An agent on an existing policy file (the demo's), whose `[agent]`
    /// section says where the audit log, pins and listener are.
    pub fn with_config(config: &Path, audit: &Path, bpffs_dir: &Path, port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cordon-agent-").tempdir()?;
        Ok(Self {
            config: config.to_owned(),
            port,
            bpffs_dir: bpffs_dir.to_owned(),
            audit: audit.to_owned(),
            child: None,
            log: dir.path().join("agent.log"),
            extra: String::new(),
            env: Vec::new(),
            dir,
        })
    }

    pub fn agent_section(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\nlisten6 = \"[::1]:{port}\"\nstate_dir = \"{d}/state\"\n\
             control_socket = \"{d}/run/control.sock\"\nbpffs_dir = \"{}\"\nagent_cgroup = \"cordon-test.agent\"\n\
             rescan_interval_ms = 200\nsecrets_file = \"{d}/secrets.toml\"\n{}\n\n",
            self.bpffs_dir.display(),
            self.extra,
            port = self.port,
        )
    }

    /// Root-only secrets file with the secure server's roles.
    fn write_secrets(&self) -> Result<()> {
        let path = self.dir.path().join("secrets.toml");
        fs::write(
            &path,
            format!(
                "[credentials.app]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n\n\
                 [credentials.legacy]\nuser = \"legacy\"\npassword = \"{LEGACY_PASSWORD}\"\n"
            ),
        )?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(())
    }

    pub fn write_policy(&self, body: &str) -> Result<()> {
        fs::write(&self.config, format!("{}{body}", self.agent_section()))?;
        Ok(())
    }

    /// Write the file as given (for broken policies).
    pub fn write_raw_policy(&self, text: &str) -> Result<()> {
        fs::write(&self.config, text)?;
        Ok(())
    }

    /// Where the audit log is, when the policy moves it (`audit_dir`).
    pub fn set_audit_path(&mut self, path: &Path) {
        path.clone_into(&mut self.audit);
    }

    pub fn audit_path(&self) -> PathBuf {
        self.audit.clone()
    }

    pub fn start(&mut self) -> Result<()> {
        // The log is appended to across restarts: only look at this run's.
        let from = self.log_text().len();
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(cordon_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            // CORDON_TEST_LOG: a finer filter when chasing a failure.
            .env("CORDON_LOG", std::env::var("CORDON_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cordon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log_text().get(from..).is_some_and(|t| t.contains(" ready")) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("cordon exited ({status}) during start-up:\n{}", self.log_text());
                }
            }
            if Instant::now() > deadline {
                bail!("cordon did not become ready in 30 s:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal_pid(c.id(), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal_pid(&self, pid: u32, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run a cordon CLI command against this agent's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(cordon_bin());
        cmd.args(args);
        if !args.contains(&"check") {
            cmd.arg("--config").arg(&self.config);
        }
        cmd.output().unwrap_or_else(|e| panic!("cannot run cordon: {e}"))
    }

    /// Audit records so far, across segments, in chain order.
    pub fn audit(&self) -> Vec<Value> {
        let mut segs: Vec<PathBuf> = fs::read_dir(self.audit_path())
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect())
            .unwrap_or_default();
        segs.sort();
        segs.iter()
            .flat_map(|s| fs::read_to_string(s).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Records of one event, once the log has settled (see `wait_synced`).
    pub fn audit_events(&self, event: &str) -> Vec<Value> {
        self.wait_synced();
        self.audit().into_iter().filter(|r| r["event"] == event).collect()
    }

    /// Wait until a line matching `pred` is in the log.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Wait until the audit holds `n` records of `event`.
    /// Wait until the log is quiet and synced: the head names the last
    /// record and nothing new arrives for a while (records nobody waits for,
    /// such as statement ends, are written and synced within the agent's
    /// audit_sync_interval_ms).
    pub fn wait_synced(&self) {
        let head = |a: &Self| {
            fs::read_to_string(a.audit_path().join("audit.head"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(t.trim()).ok())
                .and_then(|v| v["seq"].as_u64())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stable = 0;
        let mut last = None;
        while Instant::now() < deadline && stable < 3 {
            let end = self.audit().last().and_then(|r| r["seq"].as_u64());
            let now = (end, head(self));
            stable = if end.is_some() && now.0 == now.1 && Some(now) == last { stable + 1 } else { 0 };
            last = Some(now);
            thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn wait_audit(&self, event: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<Value> = self.audit().into_iter().filter(|r| r["event"] == event).collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// `cordon tags --json`, as the list of tagged cgroup paths.
    pub fn tagged(&self) -> Vec<String> {
        let out = self.cli(&["tags", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["tags"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["cgroup"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Remove this agent's pins so no program outlives the test.
        let _ = Command::new(cordon_bin())
            .args(["detach", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // A test may have left a broken policy behind, which `detach` cannot
        // read: unpin this agent's links and maps directly (links first).
        if let Ok(versions) = fs::read_dir(&self.bpffs_dir) {
            for v in versions.flatten() {
                let mut pins: Vec<PathBuf> =
                    fs::read_dir(v.path()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
                pins.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
                for p in pins {
                    let _ = fs::remove_file(p);
                }
                let _ = fs::remove_dir(v.path());
            }
            let _ = fs::remove_dir(&self.bpffs_dir);
        }
        if std::env::var_os("CORDON_KEEP_LOGS").is_some() || std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A line-oriented reader for a child's stdout (for interactive workloads).
pub fn lines_of(child: &mut Child) -> impl Iterator<Item = String> {
    let out = child.stdout.take().expect("stdout piped");
    BufReader::new(out).lines().map_while(Result::ok)
}

/// A local Unix user for approval tests, created once (idempotent) with
/// these supplementary groups (created too). Returns its uid.
pub fn local_user(name: &str, groups: &[&str]) -> Result<u32> {
    for g in groups {
        let st = Command::new("groupadd").args(["-f", g]).status().context("groupadd")?;
        anyhow::ensure!(st.success(), "groupadd -f {g} failed");
    }
    let exists = Command::new("id").arg("-u").arg(name).output().context("id")?;
    if !exists.status.success() {
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-N", "-s", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.args(["-G", &groups.join(",")]);
        }
        let st = cmd.arg(name).status().context("useradd")?;
        anyhow::ensure!(st.success(), "useradd {name} failed");
    } else if !groups.is_empty() {
        let st = Command::new("usermod").args(["-a", "-G", &groups.join(","), name]).status().context("usermod")?;
        anyhow::ensure!(st.success(), "usermod {name} failed");
    }
    let out = Command::new("id").arg("-u").arg(name).output().context("id")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("reading the uid")
}

impl Agent {
    /// `cordon approvals ARGS` run as a local user (not root): what an
    /// approver on this host does. The agent's directory is opened for
    /// traversal so the approvals socket is reachable, as /run/cordon is.
    pub fn approvals_as(&self, uid: u32, args: &[&str]) -> Output {
        self.approvals_command(uid, args).output().unwrap_or_else(|e| panic!("cannot run cordon approvals: {e}"))
    }

    /// `cordon approvals ARGS` as a local user, not yet run (for `watch`).
    pub fn approvals_command(&self, uid: u32, args: &[&str]) -> Command {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755));
        let socket = self.dir.path().join("run/approvals.sock");
        let mut cmd = Command::new(cordon_bin());
        cmd.arg("approvals").args(args).arg("--socket").arg(&socket).uid(uid).gid(WORKLOAD_GID).current_dir("/tmp");
        cmd
    }

    /// Wait for the next pending approval request the audit shows (the
    /// `n`th overall) and return its id.
    pub fn wait_request(&self, n: usize) -> String {
        let got = self.wait_audit("approval_request", n);
        assert!(got.len() >= n, "no approval request #{n} within 10 s; agent log:\n{}", self.log_text());
        got[n - 1]["request"].as_str().unwrap_or_default().to_string()
    }
}

/// The account cordon logs in as on the test sshd.
pub const SSH_DEPLOY_USER: &str = "cordon-deploy";

/// OpenSSH client options of every governed workload in the tests, the
/// benchmarks and the demo: no config file, no prompts, and host keys
/// trusted only from `known_hosts` (the lines `cordon ssh known-hosts`
/// prints), strictly.
pub fn ssh_strict_opts(known_hosts: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push("UserKnownHostsFile=/dev/null".into());
    v.push("-o".into());
    v.push(format!("GlobalKnownHostsFile={}", known_hosts.display()));
    v
}

/// A throwaway sshd with its own host key, accepting cordon's key for the
/// deploy user.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub host: String,
    pub port: u16,
    child: Child,
}

impl Sshd {
    /// Start one listening on `host:port`.
    pub fn start(host: &str, port: u16) -> Self {
        let dir = tempfile::Builder::new().prefix("cordon-sshd-").tempdir().expect("tempdir");
        let d = dir.path();
        let _ = fs::create_dir_all("/run/sshd");
        keygen(&d.join("host_key"));
        keygen(&d.join("cordon_key"));
        keygen(&d.join("user_ca"));
        fs::copy(d.join("cordon_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
        deploy_user();
        let cfg = format!(
            "Port {port}\nListenAddress {host}\nHostKey {d}/host_key\nPidFile none\nUsePAM no\nStrictModes no\n\
             AuthorizedKeysFile {d}/authorized_keys\nTrustedUserCAKeys {d}/user_ca.pub\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nAllowUsers {SSH_DEPLOY_USER}\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n\
             AcceptEnv *\n",
            d = d.display()
        );
        fs::write(d.join("sshd_config"), cfg).expect("config");
        let log = fs::File::create(d.join("sshd.log")).expect("log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("sshd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Self { dir, host: host.to_string(), port, child }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The known_hosts line cordon pins the server with (its own key, or
    /// another one).
    pub fn pin(&self, key: Option<&str>) -> String {
        let own = fs::read_to_string(self.path("host_key.pub")).expect("host key");
        if self.port == 22 {
            format!("{} {}", self.host, key.unwrap_or(&own).trim())
        } else {
            format!("[{}]:{} {}", self.host, self.port, key.unwrap_or(&own).trim())
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cordon-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
}

/// The upstream account: a shell, a home in /tmp, no password but not
/// locked (sshd without PAM refuses locked accounts even for keys).
pub fn deploy_user() {
    if !Command::new("id").arg(SSH_DEPLOY_USER).output().is_ok_and(|o| o.status.success()) {
        let st = Command::new("useradd")
            .args(["-M", "-N", "-d", "/tmp", "-s", "/bin/sh", SSH_DEPLOY_USER])
            .status()
            .expect("useradd");
        assert!(st.success());
    }
    let st = Command::new("usermod").args(["-p", "*", SSH_DEPLOY_USER]).status().expect("usermod");
    assert!(st.success());
}

/// Wait for a child with a deadline (a test must stop by itself).
pub fn finish(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!("still running after {within:?}: {}\n{}", stdout(&out), stderr(&out));
}
