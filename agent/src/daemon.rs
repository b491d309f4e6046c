//! `cordon run`: start-up order, the cgroup watcher, reload and shutdown.
//!
//! Start-up order matters:
//! 1. move into the agent's own cgroup before any thread exists;
//! 2. attach (or re-adopt) the programs, bind the listeners, then mark the
//!    kernel configuration ready — until then tagged connects get EPERM;
//! 3. tag cgroups, then serve.
//!
//! Shutdown leaves the programs attached: a stopped agent keeps governed
//! workloads from reaching their databases directly (they get ECONNREFUSED).
//! `cordon detach` is the way to remove enforcement.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_common::InterceptRule;
use anyhow::{bail, Context, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
};
use tracing::{error, info, warn};

use crate::{
    audit::{AuditLog, Record},
    cgroup,
    config::{self, Policy},
    control,
    kernel::{self, Attachment, Kernel},
    proxy,
    state::Shared,
    tagging::Tagger,
};

/// Everything done before the tokio runtime exists.
pub struct Prepared {
    policy: Policy,
    config_path: PathBuf,
    cgroup_root: PathBuf,
    agent_cgroup: String,
}

/// Synchronous part of start-up. Runs before the runtime, so moving into the
/// agent cgroup moves the whole (single-threaded) process.
pub fn prepare(config_path: &Path) -> Result<Prepared> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("cordon run needs root (it loads eBPF programs and sets SO_MARK)");
    }
    let policy =
        config::load(config_path).map_err(|e| anyhow::anyhow!("{e}\nthe policy has errors; nothing was started"))?;
    let cgroup_root = cgroup::find_v2_root()?;
    raise_fd_limit();
    let agent_cgroup = match &policy.agent.agent_cgroup {
        Some(rel) => {
            cgroup::move_self_into(&cgroup_root, rel)?;
            rel.clone()
        }
        None => cgroup::of_pid("self")?,
    };
    Ok(Prepared { policy, config_path: config_path.to_owned(), cgroup_root, agent_cgroup })
}

/// Every governed connection holds two descriptors (client and upstream):
/// raise the soft limit to the hard one (systemd's LimitNOFILE), and as root
/// the hard one up to `fs.nr_open` when it is lower than needed for tens of
/// thousands of connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const WANT: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let nr_open =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(hard);
    let new_hard = hard.max(WANT.min(nr_open));
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, new_hard, new_hard).is_ok() {
        new_hard
    } else if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if limit < 20_000 {
        tracing::warn!(limit, "few file descriptors: each governed connection needs two; raise LimitNOFILE");
    }
}

pub async fn run(p: Prepared) -> Result<()> {
    let Prepared { policy, config_path, cgroup_root, agent_cgroup } = p;
    let agent_cgroup_id = cgroup::id_of(&cgroup_root.join(&agent_cgroup))
        .with_context(|| format!("reading the id of the agent's cgroup {agent_cgroup:?}"))?;
    info!(cgroup_root = %cgroup_root.display(), agent_cgroup = %agent_cgroup, "starting");

    std::fs::create_dir_all(&policy.agent.state_dir)
        .with_context(|| format!("creating the state directory {}", policy.agent.state_dir.display()))?;
    let audit = AuditLog::open(&policy.agent.audit_dir, policy.agent.audit)?;

    let (mut kern, attachment) = Kernel::attach_or_adopt(&policy.agent.bpffs_dir, &cgroup_root)?;
    match attachment {
        Attachment::Adopted => info!(pin_dir = %kern.pin_dir().display(), "re-adopted pinned programs and maps"),
        Attachment::Attached => info!(pin_dir = %kern.pin_dir().display(), "attached and pinned programs"),
    }

    let listener = TcpListener::bind(policy.agent.listen)
        .await
        .with_context(|| format!("binding the proxy listener {}", policy.agent.listen))?;
    let listener6 = match policy.agent.listen6 {
        Some(a) => match bind6(a) {
            Ok(l) => Some(l),
            Err(e) => {
                // IPv6 destinations are still redirected to [::1]:port; with
                // nothing listening they are refused, never let through.
                warn!("IPv6 proxy listener unavailable, intercepted IPv6 connections will be refused: {e:#}");
                None
            }
        },
        None => None,
    };

    kern.set_rules(&kernel_rules(&policy))?;
    kern.set_config(&kernel::proxy_config(
        policy.agent.listen,
        policy.agent.listen6,
        policy.agent.socket_mark,
        agent_cgroup_id,
    ))?;

    let mut tagger = Tagger::new(&cgroup_root, &policy.agent.state_dir)?;
    tagger.reconcile(&policy, &mut kern)?;
    let control_listener = control::bind(&policy.agent.control_socket)?;
    let approvals_listener =
        crate::approvals::socket::bind(&crate::approvals::socket::path_beside(&policy.agent.control_socket))?;

    let secrets = load_secrets(&policy)?;
    let client_tls = if policy.intercepts.iter().any(|i| i.protocol.spec().logs_in) {
        Some(crate::net::server_config(
            policy.agent.tls_cert.as_deref(),
            policy.agent.tls_key.as_deref(),
            &policy.agent.state_dir,
        )?)
    } else {
        None
    };
    let shared = Arc::new(Shared::new(cgroup_root.clone(), policy, kern, tagger, audit, secrets, client_tls));
    let start = Record::new("agent", None)
        .with("action", "start")
        .with("pid", std::process::id())
        .with("policy", &config_path)
        .with("attachment", format!("{attachment:?}").to_lowercase());
    shared.audit.write(start).await?;

    tokio::spawn(proxy::serve(listener, shared.clone()));
    if let Some(l6) = listener6 {
        tokio::spawn(proxy::serve(l6, shared.clone()));
    }
    tokio::spawn(control::serve(control_listener, shared.clone()));
    tokio::spawn(crate::approvals::socket::serve(approvals_listener, shared.clone()));
    tokio::spawn(crate::approvals::run_store(shared.clone()));
    tokio::spawn(crate::approvals::webhook::run(shared.clone()));
    spawn_watcher(shared.clone());
    // Retention also runs at each segment rotation; hourly covers quiet hosts.
    let pruner = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            if let Err(e) = pruner.audit.prune().await {
                warn!("audit retention failed: {e:#}");
            }
        }
    });
    info!(listen = %shared.policy().agent.listen, "ready");

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&shared, &config_path).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = shared.shutdown.notified() => break,
        }
    }
    info!("stopping; the kernel programs stay attached (run `cordon detach` to remove them)");
    let stop = Record::new("agent", None).with("action", "stop").with("pid", std::process::id());
    let _ = shared.audit.write(stop).await;
    let _ = std::fs::remove_file(&shared.policy().agent.control_socket);
    Ok(())
}

