//! Content detectors for values of unlabeled and computed columns, and for
//! spans inside free text.
//!
//! Each detector looks for a cheap anchor first (a digit run, an '@', a
//! known prefix), so the common value that contains none of them costs one
//! pass over its bytes. Validation follows the formats' own rules (Luhn and
//! brand prefixes for cards, mod-97 for IBANs, the SSA's rules for SSNs) so
//! that the usual false positives do not fire: IDs that pass Luhn but carry
//! no brand, documentation keys such as AKIA…EXAMPLE, public keys and
//! certificates, UUIDs and hashes.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Card,
    Ssn,
    Iban,
    Email,
    Phone,
    Ipv4,
    Ipv6,
    AwsKey,
    GithubToken,
    Jwt,
    PrivateKey,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Card,
        Kind::Ssn,
        Kind::Iban,
        Kind::Email,
        Kind::Phone,
        Kind::Ipv4,
        Kind::Ipv6,
        Kind::AwsKey,
        Kind::GithubToken,
        Kind::Jwt,
        Kind::PrivateKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Card => "card",
            Kind::Ssn => "ssn",
            Kind::Iban => "iban",
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Ipv4 => "ipv4",
            Kind::Ipv6 => "ipv6",
            Kind::AwsKey => "aws_key",
            Kind::GithubToken => "github_token",
            Kind::Jwt => "jwt",
            Kind::PrivateKey => "private_key",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Default sensitivity rank (0 = lowest label): secrets and government
    /// ids are the highest, contact data the next, addresses the lowest
    /// non-public.
    pub fn default_rank(self) -> usize {
        match self {
            Kind::Card | Kind::Ssn | Kind::AwsKey | Kind::GithubToken | Kind::Jwt | Kind::PrivateKey => 3,
            Kind::Iban | Kind::Email | Kind::Phone => 2,
            Kind::Ipv4 | Kind::Ipv6 => 1,
        }
    }
}

/// A detected span, byte offsets into the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

/// What the column's name says, to settle ambiguous digit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// The column is named like an identifier (id, *_id, uuid, number…).
    pub id_like: bool,
    /// The column is named like a card number (card, pan, cc…).
    pub card_like: bool,
}

impl Context {
    pub fn from_column(name: &str) -> Self {
        let n = name.to_ascii_lowercase();
        let card_like = ["card", "pan", "cc_num", "ccnum", "credit"].iter().any(|w| n.contains(w));
        let id_like = !card_like
            && (n == "id"
                || n.ends_with("_id")
                || n.ends_with("id") && n.len() <= 4
                || n.contains("uuid")
                || n.ends_with("_no")
                || n.ends_with("number")
                || n.contains("sku")
                || n.contains("tracking"));
        Self { id_like, card_like }
    }
}

/// Every finding in `s`, in order, non-overlapping.
pub fn scan(s: &str, ctx: Context) -> Vec<Finding> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let Census { digits, dots, uppers, flags } = Census::of(b);
    let (at, dash5, colon, upper_a, g) =
        (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0, flags & 8 != 0, flags & 16 != 0);
    if dash5 && b.len() >= 27 {
        find_private_keys(s, &mut out);
    }
    if upper_a && b.len() >= 20 {
        find_aws_keys(b, &mut out);
    }
    if g && b.len() >= 40 {
        find_github_tokens(b, &mut out);
    }
    // header.payload.signature: two dots at least.
    if b.len() >= 20 && dots >= 2 && b.windows(3).any(|w| w == b"eyJ") {
        find_jwts(s, &mut out);
    }
    if at {
        find_emails(b, &mut out);
    }
    if digits >= 9 {
        find_digit_runs(s, ctx, &mut out);
    }
    // An IBAN starts with a two-letter country code; an IPv4 address has
    // three dots. Most text has neither, and skipping the scans was a
    // third of the detectors' time on a large result.
    if digits >= 4 && uppers >= 2 && b.len() >= 15 {
        find_ibans(b, &mut out);
    }
    if digits >= 4 && dots >= 3 {
        find_ipv4(b, &mut out);
    }
    if colon {
        find_ipv6(s, &mut out);
    }
    // Most values find nothing, or one thing: nothing to order.
    if out.len() < 2 {
        return out;
    }
    out.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
    // Drop findings inside an earlier one (an IP inside a JWT, …).
    let mut kept: Vec<Finding> = Vec::with_capacity(out.len());
    for f in out {
        if kept.last().is_none_or(|k| f.start >= k.end) {
            kept.push(f);
        }
    }
    kept
}

