//! The database's own catalog, read over cordon's own connection: table and
//! column names for the OIDs a RowDescription carries, and the labels the
//! database holds (comments containing `classification: <label>`, and
//! SECURITY LABELs).
//!
//! One catalog per (server, database), shared by all sessions, cached.
//! Entries expire after `TTL`; a DDL, COMMENT or SECURITY LABEL statement
//! that passes through cordon clears the cache at once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{frame::FrameReader, upstream, wire, Ctx};
use crate::{
    net::Stream,
    pipeline::{
        classify::{Classifier, Memo},
        guard::TableRef,
    },
    secrets::Credential,
};

const TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub attnum: i16,
    pub name: String,
    /// Comment and security labels, joined.
    pub labels_text: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// The type as `format_type` spells it.
    pub type_sql: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub oid: u32,
    pub db: String,
    pub schema: String,
    pub name: String,
    pub labels_text: String,
    /// pg_class.relkind: r, p, f (tables), v (view), m (materialized view), …
    pub relkind: char,
    /// A view's definition.
    pub definition: Option<String>,
    pub columns: Vec<ColumnInfo>,
    /// The policy's labels for this table, worked out once per classifier.
    pub labels: LabelsMemo,
}

impl TableInfo {
    pub fn column(&self, attnum: i16) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }

    /// The table's label and its labeled columns under `c`: every
    /// statement that names the table asks (guardrails, literal marking),
    /// several times; the answer changes only with the classifier (a policy
    /// reload) or the catalog entry (a refresh builds a new one).
    pub fn labels(&self, c: &Arc<Classifier>) -> Arc<TableLabels> {
        if let Ok(m) = self.labels.0.lock() {
            if let Some((by, l)) = m.as_ref() {
                if Arc::ptr_eq(by, c) {
                    return l.clone();
                }
            }
        }
        let l = Arc::new(TableLabels {
            table: c.table(&self.db, &self.schema, &self.name, c.labels.from_comment(&self.labels_text)),
            columns: self
                .columns
                .iter()
                .filter_map(|col| {
                    c.column(&self.db, &self.schema, &self.name, &col.name, c.labels.from_comment(&col.labels_text))
                        .map(|l| (col.name.clone(), l.label))
                })
                .collect(),
        });
        if let Ok(mut m) = self.labels.0.lock() {
            // The classifier is kept, so the pointer compared above can
            // never belong to another one.
            *m = Some((c.clone(), l.clone()));
        }
        l
    }
}

/// A table's labels under one classifier (see `TableInfo::labels`).
#[derive(Debug, PartialEq, Eq)]
pub struct TableLabels {
    pub table: Option<usize>,
    /// Columns with a label, and the label.
    pub columns: Vec<(String, usize)>,
}

/// `TableInfo::labels`' memo: the classifier it was worked out for, and the answer.
pub type LabelsMemo = Memo<Option<(Arc<Classifier>, Arc<TableLabels>)>>;

/// A statement's mask-at-read rewrite for one profile (or its refusal).
pub type CachedRewrite = Arc<Result<super::sqltree::rewrite::Rewritten, super::sqltree::rewrite::Refusal>>;

/// Most rewrites kept per catalog; cleared when full.
const REWRITES_MAX: usize = 4096;
/// Longer texts are rewritten every time rather than kept.
const REWRITE_MAX_TEXT: usize = 16 * 1024;

pub struct Catalog {
    pub key: (SocketAddr, String),
    conn: tokio::sync::Mutex<Option<(Stream, FrameReader)>>,
    by_oid: Mutex<HashMap<u32, (Instant, Arc<TableInfo>)>>,
    by_name: Mutex<HashMap<TableRef, (Instant, Option<u32>)>>,
    /// (profile, exact text) → rewrite. It depends on labels and
    /// definitions, so it lives and dies with the entries it was built on.
    /// profile → exact text → rewrite (nested, so a lookup borrows both).
    rewrites: Mutex<HashMap<String, Rewrites>>,
    /// (profile, statement shape) → the shape's rewrite template.
    templates: Mutex<Templates>,
    /// profile → scanner key → the template its statements are filled into
    /// (None: that shape is rewritten one statement at a time).
    token_templates: Mutex<HashMap<String, TokenTemplates>>,
    /// Function or operator name → its definitions that are not built in.
    user_code: Mutex<HashMap<(char, String), (Instant, UserCodeList)>>,
}

