//! Unit tests for `postgres/scram.rs`.
use super::*;

/// RFC 7677 section 3 test vector (user "user", password "pencil"). The RFC
/// sends n=user; PostgreSQL clients send an empty name, so this builds the
/// messages with the RFC's bare form to reuse its expected values.
#[test]
fn rfc7677_vector() {
    let mut c = Client::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
    c.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".to_string();
    let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    let fin = c.client_final(server_first).unwrap();
    assert_eq!(
        fin,
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
    assert_eq!(c.verify_server_final(b"v=AAAA"), Err(ScramError::ServerSignature));
    assert!(matches!(c.verify_server_final(b"e=invalid-proof"), Err(ScramError::Server(_))));
}

#[test]
fn nonce_must_extend_ours() {
    let mut c = Client::with_nonce("pw", "abc");
    assert_eq!(c.client_final(b"r=xyz123,s=AAAA,i=4096"), Err(ScramError::Nonce));
    assert!(c.client_final(b"r=abc1,i=4096").is_err());
}

#[test]
fn md5_matches_postgres() {
    // SELECT 'md5' || md5(md5('secret' || 'app') || 'abcd') in PostgreSQL.
    let got = md5_password("app", "secret", b"abcd");
    let inner = hex::encode(<md5::Md5 as md5::Digest>::digest(b"secretapp"));
    let mut h = <md5::Md5 as md5::Digest>::new();
    md5::Digest::update(&mut h, inner.as_bytes());
    md5::Digest::update(&mut h, b"abcd");
    assert_eq!(got, format!("md5{}", hex::encode(md5::Digest::finalize(h))));
    assert_eq!(got.len(), 35);
}