fn bind6(addr: SocketAddr) -> Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6().context("creating the IPv6 listener socket")?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("binding {addr}"))?;
    socket.listen(1024).with_context(|| format!("listening on {addr}"))
}

/// One kernel rule per (intercept, destination); rule_id = intercept index.
pub fn kernel_rules(policy: &Policy) -> Vec<InterceptRule> {
    let mut out = Vec::new();
    for (i, ic) in policy.intercepts.iter().enumerate() {
        let rule_id = i as u32;
        if ic.destinations.is_empty() {
            out.push(InterceptRule { addr: [0; 16], prefix_len: 0, enabled: 1, port: ic.port, rule_id });
        }
        for d in &ic.destinations {
            let (addr, prefix_len) = d.to_v6_form();
            out.push(InterceptRule { addr, prefix_len, enabled: 1, port: ic.port, rule_id });
        }
    }
    out
}

/// The secrets file, checked against the policy: every `credentials` an
/// inject-mode intercept names must be there. Absent and unneeded is fine.
fn load_secrets(policy: &Policy) -> Result<crate::secrets::Secrets> {
    let needed: Vec<(&str, &str)> = policy
        .intercepts
        .iter()
        .filter_map(|i| match i.login.as_ref().map(|p| &p.auth) {
            Some(crate::config::AuthMode::Inject { credentials }) => Some((i.name.as_str(), credentials.as_str())),
            _ => None,
        })
        .collect();
    let path = &policy.agent.secrets_file;
    if needed.is_empty() && !path.exists() {
        return Ok(crate::secrets::Secrets::default());
    }
    let secrets = crate::secrets::Secrets::load(path)?;
    for (intercept, cred) in needed {
        if secrets.get(cred).is_none() {
            bail!("intercept {intercept:?} injects credentials {cred:?}, which {} does not define", path.display());
        }
    }
    for i in &policy.intercepts {
        for (user, cred) in &i.users {
            if secrets.get(cred).is_none() {
                bail!(
                    "intercept {:?} maps ssh user {user:?} to credentials {cred:?}, which {} does not define",
                    i.name,
                    path.display()
                );
            }
        }
    }
    // What approvals name: the store's login and the webhooks' secrets.
    for p in &policy.profiles {
        let Some(a) = &p.approvals else { continue };
        if let Some(c) = a.store.as_ref().and_then(|s| s.credentials.as_ref()) {
            if secrets.get(c).is_none() {
                bail!(
                    "profiles.{}.approvals.store_credentials names {c:?}, which {} does not define",
                    p.name,
                    path.display()
                );
            }
        }
        for (i, h) in a.webhooks.iter().enumerate() {
            if let Some(s) = h.secret.as_ref().filter(|s| !secrets.webhooks.contains_key(*s)) {
                bail!(
                    "profiles.{}.approvals.webhook[{i}].secret names {s:?}, which is not in [webhooks] of {}",
                    p.name,
                    path.display()
                );
            }
        }
    }
    Ok(secrets)
}

