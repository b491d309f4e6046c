//! Simple queries cordon runs as prepared statements upstream (see
//! `postgres::prepare`), against a real PostgreSQL: the client must not be
//! able to tell. Every statement runs three times through cordon (sent as
//! it came, then with a Parse, then bound to the prepared statement) and
//! three times straight to the server, and the answers (column names and
//! types, rows, SQLSTATEs) must be the same. Then the ways a prepared
//! statement goes stale, and the names a workload may not touch.

use cordon_tests::{
    lines_of, require_e2e, stderr, stdout, workload_script, Agent, Cgroup, Postgres, APP_PASSWORD, TEST_PYTHON,
};
use serde_json::Value;
use std::io::Write;

const SCHEMA: &str = "\
create table items(id int primary key, n int, price numeric(10,2), name text, big bigint, tags int[]);
insert into items select g, g % 7, g * 1.25, 'item ' || g, g::bigint * 3000000000, array[g, g + 1] from generate_series(1, 50) g;
create table w(id int primary key, n int, price numeric(10,2), name text);
create unique index w_expr on w ((n + 1000 * id));
create function dealloc() returns int language plpgsql as $$ begin execute 'deallocate all'; return 1; end $$;
grant all on all tables in schema public to app;";

/// Deterministic statements, each a different way a number can stand.
/// Writes go to `w` only and are idempotent, so both runs see one state.
const STATEMENTS: &[&str] = &[
    "select n, count(*), sum(price) from items group by n order by n",
    "select n + 1, count(*) from items group by n + 1 having n + 1 > 2 order by 1",
    "select id, price * 2 from items where id in (1, 2, 3) order by 2 desc",
    "select id from items where id between 5 and 8 order by id limit 2 offset 1",
    "select distinct on (n) n, id from items order by n, id desc",
    "select 5, 1.50, 1e3, -7, 2147483648, -2147483648, 99999999999999999999, 007, -0.0",
    "select pg_typeof(2147483647), pg_typeof(2147483648), pg_typeof(-2147483648), pg_typeof(1.0), pg_typeof(3000000000), pg_typeof(-9223372036854775808)",
    "select id, price::numeric(10,1), 12.345::numeric(5,2), 7::bit(4) from items where id = 3",
    "select tags[1], tags[1:2] from items where id = 4",
    "select case when n > 3 then 1 else 2.5 end as c from items where id < 4 order by id",
    "select coalesce(null::int, 5), greatest(1, 2, 3), least(4.5, 3), nullif(5, 5)",
    "select id from items where big > 3000000000 * 49 order by id",
    "select id from items where price > 10.5 and n <> 3 order by id limit 3",
    "values (1, 'a'), (2, 'b') order by 1 desc",
    "select sum(n) filter (where id > 10) from items",
    "select id, row_number() over (order by id rows between 1 preceding and 1 following) from items where id < 4 order by 1",
    "select x from (select 1 as x union select 2.5) s order by x",
    "select 'abc' || 5, 5 || 'abc', 3 % 2, 2 ^ 10, 7 / 2, 7.0 / 2",
    "select count(*) from items where name like 'item 1%' and id > 1",
    "select * from items where id = -1",
    "select id from items where id = any(array[1, 2]) and n = all(array[1])",
    "select (select max(id) from items where n = 2) + 1",
    "select substr(name, 1, 4), round(price, 1), repeat('-', 3) from items where id = 9",
    "insert into w values (1, 2, 2.5, 'x') on conflict (id) do update set n = 2 returning id, n",
    "insert into w values (2, 3, 1.5, 'y') on conflict ((n + 1000 * id)) do update set name = 'y' returning id, name",
    "update w set price = 9.99 where id = 1 returning price",
    "delete from w where id = 999 returning id",
    // Errors the server raises either way.
    "select 1 / 0",
    "select id from items where id = 2147483647 + 1",
    "select id from items order by id limit 1 offset -1",
    "select id from items order by 9",
    "select n, id from items group by 1",
    "insert into w values (3, 1, 1, 'z') on conflict ((n + 1001 * id)) do nothing",
];

