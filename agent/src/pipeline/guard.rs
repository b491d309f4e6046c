//! Guardrails: rules on what a statement does, decided from facts a
//! protocol's parser extracted (the PostgreSQL grammar today, via
//! libpg_query). A parse failure is a deny: what cordon cannot read, it
//! does not let through.

use serde::Serialize;

use super::Verdict;

/// A table a statement touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyTarget {
    Client,
    Program,
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StmtKind {
    Read,
    Write,
    /// Schema changes and other utility commands that alter the database
    /// (CREATE, ALTER, DROP, TRUNCATE, GRANT, …), named by command.
    Ddl {
        command: String,
    },
    /// COPY … TO: data leaving the database.
    CopyOut {
        to: CopyTarget,
    },
    /// COPY … FROM.
    CopyIn {
        from: CopyTarget,
    },
    /// An anonymous code block: statements inside are invisible to the parser.
    Do,
    /// Session and transaction control, LISTEN/NOTIFY, SET, SHOW…
    #[default]
    Control,
}

/// What one statement does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct StmtFacts {
    pub kind: StmtKind,
    /// UPDATE or DELETE with no WHERE.
    pub unbounded_write: bool,
    /// Tables read.
    pub reads: Vec<TableRef>,
    /// Tables written, with the columns named (None = every column).
    pub writes: Vec<(TableRef, Option<Vec<String>>)>,
    /// Functions called anywhere in it (lower case, schema dropped).
    pub functions: Vec<String>,
    /// The same calls as written: (schema, name).
    pub calls: Vec<(Option<String>, String)>,
    /// Operators used (names), for user-defined ones.
    pub operators: Vec<String>,
}

/// What a profile does when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allow,
    Deny,
    /// Held until enough people approve it (see `approvals`).
    Approve,
}

impl std::str::FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            "approve" => Ok(Self::Approve),
            o => Err(format!("unknown outcome {o:?}; use \"allow\", \"deny\" or \"approve\"")),
        }
    }
}

pub const DEFAULT_DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "lo_from_bytea",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "set_config",
    "pg_file_write",
    "pg_execute_server_program",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "query_to_xmlschema",
    "table_to_xmlschema",
    "pg_logical_emit_message",
    // Run SQL from a string, or read rows around any rewrite.
    "ts_stat",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_binary_changes",
    "pg_create_logical_replication_slot",
    "get_raw_page",
    "heap_page_items",
    "bt_page_items",
    "lo_get",
    "lo_put",
    "lo_import_with_oid",
];

/// A profile's guardrails. Every rule defaults to deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guardrails {
    pub ddl: Outcome,
    pub unbounded_write: Outcome,
    pub copy_out: Outcome,
    /// COPY out of tables whose label (or a column's) is at least this.
    pub copy_out_min_label: usize,
    pub restricted_read: Outcome,
    pub restricted_read_min_label: usize,
    pub labeled_write: Outcome,
    /// Writes to columns labeled at least this.
    pub labeled_write_min_label: usize,
    pub dangerous_functions: Outcome,
    pub functions: Vec<String>,
    pub do_block: Outcome,
    /// Functions and procedures that are not built in: opaque code.
    pub user_functions: Outcome,
    /// User functions let through by name (`name` or `schema.name`).
    pub allowed_functions: Vec<String>,
    /// Statements whose literals or parameters carry a detector match.
    pub sensitive_literals: Outcome,
    /// …of a kind labeled at least this.
    pub sensitive_literals_min_label: usize,
}

