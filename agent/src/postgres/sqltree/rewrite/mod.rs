//! Mask at read: PostgreSQL only ever computes on masked values.
//!
//! Every reference to a relation with columns the profile masks or denies is
//! replaced by a subquery over it, under the same alias, that projects each
//! column (masked ones through a type-preserving expression, see `masks`).
//! Expressions, predicates, joins, grouping, ordering, casts and their error
//! messages then see only masked values. PostgreSQL flattens such subqueries,
//! so plans keep their indexes.
//!
//! - Reads: FROM and JOIN items at any depth (subqueries in any expression,
//!   CTEs, set operations, LATERAL), COPY, cursors, PREPARE, EXPLAIN.
//! - Views are inlined from their definitions, so their base tables get the
//!   same treatment; a materialized view computed from masked columns is
//!   refused.
//! - Write targets cannot be subqueries: references to their masked columns
//!   in WHERE, SET and RETURNING are replaced by the masking expression.
//!   Values that would carry masked data into storage are refused
//!   (`labeled_flow`).
//! - Equality lookups (`col = constant`, `col IN (constants)`, `col IS
//!   NULL`, top-level AND-ed) compare the stored value, inside the subquery.
//! - Fails closed: a relation cordon cannot resolve, a construct it does not
//!   handle, a deparse that does not round-trip: the statement is refused.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use pg_query::{
    protobuf::{self as pb, RangeVar},
    Node, NodeEnum,
};

use super::{masks, quote_ident, str_of, table_ref, walk_gen};
use crate::pipeline::{classify::Strategy, guard::TableRef, mask::ValueType};

/// What the profile does with one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Treatment {
    Clear,
    Mask {
        strategy: Strategy,
        lookups: bool,
    },
    /// Keyed pseudonym, computed by cordon on the way out: PostgreSQL reads
    /// the stored value, so the statement may only select it as it is,
    /// compare it with `=` (joins, lookups), group by it or test it for
    /// NULL. Anything else would compute on the real value.
    Pseudonym {
        lookups: bool,
    },
    Deny {
        label: String,
    },
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// The type as `format_type` spells it (the mask is cast back to it).
    pub type_sql: String,
    pub type_oid: u32,
    pub ty: ValueType,
    pub treatment: Treatment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    Table,
    View,
    MatView,
}

#[derive(Debug, Clone)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    pub kind: RelKind,
    /// In attribute order.
    pub columns: Vec<Column>,
    /// A view's definition (`pg_get_viewdef`).
    pub definition: Option<String>,
}

impl Relation {
    pub fn protected(&self) -> bool {
        self.columns.iter().any(|c| c.treatment != Treatment::Clear)
    }
    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// The adapter's view of the catalog, classified for one profile.
pub trait Resolve {
    /// Ok(None): no such relation (the server will say so). Err: cordon
    /// does not know it, so the statement is refused.
    fn relation(&self, t: &TableRef) -> Result<Option<Arc<Relation>>, String>;
    /// Whether the profile masks or denies anything at all.
    fn protects_anything(&self) -> bool;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub message: String,
}

fn refuse<T>(rule: &'static str, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal { rule, message: message.into() })
}

type R<T> = Result<T, Refusal>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The text to send upstream; None when nothing needed masking.
    pub text: Option<String>,
    /// Messages for the client (a NOTICE each), once per statement.
    pub notices: Vec<String>,
    /// "column/strategy" for every masked column of the relations read.
    pub masked: Vec<String>,
}

/// Catalog views that hold samples of every column's values.
const STATISTICS: [&str; 5] =
    ["pg_statistic", "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic_ext_data"];
const MAX_VIEW_DEPTH: usize = 16;

/// Rewrite every statement of `sql` for mask at read.
pub fn rewrite(sql: &str, r: &dyn Resolve) -> R<Rewritten> {
    let parsed = parse(sql)?;
    rewrite_parsed(sql, &parsed, r)
}

pub fn parse(sql: &str) -> R<pg_query::ParseResult> {
    pg_query::parse(sql, 0)
        .map_err(|e| Refusal { rule: "parse_error", message: format!("the statement does not parse ({e})") })
}

