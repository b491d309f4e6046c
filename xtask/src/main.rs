//! Project tasks: `cargo xtask setup | build | test | demo`.
//!
//! `setup` installs every prerequisite idempotently and says what it does;
//! `test` and `demo` run it first, so a fresh machine needs nothing else.

mod bench;
mod bench_ssh;
mod demo;
mod detector_eval;
mod fuzz;
mod gen_walk;
mod setup;
mod util;

use anyhow::{bail, Result};

fn main() {
    // `cargo xtask` runs us with xtask's own package variables set
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, …), and every cargo we start would
    // inherit them: ring's build script watches them, so each switch between
    // `cargo xtask …` and a plain `cargo build` rebuilt ring, rustls and
    // everything above them. Nothing here reads them at run time (paths come
    // from env! at compile time). CARGO, CARGO_HOME and the like stay.
    let package_vars: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(k.as_str(), "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE")
        })
        .collect();
    for k in package_vars {
        std::env::remove_var(k);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => setup::run().and_then(|()| build(false)),
        Some("test") => test(&args[1..]),
        Some("demo") => demo::run(),
        Some("gen-walk") => gen_walk::run(args.get(1).map(String::as_str) == Some("--check")),
        Some("bench") => bench::run(args.get(1).map_or("all", String::as_str)),
        Some("fuzz") => fuzz::run(&args[1..]),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn usage() -> Result<()> {
    bail!(
        "usage: cargo xtask <command>\n  setup  install prerequisites (idempotent)\n  build  build the agent (and its eBPF programs)\n  \
         test   unit tests, end-to-end tests (root for the e2e part) and a short fuzz smoke run\n  demo   the end-to-end demo\n  bench  [pg|micro|detectors|ssh|all] benchmarks, written to BENCHMARKS.md\n  \
         gen-walk [--check]  regenerate the SQL parse-tree walker from pg_query\n  \
         fuzz   [--secs N] [--report]  every fuzz target for N seconds (default 60); --report writes BENCHMARKS.md"
    )
}

pub fn build(release: bool) -> Result<()> {
    let mut args = vec!["build", "--package", "cordon"];
    if release {
        args.push("--release");
    }
    util::run("cargo", &args)
}

fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    // The SQL walker must match the parser it walks (a pg_query upgrade
    // that adds node types fails here, not silently in the rewrite).
    gen_walk::run(true)?;
    build(false)?;
    let root = util::is_root();
    let mut args: Vec<String> = ["test", "--workspace", "--no-fail-fast"].map(String::from).to_vec();
    args.extend(extra.iter().cloned());
    // End-to-end tests share the kernel hooks and the cgroup tree: one at a time.
    args.extend(["--", "--test-threads=1"].map(String::from));
    let mut cmd = std::process::Command::new("cargo");
    cmd.args(&args);
    if root {
        // As root every e2e prerequisite is there (setup installed it), so a
        // test that would skip is a failure instead.
        cmd.env("CORDON_E2E_REQUIRED", "1");
    } else {
        eprintln!(
            "xtask: NOT ROOT: the end-to-end tests (eBPF, cgroups) will SKIP; run `sudo -E cargo xtask test` to run them"
        );
    }
    let tests = util::run_cmd(&mut cmd);
    // A short smoke run of every fuzz target (seeded with the traffic the
    // end-to-end tests just captured), even when a test failed.
    let smoke = fuzz::run(&["--secs".to_string(), FUZZ_SMOKE_SECS.to_string()]);
    tests.and(smoke)
}

/// Seconds per fuzz target in `cargo xtask test` (7 targets: under 2 minutes).
const FUZZ_SMOKE_SECS: u64 = 15;
