//! Every mainstream driver, unchanged, through cordon with masking on:
//! pgjdbc, node-postgres, Ruby pg, PHP PDO, psycopg, sqlx (tokio-postgres
//! is in data_policy.rs). Each runs the same program twice: as `nobody` in a
//! tagged cgroup with no password (through cordon), and untagged with the
//! real credential (straight to the server). Every unmasked column must be
//! byte for byte what the driver read directly; the masked ones must be
//! masked.

use std::process::Command;

use cordon_tests::{
    require_e2e, stderr, stdout, workload_copy, workload_script, Agent, Cgroup, Postgres, APP_PASSWORD, TEST_PYTHON,
};
use serde_json::Value;

const SCHEMA: &str = "\
create table customers(id int primary key, name text, ssn text, card varchar(19), email text, tier int,
  balance numeric(10,2), joined date, active bool, seen timestamptz, doc jsonb, tag uuid);
insert into customers values
  (1, 'ada', '123-45-6789', '4111 1111 1111 1111', 'ada@example.com', 1, 10.50, '2020-01-02', true,
   '2021-03-04 05:06:07+00', '{\"k\": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
  (2, 'grace', '219-09-9999', '5500 0000 0000 0004', 'grace@example.org', 2, -3.25, '1999-12-31', false,
   '2000-01-01 00:00:00+00', '[]', null),
  (3, 'linus', null, null, null, 3, 0, null, null, null, null, null);
comment on column customers.email is 'classification: confidential';
create table orders(id int, total int);
grant all on all tables in schema public to app;";

/// Every program selects id, name, ssn, card, email, tier, …: the masked
/// columns by position.
const MASKED: [usize; 3] = [2, 3, 4];

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    _agent: Agent,
}

fn setup(test: &str) -> Setup {
    let policy = r#"
[[classify]]
column = "*.public.customers.ssn"
label = "restricted"
mask = "partial"

[[classify]]
column = "*.public.customers.card"
label = "confidential"
mask = "partial"

[profiles.ci]
"#;
    let (pg, cg, agent) = cordon_tests::governed(&format!("drv-{test}"), SCHEMA, policy).expect("governed postgres");
    Setup { pg, cg, _agent: agent }
}

enum Via {
    Cordon,
    Direct,
}

impl Setup {
    /// Run `program args…` through cordon (tagged, as nobody, no password)
    /// or directly (untagged, the real credential over TLS); its JSON.
    fn run(&self, via: Via, program: &str, args: &[String]) -> Value {
        let mut cmd = match via {
            Via::Cordon => self.cg.command(program),
            Via::Direct => Command::new(program),
        };
        cmd.args(args);
        let out = cmd.output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {args:?}:\n{}\n{}", stdout(&out), stderr(&out));
        serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{program}: {e}: {}", stdout(&out)))
    }

    fn libpq(&self, via: &Via) -> String {
        match via {
            Via::Cordon => format!("host=127.0.0.2 port={} dbname=postgres sslmode=disable", self.pg.port),
            Via::Direct => format!(
                "host=127.0.0.2 port={} dbname=postgres user=app password={APP_PASSWORD} sslmode=require",
                self.pg.port
            ),
        }
    }

    fn both(&self, program: &str, args: impl Fn(&Via) -> Vec<String>) -> (Value, Value) {
        (self.run(Via::Cordon, program, &args(&Via::Cordon)), self.run(Via::Direct, program, &args(&Via::Direct)))
    }
}

/// Unmasked columns equal, byte for byte; masked ones masked.
fn compare(driver: &str, through: &Value, direct: &Value) {
    let (t, d) = (through["rows"].as_array().expect("rows"), direct["rows"].as_array().expect("rows"));
    assert_eq!(t.len(), d.len(), "{driver}: row counts\n{through}\n{direct}");
    assert!(t.len() >= 12, "{driver}: the statement ran at least 12 times: {through}");
    for (tr, dr) in t.iter().zip(d) {
        let (tr, dr) = (tr.as_array().expect("row"), dr.as_array().expect("row"));
        assert_eq!(tr.len(), dr.len(), "{driver}: columns");
        for (i, (tv, dv)) in tr.iter().zip(dr).enumerate() {
            if MASKED.contains(&i) {
                let shown = tv.as_str().unwrap_or_default();
                if !dv.is_null() {
                    assert_ne!(tv, dv, "{driver}: column {i} is not masked: {tv}");
                    assert!(
                        shown.contains('*') || shown.contains("REDACTED"),
                        "{driver}: column {i} is not a mask: {tv} (direct {dv})"
                    );
                }
            } else {
                assert_eq!(tv, dv, "{driver}: unmasked column {i} differs");
            }
        }
    }
}

