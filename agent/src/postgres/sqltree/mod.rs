//! PostgreSQL parse trees (libpg_query): a complete walker, the relations a
//! statement names, and the mask-at-read rewrite.
//!
//! Everything here works on the tree PostgreSQL's own grammar produced, never
//! on text patterns: a construct the grammar allows is a construct the walker
//! visits (see `walk_gen.rs`, generated from pg_query's node definitions).

pub mod masks;
pub mod rewrite;
// Generated: kept as `cargo xtask gen-walk` writes it (`--check` compares).
#[allow(unreachable_pub)]
#[rustfmt::skip]
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
            // CALL holds its FuncCall outside a Node.
            NodeEnum::CallStmt(c) => match &c.funccall {
                Some(f) => &f.funcname,
                None => return,
            },
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

/// Every operator name a statement uses (`=`, `@@`, a user's `===`).
pub fn operators(stmt: &Node) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    each_node(stmt, &mut |e| {
        let name = match e {
            NodeEnum::AExpr(a) => &a.name,
            _ => return,
        };
        if let Some(op) = name.last().and_then(str_of) {
            if !out.iter().any(|o| o == op) {
                out.push(op.to_string());
            }
        }
    });
    out
}

/// Whether a write's condition restricts which rows of `target` it touches.
///
/// Bounded means the condition depends on the target row: some part of it
/// compares a column of the target (unqualified, or qualified with its name
/// or alias; inside a subquery only when qualified). A constant (`true`,
/// `1=1`), a parameter alone, a condition on other tables only, a column
/// compared with itself, or an OR with any such branch touches every row or
/// none, and counts as unbounded.
pub fn bounded(cond: Option<&Node>, target: &RangeVar) -> bool {
    let alias = target.alias.as_ref().map_or(target.relname.as_str(), |a| a.aliasname.as_str());
    cond.is_some_and(|c| row_dependent(c, alias))
}

fn row_dependent(n: &Node, alias: &str) -> bool {
    match n.node.as_ref() {
        Some(NodeEnum::BoolExpr(b)) => {
            let mut args = b.args.iter().map(|a| row_dependent(a, alias));
            if b.boolop == pg_query::protobuf::BoolExprType::OrExpr as i32 {
                args.all(|x| x)
            } else {
                args.any(|x| x)
            }
        }
        Some(NodeEnum::AExpr(a)) => {
            let op = a.name.last().and_then(str_of).unwrap_or_default();
            let same = match (
                a.lexpr.as_deref().and_then(|l| l.node.as_ref()),
                a.rexpr.as_deref().and_then(|r| r.node.as_ref()),
            ) {
                (Some(NodeEnum::ColumnRef(l)), Some(NodeEnum::ColumnRef(r))) => l.fields == r.fields,
                _ => false,
            };
            if same && matches!(op, "=" | ">=" | "<=") {
                return false;
            }
            refers_to_target(n, alias)
        }
        // WHERE CURRENT OF a cursor: one row.
        Some(NodeEnum::CurrentOfExpr(_)) => true,
        Some(_) => refers_to_target(n, alias),
        None => false,
    }
}

/// A column of the target: at the top level any column reference not
/// qualified with another name; inside subqueries only ones qualified with
/// the target's name.
fn refers_to_target(n: &Node, alias: &str) -> bool {
    struct V<'a> {
        alias: &'a str,
        depth: usize,
        found: bool,
    }
    impl<'n> walk_gen::Visit<'n> for V<'_> {
        fn node(&mut self, n: &'n Node) {
            if self.found {
                return;
            }
            match n.node.as_ref() {
                Some(NodeEnum::ColumnRef(c)) => {
                    let qual =
                        (c.fields.len() >= 2).then(|| c.fields.get(c.fields.len() - 2).and_then(str_of)).flatten();
                    self.found = match qual {
                        Some(q) => q == self.alias,
                        None => self.depth == 0 && c.fields.len() == 1,
                    };
                }
                Some(NodeEnum::SelectStmt(s)) => {
                    self.depth += 1;
                    walk_gen::s_SelectStmt(s, self);
                    self.depth -= 1;
                }
                Some(e) => walk_gen::children(e, self),
                None => {}
            }
        }
    }
    let mut v = V { alias, depth: 0, found: false };
    walk_gen::Visit::node(&mut v, n);
    v.found
}

/// Where the literals compared with or written to a labeled column start
/// (byte offsets): `col = 'x'`, `col IN ('x', 'y')`, `SET col = 'x'`,
/// `INSERT … (col) VALUES ('x')`. `labeled` says whether a column name is
/// labeled in a relation the statement touches; `table_labeled` whether a
/// table has any labeled column (an INSERT without a column list).
pub fn labeled_literals(
    stmt: &Node,
    labeled: &dyn Fn(&str) -> bool,
    table_labeled: &dyn Fn(&RangeVar) -> bool,
) -> Vec<usize> {
    fn consts(n: &Node, out: &mut Vec<usize>) {
        each_node(n, &mut |e| {
            if let NodeEnum::AConst(c) = e {
                if let Ok(at) = usize::try_from(c.location) {
                    out.push(at);
                }
            }
        });
    }
    let col_named = |n: &Node| match n.node.as_ref() {
        Some(NodeEnum::ColumnRef(c)) => c.fields.last().and_then(str_of).is_some_and(labeled),
        _ => false,
    };
    let mut out = Vec::new();
    each_node(stmt, &mut |e| match e {
        NodeEnum::AExpr(a) => {
            let (Some(l), Some(r)) = (a.lexpr.as_deref(), a.rexpr.as_deref()) else { return };
            if col_named(l) {
                consts(r, &mut out);
            }
            if col_named(r) {
                consts(l, &mut out);
            }
        }
        NodeEnum::UpdateStmt(u) => {
            for t in &u.target_list {
                if let Some(NodeEnum::ResTarget(rt)) = t.node.as_ref() {
                    if labeled(&rt.name) {
                        if let Some(v) = rt.val.as_deref() {
                            consts(v, &mut out);
                        }
                    }
                }
            }
        }
        NodeEnum::InsertStmt(i) => {
            let Some(rel) = i.relation.as_ref() else { return };
            let cols: Vec<&str> = i
                .cols
                .iter()
                .filter_map(|c| match c.node.as_ref() {
                    Some(NodeEnum::ResTarget(rt)) => Some(rt.name.as_str()),
                    _ => None,
                })
                .collect();
            let Some(NodeEnum::SelectStmt(sel)) = i.select_stmt.as_deref().and_then(|s| s.node.as_ref()) else {
                return;
            };
            for row in &sel.values_lists {
                let Some(NodeEnum::List(items)) = row.node.as_ref() else { continue };
                for (k, v) in items.items.iter().enumerate() {
                    let hit = match cols.get(k) {
                        Some(c) => labeled(c),
                        None => cols.is_empty() && table_labeled(rel),
                    };
                    if hit {
                        consts(v, &mut out);
                    }
                }
            }
            if let Some(oc) = i.on_conflict_clause.as_deref() {
                for t in &oc.target_list {
                    if let Some(NodeEnum::ResTarget(rt)) = t.node.as_ref() {
                        if labeled(&rt.name) {
                            if let Some(v) = rt.val.as_deref() {
                                consts(v, &mut out);
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    });
    out.sort_unstable();
    out.dedup();
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
