//! The PostgreSQL adapter's side of mask at read (the rewrite itself is in
//! `sqltree/rewrite.rs`): the catalog, classified for a profile, as the
//! rewrite's `Resolve`; looking up every relation a statement can reach
//! (through views too) before the session takes its lock; the rewrite cache;
//! and the detectors on text PostgreSQL writes back (errors, notices,
//! notifications).

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use anyhow::Result;
use bytes::{BufMut, Bytes, BytesMut};

use super::sql::Reading;
use super::{
    catalog::{Catalog, TableInfo},
    frame::Body,
    sqltree::{
        self,
        rewrite::{self, template, Column, Refusal, RelKind, Relation, Rewritten, Treatment},
    },
    types, Ctx,
};
use crate::{
    config::Profile,
    pipeline::{
        classify::{Action, Classifier, Strategy},
        guard::TableRef,
        mask::ValueType,
        plan::{self, ColAction},
    },
    secrets::Credential,
};

/// What the rewrite told about a statement, kept with it until it runs.
#[derive(Debug, Default)]
pub struct ReadNotes {
    /// Sent to the client as NOTICEs, once per execution.
    pub notices: Vec<String>,
    /// "column/strategy" for each column masked in the read.
    pub masked: Vec<String>,
}

/// How many levels of views are followed when looking names up.
const MAX_VIEW_DEPTH: usize = 16;

/// The catalog cache seen through one profile's labels.
pub struct Resolver<'a> {
    pub classifier: &'a Classifier,
    pub profile: &'a Profile,
    pub catalog: &'a Catalog,
    /// Whether the secrets file has a pseudonym key (without one,
    /// pseudonym columns are redacted).
    pub has_key: bool,
    seen: RefCell<HashMap<u32, Arc<Relation>>>,
}

impl<'a> Resolver<'a> {
    pub fn new(classifier: &'a Classifier, profile: &'a Profile, catalog: &'a Catalog, has_key: bool) -> Self {
        Self { classifier, profile, catalog, has_key, seen: RefCell::new(HashMap::new()) }
    }

    fn classify(&self, t: &TableInfo) -> Relation {
        let c = self.classifier;
        let table_label = c.table(&t.db, &t.schema, &t.name, c.labels.from_comment(&t.labels_text));
        let columns = t
            .columns
            .iter()
            .map(|col| {
                let labeled = c.column(&t.db, &t.schema, &t.name, &col.name, c.labels.from_comment(&col.labels_text));
                // A table's label covers every column of it.
                let (label, strategy) = match (labeled, table_label) {
                    (Some(l), Some(tl)) if tl > l.label => (Some(tl), Strategy::Redact),
                    (Some(l), _) => (Some(l.label), l.strategy),
                    (None, tl) => (tl, Strategy::Redact),
                };
                let treatment = match label {
                    None => Treatment::Clear,
                    Some(l) => match self.profile.action(l) {
                        Action::Allow => Treatment::Clear,
                        Action::Mask if strategy == Strategy::Pseudonym && self.has_key => {
                            Treatment::Pseudonym { lookups: self.profile.lookups(l) }
                        }
                        Action::Mask => Treatment::Mask { strategy, lookups: self.profile.lookups(l) },
                        // Unapproved: refused here, and the statement is held
                        // (see `Profile::approved`).
                        Action::Deny | Action::Approve => Treatment::Deny { label: c.labels.name(l).to_string() },
                    },
                };
                Column {
                    name: col.name.clone(),
                    type_sql: col.type_sql.clone(),
                    type_oid: col.type_oid,
                    ty: types::value_type(col.type_oid, col.typmod),
                    treatment,
                }
            })
            .collect();
        let kind = match t.relkind {
            'v' => RelKind::View,
            'm' => RelKind::MatView,
            _ => RelKind::Table,
        };
        Relation { schema: t.schema.clone(), name: t.name.clone(), kind, columns, definition: t.definition.clone() }
    }
}

impl rewrite::Resolve for Resolver<'_> {
    fn relation(&self, t: &TableRef) -> Result<Option<Arc<Relation>>, String> {
        match self.catalog.by_name(t) {
            None => Err("it was not looked up in the catalog".into()),
            Some(None) => Ok(None),
            Some(Some(info)) => {
                if let Some(r) = self.seen.borrow().get(&info.oid) {
                    return Ok(Some(r.clone()));
                }
                let r = Arc::new(self.classify(&info));
                self.seen.borrow_mut().insert(info.oid, r.clone());
                Ok(Some(r))
            }
        }
    }

    fn protects_anything(&self) -> bool {
        self.profile.protects_anything()
    }
}

/// Look up every relation these statements name, and the relations inside
/// the views among them, level by level.
pub async fn resolve(catalog: &Catalog, ctx: &Ctx, cred: &Credential, mut names: Vec<TableRef>) -> Result<()> {
    let mut done: Vec<TableRef> = Vec::new();
    for _ in 0..MAX_VIEW_DEPTH {
        names.retain(|n| !done.contains(n));
        if names.is_empty() {
            break;
        }
        catalog.resolve_names(ctx, cred, &names).await?;
        let mut next = Vec::new();
        for n in &names {
            if let Some(Some(info)) = catalog.by_name(n) {
                if let Some(def) = &info.definition {
                    if let Ok(parsed) = pg_query::parse(def, 0) {
                        let stmts: Vec<&pg_query::Node> =
                            parsed.protobuf.stmts.iter().filter_map(|s| s.stmt.as_deref()).collect();
                        next.extend(sqltree::relations(&stmts));
                    }
                }
            }
        }
        done.append(&mut names);
        names = next;
    }
    Ok(())
}

