//! Rewrites by statement shape. A workload that inlines its values
//! (`… WHERE aid = 12345` with a new number each time) sends a new text for
//! every statement, so the exact-text cache never hits. The rewrite never
//! reads a constant's value, only where constants stand, so statements that
//! differ only in their constants share one rewrite with holes where the
//! constants go.
//!
//! Correct by construction, not by trust in a key:
//! - the shape is the parse tree itself (PostgreSQL's grammar) with constant
//!   values and source positions cleared; a template is used only when the
//!   new statement's shape is equal to the one it was built from;
//! - a template is kept only if filling it with its own statement's
//!   constants parses to the same tree as the direct rewrite of that
//!   statement (constants in positions that are not plain values, such as
//!   an interval's fields, fail this and are never templated);
//! - constants in type modifiers stay part of the shape.

use std::hash::{Hash, Hasher};

use pg_query::{
    protobuf::{self as pb, a_const::Val},
    Node, NodeEnum,
};
use prost::Message;

use super::{without_positions, Refusal, Resolve, Rewritten};
use crate::{
    pipeline::literals::Literal,
    postgres::{
        shape::Fill,
        sqltree::{quote_literal, walk_gen},
    },
};

/// Placeholder parameters start here, above any parameter a statement uses.
const PLACEHOLDER_BASE: i64 = 1_000_000;

/// A statement's shape: its tree with constant values and positions
/// cleared, and a hash of it for lookups.
pub struct Shape {
    pub key: u64,
    tree: Node,
    /// The constants, in walk order.
    consts: Vec<pb::AConst>,
}

/// The rewrite of every statement of one shape.
#[derive(Debug, Clone)]
pub struct Template {
    tree: Node,
    /// None: the shape needs no rewrite.
    text: Option<String>,
    /// (start, end, constant index) in `text`.
    holes: Vec<(usize, usize, usize)>,
    notices: Vec<String>,
    masked: Vec<String>,
}

/// Visit the constants a shape abstracts, in a fixed order: every A_Const
/// except those in type names (a type modifier is part of the shape).
fn constants_mut(n: &mut Node, f: &mut dyn FnMut(&mut Node)) {
    struct V<'f>(&'f mut dyn FnMut(&mut Node));
    impl walk_gen::VisitMut for V<'_> {
        fn node(&mut self, n: &mut Node) {
            match n.node.as_mut() {
                Some(NodeEnum::AConst(_)) => (self.0)(n),
                Some(NodeEnum::TypeName(_)) => {}
                Some(NodeEnum::TypeCast(tc)) => {
                    if let Some(a) = tc.arg.as_deref_mut() {
                        self.node(a);
                    }
                }
                Some(e) => walk_gen::children_mut(e, self),
                None => {}
            }
        }
    }
    walk_gen::VisitMut::node(&mut V(f), n);
}

/// A statement's constants in template order, with their positions.
pub fn constants(stmt: &Node) -> Vec<pb::AConst> {
    let mut tree = stmt.clone();
    let mut out = Vec::new();
    constants_mut(&mut tree, &mut |n| {
        if let Some(NodeEnum::AConst(c)) = n.node.as_ref() {
            out.push(c.clone());
        }
    });
    out
}

/// The shape of one statement.
pub fn shape(stmt: &Node) -> Shape {
    let mut tree = stmt.clone();
    let mut consts = Vec::new();
    constants_mut(&mut tree, &mut |n| {
        if let Some(NodeEnum::AConst(c)) = n.node.as_mut() {
            consts.push(c.clone());
            *c = pb::AConst { isnull: false, location: 0, val: None };
        }
    });
    let tree = without_positions(&tree);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tree.encode_to_vec().hash(&mut h);
    Shape { key: h.finish(), tree, consts }
}

/// A constant as SQL text (standard_conforming_strings is pinned on).
fn render(c: &pb::AConst) -> Option<String> {
    if c.isnull {
        return Some("NULL".into());
    }
    Some(match c.val.as_ref()? {
        Val::Ival(i) if i.ival < 0 => format!("({})", i.ival),
        Val::Ival(i) => i.ival.to_string(),
        Val::Fval(f) if f.fval.starts_with('-') => format!("({})", f.fval),
        Val::Fval(f) => f.fval.clone(),
        Val::Boolval(b) => if b.boolval { "true" } else { "false" }.into(),
        Val::Sval(s) => quote_literal(&s.sval),
        Val::Bsval(b) => {
            let digits = b.bsval.get(1..)?;
            match b.bsval.get(..1)? {
                "b" | "B" => format!("B'{digits}'"),
                "x" | "X" => format!("X'{digits}'"),
                _ => return None,
            }
        }
    })
}

impl Template {
    /// Whether `s` has this template's shape.
    pub fn fits(&self, s: &Shape) -> bool {
        self.tree == s.tree
    }

    /// This shape's rewrite with `s`'s constants.
    pub fn apply(&self, s: &Shape) -> Option<Rewritten> {
        let text = match &self.text {
            None => None,
            Some(t) => {
                let mut out = String::with_capacity(t.len() + 64);
                let mut at = 0;
                for (start, end, i) in &self.holes {
                    out.push_str(t.get(at..*start)?);
                    out.push_str(&render(s.consts.get(*i)?)?);
                    at = *end;
                }
                out.push_str(t.get(at..)?);
                Some(out)
            }
        };
        Some(Rewritten { text, notices: self.notices.clone(), masked: self.masked.clone() })
    }
}

