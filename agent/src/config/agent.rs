//! `[agent]`: listeners, paths, the audit log's settings, timeouts, limits.

use super::*;

impl Validator<'_> {
    pub(super) fn agent(&mut self, raw: Option<Spanned<RawAgent>>) -> AgentSettings {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let state_dir = raw
            .state_dir
            .as_ref()
            .map(|s| PathBuf::from(s.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/var/lib/cordon"));
        let path = |v: &Option<Spanned<String>>, default: PathBuf| {
            v.as_ref().map(|s| PathBuf::from(s.get_ref())).unwrap_or(default)
        };
        let listen = match &raw.listen {
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv4() && a.ip().is_loopback() => a,
                Ok(_) => {
                    self.error(
                        s.span(),
                        "agent.listen",
                        "the proxy listens on an IPv4 loopback address, e.g. \"127.0.0.1:7431\"",
                    );
                    default_listen()
                }
                Err(e) => {
                    self.error(s.span(), "agent.listen", format!("not an address:port: {e}"));
                    default_listen()
                }
            },
            None => default_listen(),
        };
        let listen6 = match &raw.listen6 {
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => match s.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv6() && a.ip().is_loopback() => Some(a),
                Ok(_) => {
                    self.error(s.span(), "agent.listen6", "the IPv6 listener is on ::1, e.g. \"[::1]:7431\"");
                    None
                }
                Err(e) => {
                    self.error(s.span(), "agent.listen6", format!("not an address:port: {e}"));
                    None
                }
            },
            None => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())),
        };
        if let Some(l6) = listen6 {
            if l6.port() != listen.port() {
                let span = raw.listen6.as_ref().map(Spanned::span).unwrap_or(0..0);
                self.error(
                    span,
                    "agent.listen6",
                    "must use the same port as agent.listen (the kernel rewrites to one port)",
                );
            }
        }
        let socket_mark = match &raw.socket_mark {
            Some(m) => match u32::try_from(*m.get_ref()) {
                Ok(0) | Err(_) => {
                    self.error(m.span(), "agent.socket_mark", "a non-zero 32-bit value");
                    DEFAULT_MARK
                }
                Ok(v) => v,
            },
            None => DEFAULT_MARK,
        };
        let agent_cgroup = match &raw.agent_cgroup {
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => {
                let v = s.get_ref().trim_matches('/').to_string();
                if v.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
                    self.error(s.span(), "agent.agent_cgroup", "a relative cgroup path without '.' or '..' components");
                }
                Some(v)
            }
            // Under systemd (INVOCATION_ID is set for services) the unit's
            // own cgroup in cordon.slice is already the agent's; leaving it
            // would hide the process from systemd. Elsewhere, make one.
            None if std::env::var_os("INVOCATION_ID").is_some() => None,
            None => Some("cordon.agent".to_string()),
        };
        let idle_timeout = self.seconds(&raw.idle_timeout_secs, "agent.idle_timeout_secs", 900);
        let handshake_timeout = self.seconds(&raw.handshake_timeout_secs, "agent.handshake_timeout_secs", 30);
        let connect_timeout = self.seconds(&raw.connect_timeout_secs, "agent.connect_timeout_secs", 10);
        let rescan_interval = match &raw.rescan_interval_ms {
            Some(v) if (50..=600_000).contains(v.get_ref()) => Duration::from_millis(*v.get_ref() as u64),
            Some(v) => {
                self.error(v.span(), "agent.rescan_interval_ms", "between 50 and 600000");
                Duration::from_secs(1)
            }
            None => Duration::from_secs(1),
        };
        let mut audit = crate::audit::Settings::default();
        if let Some(v) = &raw.audit_segment_max_bytes {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if n >= 256 => audit.segment_max_bytes = n,
                _ => self.error(v.span(), "agent.audit_segment_max_bytes", "at least 256 bytes"),
            }
        }
        if let Some(v) = &raw.audit_retention_days {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if n >= 1 => audit.retention = Some(Duration::from_secs(n * 86_400)),
                _ => self.error(v.span(), "agent.audit_retention_days", "a whole number of days, at least 1"),
            }
        }
        if let Some(v) = &raw.audit_durability {
            match v.get_ref().as_str() {
                "interval" => audit.durability = crate::audit::Durability::Interval,
                "statement" => audit.durability = crate::audit::Durability::Statement,
                other => self.error(
                    v.span(),
                    "agent.audit_durability",
                    format!("unknown mode {other:?}; use \"interval\" (group commit every audit_sync_interval_ms) or \"statement\" (each result waits for its record's fsync)"),
                ),
            }
        }
        if let Some(v) = &raw.audit_sync_interval_ms {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if (1..=1000).contains(&n) => audit.sync_interval = Duration::from_millis(n),
                _ => self.error(v.span(), "agent.audit_sync_interval_ms", "between 1 and 1000 milliseconds"),
            }
        }
        if let Some(v) = &raw.audit_space_left {
            match v.get_ref().as_str() {
                "off" => audit.space_left = None,
                s => match crate::audit::SpaceLeft::parse(s) {
                    Ok(w) => audit.space_left = Some(w),
                    Err(msg) => self.error(v.span(), "agent.audit_space_left", format!("{msg}, or \"off\"")),
                },
            }
        }
        let max_message_bytes = match &raw.max_message_bytes {
            Some(v) => match usize::try_from(*v.get_ref()) {
                Ok(n) if (64 * 1024..=1 << 30).contains(&n) => n,
                _ => {
                    self.error(v.span(), "agent.max_message_bytes", "between 65536 and 1073741824");
                    DEFAULT_MAX_MESSAGE
                }
            },
            None => DEFAULT_MAX_MESSAGE,
        };
        if raw.tls_cert.is_some() != raw.tls_key.is_some() {
            let span = raw.tls_cert.as_ref().or(raw.tls_key.as_ref()).map_or(0..0, Spanned::span);
            self.error(span, "agent.tls_cert", "tls_cert and tls_key go together");
        }
        AgentSettings {
            secrets_file: path(&raw.secrets_file, PathBuf::from("/etc/cordon/secrets.toml")),
            tls_cert: raw.tls_cert.as_ref().map(|s| PathBuf::from(s.get_ref())),
            tls_key: raw.tls_key.as_ref().map(|s| PathBuf::from(s.get_ref())),
            max_message_bytes,
            listen,
            listen6,
            audit_dir: path(&raw.audit_dir, state_dir.join("audit")),
            audit,
            control_socket: path(&raw.control_socket, PathBuf::from("/run/cordon/control.sock")),
            bpffs_dir: path(&raw.bpffs_dir, PathBuf::from("/sys/fs/bpf/cordon")),
            state_dir,
            socket_mark,
            agent_cgroup,
            idle_timeout,
            handshake_timeout,
            connect_timeout,
            rescan_interval,
        }
    }

    pub(super) fn seconds(&mut self, v: &Option<Spanned<i64>>, field: &str, default: u64) -> Duration {
        match v {
            Some(s) if (1..=86_400 * 7).contains(s.get_ref()) => Duration::from_secs(*s.get_ref() as u64),
            Some(s) => {
                self.error(s.span(), field, "between 1 and 604800 seconds");
                Duration::from_secs(default)
            }
            None => Duration::from_secs(default),
        }
    }
}