/// A function, procedure or operator that is not built in (OID at or above
/// FirstNormalObjectId: created by a user or an extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCodeInfo {
    pub schema: String,
    pub name: String,
    /// provolatile is 'v', or a procedure.
    pub may_write: bool,
}

type UserCodeList = Arc<Vec<UserCodeInfo>>;
use super::sqltree::rewrite::template::Template;
/// Exact text → rewrite, with when it was built.
type Rewrites = HashMap<String, (Instant, CachedRewrite)>;
/// (profile, statement shape) → template, with when it was built.
type Templates = HashMap<(String, u64), (Instant, Arc<Template>)>;
type TokenTemplates = HashMap<Arc<str>, (Instant, Option<Arc<Template>>)>;

/// PostgreSQL's FirstNormalObjectId: OIDs below it are the system's own.
const FIRST_NORMAL_OID: u32 = 16384;

impl Catalog {
    pub fn new(upstream: SocketAddr, database: &str) -> Self {
        Self {
            key: (upstream, database.to_string()),
            conn: tokio::sync::Mutex::new(None),
            by_oid: Mutex::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
            rewrites: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            token_templates: Mutex::new(HashMap::new()),
            user_code: Mutex::new(HashMap::new()),
        }
    }

    /// User-defined functions ('f') or operators ('o') of this name, if
    /// looked up.
    pub fn user_code(&self, kind: char, name: &str) -> Option<Arc<Vec<UserCodeInfo>>> {
        self.user_code.lock().ok()?.get(&(kind, name.to_string())).map(|(_, v)| v.clone())
    }

    /// Look up which of these function and operator names have
    /// definitions that are not built in (one query for all misses).
    pub async fn resolve_code(
        &self,
        ctx: &Ctx,
        cred: &Credential,
        functions: &[String],
        operators: &[String],
    ) -> Result<()> {
        let fresh = |kind: char, n: &String| {
            self.user_code.lock().is_ok_and(|m| m.get(&(kind, n.clone())).is_some_and(|(at, _)| at.elapsed() < TTL))
        };
        let f: Vec<&String> = functions.iter().filter(|n| !fresh('f', n)).collect();
        let o: Vec<&String> = operators.iter().filter(|n| !fresh('o', n)).collect();
        if f.is_empty() && o.is_empty() {
            return Ok(());
        }
        let list = |v: &[&String]| {
            let items: Vec<String> = v.iter().map(|n| quote_literal(n)).collect();
            format!("array[{}]::text[]", if items.is_empty() { "null".to_string() } else { items.join(",") })
        };
        let sql = format!(
            "select 'f', p.proname, n.nspname, p.provolatile = 'v' or p.prokind = 'p' \
             from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
             where p.oid >= {FIRST_NORMAL_OID} and p.proname = any({}) \
             union all \
             select 'o', o.oprname, n.nspname, coalesce((select q.provolatile = 'v' from pg_proc q where q.oid = o.oprcode), true) \
             from pg_operator o join pg_namespace n on n.oid = o.oprnamespace \
             where o.oid >= {FIRST_NORMAL_OID} and o.oprname = any({})",
            list(&f),
            list(&o)
        );
        let rows = self.query(ctx, cred, &sql).await?;
        let mut found: HashMap<(char, String), Vec<UserCodeInfo>> = HashMap::new();
        for n in &f {
            found.insert(('f', (*n).clone()), Vec::new());
        }
        for n in &o {
            found.insert(('o', (*n).clone()), Vec::new());
        }
        for r in rows {
            let col = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            let kind = col(0).chars().next().unwrap_or('f');
            let info = UserCodeInfo { name: col(1), schema: col(2), may_write: col(3) != "f" };
            found.entry((kind, info.name.clone())).or_default().push(info);
        }
        if let Ok(mut m) = self.user_code.lock() {
            let now = Instant::now();
            for (k, v) in found {
                m.insert(k, (now, Arc::new(v)));
            }
        }
        Ok(())
    }