#[test]
fn pgjdbc_prepared_statements_binary_transfer_cursors_and_batches() {
    require_e2e!();
    let s = setup("jdbc");
    let (_d, src) = workload_script("Main.java", JAVA).unwrap();
    let url = |via: &Via| match via {
        Via::Cordon => format!("jdbc:postgresql://127.0.0.2:{}/postgres?user=nobody&sslmode=disable", s.pg.port),
        Via::Direct => format!(
            "jdbc:postgresql://127.0.0.2:{}/postgres?user=app&password={APP_PASSWORD}&sslmode=require",
            s.pg.port
        ),
    };
    let (t, d) = s.both("java", |via| {
        vec!["-cp".into(), "/usr/share/java/postgresql.jar".into(), src.display().to_string(), url(via)]
    });
    compare("pgjdbc", &t, &d);
    // setFetchSize: a portal read one row at a time (PortalSuspended).
    assert_eq!(t["cursor"].as_array().map(Vec::len), Some(3), "{t}");
    assert_eq!(t["cursor"][0], serde_json::json!(["1", "1********", "**** **** **** 1111"]), "{t}");
    assert_eq!(d["cursor"][0][0], "1");
    assert_eq!(t["batch"], serde_json::json!([1, 1, 1, 1, 1]), "{t}");
    assert_eq!(t["named"], true, "pgjdbc switched to a named server statement: {t}");
}

#[test]
fn node_postgres_named_prepared_queries() {
    require_e2e!();
    let s = setup("node");
    let (_d, src) = workload_script("drv.js", NODE).unwrap();
    let config = |via: &Via| {
        let mut c = serde_json::json!({"host": "127.0.0.2", "port": s.pg.port, "database": "postgres"});
        match via {
            Via::Cordon => c["user"] = "nobody".into(),
            Via::Direct => {
                c["user"] = "app".into();
                c["password"] = APP_PASSWORD.into();
                c["ssl"] = serde_json::json!({"rejectUnauthorized": false});
            }
        }
        c.to_string()
    };
    let (t, d) = s.both("node", |via| vec![src.display().to_string(), config(via)]);
    compare("node-postgres", &t, &d);
}

#[test]
fn ruby_pg_prepared_and_binary() {
    require_e2e!();
    let s = setup("ruby");
    let (_d, src) = workload_script("drv.rb", RUBY).unwrap();
    let (t, d) = s.both("ruby", |via| vec![src.display().to_string(), s.libpq(via)]);
    compare("ruby-pg", &t, &d);
    assert_eq!(t["binary"], d["binary"], "binary-format unmasked columns");
}

#[test]
fn php_pdo_server_side_prepares() {
    require_e2e!();
    let s = setup("php");
    let (_d, src) = workload_script("drv.php", PHP).unwrap();
    let dsn = |via: &Via| match via {
        Via::Cordon => vec![
            format!("pgsql:host=127.0.0.2;port={};dbname=postgres;sslmode=disable", s.pg.port),
            "nobody".into(),
            "".into(),
        ],
        Via::Direct => vec![
            format!("pgsql:host=127.0.0.2;port={};dbname=postgres;sslmode=require", s.pg.port),
            "app".into(),
            APP_PASSWORD.into(),
        ],
    };
    let (t, d) = s.both("php", |via| [vec![src.display().to_string()], dsn(via)].concat());
    compare("PDO pgsql", &t, &d);
}

#[test]
fn psycopg_binary_with_server_side_binding() {
    require_e2e!();
    let s = setup("psycopg");
    let (_d, src) = workload_script("drv.py", PYTHON).unwrap();
    let (t, d) = s.both(TEST_PYTHON, |via| vec![src.display().to_string(), s.libpq(via)]);
    compare("psycopg", &t, &d);
}

#[test]
fn sqlx_with_its_statement_cache() {
    require_e2e!();
    let s = setup("sqlx");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cordon-sqlxclient"));
    let (_d, bin) = workload_copy(bin).unwrap();
    let url = |via: &Via| match via {
        Via::Cordon => format!("postgres://nobody@127.0.0.2:{}/postgres?sslmode=disable", s.pg.port),
        Via::Direct => format!("postgres://app:{APP_PASSWORD}@127.0.0.2:{}/postgres?sslmode=require", s.pg.port),
    };
    let (t, d) = s.both(bin.to_str().unwrap(), |via| vec![url(via)]);
    compare("sqlx", &t, &d);
}

const JAVA: &str = r#"
import java.sql.*;
import java.util.*;