impl Guardrails {
    /// The rules whose outcome is `approve`, by name.
    pub fn approving(&self) -> Vec<&'static str> {
        [
            (self.ddl, "ddl"),
            (self.unbounded_write, "unbounded_write"),
            (self.copy_out, "copy_out"),
            (self.restricted_read, "restricted_read"),
            (self.labeled_write, "labeled_write"),
            (self.dangerous_functions, "dangerous_functions"),
            (self.do_block, "do_block"),
            (self.user_functions, "user_functions"),
            (self.sensitive_literals, "sensitive_literals"),
        ]
        .into_iter()
        .filter(|(o, _)| *o == Outcome::Approve)
        .map(|(_, n)| n)
        .collect()
    }

    /// The defaults for a label scale with `highest` as its top rank.
    pub fn defaults(highest: usize) -> Self {
        Self {
            ddl: Outcome::Deny,
            unbounded_write: Outcome::Deny,
            copy_out: Outcome::Deny,
            copy_out_min_label: highest.saturating_sub(1).max(1).min(highest),
            restricted_read: Outcome::Deny,
            restricted_read_min_label: highest,
            labeled_write: Outcome::Deny,
            labeled_write_min_label: 1.min(highest),
            dangerous_functions: Outcome::Deny,
            functions: DEFAULT_DANGEROUS_FUNCTIONS.iter().map(|s| s.to_string()).collect(),
            do_block: Outcome::Deny,
            user_functions: Outcome::Deny,
            allowed_functions: Vec::new(),
            sensitive_literals: Outcome::Allow,
            sensitive_literals_min_label: highest.saturating_sub(1).max(1).min(highest),
        }
    }
}

/// A function, procedure or operator that is not built in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCode {
    /// `schema.name` as the catalog has it.
    pub qualified: String,
    /// Neither STABLE nor IMMUTABLE, or a procedure: it may write.
    pub may_write: bool,
}

/// Labels the guardrails need, looked up by the adapter (from the policy
/// catalog and the database's own).
pub trait LabelLookup {
    /// The user-defined function or procedure a call may reach (any
    /// overload that is not built in), if any.
    fn user_function(&self, _schema: Option<&str>, _name: &str) -> Option<UserCode> {
        None
    }
    /// A user-defined operator of this name, if any.
    fn user_operator(&self, _name: &str) -> Option<UserCode> {
        None
    }
    /// Whether the profile masks or denies any label.
    fn protects_anything(&self) -> bool {
        false
    }
    /// The table's own label.
    fn table_label(&self, t: &TableRef) -> Option<usize>;
    /// (column, label) for the labeled columns of a table.
    fn column_labels(&self, t: &TableRef) -> Vec<(String, usize)>;
    fn label_name(&self, rank: usize) -> String;
}

pub fn fire(outcome: Outcome, rule: &str, message: String) -> Option<Verdict> {
    match outcome {
        Outcome::Allow => None,
        Outcome::Deny => Some(Verdict::Deny { rule: rule.to_string(), message }),
        Outcome::Approve => Some(Verdict::Approve { rule: rule.to_string(), message }),
    }
}

/// The verdict over every rule of every statement of the query: a rule
/// that denies wins over any that asks for approval (an approval must never
/// release what another rule refuses), else the first that asks for
/// approval.
pub fn check(g: &Guardrails, stmts: &[StmtFacts], labels: &dyn LabelLookup) -> Verdict {
    let mut held = None;
    for s in stmts {
        if let Some(v) = check_one(g, s, labels, &mut held) {
            return v;
        }
    }
    held.unwrap_or(Verdict::Allow)
}

/// A rule fired: a denial ends the check; the first approval is kept and
/// the check goes on looking for a denial.
fn fire_into(held: &mut Option<Verdict>, outcome: Outcome, rule: &str, message: String) -> Option<Verdict> {
    match fire(outcome, rule, message)? {
        v @ Verdict::Deny { .. } => Some(v),
        v => {
            held.get_or_insert(v);
            None
        }
    }
}

