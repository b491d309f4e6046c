//! What cordon makes of a statement text before it may go upstream: read
//! once (scanner shape or parse), its tables and code looked up, judged by
//! the guardrails, its literals marked and checked, and rewritten to mask
//! at read. The client side (`client.rs`) calls `assess` per Query or Parse.

use super::*;
use crate::postgres::sql::Reading;

/// The SQL text of a Query or Parse message.
pub(super) fn sql_of(f: &Frame) -> Option<String> {
    let mut b = Body::new(f.body());
    match f.tag {
        b'Q' => Some(String::from_utf8_lossy(b.cstr()?).into_owned()),
        b'P' => {
            b.cstr()?;
            Some(String::from_utf8_lossy(b.cstr()?).into_owned())
        }
        _ => None,
    }
}

/// Each statement text of these frames, read once (see `sql::Cache::read`
/// and the session's `sql::ReadMemo`), by frame index.
pub(super) fn prepare_all(
    frames: &[Frame],
    ctx: &Ctx,
    memo: &mut crate::postgres::sql::ReadMemo,
) -> Vec<Option<Reading>> {
    frames.iter().map(|f| sql_of(f).map(|sql| memo.read(&sql, &ctx.pg.sql))).collect()
}

pub(super) async fn resolve_statement_tables(
    prepared: &[Option<Reading>],
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
) -> Result<()> {
    let (Some(cred), Some(catalog)) = (cred, tracker.lock().ok().and_then(|t| t.gov.catalog.clone())) else {
        return Ok(());
    };
    let mut tables = Vec::new();
    let mut functions = Vec::new();
    let mut operators = Vec::new();
    for p in prepared.iter().flatten() {
        if let Ok(facts) = &p.facts {
            for s in facts.iter() {
                tables.extend(s.reads.iter().cloned());
                tables.extend(s.writes.iter().map(|(t, _)| t.clone()));
                functions.extend(s.calls.iter().map(|(_, n)| n.clone()));
                operators.extend(s.operators.iter().cloned());
            }
        }
    }
    if !functions.is_empty() || !operators.is_empty() {
        functions.sort();
        functions.dedup();
        operators.sort();
        operators.dedup();
        catalog.resolve_code(ctx, cred, &functions, &operators).await?;
    }
    if tables.is_empty() {
        return Ok(());
    }
    crate::postgres::read_mask::resolve(&catalog, ctx, cred, tables).await
}

/// Labels for the guardrails, from the catalog cache and the policy.
pub(super) struct Lookup<'a>(&'a Governance);

impl Lookup<'_> {
    fn info(&self, t: &TableRef) -> Option<Arc<crate::postgres::catalog::TableInfo>> {
        self.0.catalog.as_ref()?.by_name(t).flatten()
    }
}

impl LabelLookup for Lookup<'_> {
    fn table_label(&self, t: &TableRef) -> Option<usize> {
        let c = &self.0.classifier;
        match self.info(t) {
            Some(i) => i.labels(c).table,
            None => c.table(&self.0.db, t.schema.as_deref().unwrap_or("public"), &t.name, None),
        }
    }
    fn column_labels(&self, t: &TableRef) -> Vec<(String, usize)> {
        let Some(i) = self.info(t) else { return Vec::new() };
        i.labels(&self.0.classifier).columns.clone()
    }
    fn label_name(&self, rank: usize) -> String {
        self.0.classifier.labels.name(rank).to_string()
    }
    fn user_function(&self, schema: Option<&str>, name: &str) -> Option<guard::UserCode> {
        let found = self.0.catalog.as_ref()?.user_code('f', name)?;
        user_code(&found, schema)
    }
    fn user_operator(&self, name: &str) -> Option<guard::UserCode> {
        let found = self.0.catalog.as_ref()?.user_code('o', name)?;
        user_code(&found, None)
    }
    fn protects_anything(&self) -> bool {
        self.0.profile.protects_anything()
    }
}

/// The user-defined definitions a name may reach: in the schema written,
/// or in any schema when unqualified (overloads resolve by argument types,
/// which cordon does not know; any of them may be the one called).
pub(super) fn user_code(
    found: &[crate::postgres::catalog::UserCodeInfo],
    schema: Option<&str>,
) -> Option<guard::UserCode> {
    let mut hits = found.iter().filter(|f| schema.is_none_or(|s| s == f.schema)).peekable();
    let first = hits.peek().map(|f| format!("{}.{}", f.schema, f.name))?;
    let may_write = hits.any(|f| f.may_write);
    Some(guard::UserCode { qualified: first, may_write })
}

