//! Unit tests for `pipeline/detect.rs`, with the hard negatives of
//! shared/anchors/pii.md: ids that pass Luhn, UUIDs, hashes, invalid SSNs,
//! bad-checksum IBANs, AKIA…EXAMPLE, public keys.
use super::*;

fn kinds(s: &str) -> Vec<Kind> {
    scan(s, Context::default()).into_iter().map(|f| f.kind).collect()
}

fn spans(s: &str) -> Vec<(Kind, &str)> {
    scan(s, Context::default()).into_iter().map(|f| (f.kind, &s[f.start..f.end])).collect()
}

#[test]
fn cards() {
    assert_eq!(kinds("4111111111111111"), [Kind::Card]);
    assert_eq!(spans("paid with 4111 1111 1111 1111 today"), [(Kind::Card, "4111 1111 1111 1111")]);
    assert_eq!(kinds("5500-0000-0000-0004"), [Kind::Card]);
    assert_eq!(kinds("378282246310005"), [Kind::Card]); // Amex
                                                        // Luhn fails.
    assert!(kinds("4111111111111112").is_empty());
    // Passes Luhn, but no card brand starts with 9 or 1.
    assert!(kinds("9000000000000007").is_empty());
    assert!(kinds("1000000000000008").is_empty());
    // A 16-digit id that passes Luhn and looks like a Visa, in an id column.
    let id_ctx = Context::from_column("order_id");
    assert!(scan("4111111111111111", id_ctx).is_empty());
    // …but grouped like a card it is one anywhere.
    assert_eq!(scan("4111 1111 1111 1111", id_ctx).len(), 1);
    assert!(Context::from_column("card_number").card_like);
}

/// A card number that passes Luhn, from a prefix and a length.
fn pan(prefix: &str, len: usize) -> String {
    let mut body: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    body.resize(len - 1, 3);
    for check in 0..10u8 {
        let mut d = body.clone();
        d.push(check);
        if luhn(&d) {
            return d.iter().map(|x| char::from(b'0' + x)).collect();
        }
    }
    String::new()
}

#[test]
fn every_brand_by_its_issuer_range() {
    for (brand, prefix, len) in [
        ("JCB", "3528", 16),
        ("JCB", "3589", 16),
        ("JCB 15", "2131", 15),
        ("UnionPay", "6212", 16),
        ("UnionPay 19", "6282", 19),
        ("Maestro", "6759", 16),
        ("Maestro", "5018", 16),
        ("Mir", "2200", 16),
        ("Mir", "2204", 16),
        ("RuPay", "6521", 16),
        ("RuPay", "8171", 16),
        ("RuPay", "508", 16),
        ("Diners", "3095", 14),
        ("Diners", "39", 14),
        ("Diners", "36", 14),
    ] {
        let p = pan(prefix, len);
        assert_eq!(kinds(&p), [Kind::Card], "{brand} {p}");
    }
}

#[test]
fn addresses_are_not_phones_and_a_full_stop_is_not_part_of_one() {
    assert_eq!(kinds("150.190.169.5"), [Kind::Ipv4]);
    assert_eq!(kinds("148.239.5.243 -- updated"), [Kind::Ipv4]);
    assert_eq!(kinds("415.555.0132"), [Kind::Phone]);
    assert_eq!(
        spans("said 910b:bde3:a64:b9a1:338f:2e5b:91f3:f706."),
        [(Kind::Ipv6, "910b:bde3:a64:b9a1:338f:2e5b:91f3:f706")]
    );
}

#[test]
fn thirteen_digit_numbers_are_barcodes_and_timestamps_unless_written_as_cards() {
    // EAN-13 barcodes and epoch milliseconds that pass Luhn.
    let ean = pan("400638", 13);
    assert!(kinds(&ean).is_empty(), "{ean}");
    let ms = pan("17", 13);
    assert!(kinds(&ms).is_empty(), "{ms}");
    let old_visa = pan("4", 13);
    assert!(kinds(&old_visa).is_empty(), "a bare 13-digit 4… is not taken for an old Visa");
    assert_eq!(scan(&old_visa, Context::from_column("card")).len(), 1, "in a card column it is one");
    let short_maestro = pan("6759", 12);
    assert!(kinds(&short_maestro).is_empty());
}