impl Template {
    /// This shape's rewrite for a statement of the same scanner shape (see
    /// `postgres::shape`): each hole gets the literal token's own text, as
    /// the workload wrote it.
    pub fn fill_tokens(&self, fills: &[Fill], sql: &str, literals: &[Literal]) -> Option<Rewritten> {
        let text = match &self.text {
            None => None,
            Some(t) => {
                let raw = |k: &usize| literals.get(*k).and_then(|l| sql.get(l.start..l.end));
                let mut out = String::with_capacity(t.len() + 64);
                let mut at = 0;
                for (start, end, i) in &self.holes {
                    out.push_str(t.get(at..*start)?);
                    match fills.get(*i)? {
                        Fill::Literal(k) => out.push_str(raw(k)?),
                        Fill::Negated(k) => {
                            out.push_str("(-");
                            out.push_str(raw(k)?);
                            out.push(')');
                        }
                        Fill::Fixed(s) => out.push_str(s),
                    }
                    at = *end;
                }
                out.push_str(t.get(at..)?);
                Some(out)
            }
        };
        Some(Rewritten { text, notices: self.notices.clone(), masked: self.masked.clone() })
    }

    /// Whether filling with tokens reproduces `r` for this statement (checked
    /// once per shape, on the statement it was built from).
    pub fn tokens_reproduce(&self, fills: &[Fill], sql: &str, literals: &[Literal], r: &Rewritten) -> bool {
        match (self.fill_tokens(fills, sql, literals).map(|f| f.text), &r.text) {
            (Some(None), None) => true,
            (Some(Some(a)), Some(b)) => same_tree(&a, b),
            _ => false,
        }
    }
}

/// Build the template of a single statement's shape, or None when this
/// shape cannot have one (the caller rewrites directly). A refusal is the
/// shape's refusal: every statement of the shape gets it.
pub fn build(stmt: &Node, version: i32, shape: &Shape, r: &dyn Resolve) -> Result<Option<Template>, Refusal> {
    // Placeholders above every parameter the statement uses.
    let mut top = 0i64;
    crate::postgres::sqltree::each_node(stmt, &mut |e| {
        if let NodeEnum::ParamRef(p) = e {
            top = top.max(i64::from(p.number));
        }
    });
    let base = PLACEHOLDER_BASE + top;
    if base + shape.consts.len() as i64 >= i64::from(i32::MAX) {
        return Ok(None);
    }
    let mut holed = stmt.clone();
    let mut i = 0i64;
    constants_mut(&mut holed, &mut |n| {
        let location = match n.node.as_ref() {
            Some(NodeEnum::AConst(c)) => c.location,
            _ => 0,
        };
        n.node = Some(NodeEnum::ParamRef(pb::ParamRef { number: (base + i) as i32, location }));
        i += 1;
    });
    // A refusal of the statement itself comes from its direct rewrite;
    // one that only the placeholders cause means no template.
    let direct = super::rewrite_statement(stmt, version, r)?;
    let Ok(rewritten) = super::rewrite_statement(&holed, version, r) else { return Ok(None) };
    let mut holes = Vec::new();
    if let Some(text) = &rewritten.text {
        let Ok(tokens) = pg_query::scan_tokens(text) else { return Ok(None) };
        for t in tokens {
            if pb::Token::try_from(t.token) != Ok(pb::Token::Param) {
                continue;
            }
            let (Ok(start), Ok(end)) = (usize::try_from(t.start), usize::try_from(t.end)) else { return Ok(None) };
            let Some(n) = text.get(start + 1..end).and_then(|d| d.parse::<i64>().ok()) else { return Ok(None) };
            if n >= base {
                holes.push((start, end, usize::try_from(n - base).unwrap_or(usize::MAX)));
            }
        }
        // Every constant exactly once (the rewrite moves values, it never
        // copies or drops them).
        let mut seen: Vec<usize> = holes.iter().map(|h| h.2).collect();
        seen.sort_unstable();
        if seen != (0..shape.consts.len()).collect::<Vec<_>>() {
            return Ok(None);
        }
    }
    let template = Template {
        tree: shape.tree.clone(),
        text: rewritten.text,
        holes,
        notices: rewritten.notices,
        masked: rewritten.masked,
    };
    // Kept only if it reproduces the direct rewrite of its own statement.
    let Some(filled) = template.apply(shape) else { return Ok(None) };
    let same = match (&filled.text, &direct.text) {
        (None, None) => true,
        (Some(a), Some(b)) => same_tree(a, b),
        _ => false,
    };
    Ok(same.then_some(template))
}

fn same_tree(a: &str, b: &str) -> bool {
    let first = |s: &str| {
        pg_query::parse(s, 0)
            .ok()
            .and_then(|p| p.protobuf.stmts.into_iter().next())
            .and_then(|s| s.stmt)
            .map(|n| without_positions(&n))
    };
    match (first(a), first(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}
