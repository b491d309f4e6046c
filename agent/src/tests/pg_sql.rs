//! Unit tests for `postgres/sql.rs`, on the real PostgreSQL grammar.
use super::*;

fn kinds(sql: &str) -> Vec<StmtKind> {
    analyse(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).into_iter().map(|f| f.kind).collect()
}

#[test]
fn statement_kinds() {
    assert_eq!(kinds("select 1"), [StmtKind::Read]);
    assert!(matches!(&kinds("drop table t")[0], StmtKind::Ddl { command } if command == "DROP TABLE"));
    assert!(matches!(&kinds("truncate t")[0], StmtKind::Ddl { command } if command == "TRUNCATE"));
    assert!(matches!(&kinds("alter table t add column x int")[0], StmtKind::Ddl { .. }));
    assert_eq!(kinds("begin; select 1; commit"), [StmtKind::Control, StmtKind::Read, StmtKind::Control]);
    assert_eq!(kinds("copy t to stdout"), [StmtKind::CopyOut { to: CopyTarget::Client }]);
    assert_eq!(kinds("copy t to program 'gzip > /tmp/x'"), [StmtKind::CopyOut { to: CopyTarget::Program }]);
    assert_eq!(kinds("copy (select * from t) to '/tmp/x'"), [StmtKind::CopyOut { to: CopyTarget::File }]);
    assert_eq!(kinds("copy t from stdin"), [StmtKind::CopyIn { from: CopyTarget::Client }]);
    assert_eq!(kinds("do $$ begin drop table t; end $$"), [StmtKind::Do]);
    assert!(matches!(&kinds("explain analyze delete from t")[0], StmtKind::Write));
    assert!(matches!(&kinds("select * into t2 from t")[0], StmtKind::Ddl { .. }));
    assert!(matches!(&kinds("set standard_conforming_strings = off")[0], StmtKind::Ddl { .. }));
    assert!(matches!(&kinds("set search_path = hr")[0], StmtKind::Ddl { .. }), "names would resolve elsewhere");
    assert!(matches!(&kinds("set client_encoding = 'SJIS'")[0], StmtKind::Ddl { .. }));
    assert_eq!(kinds("set statement_timeout = 1000"), [StmtKind::Control]);
}

#[test]
fn a_hidden_drop_is_found_and_a_mentioned_one_is_not() {
    let k = kinds("select 1; drop table users");
    assert!(matches!(&k[1], StmtKind::Ddl { .. }), "{k:?}");
    assert_eq!(kinds("select 'drop table users' /* drop table x */ -- drop"), [StmtKind::Read]);
}

#[test]
fn writes_reads_functions() {
    let f = analyse("delete from orders").unwrap();
    assert!(f[0].unbounded_write);
    assert!(!analyse("delete from orders where id = 1").unwrap()[0].unbounded_write);
    // A DELETE hidden in a CTE is still an unbounded write.
    let cte = &analyse("with d as (delete from orders returning *) select * from d").unwrap()[0];
    assert!(cte.unbounded_write && cte.kind == StmtKind::Write, "{cte:?}");
    let cte = &analyse("with u as (update customers set email = 'x' where id = 1 returning id) select 1").unwrap()[0];
    assert_eq!(cte.writes[0].1.as_deref(), Some(&["email".to_string()][..]));
    assert!(analyse("update t set a = 1").unwrap()[0].unbounded_write);
    let u = &analyse("update public.customers set email = 'x' where id = 1").unwrap()[0];
    assert_eq!(u.writes[0].0.name, "customers");
    assert_eq!(u.writes[0].1.as_deref(), Some(&["email".to_string()][..]));
    let d = &analyse("delete from customers where id = 1").unwrap()[0];
    assert_eq!(d.writes[0].1, None, "a DELETE writes every column");
    let oc = &analyse("insert into customers (id) values (1) on conflict (id) do update set ssn = 'x'").unwrap()[0];
    assert!(oc.writes[0].1.as_ref().is_some_and(|c| c.contains(&"ssn".to_string())), "{oc:?}");
    let i = &analyse("insert into customers values (1)").unwrap()[0];
    assert_eq!(i.writes[0].1, None, "no column list: every column");
    let s =
        &analyse("select pg_catalog.pg_read_file('/etc/passwd'), name from hr.salaries s join x on true").unwrap()[0];
    assert!(s.functions.contains(&"pg_read_file".to_string()));
    assert!(s.reads.iter().any(|t| t.name == "salaries" && t.schema.as_deref() == Some("hr")));
    assert!(analyse("copy customers to stdout").unwrap()[0].reads.iter().any(|t| t.name == "customers"));
}