/// Each statement `reps` times in one autocommit session: per statement,
/// per run, [columns with type OIDs, rows, command tag, SQLSTATE]. Mode
/// "simple": psycopg sends a query without parameters as a Query message.
/// Mode "extended": libpq's PQexecParams (Parse of the unnamed statement,
/// Bind, Describe, Execute, Sync), each statement with its parameters.
const CLIENT: &str = r#"
import json, sys, psycopg
queries, reps, mode = json.loads(sys.stdin.readline()), int(sys.argv[2]), sys.argv[3]
out = []
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    for q in queries:
        q, params = (q[0], q[1]) if isinstance(q, list) else (q, [])
        runs = []
        for i in range(reps):
            if mode == "extended":
                r = c.pgconn.exec_params(q.encode(), [p.encode() for p in params[i % len(params)]] if params else [])
                if r.status == 7:
                    runs.append([None, None, None, r.error_field(ord("C")).decode()])
                    continue
                cols = [[r.fname(k).decode(), r.ftype(k)] for k in range(r.nfields)] if r.nfields else None
                rows = [[None if r.get_value(j, k) is None else r.get_value(j, k).decode() for k in range(r.nfields)] for j in range(r.ntuples)] if r.nfields else None
                runs.append([cols, rows, r.command_status.decode(), None])
                continue
            try:
                cur = c.execute(q, prepare=False)
                cols = [[d.name, d.type_code] for d in cur.description] if cur.description else None
                rows = [[None if v is None else str(v) for v in r] for r in cur.fetchall()] if cur.description else None
                runs.append([cols, rows, cur.statusmessage, None])
            except psycopg.Error as e:
                runs.append([None, None, None, e.sqlstate])
        out.append(runs)
    n = c.execute("select count(*) from pg_prepared_statements where left(name, 9) = '__cordon_'").fetchone()[0]
print(json.dumps({"results": out, "prepared": n}))
"#;

struct Setup {
    pg: Postgres,
    cg: Cgroup,
    _agent: Agent,
}

fn setup(test: &str, profile: &str) -> Setup {
    let (pg, cg, agent) = cordon_tests::governed(&format!("prep-{test}"), SCHEMA, &format!("[profiles.ci]\n{profile}"))
        .expect("governed postgres");
    Setup { pg, cg, _agent: agent }
}

impl Setup {
    /// A Python script run once as the workload, given the connection
    /// string: the JSON it prints.
    fn script(&self, name: &str, body: &str) -> Value {
        let (_d, script) = workload_script(name, body).unwrap();
        let out = self
            .cg
            .command(TEST_PYTHON)
            .arg(&script)
            .arg(format!("host=127.0.0.2 port={} dbname=postgres", self.pg.port))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    }
}

fn run(cmd: &mut std::process::Command, conn: &str, reps: usize, statements: &[&str]) -> Value {
    run_mode(cmd, conn, reps, "simple", &serde_json::to_value(statements).unwrap())
}

fn run_mode(cmd: &mut std::process::Command, conn: &str, reps: usize, mode: &str, statements: &Value) -> Value {
    let (_d, script) = workload_script("client.py", CLIENT).unwrap();
    let mut child = cmd
        .arg(&script)
        .arg(conn)
        .arg(reps.to_string())
        .arg(mode)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{statements}").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("json")
}

