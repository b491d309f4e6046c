//! Statement fingerprints: the text with literals replaced by `?`,
//! comments dropped and whitespace folded, and a short hash of that, so the
//! audit can group "the same statement with other values".
//!
//! A lexer, not a parser: it knows PostgreSQL's quoting ('…' with '' and
//! E'…' escapes, "identifiers", $tag$…$tag$, -- and nested /* */ comments)
//! so a literal never leaks into the normalised form.

use sha2::{Digest, Sha256};

pub fn normalize(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut space = false;
    let push_space = |out: &mut String, space: &mut bool| {
        if *space && !out.is_empty() {
            out.push(' ');
        }
        *space = false;
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                space = true;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                space = true;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                space = true;
            }
            b'\'' => {
                push_space(&mut out, &mut space);
                // An E'' string honours backslash escapes.
                let escapes = out.ends_with(['E', 'e']) && {
                    out.pop();
                    true
                };
                i = skip_quoted(b, i, b'\'', escapes);
                out.push('?');
            }
            b'"' => {
                push_space(&mut out, &mut space);
                let start = i;
                i = skip_quoted(b, i, b'"', false);
                out.push_str(sql.get(start..i).unwrap_or("\"?\""));
            }
            b'$' if dollar_tag(b, i).is_some() => {
                push_space(&mut out, &mut space);
                let tag = dollar_tag(b, i).unwrap_or(b"$$");
                let body = i + tag.len();
                i = find(b, body, tag).map_or(b.len(), |end| end + tag.len());
                out.push('?');
            }
            b'0'..=b'9' if space || !prev_is_ident(&out) => {
                push_space(&mut out, &mut space);
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                    i += 1;
                }
                out.push('?');
            }
            _ => {
                push_space(&mut out, &mut space);
                // Copy one UTF-8 character.
                let len = utf8_len(c);
                out.push_str(sql.get(i..i + len).unwrap_or("?"));
                i += len;
            }
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

fn prev_is_ident(out: &str) -> bool {
    out.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

fn skip_quoted(b: &[u8], start: usize, q: u8, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// `$tag$` starting at i (tag: letters, digits, _; not starting with a digit).
fn dollar_tag(b: &[u8], i: usize) -> Option<&[u8]> {
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if b.get(j) != Some(&b'$') || b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    b.get(i..=j)
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// 16 hex digits of SHA-256 over the normalised text.
pub fn fingerprint(normalized: &str) -> String {
    hex::encode(Sha256::digest(normalized.as_bytes()).get(..8).unwrap_or_default())
}

#[cfg(test)]
#[path = "../tests/fingerprint.rs"]
mod tests;