/// What one pass over a value finds: enough to decide which detectors can
/// possibly fire. Every value of every scanned column passes through here,
/// and most of them fire nothing.
struct Census {
    digits: usize,
    dots: usize,
    uppers: usize,
    /// '@', '-', ':', 'A', 'g' seen (bits 0 to 4).
    flags: u8,
}

impl Census {
    fn of(b: &[u8]) -> Self {
        let mut c = Census { digits: 0, dots: 0, uppers: 0, flags: 0 };
        // Byte-wide counters over chunks of at most 255 bytes, so that the
        // loop vectorises 16 bytes at a time (usize counters made it two);
        // branch-free for the same reason.
        for chunk in b.chunks(255) {
            let (mut digits, mut dots, mut uppers, mut flags) = (0u8, 0u8, 0u8, 0u8);
            for &x in chunk {
                digits += u8::from(x.wrapping_sub(b'0') < 10);
                dots += u8::from(x == b'.');
                uppers += u8::from(x.wrapping_sub(b'A') < 26);
                flags |= u8::from(x == b'@')
                    | u8::from(x == b'-') << 1
                    | u8::from(x == b':') << 2
                    | u8::from(x == b'A') << 3
                    | u8::from(x == b'g') << 4;
            }
            c.digits += usize::from(digits);
            c.dots += usize::from(dots);
            c.uppers += usize::from(uppers);
            c.flags |= flags;
        }
        c
    }
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn bounded(b: &[u8], start: usize, end: usize) -> bool {
    (start == 0 || !is_word(b[start - 1])) && (end >= b.len() || !is_word(b[end]))
}

// --- cards, SSNs, phones: digit runs with separators ------------------------

fn find_digit_runs(s: &str, ctx: Context, out: &mut Vec<Finding>) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() && b[i] != b'+' && b[i] != b'(' {
            i += 1;
            continue;
        }
        // A run: digits with single separators (space, '-', '.', ')', '(').
        let start = i;
        let mut end = i;
        let mut j = i;
        // Digits of the run, on the stack: this runs for every value.
        let mut digit_buf = [0u8; 25];
        let mut nd = 0usize;
        let mut seps = 0;
        while j < b.len() {
            let c = b[j];
            if c.is_ascii_digit() {
                if let Some(slot) = digit_buf.get_mut(nd) {
                    *slot = c - b'0';
                }
                nd += 1;
                end = j + 1;
            } else if (c == b' ' || c == b'-' || c == b'.' || c == b')' || c == b'(' || c == b'+')
                && j + 1 < b.len()
                && (b[j + 1].is_ascii_digit() || (c == b')' && b[j + 1] == b' '))
                && seps < 8
            {
                if c != b'+' || j == start {
                    seps += 1;
                } else {
                    break;
                }
            } else {
                break;
            }
            j += 1;
            if nd > 24 {
                break;
            }
        }
        let digits = digit_buf.get(..nd.min(25)).unwrap_or_default();
        if end <= start || digits.is_empty() {
            i = j.max(i + 1);
            continue;
        }
        let run = s.get(start..end).unwrap_or("");
        if bounded(b, start, end) {
            if let Some(kind) = classify_run(run, digits, ctx) {
                out.push(Finding { kind, start, end });
            }
        }
        i = end.max(i + 1);
    }
}

fn classify_run(run: &str, digits: &[u8], ctx: Context) -> Option<Kind> {
    let n = digits.len();
    let bare = run.bytes().all(|c| c.is_ascii_digit());
    if (12..=19).contains(&n) && luhn(digits) {
        let grouped = card_grouping(run);
        match card_brand(digits, n) {
            // A bare digit string in an id-like column is an id that happens
            // to pass Luhn, not a card.
            Some(Brand::Common) if ctx.card_like || grouped || (bare && !ctx.id_like) => return Some(Kind::Card),
            // 12- and 13-digit numbers (old Visa, short Maestro) share their
            // length with EAN-13 barcodes and epoch milliseconds: only
            // written as a card, or in a card column.
            Some(Brand::Short) if ctx.card_like || grouped => return Some(Kind::Card),
            _ => {}
        }
    }
    if n == 9 && is_ssn(run, digits) {
        return Some(Kind::Ssn);
    }
    if is_phone(run, n) {
        return Some(Kind::Phone);
    }
    None
}

