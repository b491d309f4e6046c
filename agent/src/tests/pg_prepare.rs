use super::named::{Slot, MAX_PREPARED_BYTES, MAX_SEEN_BYTES, RUN};
use super::*;
use bytes::BytesMut;

fn p(sql: &str) -> Option<Parameterized> {
    Plans::default().parameterize(sql)
}

/// (parameterised text, values, types)
fn lifted(sql: &str) -> (String, Vec<String>, Vec<u32>) {
    let got = p(sql).unwrap_or_else(|| panic!("{sql} is not prepared"));
    (got.text, got.values, got.types)
}

#[test]
fn a_number_compared_becomes_a_typed_parameter_and_shapes_share_one_text() {
    let (text, values, types) = lifted("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;");
    assert_eq!(text, "SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
    assert_eq!(values, ["48213"]);
    assert_eq!(types, [INT4]);
    let a = p("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").unwrap();
    let b = p("SELECT abalance FROM pgbench_accounts WHERE aid = 7;").unwrap();
    assert_eq!(a.key, b.key);
    assert_ne!(a.values, b.values);
}

#[test]
fn each_number_gets_the_type_postgresql_gives_the_constant() {
    let (_, values, types) =
        lifted("select * from t where a = 2147483647 and b = 3000000000 and c = 99999999999999999999 and d = 1.5 and e = 1e3 and f = 007");
    assert_eq!(values, ["2147483647", "3000000000", "99999999999999999999", "1.5", "1e3", "007"]);
    assert_eq!(types, [INT4, INT8, NUMERIC, NUMERIC, NUMERIC, INT4]);
    // A minus sign folds into the constant: the two values whose type it
    // changes stay inline.
    let (text, values, _) = lifted("select * from t where a = -2147483648 and b = 2147483648 and c = -5");
    assert_eq!(text, "select * from t where a = -2147483648 and b = 2147483648 and c = -$1");
    assert_eq!(values, ["5"]);
    let (text, _, _) = lifted("select * from t where a = -9223372036854775808");
    assert_eq!(text, "select * from t where a = -9223372036854775808");
}

#[test]
fn numbers_that_are_not_values_stay_constants() {
    // Positions, type modifiers, strings, ON CONFLICT inference.
    let (text, values, _) = lifted("select a, b + 1 from t order by 2, 1 limit 5");
    assert_eq!(text, "select a, b + $1 from t order by 2, 1 limit $2");
    assert_eq!(values, ["1", "5"]);
    let (text, _, _) = lifted("select a, count(*) from t group by 1 order by 1");
    assert_eq!(text, "select a, count(*) from t group by 1 order by 1");
    let (text, _, _) = lifted("select distinct on (1) a from t order by 1, -1");
    assert_eq!(text, "select distinct on (1) a from t order by 1, -1");
    let (text, _, _) = lifted("select 5::numeric(10,2), 'x'::varchar(3), 6::bit(8), interval '1' second(3)");
    assert_eq!(text, "select $1::numeric(10,2), 'x'::varchar(3), $2::bit(8), interval '1' second(3)");
    let (text, values, _) = lifted("select * from t where name = 'a 5' and note like '%7%' and n = 8");
    assert_eq!(text, "select * from t where name = 'a 5' and note like '%7%' and n = $1");
    assert_eq!(values, ["8"]);
    let (text, _, _) =
        lifted("insert into t values (1, 2) on conflict ((a + 3)) where b = 4 do update set b = 5 where t.a = 6");
    assert_eq!(
        text,
        "insert into t values ($1, $2) on conflict ((a + 3)) where b = 4 do update set b = $3 where t.a = $4"
    );
    // Not numbers in PostgreSQL 15's scanner: left as written.
    let (text, _, _) = lifted("select * from t where a = 0x1F or b = 1_000");
    assert!(text.contains("0x1F") && text.contains("1_000"), "{text}");
    // Comments are not touched.
    let (text, _, _) = lifted("select /* 5 */ 5 -- 6\n");
    assert_eq!(text, "select /* 5 */ $1 -- 6\n");
}

#[test]
fn equal_constants_share_a_parameter_so_matched_expressions_stay_equal() {
    let (text, values, _) = lifted("select a + 1, sum(b) from t group by a + 1 having a + 1 > 2");
    assert_eq!(text, "select a + $1, sum(b) from t group by a + $1 having a + $1 > $2");
    assert_eq!(values, ["1", "2"]);
    // Same digits, another type: another parameter.
    let (text, values, types) = lifted("select * from t where a = 1 and b = 1.0 and c = 1");
    assert_eq!(text, "select * from t where a = $1 and b = $2 and c = $1");
    assert_eq!((values.len(), types), (2, vec![INT4, NUMERIC]));
}

#[test]
fn only_single_plain_dml_is_prepared() {
    for sql in [
        "set work_mem = 5",
        "select 1; select 2",
        "select $1",
        "select 5 into t2 from t",
        "explain select * from t where a = 1",
        "copy (select 1) to stdout",
        "create table x (a numeric(5))",
        "do $$ begin perform 1; end $$",
        "prepare p as select 1",
        "begin",
        "select 'x' from t where",
        "with x as (select 5 into y) select 1",
    ] {
        assert_eq!(p(sql), None, "{sql}");
    }
    // Statements with no number are prepared as they are.
    let (text, values, _) = lifted("select name from t where note = 'x'");
    assert_eq!((text.as_str(), values.len()), ("select name from t where note = 'x'", 0));
    for sql in ["insert into t values (1)", "update t set a = 2 where b = 3", "delete from t where a = 4 returning a"] {
        assert!(p(sql).is_some_and(|q| !q.values.is_empty()), "{sql}");
    }
}

#[test]
fn a_parameter_never_runs_into_a_word() {
    let (text, _, _) = lifted("SELECT-5");
    assert_eq!(text, "SELECT-$1");
    let (text, _, _) = lifted("select(5)from t");
    assert_eq!(text, "select($1)from t");
    for sql in ["select 5", "select a from t where b in(1,2)", "select x from t where a=1and b=2"] {
        if let Some(q) = p(sql) {
            assert!(pg_query::parse(&q.text, 0).is_ok(), "{sql} → {}", q.text);
        }
    }
}

#[test]
fn the_reserved_names_are_refused_in_sql_whatever_their_case() {
    let reserved = |sql: &str| names_reserved(&pg_query::parse(sql, 0).unwrap().protobuf.stmts);
    for sql in [
        "prepare __cordon_1 as select 1",
        "execute __CORDON_1",
        "deallocate \"__cordon_1\"",
        "explain execute __cordon_7(1)",
        "deallocate prepare __Cordon_2",
        "select 1; execute __cordon_3",
    ] {
        assert!(reserved(sql).is_some_and(|m| m.starts_with(RESERVED)), "{sql}");
    }
    for sql in ["prepare mine as select 1", "deallocate all", "execute mine", "select '__cordon_1'"] {
        assert_eq!(reserved(sql), None, "{sql}");
    }
    assert!(
        reserved_name_bytes(b"__cordon_9") && reserved_name_bytes(b"__CORDON_x") && !reserved_name_bytes(b"cordon_1")
    );
}

fn reserved_name_bytes(n: &[u8]) -> bool {
    reserved(n)
}

/// The messages in `out`, by tag.
fn tags(out: &[u8]) -> String {
    let mut tags = String::new();
    let mut at = 0;
    while let Some(tag) = out.get(at) {
        tags.push(*tag as char);
        let len = out.get(at + 1..at + 5).map_or(0, |l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
        at += 1 + len;
    }
    tags
}

#[test]
fn a_session_prepares_on_the_second_sighting_and_binds_after_the_confirmation() {
    let plans = Plans::default();
    let mut u = Upstream::new(true);
    let mut out = BytesMut::new();
    let q = |n: u32| format!("select * from t where a = {n}");
    assert!(u.send(&plans, &q(1), &mut out).is_none(), "first sighting: sent as it came");
    let sent = u.send(&plans, &q(2), &mut out).expect("second: prepared");
    assert!(sent.parse);
    assert_eq!(tags(&out), "PBDES");
    let name = format!("{PREFIX}{}_", *RUN);
    assert!(
        std::str::from_utf8(&out).is_ok_and(|s| s.contains(&name) && s.contains("\0select * from t where a = $1\0"))
    );
    out.clear();
    assert!(u.send(&plans, &q(3), &mut out).is_none(), "Parse in flight: sent as it came");
    u.confirmed(&sent.key);
    let again = u.send(&plans, &q(4), &mut out).expect("confirmed: bound");
    assert!(!again.parse);
    assert_eq!(tags(&out), "BDES");
    // Stale: forgotten (and closed with the next one), then seen anew.
    u.forget(&again.key, true);
    out.clear();
    assert!(u.send(&plans, &q(5), &mut out).is_none());
    let fresh = u.send(&plans, &q(6), &mut out).expect("prepared again");
    assert!(fresh.parse);
    assert_eq!(tags(&out), "CPBDES");
    // DISCARD ALL: nothing is left upstream.
    u.confirmed(&fresh.key);
    u.cleared();
    out.clear();
    assert!(u.send(&plans, &q(7), &mut out).is_none());
    assert!(u.send(&plans, &q(8), &mut out).is_some_and(|s| s.parse));
    // Off: never.
    let mut off = Upstream::new(false);
    for n in 0..3 {
        assert!(off.send(&plans, &q(n), &mut out).is_none());
    }
}

#[test]
fn the_least_recently_used_statement_is_closed_beyond_the_limit() {
    let plans = Plans::default();
    let mut u = Upstream::new(true);
    let mut out = BytesMut::new();
    for i in 0..=MAX_PREPARED {
        let sql = format!("select c{i} from t where a = 1");
        assert!(u.send(&plans, &sql, &mut out).is_none());
        let s = u.send(&plans, &sql, &mut out).expect("prepared");
        u.confirmed(&s.key);
        out.clear();
    }
    // The last one pushed the first (least recently used) out.
    let s = u.send(&plans, "select c0 from t where a = 2", &mut out);
    assert!(s.is_none(), "c0 was closed: seen anew");
    assert_eq!(u.prepared, MAX_PREPARED);
}

#[test]
fn an_unnamed_parse_seen_before_is_named_then_answered() {
    let mut u = Upstream::new(true);
    let text = "select * from t where a = $1";
    let types = [0u8, 1, 0, 0, 0, 23];
    assert_eq!(u.parse_unnamed(text, &types), ParseAs::Unnamed);
    let ParseAs::Named { name, key } = u.parse_unnamed(text, &types) else { panic!("second: named") };
    assert!(name.starts_with(PREFIX));
    assert_eq!(u.parse_unnamed(text, &types), ParseAs::Unnamed, "Parse in flight");
    u.confirmed(&key);
    assert_eq!(u.parse_unnamed(text, &types), ParseAs::Prepared { name: name.clone(), key: key.clone() });
    // Other parameter types: another statement.
    assert_eq!(u.parse_unnamed(text, &[0, 1, 0, 0, 0, 20]), ParseAs::Unnamed);
    // A stale one is forgotten and closed before the next Parse of cordon's.
    u.forget(&key, true);
    assert_eq!(u.parse_unnamed(text, &types), ParseAs::Unnamed);
    assert!(matches!(u.parse_unnamed(text, &types), ParseAs::Named { .. }));
    assert_eq!(u.take_closes(), vec![name]);
    assert!(Upstream::new(false).parse_unnamed(text, &types) == ParseAs::Unnamed);
}

#[test]
fn a_memo_lifts_the_same_numbers_as_the_scanner_or_declines() {
    let plans = Plans::default();
    let cases: &[(&str, &[&str])] = &[
        (
            "select a, b + 1 from t where c = 2 and d in (3, 4.5) order by 2 limit 10",
            &[
                "select a, b + 7 from t where c = 20 and d in (300, 4.75) order by 2 limit 1",
                "select a, b + 7 from t where c = 20 and d in (300, 4e5) order by 2 limit 1",
                "select a, b + 7 from t where c = 2147483647 and d in (3, 0.5) order by 2 limit 10",
            ],
        ),
        ("select a[1:2], b from t where x = -5 /* 6 */", &["select a[10:20], b from t where x = -7 /* 6 */"]),
        ("select * from t where name = 'a1' and n = 1", &["select * from t where name = 'a1' and n = 99"]),
    ];
    for (first, later) in cases {
        let (_, memo) = plans.parameterize_memo(first).unwrap_or_else(|| panic!("{first}"));
        for text in *later {
            assert_eq!(memo.apply(text), plans.parameterize(text), "{text}");
            assert!(memo.apply(text).is_some(), "{text}");
        }
    }
    // Anything else declines: the scanner reads it.
    let (_, memo) = plans.parameterize_memo("select * from t where name = 'a1' and n = 1 and f = 2.5").unwrap();
    for text in [
        "select * from t where name = 'a2' and n = 1 and f = 2.5",
        "select * from t where name = 'a1' and n = 1.0 and f = 2.5",
        "select * from t where name = 'a1' and n = 1 and f = 25",
        "select * from t where name = 'a1' and n = 1 and f = 2.5 ",
        "select * from t where name = 'a1' and n = 1e and f = 2.5",
        "select * from t where name = 'a1' and n = 0x1 and f = 2.5",
        "select * from t where name = 'a1' and n = 1 and f = 2.5.5",
        "select * from t where name = 'a1' and n =  and f = 2.5",
        // Past int4 the scanner's token is FCONST, not ICONST.
        "select * from t where name = 'a1' and n = 2147483648 and f = 2.5",
    ] {
        assert_eq!(memo.apply(text), None, "{text}");
    }
    // A number right after a word starts with its point; one starting with
    // a digit there would join the word.
    let (_, memo) = plans.parameterize_memo("select.5 as x").unwrap_or_else(|| panic!("select.5 is prepared"));
    assert!(memo.apply("select.25 as x").is_some());
    assert_eq!(memo.apply("select5.5 as x"), None);
    // Through a session: the memo serves the second text of a shape.
    let mut u = Upstream::new(true);
    let mut out = BytesMut::new();
    assert!(u.send(&plans, "select * from t where a = 1", &mut out).is_none());
    assert_eq!(u.memos.len(), 1);
    assert!(u.send(&plans, "select * from t where a = 2", &mut out).is_some_and(|s| s.parse));
    assert_eq!(u.memos.len(), 1, "served by the memo");
}

/// Sessions behind a connection pooler share backends: a name two sessions
/// both used could bind the other's text. No name is ever given twice.
#[test]
fn no_two_sessions_get_the_same_name_and_vanishing_statements_end_preparing() {
    let plans = Plans::default();
    let mut names = std::collections::HashSet::new();
    let mut out = BytesMut::new();
    for _ in 0..3 {
        let mut u = Upstream::new(true);
        for n in 0..2 {
            let sql = format!("select * from t where a = 1 and b = {n}");
            let _ = u.send(&plans, &sql, &mut out);
            let s = u.send(&plans, &sql, &mut out).expect("prepared");
            u.confirmed(&s.key);
            assert_eq!(u.parse_unnamed(&sql, &[0, 0]), ParseAs::Unnamed);
            let ParseAs::Named { name, .. } = u.parse_unnamed(&sql, &[0, 0]) else {
                panic!("unnamed: named the second time")
            };
            assert!(names.insert(name.clone()), "{name} given twice");
        }
        for (key, slot) in &u.slots {
            if let Slot::Ready { name, .. } = slot {
                assert!(names.insert(name.clone()), "{name} given twice ({key})");
            }
        }
    }
    // Once: the workload's own DEALLOCATE in a function, perhaps; twice:
    // the server does not keep them.
    let mut u = Upstream::new(true);
    let q = |n: u32| format!("select * from t where a = {n}");
    let _ = u.send(&plans, &q(1), &mut out);
    let s = u.send(&plans, &q(2), &mut out).expect("prepared");
    u.confirmed(&s.key);
    u.forget(&s.key, false);
    u.vanished();
    assert!(u.enabled());
    let _ = u.send(&plans, &q(3), &mut out);
    let s = u.send(&plans, &q(4), &mut out).expect("prepared again");
    u.confirmed(&s.key);
    u.forget(&s.key, false);
    u.vanished();
    assert!(!u.enabled());
    assert!(u.slots.is_empty());
    for n in 5..9 {
        assert!(u.send(&plans, &q(n), &mut out).is_none(), "{n}: not prepared any more");
    }
}

#[test]
fn a_session_of_long_distinct_texts_stays_small() {
    let plans = Plans::default();
    let mut u = Upstream::new(true);
    let mut out = BytesMut::new();
    let text = |i: usize| format!("select * from t where a = 1 and b = '{i}{}'", "x".repeat(10_000));
    // Thirty first sightings of 10 kB texts: past 256 KiB, those seen once
    // are forgotten, so the first one is a first sighting again.
    for i in 0..30 {
        assert!(u.send(&plans, &text(i), &mut out).is_none(), "{i}");
    }
    assert!(u.seen_bytes <= MAX_SEEN_BYTES);
    // Prepared ones are bounded in bytes as well: sixty 10 kB statements
    // keep about 512 KiB prepared, the least recently used closed.
    let mut u2 = Upstream::new(true);
    for i in 100..160 {
        assert!(u2.send(&plans, &text(i), &mut out).is_none());
        let s = u2.send(&plans, &text(i), &mut out).unwrap_or_else(|| panic!("{i} prepared"));
        u2.confirmed(&s.key);
        out.clear();
    }
    assert!(u2.prepared_bytes <= MAX_PREPARED_BYTES, "{}", u2.prepared_bytes);
    assert!(u2.prepared < 60 && u2.prepared >= 40, "{}", u2.prepared);
    assert!(u2.send(&plans, &text(159), &mut out).is_some_and(|s| !s.parse), "the latest stays prepared");
    assert!(u.send(&plans, &text(0), &mut out).is_none(), "forgotten");
    assert!(u.send(&plans, &text(29), &mut out).is_some_and(|s| s.parse), "the latest is remembered");
    // Nor are long texts kept as memos.
    assert!(u.memos.is_empty());
    assert!(u.send(&plans, "select * from t where a = 5", &mut out).is_none());
    assert_eq!(u.memos.len(), 1);
}
