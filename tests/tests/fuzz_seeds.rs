//! Real traffic for the fuzz corpus: psql and pgbench (simple, extended,
//! prepared), COPY, NOTIFY, errors, through a recording relay to a real
//! PostgreSQL. The byte streams go to `target/fuzz-seeds/<target>/`, where
//! `cargo xtask fuzz` (and the smoke run in `cargo xtask test`) seed from.
//! A real audit segment and policy from a governed session join them.
//!
//! The test also checks what it captured: a seed set that lost a direction
//! or never saw the extended protocol would seed nothing useful.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
};

use cordon_tests::{require_e2e, stderr, workspace_root, Postgres};

type Capture = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>)>>>;

/// Relay every accepted connection to `upstream`, recording both directions.
fn recording_relay(upstream: u16) -> (u16, Capture) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let captured: Capture = Arc::default();
    let out = captured.clone();
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.2", upstream)) else { continue };
            let out = out.clone();
            thread::spawn(move || {
                let pump = |mut from: TcpStream, mut to: TcpStream| {
                    thread::spawn(move || {
                        let mut seen = Vec::new();
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else { break };
                            seen.extend_from_slice(chunk);
                            if to.write_all(chunk).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        seen
                    })
                };
                let up = pump(client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let down = pump(server, client);
                let (Ok(c), Ok(s)) = (up.join(), down.join()) else { return };
                if let Ok(mut v) = out.lock() {
                    v.push((c, s));
                }
            });
        }
    });
    (port, captured)
}

/// Tagged messages after the startup packet.
fn after_startup(stream: &[u8]) -> &[u8] {
    let len = stream.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    stream.get(len..).unwrap_or_default()
}

/// The SQL of each Query and Parse message.
fn statements(mut frontend: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let (Some(&tag), Some(len)) = (frontend.first(), frontend.get(1..5)) {
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(body) = frontend.get(5..1 + len) else { break };
        let sql = match tag {
            b'Q' => body.split(|b| *b == 0).next(),
            b'P' => body.split(|b| *b == 0).nth(1),
            _ => None,
        };
        if let Some(s) = sql.filter(|s| !s.is_empty()) {
            out.push(s.to_vec());
        }
        frontend = frontend.get(1 + len..).unwrap_or_default();
    }
    out
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("seed dir");
    fs::write(dir.join(name), bytes).expect("seed");
}

#[test]
fn capture_real_traffic_as_fuzz_seeds() {
    require_e2e!();
    let pg = Postgres::start(&["127.0.0.2"], cordon_tests::free_port()).expect("postgres");
    pg.admin_sql("create table t(id int primary key, name text, card text); insert into t values (1, 'ada', '4111 1111 1111 1111')")
        .expect("schema");
    let (port, captured) = recording_relay(pg.port);
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGSSLMODE", "disable")
            .output()
            .expect("psql");
        let _ = stderr(&out);
    };
    psql("select id, name, card from t where id = 1; select now(), 'a''b', E'\\\\x41', $$dollar$$, 1.5e3, B'101'");
    psql("update t set name = 'grace' where id = 1 returning *");
    psql("copy t to stdout with (format csv)");
    psql("listen ch; notify ch, 'payload 4111 1111 1111 1111'");
    psql("select * from nope");
    psql("with x as (select * from t) select count(*) from x join t using (id) where card like '4%'");
    let pgbench = cordon_tests::pg_bin("pgbench").expect("pgbench");
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new(&pgbench)
            .args(["-n", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-M", mode, "-t", "20", "-f"])
            .arg(script())
            .arg("postgres")
            .env("PGSSLMODE", "disable")
            .output()
            .expect("pgbench");
        assert!(out.status.success(), "pgbench {mode}: {}", stderr(&out));
    }
    // Let the relay threads finish.
    thread::sleep(std::time::Duration::from_millis(300));
    let seeds = workspace_root().join("target/fuzz-seeds");
    let sessions = captured.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(sessions.len() >= 9, "captured {} sessions", sessions.len());
    let mut sql = 0;
    let mut extended = false;
    for (i, (client, server)) in sessions.iter().enumerate() {
        assert!(!client.is_empty() && !server.is_empty(), "session {i} lost a direction");
        write_seed(&seeds.join("pg_startup"), &format!("session-{i}"), client);
        write_seed(&seeds.join("pg_frontend"), &format!("session-{i}"), after_startup(client));
        write_seed(&seeds.join("pg_backend"), &format!("session-{i}"), server);
        extended |= after_startup(client).first() == Some(&b'P');
        for (j, s) in statements(after_startup(client)).iter().enumerate() {
            write_seed(&seeds.join("sql_analysis"), &format!("session-{i}-{j}"), s);
            sql += 1;
        }
    }
    assert!(extended, "no extended-protocol session was captured");
    assert!(sql >= 10, "only {sql} statements captured");
    // A real policy and audit segment.
    for p in fs::read_dir(workspace_root().join("policies")).expect("policies").flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        write_seed(&seeds.join("policy"), &name, &fs::read(p.path()).expect("policy"));
    }
    let segment = audit_segment();
    write_seed(&seeds.join("audit_segment"), "segment", &segment);
}

/// A pgbench script with literals, a join and a write.
fn script() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cordon-fuzz-seeds-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bench.sql");
    fs::write(
        &path,
        "\\set id random(1, 1)\nselect id, name from t where id = :id;\nupdate t set name = 'x' || :id where id = :id;\nselect count(*) from t a join t b using (id);\n",
    )
    .expect("script");
    path
}

/// Records from a real governed session (a short-lived agent's log).
fn audit_segment() -> Vec<u8> {
    let (pg, cg, agent) =
        cordon_tests::governed("fuzzseed", "create table s(x int); grant all on s to app;", "[profiles.ci]\n")
            .expect("governed");
    let out = cg
        .command("psql")
        .args([
            "-X",
            "-At",
            &format!("host=127.0.0.2 port={} dbname=postgres user=app", pg.port),
            "-c",
            "insert into s values (1); select * from s",
        ])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_synced();
    let dir = agent.audit_path();
    let seg = fs::read_dir(&dir)
        .expect("audit dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"));
    fs::read(seg.expect("a segment")).expect("segment")
}
