//! Statements cordon prepares upstream on a simple-protocol client's behalf.
//!
//! A workload that inlines its values (`… WHERE aid = 48213`, a new number
//! each time) makes PostgreSQL parse and plan every statement, cordon's
//! mask-at-read rewrite included. When the same statement comes again with
//! other numbers, cordon sends it as a named prepared statement (Parse once
//! per upstream connection, then Bind, Describe, Execute, Sync) and drops
//! the extra confirmations the client never asked for. PostgreSQL then
//! plans it from its plan cache.
//!
//! Nothing a statement means may change, so only what is provably a value
//! becomes a parameter:
//! - only a single SELECT (without INTO), INSERT, UPDATE or DELETE, with no
//!   `$n` of its own;
//! - only a plain decimal number (never a string, whose type PostgreSQL
//!   infers from where it stands, which a parameter does not always get),
//!   typed exactly as PostgreSQL types that constant (int4, int8 or numeric
//!   by its value); the two values whose negation changes their type
//!   (2147483648, 9223372036854775808) stay inline;
//! - only where PostgreSQL reads the constant as a value: an operand, a
//!   function's or a cast's argument, a list, VALUES, a select or SET
//!   item, LIMIT/OFFSET. An ORDER BY or GROUP BY position, a type modifier
//!   or an ON CONFLICT inference clause (matched against index definitions)
//!   keep their constants;
//! - equal constants share one parameter, so expressions PostgreSQL matches
//!   against each other (a GROUP BY item and its select item) stay equal.
//!
//! Which constants qualify is decided once per text shape (the text with
//! its numbers abstracted, token kinds kept) from PostgreSQL's own parse
//! tree, and checked by parsing the parameterised text once.
//!
//! The names cordon uses start with `__cordon_`; a session may not Parse,
//! Bind, Describe, Close, PREPARE, EXECUTE or DEALLOCATE such a name.
//!
//! Each name is used once per agent run (`__cordon_<run>_<n>`, `run`
//! random at start, `n` counted across sessions). A connection pooler
//! between cordon and PostgreSQL may hand one backend to many sessions in
//! turn: a name two sessions shared could then bind another session's
//! text, under another profile's masks. With names never reused, a
//! statement a backend lacks is an error (26000), never another statement.
//!
//! Preparing also needs the same backend from one transaction to the next,
//! which a transaction pooler does not give. A session therefore prepares
//! only after the server proved it is the backend it named at startup: the
//! session asks `pg_backend_pid()` once, pipelined ahead of the client's
//! first statement, and compares it with the BackendKeyData's process id
//! (a pooler sends a key of its own). Statements of cordon's that still
//! vanish (26000, twice) end preparing for the session.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use pg_query::{protobuf::Token, Node, NodeEnum};

use super::sqltree::{each_node, walk_gen};

mod named;
pub use named::{close, ParseAs, Sent, Upstream, MAX_PREPARED};

/// The prefix of the statement names cordon prepares upstream.
pub const PREFIX: &str = "__cordon_";
/// What asks the server which backend answers (see the module comment).
pub const BACKEND_PROBE: &str = "select pg_catalog.pg_backend_pid()";
/// What a statement that names one of cordon's statements is told.
pub const RESERVED: &str = "the statement names a prepared statement in cordon's reserved namespace";

/// Most text shapes whose plans are kept (cleared when full).
const PLANS_MAX: usize = 4096;
/// Longer texts are not prepared.
const MAX_TEXT: usize = 16 * 1024;
/// Longer texts are parameterised by the scanner each time, not kept in a
/// session's memos (16 of them stay within 32 KiB).
const MEMO_MAX_TEXT: usize = 2048;
/// A Bind carries at most this many parameters.
const MAX_PARAMS: usize = u16::MAX as usize;

const INT4: u32 = 23;
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;

/// Per text shape: which of its numbers may be parameters (None: the text
/// is never prepared).
#[derive(Default)]
pub struct Plans {
    map: Mutex<HashMap<String, Option<Arc<[bool]>>>>,
}