/// The rewrite of an already parsed text.
pub fn rewrite_parsed(sql: &str, parsed: &pg_query::ParseResult, r: &dyn Resolve) -> R<Rewritten> {
    let mut out = String::with_capacity(sql.len() + 256);
    let mut at = 0usize;
    let mut changed = false;
    let mut notices = BTreeSet::new();
    let mut masked = BTreeSet::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_deref() else { continue };
        let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(sql.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(l) => start.saturating_add(l).min(sql.len()),
        };
        let one = rewrite_statement(stmt, parsed.protobuf.version, r)?;
        notices.extend(one.notices);
        masked.extend(one.masked);
        let Some(text) = one.text else { continue };
        changed = true;
        out.push_str(sql.get(at..start).unwrap_or_default());
        out.push_str(&text);
        at = end;
    }
    let notices = notices.into_iter().collect();
    let masked = masked.into_iter().collect();
    if !changed {
        return Ok(Rewritten { text: None, notices, masked });
    }
    out.push_str(sql.get(at..).unwrap_or_default());
    Ok(Rewritten { text: Some(out), notices, masked })
}

/// One statement: its rewrite as SQL (None when nothing is masked).
fn rewrite_statement(stmt: &Node, version: i32, r: &dyn Resolve) -> R<Rewritten> {
    let total = count_protected(stmt, r);
    let mut node = stmt.clone();
    let mut rw = Rw::new(r);
    rw.statement(&mut node)?;
    if rw.handled != total {
        return refuse(
            "mask",
            format!(
                "cordon could not follow {} of the {total} references to masked tables in this statement; it is refused rather than run unmasked",
                total.saturating_sub(rw.handled)
            ),
        );
    }
    rw.check_denied(stmt)?;
    rw.check_pseudonyms(stmt)?;
    let notices = rw.notices.into_iter().collect();
    let masked = rw.masked_counters.into_iter().collect();
    let text = if rw.changed { Some(deparse(&node, version)?) } else { None };
    Ok(Rewritten { text, notices, masked })
}

/// One statement back to SQL, checked: its parse must be the tree cordon
/// built (locations aside), or the statement is refused.
fn deparse(node: &Node, version: i32) -> R<String> {
    let tree = pb::ParseResult {
        version,
        stmts: vec![pb::RawStmt { stmt: Some(Box::new(node.clone())), stmt_location: 0, stmt_len: 0 }],
    };
    let text = pg_query::deparse(&tree, Default::default()).map_err(|e| Refusal {
        rule: "mask",
        message: format!("cordon cannot write the masked statement back as SQL ({e})"),
    })?;
    let again = pg_query::parse(&text, 0).map_err(|e| Refusal {
        rule: "mask",
        message: format!("the masked statement cordon wrote does not parse ({e})"),
    })?;
    let same = match again.protobuf.stmts.first().and_then(|s| s.stmt.as_deref()) {
        Some(n) => without_positions(n) == without_positions(node),
        None => false,
    };
    if !same && std::env::var_os("CORDON_DEBUG_DEPARSE").is_some() {
        eprintln!("cordon built: {node:?}\nread back: {again:?}");
    }
    if !same || again.protobuf.stmts.len() != 1 {
        return refuse("mask", "the masked statement does not read back as cordon built it (a construct the deparser does not keep); it is refused");
    }
    Ok(text)
}

pub(crate) fn without_positions(n: &Node) -> Node {
    let mut n = n.clone();
    if let Some(e) = n.node.as_mut() {
        walk_gen::clear_positions(e);
    }
    n
}

/// How many relation references in the statement resolve to a protected
/// table, found by the complete walker. The rewrite must account for each.
fn count_protected(stmt: &Node, r: &dyn Resolve) -> usize {
    struct V<'r> {
        r: &'r dyn Resolve,
        n: usize,
    }
    impl<'a> walk_gen::Visit<'a> for V<'_> {
        fn node(&mut self, n: &'a Node) {
            if let Some(e) = n.node.as_ref() {
                if let NodeEnum::RangeVar(rv) = e {
                    self.range_var(rv);
                }
                walk_gen::children(e, self);
            }
        }
        fn range_var(&mut self, rv: &'a RangeVar) {
            if protected_table(self.r, rv) {
                self.n += 1;
            }
        }
    }
    let mut v = V { r, n: 0 };
    walk_gen::Visit::node(&mut v, stmt);
    v.n
}

fn protected_table(r: &dyn Resolve, rv: &RangeVar) -> bool {
    matches!(r.relation(&table_ref(rv)), Ok(Some(rel)) if rel.kind == RelKind::Table && rel.protected())
}

/// A write target with masked columns.
struct Target {
    /// The name its columns are qualified with (alias or relation name).
    alias: String,
    rel: Arc<Relation>,
}

