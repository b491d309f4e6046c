//! Idempotent prerequisite installation. Each step checks first and says
//! what it does; nothing is downloaded from outside the package registries.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::util::{self, is_root, output, run_cmd, say};

/// Debian packages: the eBPF toolchain's LLVM, and the real servers and
/// clients the end-to-end tests and the demo drive.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 for bpf-linker (nightly rustc uses LLVM 22)"),
    ("libclang-dev", "libclang for bindgen, which builds libpg_query (the PostgreSQL parser)"),
    ("clang", "clang's headers and driver, which bindgen may look for"),
    ("postgresql-15", "PostgreSQL server binaries for throwaway test servers"),
    ("postgresql-client-15", "psql"),
    (
        "pgbouncer",
        "a transaction pooler between cordon and PostgreSQL in the tests, and the benchmarks' comparison point",
    ),
    ("python3", "workload scripts in the tests"),
    ("python3-venv", "a venv for psycopg that unprivileged workloads can run"),
    ("iproute2", "network tools"),
    ("systemd", "systemd-analyze, to verify the unit file"),
    ("vagrant", "`vagrant validate`, to check vagrant/Vagrantfile (no VM is started)"),
    ("default-jdk-headless", "java, to run pgjdbc in the driver tests"),
    ("libpostgresql-jdbc-java", "pgjdbc, the PostgreSQL JDBC driver"),
    ("ruby-pg", "Ruby's pg driver"),
    ("php-cli", "php, to run PDO in the driver tests"),
    ("php-pgsql", "PHP's PostgreSQL driver (PDO pgsql)"),
    ("faketime", "libfaketime, to step the agent's wall clock backwards in the audit fault tests"),
    ("e2fsprogs", "mkfs.ext4 and e2fsck for the read-only filesystem fault test"),
    ("openssh-server", "sshd, the real upstream server of the SSH end-to-end tests (on 127.0.0.x)"),
    ("openssh-client", "ssh, scp and sftp: the workloads of the SSH tests"),
    ("rsync", "rsync over ssh, a transfer the SSH tests govern"),
    ("tmux", "a terminal for the SSH interactive-shell test"),
];

/// node-postgres from the npm registry, where every user can read it.
pub const TEST_NODE: &str = "/opt/cordon-test-node";
const NPM_PACKAGES: &[&str] = &["pg@8"];

/// Python clients the end-to-end tests drive, in a venv every user can
/// read (workloads run as `nobody`).
pub const TEST_VENV: &str = "/opt/cordon-test-venv";
const PIP_PACKAGES: &[&str] = &["psycopg[binary]>=3.1,<3.4", "faker>=30", "paramiko>=3.4,<6", "asyncssh>=2.14,<3"];

pub fn run() -> Result<()> {
    rust_nightly()?;
    apt()?;
    bpf_linker()?;
    cargo_fuzz()?;
    if is_root() {
        python_clients()?;
        node_clients()?;
    }
    Ok(())
}

fn node_clients() -> Result<()> {
    if output("node", &["--version"]).is_none() || output("npm", &["--version"]).is_none() {
        say("installing nodejs and npm from Debian (node-postgres runs on them)");
        util::run("apt-get", &["update", "-qq"])?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "nodejs", "npm"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if Path::new(TEST_NODE).join("node_modules/pg/package.json").exists() {
        return Ok(());
    }
    say(&format!("installing node-postgres into {TEST_NODE} from the npm registry"));
    std::fs::create_dir_all(TEST_NODE)?;
    let mut args = vec!["install", "--silent", "--no-audit", "--no-fund", "--prefix", TEST_NODE];
    args.extend(NPM_PACKAGES);
    let mut npm = Command::new("npm");
    npm.args(&args);
    // Node trusts only its own CA list, not the system's: behind a registry
    // mirror or TLS proxy whose CA is in the system bundle, npm retries for
    // minutes and fails unless told where the bundle is (seen on a fresh
    // machine whose environment did not carry NODE_EXTRA_CA_CERTS).
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if std::env::var_os("NODE_EXTRA_CA_CERTS").is_none() && bundle.exists() {
        npm.env("NODE_EXTRA_CA_CERTS", bundle);
    }
    run_cmd(&mut npm)?;
    util::run("chmod", &["-R", "a+rX", TEST_NODE])
}

fn python_clients() -> Result<()> {
    let py = format!("{TEST_VENV}/bin/python3");
    let usable = Command::new("runuser")
        .args(["-u", "nobody", "--", &py, "-c", "import psycopg, faker, paramiko, asyncssh"])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Ok(());
    }
    say(&format!(
        "creating {TEST_VENV} with psycopg, paramiko and asyncssh from PyPI (real clients for the end-to-end tests)"
    ));
    // Debian's interpreter, not one under /root: workloads run as nobody.
    let _ = std::fs::remove_dir_all(TEST_VENV);
    util::run("/usr/bin/python3", &["-m", "venv", TEST_VENV])?;
    let mut args = vec!["-m", "pip", "install", "--quiet", "--disable-pip-version-check"];
    args.extend(PIP_PACKAGES);
    util::run(&py, &args)?;
    util::run("chmod", &["-R", "a+rX", TEST_VENV])
}

fn rust_nightly() -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (builds the eBPF programs)");
        util::run("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"])?;
    }
    let comps = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"]).unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to nightly (-Z build-std=core for bpfel-unknown-none)");
        util::run("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg]).is_some_and(|s| s.contains("install ok installed"))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().filter(|(p, _)| !installed(p)).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        say(&format!("will install {p}: {why}"));
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run `sudo -E cargo xtask setup`");
    }
    util::run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter());
    run_cmd(Command::new("apt-get").args(&args).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// cargo-fuzz, for `cargo xtask fuzz` (libFuzzer targets, nightly).
pub fn cargo_fuzz() -> Result<()> {
    if output("cargo", &["fuzz", "--version"]).is_some() {
        return Ok(());
    }
    say("installing cargo-fuzz (runs the libFuzzer targets in fuzz/)");
    run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]))
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some() {
        return Ok(());
    }
    say("installing bpf-linker (links the eBPF programs) against LLVM 22 from /usr/lib/llvm-22");
    let llvm = Path::new("/usr/lib/llvm-22");
    if !llvm.exists() {
        bail!("{} is missing: llvm-22-dev did not install", llvm.display());
    }
    let path = format!("{}/bin:{}", llvm.display(), std::env::var("PATH").unwrap_or_default());
    run_cmd(
        Command::new("cargo")
            // 0.13.0 is the version checked against nightly's LLVM 22 here.
            .args(["install", "bpf-linker", "--version", "0.13.0", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            // Without these, bpf-linker's build looks for libLLVM under /usr.
            .env("LLVM_PREFIX", llvm)
            .env("LLVM_SYS_221_PREFIX", llvm),
    )
}
