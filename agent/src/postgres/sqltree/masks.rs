//! Masking expressions that PostgreSQL evaluates as it reads each row (mask
//! at read). They keep the column's declared type (the result is cast back
//! to it) and they cannot fail for any input: an error would itself be a
//! channel out for the value it failed on. Only total built-in functions are
//! used, schema-qualified so that no user object can stand in for them.
//!
//! `pseudonym` is computed by cordon with a key PostgreSQL must never see (a
//! key in statement text shows in pg_stat_activity and the server log), so
//! inside the read it is a redaction: predicates and joins see the constant.

use super::quote_literal;
use crate::pipeline::{
    classify::Strategy,
    mask::{self, ValueType},
};

/// The SQL expression that stands for column `col` (already quoted) of type
/// `type_sql` (as `format_type` spells it) under `strategy`.
pub fn expression(col: &str, type_sql: &str, ty: ValueType, strategy: Strategy) -> String {
    let typed = |body: String| format!("CASE WHEN {col} IS NULL THEN NULL ELSE {body} END::{type_sql}");
    match strategy {
        Strategy::Null => format!("NULL::{type_sql}"),
        Strategy::Partial if ty.is_text() => typed(partial(&format!("{col}::pg_catalog.text"))),
        Strategy::Redact | Strategy::Partial | Strategy::Pseudonym => match mask::redact(ty) {
            // The constant before the cast: PostgreSQL fits it to varchar(n)
            // or char(n) itself.
            Ok(c) => typed(quote_literal(&c)),
            Err(_) => format!("NULL::{type_sql}"),
        },
    }
}

/// The same as `mask::partial`, in SQL: an email keeps its first letter and
/// domain, a value with at least 12 digits keeps its last four digits and
/// its punctuation, anything else its first character and up to eight stars.
///
/// PostgreSQL evaluates this for every row read, so it is spelled for its
/// cost: `right(v, -n)` (all but the first n characters) rather than
/// `substr(v, n + 1)`, which took PostgreSQL 15 about a fifth longer over
/// a million emails.
fn partial(v: &str) -> String {
    format!(
        "CASE WHEN pg_catalog.strpos({v}, '@') OPERATOR(pg_catalog.>) 1 \
           THEN pg_catalog.left({v}, 1) OPERATOR(pg_catalog.||) '***@' OPERATOR(pg_catalog.||) \
                pg_catalog.right({v}, OPERATOR(pg_catalog.-) pg_catalog.strpos({v}, '@')) \
         WHEN pg_catalog.length(pg_catalog.regexp_replace({v}, '[^0-9]', '', 'g')) OPERATOR(pg_catalog.>=) 12 \
           THEN pg_catalog.regexp_replace({v}, '[0-9](?=(?:[^0-9]*[0-9]){{4}})', '*', 'g') \
         ELSE pg_catalog.left({v}, 1) OPERATOR(pg_catalog.||) \
              pg_catalog.repeat('*', LEAST(pg_catalog.length({v}) OPERATOR(pg_catalog.-) 1, 8)) END"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_parse_and_keep_the_type() {
        let text = ValueType::Text { max_chars: Some(11), fixed: false };
        for (ty, t, s) in [
            (text, "character varying(11)", Strategy::Partial),
            (text, "character varying(11)", Strategy::Redact),
            (ValueType::Int4, "integer", Strategy::Redact),
            (ValueType::Date, "date", Strategy::Partial),
            (ValueType::Other, "integer[]", Strategy::Redact),
            (text, "text", Strategy::Null),
        ] {
            let e = expression("\"ssn\"", t, ty, s);
            assert!(pg_query::parse(&format!("select {e} from t"), 0).is_ok(), "{e}");
            assert!(e.ends_with(&format!("::{t}")), "{e}");
        }
        let e = expression("\"c\"", "text", text, Strategy::Redact);
        assert!(e.contains("'REDACTED'"), "{e}");
    }
}
