//! Unit tests for `secrets.rs`.
use std::os::unix::fs::PermissionsExt;

use super::*;

fn write(dir: &Path, name: &str, body: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn loads_all_three_forms_and_never_prints_them() {
    let d = tempfile::tempdir().unwrap();
    let pwf = write(d.path(), "pw", "from-file\n", 0o600);
    std::env::set_var("CORDON_TEST_PW", "from-env");
    let body = format!(
        "[credentials.a]\nuser = \"u1\"\npassword = \"inline-secret\"\n\
         [credentials.b]\nuser = \"u2\"\npassword_file = \"{}\"\n\
         [credentials.c]\nuser = \"u3\"\npassword_env = \"CORDON_TEST_PW\"\n",
        pwf.display()
    );
    let f = write(d.path(), "secrets.toml", &body, 0o600);
    let s = Secrets::load(&f).unwrap();
    assert_eq!(s.get("a").unwrap().password.expose(), "inline-secret");
    assert_eq!(s.get("b").unwrap().password.expose(), "from-file");
    assert_eq!(s.get("c").unwrap().password.expose(), "from-env");
    let shown = format!("{s:?} {}", s.get("a").unwrap().password);
    assert!(!shown.contains("inline-secret") && !shown.contains("from-file"), "{shown}");
}

#[test]
fn world_readable_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "s.toml", "[credentials.a]\nuser=\"u\"\npassword=\"x\"\n", 0o644);
    let err = Secrets::load(&f).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn errors_do_not_quote_secrets() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "s.toml", "[credentials.a]\nuser=\"u\"\npassword=\"hunter2\"\npassword_env=\"X\"\n", 0o600);
    let err = format!("{:#}", Secrets::load(&f).unwrap_err());
    assert!(!err.contains("hunter2"), "{err}");
}