#[test]
fn simple_queries_answer_the_same_when_cordon_prepares_them_upstream() {
    require_e2e!();
    let s = setup("same", "");
    let through = run(
        &mut s.cg.command(TEST_PYTHON),
        &format!("host=127.0.0.2 port={} dbname=postgres", s.pg.port),
        3,
        STATEMENTS,
    );
    let direct = run(
        &mut std::process::Command::new(TEST_PYTHON),
        &format!("host=127.0.0.2 port={} dbname=postgres user=app password={APP_PASSWORD} sslmode=require", s.pg.port),
        3,
        STATEMENTS,
    );
    let mut failures = Vec::new();
    for (i, q) in STATEMENTS.iter().enumerate() {
        let (a, b) = (&through["results"][i], &direct["results"][i]);
        if a != b {
            failures.push(format!("{q}\n  through cordon: {a}\n  direct:         {b}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), STATEMENTS.len(), failures.join("\n"));
    // The errors are the server's own, as a simple query gets them.
    let sqlstate = |q: &str| {
        let i = STATEMENTS.iter().position(|s| *s == q).unwrap();
        direct["results"][i][2][3].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(sqlstate("select 1 / 0"), "22012");
    assert_eq!(sqlstate("select id from items order by 9"), "42P10");
    // And cordon did prepare them: a statement stays prepared upstream for
    // each shape it ran more than once.
    let prepared = through["prepared"].as_i64().unwrap_or_default();
    assert!(prepared >= 20, "only {prepared} statements were prepared upstream");
}

/// The extended protocol's unnamed statement, parsed again before every
/// execution by most drivers: the second Parse of a text goes upstream under
/// a name of cordon's, later ones are answered by cordon and their Binds
/// point at that name. The client must not be able to tell either.
#[test]
fn unnamed_statements_answer_the_same_when_cordon_keeps_them_prepared() {
    require_e2e!();
    let s = setup("unnamed", "");
    let mut statements: Vec<Value> = STATEMENTS.iter().map(|q| Value::from(*q)).collect();
    statements.extend([
        serde_json::json!(["select id, price, name from items where id = $1", [["3"], ["4"], ["5"]]]),
        serde_json::json!([
            "select count(*) from items where n = $1 and price > $2",
            [["1", "2.5"], ["2", "10"], ["3", "0"]]
        ]),
        serde_json::json!(["select $1::int + 1, pg_typeof($2)", [["1", "x"], ["2", "y"], ["3", "z"]]]),
        serde_json::json!(["update w set name = $1 where id = 1 returning name", [["a"], ["b"], ["c"]]]),
        serde_json::json!(["select id from items where id = $1", [["x"], ["1"], ["2"]]]),
    ]);
    let statements = Value::from(statements);
    let conn = format!("host=127.0.0.2 port={} dbname=postgres", s.pg.port);
    let through = run_mode(&mut s.cg.command(TEST_PYTHON), &conn, 3, "extended", &statements);
    let direct = run_mode(
        &mut std::process::Command::new(TEST_PYTHON),
        &format!("{conn} user=app password={APP_PASSWORD} sslmode=require"),
        3,
        "extended",
        &statements,
    );
    let mut failures = Vec::new();
    for (i, q) in statements.as_array().unwrap().iter().enumerate() {
        let (a, b) = (&through["results"][i], &direct["results"][i]);
        if a != b {
            failures.push(format!("{q}\n  through cordon: {a}\n  direct:         {b}"));
        }
    }
    assert!(failures.is_empty(), "{} differ:\n{}", failures.len(), failures.join("\n"));
    let prepared = through["prepared"].as_i64().unwrap_or_default();
    assert!(prepared >= 20, "only {prepared} statements were prepared upstream");
}

#[test]
fn an_intercept_can_turn_preparing_off() {
    require_e2e!();
    let pg = Postgres::start_secure(&["127.0.0.2"], cordon_tests::free_port()).expect("postgres");
    pg.admin_sql(SCHEMA).unwrap();
    let name = format!("cordon-prep-off-{}", std::process::id());
    let cg = Cgroup::create(&name).unwrap();
    let body = format!(
        "[[intercept]]\nname = \"shop\"\nprotocol = \"postgres\"\nport = {port}\ndestinations = [\"127.0.0.2/32\"]\n\
         credentials = \"app\"\nupstream_ca = \"{ca}\"\nprepare_statements = false\n\n[profiles.ci]\n\n[[tag]]\ncgroup = \"{name}\"\nprofile = \"ci\"\n",
        port = pg.port,
        ca = pg.ca_file.as_ref().unwrap().display(),
    );
    let mut agent = Agent::new(&body).unwrap();
    agent.start().unwrap();
    let got = run(
        &mut cg.command(TEST_PYTHON),
        &format!("host=127.0.0.2 port={} dbname=postgres", pg.port),
        3,
        &STATEMENTS[..4],
    );
    assert_eq!(got["prepared"], 0, "{got}");
    assert!(got["results"][0][2][1].is_array(), "{got}");
}

/// A prepared statement goes stale when DDL changes its result's columns
/// (PostgreSQL refuses to run it: "cached plan must not change result
/// type") or when something drops it behind cordon's back (DEALLOCATE ALL
/// inside a function). A simple query would just run: cordon sends it again
/// as the simple query it was, and the client never sees the difference.
#[test]
fn a_stale_prepared_statement_is_run_again_as_the_query_it_was() {
    require_e2e!();
    let s = setup("stale", "[profiles.ci.guardrails]\nallowed_functions = [\"dealloc\"]");
    let (_d, script) = workload_script(
        "stale.py",
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
q = "select * from items where id = 7"
def ncols():
    try:
        cur = c.execute(q, prepare=False)
        return len(cur.description)
    except psycopg.Error as e:
        return f"{e.sqlstate}: {e}"
k = 0
def prepared():
    # A new string each time: never prepared itself, so it counts only the others.
    global k
    k += 1
    return c.execute(f"select count(*) from pg_prepared_statements where left(name, 9) = '__cordon_' and 'k{k}' <> ''").fetchone()[0]
print(json.dumps([ncols(), ncols(), ncols(), prepared()]), flush=True)
sys.stdin.readline()  # the table gains a column
print(json.dumps([ncols(), ncols(), ncols()]), flush=True)
c.execute("select dealloc()")
print(json.dumps([prepared(), ncols(), ncols(), ncols()]), flush=True)
c.execute("deallocate all")
print(json.dumps([prepared(), ncols(), ncols(), ncols(), prepared()]), flush=True)
"#,
    )
    .unwrap();
    let mut child =
        s.cg.command(TEST_PYTHON)
            .arg(&script)
            .arg(format!("host=127.0.0.2 port={} dbname=postgres", s.pg.port))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut lines = lines_of(&mut child);
    let line = |l: Option<String>| serde_json::from_str::<Value>(&l.unwrap_or_default()).unwrap_or_default();
    let before = line(lines.next());
    assert_eq!(before[0], 6, "{before}");
    assert_eq!(before[2], 6, "{before}");
    assert_eq!(before[3], 1, "prepared upstream: {before}");
    s.pg.admin_sql("alter table items add column extra int default 9").unwrap();
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(line(lines.next()), serde_json::json!([7, 7, 7]), "the new column, no error");
    let after_function = line(lines.next());
    assert_eq!(after_function[0], 0, "dealloc() dropped them: {after_function}");
    assert_eq!(&after_function.as_array().unwrap()[1..], &[7, 7, 7], "{after_function}");
    let after_sql = line(lines.next());
    assert_eq!(after_sql[0], 0, "{after_sql}");
    assert_eq!(&after_sql.as_array().unwrap()[1..4], &[7, 7, 7], "{after_sql}");
    assert!(after_sql[4].as_i64().is_some_and(|n| n >= 1), "prepared again: {after_sql}");
    assert!(child.wait().unwrap().success());
}

/// cordon's statement names are its own: a workload that could run, drop or
/// replace one could make cordon bind a statement it judged for another
/// text. SQL naming one is refused; a protocol message naming one ends the
/// session, and the statements cordon prepared are left as they were.
#[test]
fn a_workload_cannot_touch_the_statements_cordon_prepared() {
    require_e2e!();
    let s = setup("reserved", "");
    let got = s.script(
        "reserved.py",
        r#"
import json, sys, psycopg
conn = sys.argv[1]
c = psycopg.connect(conn, autocommit=True)
out = {}
for _ in range(3):
    c.execute("select name from items where id = 3", prepare=False)
names = [r[0] for r in c.execute("select name from pg_prepared_statements where left(name, 9) = '__cordon_'")]
out["names"] = names
for q in ["prepare __cordon_1 as select 1", "execute " + names[0], 'deallocate "' + names[0] + '"',
          "explain execute " + names[0], "PREPARE __CORDON_X AS SELECT 2"]:
    try:
        c.execute(q, prepare=False)
        out[q] = "ran"
    except psycopg.Error as e:
        out[q] = f"{e.sqlstate}: {e}"
out["still"] = c.execute("select name from items where id = 3", prepare=False).fetchone()[0]
for name in [b"__cordon_1", b"__Cordon_99"]:
    d = psycopg.connect(conn, autocommit=True)
    r = d.pgconn.prepare(name, b"select 1")
    out[name.decode()] = r.error_message.decode() + " | " + d.pgconn.error_message.decode()
    out[name.decode() + " closed"] = d.pgconn.status != 0 or d.pgconn.exec_(b"select 1").status != 2
print(json.dumps(out))
"#,
    );
    let names = got["names"].as_array().unwrap();
    assert_eq!(names.len(), 1, "{got}");
    let name = names[0].as_str().unwrap();
    for q in [
        "prepare __cordon_1 as select 1".to_string(),
        format!("execute {name}"),
        format!("deallocate \"{name}\""),
        format!("explain execute {name}"),
        "PREPARE __CORDON_X AS SELECT 2".to_string(),
    ] {
        let r = got[&q].as_str().unwrap_or_default();
        assert!(r.starts_with("42501") && r.contains("(rule reserved_name)"), "{q}: {r}");
    }
    assert_eq!(got["still"], "item 3");
    for n in ["__cordon_1", "__Cordon_99"] {
        let r = got[n].as_str().unwrap_or_default();
        assert!(r.contains("reserved namespace"), "{n}: {r}");
        assert_eq!(got[format!("{n} closed")], true, "{got}");
    }
}

/// The unnamed statement that stands for one of cordon's must never fall
/// back to an older text the session stopped tracking: after DEALLOCATE ALL
/// run from a named statement (which drops cordon's statement but not
/// PostgreSQL's own unnamed one), a Bind of the unnamed statement must not
/// run the text parsed before it (which could be one that needs approval at
/// every execution).
#[test]
fn the_unnamed_statement_never_falls_back_to_an_older_text() {
    require_e2e!();
    let s = setup("fallback", "");
    let got = s.script(
        "fallback.py",
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
pg = c.pgconn
def bind():
    r = pg.exec_prepared(b"", [])
    return r.get_value(0, 0).decode() if r.status == 2 else "error " + (r.error_field(ord("C")) or b"").decode()
out = []
# B once (sent as it came), then A (the server's unnamed statement is A),
# then B again: the second sighting, parsed under a name of cordon's.
pg.prepare(b"", b"select 'B' as v")
pg.prepare(b"", b"select 'A' as v")
out.append(bind())
pg.prepare(b"", b"select 'B' as v")
out.append(bind())
# Through a named statement: a simple query would drop the unnamed one too.
pg.prepare(b"dealloc", b"deallocate all")
pg.exec_prepared(b"dealloc", [])
out.append(bind())
pg.prepare(b"", b"select 'B' as v")
out.append(bind())
print(json.dumps(out))
"#,
    );
    let got: Vec<String> = serde_json::from_value(got).unwrap();
    assert_eq!(got[0], "A");
    assert_eq!(got[1], "B");
    // PostgreSQL would still run B; cordon's copy of B is gone, and the
    // server's own unnamed statement was closed when B replaced it: an
    // error, never A.
    assert!(got[2] == "B" || got[2].starts_with("error 26000"), "{got:?}");
    assert_eq!(got[3], "B", "{got:?}");
}

/// A Parse cordon answers itself goes out ahead of the next server
/// response; a client that sends it alone with a Flush (libpq's pipeline
/// mode, or a driver that describes before it binds) must still get its
/// ParseComplete, though no server response follows to carry it.
#[test]
fn a_parse_cordon_answers_reaches_a_client_that_only_flushes() {
    require_e2e!();
    let s = setup("flush", "");
    let got = s.script(
        "flush.py",
        r#"
import json, select, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
pg = c.pgconn
pg.enter_pipeline_mode()
out = []
for i in range(4):
    # The first Parse goes as it came, the second under a name of cordon's,
    # the third and fourth are answered by cordon.
    pg.send_prepare(b"", b"select id from items where id = $1")
    pg.send_flush_request()
    pg.flush()
    status = "no answer in 5 s"
    while True:
        pg.consume_input()
        if not pg.is_busy():
            r = pg.get_result()
            status = r.status
            pg.get_result()
            break
        if not select.select([pg.socket], [], [], 5)[0]:
            break
    out.append(status)
    if not isinstance(status, int):
        break
print(json.dumps(out))
"#,
    );
    // 1: PGRES_COMMAND_OK, four times.
    assert_eq!(got, serde_json::json!([1, 1, 1, 1]), "{got}");
}

/// A client may pipeline statements behind its startup message (cordon
/// answers authentication itself, so nothing stops it). The server's
/// startup ReadyForQuery answers none of them, and cordon's backend probe,
/// sent after them, must not take their answers: each statement gets its
/// own rows, in turn, and is recorded with them.
#[test]
fn statements_pipelined_behind_the_startup_are_answered_in_turn() {
    require_e2e!();
    let s = setup("early", "");
    let got = s.script(
        "early.py",
        r#"
import json, socket, struct, sys
port = int(sys.argv[1].split("port=")[1].split()[0])
def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body
def query(sql):
    return msg(b"Q", sql.encode() + b"\0")
startup = struct.pack("!i", 196608) + b"user\0app\0database\0postgres\0\0"
# A session first, so that cordon has the catalog at hand: the pipelined
# statements are then read before the server's startup ends.
w = socket.create_connection(("127.0.0.2", port))
w.sendall(struct.pack("!i", len(startup) + 4) + startup + query("select name from items where id = 1"))
seen = b""
while seen.count(b"Z\0\0\0\5I") < 2:
    seen += w.recv(65536)
w.close()
s = socket.create_connection(("127.0.0.2", port))
s.sendall(struct.pack("!i", len(startup) + 4) + startup
          + query("select 'seven'")
          + query("select name from items where id = 8")
          + query("select 'nine'"))
buf, answers, ready = b"", [], 0
def frames():
    global buf
    while True:
        while len(buf) >= 5:
            tag, n = buf[0:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + n:
                break
            body, buf = buf[5:1 + n], buf[1 + n:]
            yield tag, body
        chunk = s.recv(65536)
        if not chunk:
            return
        buf += chunk
current = []
for tag, body in frames():
    if tag == b"D":
        n = struct.unpack("!i", body[2:6])[0]
        current.append(body[6:6 + n].decode())
    elif tag == b"E":
        current.append("error " + body.decode(errors="replace"))
    elif tag == b"Z":
        answers.append(current)
        current = []
        if len(answers) == 4:
            s.sendall(query("select name from items where id = 10"))
        if len(answers) == 5:
            break
print(json.dumps(answers))
"#,
    );
    assert_eq!(got, serde_json::json!([[], ["seven"], ["item 8"], ["nine"], ["item 10"]]));
    let ends = s._agent.audit_events("statement_end");
    let rows: Vec<&Value> = ends.iter().map(|e| &e["outcome"]["rows"]).collect();
    assert_eq!(rows.iter().filter(|r| **r == 1).count(), 5, "each recorded with its row: {ends:?}");
}
