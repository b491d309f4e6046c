//! Unit tests for the mask-at-read rewrite (`postgres/sqltree/rewrite.rs`),
//! on the real PostgreSQL grammar, with a catalog held in memory. The e2e
//! suite (tests/tests/mask_at_read.rs) runs the attacks against a server.
use super::*;

struct Cat;

fn col(name: &str, t: Treatment) -> Column {
    let (type_sql, ty) = match name {
        "id" => ("integer", ValueType::Int4),
        _ => ("text", ValueType::Text { max_chars: None, fixed: false }),
    };
    Column {
        name: name.into(),
        type_sql: type_sql.into(),
        type_oid: if name == "id" { 23 } else { 25 },
        ty,
        treatment: t,
    }
}

fn mask() -> Treatment {
    Treatment::Mask { strategy: Strategy::Partial, lookups: true }
}

impl Resolve for Cat {
    fn relation(&self, t: &TableRef) -> Result<Option<Arc<Relation>>, String> {
        let rel = |name: &str, kind, columns, definition: Option<&str>| {
            Ok(Some(Arc::new(Relation {
                schema: "public".into(),
                name: name.into(),
                kind,
                columns,
                definition: definition.map(String::from),
            })))
        };
        match (t.schema.as_deref(), t.name.as_str()) {
            (None | Some("public"), "customers") => rel(
                "customers",
                RelKind::Table,
                vec![
                    col("id", Treatment::Clear),
                    col("name", Treatment::Clear),
                    col("ssn", mask()),
                    col("card", mask()),
                ],
                None,
            ),
            (None | Some("public"), "secrets") => rel(
                "secrets",
                RelKind::Table,
                vec![col("id", Treatment::Clear), col("token", Treatment::Deny { label: "restricted".into() })],
                None,
            ),
            (None | Some("public"), "people") => rel(
                "people",
                RelKind::Table,
                vec![col("id", Treatment::Clear), col("email", Treatment::Pseudonym { lookups: true })],
                None,
            ),
            (None | Some("public"), "staff") => rel(
                "staff",
                RelKind::Table,
                vec![col("id", Treatment::Clear), col("email", Treatment::Pseudonym { lookups: false })],
                None,
            ),
            (None | Some("public"), "people_view") => rel(
                "people_view",
                RelKind::View,
                vec![col("id", Treatment::Clear), col("contact", Treatment::Clear)],
                Some("SELECT people.id, people.email AS contact FROM people"),
            ),
            (None | Some("public"), "orders") => {
                rel("orders", RelKind::Table, vec![col("id", Treatment::Clear), col("note", Treatment::Clear)], None)
            }
            (None | Some("public"), "cust_view") => rel(
                "cust_view",
                RelKind::View,
                vec![col("id", Treatment::Clear), col("ssn", Treatment::Clear)],
                Some("SELECT customers.id, customers.ssn FROM customers"),
            ),
            (None | Some("public"), "cust_mv") => rel(
                "cust_mv",
                RelKind::MatView,
                vec![col("id", Treatment::Clear), col("ssn", Treatment::Clear)],
                Some("SELECT customers.id, customers.ssn FROM customers"),
            ),
            (None | Some("pg_catalog"), "pg_stats") => Ok(Some(Arc::new(Relation {
                schema: "pg_catalog".into(),
                name: "pg_stats".into(),
                kind: RelKind::View,
                columns: vec![],
                definition: Some("SELECT 1".into()),
            }))),
            (None | Some("public"), "unknown_to_cordon") => Err("not in the catalog cache".into()),
            _ => Ok(None),
        }
    }
    fn protects_anything(&self) -> bool {
        true
    }
}

