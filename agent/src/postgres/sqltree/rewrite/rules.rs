//! The rules the rewrite checks on the statement as the client wrote it,
//! once it knows what is masked: values that would store masked data
//! (`labeled_flow`), pseudonymized columns used as anything but themselves,
//! and references to denied columns.

use pg_query::{protobuf as pb, Node, NodeEnum};

use super::{is_column_ref, is_constant, pseudonym_rule, refuse, Rw, R};
use crate::postgres::sqltree::{each_node, str_of, walk_gen};

impl Rw<'_> {
    /// A view that shows a pseudonymized column as it is passes the rule on
    /// under the name it gives the column; any other use inside the view is
    /// refused like in a statement.
    pub(super) fn pseudonyms_through_view(&mut self, body: &Node) -> R<()> {
        if self.pseudo.is_empty() {
            return Ok(());
        }
        self.check_pseudonyms(body)?;
        if let Some(NodeEnum::SelectStmt(s)) = body.node.as_ref() {
            for t in &s.target_list {
                let Some(NodeEnum::ResTarget(rt)) = t.node.as_ref() else { continue };
                let Some(name) = rt.val.as_deref().and_then(|v| self.pseudo_ref(v)) else { continue };
                let lookups = self.pseudo.get(&name).copied().unwrap_or(false);
                if !rt.name.is_empty() {
                    self.pseudo.insert(rt.name.clone(), lookups);
                }
            }
        }
        Ok(())
    }

    /// INSERT … SELECT, SELECT INTO, CREATE TABLE AS, SET values: a masked
    /// column in what is stored would store masked data (or, with a raw
    /// read, leak it): refused under `labeled_flow`. Checked on the text as
    /// the client wrote it, after the rewrite has found what is masked.
    pub(super) fn flow_check(&self, values: &Node, what: &str) -> R<()> {
        match self.value_flow(values) {
            Some(col) => refuse(
                "labeled_flow",
                format!("{what} would store {col}, which is masked for this workload: the stored copy would be masked data; refused"),
            ),
            None => Ok(()),
        }
    }

    pub(super) fn flow_check_list(&self, values: &[Node], what: &str) -> R<()> {
        for v in values {
            self.flow_check(v, what)?;
        }
        Ok(())
    }

    /// A masked column, a `*` or a whole row of a relation with masked
    /// columns among the values `n` produces: its own column references, and
    /// the output columns (not the filters) of the queries inside it.
    fn value_flow(&self, n: &Node) -> Option<String> {
        struct V<'a, 'r> {
            rw: &'a Rw<'r>,
            bad: Option<String>,
        }
        impl<'a> walk_gen::Visit<'a> for V<'_, '_> {
            fn node(&mut self, n: &'a Node) {
                if self.bad.is_some() {
                    return;
                }
                match n.node.as_ref() {
                    Some(NodeEnum::ColumnRef(c)) => {
                        let last = c.fields.last();
                        if matches!(last.and_then(|f| f.node.as_ref()), Some(NodeEnum::AStar(_))) {
                            self.bad = Some("*".to_string());
                        } else if let Some(name) = last.and_then(str_of) {
                            if self.rw.masked_cols.contains(name)
                                || (c.fields.len() == 1 && self.rw.masked_aliases.contains(name))
                            {
                                self.bad = Some(name.to_string());
                            }
                        }
                    }
                    Some(NodeEnum::SelectStmt(s)) => self.select(s),
                    Some(e) => walk_gen::children(e, self),
                    None => {}
                }
            }
        }
        impl<'a> V<'_, '_> {
            fn select(&mut self, s: &'a pb::SelectStmt) {
                for n in s.target_list.iter().chain(&s.values_lists).chain(&s.from_clause) {
                    walk_gen::Visit::node(self, n);
                }
                for arm in s.larg.iter().chain(s.rarg.iter()) {
                    self.select(arm);
                }
                if let Some(w) = &s.with_clause {
                    for c in &w.ctes {
                        if let Some(NodeEnum::CommonTableExpr(c)) = c.node.as_ref() {
                            if let Some(q) = c.ctequery.as_deref() {
                                walk_gen::Visit::node(self, q);
                            }
                        }
                    }
                }
            }
        }
        let mut v = V { rw: self, bad: None };
        walk_gen::Visit::node(&mut v, n);
        v.bad
    }

    /// Pseudonymized columns are read as stored, so only the statement's
    /// own top-level SELECT may use them, and only as a bare output column,
    /// an `=` comparison, a GROUP BY key or a NULL test. Every other use,
    /// anywhere, refuses the statement.
    pub(super) fn check_pseudonyms(&self, stmt: &Node) -> R<()> {
        if self.pseudo.is_empty() {
            return Ok(());
        }
        match stmt.node.as_ref() {
            Some(NodeEnum::SelectStmt(s))
                if s.op == pb::SetOperation::SetopNone as i32 && s.into_clause.is_none() && s.with_clause.is_none() =>
            {
                for t in &s.target_list {
                    match t.node.as_ref() {
                        Some(NodeEnum::ResTarget(rt)) if rt.val.as_deref().is_some_and(|v| self.bare(v)) => {}
                        _ => self.no_pseudo(t)?,
                    }
                }
                for d in s.distinct_clause.iter().chain(&s.group_clause) {
                    if !self.bare(d) {
                        self.no_pseudo(d)?;
                    }
                }
                for f in &s.from_clause {
                    self.pseudo_from(f)?;
                }
                if let Some(w) = s.where_clause.as_deref() {
                    self.pseudo_predicate(w)?;
                }
                for n in s
                    .having_clause
                    .iter()
                    .map(|b| b.as_ref())
                    .chain(&s.sort_clause)
                    .chain(&s.window_clause)
                    .chain(&s.values_lists)
                    .chain(&s.locking_clause)
                    .chain(s.limit_count.as_deref())
                    .chain(s.limit_offset.as_deref())
                {
                    self.no_pseudo(n)?;
                }
                Ok(())
            }
            Some(NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_)) => {
                let (where_clause, returning, rest): (Option<&Node>, Vec<&Node>, Vec<&Node>) = match stmt.node.as_ref()
                {
                    Some(NodeEnum::UpdateStmt(u)) => (
                        u.where_clause.as_deref(),
                        u.returning_clause.iter().flat_map(|r| r.exprs.iter()).collect(),
                        u.target_list.iter().chain(&u.from_clause).collect(),
                    ),
                    Some(NodeEnum::DeleteStmt(d)) => (
                        d.where_clause.as_deref(),
                        d.returning_clause.iter().flat_map(|r| r.exprs.iter()).collect(),
                        d.using_clause.iter().collect(),
                    ),
                    _ => (None, vec![], vec![]),
                };
                if let Some(w) = where_clause {
                    self.pseudo_predicate(w)?;
                }
                for r in returning {
                    match r.node.as_ref() {
                        Some(NodeEnum::ResTarget(rt)) if rt.val.as_deref().is_some_and(|v| self.bare(v)) => {}
                        _ => self.no_pseudo(r)?,
                    }
                }
                for n in rest {
                    self.no_pseudo(n)?;
                }
                Ok(())
            }
            _ => self.no_pseudo(stmt),
        }
    }

    /// A column as it is (or `*`), which cordon pseudonymizes on the way
    /// out; a whole row would go out as a record it cannot.
    fn bare(&self, n: &Node) -> bool {
        match n.node.as_ref() {
            Some(NodeEnum::ColumnRef(c)) => {
                let whole_row = c.fields.len() == 1
                    && c.fields.first().and_then(str_of).is_some_and(|a| self.pseudo_aliases.contains(a));
                !whole_row
            }
            _ => false,
        }
    }

    fn pseudo_from(&self, n: &Node) -> R<()> {
        match n.node.as_ref() {
            Some(NodeEnum::RangeVar(_)) => Ok(()),
            Some(NodeEnum::JoinExpr(j)) => {
                for side in j.larg.iter().chain(j.rarg.iter()) {
                    self.pseudo_from(side)?;
                }
                // USING (col) and NATURAL compare stored values with `=`:
                // a lookup, allowed only where the label allows lookups.
                let using: Vec<&str> = j.using_clause.iter().filter_map(str_of).collect();
                for (name, lookups) in &self.pseudo {
                    if !lookups && (j.is_natural || using.contains(&name.as_str())) {
                        return refuse(
                            "pseudonym",
                            format!("{name} is pseudonymized and this profile allows no lookups on it (a join on it is one)"),
                        );
                    }
                }
                match j.quals.as_deref() {
                    Some(q) => self.pseudo_predicate(q),
                    None => Ok(()),
                }
            }
            _ => self.no_pseudo(n),
        }
    }

    /// AND/OR/NOT of `col = col`, `col = constant`, `col IS [NOT] NULL`
    /// and predicates that do not touch a pseudonymized column.
    fn pseudo_predicate(&self, n: &Node) -> R<()> {
        match n.node.as_ref() {
            Some(NodeEnum::BoolExpr(b)) => {
                for a in &b.args {
                    self.pseudo_predicate(a)?;
                }
                Ok(())
            }
            Some(NodeEnum::NullTest(t)) if t.arg.as_deref().is_some_and(is_column_ref) => Ok(()),
            Some(NodeEnum::AExpr(a)) if a.kind == pb::AExprKind::AexprOp as i32 => {
                let op: Vec<&str> = a.name.iter().filter_map(str_of).collect();
                let (Some(l), Some(r)) = (a.lexpr.as_deref(), a.rexpr.as_deref()) else { return self.no_pseudo(n) };
                let side_ok = |x: &Node| is_column_ref(x) || is_constant(x);
                if op == ["="] && side_ok(l) && side_ok(r) {
                    // An equality is a lookup: allowed where the label
                    // allows lookups.
                    for side in [l, r] {
                        if let Some(name) = self.pseudo_ref(side) {
                            if !self.pseudo.get(&name).copied().unwrap_or(false) {
                                return refuse(
                                    "pseudonym",
                                    format!("{name} is pseudonymized and this profile allows no lookups on it"),
                                );
                            }
                        }
                    }
                    return Ok(());
                }
                self.no_pseudo(n)
            }
            _ => self.no_pseudo(n),
        }
    }

    pub(super) fn pseudo_ref(&self, n: &Node) -> Option<String> {
        let Some(NodeEnum::ColumnRef(c)) = n.node.as_ref() else { return None };
        let name = c.fields.last().and_then(str_of)?;
        self.pseudo.contains_key(name).then(|| name.to_string())
    }

    /// No pseudonymized column, `*` or whole row of its relation in `n`.
    fn no_pseudo(&self, n: &Node) -> R<()> {
        let mut bad = None;
        each_node(n, &mut |e| {
            if let NodeEnum::ColumnRef(c) = e {
                let last = c.fields.last();
                if matches!(last.and_then(|f| f.node.as_ref()), Some(NodeEnum::AStar(_))) {
                    bad.get_or_insert_with(|| "*".to_string());
                } else if let Some(name) = last.and_then(str_of) {
                    if self.pseudo.contains_key(name) || (c.fields.len() == 1 && self.pseudo_aliases.contains(name)) {
                        bad.get_or_insert_with(|| name.to_string());
                    }
                }
            }
        });
        match bad {
            None => Ok(()),
            Some(col) if col == "*" => refuse(
                "pseudonym",
                "a * or whole row outside the SELECT list would carry pseudonymized columns as stored; name the columns",
            ),
            Some(col) => refuse("pseudonym", pseudonym_rule(&col)),
        }
    }

    /// Denied columns: any reference to one, a `*`, or a whole-row reference
    /// of its relation refuses the statement.
    pub(super) fn check_denied(&self, stmt: &Node) -> R<()> {
        if self.denied.is_empty() {
            return Ok(());
        }
        let mut bad: Option<(String, String)> = None;
        each_node(stmt, &mut |e| {
            if bad.is_some() {
                return;
            }
            let NodeEnum::ColumnRef(c) = e else { return };
            let last = c.fields.last();
            let star = matches!(last.and_then(|f| f.node.as_ref()), Some(NodeEnum::AStar(_)));
            let name = last.and_then(str_of).unwrap_or("*");
            for (alias, cols, label) in &self.denied {
                let whole_row = c.fields.len() == 1 && name == alias;
                if star || whole_row || cols.iter().any(|d| d == name) {
                    let what = if star || whole_row {
                        format!("every column of {alias}, including {}", cols.join(", "))
                    } else {
                        format!("column {name}")
                    };
                    bad = Some((what, label.clone()));
                }
            }
        });
        match bad {
            Some((what, label)) => {
                refuse("label", format!("this statement reads {what}, labeled {label}; this profile may not read it"))
            }
            None => Ok(()),
        }
    }
}
