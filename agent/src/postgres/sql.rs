//! PostgreSQL's own grammar (libpg_query, through pg_query) turned into the
//! pipeline's protocol-agnostic statement facts. Every statement of a
//! multi-statement query is analysed. A parse failure is an error, which
//! the session turns into a deny. Results are cached by query text (bounded).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use pg_query::NodeEnum;

use super::shape::Shaped;

use crate::pipeline::{
    guard::{CopyTarget, StmtFacts, StmtKind, TableRef},
    literals::Literal,
};

/// Most distinct query texts kept; the cache is cleared when full (cheap,
/// and a workload that never repeats a text gains nothing from keeping it).
const CACHE_MAX: usize = 4096;
/// Longer texts are parsed every time rather than kept.
const CACHE_MAX_TEXT: usize = 8192;

pub type Analysis = Result<Arc<Vec<StmtFacts>>, String>;

#[derive(Default)]
pub struct Cache {
    /// Exact text → its preparation.
    prepared: Mutex<HashMap<String, Reading>>,
    /// Scanner key → what statements of that shape share (see shape.rs).
    shapes: Mutex<HashMap<String, Arc<Shaped>>>,
}

/// A statement text, read once: its analysis, its literals and, when it
/// has a shared shape, that shape.
#[derive(Clone)]
pub struct Reading {
    pub facts: Analysis,
    pub literals: Arc<[Literal]>,
    pub shape: Option<(Arc<str>, Arc<Shaped>)>,
}

impl Cache {
    /// Read a text for the pipeline: by the exact text if seen before, else
    /// by its scanner shape if one is shared, else parsed (once) and
    /// analysed. Every path goes through PostgreSQL's own scanner and
    /// parser; see shape.rs for when a shape may be shared.
    pub fn read(&self, sql: &str) -> Reading {
        if let Some(p) = self.prepared.lock().ok().and_then(|m| m.get(sql).cloned()) {
            return p;
        }
        if sql.contains('\0') {
            return Reading {
                facts: Err("the query contains a NUL byte".into()),
                literals: Arc::from(Vec::new()),
                shape: None,
            };
        }
        let scan = super::shape::scan(sql);
        if let Some(key) = &scan.key {
            if let Some(s) = self.shapes.lock().ok().and_then(|m| m.get(key).cloned()) {
                return Reading {
                    facts: Ok(s.facts.clone()),
                    literals: scan.literals.into(),
                    shape: Some((key.as_str().into(), s)),
                };
            }
        }
        let parsed = pg_query::parse(sql, 0).map_err(|e| format!("{e}"));
        let facts = parsed.as_ref().map_err(Clone::clone).and_then(|p| {
            match super::prepare::names_reserved(&p.protobuf.stmts) {
                Some(reserved) => Err(reserved),
                None => Ok(Arc::new(analyse_parsed(&p.protobuf))),
            }
        });
        let mut shape = None;
        if let (Ok(p), Ok(f), Some(key)) = (&parsed, &facts, &scan.key) {
            if let Some(s) = super::shape::shaped(&p.protobuf, &scan, f) {
                let s = Arc::new(s);
                if key.len() <= CACHE_MAX_TEXT {
                    if let Ok(mut m) = self.shapes.lock() {
                        if m.len() >= CACHE_MAX {
                            m.clear();
                        }
                        m.insert(key.clone(), s.clone());
                    }
                }
                shape = Some((Arc::from(key.as_str()), s));
            }
        }
        let p = Reading { facts, literals: scan.literals.into(), shape };
        if sql.len() <= CACHE_MAX_TEXT {
            if let Ok(mut m) = self.prepared.lock() {
                if m.len() >= CACHE_MAX {
                    m.clear();
                }
                m.insert(sql.to_string(), p.clone());
            }
        }
        p
    }
}

/// Shared-shape texts a session read lately, most recent first.
const READ_MEMOS: usize = 8;
/// Longer texts are not kept: a session's memo stays within 16 KiB of
/// texts (the per-connection memory goal is 64 KiB).
const READ_MEMO_MAX_TEXT: usize = 2048;

