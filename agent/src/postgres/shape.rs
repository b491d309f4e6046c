//! Statement shapes by PostgreSQL's own scanner, so that statements that
//! differ only in their inlined constants (`… WHERE aid = 48213`, a new
//! number every time) are parsed and analysed once.
//!
//! Correct by construction rather than by trust in a key:
//! - the key is the scanner's token sequence (libpg_query's scanner, never a
//!   lexer of cordon's), every token's text kept except constants, which
//!   keep only their kind; the whole key is compared, not a hash of it;
//! - a shape is shared only when its first statement, parsed in full, is a
//!   single SELECT, INSERT, UPDATE or DELETE whose every constant stands in
//!   a plain value position (compared, listed in VALUES or IN, assigned, a
//!   LIMIT, or cast to a built-in scalar type), maps one-to-one onto a
//!   constant token, and so cannot change what the statement reads, writes,
//!   calls or is judged as. A constant that is a function's argument
//!   (`set_config('…')`, `to_regclass('…')`), names something
//!   (`'…'::regclass`), sits in a type modifier, or any other statement kind
//!   (SET, COPY … PROGRAM, DO, DDL) is never shared: those texts are
//!   analysed one by one.

use std::{fmt::Write as _, sync::Arc};

use pg_query::{
    protobuf::{self as pb, Token},
    Node, NodeEnum,
};

use crate::pipeline::{guard::StmtFacts, literals::Literal};

/// One scan of a text: its constants and its shape key.
pub struct Scan {
    pub literals: Vec<Literal>,
    /// Where a `-` sign immediately before each literal starts, if any (the
    /// parser folds `- 5` into the constant -5 located at the sign).
    minus: Vec<Option<usize>>,
    /// Token texts with constants abstracted; None when the scanner fails.
    pub key: Option<String>,
}

/// Scan a text once: literals for the records and guardrails, and the key.
pub fn scan(sql: &str) -> Scan {
    // The scanner's tokens as the C scanner gives them (no protobuf round
    // trip: that was half the cost of a statement's read on a shape hit).
    let Ok(tokens) = pg_query::scan_tokens(sql) else {
        return Scan { literals: Vec::new(), minus: Vec::new(), key: None };
    };
    let mut literals = Vec::new();
    let mut minus = Vec::new();
    let mut key = String::with_capacity(sql.len());
    let mut prev_minus: Option<usize> = None;
    for t in &tokens {
        let kind = Token::try_from(t.token).ok();
        let (Ok(start), Ok(end)) = (usize::try_from(t.start), usize::try_from(t.end)) else {
            return Scan { literals, minus, key: None };
        };
        let Some(raw) = sql.get(start..end) else { return Scan { literals, minus, key: None } };
        let string = matches!(kind, Some(Token::Sconst | Token::Usconst));
        let number = matches!(kind, Some(Token::Iconst | Token::Fconst | Token::Bconst | Token::Xconst));
        if matches!(kind, Some(Token::SqlComment | Token::CComment)) {
            continue;
        }
        if string || number {
            let value = if string { super::sql::string_value(raw) } else { raw.to_string() };
            literals.push(Literal { start, end, value, labeled: false });
            minus.push(if number { prev_minus } else { None });
            key.push('\u{1}');
            let _ = write!(key, "{}", t.token);
        } else if t.keyword_kind != 0 {
            // Keywords are case-insensitive; identifiers keep their case.
            key.push_str(&raw.to_ascii_lowercase());
        } else {
            key.push_str(raw);
        }
        key.push('\u{0}');
        prev_minus = (raw == "-").then_some(start);
    }
    Scan { literals, minus, key: Some(key) }
}

/// Where each constant of a shared shape comes from, in the template's
/// constant order (see `rewrite::template`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// The text of literal token `n`.
    Literal(usize),
    /// Literal token `n` with the minus sign before it: `(-n)`.
    Negated(usize),
    /// A keyword constant (TRUE, FALSE, NULL), part of the key itself.
    Fixed(String),
}

/// What statements of one shape share: the analysis, the parse tree of the
/// first one (for positions, e.g. of labeled literals) and, per constant,
/// which literal token it is.
#[derive(Debug)]
pub struct Shaped {
    pub facts: Arc<Vec<StmtFacts>>,
    pub stmt: Node,
    /// Literal starts in the first statement's text (to map tree positions
    /// to literal ordinals).
    pub starts: Vec<usize>,
    pub fills: Vec<Fill>,
}

impl Shaped {
    /// The literal ordinal at a tree position of the first statement.
    pub fn ordinal_at(&self, at: usize) -> Option<usize> {
        self.starts.iter().position(|s| *s == at || *s == at + 1)
    }
}

