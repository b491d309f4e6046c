//! `cargo xtask bench detectors`: the detectors measured end to end. An
//! evaluation set (Faker, fixed seed: `eval/detectors.py`) of the classes
//! cordon detects and of hard negatives is loaded into PostgreSQL and read
//! back through cordon as a tagged workload. What came back masked, and as
//! what, gives precision and recall per class and false positives per
//! million negatives.

use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use anyhow::{bail, Context, Result};
use cordon_tests::{Cgroup, Postgres};

use crate::util::say;

const SEED: u32 = 20261201;
const PER_CLASS: usize = 5_000;
const NEGATIVES: usize = 200_000;
/// The classes of the evaluation set, as the detectors name them.
const CLASSES: [&str; 8] = ["card", "ssn", "iban", "email", "phone", "ipv4", "ipv6", "aws_key"];

pub struct Outcome {
    pub section: String,
    pub met: bool,
}

/// What a masked value says was found in it.
fn kinds_found(before: &str, after: &str) -> Vec<String> {
    if before == after {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    let mut rest = after;
    while let Some(i) = rest.find("[redacted:") {
        let tail = rest.get(i + 10..).unwrap_or_default();
        let Some(end) = tail.find(']') else { break };
        out.push(tail.get(..end).unwrap_or_default().to_string());
        rest = tail.get(end..).unwrap_or_default();
    }
    // card and email are masked partially: stars over digits, or a***@.
    if after.contains("***@") {
        out.push("email".into());
    }
    if after.matches('*').count() >= 8 && !after.contains("***@") {
        out.push("card".into());
    }
    if out.is_empty() {
        out.push("?".into());
    }
    out
}

pub fn run() -> Result<Outcome> {
    say(&format!("detectors: generating the evaluation set ({PER_CLASS} per class, {NEGATIVES} negatives)"));
    let script = cordon_tests::workspace_root().join("xtask/eval/detectors.py");
    let out = Command::new(cordon_tests::TEST_PYTHON)
        .arg(&script)
        .args([SEED.to_string(), PER_CLASS.to_string(), NEGATIVES.to_string()])
        .output()
        .context("running eval/detectors.py")?;
    if !out.status.success() {
        bail!("eval/detectors.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pg = Postgres::start(&["127.0.0.2"], cordon_tests::free_port())?;
    let file = pg.dir.path().join("eval.tsv");
    std::fs::write(&file, &out.stdout)?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    pg.admin_sql(&format!(
        "create table eval(id serial primary key, class text, subtype text, value text); \
         copy eval(class, subtype, value) from '{}'; analyze eval",
        file.display()
    ))?;
    let cg = Cgroup::create(&format!("cordon-eval-{}", std::process::id()))?;
    let agent = crate::bench::bench_agent(
        &pg,
        &cg,
        "eval",
        "\n[profiles.eval]\ndescription = \"detectors on every unlabeled column\"\n",
    )?;
    let read = |through: bool| -> Result<Vec<(String, String, String)>> {
        let mut cmd = if through { cg.command("psql") } else { Command::new("psql") };
        cmd.args(["-X", "-At", "-0", "-F", "\t", "-h", "127.0.0.2", "-p", &pg.port.to_string(), "-U", "postgres"])
            .args(["-c", "select class, subtype, value from eval order by id"]);
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split('\0')
            .filter(|r| !r.is_empty())
            .map(|r| {
                let mut f = r.splitn(3, '\t');
                let c = f.next().unwrap_or_default().to_string();
                let s = f.next().unwrap_or_default().to_string();
                (c, s, f.next().unwrap_or_default().to_string())
            })
            .collect())
    };
    say("detectors: reading the set directly and through cordon");
    let direct = read(false)?;
    let masked = read(true)?;
    drop(agent);
    if direct.len() != masked.len() || direct.is_empty() {
        bail!("read {} rows directly and {} through cordon", direct.len(), masked.len());
    }
    // Per class: true positives, false negatives, false positives.
    let mut tp: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fneg: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fpos: BTreeMap<String, usize> = BTreeMap::new();
    let mut neg_hits = 0usize;
    let mut negs = 0usize;
    let mut misses: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ((class, sub, before), (_, _, after)) in direct.iter().zip(&masked) {
        let found = kinds_found(before, after);
        if class == "none" {
            negs += 1;
            if !found.is_empty() {
                neg_hits += 1;
                for k in &found {
                    *fpos.entry(k.clone()).or_default() += 1;
                }
                let m = misses.entry(format!("false positive ({sub})")).or_default();
                if m.len() < 3 {
                    m.push(before.clone());
                }
            }
            continue;
        }
        let Some(c) = CLASSES.iter().find(|c| *c == class) else { continue };
        if found.iter().any(|k| k == c) {
            *tp.entry(c).or_default() += 1;
        } else {
            *fneg.entry(c).or_default() += 1;
            let m = misses.entry(format!("missed {c} ({sub})")).or_default();
            if m.len() < 3 {
                m.push(before.clone());
            }
        }
        for k in found.iter().filter(|k| *k != c) {
            *fpos.entry(k.clone()).or_default() += 1;
        }
    }
    let mut met = true;
    let mut s = format!(
        "## Detectors\n\n`xtask/eval/detectors.py` (Faker, seed {SEED}): {PER_CLASS} values per class, half of them inside a \
         sentence, and {NEGATIVES} hard negatives (ids, order numbers, EAN-8/13, ISBN, epoch seconds and milliseconds, hashes, \
         UUIDs, versions, dates, prices, public keys and certificates, `…EXAMPLE` AWS keys, IBANs with a bad checksum, SSNs in \
         invalid ranges, card numbers failing Luhn, free text). Loaded into PostgreSQL, read back through cordon as a tagged \
         workload from an unlabeled column named `value` (no column context), and compared with a direct read.\n\n\
         | class | precision | recall | goal |\n|---|---|---|---|\n"
    );
    for c in CLASSES {
        let t = tp.get(c).copied().unwrap_or(0) as f64;
        let fnn = fneg.get(c).copied().unwrap_or(0) as f64;
        let fp = fpos.get(c).copied().unwrap_or(0) as f64;
        let precision = if t + fp > 0.0 { t / (t + fp) } else { 0.0 };
        let recall = if t + fnn > 0.0 { t / (t + fnn) } else { 0.0 };
        let ok = precision >= 0.99 && recall >= 0.99;
        met &= ok;
        let _ = writeln!(
            s,
            "| {c} | {precision:.4} | {recall:.4} | ≥ 0.99 · ≥ 0.99{} |",
            if ok { ": met" } else { ": **missed**" }
        );
    }
    let per_million = neg_hits as f64 / negs.max(1) as f64 * 1e6;
    met &= per_million <= 100.0;
    let _ = writeln!(
        s,
        "\nFalse positives: **{per_million:.0} per million negatives** ({neg_hits} of {negs}; goal ≤ 100{}).\n",
        if per_million <= 100.0 { ": met" } else { ": **missed**" }
    );
    if !misses.is_empty() {
        s.push_str("Examples of what was missed or flagged wrongly:\n\n```\n");
        for (what, ex) in &misses {
            for e in ex {
                let _ = writeln!(s, "{what}: {}", e.chars().take(100).collect::<String>());
            }
        }
        s.push_str("```\n");
    }
    Ok(Outcome { section: s, met })
}