pub fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut v = u32::from(x);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn prefix(d: &[u8], len: usize) -> u32 {
    d.iter().take(len).fold(0, |a, &x| a * 10 + u32::from(x))
}

enum Brand {
    /// A brand's usual length (14 to 19 digits).
    Common,
    /// 12 or 13 digits: a card only when written or labeled as one.
    Short,
}

/// Issuer ranges (IIN/BIN) and lengths: Visa, Mastercard (51–55,
/// 2221–2720), Amex, Discover, JCB (35xx, and 1800/2131 at 15),
/// Diners (300–305, 3095, 36, 38, 39), UnionPay (62), Maestro (50, 56–58,
/// 6304, 6390, 67), Mir (2200–2204), RuPay (60, 65, 81, 82, 508, 353, 356).
fn card_brand(d: &[u8], n: usize) -> Option<Brand> {
    let p1 = prefix(d, 1);
    let p2 = prefix(d, 2);
    let p3 = prefix(d, 3);
    let p4 = prefix(d, 4);
    let visa = p1 == 4 && (n == 16 || n == 19);
    let mc = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16;
    let amex = (p2 == 34 || p2 == 37) && n == 15;
    let discover = (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3)) && (16..=19).contains(&n);
    // JCB's registered range is 3528–3589; numbers in the wild (and
    // Faker's) use all of 35xx.
    let jcb = ((3500..=3589).contains(&p4) && (16..=19).contains(&n)) || ((p4 == 1800 || p4 == 2131) && n == 15);
    let diners =
        ((300..=305).contains(&p3) || p4 == 3095 || p2 == 36 || p2 == 38 || p2 == 39) && (14..=19).contains(&n);
    let unionpay = p2 == 62 && (16..=19).contains(&n);
    let maestro_prefix = p2 == 50 || (56..=58).contains(&p2) || p2 == 67 || p4 == 6304 || p4 == 6390;
    let maestro = maestro_prefix && (16..=19).contains(&n);
    let mir = (2200..=2204).contains(&p4) && (16..=19).contains(&n);
    let rupay = (p2 == 60 || p2 == 65 || p2 == 81 || p2 == 82 || p3 == 508 || p3 == 353 || p3 == 356) && n == 16;
    if visa || mc || amex || discover || jcb || diners || unionpay || maestro || mir || rupay {
        return Some(Brand::Common);
    }
    let short = (p1 == 4 && n == 13) || (maestro_prefix && (12..=15).contains(&n));
    short.then_some(Brand::Short)
}

/// "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005".
fn card_grouping(run: &str) -> bool {
    let mut groups = 0;
    for g in run.split([' ', '-']) {
        if !(3..=6).contains(&g.len()) || !g.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
        groups += 1;
    }
    groups >= 3
}

fn is_ssn(run: &str, d: &[u8]) -> bool {
    // The dashed form only; a bare 9-digit number is too often something else.
    let b = run.as_bytes();
    if b.len() != 11 || b.get(3) != Some(&b'-') || b.get(6) != Some(&b'-') {
        return false;
    }
    let area = prefix(d, 3);
    let group = prefix(d.get(3..).unwrap_or_default(), 2);
    let serial = prefix(d.get(5..).unwrap_or_default(), 4);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn is_phone(run: &str, n: usize) -> bool {
    if let Some(rest) = run.strip_prefix('+') {
        // E.164: + and 8 to 15 digits, separators allowed.
        return (8..=15).contains(&n) && rest.bytes().next().is_some_and(|c| c != b'0');
    }
    // North American "(415) 555-0132", "415-555-0132" or "415.555.0132":
    // exactly 3-3-4 (a dotted quad such as 150.190.169.5 is an address).
    let b = run.as_bytes();
    let grouped = |sep: u8| b.len() == 12 && b.get(3) == Some(&sep) && b.get(7) == Some(&sep);
    n == 10 && (run.starts_with('(') && b.get(4) == Some(&b')') || grouped(b'-') || grouped(b'.'))
}

// --- IBAN ---------------------------------------------------------------

fn iban_length(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"AD" => 24,
        b"AT" => 20,
        b"BE" => 16,
        b"CH" => 21,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"ES" => 24,
        b"FI" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"IE" => 22,
        b"IT" => 27,
        b"LU" => 20,
        b"NL" => 18,
        b"NO" => 15,
        b"PL" => 28,
        b"PT" => 25,
        b"SE" => 24,
        _ => return None,
    })
}