/// The rewrite of `sql` for this profile, cached with the catalog.
pub fn rewrite(
    catalog: &Catalog,
    classifier: &Classifier,
    profile: &Profile,
    has_key: bool,
    sql: &str,
    prepared: &Reading,
) -> Result<Rewritten, Refusal> {
    if let Some(hit) = catalog.cached_rewrite(&profile.name, sql) {
        return (*hit).clone();
    }
    // A statement of a shared scanner shape: its shape's template, filled
    // with its own literal tokens, without parsing it.
    if let Some((key, shaped)) = &prepared.shape {
        if let Some(Some(t)) = catalog.cached_token_template(&profile.name, key) {
            if let Some(r) = t.fill_tokens(&shaped.fills, sql, &prepared.literals) {
                return Ok(r);
            }
        }
    }
    let resolver = Resolver::new(classifier, profile, catalog, has_key);
    let (r, template) = by_shape(catalog, profile, sql, &resolver);
    if let (Some((key, shaped)), Ok(done)) = (&prepared.shape, &r) {
        // Kept for the scanner shape only if token filling reproduces this
        // statement's own rewrite.
        let usable = template.filter(|t| t.tokens_reproduce(&shaped.fills, sql, &prepared.literals, done));
        catalog.cache_token_template(&profile.name, key, usable);
        return r;
    }
    // A refusal because a name was not looked up is not cached: the next
    // lookup may find it.
    if !matches!(&r, Err(e) if e.rule == "catalog") {
        catalog.cache_rewrite(&profile.name, sql, Arc::new(r.clone()));
    }
    r
}

/// A single statement is rewritten through its shape's template (built on
/// the first statement of that shape); anything else directly. The
/// template used, if any, comes back too.
fn by_shape(
    catalog: &Catalog,
    profile: &Profile,
    sql: &str,
    resolver: &Resolver<'_>,
) -> (Result<Rewritten, Refusal>, Option<Arc<template::Template>>) {
    let parsed = match rewrite::parse(sql) {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    if let [raw] = parsed.protobuf.stmts.as_slice() {
        if let Some(stmt) = raw.stmt.as_deref() {
            let shape = template::shape(stmt);
            if let Some(t) = catalog.cached_template(&profile.name, shape.key) {
                if t.fits(&shape) {
                    if let Some(r) = t.apply(&shape) {
                        return (Ok(r), Some(t));
                    }
                }
            }
            match template::build(stmt, parsed.protobuf.version, &shape, resolver) {
                Err(e) => return (Err(e), None),
                Ok(Some(t)) => {
                    let t = Arc::new(t);
                    let r = t.apply(&shape);
                    catalog.cache_template(&profile.name, shape.key, t.clone());
                    if let Some(r) = r {
                        return (Ok(r), Some(t));
                    }
                }
                Ok(None) => {}
            }
        }
    }
    (rewrite::rewrite_parsed(sql, &parsed, resolver), None)
}

/// An ErrorResponse, NoticeResponse or NotificationResponse with what the
/// detectors find in its text masked; None when nothing was found. A cast
/// error echoes its input, a unique violation its key: PostgreSQL's own
/// words can carry a value the rewrite never saw (an unlabeled one).
pub fn mask_server_text(tag: u8, body: &[u8], classifier: &Classifier, profile: &Profile) -> Option<Bytes> {
    if !classifier.detectors {
        return None;
    }
    let action = ColAction::Detect { ctx: Default::default(), counter: "server_text".into() };
    let ty = ValueType::Text { max_chars: None, fixed: false };
    let mut counts = BTreeMap::new();
    let mut scan = |s: &str| -> Option<String> {
        match plan::apply(&action, ty, s, classifier, profile, None, &mut counts) {
            Ok(Some(Some(m))) => Some(m),
            _ => None,
        }
    };
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.put_u8(tag);
    out.put_i32(0);
    let mut changed = false;
    let mut b = Body::new(body);
    if tag == b'A' {
        let pid = b.i32()?;
        let channel = b.cstr()?;
        let payload = String::from_utf8_lossy(b.cstr()?).into_owned();
        out.put_i32(pid);
        out.put_slice(channel);
        out.put_u8(0);
        match scan(&payload) {
            Some(m) => {
                changed = true;
                out.put_slice(m.as_bytes());
            }
            None => out.put_slice(payload.as_bytes()),
        }
        out.put_u8(0);
    } else {
        while let Some(field) = b.u8() {
            if field == 0 {
                break;
            }
            let v = b.cstr()?;
            out.put_u8(field);
            // Severity and SQLSTATE are not text anyone typed.
            let masked = match field {
                b'S' | b'V' | b'C' => None,
                _ => scan(&String::from_utf8_lossy(v)),
            };
            match masked {
                Some(m) => {
                    changed = true;
                    out.put_slice(m.as_bytes());
                }
                None => out.put_slice(v),
            }
            out.put_u8(0);
        }
        out.put_u8(0);
    }
    if !changed {
        return None;
    }
    let len = i32::try_from(out.len() - 1).ok()?;
    if let Some(slot) = out.get_mut(1..5) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
    Some(out.freeze())
}

/// A NoticeResponse from cordon.
pub fn notice(buf: &mut BytesMut, message: &str) {
    let mut body = BytesMut::new();
    for (t, v) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "01000"), (b'M', message)] {
        body.put_u8(t);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    buf.put_u8(b'N');
    buf.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    buf.put_slice(&body);
}
