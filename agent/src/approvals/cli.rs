//! `cordon approvals …`: the approver's commands, over the approvals socket
//! of the agent on this host.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

use super::socket::{self, Request};

#[derive(Subcommand)]
pub enum Command {
    /// Pending requests you may decide.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One request: the statement (with its parameters), workload, rule, time held.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (it runs once enough distinct people have).
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// Approve alone (only users in approvals.break_glass; --reason required).
        #[arg(long)]
        break_glass: bool,
    },
    /// Deny a request; the workload gets the reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Print requests and decisions as they happen (one JSON object per line with --json).
    Watch {
        #[arg(long)]
        json: bool,
    },
    /// Create the shared store's table and trigger (with --store; idempotent).
    InitStore,
}

/// The approvals socket: `--socket`, else beside the policy's control
/// socket, else the default place.
pub fn socket_path(explicit: Option<PathBuf>, config: &Path) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let control = crate::config::load(config)
            .map(|p| p.agent.control_socket)
            .unwrap_or_else(|_| crate::config::AgentSettings::defaults().control_socket);
        socket::path_beside(&control)
    })
}

/// Against a shared store, as the approver's own database role: the URL
/// names the user; the password comes from PGPASSWORD (or the URL), the
/// CA for the store's certificate from PGSSLROOTCERT (else system roots).
pub async fn run_store(cmd: Command, url: &str) -> Result<i32> {
    use super::store;
    let password = std::env::var("PGPASSWORD").ok();
    let parsed: tokio_postgres::Config =
        url.parse().map_err(|e| anyhow::anyhow!("the store URL does not parse: {e}"))?;
    let user = parsed.get_user().map(str::to_string).or_else(|| std::env::var("PGUSER").ok());
    let login = match (&user, &password) {
        (Some(u), Some(p)) => Some((u.as_str(), p.as_str())),
        _ => None,
    };
    let ca = std::env::var_os("PGSSLROOTCERT").map(std::path::PathBuf::from);
    let (client, mut notes) = store::connect(url, login, ca.as_deref()).await?;
    match cmd {
        Command::InitStore => {
            store::init(&client).await?;
            println!("the approvals table is ready; GRANT SELECT, INSERT, UPDATE on cordon_approvals to the agents' role, and SELECT, UPDATE to each approver's own role");
            Ok(0)
        }
        Command::List { json } => {
            let list = store::pending(&client, None).await?;
            print_list(&list, json)
        }
        Command::Show { id, json } => {
            let list = store::pending(&client, Some(&id)).await?;
            let Some(r) = list.first() else { anyhow::bail!("no pending request {id} that your role may see") };
            print_one(r, json)
        }
        Command::Approve { id, reason, break_glass } => {
            if break_glass {
                anyhow::bail!(
                    "break-glass is for approvals on the agent's host; in the store, grant the role what it needs"
                );
            }
            let msg = store::decide(&client, &id, true, reason.as_deref()).await?;
            println!("{msg}");
            Ok(if msg.starts_with("refused") { 1 } else { 0 })
        }
        Command::Deny { id, reason } => {
            let msg = store::decide(&client, &id, false, Some(&reason)).await?;
            println!("{msg}");
            Ok(if msg.starts_with("refused") { 1 } else { 0 })
        }
        Command::Watch { json } => {
            client.batch_execute("LISTEN cordon_approvals").await?;
            let mut seen = std::collections::HashSet::new();
            loop {
                for r in store::pending(&client, None).await? {
                    let id = s(&r, "id").to_string();
                    if seen.insert(id) {
                        if json {
                            println!("{}", serde_json::json!({"event": "request", "request": r}));
                        } else {
                            println!(
                                "request {} {} rule {} from {}: {}",
                                s(&r, "id"),
                                s(&r, "profile"),
                                s(&r, "rule"),
                                workload(&r),
                                one_line(s(&r, "text"), 80)
                            );
                        }
                    }
                }
                use std::io::Write;
                std::io::stdout().flush()?;
                tokio::select! {
                    n = notes.recv() => if n.is_none() { return Ok(0) },
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

fn print_list(list: &[Value], json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no pending requests");
    } else {
        println!(
            "{:<16} {:<10} {:<18} {:<20} {:>6} {:>5}  STATEMENT",
            "ID", "PROFILE", "RULE", "WORKLOAD", "HELD", "OK"
        );
        for r in list {
            println!(
                "{:<16} {:<10} {:<18} {:<20} {:>5}s {:>2}/{:<2} {}",
                s(r, "id"),
                s(r, "profile"),
                s(r, "rule"),
                workload(r),
                r.get("held_s").and_then(Value::as_u64).unwrap_or(0),
                r.get("approvals").and_then(Value::as_array).map_or(0, Vec::len),
                r.get("required").and_then(Value::as_u64).unwrap_or(1),
                one_line(s(r, "text"), 60),
            );
        }
    }
    Ok(0)
}

fn print_one(r: &Value, json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(0);
    }
    let target = r.get("target").cloned().unwrap_or(Value::Null);
    println!("request    {}", s(r, "id"));
    println!("rule       {}: {}", s(r, "rule"), s(r, "reason"));
    println!("workload   {} (profile {})", workload(r), s(r, "profile"));
    println!(
        "target     {} database {} as {}",
        s(r, "upstream").to_string() + s(&target, "upstream"),
        s(r, "database").to_string() + s(&target, "database"),
        s(r, "upstream_user").to_string() + s(&target, "upstream_user")
    );
    println!(
        "held       {} s (expires in {} s); approvals {:?} of {}",
        r.get("held_s").and_then(Value::as_u64).unwrap_or(0),
        r.get("expires_in_s").and_then(Value::as_u64).unwrap_or(0),
        r.get("approvals").cloned().unwrap_or(Value::Null),
        r.get("required").and_then(Value::as_u64).unwrap_or(1)
    );
    println!("binding    {}", s(r, "binding"));
    println!("statement:\n{}", s(r, "statement"));
    Ok(0)
}

pub async fn run(cmd: Command, path: &Path) -> Result<i32> {
    match cmd {
        Command::InitStore => anyhow::bail!("init-store needs --store postgresql://…"),
        Command::List { json } => {
            let v = socket::request(path, &Request::List).await?;
            let list = v.get("requests").and_then(Value::as_array).cloned().unwrap_or_default();
            print_list(&list, json)
        }
        Command::Show { id, json } => {
            let v = socket::request(path, &Request::Show { id }).await?;
            print_one(&v.get("request").cloned().unwrap_or(Value::Null), json)
        }
        Command::Approve { id, reason, break_glass } => {
            let v = socket::request(path, &Request::Approve { id, reason, break_glass }).await?;
            println!("{}", s(&v, "message"));
            Ok(0)
        }
        Command::Deny { id, reason } => {
            let v = socket::request(path, &Request::Deny { id, reason }).await?;
            println!("{}", s(&v, "message"));
            Ok(0)
        }
        Command::Watch { json } => {
            socket::watch(path, |ev| {
                if json {
                    println!("{ev}");
                } else {
                    let req = ev.get("request").cloned().unwrap_or(Value::Null);
                    match req.as_object() {
                        Some(_) => println!(
                            "{} {} {} rule {} from {}: {}",
                            s(&ev, "event"),
                            s(&req, "id"),
                            s(&req, "profile"),
                            s(&req, "rule"),
                            workload(&req),
                            one_line(s(&req, "text"), 80)
                        ),
                        None => println!("{} {} {}", s(&ev, "event"), req.as_str().unwrap_or(""), s(&ev, "by")),
                    }
                }
                use std::io::Write;
                std::io::stdout().flush()?;
                Ok(())
            })
            .await?;
            Ok(0)
        }
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn workload(r: &Value) -> String {
    let w = r.get("workload").cloned().unwrap_or(Value::Null);
    let who = w
        .get("user")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("uid {}", w.get("uid").and_then(Value::as_u64).unwrap_or(0)));
    let unit = w.get("unit").and_then(Value::as_str).or_else(|| w.get("cgroup").and_then(Value::as_str)).unwrap_or("?");
    format!("{who}@{unit}")
}

fn one_line(t: &str, max: usize) -> String {
    let flat: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