fn find_ibans(b: &[u8], out: &mut Vec<Finding>) {
    let mut i = 0;
    while i + 15 <= b.len() {
        let (c0, c1) = (b[i], b[i + 1]);
        if !(c0.is_ascii_uppercase()
            && c1.is_ascii_uppercase()
            && b[i + 2].is_ascii_digit()
            && b[i + 3].is_ascii_digit())
            || (i > 0 && is_word(b[i - 1]))
        {
            i += 1;
            continue;
        }
        let Some(len) = iban_length(&b[i..i + 2]) else {
            i += 1;
            continue;
        };
        // Collect `len` alphanumerics, allowing single spaces between groups.
        let mut chars = Vec::with_capacity(len);
        let mut j = i;
        while j < b.len() && chars.len() < len {
            let c = b[j];
            if c.is_ascii_alphanumeric() {
                chars.push(c.to_ascii_uppercase());
            } else if c == b' ' && chars.len() % 4 == 0 && j + 1 < b.len() && b[j + 1].is_ascii_alphanumeric() {
            } else {
                break;
            }
            j += 1;
        }
        if chars.len() == len && (j >= b.len() || !is_word(b[j])) && iban_mod97(&chars) {
            out.push(Finding { kind: Kind::Iban, start: i, end: j });
            i = j;
        } else {
            i += 1;
        }
    }
}

