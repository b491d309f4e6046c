//! PostgreSQL parse trees (libpg_query): a complete walker, the relations a
//! statement names, and the mask-at-read rewrite.
//!
//! Everything here works on the tree PostgreSQL's own grammar produced, never
//! on text patterns: a construct the grammar allows is a construct the walker
//! visits (see `walk_gen.rs`, generated from pg_query's node definitions).

pub mod masks;
pub mod rewrite;
#[allow(unreachable_pub)]
pub mod walk_gen;

use pg_query::{protobuf::RangeVar, Node, NodeEnum};

use crate::pipeline::guard::TableRef;

/// Calls `f` on every node below `n` (pre-order), whatever its type.
pub fn each_node<'a>(n: &'a Node, f: &mut dyn FnMut(&'a NodeEnum)) {
    struct V<'f, 'a>(&'f mut dyn FnMut(&'a NodeEnum));
    impl<'a> walk_gen::Visit<'a> for V<'_, 'a> {
        fn node(&mut self, n: &'a Node) {
            if let Some(e) = n.node.as_ref() {
                (self.0)(e);
                walk_gen::children(e, self);
            }
        }
    }
    walk_gen::Visit::node(&mut V(f), n);
}

/// Every relation a statement names, anywhere (FROM items, DML targets,
/// COPY, subqueries in any expression), as written.
pub fn relations(stmts: &[&Node]) -> Vec<TableRef> {
    struct V(Vec<TableRef>);
    impl<'a> walk_gen::Visit<'a> for V {
        fn node(&mut self, n: &'a Node) {
            if let Some(e) = n.node.as_ref() {
                if let NodeEnum::RangeVar(r) = e {
                    self.range_var(r);
                }
                walk_gen::children(e, self);
            }
        }
        fn range_var(&mut self, r: &'a RangeVar) {
            let t = table_ref(r);
            if !self.0.contains(&t) {
                self.0.push(t);
            }
        }
    }
    let mut v = V(Vec::new());
    for n in stmts {
        walk_gen::Visit::node(&mut v, n);
    }
    v.0
}

/// Every function a statement calls, anywhere, as (schema, name) written
/// (lower-cased as PostgreSQL folds them already). Operators are not
/// included.
pub fn functions(stmt: &Node) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    each_node(stmt, &mut |e| {
        let names = match e {
            NodeEnum::FuncCall(f) => &f.funcname,
            _ => return,
        };
        let parts: Vec<&str> = names.iter().filter_map(str_of).collect();
        let f = match parts.as_slice() {
            [name] => (None, name.to_string()),
            [.., schema, name] => (Some(schema.to_string()), name.to_string()),
            [] => return,
        };
        if !out.contains(&f) {
            out.push(f);
        }
    });
    out
}

pub fn table_ref(r: &RangeVar) -> TableRef {
    TableRef { schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()), name: r.relname.clone() }
}

/// The string value of a `String` node (identifiers in names and column
/// references).
pub fn str_of(n: &Node) -> Option<&str> {
    match n.node.as_ref() {
        Some(NodeEnum::String(s)) => Some(&s.sval),
        _ => None,
    }
}

/// `"name"`, quoted the way PostgreSQL reads it back exactly.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` as a standard-conforming literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