#[test]
fn parse_errors_are_errors() {
    assert!(analyse("selec 1").is_err());
    assert!(analyse("select 'unterminated").is_err());
    assert!(analyse("select 1\0").is_err());
    assert_eq!(analyse("-- nothing").unwrap().len(), 1);
    let c = Cache::default();
    assert!(c.read("selec 1").facts.is_err());
    assert!(c.read("select 1").facts.is_ok());
    // Same shape, other literal: served from the cache, same facts.
    assert_eq!(c.read("select 2").facts.map(|f| f.len()), Ok(1));
    assert!(c.read("select 'x'; drop table t").facts.is_ok_and(|f| f.len() == 2));
}

#[test]
fn always_true_conditions_are_unbounded_and_row_conditions_are_not() {
    let unbounded = |sql: &str| analyse(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))[0].unbounded_write;
    for sql in [
        "delete from orders where true",
        "delete from orders where 1 = 1",
        "delete from orders where id = 1 or true",
        "delete from orders where 'a' = 'a'",
        "delete from orders where not false",
        "delete from orders where id = id",
        "delete from orders o where o.total >= o.total",
        "delete from orders where now() > '2000-01-01'",
        "delete from orders where $1",
        "delete from orders where exists (select 1 from customers where customers.id = 1)",
        "delete from orders using customers where customers.id = 1",
        "update orders set total = 0 where random() >= 0",
        "update orders set total = 0 where (select true)",
        "merge into orders o using customers c on true when matched then delete",
        "merge into orders o using customers c on c.id = 1 when matched then delete",
    ] {
        assert!(unbounded(sql), "{sql}");
    }
    for sql in [
        "delete from orders where id = 1",
        "delete from orders o where o.id = $1 and true",
        "delete from orders where id in (select id from customers)",
        "delete from orders o where exists (select 1 from customers c where c.id = o.id)",
        "update orders set total = 0 where current of c",
        "merge into orders o using customers c on o.id = c.id when matched then delete",
    ] {
        assert!(!unbounded(sql), "{sql}");
    }
    // MERGE is a write with every action.
    let m = &analyse("merge into orders o using customers c on o.id = c.id when matched then delete").unwrap()[0];
    assert_eq!(m.kind, StmtKind::Write);
    assert_eq!(m.writes[0].0.name, "orders");
}

#[test]
fn refusals_name_commands_in_sql_words() {
    let ddl = |sql: &str| match &analyse(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))[0].kind {
        StmtKind::Ddl { command } => command.clone(),
        k => panic!("{sql}: {k:?}"),
    };
    assert_eq!(ddl("vacuum orders"), "VACUUM");
    assert_eq!(ddl("analyze orders"), "ANALYZE");
    assert_eq!(ddl("alter system set work_mem = '1MB'"), "ALTER SYSTEM");
    assert_eq!(ddl("create extension pgcrypto"), "CREATE EXTENSION");
    assert_eq!(ddl("alter default privileges grant select on tables to public"), "ALTER DEFAULT PRIVILEGES");
    assert_eq!(ddl("create role r"), "CREATE ROLE");
}