fn iban_mod97(chars: &[u8]) -> bool {
    let mut rem: u32 = 0;
    for &c in chars.iter().skip(4).chain(chars.iter().take(4)) {
        if c.is_ascii_digit() {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

// --- email --------------------------------------------------------------

fn find_emails(b: &[u8], out: &mut Vec<Finding>) {
    let local = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
    let domain = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'.';
    for (at, _) in b.iter().enumerate().filter(|(_, c)| **c == b'@') {
        let mut s = at;
        while s > 0 && local(b[s - 1]) {
            s -= 1;
        }
        // No local part (a masked address, `u***@example.com`, comes here
        // for every row): nothing to find, so the domain is not walked.
        if s == at {
            continue;
        }
        let mut e = at + 1;
        while e < b.len() && domain(b[e]) {
            e += 1;
        }
        while e > at + 1 && b[e - 1] == b'.' {
            e -= 1;
        }
        let dom = &b[at + 1..e];
        let tld_ok = dom
            .iter()
            .rposition(|c| *c == b'.')
            .is_some_and(|p| dom.len() - p > 2 && dom[p + 1..].iter().all(u8::is_ascii_alphabetic) && p > 0);
        if s < at && tld_ok && b[s] != b'.' {
            out.push(Finding { kind: Kind::Email, start: s, end: e });
        }
    }
}

// --- IP addresses -------------------------------------------------------

fn find_ipv4(b: &[u8], out: &mut Vec<Finding>) {
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.')) {
            i += 1;
            continue;
        }
        let mut j = i;
        let mut octets = 0;
        let mut ok = true;
        loop {
            let s = j;
            while j < b.len() && b[j].is_ascii_digit() && j - s < 4 {
                j += 1;
            }
            let len = j - s;
            let v: u32 = b[s..j].iter().fold(0u32, |a, d| a * 10 + u32::from(d - b'0'));
            if len == 0 || len > 3 || v > 255 || (len > 1 && b[s] == b'0') {
                ok = false;
                break;
            }
            octets += 1;
            if octets == 4 || j >= b.len() || b[j] != b'.' {
                break;
            }
            j += 1;
        }
        // Not part of a longer dotted run (a version "1.2.3.4.5").
        let tail_ok = j >= b.len()
            || !(b[j].is_ascii_alphanumeric() || (b[j] == b'.' && b.get(j + 1).is_some_and(u8::is_ascii_digit)));
        if ok && octets == 4 && tail_ok {
            out.push(Finding { kind: Kind::Ipv4, start: i, end: j });
            i = j;
        } else {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
}

fn find_ipv6(s: &str, out: &mut Vec<Finding>) {
    let b = s.as_bytes();
    let tok = |c: u8| c.is_ascii_hexdigit() || c == b':' || c == b'.';
    let mut i = 0;
    while i < b.len() {
        if !tok(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && tok(b[i]) {
            i += 1;
        }
        // A sentence's full stop is not part of the address.
        let mut end = i;
        while end > start && b[end - 1] == b'.' {
            end -= 1;
        }
        let cand = s.get(start..end).unwrap_or("");
        let colons = cand.bytes().filter(|c| *c == b':').count();
        // At least two colons and a real parse; times ("12:30:00") fail it.
        if colons >= 2
            && bounded(b, start, end)
            && cand.parse::<std::net::Ipv6Addr>().is_ok()
            && (cand.contains("::") || colons == 7)
        {
            out.push(Finding { kind: Kind::Ipv6, start, end });
        }
    }
}

// --- secrets ------------------------------------------------------------

fn find_aws_keys(b: &[u8], out: &mut Vec<Finding>) {
    const PREFIXES: [&[u8]; 8] = [b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"ANPA", b"ANVA", b"AIPA"];
    let mut i = 0;
    while i + 20 <= b.len() {
        let w = &b[i..i + 20];
        if PREFIXES.iter().any(|p| w.starts_with(p))
            && w[4..].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && bounded(b, i, i + 20)
            // AWS's documentation keys (AKIAIOSFODNN7EXAMPLE) are not secrets.
            && !w.ends_with(b"EXAMPLE")
        {
            out.push(Finding { kind: Kind::AwsKey, start: i, end: i + 20 });
            i += 20;
        } else {
            i += 1;
        }
    }
}

fn find_github_tokens(b: &[u8], out: &mut Vec<Finding>) {
    let mut i = 0;
    while i + 40 <= b.len() {
        let classic = b[i] == b'g'
            && b[i + 1] == b'h'
            && b"pousr".contains(&b[i + 2])
            && b[i + 3] == b'_'
            && b[i + 4..i + 40].iter().all(u8::is_ascii_alphanumeric);
        if classic && bounded(b, i, i + 40) {
            out.push(Finding { kind: Kind::GithubToken, start: i, end: i + 40 });
            i += 40;
            continue;
        }
        if b[i..].starts_with(b"github_pat_") && i + 93 <= b.len() && b[i + 11..i + 93].iter().all(|c| is_word(*c)) {
            out.push(Finding { kind: Kind::GithubToken, start: i, end: i + 93 });
            i += 93;
            continue;
        }
        i += 1;
    }
}

fn find_jwts(s: &str, out: &mut Vec<Finding>) {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let b = s.as_bytes();
    let seg = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut from = 0;
    while let Some(p) = s.get(from..).and_then(|t| t.find("eyJ")) {
        let start = from + p;
        let mut j = start;
        let mut dots = 0;
        while j < b.len() && (seg(b[j]) || (b[j] == b'.' && dots < 2)) {
            if b[j] == b'.' {
                dots += 1;
            }
            j += 1;
        }
        let cand = s.get(start..j).unwrap_or("");
        let parts: Vec<&str> = cand.split('.').collect();
        let header_ok = parts.len() == 3
            && parts.iter().all(|p| p.len() >= 2)
            && URL_SAFE_NO_PAD
                .decode(parts[0])
                .ok()
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
                .is_some_and(|h| h.get("alg").is_some());
        if header_ok && bounded(b, start, j) {
            out.push(Finding { kind: Kind::Jwt, start, end: j });
        }
        from = j.max(start + 3);
    }
}

fn find_private_keys(s: &str, out: &mut Vec<Finding>) {
    let mut from = 0;
    while let Some(p) = s.get(from..).and_then(|t| t.find("-----BEGIN ")) {
        let start = from + p;
        let rest = s.get(start + 11..).unwrap_or("");
        let Some(label_end) = rest.find("-----") else { break };
        let label = rest.get(..label_end).unwrap_or("");
        // Private keys only: certificates and public keys are not secrets.
        if label.ends_with("PRIVATE KEY") {
            let end_marker = format!("-----END {label}-----");
            let end =
                s.get(start..).and_then(|t| t.find(&end_marker)).map_or(s.len(), |e| start + e + end_marker.len());
            out.push(Finding { kind: Kind::PrivateKey, start, end });
            from = end;
        } else {
            from = start + 11;
        }
    }
}

#[cfg(test)]
#[path = "../tests/detect.rs"]
mod tests;
