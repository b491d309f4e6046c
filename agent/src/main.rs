use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cordon::{config, control, daemon, kernel, sessions};
use serde_json::Value;

const DEFAULT_CONFIG: &str = "/etc/cordon/policy.toml";

#[derive(Parser)]
#[command(name = "cordon", version, about = "Governs what workloads in tagged cgroups do with production data")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the kernel programs, apply tags, run the proxy.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove cordon's kernel programs and maps (and stop a running agent).
    Detach {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Tag a cgroup (path under the cgroup2 root) or systemd unit at runtime.
    Tag {
        target: String,
        #[arg(long)]
        profile: String,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove a runtime tag.
    Untag {
        target: String,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show tagged cgroups.
    Tags {
        #[arg(long)]
        json: bool,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Policy file commands.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Recorded sessions.
    Sessions {
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// Print a session as the client saw it (SSH: play it in the terminal).
    Replay {
        session: String,
        /// SSH: print the output at once, without the recorded timing.
        #[arg(long)]
        no_wait: bool,
        /// SSH: play faster (2) or slower (0.5).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// SSH: write the recording as asciicast v2 (for older players) instead of playing it.
        #[arg(long)]
        format: Option<String>,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// SSH: the lines that make workloads trust cordon's host key.
    Ssh {
        #[command(subcommand)]
        cmd: SshCmd,
    },
    /// Statements held for approval: list, show, approve, deny, watch.
    Approvals {
        #[command(subcommand)]
        cmd: cordon::approvals::cli::Command,
        /// The agent's approvals socket (default: beside the policy's control socket).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        /// Decide in a shared PostgreSQL store instead, as your own role
        /// (postgresql://you@host/db; password from PGPASSWORD).
        #[arg(long, global = true)]
        store: Option<String>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SshCmd {
    /// Print the lines to install once in /etc/ssh/ssh_known_hosts on each
    /// workload host: cordon's host CA (@cert-authority *) and its host key
    /// (* and, for clients without certificates or patterns, per destination).
    KnownHosts {
        /// Names or addresses workloads dial (paramiko matches exact names only).
        destinations: Vec<String>,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file; errors name file:line:column and the field.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum SessionsCmd {
    List {
        #[arg(long)]
        json: bool,
        /// Only sessions whose workload matches (cgroup, unit, user, comm, pid or uid contains it).
        #[arg(long)]
        identity: Option<String>,
        /// Only sessions started since: an RFC 3339 time or an age such as 30m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Read this audit directory instead of the one the policy names.
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain: a modified, removed or truncated record fails.
    Verify {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
    /// Sessions and statements that carried a value (a literal or a bind
    /// parameter), found by its keyed hash; the value is never stored.
    Find {
        #[arg(long)]
        value: String,
        #[arg(long)]
        json: bool,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cordon: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    if std::env::var("CORDON_RUNTIME").as_deref() == Ok("current") {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime");
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    // Half the cores by default (one on a 2-core host): the agent shares the
    // host with the workloads it governs and often with the servers, and
    // every hop through it is a wake-up; a worker per core spends more on
    // waking the other workers than it gains (on 2 cores, 10 % more CPU
    // per PostgreSQL statement and 15 % more per SSH GiB; BENCHMARKS.md).
    // Checked again once statements were prepared upstream and the CPUs sat
    // idle 15 µs per transaction at 8 clients: two workers still used 14-36 %
    // more CPU per transaction and lost throughput (pgbench -S simple, c1
    // 0.81 → 0.77 of direct, c8 0.40 → 0.34; `bench ab`).
    // CORDON_WORKER_THREADS overrides it.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let workers = std::env::var("CORDON_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| (cores / 2).max(1));
    b.worker_threads(workers);
    b.enable_all().build().context("starting the async runtime")
}

/// Settings for client commands: from the policy if it reads, else the
/// defaults, so `cordon tags` still works while the file has an error.
fn agent_settings(config: &Path) -> config::AgentSettings {
    config::load(config).map(|p| p.agent).unwrap_or_else(|_| config::AgentSettings::defaults())
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Run { config } => {
            init_tracing();
            let prepared = daemon::prepare(&config)?;
            runtime()?.block_on(daemon::run(prepared))?;
            Ok(0)
        }
        Cmd::Detach { config } => {
            let agent = agent_settings(&config);
            // Stop a running agent first, or it would keep serving without
            // enforcement and re-attach on its next start.
            let stopped =
                runtime()?.block_on(control::request(&agent.control_socket, &control::Request::Shutdown)).is_ok();
            if stopped {
                println!("asked the running agent to stop");
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            let removed = kernel::detach(&agent.bpffs_dir)?;
            if removed.is_empty() {
                println!("nothing to detach under {}", agent.bpffs_dir.display());
            } else {
                for r in &removed {
                    println!("removed {r}");
                }
                println!("cordon's programs are detached; connections go direct again");
            }
            Ok(0)
        }
        Cmd::Tag { target, profile, config } => {
            let agent = agent_settings(&config);
            let req = control::Request::Tag { target, profile };
            let v = runtime()?.block_on(control::request(&agent.control_socket, &req))?;
            for t in v.get("tagged").and_then(Value::as_array).into_iter().flatten() {
                println!(
                    "tagged {} (id {}) with profile {}",
                    t.get("cgroup").and_then(Value::as_str).unwrap_or("?"),
                    t.get("cgroup_id").unwrap_or(&Value::Null),
                    t.get("profile").and_then(Value::as_str).unwrap_or("?")
                );
            }
            Ok(0)
        }
        Cmd::Untag { target, config } => {
            let agent = agent_settings(&config);
            runtime()?.block_on(control::request(
                &agent.control_socket,
                &control::Request::Untag { target: target.clone() },
            ))?;
            println!("untagged {target}");
            Ok(0)
        }
        Cmd::Tags { json, config } => {
            let agent = agent_settings(&config);
            let v = runtime()?.block_on(control::request(&agent.control_socket, &control::Request::Tags))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<40} {:>10} {:<12} SOURCE", "CGROUP", "ID", "PROFILE");
                for t in v.get("tags").and_then(Value::as_array).into_iter().flatten() {
                    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                    println!(
                        "{:<40} {:>10} {:<12} {}",
                        s("cgroup"),
                        t.get("cgroup_id").unwrap_or(&Value::Null),
                        s("profile"),
                        s("source")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Policy { cmd: PolicyCmd::Check { file } } => match config::load(&file) {
            Ok(p) => {
                let labeled = !p.classifier.rules.is_empty();
                for ic in &p.intercepts {
                    let passthrough =
                        matches!(ic.login.as_ref().map(|pg| &pg.auth), Some(config::AuthMode::Passthrough));
                    if passthrough && labeled && p.profiles.iter().any(|pr| pr.protects_anything()) {
                        eprintln!(
                            "{}: warning: intercept {} uses auth = \"passthrough\": sessions of profiles that mask labeled data are refused there (mask at read needs auth = \"inject\")",
                            file.display(),
                            ic.name
                        );
                    }
                }
                for prof in &p.profiles {
                    if prof.record.text == cordon::pipeline::literals::TextMode::Full {
                        eprintln!(
                            "{}: warning: profiles.{}.record_text = \"full\" records statement text as sent: card numbers, keys and other literals reach the audit log and recordings in clear",
                            file.display(),
                            prof.name
                        );
                    }
                }
                println!(
                    "{}: ok ({} intercept rules, {} profiles, {} tag rules)",
                    file.display(),
                    p.intercepts.len(),
                    p.profiles.len(),
                    p.tags.len()
                );
                Ok(0)
            }
            Err(errs) => {
                eprintln!("{errs}");
                Ok(1)
            }
        },
        Cmd::Ssh { cmd: SshCmd::KnownHosts { destinations, config } } => {
            let state_dir = agent_settings(&config).state_dir;
            let id = cordon::ssh::hostkey::HostIdentity::load_or_create(&state_dir)?;
            for line in id.known_hosts_lines(&destinations)? {
                println!("{line}");
            }
            Ok(0)
        }
        Cmd::Approvals { cmd, store: Some(url), .. } => {
            runtime()?.block_on(cordon::approvals::cli::run_store(cmd, &url))
        }
        Cmd::Approvals { cmd, socket, config, store: None } => {
            let path = cordon::approvals::cli::socket_path(socket, &config);
            runtime()?.block_on(cordon::approvals::cli::run(cmd, &path))
        }
        Cmd::Audit { cmd: AuditCmd::Verify { config, audit_dir } } => {
            let dir = audit_dir.unwrap_or_else(|| agent_settings(&config).audit_dir);
            match cordon::audit::verify(&dir) {
                Ok(v) => {
                    println!(
                        "{}: ok: {} records (seq {}..={}) in {} segments, chain intact",
                        dir.display(),
                        v.records,
                        v.first_seq,
                        v.last_seq,
                        v.segments
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("{}: FAILED: {e:#}", dir.display());
                    Ok(1)
                }
            }
        }
        Cmd::Audit { cmd: AuditCmd::Find { value, json, config, audit_dir } } => {
            let settings = agent_settings(&config);
            let dir = audit_dir.unwrap_or_else(|| settings.audit_dir.clone());
            let secrets = cordon::secrets::Secrets::load(&settings.secrets_file).ok();
            let key = match secrets.as_ref().and_then(|s| s.literal_key.as_ref()) {
                Some(k) => cordon::pipeline::literals::LiteralKey::new(k.expose().as_bytes()),
                None => {
                    let path = settings.state_dir.join("literal.key");
                    let k = std::fs::read(&path).map_err(|e| {
                        anyhow::anyhow!(
                            "no literal key: neither [audit] literal_key in {} nor {} ({e})",
                            settings.secrets_file.display(),
                            path.display()
                        )
                    })?;
                    cordon::pipeline::literals::LiteralKey::new(&k)
                }
            };
            let found = sessions::find(&dir, &key, &value)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else if found.is_empty() {
                println!("no statement carried that value");
            } else {
                println!("{:<20} {:>6} {:>8} {:<28} IN", "SESSION", "STMT", "SEQ", "TIME");
                for f in &found {
                    println!("{:<20} {:>6} {:>8} {:<28} {}", f.session, f.stmt, f.seq, f.ts, f.r#in);
                }
            }
            Ok(if found.is_empty() { 1 } else { 0 })
        }
        Cmd::Replay { session, config, audit_dir, no_wait, speed, format } => {
            let dir = audit_dir.unwrap_or_else(|| agent_settings(&config).audit_dir);
            let play = match format.as_deref() {
                None => cordon::replay::Play::Terminal { wait: !no_wait, speed },
                Some("v2") => cordon::replay::Play::AsciicastV2,
                Some(other) => anyhow::bail!("unknown --format {other:?}; use v2"),
            };
            cordon::replay::replay_to(&dir, &session, play, &mut std::io::stdout())?;
            Ok(0)
        }
        Cmd::Sessions { cmd: SessionsCmd::List { json, identity, since, config, audit_dir } } => {
            let path = audit_dir.unwrap_or_else(|| agent_settings(&config).audit_dir);
            let since = since.as_deref().map(sessions::parse_since).transpose()?;
            let list = sessions::filter(sessions::list(&path)?, identity.as_deref(), since);
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", sessions::render_table(&list));
            }
            Ok(0)
        }
    }
}