fn check_one(g: &Guardrails, s: &StmtFacts, labels: &dyn LabelLookup, held: &mut Option<Verdict>) -> Option<Verdict> {
    let mut fire = |o: Outcome, rule: &str, message: String| fire_into(held, o, rule, message);
    match &s.kind {
        StmtKind::Ddl { command } => {
            let msg = if g.ddl == Outcome::Approve {
                format!("{command} changes the database; this profile lets it run once approved")
            } else {
                format!("{command} changes the database, which this profile does not allow; run it from an ungoverned migration job, or set guardrails.ddl")
            };
            if let Some(v) = fire(g.ddl, "ddl", msg) {
                return Some(v);
            }
        }
        StmtKind::Do => {
            if let Some(v) = fire(g.do_block, "do_block", "DO blocks run code the guardrails cannot inspect".into()) {
                return Some(v);
            }
        }
        StmtKind::CopyIn { from } if *from != CopyTarget::Client => {
            let what = if *from == CopyTarget::Program { "a program" } else { "a server file" };
            if let Some(v) = fire(g.copy_out, "copy_out", format!("COPY from {what} is not allowed")) {
                return Some(v);
            }
        }
        StmtKind::CopyOut { to } => {
            if *to != CopyTarget::Client {
                let what = if *to == CopyTarget::Program { "a program" } else { "a server file" };
                if let Some(v) = fire(g.copy_out, "copy_out", format!("COPY to {what} is not allowed")) {
                    return Some(v);
                }
            }
            for t in &s.reads {
                let top =
                    labels.table_label(t).into_iter().chain(labels.column_labels(t).into_iter().map(|(_, l)| l)).max();
                if let Some(l) = top.filter(|l| *l >= g.copy_out_min_label) {
                    let msg = format!("COPY of {t}, which holds {} data, out of the database", labels.label_name(l));
                    if let Some(v) = fire(g.copy_out, "copy_out", msg) {
                        return Some(v);
                    }
                }
            }
        }
        _ => {}
    }
    if s.unbounded_write {
        let what = if matches!(s.kind, StmtKind::Write) { "UPDATE, DELETE or MERGE" } else { "this statement" };
        if let Some(v) =
            fire(g.unbounded_write, "unbounded_write", format!("{what} without a WHERE on the target's own columns would touch every row (a constant or always-true condition counts as none); add a condition on a column of the target"))
        {
            return Some(v);
        }
    }
    for f in &s.functions {
        if g.functions.iter().any(|d| d == f) {
            if let Some(v) = fire(g.dangerous_functions, "dangerous_function", format!("function {f}() is not allowed"))
            {
                return Some(v);
            }
        }
    }
    if let Some(v) = user_code(g, s, labels, &mut fire) {
        return Some(v);
    }
    for t in &s.reads {
        if let Some(l) = labels.table_label(t).filter(|l| *l >= g.restricted_read_min_label) {
            let msg = format!("{t} is labeled {}; this profile may not read it", labels.label_name(l));
            if let Some(v) = fire(g.restricted_read, "restricted_read", msg) {
                return Some(v);
            }
        }
    }
    for (t, cols) in &s.writes {
        if let Some(l) = labels.table_label(t).filter(|l| *l >= g.labeled_write_min_label) {
            let msg = format!("writing {t}, labeled {}, is not allowed", labels.label_name(l));
            if let Some(v) = fire(g.labeled_write, "labeled_write", msg) {
                return Some(v);
            }
        }
        for (col, l) in labels.column_labels(t) {
            let named = cols.as_ref().is_none_or(|c| c.iter().any(|c| c.eq_ignore_ascii_case(&col)));
            if named && l >= g.labeled_write_min_label {
                let msg = format!("writing {t}.{col}, labeled {}, is not allowed", labels.label_name(l));
                if let Some(v) = fire(g.labeled_write, "labeled_write", msg) {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// User code is opaque: it runs with the database's view of the data (no
/// mask at read reaches inside it) and may write or change the schema. A
/// call is refused unless allowlisted: as a read of every label the profile
/// masks, and, when it may write, under the stricter of the write rules.
fn user_code(
    g: &Guardrails,
    s: &StmtFacts,
    labels: &dyn LabelLookup,
    fire: &mut dyn FnMut(Outcome, &str, String) -> Option<Verdict>,
) -> Option<Verdict> {
    let found = s
        .calls
        .iter()
        .filter_map(|(schema, name)| labels.user_function(schema.as_deref(), name))
        .chain(s.operators.iter().filter_map(|o| labels.user_operator(o)));
    for code in found {
        let q = code.qualified.to_ascii_lowercase();
        let short = q.rsplit('.').next().unwrap_or(&q).to_string();
        if g.allowed_functions.iter().any(|a| *a == q || *a == short) {
            continue;
        }
        let hint = format!("allowlist it with guardrails.allowed_functions = [\"{q}\"] if it is safe");
        if labels.protects_anything() {
            let msg = format!(
                "{q} is user code cordon cannot see into: it reads the stored data, around the masking this profile applies; {hint}"
            );
            if let Some(v) = fire(g.user_functions, "user_function", msg) {
                return Some(v);
            }
        }
        if code.may_write {
            let outcome = strictest(g.unbounded_write, g.ddl);
            let msg = format!(
                "{q} is user code that may write or change the schema (it is neither STABLE nor IMMUTABLE, or a procedure); {hint}"
            );
            if let Some(v) = fire(outcome, "user_function", msg) {
                return Some(v);
            }
        }
    }
    None
}

fn strictest(a: Outcome, b: Outcome) -> Outcome {
    match (a, b) {
        (Outcome::Deny, _) | (_, Outcome::Deny) => Outcome::Deny,
        (Outcome::Approve, _) | (_, Outcome::Approve) => Outcome::Approve,
        _ => Outcome::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct L;
    impl LabelLookup for L {
        fn table_label(&self, t: &TableRef) -> Option<usize> {
            (t.name == "salaries").then_some(3)
        }
        fn column_labels(&self, t: &TableRef) -> Vec<(String, usize)> {
            if t.name == "customers" {
                vec![("ssn".into(), 3), ("email".into(), 2)]
            } else {
                vec![]
            }
        }
        fn label_name(&self, rank: usize) -> String {
            ["public", "internal", "confidential", "restricted"].get(rank).unwrap_or(&"?").to_string()
        }
        fn user_function(&self, _schema: Option<&str>, name: &str) -> Option<UserCode> {
            match name {
                "leak" => Some(UserCode { qualified: "public.leak".into(), may_write: false }),
                "wipe" => Some(UserCode { qualified: "public.wipe".into(), may_write: true }),
                _ => None,
            }
        }
        fn protects_anything(&self) -> bool {
            true
        }
    }

    struct Open;
    impl LabelLookup for Open {
        fn table_label(&self, _: &TableRef) -> Option<usize> {
            None
        }
        fn column_labels(&self, _: &TableRef) -> Vec<(String, usize)> {
            vec![]
        }
        fn label_name(&self, _: usize) -> String {
            String::new()
        }
        fn user_function(&self, s: Option<&str>, n: &str) -> Option<UserCode> {
            L.user_function(s, n)
        }
    }

    #[test]
    fn user_code_is_opaque_unless_allowlisted() {
        let mut g = Guardrails::defaults(3);
        let mut read = facts(StmtKind::Read);
        read.calls = vec![(None, "leak".into())];
        assert!(
            matches!(check(&g, std::slice::from_ref(&read), &L), Verdict::Deny { rule, message } if rule == "user_function" && message.contains("allowed_functions"))
        );
        // Nothing masked: a STABLE/IMMUTABLE function reads nothing it should not.
        assert_eq!(check(&g, std::slice::from_ref(&read), &Open), Verdict::Allow);
        let mut call = facts(StmtKind::Write);
        call.calls = vec![(Some("public".into()), "wipe".into())];
        assert!(
            matches!(check(&g, std::slice::from_ref(&call), &Open), Verdict::Deny { rule, .. } if rule == "user_function")
        );
        g.unbounded_write = Outcome::Allow;
        g.ddl = Outcome::Approve;
        assert!(
            matches!(check(&g, std::slice::from_ref(&call), &Open), Verdict::Approve { rule, .. } if rule == "user_function")
        );
        g.allowed_functions = vec!["public.wipe".into(), "leak".into()];
        assert_eq!(check(&g, &[read, call], &L), Verdict::Allow);
    }

    fn facts(kind: StmtKind) -> StmtFacts {
        StmtFacts { kind, ..StmtFacts::default() }
    }

    fn t(name: &str) -> TableRef {
        TableRef { schema: None, name: name.into() }
    }

    #[test]
    fn rules_fire_and_approve_says_so() {
        let mut g = Guardrails::defaults(3);
        let drop = facts(StmtKind::Ddl { command: "DROP TABLE".into() });
        assert!(matches!(check(&g, std::slice::from_ref(&drop), &L), Verdict::Deny { rule, .. } if rule == "ddl"));
        g.ddl = Outcome::Approve;
        assert!(matches!(check(&g, std::slice::from_ref(&drop), &L), Verdict::Approve { rule, .. } if rule == "ddl"));
        // A rule that denies wins over one that asks for approval, in any
        // order and in any statement of the query.
        let mut wipe = facts(StmtKind::Write);
        wipe.unbounded_write = true;
        assert!(
            matches!(check(&g, &[drop.clone(), wipe.clone()], &L), Verdict::Deny { rule, .. } if rule == "unbounded_write")
        );
        let mut both = drop.clone();
        both.unbounded_write = true;
        assert!(
            matches!(check(&g, std::slice::from_ref(&both), &L), Verdict::Deny { rule, .. } if rule == "unbounded_write")
        );
        g.unbounded_write = Outcome::Approve;
        assert!(
            matches!(check(&g, &[wipe, drop.clone()], &L), Verdict::Approve { rule, .. } if rule == "unbounded_write")
        );
        g.unbounded_write = Outcome::Deny;
        g.ddl = Outcome::Allow;
        assert_eq!(check(&g, &[drop], &L), Verdict::Allow);

        let mut del = facts(StmtKind::Write);
        del.unbounded_write = true;
        assert!(matches!(check(&g, &[del], &L), Verdict::Deny { rule, .. } if rule == "unbounded_write"));

        let mut read = facts(StmtKind::Read);
        read.reads = vec![t("salaries")];
        assert!(matches!(check(&g, &[read], &L), Verdict::Deny { rule, .. } if rule == "restricted_read"));

        let mut copy = facts(StmtKind::CopyOut { to: CopyTarget::Client });
        copy.reads = vec![t("customers")];
        assert!(matches!(check(&g, &[copy], &L), Verdict::Deny { rule, .. } if rule == "copy_out"));

        let mut w = facts(StmtKind::Write);
        w.writes = vec![(t("customers"), Some(vec!["name".into()]))];
        assert_eq!(check(&g, &[w.clone()], &L), Verdict::Allow);
        w.writes = vec![(t("customers"), Some(vec!["EMAIL".into()]))];
        assert!(matches!(check(&g, &[w], &L), Verdict::Deny { rule, .. } if rule == "labeled_write"));

        let from_program = facts(StmtKind::CopyIn { from: CopyTarget::Program });
        assert!(matches!(check(&g, &[from_program], &L), Verdict::Deny { rule, .. } if rule == "copy_out"));
        let mut w = facts(StmtKind::Write);
        w.writes = vec![(t("salaries"), Some(vec!["amount".into()]))];
        assert!(
            matches!(check(&g, &[w], &L), Verdict::Deny { rule, .. } if rule == "labeled_write"),
            "table labels cover writes"
        );

        let mut f = facts(StmtKind::Read);
        f.functions = vec!["pg_read_file".into()];
        assert!(
            matches!(check(&g, &[facts(StmtKind::Read), f], &L), Verdict::Deny { rule, .. } if rule == "dangerous_function")
        );
    }
}
