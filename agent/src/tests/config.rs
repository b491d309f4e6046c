//! Unit tests for `config.rs`.
use super::*;

fn p(text: &str) -> Result<Policy, PolicyErrors> {
    parse(Path::new("t.toml"), text)
}

const GOOD: &str = r#"
[agent]
listen = "127.0.0.1:7431"

[[intercept]]
name = "pg"
protocol = "tcp"
port = 5432
destinations = ["127.0.0.2/32", "::1"]

[profiles.ci]
description = "CI"

[[tag]]
cgroup = "ci/*"
profile = "ci"

[[tag]]
unit = "nightly.service"
profile = "ci"
"#;

#[test]
fn good_policy_parses() {
    let pol = p(GOOD).expect("valid");
    assert_eq!(pol.intercepts.len(), 1);
    assert_eq!(pol.intercepts[0].destinations.len(), 2);
    assert_eq!(pol.kernel_rule_count(), 2);
    assert_eq!(pol.profile_id("ci"), Some(0));
    assert_eq!(pol.agent.listen6, Some("[::1]:7431".parse().unwrap()));
    assert_eq!(pol.tags[1].target, TagTarget::Unit("nightly.service".into()));
}

#[test]
fn unknown_profile_names_line_and_field() {
    let bad = GOOD.replace("profile = \"ci\"\n\n[[tag]]\nunit", "profile = \"cj\"\n\n[[tag]]\nunit");
    let errs = p(&bad).expect_err("must fail").0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].field, "tag[0].profile");
    assert_eq!(errs[0].line, 16);
    assert!(errs[0].message.contains("unknown profile \"cj\""));
    assert!(errs[0].to_string().starts_with("t.toml:16:"));
}

#[test]
fn bad_port_and_protocol_are_both_reported() {
    let bad = GOOD.replace("port = 5432", "port = 70000").replace("protocol = \"tcp\"", "protocol = \"gopher\"");
    let errs = p(&bad).expect_err("must fail").0;
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"intercept[0].port"), "{fields:?}");
    assert!(fields.contains(&"intercept[0].protocol"), "{fields:?}");
    let port = errs.iter().find(|e| e.field == "intercept[0].port").unwrap();
    assert_eq!((port.line, port.column), (8, 8));
}

#[test]
fn syntax_error_has_position() {
    let errs = p("[agent]\nlisten = \n").expect_err("must fail").0;
    assert_eq!(errs[0].line, 2);
}

#[test]
fn unknown_field_is_an_error() {
    let errs = p("[agent]\nlisten_addr = \"x\"\n").expect_err("must fail").0;
    assert!(errs[0].message.contains("listen_addr"), "{}", errs[0]);
    assert_eq!(errs[0].line, 2);
}

#[test]
fn cidr_forms() {
    let c = parse_cidr("10.0.0.0/8").unwrap();
    assert_eq!(c.to_v6_form().1, 104);
    assert!(parse_cidr("10.0.0.0/33").is_err());
    assert!(parse_cidr("nope").is_err());
    assert_eq!(parse_cidr("::1").unwrap().prefix_len, 128);
}

#[test]
fn non_loopback_listener_rejected() {
    let errs = p("[agent]\nlisten = \"0.0.0.0:7431\"\n").expect_err("must fail").0;
    assert_eq!(errs[0].field, "agent.listen");
}

/// Every policy shipped in policies/ must validate.
#[test]
fn shipped_policies_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("policies/ exists") {
        let path = e.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            if let Err(errs) = load(&path) {
                panic!("{errs}");
            }
            n += 1;
        }
    }
    assert!(n >= 4, "expected the example policies, found {n}");
}

#[test]
fn prepare_statements_is_a_postgres_setting_on_by_default() {
    let pg = GOOD
        .replace("protocol = \"tcp\"", "protocol = \"postgres\"\ncredentials = \"prod\"")
        .replace("[\"127.0.0.2/32\", \"::1\"]", "[\"127.0.0.2/32\"]");
    assert!(p(&pg).expect("valid").intercepts[0].prepare_statements);
    let off = pg.replace("port = 5432\n", "port = 5432\nprepare_statements = false\n");
    assert!(!p(&off).expect("valid").intercepts[0].prepare_statements);
    let relay = GOOD.replace("port = 5432\n", "port = 5432\nprepare_statements = false\n");
    let errs = p(&relay).expect_err("a byte relay prepares nothing").0;
    assert_eq!(errs[0].field, "intercept[0].prepare_statements", "{errs:?}");
    assert_eq!(errs[0].line, 9, "{errs:?}");
}

#[test]
fn login_settings_belong_to_protocols_that_log_in() {
    let relay = GOOD.replace("port = 5432\n", "port = 5432\ncredentials = \"prod\"\n");
    let errs = p(&relay).expect_err("a byte relay never logs in").0;
    assert_eq!(errs[0].field, "intercept[0].credentials", "{errs:?}");
    assert!(errs[0].message.contains("never logs in upstream"), "{}", errs[0].message);
    let pg = relay
        .replace("protocol = \"tcp\"", "protocol = \"postgres\"")
        .replace("[\"127.0.0.2/32\", \"::1\"]", "[\"127.0.0.2/32\"]");
    let pol = p(&pg).expect("postgres logs in");
    assert_eq!(pol.intercepts[0].protocol.name(), "postgres");
    assert!(
        matches!(&pol.intercepts[0].login, Some(Login { auth: AuthMode::Inject { credentials }, .. }) if credentials == "prod")
    );
    let planned = GOOD.replace("protocol = \"tcp\"", "protocol = \"mysql\"");
    let errs = p(&planned).expect_err("not built yet").0;
    assert!(errs[0].message.contains("not available in this build yet"), "{}", errs[0].message);
}

#[test]
fn audit_and_limit_settings_are_checked_with_their_field() {
    let with = |agent: &str, profile: &str| {
        GOOD.replace("listen = \"127.0.0.1:7431\"\n", &format!("listen = \"127.0.0.1:7431\"\n{agent}"))
            .replace("description = \"CI\"\n", &format!("description = \"CI\"\n{profile}"))
    };
    let pol = p(&with(
        "audit_durability = \"statement\"\naudit_sync_interval_ms = 5\naudit_space_left = \"512MB\"\nhandshake_timeout_secs = 7\n",
        "max_connections = 3\n",
    ))
    .expect("valid");
    assert_eq!(pol.agent.audit.durability, crate::audit::Durability::Statement);
    assert_eq!(pol.agent.audit.sync_interval, Duration::from_millis(5));
    assert_eq!(pol.agent.audit.space_left, Some(crate::audit::SpaceLeft::Bytes(512 << 20)));
    assert_eq!(pol.agent.handshake_timeout, Duration::from_secs(7));
    assert_eq!(pol.profiles[0].max_connections, Some(3));
    for (agent, profile, field) in [
        ("audit_durability = \"sometimes\"\n", "", "agent.audit_durability"),
        ("audit_sync_interval_ms = 0\n", "", "agent.audit_sync_interval_ms"),
        ("audit_space_left = \"lots\"\n", "", "agent.audit_space_left"),
        ("handshake_timeout_secs = 0\n", "", "agent.handshake_timeout_secs"),
        ("", "max_connections = 0\n", "profiles.ci.max_connections"),
    ] {
        let errs = p(&with(agent, profile)).expect_err(field).0;
        assert!(errs.iter().any(|e| e.field == field), "{field}: {errs:?}");
    }
}