/// A session's last readings of shared shapes. A text equal to one of them
/// outside its numbers, with numbers of the same form in their place (see
/// `prepare::same_shape`), tokenises the same way: it has the same shape
/// key, so the same shape and analysis, and only its literals' positions
/// and number values differ. Those are rebuilt here, without the scanner
/// or the shared caches' locks, once per statement.
pub struct ReadMemo {
    entries: super::prepare::Recent<Memo>,
}

impl Default for ReadMemo {
    fn default() -> Self {
        Self { entries: super::prepare::Recent::new(READ_MEMOS) }
    }
}

struct Memo {
    text: String,
    numbers: Vec<(usize, usize, super::prepare::Form)>,
    /// Per literal of `reading`: its index in `numbers`, or None when it is
    /// compared as text (a string, a bit string).
    number_of: Vec<Option<usize>>,
    reading: Reading,
}

impl ReadMemo {
    pub fn read(&mut self, sql: &str, cache: &Cache) -> Reading {
        if let Some(reading) = self.entries.find(|m| m.apply(sql)) {
            return reading;
        }
        let reading = cache.read(sql);
        if let Some(m) = Memo::new(sql, &reading) {
            self.entries.push(m);
        }
        reading
    }
}

impl Memo {
    /// Only a reading with a shared shape is kept: its analysis holds for
    /// every text of the shape by construction (shape.rs).
    fn new(sql: &str, reading: &Reading) -> Option<Self> {
        if reading.shape.is_none() || reading.facts.is_err() || sql.len() > READ_MEMO_MAX_TEXT {
            return None;
        }
        let mut numbers = Vec::new();
        let mut number_of = Vec::with_capacity(reading.literals.len());
        let mut end = 0;
        for l in reading.literals.iter() {
            if l.start < end {
                return None;
            }
            end = l.end;
            match super::prepare::form(sql.get(l.start..l.end)?) {
                Some(f) => {
                    number_of.push(Some(numbers.len()));
                    numbers.push((l.start, l.end, f));
                }
                None => number_of.push(None),
            }
        }
        Some(Self { text: sql.to_string(), numbers, number_of, reading: reading.clone() })
    }

    fn apply(&self, sql: &str) -> Option<Reading> {
        let spans = super::prepare::same_shape(&self.text, &self.numbers, sql)?;
        // Every literal moves by what the numbers before it grew or shrank.
        let mut shift: isize = 0;
        let mut literals = Vec::with_capacity(self.reading.literals.len());
        for (l, n) in self.reading.literals.iter().zip(&self.number_of) {
            let lit = match n {
                Some(k) => {
                    let &(start, end) = spans.get(*k)?;
                    let &(_, old_end, _) = self.numbers.get(*k)?;
                    shift = end as isize - old_end as isize;
                    Literal { start, end, value: sql.get(start..end)?.to_string(), labeled: false }
                }
                None => Literal {
                    start: l.start.checked_add_signed(shift)?,
                    end: l.end.checked_add_signed(shift)?,
                    value: l.value.clone(),
                    labeled: false,
                },
            };
            literals.push(lit);
        }
        Some(Reading {
            facts: self.reading.facts.clone(),
            literals: literals.into(),
            shape: self.reading.shape.clone(),
        })
    }
}

/// Settings a governed session may not change: each would make the server
/// read statements, names or values differently from cordon.
pub const PINNED_SETTINGS: [&str; 4] = ["standard_conforming_strings", "client_encoding", "search_path", "names"];

pub fn analyse(sql: &str) -> Result<Vec<StmtFacts>, String> {
    if sql.contains('\0') {
        return Err("the query contains a NUL byte".into());
    }
    let parsed = pg_query::parse(sql, 0).map_err(|e| format!("{e}"))?;
    if let Some(reserved) = super::prepare::names_reserved(&parsed.protobuf.stmts) {
        return Err(reserved);
    }
    Ok(analyse_parsed(&parsed.protobuf))
}