fn rw(sql: &str) -> Rewritten {
    rewrite(sql, &Cat).unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

fn text(sql: &str) -> String {
    rw(sql).text.unwrap_or_else(|| panic!("{sql}: not rewritten"))
}

fn refused(sql: &str) -> Refusal {
    match rewrite(sql, &Cat) {
        Err(e) => e,
        Ok(r) => panic!("{sql}: not refused, became {:?}", r.text),
    }
}

/// Every reference to customers in the rewritten text sits in a masked read.
fn masked_everywhere(out: &str) {
    let n_refs = out.matches("public.customers").count();
    let n_masked = out.matches("FROM ONLY public.customers").count() + out.matches("FROM public.customers").count();
    assert!(n_refs > 0 && n_refs == n_masked, "{out}");
    assert!(out.contains("regexp_replace"), "{out}");
}

#[test]
fn untouched_statements_keep_their_text() {
    for sql in ["select 1", "select * from orders where id = 1", "begin", "insert into orders values (1, 'x')"] {
        assert_eq!(rw(sql).text, None, "{sql}");
    }
}

#[test]
fn reads_are_masked_wherever_the_table_appears() {
    for sql in [
        "select ssn from customers",
        "select reverse(ssn) from customers c",
        "select * from customers, orders",
        "select (select ssn from customers limit 1)",
        "select array[(select card from customers limit 1)]",
        "with x as (select * from customers) select * from x",
        "with recursive r(n) as (select 1 union all select n+1 from r where n < 3) select ssn from customers, r",
        "select ssn from orders join customers on true",
        "select ssn from orders left join lateral (select ssn from customers) s on true",
        "select 1 union select length(ssn) from customers",
        "select * from orders where exists (select 1 from customers where ssn like '1%')",
        "select xmlelement(name x, (select ssn from customers limit 1))",
        "select jsonb_build_object('a', (select card from customers limit 1))",
        "select row_to_json(c) from customers c",
        "copy customers to stdout",
        "copy (select ssn from customers) to stdout",
        "declare c cursor for select ssn from customers",
        "prepare p as select ssn from customers where id = $1",
        "explain analyze select ssn from customers",
        "select ssn from cust_view",
        "select * from public.customers as c(a, b, s)",
        "select case when ssn > '1' then 1 end from customers",
        "select 1 from orders o where o.id in (select id from customers order by ssn)",
        "select * from xmltable('/r' passing (select ssn::xml from customers limit 1) columns a text)",
        "call some_proc((select ssn from customers limit 1))",
    ] {
        masked_everywhere(&text(sql));
    }
}

#[test]
fn a_cte_named_like_a_table_is_not_the_table_and_a_later_one_is() {
    // The CTE shadows the table: nothing to mask.
    assert_eq!(rw("with customers as (select 1 as ssn) select ssn from customers").text, None);
    // Inside a non-recursive CTE body, its own name is still the table.
    masked_everywhere(&text("with customers as (select ssn from customers) select ssn from customers"));
}

#[test]
fn equality_lookups_compare_the_stored_value_and_nothing_else_does() {
    let out = text("select id from customers where ssn = '123-45-6789' and id > 0");
    assert!(out.contains("WHERE ssn = '123-45-6789'"), "{out}");
    assert!(out.contains("WHERE id > 0"), "{out}");
    let out = text("select id from customers c where c.card in ('4111', $1)");
    assert!(out.contains("WHERE card IN ('4111', $1)"), "{out}");
    let r = rw("select id from customers where ssn like '1%'");
    assert!(r
        .text
        .as_deref()
        .is_some_and(|t| t.contains("WHERE ssn LIKE '1%'") && !t.contains("ONLY public.customers WHERE")));
    assert_eq!(r.notices.len(), 1, "{r:?}");
    // An OR is not an equality lookup.
    let out = text("select id from customers where ssn = 'x' or true");
    assert!(!out.contains("ONLY public.customers WHERE"), "{out}");
    // Nor is a comparison with another column.
    let out = text("select id from customers where ssn = card");
    assert!(!out.contains("ONLY public.customers WHERE"), "{out}");
    // Below an outer join, nothing moves.
    let out = text("select 1 from orders left join customers on true where customers.ssn = 'x'");
    assert!(!out.contains("ONLY public.customers WHERE"), "{out}");
}

#[test]
fn writes_see_masked_values_and_cannot_store_them() {
    let out = text("update customers set name = 'x' where ssn like '1%'");
    assert!(out.contains("regexp_replace"), "{out}");
    assert_eq!(rw("update customers set name = 'x' where ssn = '123-45-6789'").text, None, "an equality lookup");
    let out = text("delete from customers where 1/(ascii(substr(ssn,1,1))-49) = 1");
    assert!(out.contains("regexp_replace"), "{out}");
    let out = text("delete from customers where id = 1 returning *");
    assert!(out.contains("regexp_replace") && out.contains("AS ssn"), "{out}");
    for sql in [
        "update customers set name = ssn",
        "update orders set note = (select ssn from customers limit 1)",
        "insert into orders select id, ssn from customers",
        "insert into orders select * from customers",
        "insert into orders (id, note) values (1, (select card from customers limit 1))",
        "create table t2 as select ssn from customers",
        "select ssn into t3 from customers",
        "merge into orders o using customers c on o.id = c.id when not matched then insert values (c.id, c.ssn)",
    ] {
        assert_eq!(refused(sql).rule, "labeled_flow", "{sql}");
    }
    assert_eq!(refused("update customers set name = 'x' returning customers").rule, "mask");
    // A write that stores nothing masked is fine.
    masked_everywhere(&text("insert into orders select id, name from customers where ssn = '1'"));
}

#[test]
fn denied_columns_refuse_when_referenced_in_any_way() {
    assert_eq!(rw("select id from secrets").text.map(|t| t.contains("NULL::text AS token")), Some(true));
    for sql in [
        "select token from secrets",
        "select * from secrets",
        "select s.* from secrets s",
        "select row_to_json(s) from secrets s",
        "select id from secrets where token = 'x'",
        "select id from secrets order by token",
    ] {
        assert_eq!(refused(sql).rule, "label", "{sql}");
    }
}

#[test]
fn what_cordon_cannot_mask_is_refused() {
    assert_eq!(refused("select * from pg_stats").rule, "restricted_read");
    // A materialized view's ssn was computed from the masked customers.ssn.
    let out = text("select * from cust_mv");
    assert!(out.contains("AS ssn") && out.contains("FROM public.cust_mv"), "{out}");
    assert_eq!(refused("select * from customers tablesample system (50)").rule, "mask");
    assert_eq!(refused("select * from unknown_to_cordon").rule, "catalog");
    assert_eq!(refused("update cust_view set id = 1").rule, "mask");
}

#[test]
fn multi_statement_text_keeps_untouched_statements_verbatim() {
    let out = text("select 1; select ssn from customers; select  2");
    assert!(out.starts_with("select 1;"), "{out}");
    assert!(out.ends_with("; select  2"), "{out}");
    masked_everywhere(&out);
}

#[test]
fn the_walker_reaches_every_node_serde_sees() {
    // The generated walker against the serde view of the same tree: every
    // ColumnRef and RangeVar the serializer finds, the walker visits.
    let sql = "with w as (select 1) select array[(select a from t1)], xmlelement(name x, (select b from t2)), \
               (select c from t3) collate \"C\", json_object('k': (select d from t4)), \
               row((select e from t5)), f(variadic array[(select g from t6)]), \
               h() over (partition by (select i from t7)) from w, lateral (select * from t8) s \
               where j in (select k from t9) and l is distinct from (select m from t10) \
               group by grouping sets ((n), ((select o from t11))) order by (select p from t12) \
               for update of s";
    let parsed = pg_query::parse(sql, 0).unwrap_or_else(|e| panic!("{e}"));
    let json = serde_json::to_string(&parsed.protobuf).unwrap_or_default();
    let stmts: Vec<&Node> = parsed.protobuf.stmts.iter().filter_map(|s| s.stmt.as_deref()).collect();
    let mut refs = 0;
    for s in &stmts {
        crate::postgres::sqltree::each_node(s, &mut |e| {
            if matches!(e, NodeEnum::ColumnRef(_)) {
                refs += 1;
            }
        });
    }
    assert_eq!(refs, json.matches("\"ColumnRef\"").count());
    let rels = crate::postgres::sqltree::relations(&stmts);
    assert_eq!(rels.len(), 14, "{rels:?}");
}

#[test]
fn pseudonymized_columns_may_only_be_selected_compared_grouped_or_null_tested() {
    for sql in [
        "select email from people",
        "select * from people",
        "select p.* from people p",
        "select p.email, count(*) from people p group by p.email",
        "select a.id from people a join people b on a.email = b.email",
        "select id from people where email = 'x@example.com' or email is null",
        "select contact from people_view where contact = 'x'",
        "update people set id = id where email = 'x'",
    ] {
        assert!(rewrite(sql, &Cat).is_ok(), "{sql}: {:?}", rewrite(sql, &Cat));
    }
    for sql in [
        "select lower(email) from people",
        "select id from people where email like 'a%'",
        "select id from people order by email",
        "select p from people p",
        "select row_to_json(p) from people p",
        "select email from people union select 'x'",
        "select x from (select email as x from people) s",
        "with w as (select email from people) select * from w",
        "select (select email from people limit 1)",
        "copy people to stdout",
        "select contact from people_view where contact like 'a%'",
        "select length(contact) from people_view",
        "update people set id = length(email)",
        "insert into orders select id, email from people",
    ] {
        let e = refused(sql);
        assert!(e.rule == "pseudonym" || e.rule == "labeled_flow", "{sql}: {e:?}");
    }
}

#[test]
fn deep_nesting_is_refused_not_a_crash() {
    // A tokio worker's stack is 2 MiB: a statement nested deeper than the
    // parser or the walkers can follow must be an error, never an overflow.
    for sql in [
        format!("select {}1 from customers", "1+".repeat(200_000)),
        format!("select {}ssn{} from customers", "(".repeat(50_000), ")".repeat(50_000)),
        format!("select {}1{}", "(select ".repeat(20_000), ")".repeat(20_000)),
        format!("select 1 from customers where {}true", "not ".repeat(100_000)),
    ] {
        let h = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let _ = rewrite(&sql, &Cat);
                let _ = crate::postgres::sql::analyse(&sql);
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(h.join().is_ok());
    }
}

/// The template of `a`'s shape filled with `b`'s constants must be the
/// direct rewrite of `b`, tree for tree.
fn templated(a: &str, b: &str) -> Option<Option<String>> {
    let pa = pg_query::parse(a, 0).unwrap_or_else(|e| panic!("{a}: {e}"));
    let pb = pg_query::parse(b, 0).unwrap_or_else(|e| panic!("{b}: {e}"));
    let sa = template::shape(&pa.protobuf.stmts[0].stmt.clone().map(|b| *b).unwrap_or_default());
    let sb = template::shape(&pb.protobuf.stmts[0].stmt.clone().map(|b| *b).unwrap_or_default());
    assert_eq!(sa.key, sb.key, "{a} / {b}: one shape");
    let stmt = pa.protobuf.stmts[0].stmt.clone().map(|b| *b).unwrap_or_default();
    let t = template::build(&stmt, pa.protobuf.version, &sa, &Cat).unwrap_or_else(|e| panic!("{a}: {e:?}"))?;
    assert!(t.fits(&sb));
    let got = t.apply(&sb).unwrap_or_else(|| panic!("{b}: apply"));
    let want = rewrite(b, &Cat).unwrap_or_else(|e| panic!("{b}: {e:?}"));
    let tree =
        |s: &str| pg_query::parse(s, 0).ok().and_then(|p| p.protobuf.stmts[0].stmt.as_deref().map(without_positions));
    match (&got.text, &want.text) {
        (Some(g), Some(w)) => assert_eq!(tree(g), tree(w), "{b}:\n{g}\n{w}"),
        (g, w) => assert_eq!(g, w, "{b}"),
    }
    assert_eq!(got.notices, want.notices);
    // Statements of one scanner shape: filling the template with b's own
    // literal tokens gives b's rewrite too.
    let (scan_a, scan_b) = (crate::postgres::shape::scan(a), crate::postgres::shape::scan(b));
    let facts = std::sync::Arc::new(crate::postgres::sql::analyse_parsed(&pa.protobuf));
    if scan_a.key == scan_b.key {
        if let Some(shaped) = crate::postgres::shape::shaped(&pa.protobuf, &scan_a, &facts) {
            let filled = t.fill_tokens(&shaped.fills, b, &scan_b.literals).unwrap_or_else(|| panic!("{b}: fill"));
            match (&filled.text, &want.text) {
                (Some(g), Some(w)) => assert_eq!(tree(g), tree(w), "{b} (tokens):\n{g}\n{w}"),
                (g, w) => assert_eq!(g, w, "{b} (tokens)"),
            }
        }
    }
    Some(got.text)
}

#[test]
fn statements_that_differ_only_in_constants_share_a_correct_template() {
    for (a, b) in [
        ("select ssn from customers where id = 1", "select ssn from customers where id = 22"),
        (
            "select ssn from customers where ssn = '1' and id > 0",
            "select ssn from customers where ssn = 'it''s' and id > -5",
        ),
        ("select id from customers where card in ('a', 'b')", "select id from customers where card in ('c', 'd')"),
        ("select id, 1.5, true, null from customers limit 3", "select id, -2.25, false, null from customers limit 10"),
        ("select card from customers order by 1 limit 5", "select card from customers order by 1 limit 7"),
        ("select id::varchar(10), B'0101' from customers", "select id::varchar(10), B'1111' from customers"),
        ("select date '2020-01-01', ssn from customers", "select date '1999-12-31', ssn from customers"),
        ("select E'a\\nb' || ssn from customers", "select E'x\\ty' || ssn from customers"),
        (
            "update customers set name = 'a' where id = 1 returning *",
            "update customers set name = 'b' where id = 2 returning *",
        ),
        ("select 1", "select 2"),
        ("select $1::int + 1 from customers", "select $1::int + 7 from customers"),
    ] {
        assert!(templated(a, b).is_some(), "{a}: a template was built");
    }
    // The interval's fields are constants in a position that is not a plain
    // value: the template is either exact or not kept.
    let _ = templated("select interval '1' day, ssn from customers", "select interval '2' day, ssn from customers");
    // Type modifiers are part of the shape.
    let pa = pg_query::parse("select id::varchar(10) from customers", 0).unwrap_or_else(|e| panic!("{e}"));
    let pb = pg_query::parse("select id::varchar(20) from customers", 0).unwrap_or_else(|e| panic!("{e}"));
    let (sa, sb) = (
        template::shape(&pa.protobuf.stmts[0].stmt.clone().map(|b| *b).unwrap_or_default()),
        template::shape(&pb.protobuf.stmts[0].stmt.clone().map(|b| *b).unwrap_or_default()),
    );
    assert_ne!(sa.key, sb.key);
}

#[test]
fn joins_on_a_pseudonymized_column_are_lookups() {
    // With lookups on (people), a join on the stored value is allowed.
    assert!(rewrite("select a.id from people a join people b using (email)", &Cat).is_ok());
    // With lookups off (staff), every form of join on it is refused.
    for sql in [
        "select a.id from staff a join staff b on a.email = b.email",
        "select a.id from staff a join staff b using (email)",
        "select a.id from staff a natural join staff b",
        "select id from staff where email = 'x'",
    ] {
        assert_eq!(refused(sql).rule, "pseudonym", "{sql}");
    }
}
