//! Masking that keeps values valid for their declared type, so that the
//! column types the client was told stay true: a masked integer is an
//! integer, a masked varchar(8) fits in 8 characters, a masked date parses.
//!
//! Values are handled in their text form; an adapter converts a binary-format
//! value to text first and the result back (see postgres/types.rs).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{classify::Strategy, detect::Finding};

/// What a column's declared type allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Character types; `max_chars` from varchar(n)/char(n).
    Text {
        max_chars: Option<usize>,
        fixed: bool,
    },
    Int2,
    Int4,
    Int8,
    Float,
    Numeric,
    Bool,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Uuid,
    Json,
    Bytea,
    Inet,
    /// A type cordon cannot produce a valid constant for.
    Other,
}

impl ValueType {
    pub fn is_text(self) -> bool {
        matches!(self, ValueType::Text { .. })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("no type-valid replacement for this column type; configure mask = \"null\" for it")]
    NoConstant,
    #[error("the pseudonym strategy needs [masking] pseudonym_key in the secrets file")]
    NoKey,
}

/// The masked text for `value` (its text form), or None for SQL NULL.
pub fn mask(ty: ValueType, strategy: Strategy, value: &str, key: Option<&[u8]>) -> Result<Option<String>, MaskError> {
    Ok(Some(match strategy {
        Strategy::Null => return Ok(None),
        Strategy::Redact => redact(ty)?,
        Strategy::Partial => match ty {
            ValueType::Text { .. } => fit(ty, partial(value)),
            _ => redact(ty)?,
        },
        Strategy::Pseudonym => pseudonym(ty, value, key.ok_or(MaskError::NoKey)?)?,
    }))
}

/// The constant a redacted value of this type becomes.
pub fn redact(ty: ValueType) -> Result<String, MaskError> {
    Ok(match ty {
        ValueType::Text { .. } => fit(ty, "REDACTED".to_string()),
        ValueType::Int2 | ValueType::Int4 | ValueType::Int8 | ValueType::Float | ValueType::Numeric => "0".into(),
        ValueType::Bool => "f".into(),
        ValueType::Date => "1970-01-01".into(),
        ValueType::Time => "00:00:00".into(),
        ValueType::Timestamp => "1970-01-01 00:00:00".into(),
        ValueType::TimestampTz => "1970-01-01 00:00:00+00".into(),
        ValueType::Uuid => "00000000-0000-0000-0000-000000000000".into(),
        ValueType::Json => "null".into(),
        ValueType::Bytea => "\\x".into(),
        ValueType::Inet => "0.0.0.0".into(),
        ValueType::Other => return Err(MaskError::NoConstant),
    })
}

/// Truncate (or pad, for char(n)) to the declared length.
fn fit(ty: ValueType, s: String) -> String {
    match ty {
        ValueType::Text { max_chars: Some(n), fixed } => {
            let mut out: String = s.chars().take(n).collect();
            if fixed {
                let len = out.chars().count();
                out.extend(std::iter::repeat_n(' ', n.saturating_sub(len)));
            }
            out
        }
        _ => s,
    }
}

/// Card numbers keep their last four digits (what PCI DSS lets a display
/// show; cordon shows no leading digits); emails their first letter and
/// domain; anything else its first character.
pub fn partial(value: &str) -> String {
    if let Some((local, domain)) = value.split_once('@') {
        if let Some(first) = local.chars().next() {
            return format!("{first}***@{domain}");
        }
    }
    let digits = value.chars().filter(char::is_ascii_digit).count();
    if digits >= 12 {
        let mut keep = 4;
        let mut out: Vec<char> = value.chars().rev().collect();
        for c in &mut out {
            if c.is_ascii_digit() {
                if keep > 0 {
                    keep -= 1;
                } else {
                    *c = '*';
                }
            }
        }
        return out.into_iter().rev().collect();
    }
    match value.chars().next() {
        Some(first) => format!("{first}{}", "*".repeat(value.chars().count().saturating_sub(1).min(8))),
        None => String::new(),
    }
}

fn hmac(key: &[u8], value: &str) -> [u8; 32] {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else { return [0; 32] };
    m.update(value.as_bytes());
    m.finalize().into_bytes().into()
}

