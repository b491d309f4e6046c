//! `[[intercept]]`: which connections are governed, and how cordon logs in upstream.

use super::*;

impl Validator<'_> {
    pub(super) fn intercept(&mut self, i: usize, raw: Spanned<RawIntercept>, seen: &[Intercept]) -> Option<Intercept> {
        let raw = raw.into_inner();
        let field = |f: &str| format!("intercept[{i}].{f}");
        let mut ok = true;
        let name = raw.name.get_ref().clone();
        if !valid_name(&name) {
            self.error(raw.name.span(), &field("name"), "letters, digits, '-' and '_'");
            ok = false;
        } else if seen.iter().any(|s| s.name == name) {
            self.error(raw.name.span(), &field("name"), format!("duplicate intercept name {name:?}"));
            ok = false;
        }
        let protocol = match raw.protocol.get_ref().parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(msg) => {
                self.error(raw.protocol.span(), &field("protocol"), msg);
                ok = false;
                None
            }
        };
        let port = match u16::try_from(*raw.port.get_ref()) {
            Ok(p) if p != 0 => p,
            _ => {
                self.error(raw.port.span(), &field("port"), "a TCP port from 1 to 65535");
                ok = false;
                0
            }
        };
        let mut destinations = Vec::new();
        for (j, d) in raw.destinations.iter().enumerate() {
            match parse_cidr(d.get_ref()) {
                Ok(c) => destinations.push(c),
                Err(msg) => {
                    self.error(d.span(), &format!("intercept[{i}].destinations[{j}]"), msg);
                    ok = false;
                }
            }
        }
        let upstream = match &raw.upstream {
            Some(u) => match u.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    self.error(
                        u.span(),
                        &field("upstream"),
                        format!("not an address:port ({e}), e.g. \"10.1.2.3:5432\""),
                    );
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let logs_in = protocol.is_some_and(|p| p.spec().logs_in);
        let login = self.login_settings(i, &raw, protocol);
        if logs_in && login.is_none() {
            ok = false;
        }
        for other in seen {
            if other.port == port && (other.destinations.is_empty() || destinations.is_empty()) {
                self.error(
                    raw.port.span(),
                    &field("port"),
                    format!(
                        "overlaps intercept {:?} on port {port}; the first matching rule would always win",
                        other.name
                    ),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        // inject sends a credential to whoever answers: the destination
        // must be pinned, not "any address the workload dials".
        if let Some(Login { auth: AuthMode::Inject { .. }, .. }) = &login {
            let pinned = upstream.is_some()
                || (!destinations.is_empty()
                    && destinations.iter().all(|d| d.prefix_len == if d.addr.is_ipv4() { 32 } else { 128 }));
            if !pinned {
                self.error(
                    raw.port.span(),
                    &field("destinations"),
                    "auth = \"inject\" sends a credential upstream: pin the server with `upstream` or with exact \
                     addresses in `destinations` (a /32 or /128 each)",
                );
                return None;
            }
        }
        let is_ssh = protocol.is_some_and(|p| p.name() == "ssh");
        let known_hosts = raw.known_hosts.as_ref().map(|k| PathBuf::from(k.get_ref()));
        match (&raw.known_hosts, is_ssh) {
            (None, true) => {
                self.error(
                    raw.protocol.span(),
                    &field("known_hosts"),
                    "an ssh intercept pins its servers' host keys: name a known_hosts file (plain keys or @cert-authority lines); an unknown key is refused",
                );
                return None;
            }
            (Some(k), false) => {
                self.error(k.span(), &field("known_hosts"), "known_hosts applies to protocol = \"ssh\" only");
                return None;
            }
            _ => {}
        }
        if is_ssh && matches!(&login, Some(Login { auth: AuthMode::Passthrough, .. })) {
            self.error(
                raw.protocol.span(),
                &field("auth"),
                "ssh terminates the workload's connection: cordon logs in with its own credential (auth = \"inject\")",
            );
            return None;
        }
        if !is_ssh {
            if let Some((u, v)) = raw.users.iter().next() {
                self.error(v.span(), &field(&format!("users.{u}")), "users applies to protocol = \"ssh\" only");
                return None;
            }
        }
        let users = raw.users.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect();
        let is_postgres = protocol.is_some_and(|p| p.name() == "postgres");
        if let (Some(p), false) = (&raw.prepare_statements, is_postgres) {
            self.error(
                p.span(),
                &field("prepare_statements"),
                "prepare_statements applies to protocol = \"postgres\" only",
            );
            return None;
        }
        let prepare_statements = raw.prepare_statements.as_ref().is_none_or(|p| *p.get_ref());
        Some(Intercept {
            name,
            protocol: protocol?,
            port,
            destinations,
            upstream,
            login,
            known_hosts,
            users,
            prepare_statements,
        })
    }

    /// `auth`, `credentials` and `upstream_*` apply to protocols that log in
    /// upstream themselves.
    pub(super) fn login_settings(&mut self, i: usize, raw: &RawIntercept, protocol: Option<Protocol>) -> Option<Login> {
        let field = |f: &str| format!("intercept[{i}].{f}");
        let Some(protocol) = protocol.filter(|p| p.spec().logs_in) else {
            for (name, v) in [
                ("auth", &raw.auth),
                ("credentials", &raw.credentials),
                ("upstream_tls", &raw.upstream_tls),
                ("upstream_ca", &raw.upstream_ca),
                ("upstream_server_name", &raw.upstream_server_name),
            ] {
                if let Some(v) = v {
                    let which = protocol.map_or_else(|| "this protocol".to_string(), |p| format!("protocol {p:?}"));
                    self.error(
                        v.span(),
                        &field(name),
                        format!("{which} relays bytes and never logs in upstream; this setting applies to protocols that terminate the connection (e.g. \"postgres\")"),
                    );
                }
            }
            return None;
        };
        let _ = protocol;
        let auth = match (raw.auth.as_ref().map(|a| a.get_ref().as_str()), &raw.credentials) {
            (None | Some("inject"), Some(c)) => AuthMode::Inject { credentials: c.get_ref().clone() },
            (None | Some("inject"), None) => {
                let span = raw.auth.as_ref().map_or(raw.protocol.span(), Spanned::span);
                self.error(
                    span,
                    &field("credentials"),
                    "auth = \"inject\" (the default) needs `credentials`, a name in the secrets file",
                );
                return None;
            }
            (Some("passthrough"), None) => AuthMode::Passthrough,
            (Some("passthrough"), Some(c)) => {
                self.error(
                    c.span(),
                    &field("credentials"),
                    "auth = \"passthrough\" relays the client's own login; remove `credentials`",
                );
                return None;
            }
            (Some(other), _) => {
                let span = raw.auth.as_ref().map_or(0..0, Spanned::span);
                self.error(
                    span,
                    &field("auth"),
                    format!("unknown auth mode {other:?}; use \"inject\" or \"passthrough\""),
                );
                return None;
            }
        };
        let tls = match raw.upstream_tls.as_ref().map(|t| t.get_ref().as_str()) {
            Some("disable") => {
                if let Some(ca) = &raw.upstream_ca {
                    self.error(ca.span(), &field("upstream_ca"), "upstream_tls = \"disable\" uses no CA");
                    return None;
                }
                UpstreamTls::Disable
            }
            None | Some("verify-full") => UpstreamTls::VerifyFull {
                ca_file: raw.upstream_ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
                server_name: raw.upstream_server_name.as_ref().map(|n| n.get_ref().clone()),
            },
            Some(other) => {
                let span = raw.upstream_tls.as_ref().map_or(0..0, Spanned::span);
                self.error(
                    span,
                    &field("upstream_tls"),
                    format!("unknown mode {other:?}; use \"verify-full\" (default) or \"disable\""),
                );
                return None;
            }
        };
        Some(Login { auth, tls })
    }
}