#[test]
fn every_call_and_operator_is_found_wherever_it_hides() {
    let f = &analyse("select array[(select public.leak(x) from t)], 1 === 2, (select pg_read_file('x'))").unwrap()[0];
    assert!(f.calls.contains(&(Some("public".into()), "leak".into())), "{f:?}");
    assert!(f.functions.contains(&"pg_read_file".to_string()), "{f:?}");
    assert!(f.operators.contains(&"===".to_string()), "{f:?}");
    let c = &analyse("call wipe()").unwrap()[0];
    assert!(c.calls.contains(&(None, "wipe".into())), "{c:?}");
}

/// What the session memo gives must be what the cache reads: same analysis,
/// same shape, literals at the same places with the same values.
fn same_reading(a: &Reading, b: &Reading) -> bool {
    let facts = match (&a.facts, &b.facts) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    let shape = a.shape.as_ref().map(|(k, _)| k.clone()) == b.shape.as_ref().map(|(k, _)| k.clone());
    facts && shape && a.literals == b.literals
}

#[test]
fn the_read_memo_reads_as_the_scanner_does_or_declines() {
    let cache = Cache::default();
    let shapes: &[(&str, &[&str])] = &[
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 2147483647;",
            ],
        ),
        (
            "select name from customers where city = 'Paris 75' and id in (1, 22, 333) and score > -1.5 limit 10",
            &["select name from customers where city = 'Paris 75' and id in (4444, 5, 66) and score > -17.25 limit 1"],
        ),
        (
            "update accounts set balance = balance + 10 where id = 3 and note = E'it''s 5'",
            &["update accounts set balance = balance + 999 where id = 12345 and note = E'it''s 5'"],
        ),
    ];
    for (first, later) in shapes {
        let mut memo = ReadMemo::default();
        let r = memo.read(first, &cache);
        assert!(r.shape.is_some(), "{first} has a shared shape");
        assert_eq!(memo.entries.len(), 1, "{first} is kept");
        for text in *later {
            let got =
                memo.entries.first().and_then(|m| m.apply(text)).unwrap_or_else(|| panic!("memo declined {text}"));
            let want = cache.read(text);
            assert!(same_reading(&got, &want), "{text}: {:?} vs {:?}", got.literals, want.literals);
            assert!(same_reading(&memo.read(text, &cache), &want), "{text}");
        }
    }
    // Anything else declines, and the scanner reads it.
    let mut memo = ReadMemo::default();
    memo.read("select * from t where name = 'a1' and n = 1 and f = 2.5", &cache);
    for text in [
        "select * from t where name = 'a2' and n = 1 and f = 2.5",
        "select * from t where name = 'a1' and n = 1.0 and f = 2.5",
        "select * from t where name = 'a1' and n = 2147483648 and f = 2.5",
        "select * from t where name = 'a1' and n = 1 and f = 25",
        "select * from t where name = 'a1' and n = 1 and f = 2.5 ",
        "select * from t where name = 'a1' and n = 1e and f = 2.5",
        "select * from t where name = 'a1' and n = 0x1 and f = 2.5",
        "select * from t where name = 'a1' and n = 1 and f = 2.5.5",
        "select * from t where name = 'a1' and n = 1 and f = 2.5; select pg_sleep(9)",
        "select * from t where name = 'a1' and n = 1 and f = 2.5 -- 3",
    ] {
        assert!(memo.entries.first().and_then(|m| m.apply(text)).is_none(), "{text}");
    }
    // A number right after a word starts with its point: `select5.5` would
    // be the name `select5`, then `.5`.
    let mut memo = ReadMemo::default();
    memo.read("select.5 as x from t", &cache);
    assert_eq!(memo.entries.len(), 1, "select.5 is kept");
    assert!(memo.entries.first().and_then(|m| m.apply("select.75 as x from t")).is_some());
    assert!(memo.entries.first().and_then(|m| m.apply("select5.5 as x from t")).is_none());
    // A statement whose constants may change what it does is never kept.
    for text in ["SELECT set_config('search_path', 'x', false)", "SET work_mem = 64", "COPY t TO PROGRAM 'id'"] {
        let mut memo = ReadMemo::default();
        memo.read(text, &cache);
        assert!(memo.entries.is_empty(), "{text} is not kept");
    }
}