    pub fn cached_rewrite(&self, profile: &str, sql: &str) -> Option<CachedRewrite> {
        let m = self.rewrites.lock().ok()?;
        let (at, r) = m.get(profile)?.get(sql)?;
        (at.elapsed() < TTL).then(|| r.clone())
    }

    pub fn cached_template(&self, profile: &str, key: u64) -> Option<Arc<Template>> {
        let m = self.templates.lock().ok()?;
        let (at, t) = m.get(&(profile.to_string(), key))?;
        (at.elapsed() < TTL).then(|| t.clone())
    }

    pub fn cache_template(&self, profile: &str, key: u64, t: Arc<Template>) {
        if let Ok(mut m) = self.templates.lock() {
            if m.len() >= REWRITES_MAX {
                m.clear();
            }
            m.insert((profile.to_string(), key), (Instant::now(), t));
        }
    }

    /// The template of a scanner shape: Some(None) when the shape is known
    /// to have none.
    pub fn cached_token_template(&self, profile: &str, key: &str) -> Option<Option<Arc<Template>>> {
        let m = self.token_templates.lock().ok()?;
        let (at, t) = m.get(profile)?.get(key)?;
        (at.elapsed() < TTL).then(|| t.clone())
    }

    pub fn cache_token_template(&self, profile: &str, key: &Arc<str>, t: Option<Arc<Template>>) {
        if let Ok(mut m) = self.token_templates.lock() {
            let keys = m.entry(profile.to_string()).or_default();
            if keys.len() >= REWRITES_MAX {
                keys.clear();
            }
            keys.insert(key.clone(), (Instant::now(), t));
        }
    }

    pub fn cache_rewrite(&self, profile: &str, sql: &str, r: CachedRewrite) {
        if sql.len() > REWRITE_MAX_TEXT {
            return;
        }
        if let Ok(mut m) = self.rewrites.lock() {
            let texts = m.entry(profile.to_string()).or_default();
            if texts.len() >= REWRITES_MAX {
                texts.clear();
            }
            texts.insert(sql.to_string(), (Instant::now(), r));
        }
    }

    pub fn invalidate(&self) {
        if let Ok(mut m) = self.rewrites.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.templates.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.token_templates.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.user_code.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.by_oid.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.by_name.lock() {
            m.clear();
        }
    }

    /// A cached table, fresh or not (plans use what was resolved for them).
    pub fn table(&self, oid: u32) -> Option<Arc<TableInfo>> {
        self.by_oid.lock().ok()?.get(&oid).map(|(_, t)| t.clone())
    }

    /// A cached name lookup: Some(None) = known not to exist.
    pub fn by_name(&self, t: &TableRef) -> Option<Option<Arc<TableInfo>>> {
        let oid = self.by_name.lock().ok()?.get(t).map(|(_, o)| *o)?;
        Some(oid.and_then(|o| self.table(o)))
    }

    fn fresh_oid(&self, oid: u32) -> bool {
        self.by_oid.lock().is_ok_and(|m| m.get(&oid).is_some_and(|(at, _)| at.elapsed() < TTL))
    }

    fn fresh_name(&self, t: &TableRef) -> bool {
        self.by_name.lock().is_ok_and(|m| m.get(t).is_some_and(|(at, _)| at.elapsed() < TTL))
    }

    /// Make sure the tables of these result columns (table OID, column
    /// number) are known (one query for all misses). A column a cached
    /// table does not have means its table changed under cordon (DDL from
    /// another session): everything cached from the catalog is dropped and
    /// read again, rather than refusing the column until the entry expires.
    pub async fn resolve_oids(&self, ctx: &Ctx, cred: &Credential, columns: &[(u32, i16)]) -> Result<()> {
        let changed = columns.iter().any(|(o, a)| *a > 0 && self.table(*o).is_some_and(|t| t.column(*a).is_none()));
        if changed {
            self.invalidate();
        }
        let mut missing: Vec<u32> =
            columns.iter().map(|(o, _)| *o).filter(|o| *o != 0 && !self.fresh_oid(*o)).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let list = missing.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let rows = self.query(ctx, cred, &table_query(&format!("c.oid in ({list})"))).await?;
        self.store(rows);
        Ok(())
    }