#[test]
fn ssns() {
    assert_eq!(spans("ssn 123-45-6789."), [(Kind::Ssn, "123-45-6789")]);
    for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "123456789"] {
        assert!(kinds(bad).is_empty(), "{bad} is not an SSN");
    }
}

#[test]
fn ibans() {
    assert_eq!(kinds("DE89370400440532013000"), [Kind::Iban]);
    assert_eq!(spans("pay GB82 WEST 1234 5698 7654 32 now"), [(Kind::Iban, "GB82 WEST 1234 5698 7654 32")]);
    assert!(kinds("DE89370400440532013001").is_empty(), "bad checksum");
    assert!(kinds("XX89370400440532013000").is_empty(), "unknown country");
}

#[test]
fn emails_phones_ips() {
    assert_eq!(spans("mail ada@example.com."), [(Kind::Email, "ada@example.com")]);
    assert!(kinds("user@localhost").is_empty());
    assert!(kinds("@handle").is_empty());
    assert_eq!(spans("call +44 20 7946 0958"), [(Kind::Phone, "+44 20 7946 0958")]);
    assert_eq!(kinds("(415) 555-0132"), [Kind::Phone]);
    assert!(kinds("2024-01-15").is_empty(), "a date is not a phone");
    assert_eq!(spans("from 10.1.2.3 ok"), [(Kind::Ipv4, "10.1.2.3")]);
    assert!(kinds("version 1.2.3.4.5").is_empty());
    assert!(kinds("999.1.1.1").is_empty());
    assert_eq!(spans("host fe80::1ff:fe23:4567:890a up"), [(Kind::Ipv6, "fe80::1ff:fe23:4567:890a")]);
    assert!(kinds("at 12:30:00").is_empty());
}

#[test]
fn secrets() {
    assert_eq!(kinds("key AKIAZ7VRSQ5TQ2LJ4X3B"), [Kind::AwsKey]);
    assert!(kinds("AKIAIOSFODNN7EXAMPLE").is_empty(), "AWS's documentation key");
    assert_eq!(kinds("ghp_1234567890abcdefghijklmnopqrstuvwxyz"), [Kind::GithubToken]);
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl";
    assert_eq!(kinds(&format!("Bearer {jwt}")), [Kind::Jwt]);
    assert!(kinds("eyJub3QiOiJqd3QifQ.eyJ4IjoxfQ.c2ln").is_empty(), "header without alg");
    let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
    assert_eq!(spans(&format!("x {key} y")), [(Kind::PrivateKey, key)]);
    assert!(kinds("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----").is_empty());
    assert!(kinds("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----").is_empty());
}

#[test]
fn hard_negatives_stay_quiet() {
    for s in [
        "550e8400-e29b-41d4-a716-446655440000",
        "d41d8cd98f00b204e9800998ecf8427e",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "order 12345 shipped",
        "3.14159265358979",
        "2026-11-21T23:35:46.123456Z",
        "",
        "plain words only",
    ] {
        assert!(kinds(s).is_empty(), "{s:?} → {:?}", kinds(s));
    }
}

#[test]
fn never_panics_on_odd_input() {
    for s in ["+", "(", "4", "@", "eyJ", "-----BEGIN ", "AKIA", "::", "1.", "+(", "é@é.é", "DE89 ", "ghp_"] {
        let _ = scan(s, Context::default());
    }
}

#[test]
fn the_census_counts_across_its_chunks() {
    // The census counts in chunks of 255 bytes: a number whose digits
    // straddle a chunk boundary (an SSN starting at 249 has five digits in
    // the first chunk and four in the second), or lie far into a long
    // value, still fires.
    for pad in [0usize, 246, 248, 249, 250, 251, 254, 255, 256, 600] {
        let v = format!("{}123-45-6789", "x ".repeat(pad / 2) + &" ".repeat(pad % 2));
        assert_eq!(kinds(&v), [Kind::Ssn], "pad {pad}: {v}");
        let v = format!("{}4111 1111 1111 1111.", "x ".repeat(pad / 2) + &" ".repeat(pad % 2));
        assert_eq!(kinds(&v), [Kind::Card], "pad {pad}: {v}");
    }
    let v = format!("{}AKIA2E0A8F3B244C9986 {}", "word ".repeat(60), "b".repeat(300));
    assert_eq!(kinds(&v), [Kind::AwsKey]);
}