struct Rw<'r> {
    r: &'r dyn Resolve,
    /// CTE names in scope, innermost last.
    ctes: Vec<Vec<String>>,
    /// Protected-table references accounted for (outside view bodies).
    handled: usize,
    view_depth: usize,
    changed: bool,
    notices: BTreeSet<String>,
    /// Relations read that have denied columns: (alias, columns, label).
    denied: Vec<(String, Vec<String>, String)>,
    /// Masked column names and aliases of the relations read.
    masked_cols: BTreeSet<String>,
    masked_aliases: BTreeSet<String>,
    /// "column/strategy" of what the masked reads mask.
    masked_counters: BTreeSet<String>,
    /// Pseudonymized columns read (name → equality lookups allowed), and
    /// the aliases of their relations.
    pseudo: HashMap<String, bool>,
    pseudo_aliases: BTreeSet<String>,
}

impl<'r> Rw<'r> {
    fn new(r: &'r dyn Resolve) -> Self {
        Self {
            r,
            ctes: Vec::new(),
            handled: 0,
            view_depth: 0,
            changed: false,
            notices: BTreeSet::new(),
            denied: Vec::new(),
            masked_cols: BTreeSet::new(),
            masked_aliases: BTreeSet::new(),
            masked_counters: BTreeSet::new(),
            pseudo: HashMap::new(),
            pseudo_aliases: BTreeSet::new(),
        }
    }

    fn resolve(&self, rv: &RangeVar) -> R<Option<Arc<Relation>>> {
        let t = table_ref(rv);
        let rel = self
            .r
            .relation(&t)
            .map_err(|e| Refusal { rule: "catalog", message: format!("cannot classify relation {t}: {e}") })?;
        if let Some(rel) = &rel {
            if rel.schema == "pg_catalog" && STATISTICS.contains(&rel.name.as_str()) && self.r.protects_anything() {
                return refuse(
                    "restricted_read",
                    format!(
                        "pg_catalog.{} holds sampled values of every column, masked ones included; this profile may not read it",
                        rel.name
                    ),
                );
            }
        }
        Ok(rel)
    }

    fn account(&mut self, rv: &RangeVar) {
        if self.view_depth == 0 && protected_table(self.r, rv) {
            self.handled += 1;
        }
    }

    fn is_cte(&self, rv: &RangeVar) -> bool {
        rv.schemaname.is_empty() && self.ctes.iter().any(|s| s.contains(&rv.relname))
    }

    fn statement(&mut self, n: &mut Node) -> R<()> {
        let Some(e) = n.node.as_mut() else { return Ok(()) };
        match e {
            NodeEnum::SelectStmt(s) => {
                let original = s.into_clause.is_some().then(|| s.clone());
                self.select(s)?;
                if let Some(o) = original {
                    self.flow_check(&Node { node: Some(NodeEnum::SelectStmt(o)) }, "SELECT INTO")?;
                }
                Ok(())
            }
            NodeEnum::InsertStmt(s) => self.insert(s),
            NodeEnum::UpdateStmt(s) => self.update(s),
            NodeEnum::DeleteStmt(s) => self.delete(s),
            NodeEnum::MergeStmt(s) => self.merge(s),
            NodeEnum::CopyStmt(s) => self.copy(s),
            NodeEnum::ExplainStmt(s) => self.opt_statement(s.query.as_deref_mut()),
            NodeEnum::DeclareCursorStmt(s) => self.opt_statement(s.query.as_deref_mut()),
            NodeEnum::PrepareStmt(s) => self.opt_statement(s.query.as_deref_mut()),
            NodeEnum::CreateTableAsStmt(s) => {
                let original = s.query.as_deref().cloned();
                self.opt_statement(s.query.as_deref_mut())?;
                if let Some(o) = original {
                    self.flow_check(&o, "CREATE TABLE AS")?;
                }
                Ok(())
            }
            _ => self.utility(n),
        }
    }

    fn opt_statement(&mut self, n: Option<&mut Node>) -> R<()> {
        match n {
            Some(n) => self.statement(n),
            None => Ok(()),
        }
    }

    /// Utility statements read no rows for the client; queries nested in
    /// them (CALL arguments, …) are still rewritten.
    fn utility(&mut self, n: &mut Node) -> R<()> {
        self.walk_mut(n, true, &mut |rw, n| match n.node.as_mut() {
            Some(NodeEnum::SelectStmt(_)) => rw.statement(n).map(|()| false),
            Some(NodeEnum::RangeVar(rv)) => {
                rw.account(rv);
                Ok(false)
            }
            Some(_) => Ok(true),
            None => Ok(false),
        })
    }