/// A statement text with its values lifted out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameterized {
    /// The parameterised text and its parameter types: what one prepared
    /// statement serves.
    pub key: String,
    pub text: String,
    pub types: Vec<u32>,
    pub values: Vec<String>,
}

/// A number token of a text.
struct Number {
    start: usize,
    end: usize,
    /// The token before it is a `-` starting here (PostgreSQL folds the
    /// sign into the constant, located at the sign).
    minus: Option<usize>,
}

impl Plans {
    /// `text` with its values as parameters, or None when it is not to be
    /// prepared (see the module comment).
    pub fn parameterize(&self, text: &str) -> Option<Parameterized> {
        self.parameterize_memo(text).map(|(p, _)| p)
    }

    /// As `parameterize`, with what a session keeps to lift the numbers
    /// out of the next text of the same shape without the scanner.
    fn parameterize_memo(&self, text: &str) -> Option<(Parameterized, Memo)> {
        if text.len() > MAX_TEXT || text.contains('\0') {
            return None;
        }
        let tokens = pg_query::scan_tokens(text).ok()?;
        let mut numbers = Vec::new();
        let mut key = String::with_capacity(text.len());
        let mut at = 0;
        let mut prev_minus = None;
        for t in &tokens {
            let kind = Token::try_from(t.token).ok();
            let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
            let raw = text.get(start..end)?;
            match kind {
                Some(Token::Param) => return None,
                Some(Token::SqlComment | Token::CComment) => continue,
                Some(k @ (Token::Iconst | Token::Fconst)) if decimal(raw) => {
                    key.push_str(text.get(at..start)?);
                    key.push_str(if k == Token::Iconst { "\u{1}i" } else { "\u{1}f" });
                    at = end;
                    numbers.push(Number { start, end, minus: prev_minus });
                }
                _ => {}
            }
            prev_minus = (raw == "-").then_some(start);
        }
        key.push_str(text.get(at..)?);
        let plan = self.plan(&key, text, &numbers)?;
        let p = build(text, &numbers, &plan)?;
        let memo = Memo {
            text: text.to_string(),
            numbers: numbers
                .iter()
                .map(|n| Some((n.start, n.end, form(text.get(n.start..n.end)?)?)))
                .collect::<Option<_>>()?,
            plan,
        };
        Some((p, memo))
    }

    fn plan(&self, key: &str, text: &str, numbers: &[Number]) -> Option<Arc<[bool]>> {
        if let Some(p) = self.map.lock().ok().and_then(|m| m.get(key).cloned()) {
            return p;
        }
        let plan = decide(text, numbers).map(Arc::from);
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= PLANS_MAX {
                m.clear();
            }
            m.insert(key.to_string(), plan.clone());
        }
        plan
    }
}

/// A text parameterised before, kept by its session: its number tokens
/// (start, end, digits only) and which are parameters. A later text that
/// equals it byte for byte outside those numbers, with numbers of the same
/// form in their place, tokenises the same way (the scanner's choices
/// around a number depend on the text beside it, which is equal, and on
/// the number's form, which is the same), so it parses to the same tree
/// with other constant values: the plan holds for it without the scanner.
struct Memo {
    text: String,
    numbers: Vec<(usize, usize, Form)>,
    plan: Arc<[bool]>,
}

impl Memo {
    /// `text` parameterised by this memo's plan, if it has the same shape.
    fn apply(&self, text: &str) -> Option<Parameterized> {
        let numbers: Vec<Number> = same_shape(&self.text, &self.numbers, text)?
            .into_iter()
            .map(|(start, end)| Number { start, end, minus: None })
            .collect();
        build(text, &numbers, &self.plan)
    }
}

/// The scanner's kind of a plain decimal number. PostgreSQL 15's scanner
/// makes an integer that does not fit int4 an FCONST, not an ICONST, so
/// those are different tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    Int4,
    Wide,
    Fraction,
    /// A fraction written from its point (`.5`). Only such a number can
    /// follow a word with nothing between (`select.5`); one that starts
    /// with a digit there would join the word (`select5.5` is the name
    /// `select5` and then `.5`). So the two never stand for each other.
    Point,
}