/// The facts of a parsed text.
pub fn analyse_parsed(parsed: &pg_query::protobuf::ParseResult) -> Vec<StmtFacts> {
    let mut out = Vec::new();
    let empty = pg_query::Node { node: None };
    for raw in &parsed.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { continue };
        // Every relation and function named anywhere (the complete walker:
        // pg_query's own lists miss subqueries inside some expressions).
        let node_ref = raw.stmt.as_deref().unwrap_or(&empty);
        let reads: Vec<TableRef> = super::sqltree::relations(&[node_ref]);
        let calls = super::sqltree::functions(node_ref);
        let functions: Vec<String> = calls.iter().map(|(_, f)| f.to_ascii_lowercase()).collect();
        let operators = super::sqltree::operators(node_ref);
        let mut facts = StmtFacts { reads, functions, calls, operators, ..StmtFacts::default() };
        describe(node, &mut facts);
        out.push(facts);
    }
    if out.is_empty() {
        // An empty query (only comments): nothing to run.
        out.push(StmtFacts::default());
    }
    out
}

/// The literals of a statement text, by PostgreSQL's own scanner: strings
/// (standard, E'', dollar-quoted, U&''), numbers, bit strings. A text the
/// scanner rejects has none (it is refused as a parse error anyway).
pub fn literals(sql: &str) -> Vec<Literal> {
    use pg_query::protobuf::Token;
    let Ok(tokens) = pg_query::scan_tokens(sql) else { return Vec::new() };
    let mut out = Vec::new();
    for t in tokens {
        let kind = Token::try_from(t.token).ok();
        let string = matches!(kind, Some(Token::Sconst | Token::Usconst));
        let number = matches!(kind, Some(Token::Iconst | Token::Fconst | Token::Bconst | Token::Xconst));
        if !string && !number {
            continue;
        }
        let (Ok(start), Ok(end)) = (usize::try_from(t.start), usize::try_from(t.end)) else { continue };
        let Some(raw) = sql.get(start..end) else { continue };
        let value = if string { string_value(raw) } else { raw.to_string() };
        out.push(Literal { start, end, value, labeled: false });
    }
    out
}

/// 'it''s' → it's; E'…' and U&'…' lose their prefix; $tag$…$tag$ its tags.
pub(super) fn string_value(raw: &str) -> String {
    let body = raw.trim_start_matches(['E', 'e', 'N', 'n']).trim_start_matches("U&").trim_start_matches("u&");
    if let Some(rest) = body.strip_prefix('$') {
        if let Some(close) = rest.find('$') {
            let tag_len = close + 2;
            if body.len() >= 2 * tag_len {
                return body.get(tag_len..body.len() - tag_len).unwrap_or_default().to_string();
            }
        }
    }
    body.strip_prefix('\'').and_then(|b| b.strip_suffix('\'')).unwrap_or(body).replace("''", "'")
}

fn range_var(r: &pg_query::protobuf::RangeVar) -> TableRef {
    TableRef { schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()), name: r.relname.clone() }
}

fn target_names(list: &[pg_query::protobuf::Node]) -> Vec<String> {
    list.iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::ResTarget(t)) => Some(t.name.clone()),
            _ => None,
        })
        .collect()
}

/// Data-modifying CTEs (`WITH d AS (DELETE FROM t RETURNING *) SELECT …`)
/// write as much as the statement they hide in: their facts join the
/// statement's.
fn merge_ctes(with: Option<&pg_query::protobuf::WithClause>, f: &mut StmtFacts) {
    let Some(with) = with else { return };
    for cte in &with.ctes {
        let Some(NodeEnum::CommonTableExpr(c)) = cte.node.as_ref() else { continue };
        let Some(q) = c.ctequery.as_ref().and_then(|q| q.node.as_ref()) else { continue };
        let mut sub = StmtFacts::default();
        describe(q, &mut sub);
        f.unbounded_write |= sub.unbounded_write;
        f.writes.extend(sub.writes);
        match (&f.kind, sub.kind) {
            (_, StmtKind::Ddl { command }) => f.kind = StmtKind::Ddl { command },
            (StmtKind::Read | StmtKind::Control, StmtKind::Write) => f.kind = StmtKind::Write,
            _ => {}
        }
    }
}

