//! How bind parameters appear in the record: hashed (default), truncated,
//! or omitted. Values are often personal data; the policy decides.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamMode {
    /// `sha256:<16 hex>` of the value's bytes: equal values stay linkable.
    Hash,
    /// The first `max_bytes` (text) or a hex prefix (binary).
    Truncate,
    /// Only the count.
    Omit,
}

impl std::str::FromStr for ParamMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hash" => Ok(Self::Hash),
            "truncate" => Ok(Self::Truncate),
            "omit" => Ok(Self::Omit),
            o => Err(format!("unknown parameter mode {o:?}; use \"hash\", \"truncate\" or \"omit\"")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamPolicy {
    pub mode: ParamMode,
    pub max_bytes: usize,
}

impl Default for ParamPolicy {
    fn default() -> Self {
        Self { mode: ParamMode::Hash, max_bytes: 32 }
    }
}

/// One parameter as the wire carried it.
pub struct Param<'a> {
    pub value: Option<&'a [u8]>,
    pub binary: bool,
}

impl ParamPolicy {
    /// None when parameters are omitted.
    /// Hashes are keyed (HMAC with the literal key): an unkeyed hash of a
    /// nine-digit SSN is reversed by trying them all.
    pub fn render(&self, params: &[Param<'_>], key: &super::literals::LiteralKey) -> Option<Vec<Option<String>>> {
        if self.mode == ParamMode::Omit {
            return None;
        }
        Some(params.iter().map(|p| p.value.map(|v| self.render_one(v, p.binary, key))).collect())
    }

    fn render_one(&self, v: &[u8], binary: bool, key: &super::literals::LiteralKey) -> String {
        match self.mode {
            ParamMode::Hash | ParamMode::Omit => match std::str::from_utf8(v) {
                Ok(text) if !binary => key.hashes(text).join(" "),
                _ => key.hashes(&hex::encode(v)).join(" "),
            },
            ParamMode::Truncate if binary => {
                let n = (self.max_bytes / 2).min(v.len());
                let more = if n < v.len() { "…" } else { "" };
                format!("\\x{}{more}", hex::encode(v.get(..n).unwrap_or_default()))
            }
            ParamMode::Truncate => {
                let text = String::from_utf8_lossy(v);
                let mut end = self.max_bytes.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let more = if end < text.len() { "…" } else { "" };
                format!("{}{more}", text.get(..end).unwrap_or(""))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let ps = [
            Param { value: Some(b"alice@example.com"), binary: false },
            Param { value: None, binary: false },
            Param { value: Some(&[0, 1, 2, 3]), binary: true },
        ];
        let key = super::super::literals::LiteralKey::new(b"test-key-0123456789");
        let h = ParamPolicy::default().render(&ps, &key).unwrap_or_default();
        assert!(h[0].as_deref().is_some_and(|s| s.starts_with("hmac:") && !s.contains("alice")));
        assert_eq!(h[0].as_deref(), key.hashes("alice@example.com").first().map(String::as_str), "keyed, findable");
        assert_eq!(h[1], None);
        let t = ParamPolicy { mode: ParamMode::Truncate, max_bytes: 5 }.render(&ps, &key).unwrap_or_default();
        assert_eq!(t[0].as_deref(), Some("alice…"));
        assert_eq!(t[2].as_deref(), Some("\\x0001…"));
        assert_eq!(ParamPolicy { mode: ParamMode::Omit, max_bytes: 5 }.render(&ps, &key), None);
    }
}