/// The form of a number token's text; None for anything but a plain
/// decimal number (see `decimal`).
pub(crate) fn form(raw: &str) -> Option<Form> {
    if !decimal(raw) {
        return None;
    }
    Some(match (is_int(raw), raw.parse::<i32>().is_ok()) {
        _ if raw.starts_with('.') => Form::Point,
        (false, _) => Form::Fraction,
        (true, true) => Form::Int4,
        (true, false) => Form::Wide,
    })
}

/// The number spans of `new` when it has the shape of `old`: equal byte
/// for byte outside `old`'s numbers `spans` (start, end, form), with
/// numbers of the same form in their place. Such a text tokenises as `old`
/// did (see `Memo`): this is what lets a session skip the scanner for it.
pub(crate) fn same_shape(old: &str, spans: &[(usize, usize, Form)], new: &str) -> Option<Vec<(usize, usize)>> {
    let (o, n) = (old.as_bytes(), new.as_bytes());
    let mut out = Vec::with_capacity(spans.len());
    let (mut at_old, mut at_new) = (0, 0);
    for &(start, end, f) in spans {
        let lit = o.get(at_old..start)?;
        if n.get(at_new..at_new + lit.len())? != lit {
            return None;
        }
        let n_start = at_new + lit.len();
        let n_end = n_start + munch(n.get(n_start..)?);
        if form(new.get(n_start..n_end)?)? != f {
            return None;
        }
        out.push((n_start, n_end));
        at_old = end;
        at_new = n_end;
    }
    (o.get(at_old..)? == n.get(at_new..)?).then_some(out)
}

/// A session's memos (see `Memo` and `sql::ReadMemo`), most recent first,
/// at most `cap`: the one that serves a text moves to the front.
pub(crate) struct Recent<T> {
    items: Vec<T>,
    cap: usize,
}

impl<T> Recent<T> {
    pub(crate) fn new(cap: usize) -> Self {
        Self { items: Vec::new(), cap }
    }

    /// The first answer a memo gives, that memo moved to the front.
    pub(crate) fn find<R>(&mut self, mut answer: impl FnMut(&T) -> Option<R>) -> Option<R> {
        let (i, r) = self.items.iter().enumerate().find_map(|(i, m)| answer(m).map(|r| (i, r)))?;
        if i > 0 {
            let m = self.items.remove(i);
            self.items.insert(0, m);
        }
        Some(r)
    }

    /// Keep `item` first; the least recent goes beyond `cap`.
    pub(crate) fn push(&mut self, item: T) {
        self.items.truncate(self.cap.saturating_sub(1));
        self.items.insert(0, item);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn first(&self) -> Option<&T> {
        self.items.first()
    }
}

/// How long the number at the start of `b` is, as the scanner munches it:
/// digits, a point and digits, an exponent only when digits follow it.
fn munch(b: &[u8]) -> usize {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = digits(0);
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        let end = digits(i + 1 + sign);
        if end > i + 1 + sign {
            i = end;
        }
    }
    i
}

fn is_int(raw: &str) -> bool {
    raw.bytes().all(|b| b.is_ascii_digit())
}

/// A plain decimal number as PostgreSQL 15's scanner reads it (no
/// underscores, no 0x/0o/0b, which newer scanners accept and older servers
/// read differently).
fn decimal(raw: &str) -> bool {
    let b = raw.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let s = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - s
    };
    let int = digits(&mut i);
    let mut frac = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac = digits(&mut i);
    }
    if int + frac == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The type PostgreSQL gives a number constant (`make_const`): int4 if the
/// integer fits, else int8, else numeric; any fraction or exponent is
/// numeric. None for the values whose type a minus sign changes.
fn number_type(raw: &str) -> Option<u32> {
    if raw.contains(['.', 'e', 'E']) {
        return Some(NUMERIC);
    }
    let digits = raw.trim_start_matches('0');
    if digits.len() > 19 {
        return Some(NUMERIC);
    }
    let v: u64 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    match v {
        2_147_483_648 | 9_223_372_036_854_775_808 => None,
        v if v <= i32::MAX as u64 => Some(INT4),
        v if v <= i64::MAX as u64 => Some(INT8),
        _ => Some(NUMERIC),
    }
}

