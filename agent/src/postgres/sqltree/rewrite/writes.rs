//! Writes: the target of UPDATE, DELETE, MERGE or INSERT cannot be a
//! subquery, so references to its masked columns become the masking
//! expression; RETURNING * is expanded; values that would store masked data
//! are refused (`labeled_flow`, see rules.rs).

use std::collections::HashMap;

use pg_query::{
    protobuf::{self as pb, RangeVar},
    Node, NodeEnum,
};

use super::{
    lookup_target, masks, parse_select, quote_ident, refuse, str_of, Column, RelKind, Rw, Target, Treatment, R,
};

impl Rw<'_> {
    /// A write target: resolved, accounted for; Some when it has masked
    /// columns to substitute.
    pub(super) fn write_target(&mut self, rv: Option<&RangeVar>, what: &str) -> R<Option<Target>> {
        let Some(rv) = rv else { return Ok(None) };
        if self.is_cte(rv) {
            return Ok(None);
        }
        self.account(rv);
        let Some(rel) = self.resolve(rv)? else { return Ok(None) };
        if rel.kind != RelKind::Table && (rel.protected() || self.inline_view(&rel)?.is_some()) {
            return refuse(
                "mask",
                format!(
                    "{what} through view {}.{}, which reads masked columns, is not supported; write the base table",
                    rel.schema, rel.name
                ),
            );
        }
        if !rel.protected() {
            return Ok(None);
        }
        let alias = rv.alias.as_ref().map_or_else(|| rv.relname.clone(), |a| a.aliasname.clone());
        self.note_read(&alias, &rel);
        Ok(Some(Target { alias, rel }))
    }

    /// WHERE of a write: equality lookups on the target keep the stored
    /// value; everything else sees the masked one.
    pub(super) fn write_where(&mut self, w: &mut Option<Box<Node>>, t: Option<&Target>) -> R<()> {
        let Some(node) = w.as_deref_mut() else { return Ok(()) };
        if let Some(t) = t {
            let rels = vec![(t.alias.clone(), t.rel.clone())];
            let is_and = matches!(node.node.as_ref(), Some(NodeEnum::BoolExpr(b)) if b.boolop == pb::BoolExprType::AndExpr as i32);
            match node.node.as_mut() {
                Some(NodeEnum::BoolExpr(b)) if is_and => {
                    for c in &mut b.args {
                        if lookup_target(c, &rels, true).is_none() {
                            self.substitute(c, t)?;
                        }
                    }
                }
                _ => {
                    if lookup_target(node, &rels, true).is_none() {
                        self.substitute(node, t)?;
                    }
                }
            }
        }
        self.walk_expr(node)
    }

    /// RETURNING of a write: `*` is expanded so that masked columns come
    /// back masked; a whole-row reference is refused.
    pub(super) fn returning(&mut self, r: Option<&mut pb::ReturningClause>, t: Option<&Target>) -> R<()> {
        let Some(r) = r else { return Ok(()) };
        let Some(t) = t else { return self.expr_list(&mut r.exprs, None) };
        for e in &mut r.exprs {
            self.substitute(e, t)?;
        }
        let mut out = Vec::with_capacity(r.exprs.len());
        for item in std::mem::take(&mut r.exprs) {
            let star = match item.node.as_ref() {
                Some(NodeEnum::ResTarget(rt)) => match rt.val.as_deref().and_then(|v| v.node.as_ref()) {
                    Some(NodeEnum::ColumnRef(c)) => {
                        let last_star =
                            matches!(c.fields.last().and_then(|f| f.node.as_ref()), Some(NodeEnum::AStar(_)));
                        let qual = c.fields.first().and_then(str_of);
                        if c.fields.len() == 1 && qual == Some(t.alias.as_str()) {
                            return refuse(
                                "mask",
                                format!(
                                    "RETURNING the whole row of {}, which has masked columns: name the columns",
                                    t.alias
                                ),
                            );
                        }
                        last_star && (c.fields.len() == 1 || qual == Some(t.alias.as_str()))
                    }
                    _ => false,
                },
                _ => false,
            };
            if star {
                for col in &t.rel.columns {
                    let sql = match &col.treatment {
                        Treatment::Clear | Treatment::Pseudonym { .. } => {
                            format!("SELECT {}.{}", quote_ident(&t.alias), quote_ident(&col.name))
                        }
                        Treatment::Mask { strategy, .. } => format!(
                            "SELECT {} AS {}",
                            masks::expression(
                                &format!("{}.{}", quote_ident(&t.alias), quote_ident(&col.name)),
                                &col.type_sql,
                                col.ty,
                                *strategy
                            ),
                            quote_ident(&col.name)
                        ),
                        Treatment::Deny { label } => {
                            return refuse(
                                "label",
                                format!("column {} is labeled {label}; this profile may not read it", col.name),
                            )
                        }
                    };
                    if let Some(NodeEnum::SelectStmt(s)) = parse_select(&sql)?.node {
                        out.extend(s.target_list);
                    }
                }
                self.changed = true;
            } else {
                out.push(item);
            }
        }
        r.exprs = out;
        self.expr_list(&mut r.exprs, None)
    }

    pub(super) fn insert(&mut self, s: &mut pb::InsertStmt) -> R<()> {
        self.push_ctes(s.with_clause.as_mut())?;
        let r = (|| {
            let t = self.write_target(s.relation.as_ref(), "INSERT")?;
            if let Some(src) = s.select_stmt.as_deref_mut() {
                let original = src.clone();
                self.statement(src)?;
                self.flow_check(&original, "INSERT")?;
            }
            if let Some(oc) = s.on_conflict_clause.as_deref_mut() {
                let sets = oc.target_list.clone();
                self.expr_list(&mut oc.target_list, t.as_ref())?;
                self.flow_check_list(&sets, "INSERT … ON CONFLICT DO UPDATE")?;
                self.opt_expr(oc.where_clause.as_deref_mut(), t.as_ref())?;
            }
            self.returning(s.returning_clause.as_mut(), t.as_ref())
        })();
        self.ctes.pop();
        r
    }

    pub(super) fn update(&mut self, s: &mut pb::UpdateStmt) -> R<()> {
        self.push_ctes(s.with_clause.as_mut())?;
        let r = (|| {
            let t = self.write_target(s.relation.as_ref(), "UPDATE")?;
            let mut pushed = HashMap::new();
            let mut wrapped = Vec::new();
            for item in &mut s.from_clause {
                self.read_item(item, &mut pushed, &mut wrapped)?;
            }
            let sets = s.target_list.clone();
            self.expr_list(&mut s.target_list, t.as_ref())?;
            self.flow_check_list(&sets, "UPDATE")?;
            self.write_where(&mut s.where_clause, t.as_ref())?;
            self.returning(s.returning_clause.as_mut(), t.as_ref())
        })();
        self.ctes.pop();
        r
    }

    pub(super) fn delete(&mut self, s: &mut pb::DeleteStmt) -> R<()> {
        self.push_ctes(s.with_clause.as_mut())?;
        let r = (|| {
            let t = self.write_target(s.relation.as_ref(), "DELETE")?;
            let mut pushed = HashMap::new();
            let mut wrapped = Vec::new();
            for item in &mut s.using_clause {
                self.read_item(item, &mut pushed, &mut wrapped)?;
            }
            self.write_where(&mut s.where_clause, t.as_ref())?;
            self.returning(s.returning_clause.as_mut(), t.as_ref())
        })();
        self.ctes.pop();
        r
    }

    pub(super) fn merge(&mut self, s: &mut pb::MergeStmt) -> R<()> {
        self.push_ctes(s.with_clause.as_mut())?;
        let r = (|| {
            let t = self.write_target(s.relation.as_ref(), "MERGE")?;
            let mut pushed = HashMap::new();
            let mut wrapped = Vec::new();
            if let Some(src) = s.source_relation.as_deref_mut() {
                self.read_item(src, &mut pushed, &mut wrapped)?;
            }
            self.opt_expr(s.join_condition.as_deref_mut(), t.as_ref())?;
            for w in &mut s.merge_when_clauses {
                if let Some(NodeEnum::MergeWhenClause(w)) = w.node.as_mut() {
                    let (sets, values) = (w.target_list.clone(), w.values.clone());
                    self.opt_expr(w.condition.as_deref_mut(), t.as_ref())?;
                    self.expr_list(&mut w.target_list, t.as_ref())?;
                    self.expr_list(&mut w.values, t.as_ref())?;
                    self.flow_check_list(&sets, "MERGE")?;
                    self.flow_check_list(&values, "MERGE")?;
                }
            }
            self.returning(s.returning_clause.as_mut(), t.as_ref())
        })();
        self.ctes.pop();
        r
    }

    pub(super) fn copy(&mut self, s: &mut pb::CopyStmt) -> R<()> {
        if let Some(q) = s.query.as_deref_mut() {
            return self.statement(q);
        }
        let Some(rv) = s.relation.clone() else { return Ok(()) };
        if s.is_from {
            self.account(&rv);
            return Ok(());
        }
        let Some(rel) = self.resolve(&rv)? else { return Ok(()) };
        if !rel.protected() {
            return Ok(());
        }
        if let Some(c) = rel.columns.iter().find(|c| matches!(c.treatment, Treatment::Pseudonym { .. })) {
            return refuse(
                "pseudonym",
                format!("COPY would send {}, which is pseudonymized, as stored; use SELECT", c.name),
            );
        }
        // COPY t TO … becomes COPY (SELECT … FROM masked t) TO …
        let cols: Vec<String> = s.attlist.iter().filter_map(str_of).map(quote_ident).collect();
        let cols = if cols.is_empty() { "*".to_string() } else { cols.join(", ") };
        let mut q = parse_select(&format!("SELECT {cols} FROM t"))?;
        let mut pushed = HashMap::new();
        let mut wrapped = Vec::new();
        if let Some(NodeEnum::SelectStmt(sel)) = q.node.as_mut() {
            // The relation as the user named it (COPY reads no child
            // tables: ONLY).
            let only = RangeVar { inh: false, ..rv.clone() };
            sel.from_clause = vec![Node { node: Some(NodeEnum::RangeVar(only)) }];
            for item in &mut sel.from_clause {
                self.read_item(item, &mut pushed, &mut wrapped)?;
            }
        }
        s.query = Some(Box::new(q));
        s.relation = None;
        s.attlist.clear();
        self.changed = true;
        Ok(())
    }
}

/// The masked column of `t` that `c` refers to, if any.
pub(super) fn target_column(c: &pb::ColumnRef, t: &Target) -> Option<Column> {
    let name = c.fields.last().and_then(str_of)?;
    let qualified_ok = match c.fields.len() {
        1 => true,
        2 => c.fields.first().and_then(str_of) == Some(t.alias.as_str()),
        3 => c.fields.get(1).and_then(str_of) == Some(t.alias.as_str()),
        _ => false,
    };
    if !qualified_ok {
        return None;
    }
    t.rel.column(name).filter(|c| c.treatment != Treatment::Clear).cloned()
}
