//! Every fuzz entry point over the committed seeds and inputs that once
//! broke (or could break) a decoder. A crash `cargo xtask fuzz` finds is
//! added here as bytes, with the target it broke.
use std::path::PathBuf;

use super::*;

/// (target, input) pairs found by fuzzing or written as boundary cases.
const CASES: &[(&str, &[u8])] = &[
    ("pg_frontend", b""),
    // A length that claims the whole address space.
    ("pg_frontend", b"Q\x7f\xff\xff\xff"),
    ("pg_frontend", b"Q\x00\x00\x00\x04"),
    ("pg_frontend", b"P\x00\x00\x00\x05\x00"),
    ("pg_backend", b"T\x00\x00\x00\x06\xff\xff"),
    ("pg_backend", b"D\x00\x00\x00\x0a\x00\x02\xff\xff\xff\xff"),
    ("pg_backend", b"E\x00\x00\x00\x05\x00"),
    ("pg_startup", b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    ("pg_startup", b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01"),
    ("pg_startup", b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"),
    ("scram", b"r=,s=,i=0"),
    ("scram", b"r=x,s=!!!!,i=4096"),
    ("scram", b"i=99999999999999999999"),
    ("sql_analysis", b"select"),
    ("sql_analysis", b"select * from customers where ssn = '\\'' -- "),
    ("sql_analysis", b"with recursive a as (select 1 union all select * from a) select * from a, customers"),
    ("policy", b"[agent]\nlisten = 1\n[[intercept]]\n"),
    ("policy", b"[profiles.x.labels]\n\"\" = \"mask\"\n"),
    ("audit_segment", b"{\"seq\":1,\"prev\":\"\",\"ts\":\"\",\"event\":\"x\"}\n{"),
    ("audit_segment", b"\n\n\n"),
    ("ssh_command", b"echo $("),
    ("ssh_command", b"a | b && c || (d; e) & f <<EOF\nx\nEOF\n"),
    ("ssh_command", b"sudo -u -- timeout"),
    // Found by fuzzing: nested parentheses cost the shell parser
    // exponential time (a minute for these).
    ("ssh_command", b"((((((((((((((((((((((((\n\n"),
    // Found by fuzzing: a here-document sent the tokenizer into an endless,
    // allocating loop.
    ("ssh_command", b"\x03<<\r\t"),
    // Found by fuzzing: `~` and a long number panicked the word parser.
    ("ssh_command", b"~111111111111111111111111111111111111111111111111111111111111111111111111"),
    // Found by fuzzing: a descriptor number past i32 panicked the parser.
    ("ssh_command", b"999999999922>&22>&1>&\x00\x00\x12\x00\x00"),
    ("stream_mask", b"\x1b]52;c;\x1b\x1b[999999999999m\xf0\x9f"),
    ("stream_mask", b"\x1bP\x1b\x1b\\4111 1111 1111 1111\r\n"),
    ("sftp", b"\x00\x00\x00\x05\x03\x00\x00\x00\x01"),
    ("sftp", b"\x00\x00\x00\x00"),
];

fn run(target: &str, data: &[u8]) {
    match target {
        "pg_frontend" => pg_frontend(data),
        "pg_backend" => pg_backend(data),
        "pg_startup" => pg_startup(data),
        "scram" => scram(data),
        "sql_analysis" => sql_analysis(data),
        "policy" => policy(data),
        "audit_segment" => audit_segment(data),
        "ssh_command" => ssh_command(data),
        "stream_mask" => stream_mask(data),
        "sftp" => sftp(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

#[test]
fn fuzz_regressions_and_boundary_cases_pass() {
    for (target, data) in CASES {
        run(target, data);
    }
}

#[test]
fn every_committed_seed_passes() {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut n = 0;
    for target in std::fs::read_dir(&seeds).expect("fuzz/seeds").flatten() {
        let name = target.file_name().to_string_lossy().into_owned();
        for seed in std::fs::read_dir(target.path()).expect("seed dir").flatten() {
            run(&name, &std::fs::read(seed.path()).expect("seed"));
            n += 1;
        }
    }
    assert!(n >= 7, "only {n} seeds under {}", seeds.display());
}
