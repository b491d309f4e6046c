//! Micro benchmarks (criterion): classification + masking throughput on
//! realistic values, one core; and framing throughput for DataRow streams.
//! `cargo xtask bench micro` runs these and reads criterion's estimates.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use cordon::{
    config,
    pipeline::{
        classify::Strategy,
        detect::Context,
        mask::ValueType,
        plan::{self, ColAction},
    },
    postgres::{
        catalog::Catalog,
        frame::FrameReader,
        sqltree::rewrite::{self, template},
    },
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const POLICY: &str = r#"
[profiles.bench]
description = "bench"
"#;

/// A realistic mix: short ids, names, emails, card numbers, free text,
/// 16-digit order ids, timestamps.
fn values() -> Vec<(ColAction, &'static str)> {
    let detect = |name: &str| ColAction::Detect { ctx: Context::from_column(name), counter: name.to_string() };
    let mask = |s: Strategy| ColAction::Mask { strategy: s, counter: "m".into() };
    vec![
        (detect("id"), "184467"),
        (detect("name"), "Ada Lovelace"),
        (detect("email"), "ada.lovelace@example.com"),
        (mask(Strategy::Partial), "4111 1111 1111 1111"),
        (detect("note"), "Customer asked to be called back tomorrow morning about the invoice."),
        (detect("order_id"), "4111111111111111"),
        (detect("created_at"), "2026-11-21 23:35:46.123456+00"),
        (detect("city"), "London"),
        (detect("comment"), "card on file 5500 0000 0000 0004, contact +44 20 7946 0958"),
        (mask(Strategy::Redact), "123-45-6789"),
    ]
}

fn classify_and_mask(c: &mut Criterion) {
    let policy = config::parse(Path::new("bench.toml"), POLICY).unwrap_or_else(|e| panic!("{e}"));
    let profile = policy.profiles.first().cloned().unwrap_or_else(|| panic!("profile"));
    let classifier = policy.classifier.clone();
    let vals = values();
    let ty = ValueType::Text { max_chars: None, fixed: false };
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(vals.len() as u64));
    g.bench_function("classify_mask_values", |b| {
        let mut counts = BTreeMap::new();
        b.iter(|| {
            for (action, v) in &vals {
                let r = plan::apply(action, ty, black_box(v), &classifier, &profile, None, &mut counts);
                black_box(&r);
            }
        })
    });
    g.finish();
}

fn framing(c: &mut Criterion) {
    // 1,000 DataRows of 3 columns, as a server sends them.
    let mut wire = Vec::new();
    for i in 0..1000u32 {
        let cols = [i.to_string(), "Ada Lovelace".to_string(), "ada.lovelace@example.com".to_string()];
        let body_len: usize = 2 + cols.iter().map(|c| 4 + c.len()).sum::<usize>();
        wire.push(b'D');
        wire.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
        wire.extend_from_slice(&3i16.to_be_bytes());
        for c in &cols {
            wire.extend_from_slice(&(c.len() as i32).to_be_bytes());
            wire.extend_from_slice(c.as_bytes());
        }
    }
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("datarow_frames", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(1 << 26);
            r.push(black_box(&wire));
            let mut n = 0;
            while let Ok(Some(f)) = r.next_frame() {
                n += f.bytes.len();
            }
            black_box(n)
        })
    });
    g.finish();
}

/// A catalog in memory: `customers` with masked columns.
use cordon::fuzz::SampleCatalog as Cat;

