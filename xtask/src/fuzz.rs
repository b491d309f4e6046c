//! `cargo xtask fuzz [--secs N] [--report]`: every fuzz target (libFuzzer,
//! `fuzz/`) for N seconds each, from a corpus seeded with the committed seeds
//! (`fuzz/seeds/<target>`) and with real traffic the end-to-end tests
//! captured (`target/fuzz-seeds/<target>`). A crash fails the run and names
//! the input to turn into a regression test. `--report` writes the figures
//! into BENCHMARKS.md (between the fuzz markers).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::util::{run_cmd, say};

pub const TARGETS: &[(&str, &str)] = &[
    ("pg_frontend", "PostgreSQL frontend framing, and each statement through the analysis"),
    ("pg_backend", "PostgreSQL backend framing and the messages cordon decodes"),
    ("pg_startup", "startup, SSLRequest, GSSENCRequest and CancelRequest packets"),
    ("scram", "SCRAM-SHA-256 server-first and server-final messages"),
    ("sql_analysis", "SQL analysis: facts, scanner shape, mask-at-read rewrite and template"),
    ("policy", "the policy parser"),
    ("audit_segment", "the audit record parser and `audit verify`"),
    ("ssh_command", "the SSH exec judge (brush-parser) and the transfer classifier"),
    ("stream_mask", "the terminal output masker (VT states, UTF-8 carry, hold and flush)"),
    ("sftp", "the read-only SFTP request filter"),
];

const BEGIN: &str = "<!-- fuzz: begin (cargo xtask fuzz --secs 600 --report) -->";
const END: &str = "<!-- fuzz: end -->";

struct Figures {
    target: &'static str,
    what: &'static str,
    secs: u64,
    execs: u64,
    cov: u64,
    ft: u64,
    corpus: u64,
}

pub fn run(args: &[String]) -> Result<()> {
    let secs: u64 = match args.iter().position(|a| a == "--secs") {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).context("--secs takes a number of seconds")?,
        None => 60,
    };
    let report = args.iter().any(|a| a == "--report");
    crate::setup::cargo_fuzz()?;
    let root = cordon_tests::workspace_root();
    let fuzz_dir = root.join("fuzz");
    say("building the fuzz targets (nightly, AddressSanitizer)");
    run_cmd(Command::new("cargo").current_dir(&fuzz_dir).args(["+nightly", "fuzz", "build", "-O", "--fuzz-dir", "."]))?;
    let mut figures = Vec::new();
    for (target, what) in TARGETS {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = [fuzz_dir.join("seeds").join(target), root.join("target/fuzz-seeds").join(target)];
        let mut dirs: Vec<PathBuf> = vec![corpus.clone()];
        dirs.extend(seeds.into_iter().filter(|d| d.is_dir()));
        say(&format!("fuzzing {target} for {secs} s"));
        let started = Instant::now();
        let out = Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "-O", "--fuzz-dir", ".", target])
            .args(&dirs)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .args(["-rss_limit_mb=2048", "-timeout=30", "-print_final_stats=1"])
            .output()
            .context("running cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let artifact = log.lines().find(|l| l.contains("Test unit written to")).unwrap_or("(see the log above)");
            eprintln!("{}", tail(&log, 60));
            bail!(
                "fuzz target {target} failed: {artifact}\nTurn the input into a regression test (agent/src/tests/fuzz_regressions.rs) and fix the decoder"
            );
        }
        figures.push(parse(target, what, started.elapsed().as_secs(), &log));
    }
    for f in &figures {
        say(&format!(
            "{}: {} executions, coverage {} edges, {} features, corpus {}",
            f.target, f.execs, f.cov, f.ft, f.corpus
        ));
    }
    if report {
        write_report(&root.join("BENCHMARKS.md"), &figures)?;
    }
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines.get(lines.len().saturating_sub(n)..).unwrap_or_default().join("\n")
}

/// libFuzzer's last status line (`#N DONE cov: X ft: Y corp: Z/…`) and
/// final stats (`stat::number_of_executed_units: N`).
fn parse(target: &'static str, what: &'static str, secs: u64, log: &str) -> Figures {
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = log.lines().rev().find(|l| l.contains(" cov: ")).unwrap_or("");
    let execs = log
        .lines()
        .find(|l| l.starts_with("stat::number_of_executed_units:"))
        .and_then(|l| l.split(':').nth(3).or_else(|| l.rsplit(':').next()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Figures {
        target,
        what,
        secs,
        execs,
        cov: field(status, "cov:"),
        ft: field(status, "ft:"),
        corpus: field(status, "corp:"),
    }
}

fn write_report(path: &Path, figures: &[Figures]) -> Result<()> {
    let mut s = format!(
        "{BEGIN}\n## Fuzzing\n\n`cargo xtask fuzz --secs {} --report`: libFuzzer with AddressSanitizer (cargo-fuzz, nightly), \
         one target after another on this machine, each from the committed seeds and the traffic the end-to-end \
         tests captured. CI runs the same targets for a few seconds each.\n\n\
         | target | what it reads | seconds | executions | coverage (edges) | features | corpus | crashes |\n|---|---|---|---|---|---|---|---|\n",
        figures.first().map_or(0, |f| f.secs)
    );
    for f in figures {
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | 0 |\n",
            f.target, f.what, f.secs, f.execs, f.cov, f.ft, f.corpus
        ));
    }
    s.push_str(END);
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{s}{}", &text[..a], &text[b + END.len()..]),
        _ => format!("{}\n\n{s}\n", text.trim_end()),
    };
    std::fs::write(path, new)?;
    Ok(())
}

/// Keep the fuzz section of BENCHMARKS.md when `bench` rewrites the file.
pub fn keep_section(old: &str, new: &mut String) {
    if let (Some(a), Some(b)) = (old.find(BEGIN), old.find(END)) {
        if b > a && !new.contains(BEGIN) {
            new.push_str("\n\n");
            new.push_str(&old[a..b + END.len()]);
            new.push('\n');
        }
    }
}
