//! Entry points for the fuzz targets (`fuzz/`, `cargo xtask fuzz`): every
//! decoder that reads outside input, called as the agent calls it, without
//! sockets. Each must return (an error is fine) and never panic, hang or
//! grow without bound.

use std::{path::Path, sync::Arc};

use crate::{
    pipeline::{
        classify::Strategy,
        guard::TableRef,
        literals::{self, LiteralKey, TextMode},
        mask::ValueType,
    },
    postgres::{
        frame::FrameReader,
        scram::Client as Scram,
        shape, sql,
        sqltree::rewrite::{self, template},
        startup, wire,
    },
};

/// Bound on messages read from one input, so a run stays fast.
const MAX_FRAMES: usize = 4096;

/// Frontend traffic: framing, then each message's SQL through the analysis
/// a session runs (read once, literals rendered for the record).
pub fn pg_frontend(data: &[u8]) {
    let mut r = FrameReader::new(1 << 20);
    r.push(data);
    let cache = sql::Cache::default();
    for _ in 0..MAX_FRAMES {
        let Ok(Some(f)) = r.next_frame() else { break };
        if let Some(text) = crate::postgres::session::sql_text(&f) {
            let read = cache.read(&text);
            let key = LiteralKey::new(b"cordon-fuzz-literal-key");
            let _ = literals::render(&text, &read.literals, TextMode::Redacted, &key);
        }
    }
}

/// Backend traffic: framing and the messages cordon decodes.
pub fn pg_backend(data: &[u8]) {
    let mut r = FrameReader::new(1 << 20);
    r.push(data);
    for _ in 0..MAX_FRAMES {
        let Ok(Some(f)) = r.next_frame() else { break };
        match f.tag {
            b'E' | b'N' => {
                let _ = wire::server_error(f.body());
            }
            b'T' => {
                let _ = wire::row_description(f.body());
                let _ = crate::postgres::session::result_fields(f.body());
            }
            b'D' => {
                let _ = wire::data_row(f.body());
            }
            b'C' => {
                let _ = wire::tag_rows(&String::from_utf8_lossy(f.body()));
            }
            _ => {}
        }
    }
}

/// Startup-phase packets: SSLRequest, GSSENCRequest, CancelRequest,
/// StartupMessage.
pub fn pg_startup(data: &[u8]) {
    let mut r = FrameReader::new(1 << 20);
    r.push(data);
    for _ in 0..MAX_FRAMES {
        let Ok(Some(p)) = r.next_startup() else { break };
        let _ = startup::parse_packet(&p);
    }
}

/// SCRAM-SHA-256 server messages: the first splits at the first NUL into
/// server-first and server-final.
pub fn scram(data: &[u8]) {
    let (first, last) = match data.iter().position(|b| *b == 0) {
        Some(i) => (data.get(..i).unwrap_or_default(), data.get(i + 1..).unwrap_or_default()),
        None => (data, &[][..]),
    };
    let mut s = Scram::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
    if s.client_final(first).is_ok() {
        let _ = s.verify_server_final(last);
    }
}

/// The SQL analysis entry point: facts, shape, and the mask-at-read rewrite
/// against a catalog with a masked table.
pub fn sql_analysis(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = sql::analyse(text);
    let scanned = shape::scan(text);
    let _ = rewrite::rewrite(text, &SampleCatalog);
    if let Ok(parsed) = pg_query::parse(text, 0) {
        if let Some(stmt) = parsed.protobuf.stmts.first().and_then(|s| s.stmt.as_deref()) {
            let shape_of = template::shape(stmt);
            let _ = template::build(stmt, parsed.protobuf.version, &shape_of, &SampleCatalog);
            let facts = Arc::new(sql::analyse_parsed(&parsed.protobuf));
            let _ = shape::shaped(&parsed.protobuf, &scanned, &facts);
        }
    }
}

/// The policy parser.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::config::parse(Path::new("fuzz.toml"), text);
}

/// The audit record parser and `verify` over one segment's bytes.
pub fn audit_segment(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        let _ = serde_json::from_slice::<crate::audit::Entry>(line);
    }
    let dir = std::env::temp_dir().join(format!("cordon-fuzz-audit-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(dir.join("audit-000000000001.jsonl"), data).is_ok() {
        let _ = crate::audit::verify(&dir);
    }
}

/// An SSH exec command through the judge (with a permissive and a strict
/// profile) and the transfer classifier.
pub fn ssh_command(data: &[u8]) {
    use crate::ssh::policy::{judge, transfer, SshPolicy};
    let Ok(cmd) = std::str::from_utf8(data) else { return };
    let Ok(shape) = "echo *".parse() else { return };
    let strict = SshPolicy { commands: vec![shape], ..SshPolicy::default() };
    let lenient = SshPolicy { allow_hidden: true, ..strict.clone() };
    let _ = judge(cmd, &strict);
    let _ = judge(cmd, &lenient);
    let _ = transfer(cmd);
}

/// Terminal output through the stream masker, cut at every 7th byte; the
/// output never holds more visible text than went in, and flushing always
/// empties it.
pub fn stream_mask(data: &[u8]) {
    use crate::pipeline::{classify::Classifier, stream_mask::StreamMask};
    let classifier = Classifier::default();
    let Ok(mut policy) = crate::config::parse(Path::new("fuzz.toml"), "[profiles.ci]\n") else { return };
    let Some(profile) = policy.profiles.pop() else { return };
    let mut m = StreamMask::new(&classifier, &profile);
    let mut out = Vec::new();
    for chunk in data.chunks(7) {
        m.push(chunk, &mut out);
    }
    m.flush(&mut out);
    assert!(!m.holding(), "the masker held output after a flush");
}

/// The read-only SFTP filter over client bytes, cut at every 5th byte.
pub fn sftp(data: &[u8]) {
    let mut f = crate::ssh::sftp::ReadOnly::default();
    for chunk in data.chunks(5) {
        if f.feed(chunk).is_err() {
            return;
        }
    }
}

/// A catalog with one table, `public.customers`, whose email, card and ssn
/// are masked (partial): for the fuzz targets and the benchmarks.
pub struct SampleCatalog;

impl rewrite::Resolve for SampleCatalog {
    fn relation(&self, t: &TableRef) -> Result<Option<Arc<rewrite::Relation>>, String> {
        if t.name != "customers" {
            return Ok(None);
        }
        let col = |name: &str, treatment| rewrite::Column {
            name: name.into(),
            type_sql: "text".into(),
            type_oid: 25,
            ty: ValueType::Text { max_chars: None, fixed: false },
            treatment,
        };
        let mask = || rewrite::Treatment::Mask { strategy: Strategy::Partial, lookups: true };
        Ok(Some(Arc::new(rewrite::Relation {
            schema: "public".into(),
            name: "customers".into(),
            kind: rewrite::RelKind::Table,
            columns: vec![
                col("id", rewrite::Treatment::Clear),
                col("name", rewrite::Treatment::Clear),
                col("email", mask()),
                col("card", mask()),
                col("ssn", mask()),
            ],
            definition: None,
        })))
    }

    fn protects_anything(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[path = "tests/fuzz_regressions.rs"]
mod tests;