/// SIGHUP: validate the file; only a valid policy replaces the one in force.
async fn reload(shared: &Arc<Shared>, path: &Path) {
    let old = shared.policy();
    let mut new = match config::load(path) {
        Ok(p) => p,
        Err(errs) => {
            for e in &errs.0 {
                error!("policy reload rejected: {e}");
            }
            error!("the previous policy stays in force");
            let rec = Record::new("agent", None)
                .with("action", "reload_rejected")
                .with("errors", errs.0.iter().map(ToString::to_string).collect::<Vec<_>>());
            let _ = shared.audit.write(rec).await;
            return;
        }
    };
    // Listener, paths, mark and agent cgroup are fixed for the process's
    // life; timeouts, intercepts, profiles and tags follow the file.
    let mut fixed = old.agent.clone();
    fixed.idle_timeout = new.agent.idle_timeout;
    fixed.connect_timeout = new.agent.connect_timeout;
    fixed.rescan_interval = new.agent.rescan_interval;
    if fixed != new.agent {
        warn!("changes under [agent] other than timeouts take effect at the next restart");
    }
    new.agent = fixed;

    let secrets = match load_secrets(&new) {
        Ok(s) => s,
        Err(e) => {
            error!("policy reload rejected: {e:#}; the previous policy stays in force");
            let rec =
                Record::new("agent", None).with("action", "reload_rejected").with("errors", vec![format!("{e:#}")]);
            let _ = shared.audit.write(rec).await;
            return;
        }
    };
    let applied = (|| -> Result<()> {
        let mut kernel = shared.kernel.lock().map_err(|_| anyhow::anyhow!("kernel state lock poisoned"))?;
        let mut tagger = shared.tagger.lock().map_err(|_| anyhow::anyhow!("tagger lock poisoned"))?;
        kernel.set_rules(&kernel_rules(&new))?;
        tagger.reconcile(&new, &mut kernel)?;
        Ok(())
    })();
    match applied {
        Ok(()) => {
            if let Ok(mut p) = shared.policy.write() {
                *p = Arc::new(new);
            }
            if let Ok(mut s) = shared.secrets.write() {
                *s = Arc::new(secrets);
            }
            info!(policy = %path.display(), "policy reloaded");
            let rec = Record::new("agent", None).with("action", "reload").with("policy", path);
            let _ = shared.audit.write(rec).await;
        }
        Err(e) => {
            error!("applying the new policy failed: {e:#}; restoring the previous one");
            if let (Ok(mut kernel), Ok(mut tagger)) = (shared.kernel.lock(), shared.tagger.lock()) {
                let _ = kernel.set_rules(&kernel_rules(&old));
                let _ = tagger.reconcile(&old, &mut kernel);
            }
        }
    }
}

/// New cgroups: inotify on every cgroup directory triggers a reconcile; a
/// periodic rescan catches anything inotify missed.
fn spawn_watcher(shared: Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let root = shared.cgroup_root.clone();
    let spawned = std::thread::Builder::new().name("cordon-cgwatch".into()).spawn(move || inotify_loop(&root, &tx));
    if let Err(e) = spawned {
        warn!("cgroup watcher thread not started ({e}); relying on the periodic rescan");
    }
    tokio::spawn(async move {
        loop {
            let interval = shared.policy().agent.rescan_interval;
            tokio::select! {
                _ = rx.recv() => {
                    // Let a burst of mkdirs settle into one reconcile.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while rx.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(interval) => {}
            }
            let policy = shared.policy();
            let result = match (shared.tagger.lock(), shared.kernel.lock()) {
                (Ok(mut t), Ok(mut k)) => t.reconcile(&policy, &mut k),
                _ => Err(anyhow::anyhow!("state lock poisoned")),
            };
            if let Err(e) = result {
                warn!("tag reconcile failed: {e:#}");
            }
        }
    });
}

fn inotify_loop(root: &Path, tx: &tokio::sync::mpsc::Sender<()>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC) else {
        warn!("inotify unavailable; relying on the periodic rescan");
        return;
    };
    let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR | AddWatchFlags::IN_MOVED_TO;
    let watch_all = |ino: &Inotify| {
        if let Ok(all) = cgroup::walk(root) {
            for (rel, _) in all {
                let _ = ino.add_watch(&root.join(rel), flags);
            }
        }
    };
    watch_all(&ino);
    loop {
        match ino.read_events() {
            Ok(events) if !events.is_empty() => {
                // Watch the new directories too, then ask for a reconcile.
                watch_all(&ino);
                let _ = tx.try_send(());
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!("inotify read failed ({e}); relying on the periodic rescan");
                return;
            }
        }
    }
}