/// Keyed, deterministic, type-valid: equal inputs give equal outputs, so
/// joins and GROUP BY on the masked column still work.
pub fn pseudonym(ty: ValueType, value: &str, key: &[u8]) -> Result<String, MaskError> {
    let h = hmac(key, value);
    let u64_of = |b: &[u8]| b.iter().take(8).fold(0u64, |a, x| (a << 8) | u64::from(*x));
    Ok(match ty {
        ValueType::Text { .. } => {
            let tag = hex::encode(h.get(..8).unwrap_or_default());
            let v = if value.contains('@') { format!("u_{tag}@pseudonym.invalid") } else { format!("pn_{tag}") };
            fit(ty, v)
        }
        ValueType::Int2 => ((u64_of(&h) % 32_767) as i16).to_string(),
        ValueType::Int4 => ((u64_of(&h) % 2_147_483_647) as i32).to_string(),
        ValueType::Int8 | ValueType::Numeric => ((u64_of(&h) >> 1) as i64).to_string(),
        ValueType::Uuid => {
            let x = hex::encode(h.get(..16).unwrap_or_default());
            let s = |a: usize, b: usize| x.get(a..b).unwrap_or("0");
            format!("{}-{}-4{}-8{}-{}", s(0, 8), s(8, 12), s(13, 16), s(17, 20), s(20, 32))
        }
        _ => redact(ty)?,
    })
}

/// Replace only the detected spans inside free text.
pub fn replace_spans(value: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut at = 0;
    for f in findings {
        if f.start < at || f.end > value.len() {
            continue;
        }
        out.push_str(value.get(at..f.start).unwrap_or(""));
        let span = value.get(f.start..f.end).unwrap_or("");
        match f.kind {
            super::detect::Kind::Card | super::detect::Kind::Email => out.push_str(&partial(span)),
            k => {
                out.push_str("[redacted:");
                out.push_str(k.name());
                out.push(']');
            }
        }
        at = f.end;
    }
    out.push_str(value.get(at..).unwrap_or(""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::detect::{scan, Context};

    #[test]
    fn type_valid_redaction() {
        let vc8 = ValueType::Text { max_chars: Some(4), fixed: false };
        assert_eq!(mask(vc8, Strategy::Redact, "secret", None), Ok(Some("REDA".into())));
        let ch6 = ValueType::Text { max_chars: Some(10), fixed: true };
        assert_eq!(mask(ch6, Strategy::Redact, "x", None), Ok(Some("REDACTED  ".into())));
        assert_eq!(mask(ValueType::Int4, Strategy::Redact, "42", None), Ok(Some("0".into())));
        assert_eq!(mask(ValueType::Date, Strategy::Partial, "2020-01-01", None), Ok(Some("1970-01-01".into())));
        assert_eq!(mask(ValueType::Other, Strategy::Redact, "x", None), Err(MaskError::NoConstant));
        assert_eq!(mask(ValueType::Other, Strategy::Null, "x", None), Ok(None));
    }

    #[test]
    fn partial_forms() {
        assert_eq!(partial("4111 1111 1111 1234"), "**** **** **** 1234");
        assert_eq!(partial("ada.lovelace@example.com"), "a***@example.com");
        assert_eq!(partial("123-45-6789"), "1**********".chars().take(9).collect::<String>());
    }

    #[test]
    fn pseudonyms_are_deterministic_keyed_and_typed() {
        let t = ValueType::Text { max_chars: None, fixed: false };
        let a = pseudonym(t, "ada@example.com", b"k1").unwrap_or_default();
        assert_eq!(a, pseudonym(t, "ada@example.com", b"k1").unwrap_or_default());
        assert_ne!(a, pseudonym(t, "ada@example.com", b"k2").unwrap_or_default());
        assert!(a.ends_with("@pseudonym.invalid") && a.starts_with("u_"));
        let n = pseudonym(ValueType::Int4, "7", b"k").unwrap_or_default();
        assert!(n.parse::<i32>().is_ok_and(|v| v >= 0));
        let u = pseudonym(ValueType::Uuid, "x", b"k").unwrap_or_default();
        assert_eq!(u.len(), 36);
        assert_eq!(mask(t, Strategy::Pseudonym, "x", None), Err(MaskError::NoKey));
    }

    #[test]
    fn spans_only() {
        let s = "call ada@example.com about 4111 1111 1111 1111, ssn 123-45-6789";
        let out = replace_spans(s, &scan(s, Context::default()));
        assert_eq!(out, "call a***@example.com about **** **** **** 1111, ssn [redacted:ssn]");
    }
}