/// The guardrails' verdict on a statement text.
pub(super) fn judge(
    t: &Tracker,
    prepared: &Reading,
    lookup_error: Option<&anyhow::Error>,
) -> (Verdict, Option<Arc<Vec<StmtFacts>>>) {
    let facts = match &prepared.facts {
        Ok(f) => f.clone(),
        Err(e) if e.starts_with(crate::postgres::prepare::RESERVED) => {
            return (Verdict::Deny { rule: "reserved_name".into(), message: e.clone() }, None);
        }
        Err(e) => {
            let v = Verdict::Deny {
                rule: "parse_error".into(),
                message: format!("the statement does not parse ({e}); cordon lets through only what it can read"),
            };
            return (v, None);
        }
    };
    if let Some(e) = lookup_error {
        let v = Verdict::Deny {
            rule: "catalog".into(),
            message: format!("cannot read the database catalog to classify this statement: {e:#}"),
        };
        return (v, Some(facts));
    }
    let lookup = Lookup(&t.gov);
    let verdict = guard::check(&t.gov.profile.guardrails, &facts, &lookup);
    (verdict, Some(facts))
}

pub(super) fn not_utf8() -> Verdict {
    Verdict::Deny {
        rule: "encoding".into(),
        message: "the statement is not valid UTF-8; the session's client_encoding is UTF8".into(),
    }
}

pub(super) fn changes_catalog(facts: &[StmtFacts]) -> bool {
    facts.iter().any(|s| matches!(s.kind, StmtKind::Ddl { .. }))
}

/// `sensitive_literals`: a statement whose literals or parameters carry
/// what the detectors flag (a card, an SSN, a cloud or private key) at or
/// above the profile's minimum label.
pub(super) fn sensitive_values<'a>(t: &Tracker, values: impl IntoIterator<Item = &'a str>, what: &str) -> Verdict {
    let g = &t.gov.profile.guardrails;
    if g.sensitive_literals == guard::Outcome::Allow {
        return Verdict::Allow;
    }
    match crate::pipeline::literals::sensitive(values, &t.gov.classifier, g.sensitive_literals_min_label) {
        Some(kind) => guard::fire(
            g.sensitive_literals,
            "sensitive_literals",
            format!(
                "the statement carries a {} in {what}; this profile does not send such values to the database (they would land in its logs and pg_stat_activity)",
                kind.name()
            ),
        )
        .unwrap_or(Verdict::Allow),
        None => Verdict::Allow,
    }
}

/// Whether any literal could need marking (there are literals, and a
/// table the statement touches has labeled columns).
pub(super) fn mark_needed(t: &Tracker, facts: Option<&[StmtFacts]>, literals: &[Literal]) -> bool {
    let Some(facts) = facts else { return false };
    if literals.is_empty() {
        return false;
    }
    let lookup = Lookup(&t.gov);
    facts.iter().any(|s| {
        s.reads.iter().chain(s.writes.iter().map(|(t, _)| t)).any(|tbl| {
            lookup.table_label(tbl).is_some_and(|l| l > 0) || lookup.column_labels(tbl).iter().any(|(_, l)| *l > 0)
        })
    })
}

/// Literals compared with or written to a labeled column are recorded as
/// hashes too (record_text = "redacted"), whatever the detectors say.
pub(super) fn mark_labeled(t: &Tracker, prepared: &Reading, text: &str, literals: &mut [Literal]) {
    let Ok(facts) = &prepared.facts else { return };
    if literals.is_empty() {
        return;
    }
    let lookup = Lookup(&t.gov);
    let mut names = std::collections::BTreeSet::new();
    let mut tables = Vec::new();
    for s in facts.iter() {
        for tbl in s.reads.iter().chain(s.writes.iter().map(|(t, _)| t)) {
            let cols: Vec<String> =
                lookup.column_labels(tbl).into_iter().filter(|(_, l)| *l > 0).map(|(c, _)| c).collect();
            let whole = lookup.table_label(tbl).is_some_and(|l| l > 0);
            if whole || !cols.is_empty() {
                tables.push((tbl.name.clone(), whole));
            }
            names.extend(cols);
        }
    }
    if tables.is_empty() {
        return;
    }
    let whole_table = tables.iter().any(|(_, w)| *w);
    let labeled = |c: &str| whole_table || names.contains(c);
    let table_labeled = |r: &pg_query::protobuf::RangeVar| tables.iter().any(|(n, _)| *n == r.relname);
    // A shared shape: the first statement's tree, by literal ordinal.
    if let Some((_, shaped)) = &prepared.shape {
        for at in crate::postgres::sqltree::labeled_literals(&shaped.stmt, &labeled, &table_labeled) {
            if let Some(l) = shaped.ordinal_at(at).and_then(|k| literals.get_mut(k)) {
                l.labeled = true;
            }
        }
        return;
    }
    let Ok(parsed) = pg_query::parse(text, 0) else { return };
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_deref() else { continue };
        for at in crate::postgres::sqltree::labeled_literals(stmt, &labeled, &table_labeled) {
            // A negative number's constant starts at its minus sign.
            if let Some(l) = literals.iter_mut().find(|l| l.start == at || l.start == at + 1) {
                l.labeled = true;
            }
        }
    }
}

