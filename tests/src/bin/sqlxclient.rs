//! sqlx as a workload: one query run twelve times through sqlx's statement
//! cache (a named server-side statement, binary results). Prints JSON rows,
//! every value as text.

use sqlx::{postgres::PgConnectOptions, ConnectOptions, Row};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).ok_or("usage: cordon-sqlxclient URL")?;
    let opts: PgConnectOptions = url.parse()?;
    let mut conn = opts.connect().await?;
    let sql =
        "select id, name, ssn, card, email, tier, active, balance::text, joined::text from customers where id = $1";
    let mut rows = Vec::new();
    for i in 0..12 {
        for r in sqlx::query(sql).bind((i % 3) + 1).fetch_all(&mut conn).await? {
            let mut vals: Vec<serde_json::Value> = Vec::new();
            vals.push(r.try_get::<i32, _>(0)?.to_string().into());
            for c in 1..5 {
                vals.push(r.try_get::<Option<String>, _>(c)?.into());
            }
            vals.push(r.try_get::<i32, _>(5)?.to_string().into());
            vals.push(r.try_get::<Option<bool>, _>(6)?.map(|b| b.to_string()).into());
            vals.push(r.try_get::<Option<String>, _>(7)?.into());
            vals.push(r.try_get::<Option<String>, _>(8)?.into());
            rows.push(vals);
        }
    }
    println!("{}", serde_json::json!({ "rows": rows }));
    Ok(())
}
