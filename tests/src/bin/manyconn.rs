//! Many concurrent PostgreSQL connections from one workload, for the scale
//! benchmark: open N (128 at a time, each runs `select 1`), print
//! `ready {json}`, wait for a line on stdin, run `select 1` over all of them
//! for S seconds, print `done {json}`.
//!
//! Usage: cordon-manyconn CONNINFO N SECONDS

use std::{
    io::BufRead,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio_postgres::{Client, NoTls};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(conninfo), Some(n), Some(secs)) = (
        args.get(1).cloned(),
        args.get(2).and_then(|v| v.parse::<usize>().ok()),
        args.get(3).and_then(|v| v.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: cordon-manyconn CONNINFO N SECONDS");
        std::process::exit(2);
    };
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (gate, conninfo) = (gate.clone(), conninfo.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client.simple_query("select 1").await.map_err(|e| e.to_string())?;
            Ok::<Client, String>(client)
        }));
    }
    let mut clients = Vec::with_capacity(n);
    let mut refused = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => {
                refused += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                refused += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    println!(
        "ready {}",
        serde_json::json!({"opened": clients.len(), "refused": refused, "open_secs": open_secs, "first_error": first_error})
    );
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    // Statements over every connection, 64 in flight.
    let clients: Arc<Vec<Client>> = Arc::new(clients);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (clients, done, failed, next) = (clients.clone(), done.clone(), failed.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline && !clients.is_empty() {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % clients.len();
                let Some(c) = clients.get(i) else { break };
                match c.simple_query("select 1").await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let stmts = done.load(Ordering::Relaxed);
    println!(
        "done {}",
        serde_json::json!({"statements": stmts, "failed": failed.load(Ordering::Relaxed), "per_sec": stmts as f64 / secs as f64})
    );
}