/// A statement text, judged: the verdict, its facts and literals (labeled
/// ones marked), cordon's notices, and the mask-at-read rewrite to send.
pub(super) struct Assessed {
    pub(super) verdict: Verdict,
    pub(super) facts: Option<Arc<Vec<StmtFacts>>>,
    pub(super) literals: Vec<Literal>,
    pub(super) notes: Arc<ReadNotes>,
    pub(super) rewritten: Option<String>,
}

/// What Query and Parse do with their text before it may go upstream:
/// read it once, judge it, mark its labeled literals, check them for
/// sensitive values, and rewrite it to mask at read.
pub(super) fn assess(
    t: &Tracker,
    ctx: &Ctx,
    raw: &[u8],
    text: &str,
    prepared: Option<Reading>,
    lookup_error: Option<&anyhow::Error>,
) -> Assessed {
    let prepared = prepared.unwrap_or_else(|| ctx.pg.sql.read(text));
    let (mut verdict, facts) =
        if std::str::from_utf8(raw).is_err() { (not_utf8(), None) } else { judge(t, &prepared, lookup_error) };
    let mut literals = prepared.literals.to_vec();
    if mark_needed(t, facts.as_deref().map(|f| f.as_slice()), &literals) {
        mark_labeled(t, &prepared, text, &mut literals);
    }
    if !verdict.is_deny() {
        verdict = verdict.and(sensitive_values(t, literals.iter().map(|l| l.value.as_str()), "its text"));
    }
    let mut notes = Arc::default();
    let mut rewritten = None;
    if !verdict.is_deny() {
        match mask_at_read(t, text, &prepared, &t.gov.profile) {
            Ok((new_text, n)) => {
                notes = n;
                rewritten = new_text;
            }
            Err(refused) => {
                // A label whose action is `approve`: the statement reads it
                // in clear, once people approve exactly this statement.
                let approved = t.gov.approved.as_ref().and_then(|p| mask_at_read(t, text, &prepared, p).ok());
                match (approved, refused) {
                    (Some((new_text, n)), Verdict::Deny { rule, message }) => {
                        verdict = verdict.and(Verdict::Approve { rule, message });
                        notes = n;
                        rewritten = new_text;
                    }
                    (_, refused) => verdict = refused,
                }
            }
        }
    }
    if !verdict.is_deny() {
        verdict = super::hold::sql_prepare_loopholes(t, text, verdict);
    }
    Assessed { verdict, facts, literals, notes, rewritten }
}

/// The mask-at-read rewrite of an admitted statement: the text to send
/// instead (None = unchanged) and the notices, or the refusal.
pub(super) fn mask_at_read(
    t: &Tracker,
    text: &str,
    prepared: &Reading,
    profile: &Profile,
) -> std::result::Result<(Option<String>, Arc<ReadNotes>), Verdict> {
    let Some(catalog) = t.gov.catalog.as_deref() else {
        // Passthrough: no catalog session; results are masked as they
        // come back (README: limits).
        return Ok((None, Arc::default()));
    };
    match crate::postgres::read_mask::rewrite(catalog, &t.gov.classifier, profile, t.gov.key.is_some(), text, prepared)
    {
        Ok(r) => Ok((r.text, Arc::new(ReadNotes { notices: r.notices, masked: r.masked }))),
        Err(e) => Err(Verdict::Deny { rule: e.rule.to_string(), message: e.message }),
    }
}
