//! Classification: which label a column or table carries, from three
//! sources, strongest wins:
//! (a) the policy's catalog (`db.schema.table.column` globs, or
//!     `db.schema.table` for a whole table);
//! (b) the database's own catalog: a comment containing
//!     `classification: <label>`, or a SECURITY LABEL naming one;
//! (c) content detectors, on values of columns neither source labels.

use std::{collections::HashMap, sync::Mutex};

use globset::{GlobBuilder, GlobMatcher};
use serde::Serialize;

use super::detect::Kind;

/// Ordered label names, lowest first (public < internal < …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    names: Vec<String>,
}

impl Default for Labels {
    fn default() -> Self {
        Self { names: ["public", "internal", "confidential", "restricted"].map(String::from).to_vec() }
    }
}

impl Labels {
    pub fn new(names: Vec<String>) -> Self {
        Self { names }
    }
    pub fn rank(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n.eq_ignore_ascii_case(name))
    }
    pub fn name(&self, rank: usize) -> &str {
        self.names.get(rank).map_or("?", String::as_str)
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn highest(&self) -> usize {
        self.names.len().saturating_sub(1)
    }
    /// Detectors rank labels on a four-level scale; map onto this one.
    pub fn scaled(&self, four_level: usize) -> usize {
        if self.names.len() == 4 {
            return four_level;
        }
        (four_level * self.highest()).div_ceil(3).min(self.highest())
    }

    /// `classification: restricted` inside a comment or security label. An
    /// unknown label name is treated as the highest: fail closed.
    pub fn from_comment(&self, text: &str) -> Option<usize> {
        let lower = text.to_ascii_lowercase();
        let at = lower.find("classification")?;
        let rest = lower.get(at + "classification".len()..)?.trim_start();
        let rest = rest.strip_prefix([':', '='])?.trim_start();
        let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-').collect();
        if word.is_empty() {
            return None;
        }
        Some(self.rank(&word).unwrap_or_else(|| self.highest()))
    }
}

/// What a profile does with values of a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Mask,
    Deny,
    /// Masked, unless people approve the very statement that reads it:
    /// then that statement reads it in clear.
    Approve,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "mask" => Ok(Self::Mask),
            "deny" => Ok(Self::Deny),
            "approve" => Ok(Self::Approve),
            o => Err(format!("unknown action {o:?}; use \"allow\", \"mask\", \"deny\" or \"approve\"")),
        }
    }
}

/// How a masked value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A type-valid constant.
    Redact,
    /// Card: last 4 digits. Email: first letter and domain. Else redact.
    Partial,
    /// Keyed HMAC-SHA256, type-valid and prefixed: joins still work.
    Pseudonym,
    /// SQL NULL (only where configured: it breaks NOT NULL assumptions).
    Null,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Redact => "redact",
            Self::Partial => "partial",
            Self::Pseudonym => "pseudonym",
            Self::Null => "null",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redact" => Ok(Self::Redact),
            "partial" => Ok(Self::Partial),
            "pseudonym" => Ok(Self::Pseudonym),
            "null" => Ok(Self::Null),
            o => Err(format!("unknown mask {o:?}; use \"redact\", \"partial\", \"pseudonym\" or \"null\"")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    matcher: GlobMatcher,
    /// Four parts (`db.schema.table.column`) or three (a table).
    pub column_rule: bool,
    pub label: usize,
    pub strategy: Strategy,
}

impl PartialEq for Rule {
    fn eq(&self, o: &Self) -> bool {
        self.pattern == o.pattern && self.label == o.label && self.strategy == o.strategy
    }
}

impl Rule {
    pub fn new(pattern: &str, label: usize, strategy: Strategy) -> Result<Self, String> {
        let parts = pattern.split('.').count();
        if parts != 3 && parts != 4 {
            return Err(format!("{pattern:?}: use db.schema.table or db.schema.table.column (globs allowed)"));
        }
        let matcher = GlobBuilder::new(&pattern.to_ascii_lowercase())
            .literal_separator(false)
            .build()
            .map_err(|e| format!("bad glob {pattern:?}: {e}"))?
            .compile_matcher();
        Ok(Self { pattern: pattern.to_string(), matcher, column_rule: parts == 4, label, strategy })
    }
}

/// Where a column's label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Policy,
    DbComment,
    Detector,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    pub labels: Labels,
    pub rules: Vec<Rule>,
    pub detectors: bool,
    /// Label rank per detector kind.
    pub detector_labels: HashMap<Kind, usize>,
    /// Answers already worked out (see `Answers`).
    memo: Memo<Answers>,
}

impl Default for Classifier {
    fn default() -> Self {
        let labels = Labels::default();
        let detector_labels = Kind::ALL.iter().map(|k| (*k, labels.scaled(k.default_rank()))).collect();
        Self { labels, rules: Vec::new(), detectors: true, detector_labels, memo: Memo::default() }
    }
}

/// Most answers remembered; the memo is emptied when it fills.
const MEMO_MAX: usize = 16_384;

/// A cache kept inside a value that derives Clone and PartialEq: not part
/// of the value's identity, so a clone starts empty and any two compare
/// equal.
#[derive(Debug, Default)]
pub struct Memo<T>(pub Mutex<T>);

impl<T: Default> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Memo<T> {}

/// Remembered labels by exact key (`db.schema.table[.column]`, lowercased,
/// with the database's own label): every statement asks for each column
/// of every table it names (guardrails, mask at read, result plans), and
/// matching every glob every time was ~4 % of the agent's CPU under
/// pgbench. A classifier never changes once built (a policy reload builds
/// a new one), so an answer stays right; the rule count is kept to catch a
/// rule added after lookups began (only tests build classifiers that way).
#[derive(Debug, Default)]
struct Answers {
    rules: usize,
    columns: HashMap<(String, Option<usize>), Option<Labeled>>,
    tables: HashMap<(String, Option<usize>), Option<usize>>,
}