fn describe(node: &NodeEnum, f: &mut StmtFacts) {
    let with = match node {
        NodeEnum::SelectStmt(s) => s.with_clause.as_ref(),
        NodeEnum::InsertStmt(s) => s.with_clause.as_ref(),
        NodeEnum::UpdateStmt(s) => s.with_clause.as_ref(),
        NodeEnum::DeleteStmt(s) => s.with_clause.as_ref(),
        NodeEnum::MergeStmt(s) => s.with_clause.as_ref(),
        _ => None,
    };
    describe_node(node, f);
    merge_ctes(with, f);
}

fn describe_node(node: &NodeEnum, f: &mut StmtFacts) {
    f.kind = match node {
        NodeEnum::SelectStmt(s) => {
            if s.into_clause.is_some() {
                StmtKind::Ddl { command: "SELECT INTO".into() }
            } else {
                StmtKind::Read
            }
        }
        NodeEnum::InsertStmt(s) => {
            if let Some(r) = &s.relation {
                let mut cols = target_names(&s.cols);
                let all = cols.is_empty();
                if let Some(oc) = &s.on_conflict_clause {
                    cols.extend(target_names(&oc.target_list));
                }
                f.writes.push((range_var(r), (!all).then_some(cols)));
            }
            StmtKind::Write
        }
        NodeEnum::UpdateStmt(s) => {
            if let Some(r) = &s.relation {
                f.writes.push((range_var(r), Some(target_names(&s.target_list))));
            }
            if let Some(r) = &s.relation {
                f.unbounded_write = !super::sqltree::bounded(s.where_clause.as_deref(), r);
            }
            StmtKind::Write
        }
        NodeEnum::DeleteStmt(s) => {
            if let Some(r) = &s.relation {
                f.writes.push((range_var(r), None));
                f.unbounded_write = !super::sqltree::bounded(s.where_clause.as_deref(), r);
            }
            StmtKind::Write
        }
        // MERGE writes with every action (UPDATE, DELETE, INSERT), and its
        // join condition is its WHERE.
        NodeEnum::MergeStmt(s) => {
            if let Some(r) = &s.relation {
                f.writes.push((range_var(r), None));
                f.unbounded_write = !super::sqltree::bounded(s.join_condition.as_deref(), r);
            }
            StmtKind::Write
        }
        NodeEnum::CopyStmt(s) => {
            let target = if s.is_program {
                CopyTarget::Program
            } else if s.filename.is_empty() {
                CopyTarget::Client
            } else {
                CopyTarget::File
            };
            if let Some(r) = &s.relation {
                if !s.is_from {
                    f.reads.push(range_var(r));
                }
            }
            if s.is_from {
                if let Some(r) = &s.relation {
                    let cols: Vec<String> = s
                        .attlist
                        .iter()
                        .filter_map(|n| match n.node.as_ref() {
                            Some(NodeEnum::String(v)) => Some(v.sval.clone()),
                            _ => None,
                        })
                        .collect();
                    f.writes.push((range_var(r), (!cols.is_empty()).then_some(cols)));
                }
                StmtKind::CopyIn { from: target }
            } else {
                StmtKind::CopyOut { to: target }
            }
        }
        NodeEnum::DoStmt(_) => StmtKind::Do,
        NodeEnum::ExplainStmt(e) => {
            // EXPLAIN ANALYZE runs its statement: judge what it would run.
            match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) => {
                    describe(inner, f);
                    return;
                }
                None => StmtKind::Read,
            }
        }
        NodeEnum::DeclareCursorStmt(d) => match d.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => {
                describe(inner, f);
                return;
            }
            None => StmtKind::Read,
        },
        NodeEnum::PrepareStmt(p) => match p.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => {
                describe(inner, f);
                return;
            }
            None => StmtKind::Control,
        },
        NodeEnum::CallStmt(_) => StmtKind::Write,
        // With standard_conforming_strings off, backslashes escape quotes
        // and the server would read a statement differently from cordon's
        // parser: changing it is refused like DDL.
        // client_encoding: cordon reads statements and values as UTF-8.
        // search_path: unqualified names would resolve to other tables than
        // the ones cordon classified.
        NodeEnum::VariableSetStmt(v) if PINNED_SETTINGS.iter().any(|p| v.name.eq_ignore_ascii_case(p)) => {
            StmtKind::Ddl { command: format!("SET {}", v.name.to_ascii_lowercase()) }
        }
        NodeEnum::TransactionStmt(_)
        | NodeEnum::VariableSetStmt(_)
        | NodeEnum::VariableShowStmt(_)
        | NodeEnum::ListenStmt(_)
        | NodeEnum::UnlistenStmt(_)
        | NodeEnum::NotifyStmt(_)
        | NodeEnum::DiscardStmt(_)
        | NodeEnum::LockStmt(_)
        | NodeEnum::DeallocateStmt(_)
        | NodeEnum::ClosePortalStmt(_)
        | NodeEnum::FetchStmt(_)
        | NodeEnum::ExecuteStmt(_)
        | NodeEnum::ConstraintsSetStmt(_)
        | NodeEnum::CheckPointStmt(_) => StmtKind::Control,
        other => StmtKind::Ddl { command: command_name(other) },
    };
}