public class Main {
    static String json(Object o) {
        if (o == null) return "null";
        if (o instanceof Number || o instanceof Boolean) return o.toString();
        StringBuilder b = new StringBuilder("\"");
        for (char ch : o.toString().toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\');
            b.append(ch);
        }
        return b.append('"').toString();
    }
    static String row(ResultSet rs) throws SQLException {
        int n = rs.getMetaData().getColumnCount();
        List<String> v = new ArrayList<>();
        for (int i = 1; i <= n; i++) v.add(json(rs.getString(i)));
        return "[" + String.join(",", v) + "]";
    }
    public static void main(String[] a) throws Exception {
        try (Connection c = DriverManager.getConnection(a[0])) {
            List<String> rows = new ArrayList<>();
            PreparedStatement ps = c.prepareStatement(
                "select id, name, ssn, card, email, tier, balance, joined, active, seen, doc::text, tag from customers where id = ?");
            for (int i = 0; i < 12; i++) {
                ps.setInt(1, (i % 3) + 1);
                try (ResultSet rs = ps.executeQuery()) { while (rs.next()) rows.add(row(rs)); }
            }
            boolean named = ps.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare();
            c.setAutoCommit(false);
            List<String> cursor = new ArrayList<>();
            try (Statement st = c.createStatement()) {
                st.setFetchSize(1);
                try (ResultSet rs = st.executeQuery("select id, ssn, card from customers order by id")) {
                    while (rs.next()) cursor.add(row(rs));
                }
            }
            c.commit();
            PreparedStatement ins = c.prepareStatement("insert into orders(id, total) values (?, ?)");
            for (int i = 0; i < 5; i++) { ins.setInt(1, 100 + i); ins.setInt(2, i); ins.addBatch(); }
            int[] counts = ins.executeBatch();
            c.commit();
            List<String> cs = new ArrayList<>();
            for (int x : counts) cs.add(Integer.toString(x));
            System.out.println("{\"rows\":[" + String.join(",", rows) + "],\"cursor\":[" + String.join(",", cursor)
                + "],\"batch\":[" + String.join(",", cs) + "],\"named\":" + named + "}");
        }
    }
}
"#;

const NODE: &str = r#"
const { Client } = require('/opt/cordon-test-node/node_modules/pg');
(async () => {
  const c = new Client(JSON.parse(process.argv[2]));
  await c.connect();
  const rows = [];
  for (let i = 0; i < 12; i++) {
    const r = await c.query({
      name: 'customer',
      text: 'select id, name, ssn, card, email, tier, balance, joined, active, seen, doc::text, tag from customers where id = $1',
      values: [(i % 3) + 1],
      rowMode: 'array',
    });
    for (const row of r.rows) rows.push(row.map(v => v === null ? null : (v instanceof Date ? v.toISOString() : String(v))));
  }
  await c.end();
  console.log(JSON.stringify({ rows }));
})().catch(e => { console.error(e); process.exit(1); });
"#;

const RUBY: &str = r#"
require 'pg'
require 'json'
c = PG.connect(ARGV[0])
c.prepare('customer', 'select id, name, ssn, card, email, tier, balance, joined, active, seen, doc::text, tag from customers where id = $1')
rows = []
12.times do |i|
  c.exec_prepared('customer', [(i % 3) + 1]).each_row { |r| rows << r }
end
binary = c.exec_params('select id, name, tier, active from customers order by id', [], 1).values.map { |r| r.map { |v| v && v.unpack1('H*') } }
puts JSON.generate({ rows: rows, binary: binary })
"#;

const PHP: &str = r#"<?php
$pdo = new PDO($argv[1], $argv[2], $argv[3], [PDO::ATTR_EMULATE_PREPARES => false, PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
$st = $pdo->prepare('select id, name, ssn, card, email, tier, balance, joined, active, seen, doc::text, tag from customers where id = ?');
$rows = [];
for ($i = 0; $i < 12; $i++) {
    $st->execute([($i % 3) + 1]);
    foreach ($st->fetchAll(PDO::FETCH_NUM) as $r) {
        $rows[] = array_map(fn($v) => $v === null ? null : var_export($v, true), $r);
    }
}
echo json_encode(['rows' => $rows]), "\n";
"#;

const PYTHON: &str = r#"
import json, sys, psycopg
rows = []
with psycopg.connect(sys.argv[1]) as c:
    with c.cursor(binary=True) as cur:
        for i in range(12):
            cur.execute("select id, name, ssn, card, email, tier, balance, joined, active, seen, doc::text, tag from customers where id = %s", ((i % 3) + 1,), prepare=True)
            rows += [[None if v is None else repr(v) for v in r] for r in cur.fetchall()]
print(json.dumps({"rows": rows}))
"#;
