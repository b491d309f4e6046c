//! What a workload types, kept out of cordon's own records: literals in
//! statement text and bind parameters are recorded as keyed hashes, so the
//! audit log and recordings never hold a card number or a key in clear,
//! while `cordon audit find --value V` can still say who sent V.
//!
//! The adapter finds the literals (with its protocol's own scanner) and
//! hands their spans and values to the pipeline; this module decides what
//! is recorded and whether a statement carries sensitive values at all.

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::{
    classify::Classifier,
    detect::{self, Context, Kind},
};

/// How statement text is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TextMode {
    /// Every literal replaced by `$Ln`, each with a keyed hash.
    Normalized,
    /// Only literals the detectors flag are replaced (the default).
    #[default]
    Redacted,
    /// The text as sent (opt-in; `policy check` warns).
    Full,
}

impl std::str::FromStr for TextMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normalized" => Ok(Self::Normalized),
            "redacted" => Ok(Self::Redacted),
            "full" => Ok(Self::Full),
            o => Err(format!("unknown record_text {o:?}; use \"normalized\", \"redacted\" or \"full\"")),
        }
    }
}

/// A literal in statement text: its byte span and its value (quotes and
/// escapes removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal {
    pub start: usize,
    pub end: usize,
    pub value: String,
    /// Compared with or written to a labeled column: recorded as a hash
    /// even when the detectors find nothing in it.
    pub labeled: bool,
}

/// The HMAC key for recorded literals.
#[derive(Clone)]
pub struct LiteralKey(Vec<u8>);

impl std::fmt::Debug for LiteralKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiteralKey(…)")
    }
}

impl LiteralKey {
    pub fn new(key: &[u8]) -> Self {
        Self(key.to_vec())
    }

    fn mac(&self, v: &str) -> String {
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(&self.0) else { return String::new() };
        m.update(v.as_bytes());
        let out = m.finalize().into_bytes();
        format!("hmac:{}", hex::encode(out.get(..16).unwrap_or_default()))
    }

    /// The hashes a value is recorded under: as written, and its digits
    /// alone when it has enough of them to be an identifier (a card typed
    /// with or without spaces is found either way).
    pub fn hashes(&self, v: &str) -> Vec<String> {
        let mut out = vec![self.mac(v)];
        let digits: String = v.chars().filter(char::is_ascii_digit).collect();
        if digits.len() >= 9 && digits != v {
            out.push(self.mac(&digits));
        }
        out
    }
}

/// The key kept in `<state_dir>/literal.key` when the secrets file has
/// none: created once (0600), read after.
pub fn state_key(state_dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = state_dir.join("literal.key");
    if let Ok(k) = std::fs::read(&path) {
        if k.len() >= 16 {
            return Ok(k);
        }
    }
    std::fs::create_dir_all(state_dir)?;
    let key = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
    let tmp = state_dir.join("literal.key.tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(key)
}

/// A literal as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedLiteral {
    /// `$L<n>` in the recorded text.
    pub n: usize,
    /// What the detectors found in it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub hashes: Vec<String>,
}

/// The text to record for a statement, and its replaced literals.
pub fn render(text: &str, literals: &[Literal], mode: TextMode, key: &LiteralKey) -> (String, Vec<RecordedLiteral>) {
    if mode == TextMode::Full {
        return (text.to_string(), Vec::new());
    }
    let mut out = String::with_capacity(text.len());
    let mut recorded = Vec::new();
    let mut at = 0;
    for l in literals {
        let kind = detect::scan(&l.value, Context::default()).first().map(|f| f.kind.name());
        if mode == TextMode::Redacted && kind.is_none() && !l.labeled {
            continue;
        }
        let (Some(before), true) = (text.get(at..l.start), l.end <= text.len() && l.start >= at) else { continue };
        out.push_str(before);
        let n = recorded.len() + 1;
        out.push_str(&format!("$L{n}"));
        recorded.push(RecordedLiteral { n, kind, hashes: key.hashes(&l.value) });
        at = l.end;
    }
    out.push_str(text.get(at..).unwrap_or_default());
    // A value can also sit in a comment or an identifier.
    (scrub(&out), recorded)
}

/// The first value the detectors flag at or above `min_label` (their
/// label in this policy).
pub fn sensitive<'a>(
    values: impl IntoIterator<Item = &'a str>,
    classifier: &Classifier,
    min_label: usize,
) -> Option<Kind> {
    values.into_iter().find_map(|v| {
        detect::scan(v, Context::default())
            .into_iter()
            .map(|f| f.kind)
            .find(|k| classifier.detector_label(*k) >= min_label)
    })
}

/// Text for records: whatever the detectors find, masked (a parse error
/// quotes the token it stopped at, which may be a literal).
pub fn scrub(text: &str) -> String {
    let found = detect::scan(text, Context::default());
    if found.is_empty() {
        return text.to_string();
    }
    super::mask::replace_spans(text, &found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(text: &str, v: &str) -> Literal {
        let start = text.find(v).unwrap_or(0) - 1;
        Literal { start, end: start + v.len() + 2, value: v.into(), labeled: false }
    }

    #[test]
    fn flagged_literals_become_hashes_and_others_stay() {
        let key = LiteralKey::new(b"k-0123456789abcdef");
        let text = "select * from t where card = '4111 1111 1111 1111' and name = 'ada' -- 5500 0000 0000 0004";
        let ls = [lit(text, "4111 1111 1111 1111"), lit(text, "ada")];
        let (out, rec) = render(text, &ls, TextMode::Redacted, &key);
        assert_eq!(out, "select * from t where card = $L1 and name = 'ada' -- **** **** **** 0004");
        assert_eq!(rec[0].kind, Some("card"));
        assert!(rec[0].hashes.contains(&key.hashes("4111111111111111")[0]), "found by digits too");
        let (out, rec) = render(text, &ls, TextMode::Normalized, &key);
        assert_eq!(out, "select * from t where card = $L1 and name = $L2 -- **** **** **** 0004");
        assert_eq!(rec.len(), 2);
        assert_eq!(render(text, &ls, TextMode::Full, &key).0, text);
        assert_ne!(LiteralKey::new(b"other-key-0123456").hashes("ada"), key.hashes("ada"));
    }
}