    /// Walk `n` depth-first: `f` decides each node (Ok(true) = descend into
    /// its children); the first refusal ends the walk. With `targets`,
    /// relations held outside a Node (INTO, …), which nothing reads, are
    /// accounted for.
    fn walk_mut(&mut self, n: &mut Node, targets: bool, f: &mut dyn FnMut(&mut Rw<'r>, &mut Node) -> R<bool>) -> R<()> {
        struct V<'a, 'r, 'f> {
            rw: &'a mut Rw<'r>,
            f: &'f mut dyn FnMut(&mut Rw<'r>, &mut Node) -> R<bool>,
            targets: bool,
            err: Option<Refusal>,
        }
        impl walk_gen::VisitMut for V<'_, '_, '_> {
            fn node(&mut self, n: &mut Node) {
                if self.err.is_some() {
                    return;
                }
                match (self.f)(self.rw, n) {
                    Ok(true) => {
                        if let Some(e) = n.node.as_mut() {
                            walk_gen::children_mut(e, self);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => self.err = Some(e),
                }
            }
            fn range_var(&mut self, rv: &mut RangeVar) {
                if self.targets {
                    self.rw.account(rv);
                }
            }
        }
        let mut v = V { rw: self, f, targets, err: None };
        walk_gen::VisitMut::node(&mut v, n);
        v.err.map_or(Ok(()), Err)
    }

    fn push_ctes(&mut self, with: Option<&mut pb::WithClause>) -> R<()> {
        let Some(w) = with else {
            self.ctes.push(Vec::new());
            return Ok(());
        };
        let names: Vec<String> = w
            .ctes
            .iter()
            .filter_map(|c| match c.node.as_ref() {
                Some(NodeEnum::CommonTableExpr(c)) => Some(c.ctename.clone()),
                _ => None,
            })
            .collect();
        // A recursive WITH sees all its names in every body; otherwise each
        // body sees only the ones before it.
        self.ctes.push(if w.recursive { names.clone() } else { Vec::new() });
        for (i, c) in w.ctes.iter_mut().enumerate() {
            if let Some(NodeEnum::CommonTableExpr(c)) = c.node.as_mut() {
                if let Some(q) = c.ctequery.as_deref_mut() {
                    self.statement(q)?;
                }
                self.expr_list(&mut c.aliascolnames, None)?;
            }
            if !w.recursive {
                if let (Some(scope), Some(name)) = (self.ctes.last_mut(), names.get(i)) {
                    scope.push(name.clone());
                }
            }
        }
        Ok(())
    }

    fn expr_list(&mut self, list: &mut [Node], subst: Option<&Target>) -> R<()> {
        for n in list {
            self.expr(n, subst)?;
        }
        Ok(())
    }

    fn opt_expr(&mut self, n: Option<&mut Node>, subst: Option<&Target>) -> R<()> {
        match n {
            Some(n) => self.expr(n, subst),
            None => Ok(()),
        }
    }

    /// Any expression: subqueries in it are rewritten; with a write target,
    /// references to its masked columns become the masking expression.
    fn expr(&mut self, n: &mut Node, subst: Option<&Target>) -> R<()> {
        if let Some(t) = subst {
            self.substitute(n, t)?;
        }
        self.walk_expr(n)
    }

    /// Replace references to the target's masked columns, at any depth
    /// (a subquery may refer to the target by correlation). Over-masking a
    /// same-named column of an inner relation is safe; missing one is not.
    fn substitute(&mut self, n: &mut Node, t: &Target) -> R<()> {
        self.walk_mut(n, false, &mut |rw, n| {
            let Some(NodeEnum::ColumnRef(c)) = n.node.as_ref() else { return Ok(true) };
            let masked = match target_column(c, t).filter(|c| !matches!(c.treatment, Treatment::Pseudonym { .. })) {
                Some(col) => Some(rw.mask_expr_for(c, &col)?),
                None => None,
            };
            if let Some(m) = masked {
                *n = m;
                rw.changed = true;
            }
            Ok(false)
        })
    }

    /// Rewrite the subqueries inside an expression.
    fn walk_expr(&mut self, n: &mut Node) -> R<()> {
        self.walk_mut(n, true, &mut |rw, n| rw.expr_node(n))
    }