/// Which numbers of `text` stand where PostgreSQL reads them as values, from
/// its parse tree; None when the statement is not to be prepared.
fn decide(text: &str, numbers: &[Number]) -> Option<Vec<bool>> {
    let parsed = pg_query::parse(text, 0).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else { return None };
    let stmt = raw.stmt.as_deref()?;
    match stmt.node.as_ref()? {
        NodeEnum::SelectStmt(s) if s.into_clause.is_none() => {}
        NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) => {}
        _ => return None,
    }
    let mut v = Values::default();
    walk_gen::Visit::node(&mut v, stmt);
    // A SELECT … INTO anywhere creates a table; a nested one is refused by
    // the server anyway, but never prepare what is not a plain query.
    let mut into = false;
    each_node(stmt, &mut |e| {
        if let NodeEnum::SelectStmt(s) = e {
            into |= s.into_clause.is_some();
        }
    });
    if into {
        return None;
    }
    let value = |at: usize| v.safe.contains(&at) && !v.unsafe_.contains(&at);
    let plan: Vec<bool> = numbers.iter().map(|n| value(n.start) || n.minus.is_some_and(value)).collect();
    // Checked once: the text with every chosen number as a parameter parses
    // to one statement of the same kind.
    let probe: Vec<&str> = numbers.iter().map(|_| "0").collect();
    let check = build_with(text, numbers, &plan, &probe, |_, _| Some(INT4))?;
    let reparsed = pg_query::parse(&check.text, 0).ok()?;
    let [again] = reparsed.protobuf.stmts.as_slice() else { return None };
    let same_kind =
        std::mem::discriminant(again.stmt.as_deref()?.node.as_ref()?) == std::mem::discriminant(stmt.node.as_ref()?);
    same_kind.then_some(plan)
}

/// Constant locations by context: `safe` where a parent reads them as
/// values, `unsafe_` where they must stay constants whatever the parent.
#[derive(Default)]
struct Values {
    safe: Vec<usize>,
    unsafe_: Vec<usize>,
}

impl Values {
    fn value(&mut self, n: Option<&Node>) {
        if let Some(NodeEnum::AConst(c)) = n.and_then(|n| n.node.as_ref()) {
            if let Ok(at) = usize::try_from(c.location) {
                self.safe.push(at);
            }
        }
    }
    fn values<'a>(&mut self, ns: impl IntoIterator<Item = &'a Node>) {
        for n in ns {
            self.value(Some(n));
        }
    }
    fn list(&mut self, n: Option<&Node>) {
        match n.and_then(|n| n.node.as_ref()) {
            Some(NodeEnum::List(l)) => self.values(&l.items),
            _ => self.value(n),
        }
    }
    fn all_constants(&mut self, n: &Node) {
        each_node(n, &mut |e| {
            if let NodeEnum::AConst(c) = e {
                if let Ok(at) = usize::try_from(c.location) {
                    self.unsafe_.push(at);
                }
            }
        });
    }
}

impl<'a> walk_gen::Visit<'a> for Values {
    fn node(&mut self, n: &'a Node) {
        let Some(e) = n.node.as_ref() else { return };
        match e {
            NodeEnum::AExpr(a) => {
                self.value(a.lexpr.as_deref());
                self.list(a.rexpr.as_deref());
            }
            NodeEnum::FuncCall(f) => self.values(&f.args),
            NodeEnum::TypeCast(t) => self.value(t.arg.as_deref()),
            NodeEnum::ResTarget(r) => self.value(r.val.as_deref()),
            NodeEnum::AArrayExpr(a) => self.values(&a.elements),
            NodeEnum::CaseExpr(c) => {
                self.value(c.arg.as_deref());
                self.value(c.defresult.as_deref());
            }
            NodeEnum::CaseWhen(c) => {
                self.value(c.expr.as_deref());
                self.value(c.result.as_deref());
            }
            NodeEnum::CoalesceExpr(c) => self.values(&c.args),
            NodeEnum::MinMaxExpr(m) => self.values(&m.args),
            NodeEnum::RowExpr(r) => self.values(&r.args),
            NodeEnum::NullTest(t) => self.value(t.arg.as_deref()),
            NodeEnum::AIndices(i) => {
                self.value(i.lidx.as_deref());
                self.value(i.uidx.as_deref());
            }
            NodeEnum::SelectStmt(s) => {
                for row in &s.values_lists {
                    self.list(Some(row));
                }
                self.value(s.limit_count.as_deref());
                self.value(s.limit_offset.as_deref());
            }
            // Matched against index definitions (expressions, partial
            // index predicates), which only a constant can match.
            NodeEnum::InsertStmt(i) => {
                if let Some(infer) = i.on_conflict_clause.as_ref().and_then(|o| o.infer.as_ref()) {
                    for n in infer.index_elems.iter().chain(infer.where_clause.as_deref()) {
                        self.all_constants(n);
                    }
                }
            }
            _ => {}
        }
        walk_gen::children(e, self);
    }
}