fn mask_at_read(c: &mut Criterion) {
    let sql = "select c.id, c.name, c.email from customers c join orders o on o.customer_id = c.id \
               where c.card = $1 and o.total > 10 order by c.id limit 20";
    let mut g = c.benchmark_group("rewrite");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cold", |b| b.iter(|| black_box(rewrite::rewrite(black_box(sql), &Cat))));
    // A statement of a shape seen before, with other constants (what a
    // workload that inlines its values sends): parse, shape, fill.
    let first = pg_query::parse(sql.replace("$1", "'4111'").as_str(), 0).unwrap_or_else(|e| panic!("{e}"));
    let stmt = first.protobuf.stmts.first().and_then(|s| s.stmt.clone()).map(|b| *b).unwrap_or_default();
    let shape = template::shape(&stmt);
    let t = template::build(&stmt, first.protobuf.version, &shape, &Cat)
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("no template"));
    let next = sql.replace("$1", "'5500'").replace("> 10", "> 99");
    g.bench_function("shape_hit", |b| {
        b.iter(|| {
            let p = pg_query::parse(black_box(&next), 0).unwrap_or_else(|e| panic!("{e}"));
            let s =
                template::shape(p.protobuf.stmts.first().and_then(|s| s.stmt.as_deref()).unwrap_or_else(|| panic!()));
            black_box(t.fits(&s).then(|| t.apply(&s)))
        })
    });
    let catalog = Catalog::new(([127, 0, 0, 1], 5432).into(), "db");
    let r = Arc::new(rewrite::rewrite(sql, &Cat));
    catalog.cache_rewrite("bench", sql, r);
    g.bench_function("cached", |b| b.iter(|| black_box(catalog.cached_rewrite("bench", black_box(sql)))));
    g.finish();
}

/// The per-statement path a workload that inlines its values takes: one
/// scan, a shared shape, its facts; and the statement's audit record.
fn statement(c: &mut Criterion) {
    let mut g = c.benchmark_group("statement");
    g.throughput(Throughput::Elements(1));
    let cache = cordon::postgres::sql::Cache::default();
    let texts: Vec<String> = (0..1000)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", 1 + i * 997 % 1_000_000))
        .collect();
    let _ = cache.read(&texts[0]);
    let mut i = 0;
    g.bench_function("read_shape_hit", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            black_box(cache.read(black_box(&texts[i])))
        })
    });
    g.bench_function("scan", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            black_box(cordon::postgres::shape::scan(black_box(&texts[i])))
        })
    });
    // A simple query cordon sends prepared (see `postgres::prepare`): its
    // mask-at-read rewrite with the number lifted out, bound to the
    // statement prepared before.
    let rewritten: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "SELECT abalance FROM (SELECT pgbench_accounts.aid, pgbench_accounts.bid, \
                 CASE WHEN pgbench_accounts.abalance IS NULL THEN NULL ELSE 0 END::integer AS abalance, \
                 pgbench_accounts.filler FROM public.pgbench_accounts pgbench_accounts) pgbench_accounts \
                 WHERE aid = {};",
                1 + i * 997 % 1_000_000
            )
        })
        .collect();
    let plans = cordon::postgres::prepare::Plans::default();
    let mut ups = cordon::postgres::prepare::Upstream::new(true);
    let mut out = bytes::BytesMut::new();
    let _ = ups.send(&plans, &rewritten[0], &mut out);
    if let Some(sent) = ups.send(&plans, &rewritten[1], &mut out) {
        ups.confirmed(&sent.key);
    }
    g.bench_function("prepare_bound", |b| {
        b.iter(|| {
            i = (i + 1) % rewritten.len();
            out.clear();
            black_box(ups.send(&plans, black_box(&rewritten[i]), &mut out).map(|s| s.parse))
        })
    });
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log =
        cordon::audit::AuditLog::open(dir.path(), cordon::audit::Settings::default()).unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("audit_statement_record", |b| {
        b.iter(|| {
            let rec = cordon::audit::Record::new("statement", Some("1a2b3c-17"))
                .with("stmt", 42)
                .with("kind", "simple")
                .with("text", "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;")
                .with("fingerprint", "0123456789abcdef")
                .with("normalized", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
            black_box(log.append(&rec).map(|t| t.seq()))
        })
    });
    g.finish();
}

/// The detectors on the large result's values (`bench large`): a masked
/// email, and notes with and without a phone number.
fn detectors(c: &mut Criterion) {
    let vals = ["u***@example.com", "nothing to see 123456", "call +44 20 7946 0010", "user123456@example.com"];
    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(vals.len() as u64));
    g.bench_function("large_result_values", |b| {
        b.iter(|| {
            for v in &vals {
                black_box(cordon::pipeline::detect::scan(black_box(v), Context::default()));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, classify_and_mask, framing, mask_at_read, statement, detectors);
criterion_main!(benches);
