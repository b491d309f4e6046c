//! Reads: SELECT bodies and their FROM items. A relation with masked or
//! denied columns becomes a subquery under the same alias that projects
//! each column through its mask (equality lookups stay inside it, on the
//! stored value); views are inlined from their definitions; inheritance
//! children and partitions are covered by the parent's treatment.

use super::*;

impl Rw<'_> {
    pub(super) fn select(&mut self, s: &mut pb::SelectStmt) -> R<()> {
        self.push_ctes(s.with_clause.as_mut())?;
        let r = self.select_body(s);
        self.ctes.pop();
        r
    }

    pub(super) fn select_body(&mut self, s: &mut pb::SelectStmt) -> R<()> {
        if let Some(l) = s.larg.as_deref_mut() {
            self.select(l)?;
        }
        if let Some(rg) = s.rarg.as_deref_mut() {
            self.select(rg)?;
        }
        // Equality lookups on masked columns move into the masked read.
        let mut pushed = self.take_lookups(&s.from_clause, &mut s.where_clause)?;
        let before = (!s.from_clause.is_empty()).then(|| s.clone());
        let mut wrapped = Vec::new();
        for item in &mut s.from_clause {
            self.read_item(item, &mut pushed, &mut wrapped)?;
        }
        if let Some(before) = before {
            self.notice_predicates(&before, &wrapped);
        }
        for l in &s.locking_clause {
            // FOR UPDATE OF names aliases, not tables to read.
            super::super::each_node(l, &mut |e| {
                if let NodeEnum::RangeVar(rv) = e {
                    self.account(rv);
                }
            });
        }
        let subst = None;
        for l in &mut s.target_list {
            self.expr(l, subst)?;
        }
        self.opt_expr(s.where_clause.as_deref_mut(), subst)?;
        self.expr_list(&mut s.group_clause, subst)?;
        self.opt_expr(s.having_clause.as_deref_mut(), subst)?;
        self.expr_list(&mut s.window_clause, subst)?;
        self.expr_list(&mut s.values_lists, subst)?;
        self.expr_list(&mut s.sort_clause, subst)?;
        self.expr_list(&mut s.distinct_clause, subst)?;
        self.opt_expr(s.limit_offset.as_deref_mut(), subst)?;
        self.opt_expr(s.limit_count.as_deref_mut(), subst)?;
        Ok(())
    }

    /// A FROM item: a relation (masked, inlined, or left), a join, a
    /// subquery, a function.
    pub(super) fn read_item(
        &mut self,
        n: &mut Node,
        pushed: &mut HashMap<String, Vec<Node>>,
        wrapped: &mut Vec<(String, Arc<Relation>)>,
    ) -> R<()> {
        match n.node.as_mut() {
            Some(NodeEnum::RangeVar(rv)) => {
                let rv = &rv.clone();
                if self.is_cte(rv) {
                    self.account(rv);
                    return Ok(());
                }
                let Some(rel) = self.resolve(rv)? else { return Ok(()) };
                let alias = rv.alias.as_ref().map_or_else(|| rv.relname.clone(), |a| a.aliasname.clone());
                let replacement = match rel.kind {
                    RelKind::Table => {
                        if !rel.protected() {
                            return Ok(());
                        }
                        self.account(rv);
                        self.masked_read(&rel, rv.inh, pushed.remove(&alias).unwrap_or_default(), None)?
                    }
                    RelKind::View => {
                        let inlined = self.inline_view(&rel)?;
                        if inlined.is_none() && !rel.protected() {
                            return Ok(());
                        }
                        let inner = inlined.map(|sub| subselect(sub, rv_alias(rv)));
                        if rel.protected() {
                            self.masked_read(&rel, rv.inh, pushed.remove(&alias).unwrap_or_default(), inner)?
                        } else {
                            match inner {
                                Some(i) => i,
                                None => return Ok(()),
                            }
                        }
                    }
                    RelKind::MatView => {
                        // A materialized view stores what its definition
                        // computed from the raw values: its columns inherit
                        // the labels of what they were computed from.
                        let rel = match self.inline_view(&rel)? {
                            Some(_) => Arc::new(self.inherited(&rel)?),
                            None => rel.clone(),
                        };
                        if !rel.protected() {
                            return Ok(());
                        }
                        let r = self.masked_read(&rel, rv.inh, pushed.remove(&alias).unwrap_or_default(), None)?;
                        self.note_read(&alias, &rel);
                        wrapped.push((alias.clone(), rel.clone()));
                        *n = subselect(r, rv_alias(rv));
                        self.changed = true;
                        return Ok(());
                    }
                };
                self.note_read(&alias, &rel);
                wrapped.push((alias.clone(), rel.clone()));
                let is_subselect = matches!(replacement.node, Some(NodeEnum::SelectStmt(_)));
                *n = if is_subselect { subselect(replacement, rv_alias(rv)) } else { replacement };
                self.changed = true;
                Ok(())
            }
            Some(NodeEnum::JoinExpr(j)) => {
                if let Some(l) = j.larg.as_deref_mut() {
                    self.read_item(l, pushed, wrapped)?;
                }
                if let Some(rg) = j.rarg.as_deref_mut() {
                    self.read_item(rg, pushed, wrapped)?;
                }
                self.opt_expr(j.quals.as_deref_mut(), None)
            }
            Some(NodeEnum::RangeSubselect(sub)) => self.opt_statement(sub.subquery.as_deref_mut()),
            Some(NodeEnum::RangeTableSample(ts)) => {
                let sampled = match ts.relation.as_deref().and_then(|r| r.node.as_ref()) {
                    Some(NodeEnum::RangeVar(rv)) => Some(rv.clone()),
                    _ => None,
                };
                if let Some(rv) = &sampled {
                    if !self.is_cte(rv) {
                        if let Some(rel) = self.resolve(rv)? {
                            if rel.protected() || (rel.kind != RelKind::Table && self.inline_view(&rel)?.is_some()) {
                                return refuse(
                                    "mask",
                                    format!(
                                        "TABLESAMPLE on {}.{}, which has masked columns, is not supported; sample a subquery instead",
                                        rel.schema, rel.name
                                    ),
                                );
                            }
                        }
                    }
                    self.account(rv);
                }
                self.expr_list(&mut ts.args, None)?;
                self.opt_expr(ts.repeatable.as_deref_mut(), None)
            }
            _ => self.expr(n, None),
        }
    }

    pub(super) fn note_read(&mut self, alias: &str, rel: &Relation) {
        let denied: Vec<String> = rel
            .columns
            .iter()
            .filter(|c| matches!(c.treatment, Treatment::Deny { .. }))
            .map(|c| c.name.clone())
            .collect();
        if let Some(label) = rel.columns.iter().find_map(|c| match &c.treatment {
            Treatment::Deny { label } => Some(label.clone()),
            _ => None,
        }) {
            self.denied.push((alias.to_string(), denied, label));
        }
        let mut any = false;
        for c in &rel.columns {
            match c.treatment {
                Treatment::Mask { .. } => {
                    self.masked_cols.insert(c.name.clone());
                    any = true;
                }
                Treatment::Pseudonym { lookups } => {
                    self.masked_cols.insert(c.name.clone());
                    self.pseudo.insert(c.name.clone(), lookups);
                    self.pseudo_aliases.insert(alias.to_string());
                    any = true;
                }
                _ => {}
            }
        }
        if any {
            self.masked_aliases.insert(alias.to_string());
        }
    }

    /// The view's definition with masked reads inside, or None if nothing
    /// in it needed masking.
    pub(super) fn inline_view(&mut self, rel: &Relation) -> R<Option<Node>> {
        let Some(def) = rel.definition.as_deref() else {
            return refuse("catalog", format!("cannot read the definition of view {}.{}", rel.schema, rel.name));
        };
        if self.view_depth >= MAX_VIEW_DEPTH {
            return refuse(
                "mask",
                format!("views nest deeper than {MAX_VIEW_DEPTH} levels at {}.{}", rel.schema, rel.name),
            );
        }
        let parsed = pg_query::parse(def, 0).map_err(|e| Refusal {
            rule: "mask",
            message: format!("the definition of view {}.{} does not parse ({e})", rel.schema, rel.name),
        })?;
        let Some(mut body) = parsed.protobuf.stmts.first().and_then(|s| s.stmt.as_deref()).cloned() else {
            return refuse("mask", format!("view {}.{} has an empty definition", rel.schema, rel.name));
        };
        // A view's body does not see the outer statement's CTEs.
        let original = body.clone();
        let saved_ctes = std::mem::take(&mut self.ctes);
        let saved_changed = std::mem::replace(&mut self.changed, false);
        self.view_depth += 1;
        let r = self.statement(&mut body);
        self.view_depth -= 1;
        self.ctes = saved_ctes;
        let changed = std::mem::replace(&mut self.changed, saved_changed);
        r?;
        self.pseudonyms_through_view(&original)?;
        Ok(changed.then_some(body))
    }

    /// A materialized view's columns with the labels of the columns their
    /// definition computed them from (found by name while the definition
    /// was expanded): a denied one denies, a masked one masks (redact), and
    /// a definition cordon cannot line up with the columns masks them all.
    pub(super) fn inherited(&self, rel: &Relation) -> R<Relation> {
        let def = rel.definition.as_deref().unwrap_or_default();
        let parsed = pg_query::parse(def, 0).map_err(|e| Refusal {
            rule: "mask",
            message: format!("the definition of materialized view {}.{} does not parse ({e})", rel.schema, rel.name),
        })?;
        let targets: Option<Vec<Node>> =
            match parsed.protobuf.stmts.first().and_then(|s| s.stmt.as_deref()).and_then(|n| n.node.as_ref()) {
                Some(NodeEnum::SelectStmt(s))
                    if s.op == pb::SetOperation::SetopNone as i32 && s.target_list.len() == rel.columns.len() =>
                {
                    Some(s.target_list.clone())
                }
                _ => None,
            };
        let denied: Vec<(&String, &String)> =
            self.denied.iter().flat_map(|(_, cols, label)| cols.iter().map(move |c| (c, label))).collect();
        let columns = rel
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut names = Vec::new();
                match targets.as_ref().and_then(|t| t.get(i)) {
                    Some(t) => super::super::each_node(t, &mut |e| {
                        if let NodeEnum::ColumnRef(r) = e {
                            if let Some(n) = r.fields.last().and_then(str_of) {
                                names.push(n.to_string());
                            }
                        }
                    }),
                    None => names.push(String::from("*")),
                }
                let deny = denied.iter().find(|(d, _)| names.iter().any(|n| n == *d)).map(|(_, l)| (*l).clone());
                let masked = names.iter().any(|n| n == "*" || self.masked_cols.contains(n));
                let treatment = match (deny, &c.treatment) {
                    (Some(label), _) => Treatment::Deny { label },
                    (None, Treatment::Deny { label }) => Treatment::Deny { label: label.clone() },
                    (None, Treatment::Clear) if masked => {
                        Treatment::Mask { strategy: Strategy::Redact, lookups: false }
                    }
                    (None, t) => t.clone(),
                };
                Column { treatment, ..c.clone() }
            })
            .collect();
        Ok(Relation { columns, ..rel.clone() })
    }

    /// `SELECT <each column, masked where the profile says> FROM [ONLY]
    /// schema.name [WHERE <equality lookups>]`.
    pub(super) fn masked_read(&mut self, rel: &Relation, inh: bool, lookups: Vec<Node>, from: Option<Node>) -> R<Node> {
        let proj: Vec<String> = rel
            .columns
            .iter()
            .map(|c| {
                let q = quote_ident(&c.name);
                match &c.treatment {
                    Treatment::Clear | Treatment::Pseudonym { .. } => q,
                    Treatment::Mask { strategy, .. } => {
                        self.masked_counters.insert(format!("{}/{}", c.name, strategy.name()));
                        format!("{} AS {q}", masks::expression(&q, &c.type_sql, c.ty, *strategy))
                    }
                    Treatment::Deny { .. } => format!("NULL::{} AS {q}", c.type_sql),
                }
            })
            .collect();
        let only = if inh || rel.kind != RelKind::Table { "" } else { "ONLY " };
        let sql = format!("SELECT {} FROM {only}{}", proj.join(", "), rel.qualified());
        let mut node = parse_select(&sql)?;
        if let Some(NodeEnum::SelectStmt(s)) = node.node.as_mut() {
            if let Some(f) = from {
                s.from_clause = vec![f];
            }
            s.where_clause = and_all(lookups).map(Box::new);
        }
        Ok(node)
    }
}