/// The parameterised text for these numbers' values.
fn build(text: &str, numbers: &[Number], plan: &[bool]) -> Option<Parameterized> {
    let raws: Vec<&str> = numbers.iter().map(|n| text.get(n.start..n.end)).collect::<Option<_>>()?;
    build_with(text, numbers, plan, &raws, |raw, _| number_type(raw))
}

fn build_with(
    text: &str,
    numbers: &[Number],
    plan: &[bool],
    raws: &[&str],
    ty: impl Fn(&str, &Number) -> Option<u32>,
) -> Option<Parameterized> {
    if plan.len() != numbers.len() || raws.len() != numbers.len() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut types: Vec<u32> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    let mut at = 0;
    for ((n, &param), &raw) in numbers.iter().zip(plan).zip(raws) {
        let Some(t) = param.then(|| ty(raw, n)).flatten() else { continue };
        // Equal constants share a parameter (see the module comment).
        let k = match values.iter().zip(&types).position(|(v, vt)| v == raw && *vt == t) {
            Some(k) => k,
            None => {
                if values.len() >= MAX_PARAMS {
                    return None;
                }
                values.push(raw.to_string());
                types.push(t);
                values.len() - 1
            }
        };
        let before = text.get(at..n.start)?;
        out.push_str(before);
        // `$1` must not run into a neighbouring word (`SELECT$1` is a name).
        if before.chars().next_back().is_some_and(word_char) {
            out.push(' ');
        }
        let _ = write!(out, "${}", k + 1);
        if text.get(n.end..).and_then(|r| r.chars().next()).is_some_and(word_char) {
            out.push(' ');
        }
        at = n.end;
    }
    out.push_str(text.get(at..)?);
    let mut key = String::with_capacity(out.len() + 1 + types.len() * 5);
    key.push_str(&out);
    key.push('\0');
    for t in &types {
        let _ = write!(key, "{t},");
    }
    Some(Parameterized { key, text: out, types, values })
}

fn word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$' || !c.is_ascii()
}

/// Whether a parsed text names one of cordon's statements (PREPARE,
/// EXECUTE, DEALLOCATE, EXPLAIN EXECUTE …): the message to refuse it with.
pub fn names_reserved(stmts: &[pg_query::protobuf::RawStmt]) -> Option<String> {
    let mut found = None;
    for raw in stmts {
        let Some(stmt) = raw.stmt.as_deref() else { continue };
        each_node(stmt, &mut |e| {
            let name = match e {
                NodeEnum::PrepareStmt(p) => &p.name,
                NodeEnum::ExecuteStmt(x) => &x.name,
                NodeEnum::DeallocateStmt(d) => &d.name,
                _ => return,
            };
            if reserved(name.as_bytes()) && found.is_none() {
                found = Some(format!("{RESERVED} ({name:?}); cordon's names start with {PREFIX}, use another name"));
            }
        });
    }
    found
}

/// Whether a statement name is in cordon's namespace (names are compared as
/// PostgreSQL stores them; an unquoted SQL name is already lower case).
pub fn reserved(name: &[u8]) -> bool {
    name.len() >= PREFIX.len() && name.get(..PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(PREFIX.as_bytes()))
}

#[cfg(test)]
#[path = "../tests/pg_prepare.rs"]
mod tests;