    /// One node of an expression; Ok(true) = descend into its children.
    fn expr_node(&mut self, n: &mut Node) -> R<bool> {
        match n.node.as_ref() {
            Some(
                NodeEnum::SelectStmt(_)
                | NodeEnum::InsertStmt(_)
                | NodeEnum::UpdateStmt(_)
                | NodeEnum::DeleteStmt(_)
                | NodeEnum::MergeStmt(_),
            ) => {
                self.statement(n)?;
                Ok(false)
            }
            Some(NodeEnum::RangeVar(rv)) => {
                if self.is_cte(rv) {
                    self.account(rv);
                    return Ok(false);
                }
                // A relation where cordon does not expect one to be read.
                let rv = rv.clone();
                if let Some(rel) = self.resolve(&rv)? {
                    if rel.protected() || (rel.kind != RelKind::Table && self.inline_view(&rel)?.is_some()) {
                        return refuse(
                            "mask",
                            format!("{}.{} is referenced in a construct cordon cannot mask", rel.schema, rel.name),
                        );
                    }
                }
                Ok(false)
            }
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    fn mask_expr_for(&mut self, c: &pb::ColumnRef, col: &Column) -> R<Node> {
        let strategy = match &col.treatment {
            Treatment::Mask { strategy, .. } => strategy,
            Treatment::Pseudonym { .. } => return refuse("pseudonym", pseudonym_rule(&col.name)),
            _ => return refuse("label", format!("column {} may not be read by this profile", col.name)),
        };
        let quoted: Vec<String> = c.fields.iter().filter_map(str_of).map(quote_ident).collect();
        let sql = format!("SELECT {}", masks::expression(&quoted.join("."), &col.type_sql, col.ty, *strategy));
        let sel = parse_select(&sql)?;
        match sel.node {
            Some(NodeEnum::SelectStmt(s)) => match s.target_list.into_iter().next().and_then(|t| t.node) {
                Some(NodeEnum::ResTarget(t)) => t.val.map(|b| *b).ok_or_else(|| Refusal {
                    rule: "mask",
                    message: "cordon built an empty masking expression".into(),
                }),
                _ => refuse("mask", "cordon built an empty masking expression"),
            },
            _ => refuse("mask", "cordon built an empty masking expression"),
        }
    }
}

fn pseudonym_rule(col: &str) -> String {
    format!(
        "{col} is pseudonymized for this workload: a statement may select it as it is, compare it with = (joins, lookups), group by it or test it for NULL, and nothing else"
    )
}

fn rv_alias(rv: &RangeVar) -> pb::Alias {
    rv.alias.clone().unwrap_or_else(|| pb::Alias { aliasname: rv.relname.clone(), colnames: Vec::new() })
}

fn subselect(query: Node, alias: pb::Alias) -> Node {
    Node {
        node: Some(NodeEnum::RangeSubselect(Box::new(pb::RangeSubselect {
            lateral: false,
            subquery: Some(Box::new(query)),
            alias: Some(alias),
        }))),
    }
}

/// Parsed masking queries and expressions by their text: the same table
/// under the same profile yields the same text, and parsing the long
/// partial-mask expressions is most of a cold rewrite.
static PARSED: std::sync::LazyLock<std::sync::Mutex<HashMap<String, Node>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));
const PARSED_MAX: usize = 1024;

fn parse_select(sql: &str) -> R<Node> {
    if let Some(n) = PARSED.lock().ok().and_then(|m| m.get(sql).cloned()) {
        return Ok(n);
    }
    let parsed = pg_query::parse(sql, 0).map_err(|e| Refusal {
        rule: "mask",
        message: format!("cordon built a masking query that does not parse ({e})"),
    })?;
    let node = parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|s| s.stmt)
        .map(|b| *b)
        .ok_or_else(|| Refusal { rule: "mask", message: "cordon built an empty masking query".into() })?;
    if let Ok(mut m) = PARSED.lock() {
        if m.len() >= PARSED_MAX {
            m.clear();
        }
        m.insert(sql.to_string(), node.clone());
    }
    Ok(node)
}

fn and_all(mut conjuncts: Vec<Node>) -> Option<Node> {
    match conjuncts.len() {
        0 => None,
        1 => conjuncts.pop(),
        _ => Some(Node {
            node: Some(NodeEnum::BoolExpr(Box::new(pb::BoolExpr {
                xpr: None,
                boolop: pb::BoolExprType::AndExpr as i32,
                args: conjuncts,
                location: -1,
            }))),
        }),
    }
}

fn is_column_ref(n: &Node) -> bool {
    matches!(n.node.as_ref(), Some(NodeEnum::ColumnRef(_)))
}

mod lookups;
mod reads;
mod rules;
pub mod template;
mod writes;

use lookups::{is_constant, lookup_target};
use writes::target_column;

#[cfg(test)]
#[path = "../../../tests/pg_rewrite.rs"]
mod tests;
