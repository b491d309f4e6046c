//! Unit tests for `shape.rs`: texts that share a scanner shape get the
//! facts a full parse of each gives; literal-sensitive statements never
//! share one.
use std::sync::Arc;

use super::*;
use crate::postgres::sql::{analyse, Cache};

/// Read `first`, then `second` through the same cache: whether the second
/// was a shape hit, and its facts against a full parse of it.
fn pair(first: &str, second: &str) -> bool {
    let c = Cache::default();
    let a = c.read(first);
    assert!(a.facts.is_ok(), "{first}: {:?}", a.facts);
    let b = c.read(second);
    let full = analyse(second).map(Arc::new);
    assert_eq!(b.facts, full, "{second}: the facts differ from its own parse");
    let ours: Vec<&str> = b.literals.iter().map(|l| l.value.as_str()).collect();
    let scanned: Vec<String> = crate::postgres::sql::literals(second).into_iter().map(|l| l.value).collect();
    assert_eq!(ours, scanned, "{second}: literals");
    b.shape.is_some()
}

#[test]
fn texts_sharing_a_key_get_the_facts_of_their_own_parse() {
    for (a, b) in [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
        ),
        (
            "select * from t where a = 'x' and b in (1, 2, 3) limit 10",
            "select * from t where a = 'it''s' and b in (4, 5, 6) limit 1",
        ),
        ("insert into t (a, b) values (1, 'x'), (2, 'y')", "insert into t (a, b) values (3, 'z'), (4, E'w\\n')"),
        ("update t set a = a + 1, b = 'q' where id = 5", "update t set a = a + 99, b = $$q$$ where id = 6"),
        ("delete from t where id between 1 and 5", "delete from t where id between 10 and 50"),
        ("select * from t where d > '2020-01-01'::date", "select * from t where d > '1999-01-01'::date"),
        ("select * from t where n = -5", "select * from t where n = -7"),
        ("select * from t where ok = true and x is null", "select * from t where ok = true and x is null"),
        ("select * from t where a = 1 -- comment", "select * from t where a = 2 /* other */"),
        ("SELECT * FROM t WHERE a = 1", "select * from t where a = 99999999999999999999"),
        ("select U&'d\\0061t' from t", "select U&'d\\0062t' from t"),
    ] {
        assert!(pair(a, b), "{a} / {b}: expected one shared shape");
    }
}

#[test]
fn literal_sensitive_statements_never_share_a_shape() {
    for (a, b) in [
        ("set search_path = 'a'", "set search_path = 'b'"),
        ("select set_config('x.y', 'a', false)", "select set_config('search_path', 'b', false)"),
        ("copy t to program 'true'", "copy t to program 'rm -rf /'"),
        ("copy t to '/tmp/a'", "copy t to ''"),
        ("select 'now'::regproc", "select 'pg_read_file'::regproc"),
        ("select 'users'::regclass", "select 'pg_authid'::regclass"),
        ("select to_regclass('t')", "select to_regclass('pg_shadow')"),
        ("select * from t where oid = to_regclass('a')", "select * from t where oid = to_regclass('b')"),
        ("do $$ begin null; end $$", "do $$ begin perform pg_sleep(1); end $$"),
        ("select lower('a') from t", "select lower('b') from t"),
        ("select interval '1' day", "select interval '2' day"),
        ("select 'a'::varchar(10)", "select 'b'::varchar(10)"),
        ("select 1; select 2", "select 3; select 4"),
        ("create table x (a int default 1)", "create table x (a int default 2)"),
        ("prepare p as select 1", "prepare p as select 2"),
        ("explain select * from t where a = 1", "explain select * from t where a = 2"),
    ] {
        assert!(!pair(a, b), "{a} / {b}: a literal-sensitive statement shared a shape");
    }
}

#[test]
fn the_key_is_the_scanners_tokens_not_the_text() {
    // Keywords fold; identifiers, operators and quoting do not.
    let k = |s: &str| scan(s).key;
    assert_eq!(k("SELECT a FROM t WHERE b = 1"), k("select a from t where b = 2"));
    assert_ne!(k("select a from t where b = 1"), k("select a from T where b = 1"));
    assert_ne!(k("select a from t where b = 1"), k("select a from \"t\" where b = 1"));
    assert_ne!(k("select a from t where b = 1"), k("select a from t where b < 1"));
    assert_ne!(k("select a from t where b = 1"), k("select a from t where b = '1'"));
    assert_ne!(k("select a from t where b = 1"), k("select a from t where b = 1.5"));
    // A literal holding what looks like SQL is one token.
    assert_eq!(k("select * from t where a = 'x'"), k("select * from t where a = 'x''; drop table t; --'"));
}
