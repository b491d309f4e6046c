//! Equality lookups: `col = constant`, `col IN (constants)`, `col IS
//! [NOT] NULL` on a masked column compare the stored value inside the
//! masked read; everything else compares the mask, and the client is told.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use pg_query::{protobuf as pb, Node, NodeEnum};

use super::{and_all, str_of, walk_gen, Relation, Rw, Treatment, R};
use crate::postgres::sqltree::table_ref;

impl Rw<'_> {
    /// Split off the top-level AND-ed equality lookups on masked columns of
    /// this FROM list's plain relations, by the alias they will go under.
    pub(super) fn take_lookups(
        &mut self,
        from: &[Node],
        where_clause: &mut Option<Box<Node>>,
    ) -> R<HashMap<String, Vec<Node>>> {
        let mut out: HashMap<String, Vec<Node>> = HashMap::new();
        let Some(w) = where_clause.as_deref_mut() else { return Ok(out) };
        // Plain relations, directly in FROM or under inner joins only: a
        // conjunct pushed below an outer join would change the result.
        let mut rels: Vec<(String, Arc<Relation>)> = Vec::new();
        let mut items = 0usize;
        for f in from {
            items += 1;
            self.inner_relations(f, &mut rels)?;
        }
        if rels.is_empty() {
            return Ok(out);
        }
        let single = items == 1 && rels.len() == 1;
        let conjuncts = match w.node.as_mut() {
            Some(NodeEnum::BoolExpr(b)) if b.boolop == pb::BoolExprType::AndExpr as i32 => std::mem::take(&mut b.args),
            _ => vec![w.clone()],
        };
        let mut kept = Vec::new();
        for c in conjuncts {
            match lookup_target(&c, &rels, single) {
                Some((alias, col)) => {
                    let mut inner = c.clone();
                    unqualify(&mut inner, &col);
                    out.entry(alias).or_default().push(inner);
                }
                None => kept.push(c),
            }
        }
        *where_clause = and_all(kept).map(Box::new);
        Ok(out)
    }

    pub(super) fn inner_relations(&self, n: &Node, out: &mut Vec<(String, Arc<Relation>)>) -> R<()> {
        match n.node.as_ref() {
            Some(NodeEnum::RangeVar(rv)) if !self.is_cte(rv) => {
                if let Some(rel) = self.r.relation(&table_ref(rv)).ok().flatten() {
                    let alias = rv.alias.as_ref().map_or_else(|| rv.relname.clone(), |a| a.aliasname.clone());
                    if rv.alias.as_ref().is_none_or(|a| a.colnames.is_empty()) {
                        out.push((alias, rel));
                    }
                }
            }
            Some(NodeEnum::JoinExpr(j)) if j.jointype == pb::JoinType::JoinInner as i32 => {
                if let Some(l) = j.larg.as_deref() {
                    self.inner_relations(l, out)?;
                }
                if let Some(r) = j.rarg.as_deref() {
                    self.inner_relations(r, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A NOTICE when a masked column decides which rows come back or in
    /// which order: the user sees why `WHERE card LIKE '4111%'` finds
    /// nothing.
    pub(super) fn notice_predicates(&mut self, s: &pb::SelectStmt, wrapped: &[(String, Arc<Relation>)]) {
        if wrapped.is_empty() {
            return;
        }
        let mut hits = BTreeSet::new();
        let mut look = |n: &Node| {
            crate::postgres::sqltree::each_node(n, &mut |e| {
                if let NodeEnum::ColumnRef(c) = e {
                    if let Some(col) = c.fields.last().and_then(str_of) {
                        let qual =
                            if c.fields.len() >= 2 { c.fields.get(c.fields.len() - 2).and_then(str_of) } else { None };
                        for (alias, rel) in wrapped {
                            if qual.is_some_and(|q| q != alias) {
                                continue;
                            }
                            if rel.column(col).is_some_and(|c| matches!(c.treatment, Treatment::Mask { .. })) {
                                hits.insert(col.to_string());
                            }
                        }
                    }
                }
            });
        };
        for n in s.where_clause.iter().map(|b| b.as_ref()).chain(s.having_clause.as_deref()) {
            look(n);
        }
        for n in s.group_clause.iter().chain(&s.sort_clause).chain(&s.from_clause).chain(&s.window_clause) {
            look(n);
        }
        if !hits.is_empty() {
            let cols: Vec<&str> = hits.iter().map(String::as_str).collect();
            self.notices.insert(format!(
                "cordon: {} {} masked for this workload; WHERE, JOIN, GROUP BY and ORDER BY compare the masked value (only equality lookups such as col = value, col IN (…) and col IS NULL compare the stored one)",
                cols.join(", "),
                if cols.len() == 1 { "is" } else { "are" }
            ));
        }
    }
}

/// Whether a conjunct is an equality lookup on a masked column of one of
/// `rels`: `col = const`, `col IN (consts)`, `col IS [NOT] NULL`, with the
/// column on either side of `=`. Returns the alias and column.
pub(super) fn lookup_target(n: &Node, rels: &[(String, Arc<Relation>)], single: bool) -> Option<(String, String)> {
    let col_of = |n: &Node| -> Option<(String, String)> {
        let Some(NodeEnum::ColumnRef(c)) = n.node.as_ref() else { return None };
        let name = c.fields.last().and_then(str_of)?;
        let (alias, rel) = match c.fields.len() {
            1 if single => rels.first()?,
            2 => {
                let q = c.fields.first().and_then(str_of)?;
                rels.iter().find(|(a, _)| a == q)?
            }
            _ => return None,
        };
        let col = rel.column(name)?;
        // Only built-in types: their equality operators are leakproof.
        match &col.treatment {
            Treatment::Mask { lookups: true, .. } if col.type_oid < 16384 => Some((alias.clone(), name.to_string())),
            _ => None,
        }
    };
    match n.node.as_ref()? {
        NodeEnum::AExpr(a) => {
            let op: Vec<&str> = a.name.iter().filter_map(str_of).collect();
            let (l, r) = (a.lexpr.as_deref()?, a.rexpr.as_deref()?);
            if a.kind == pb::AExprKind::AexprOp as i32 && (op == ["="] || op == ["pg_catalog", "="]) {
                if let Some(t) = col_of(l) {
                    return is_constant(r).then_some(t);
                }
                if let Some(t) = col_of(r) {
                    return is_constant(l).then_some(t);
                }
                None
            } else if a.kind == pb::AExprKind::AexprIn as i32 && op == ["="] {
                let t = col_of(l)?;
                match r.node.as_ref()? {
                    NodeEnum::List(list) if list.items.iter().all(is_constant) => Some(t),
                    _ => None,
                }
            } else {
                None
            }
        }
        NodeEnum::NullTest(t) => col_of(t.arg.as_deref()?),
        _ => None,
    }
}

/// A literal or a bind parameter, possibly cast.
pub(super) fn is_constant(n: &Node) -> bool {
    match n.node.as_ref() {
        Some(NodeEnum::AConst(_) | NodeEnum::ParamRef(_)) => true,
        Some(NodeEnum::TypeCast(t)) => t.arg.as_deref().is_some_and(is_constant),
        _ => false,
    }
}

/// Inside the masked read the relation has no alias: `c.ssn` becomes `ssn`.
pub(super) fn unqualify(n: &mut Node, col: &str) {
    struct V<'c>(&'c str);
    impl walk_gen::VisitMut for V<'_> {
        fn node(&mut self, n: &mut Node) {
            if let Some(NodeEnum::ColumnRef(c)) = n.node.as_mut() {
                if c.fields.last().and_then(str_of) == Some(self.0) {
                    let last = c.fields.pop();
                    c.fields = last.into_iter().collect();
                }
                return;
            }
            if let Some(e) = n.node.as_mut() {
                walk_gen::children_mut(e, self);
            }
        }
    }
    walk_gen::VisitMut::node(&mut V(col), n);
}