/// "DROP TABLE", "TRUNCATE", "ALTER TABLE", … for messages.
fn command_name(node: &NodeEnum) -> String {
    match node {
        NodeEnum::DropStmt(d) => {
            let t =
                pg_query::protobuf::ObjectType::try_from(d.remove_type).map(|o| format!("{o:?}")).unwrap_or_default();
            let t = t.trim_start_matches("Object").to_ascii_uppercase();
            if t.is_empty() {
                "DROP".into()
            } else {
                format!("DROP {t}")
            }
        }
        NodeEnum::TruncateStmt(_) => "TRUNCATE".into(),
        NodeEnum::AlterTableStmt(_) => "ALTER TABLE".into(),
        NodeEnum::CreateStmt(_) => "CREATE TABLE".into(),
        NodeEnum::IndexStmt(_) => "CREATE INDEX".into(),
        NodeEnum::CreateTableAsStmt(_) => "CREATE TABLE AS".into(),
        NodeEnum::GrantStmt(_) => "GRANT".into(),
        NodeEnum::RenameStmt(_) => "ALTER … RENAME".into(),
        NodeEnum::CommentStmt(_) => "COMMENT".into(),
        NodeEnum::SecLabelStmt(_) => "SECURITY LABEL".into(),
        NodeEnum::CreateFunctionStmt(_) => "CREATE FUNCTION".into(),
        NodeEnum::ViewStmt(_) => "CREATE VIEW".into(),
        NodeEnum::VacuumStmt(v) => if v.is_vacuumcmd { "VACUUM" } else { "ANALYZE" }.into(),
        NodeEnum::AlterSystemStmt(_) => "ALTER SYSTEM".into(),
        NodeEnum::CreatedbStmt(_) => "CREATE DATABASE".into(),
        NodeEnum::DropdbStmt(_) => "DROP DATABASE".into(),
        NodeEnum::RefreshMatViewStmt(_) => "REFRESH MATERIALIZED VIEW".into(),
        NodeEnum::CreateTrigStmt(_) => "CREATE TRIGGER".into(),
        NodeEnum::RuleStmt(_) => "CREATE RULE".into(),
        NodeEnum::DefineStmt(_) => "CREATE AGGREGATE/OPERATOR/TYPE".into(),
        NodeEnum::CompositeTypeStmt(_) => "CREATE TYPE".into(),
        NodeEnum::CreateSeqStmt(_) => "CREATE SEQUENCE".into(),
        NodeEnum::AlterSeqStmt(_) => "ALTER SEQUENCE".into(),
        NodeEnum::LoadStmt(_) => "LOAD".into(),
        other => sql_words(&format!("{other:?}")),
    }
}

/// `AlterDefaultPrivilegesStmt(…)` → `ALTER DEFAULT PRIVILEGES`: the parse
/// node's name in the words of the SQL command.
fn sql_words(debug: &str) -> String {
    let name = debug.split('(').next().unwrap_or("utility statement").trim_end_matches("Stmt");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    if out.is_empty() {
        "a utility statement".into()
    } else {
        out
    }
}

#[cfg(test)]
#[path = "../tests/pg_sql.rs"]
mod tests;
