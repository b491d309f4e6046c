//! Unit tests for `pipeline/fingerprint.rs`.
use super::*;

#[test]
fn literals_comments_and_space_fold() {
    let a = normalize("SELECT * FROM t WHERE id = 42 AND name = 'o''brien' -- why\n");
    assert_eq!(a, "SELECT * FROM t WHERE id = ? AND name = ?");
    let b = normalize("SELECT  *\n FROM t /* x /* nested */ y */ WHERE id=7 AND name=E'a\\'b'");
    assert_eq!(b, "SELECT * FROM t WHERE id=? AND name=?");
    assert_eq!(fingerprint(&normalize("select 1")), fingerprint(&normalize("select   2")));
    assert_ne!(fingerprint(&normalize("select 1")), fingerprint(&normalize("select 1 from x")));
}

#[test]
fn dollar_quotes_identifiers_and_params() {
    assert_eq!(normalize("select $fn$ it's $$ $fn$, $1, \"Col 1\", t1.c2"), "select ?, $1, \"Col 1\", t1.c2");
    assert_eq!(normalize("select 'unterminated"), "select ?");
    assert_eq!(normalize("select 1.5e3, x2"), "select ?, x2");
    assert_eq!(normalize("sélect 'é'"), "sélect ?");
}
