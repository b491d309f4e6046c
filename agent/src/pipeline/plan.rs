//! Mask plans: for each result column, what the profile does with its
//! values, decided once per result description and applied to every row.
//!
//! An adapter describes its columns (name, where they come from, type); the
//! plan says keep, mask with a strategy, or scan with the detectors, or
//! refuses the whole result (a denied label, a column cordon could not
//! classify, a type it cannot mask validly).

use std::collections::BTreeMap;

use super::{
    classify::{Action, Classifier, Strategy},
    detect::{self, Context},
    mask::{self, MaskError, ValueType},
    Denied,
};
use crate::config::Profile;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An expression, or a column of something that is not a table.
    Computed,
    Table {
        db: String,
        schema: String,
        table: String,
        column: String,
        db_label: Option<usize>,
        /// The table's own label from the database (its comment).
        table_db_label: Option<usize>,
    },
    /// From a table cordon could not look up: fail closed.
    Unresolved(String),
}

#[derive(Debug, Clone)]
pub struct ColumnDesc {
    pub name: String,
    pub source: Source,
    pub ty: ValueType,
    /// Whether the adapter can write a masked value in this column's wire
    /// format (binary formats are per type).
    pub encodable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColAction {
    Keep,
    Mask { strategy: Strategy, counter: String },
    Detect { ctx: Context, counter: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub cols: Vec<ColAction>,
    pub deny: Option<Denied>,
}

impl Plan {
    /// Whether any row needs looking at.
    pub fn active(&self) -> bool {
        self.cols.iter().any(|c| *c != ColAction::Keep)
    }
}

pub fn plan(cols: &[ColumnDesc], classifier: &Classifier, profile: &Profile, has_key: bool) -> Plan {
    let mut out = Plan::default();
    let deny = |rule: &str, message: String| Some(Denied::policy(rule, message));
    for c in cols {
        let labeled = match &c.source {
            Source::Computed => None,
            Source::Unresolved(why) => {
                out.deny = out.deny.or(deny("classification", format!("cannot classify column {:?}: {why}", c.name)));
                out.cols.push(ColAction::Keep);
                continue;
            }
            Source::Table { db, schema, table, column, db_label, table_db_label } => {
                // A table's label covers every column of it.
                let col = classifier.column(db, schema, table, column, *db_label);
                let tbl = classifier.table(db, schema, table, *table_db_label).map(|label| super::classify::Labeled {
                    label,
                    strategy: Strategy::Redact,
                    source: super::classify::Source::Policy,
                });
                match (col, tbl) {
                    (Some(c), Some(t)) if t.label > c.label => Some(t),
                    (Some(c), _) => Some(c),
                    (None, t) => t,
                }
            }
        };
        let action = match labeled {
            Some(l) => {
                match profile.action(l.label) {
                    Action::Allow => ColAction::Keep,
                    Action::Deny => {
                        let name = classifier.labels.name(l.label);
                        out.deny = out.deny.or(deny(
                            "label",
                            format!("column {:?} is labeled {name}; profile {} may not read it", c.name, profile.name),
                        ));
                        ColAction::Keep
                    }
                    // A statement released by approval is planned with the
                    // approved profile; anything else masks.
                    Action::Mask | Action::Approve => {
                        let strategy =
                            if l.strategy == Strategy::Pseudonym && !has_key { Strategy::Redact } else { l.strategy };
                        let constant_ok = strategy == Strategy::Null || mask::redact(c.ty).is_ok();
                        if !constant_ok || !c.encodable {
                            out.deny = out.deny.or(deny(
                            "mask",
                            format!("column {:?} must be masked, and cordon cannot write a valid masked value of its type", c.name),
                        ));
                        }
                        let s = format!("{strategy:?}").to_ascii_lowercase();
                        ColAction::Mask { strategy, counter: format!("{}/{s}", c.name) }
                    }
                }
            }
            None if classifier.detectors && (c.ty.is_text() || c.ty == ValueType::Json) => {
                ColAction::Detect { ctx: Context::from_column(&c.name), counter: c.name.clone() }
            }
            None => ColAction::Keep,
        };
        out.cols.push(action);
    }
    out
}

/// Apply one column's action to its text value. `Ok(None)`: unchanged.
/// `Ok(Some(None))`: becomes NULL.
pub fn apply(
    action: &ColAction,
    ty: ValueType,
    value: &str,
    classifier: &Classifier,
    profile: &Profile,
    key: Option<&[u8]>,
    counts: &mut BTreeMap<String, u64>,
) -> Result<Option<Option<String>>, MaskError> {
    match action {
        ColAction::Keep => Ok(None),
        ColAction::Mask { strategy, counter } => {
            let v = mask::mask(ty, *strategy, value, key)?;
            bump(counts, counter);
            Ok(Some(v))
        }
        ColAction::Detect { ctx, counter } => {
            let found = detect::scan(value, *ctx);
            // Most values find nothing.
            if found.is_empty() {
                return Ok(None);
            }
            let act: Vec<detect::Finding> = found
                .into_iter()
                .filter(|f| profile.action(classifier.detector_label(f.kind)) != Action::Allow)
                .collect();
            if act.is_empty() {
                return Ok(None);
            }
            let mut key = String::with_capacity(counter.len() + 24);
            for f in &act {
                key.clear();
                key.push_str(counter);
                key.push_str("/detector:");
                key.push_str(f.kind.name());
                bump(counts, &key);
            }
            Ok(Some(Some(fit(ty, mask::replace_spans(value, &act)))))
        }
    }
}

/// Count without allocating the key on the hot path.
fn bump(counts: &mut BTreeMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_string(), 1);
        }
    }
}

/// A span-replaced value must still fit a varchar(n).
fn fit(ty: ValueType, s: String) -> String {
    match ty {
        ValueType::Text { max_chars: Some(n), .. } => s.chars().take(n).collect(),
        _ => s,
    }
}
