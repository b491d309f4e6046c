//! tokio-postgres as a workload: extended protocol with binary results
//! (`query`), the simple protocol with text results (`simple_query`), a
//! prepared statement reused, and a transaction. Prints JSON.

use serde_json::json;
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let conninfo = std::env::args().nth(1).ok_or("usage: cordon-pgclient CONNINFO [SQL]")?;
    let (mut client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(conn);

    // With a query: run it with binary results (extended protocol) and with
    // text results (simple protocol); print both as JSON.
    if let Some(sql) = std::env::args().nth(2) {
        let mut binary = Vec::new();
        for row in client.query(&sql, &[]).await? {
            let mut vals = Vec::new();
            for (i, col) in row.columns().iter().enumerate() {
                use tokio_postgres::types::Type;
                let v = match *col.type_() {
                    Type::INT4 => json!(row.get::<_, Option<i32>>(i)),
                    Type::INT8 => json!(row.get::<_, Option<i64>>(i)),
                    Type::BOOL => json!(row.get::<_, Option<bool>>(i)),
                    Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => json!(row.get::<_, Option<String>>(i)),
                    _ => json!("<unsupported type>"),
                };
                vals.push(v);
            }
            binary.push(vals);
        }
        let mut text = Vec::new();
        for m in client.simple_query(&sql).await? {
            if let SimpleQueryMessage::Row(r) = m {
                text.push((0..r.len()).map(|i| json!(r.get(i))).collect::<Vec<_>>());
            }
        }
        println!("{}", json!({"binary": binary, "text": text}));
        return Ok(());
    }

    let rows = client
        .query(
            "select $1::int4 + 1 as n, $2::text as s, 2.5::float8 as f, true as b, null::text as z",
            &[&41i32, &"héllo"],
        )
        .await?;
    let row = rows.first().ok_or("no row")?;
    let binary = json!([
        row.get::<_, i32>(0),
        row.get::<_, String>(1),
        row.get::<_, f64>(2),
        row.get::<_, bool>(3),
        row.get::<_, Option<String>>(4)
    ]);

    let mut text = Vec::new();
    for m in client.simple_query("select 1 as a, 'x' as b; select 2 as a, null as b").await? {
        if let SimpleQueryMessage::Row(r) = m {
            text.push(json!([r.get(0), r.get(1)]));
        }
    }

    let stmt = client.prepare("select generate_series(1, $1::int4)").await?;
    let mut counts = Vec::new();
    for n in [3i32, 5] {
        counts.push(client.query(&stmt, &[&n]).await?.len());
    }

    let tx = client.transaction().await?;
    tx.execute("create temp table tt (v int)", &[]).await?;
    let inserted = tx.execute("insert into tt select generate_series(1, 10)", &[]).await?;
    tx.rollback().await?;

    println!("{}", json!({"binary": binary, "text": text, "counts": counts, "inserted": inserted}));
    Ok(())
}