/// The shared shape of a parsed statement, or None when it may not be
/// shared (see the module comment).
pub fn shaped(parsed: &pb::ParseResult, scan: &Scan, facts: &Arc<Vec<StmtFacts>>) -> Option<Shaped> {
    let [raw] = parsed.stmts.as_slice() else { return None };
    let stmt = raw.stmt.as_deref()?;
    let dml = matches!(
        stmt.node.as_ref(),
        Some(NodeEnum::SelectStmt(_) | NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_))
    );
    if !dml || !in_value_positions(stmt) {
        return None;
    }
    // Constants in the template's order; each maps onto exactly one literal.
    let consts = super::sqltree::rewrite::template::constants(stmt);
    let mut used = vec![false; scan.literals.len()];
    let mut fills = Vec::with_capacity(consts.len());
    for c in &consts {
        let at = usize::try_from(c.location).ok()?;
        let fill = if let Some(k) = scan.literals.iter().position(|l| l.start == at) {
            Fill::Literal(k)
        } else if let Some(k) = scan.minus.iter().position(|m| *m == Some(at)) {
            Fill::Negated(k)
        } else if c.isnull {
            Fill::Fixed("NULL".into())
        } else if let Some(pb::a_const::Val::Boolval(b)) = &c.val {
            Fill::Fixed(if b.boolval { "true" } else { "false" }.into())
        } else {
            return None;
        };
        if let Fill::Literal(k) | Fill::Negated(k) = fill {
            let slot = used.get_mut(k)?;
            if *slot {
                return None;
            }
            *slot = true;
        }
        fills.push(fill);
    }
    // Every literal token is one of those constants.
    if used.iter().any(|u| !u) {
        return None;
    }
    Some(Shaped {
        facts: facts.clone(),
        stmt: stmt.clone(),
        starts: scan.literals.iter().map(|l| l.start).collect(),
        fills,
    })
}

#[cfg(test)]
#[path = "../tests/pg_shape.rs"]
mod tests;

/// Built-in scalar types a constant may be cast to and still be a plain
/// value (a reg* cast names an object; those are never shared).
const VALUE_TYPES: &[&str] = &[
    "int2",
    "int4",
    "int8",
    "integer",
    "smallint",
    "bigint",
    "numeric",
    "decimal",
    "float4",
    "float8",
    "real",
    "text",
    "varchar",
    "bpchar",
    "char",
    "bool",
    "boolean",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "uuid",
    "json",
    "jsonb",
    "bytea",
    "money",
    "inet",
    "cidr",
    "macaddr",
];

/// Every constant of the statement stands where only its value matters.
fn in_value_positions(stmt: &Node) -> bool {
    fn value(n: &Node) -> bool {
        match n.node.as_ref() {
            Some(NodeEnum::AConst(_)) => true,
            Some(NodeEnum::TypeCast(tc)) => {
                tc.arg.as_deref().is_some_and(|a| matches!(a.node, Some(NodeEnum::AConst(_))))
                    && tc.type_name.as_ref().is_some_and(|t| {
                        t.typmods.is_empty()
                            && t.array_bounds.is_empty()
                            && t.names
                                .last()
                                .and_then(|n| match n.node.as_ref() {
                                    Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                                    _ => None,
                                })
                                .is_some_and(|name| VALUE_TYPES.contains(&name))
                    })
            }
            _ => false,
        }
    }
    fn count(n: Option<&Node>, allowed: &mut usize) {
        let Some(n) = n else { return };
        if value(n) {
            *allowed += 1;
        } else if let Some(NodeEnum::List(l)) = n.node.as_ref() {
            for item in &l.items {
                if value(item) {
                    *allowed += 1;
                }
            }
        }
    }
    let mut total = 0usize;
    let mut allowed = 0usize;
    super::sqltree::each_node(stmt, &mut |e| match e {
        NodeEnum::AConst(_) => total += 1,
        NodeEnum::AExpr(a) => {
            count(a.lexpr.as_deref(), &mut allowed);
            count(a.rexpr.as_deref(), &mut allowed);
        }
        NodeEnum::SelectStmt(s) => {
            for row in &s.values_lists {
                count(Some(row), &mut allowed);
            }
            count(s.limit_count.as_deref(), &mut allowed);
            count(s.limit_offset.as_deref(), &mut allowed);
        }
        NodeEnum::ResTarget(r) => count(r.val.as_deref(), &mut allowed),
        _ => {}
    });
    total == allowed
}