    /// Make sure these tables (as written in SQL) are known.
    pub async fn resolve_names(&self, ctx: &Ctx, cred: &Credential, tables: &[TableRef]) -> Result<()> {
        for t in tables {
            if self.fresh_name(t) {
                continue;
            }
            let qualified = match &t.schema {
                Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&t.name)),
                None => quote_ident(&t.name),
            };
            let cond = format!("c.oid = to_regclass({})", quote_literal(&qualified));
            let rows = self.query(ctx, cred, &table_query(&cond)).await?;
            let oid = self.store(rows);
            if let Ok(mut m) = self.by_name.lock() {
                m.insert(t.clone(), (Instant::now(), oid));
            }
        }
        Ok(())
    }

    /// Cache the rows; returns the (first) table's OID.
    fn store(&self, rows: Vec<Vec<Option<String>>>) -> Option<u32> {
        let mut tables: HashMap<u32, TableInfo> = HashMap::new();
        let mut first = None;
        for r in rows {
            let col = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            let Ok(oid) = col(0).parse::<u32>() else { continue };
            first.get_or_insert(oid);
            let t = tables.entry(oid).or_insert_with(|| TableInfo {
                oid,
                db: col(1),
                schema: col(2),
                name: col(3),
                labels_text: format!("{} {}", col(4), col(5)),
                relkind: col(10).chars().next().unwrap_or('?'),
                definition: r.get(11).cloned().flatten(),
                columns: Vec::new(),
                labels: LabelsMemo::default(),
            });
            if let Ok(attnum) = col(6).parse::<i16>() {
                t.columns.push(ColumnInfo {
                    attnum,
                    name: col(7),
                    labels_text: format!("{} {}", col(8), col(9)),
                    type_oid: col(12).parse().unwrap_or(0),
                    typmod: col(13).parse().unwrap_or(-1),
                    type_sql: col(14),
                });
            }
        }
        if let Ok(mut m) = self.by_oid.lock() {
            let now = Instant::now();
            for (oid, t) in tables {
                m.insert(oid, (now, Arc::new(t)));
            }
        }
        first
    }

    async fn query(&self, ctx: &Ctx, cred: &Credential, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut guard = self.conn.lock().await;
        // One retry on a fresh connection: the old one may have gone away.
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(upstream::login(ctx, cred, &self.key.1).await?);
            }
            let Some((stream, reader)) = guard.as_mut() else { bail!("no catalog connection") };
            match simple_query(stream, reader, sql).await {
                Ok(rows) => return Ok(rows),
                Err(e) if attempt == 0 => {
                    tracing::debug!("catalog query failed, reconnecting: {e:#}");
                    *guard = None;
                }
                Err(e) => return Err(e),
            }
        }
        bail!("catalog query failed")
    }
}

fn table_query(cond: &str) -> String {
    format!(
        "select c.oid, current_database(), n.nspname, c.relname, \
         coalesce(obj_description(c.oid, 'pg_class'), ''), \
         coalesce((select string_agg(label, ' ') from pg_seclabel s where s.objoid = c.oid \
                   and s.classoid = 'pg_class'::regclass and s.objsubid = 0), ''), \
         a.attnum, a.attname, coalesce(col_description(c.oid, a.attnum), ''), \
         coalesce((select string_agg(label, ' ') from pg_seclabel s where s.objoid = c.oid \
                   and s.classoid = 'pg_class'::regclass and s.objsubid = a.attnum), ''), \
         c.relkind, case when c.relkind in ('v', 'm') then pg_get_viewdef(c.oid) end, \
         a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod) \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped \
         where {cond} order by c.oid, a.attnum"
    )
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn simple_query(stream: &mut Stream, reader: &mut FrameReader, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let mut out = BytesMut::new();
    bytes::BufMut::put_u8(&mut out, b'Q');
    bytes::BufMut::put_i32(&mut out, (4 + sql.len() + 1) as i32);
    bytes::BufMut::put_slice(&mut out, sql.as_bytes());
    bytes::BufMut::put_u8(&mut out, 0);
    stream.write_all(&out).await.context("sending a catalog query")?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let f = upstream::next(reader, stream).await?;
        match f.tag {
            b'D' => rows.push(wire::data_row(f.body())),
            b'E' => error = Some(wire::server_error(f.body())),
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(e) => bail!("catalog query failed: {}: {}", e.code, e.message),
        None => Ok(rows),
    }
}