impl Memo<Answers> {
    fn get_or<T: Copy>(
        &self,
        rules: usize,
        pick: impl Fn(&mut Answers) -> &mut HashMap<(String, Option<usize>), T>,
        key: (String, Option<usize>),
        work: impl FnOnce(&str) -> T,
    ) -> T {
        if let Ok(mut m) = self.0.lock() {
            if m.rules != rules {
                *m = Answers { rules, ..Answers::default() };
            }
            if let Some(v) = pick(&mut m).get(&key) {
                return *v;
            }
        }
        let v = work(&key.0);
        if let Ok(mut m) = self.0.lock() {
            if m.rules == rules {
                let map = pick(&mut m);
                if map.len() >= MEMO_MAX {
                    map.clear();
                }
                map.insert(key, v);
            }
        }
        v
    }
}

/// A resolved label for a column or table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labeled {
    pub label: usize,
    pub strategy: Strategy,
    pub source: Source,
}

impl Classifier {
    fn key(parts: &[&str]) -> String {
        parts.iter().map(|p| p.to_ascii_lowercase()).collect::<Vec<_>>().join(".")
    }

    /// Label of a column: the strongest of policy rules (column rules, then
    /// the table's rules) and the database's own comment.
    pub fn column(
        &self,
        db: &str,
        schema: &str,
        table: &str,
        column: &str,
        db_label: Option<usize>,
    ) -> Option<Labeled> {
        let key = (Self::key(&[db, schema, table, column]), db_label);
        self.memo.get_or(
            self.rules.len(),
            |m| &mut m.columns,
            key,
            |key| {
                let mut best: Option<Labeled> = None;
                for r in self.rules.iter().filter(|r| r.column_rule && r.matcher.is_match(key)) {
                    if best.is_none_or(|b| r.label > b.label) {
                        best = Some(Labeled { label: r.label, strategy: r.strategy, source: Source::Policy });
                    }
                }
                if let Some(l) = db_label {
                    if best.is_none_or(|b| l > b.label) {
                        best = Some(Labeled { label: l, strategy: Strategy::Redact, source: Source::DbComment });
                    }
                }
                best
            },
        )
    }

    /// Label of a table as a whole (table rules and the table's comment).
    pub fn table(&self, db: &str, schema: &str, table: &str, db_label: Option<usize>) -> Option<usize> {
        let key = (Self::key(&[db, schema, table]), db_label);
        self.memo.get_or(
            self.rules.len(),
            |m| &mut m.tables,
            key,
            |key| {
                let policy =
                    self.rules.iter().filter(|r| !r.column_rule && r.matcher.is_match(key)).map(|r| r.label).max();
                policy.max(db_label)
            },
        )
    }

    pub fn detector_label(&self, kind: Kind) -> usize {
        self.detector_labels.get(&kind).copied().unwrap_or_else(|| self.labels.highest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_answers_equal_fresh_ones() {
        let mut c = Classifier::default();
        assert_eq!(c.column("shop", "public", "customers", "ssn", None), None);
        assert_eq!(c.table("shop", "public", "customers", None), None);
        // A rule added after lookups began is seen (the memo starts over).
        c.rules.push(Rule::new("*.public.customers.ssn", 3, Strategy::Partial).unwrap_or_else(|e| panic!("{e}")));
        c.rules.push(Rule::new("*.public.customers", 2, Strategy::Redact).unwrap_or_else(|e| panic!("{e}")));
        for _ in 0..2 {
            assert_eq!(c.column("shop", "public", "customers", "SSN", None).map(|l| l.label), Some(3));
            // The database's own label is part of the question.
            assert_eq!(c.column("shop", "public", "customers", "name", Some(1)).map(|l| l.label), Some(1));
            assert_eq!(c.column("shop", "public", "customers", "name", None), None);
            assert_eq!(c.table("shop", "public", "customers", None), Some(2));
            assert_eq!(c.table("shop", "public", "customers", Some(3)), Some(3));
        }
    }

    #[test]
    fn comments_and_rules() {
        let l = Labels::default();
        assert_eq!(l.from_comment("PII. classification: restricted"), Some(3));
        assert_eq!(l.from_comment("Classification=Internal"), Some(1));
        assert_eq!(l.from_comment("classification: top-secret"), Some(3), "unknown names fail closed");
        assert_eq!(l.from_comment("no label here"), None);
        let mut c = Classifier::default();
        c.rules.push(Rule::new("*.public.customers.ssn", 3, Strategy::Partial).unwrap_or_else(|e| panic!("{e}")));
        c.rules.push(Rule::new("shop.hr.*", 3, Strategy::Redact).unwrap_or_else(|e| panic!("{e}")));
        let got = c.column("shop", "public", "customers", "SSN", None);
        assert_eq!(got.map(|g| (g.label, g.strategy)), Some((3, Strategy::Partial)));
        assert_eq!(c.column("shop", "public", "customers", "name", Some(1)).map(|g| g.source), Some(Source::DbComment));
        assert_eq!(c.column("shop", "public", "customers", "name", None), None);
        assert_eq!(c.table("shop", "hr", "salaries", None), Some(3));
        assert_eq!(c.table("shop", "public", "salaries", Some(2)), Some(2));
        assert!(Rule::new("a.b", 1, Strategy::Redact).is_err());
    }
}
