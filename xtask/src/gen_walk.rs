//! `cargo xtask gen-walk`: generates `agent/src/postgres/sqltree/walk_gen.rs`,
//! a visitor that reaches every child node of every libpg_query parse node.
//!
//! Why generated: the mask-at-read rewrite and the guardrails must see every
//! subquery and column reference, wherever the grammar lets one appear
//! (ARRAY[…], XMLTABLE, JSON constructors, window frames, …). pg_query's own
//! walkers cover only the common node types. The walker is derived from the
//! crate's prost definitions, so a node type cannot be forgotten; `--check`
//! fails when the committed file is stale (run after a pg_query upgrade).

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::{bail, Context, Result};

const OUT: &str = "agent/src/postgres/sqltree/walk_gen.rs";

#[derive(Debug)]
enum Kind {
    Node,
    RangeVar,
    Struct(String),
}

/// Source positions (`location`, `*_location`, `list_start`, `list_end`):
/// they differ between a tree cordon built and the same tree read back.
fn is_position(name: &str) -> bool {
    name == "location" || name.ends_with("_location") || name.ends_with("list_start") || name.ends_with("list_end")
}

#[derive(Debug)]
struct Field {
    name: String,
    kind: Kind,
    /// Vec, Option<Box>, Option, or plain.
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Vec,
    Option,
}

pub fn run(check: bool) -> Result<()> {
    let src = protobuf_rs()?;
    let text = std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let generated = generate(&text)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join(OUT);
    if check {
        let have = std::fs::read_to_string(&out).unwrap_or_default();
        if have != generated {
            bail!("{OUT} is stale: run `cargo xtask gen-walk`");
        }
        println!("xtask: {OUT} is up to date");
        return Ok(());
    }
    std::fs::write(&out, generated).with_context(|| format!("writing {}", out.display()))?;
    println!("xtask: wrote {OUT} from {}", src.display());
    Ok(())
}

/// pg_query's protobuf.rs, found through cargo metadata.
fn protobuf_rs() -> Result<PathBuf> {
    let out = std::process::Command::new("cargo")
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let packages = meta.get("packages").and_then(|p| p.as_array()).context("cargo metadata without packages")?;
    for p in packages {
        if p.get("name").and_then(|n| n.as_str()) == Some("pg_query") {
            let manifest = p.get("manifest_path").and_then(|m| m.as_str()).context("pg_query without manifest")?;
            let dir = PathBuf::from(manifest);
            return Ok(dir.parent().context("manifest without a directory")?.join("src/protobuf.rs"));
        }
    }
    bail!("pg_query is not a dependency")
}

fn inner_type(ty: &str) -> (Shape, String) {
    let ty = ty.trim().trim_end_matches(',');
    let strip = |t: &str, p: &str| t.strip_prefix(p).and_then(|t| t.strip_suffix('>')).map(str::to_string);
    if let Some(t) = strip(ty, "::prost::alloc::vec::Vec<") {
        return (Shape::Vec, t);
    }
    if let Some(t) = strip(ty, "::core::option::Option<") {
        let t = strip(&t, "::prost::alloc::boxed::Box<").unwrap_or(t);
        return (Shape::Option, t);
    }
    (Shape::Option, ty.to_string())
}

/// Lines with every field declaration on one line: rustfmt breaks a long
/// type (`pub on_conflict_clause: ::core::option::Option<` + the boxed type
/// on the next lines), and a field read from its first line only was
/// silently left out of the walk (InsertStmt's ON CONFLICT clause was).
fn joined_fields(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut open = 0i32;
    for line in text.lines() {
        let l = line.trim();
        let depth = l.matches('<').count() as i32 - l.matches('>').count() as i32;
        match out.last_mut() {
            Some(last) if open > 0 => {
                // `Box<OnConflictClause>,` then `>,`: no comma inside.
                if l.starts_with('>') && last.ends_with(',') {
                    last.pop();
                }
                last.push_str(l);
                open += depth;
            }
            _ => {
                out.push(l.to_string());
                open = if l.starts_with("pub ") { depth.max(0) } else { 0 };
            }
        }
    }
    out
}

fn generate(text: &str) -> Result<String> {
    let mut structs: BTreeMap<String, Vec<Field>> = BTreeMap::new();
    let mut positions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut int32_attr = false;
    let mut variants: Vec<(String, String)> = Vec::new();
    let mut current: Option<String> = None;
    let mut in_node_enum = false;
    let mut message_attr = false;
    for line in joined_fields(text) {
        let l = line.as_str();
        if l.starts_with("pub enum Node {") {
            in_node_enum = true;
            continue;
        }
        if in_node_enum {
            if l == "}" {
                in_node_enum = false;
                continue;
            }
            // Alias(super::Alias), or AExpr(::prost::alloc::boxed::Box<super::AExpr>),
            if let Some((name, rest)) = l.split_once('(') {
                if l.starts_with('#') {
                    continue;
                }
                let payload = rest.trim_end_matches(',').trim_end_matches(')');
                let payload = payload.trim_start_matches("::prost::alloc::boxed::Box<").trim_end_matches('>');
                let payload = payload.trim_start_matches("super::");
                variants.push((name.to_string(), payload.to_string()));
            }
            continue;
        }
        if let Some(name) = l.strip_prefix("pub struct ").and_then(|r| r.strip_suffix(" {")) {
            current = Some(name.to_string());
            structs.entry(name.to_string()).or_default();
            continue;
        }
        if l == "}" {
            current = None;
            continue;
        }
        let Some(s) = current.as_ref() else { continue };
        if l.starts_with("#[prost(") {
            message_attr = l.starts_with("#[prost(message");
            int32_attr = l.starts_with("#[prost(int32");
            continue;
        }
        if let Some(rest) = l.strip_prefix("pub ") {
            if int32_attr {
                int32_attr = false;
                if let Some((name, _)) = rest.split_once(':') {
                    if is_position(name.trim()) {
                        positions.entry(s.clone()).or_default().push(name.trim().to_string());
                    }
                }
                continue;
            }
            if !message_attr {
                continue;
            }
            message_attr = false;
            let Some((name, ty)) = rest.split_once(':') else { continue };
            let (shape, inner) = inner_type(ty);
            let kind = match inner.as_str() {
                "Node" => Kind::Node,
                "RangeVar" => Kind::RangeVar,
                other => Kind::Struct(other.to_string()),
            };
            if s == "Node" || s == "ParseResult" || s == "ScanResult" || s == "RawStmt" {
                continue;
            }
            structs.entry(s.clone()).or_default().push(Field { name: name.trim().to_string(), kind, shape });
        }
    }
    if variants.len() < 200 || structs.len() < 200 {
        bail!("protobuf.rs did not parse as expected ({} variants, {} structs)", variants.len(), structs.len());
    }
    let mut out = String::new();
    out.push_str(
        "// @generated by `cargo xtask gen-walk` from pg_query's protobuf.rs. Do not edit.\n\
         //\n\
         // Every child of every parse node: `Node`s go to `node`, `RangeVar`s\n\
         // held outside a `Node` go to `range_var`. Nothing else can hold a\n\
         // subquery, a column reference or a relation.\n\n\
         #![allow(non_snake_case, unused_variables, dead_code, clippy::all)]\n\n\
         use pg_query::protobuf::*;\nuse pg_query::NodeEnum;\n\n\
         pub trait Visit<'a> {\n    fn node(&mut self, n: &'a Node);\n    fn range_var(&mut self, _r: &'a RangeVar) {}\n}\n\n\
         pub trait VisitMut {\n    fn node(&mut self, n: &mut Node);\n    fn range_var(&mut self, _r: &mut RangeVar) {}\n}\n\n",
    );
    // Positions cleared, for comparing trees: every struct, whether it
    // sits in a Node or in a field of its own type.
    let clearable = |name: &str| structs.get(name).is_some_and(|f| !f.is_empty()) || positions.contains_key(name);
    let _ = writeln!(out, "/// Set every source position in `e` and below to 0.");
    let _ = writeln!(out, "pub fn clear_positions(e: &mut NodeEnum) {{");
    let _ = writeln!(out, "    match e {{");
    for (variant, payload) in &variants {
        if clearable(payload) {
            let _ = writeln!(out, "        NodeEnum::{variant}(x) => c_{payload}(x),");
        }
    }
    let _ = writeln!(out, "        _ => {{}}");
    let _ = writeln!(out, "    }}\n}}\n");
    let _ = writeln!(
        out,
        "fn c_node(n: &mut Node) {{\n    if let Some(e) = n.node.as_mut() {{ clear_positions(e); }}\n}}\n"
    );
    for (name, fields) in &structs {
        if !clearable(name) {
            continue;
        }
        let _ = writeln!(out, "fn c_{name}(x: &mut {name}) {{");
        for p in positions.get(name).into_iter().flatten() {
            let _ = writeln!(out, "    x.{p} = 0;");
        }
        for f in fields {
            let call = match &f.kind {
                Kind::Node => "c_node(c)".to_string(),
                Kind::RangeVar => "c_RangeVar(c)".to_string(),
                Kind::Struct(t) if clearable(t) => format!("c_{t}(c)"),
                Kind::Struct(_) => continue,
            };
            let field = &f.name;
            let _ = match f.shape {
                Shape::Vec => writeln!(out, "    for c in &mut x.{field} {{ {call}; }}"),
                Shape::Option => writeln!(out, "    if let Some(c) = &mut x.{field} {{ {call}; }}"),
            };
        }
        let _ = writeln!(out, "}}\n");
    }
    for (mutable, sfx) in [(false, ""), (true, "_mut")] {
        let (lt, refm, tr) = if mutable { ("", "&mut ", "dyn VisitMut") } else { ("<'a>", "&'a ", "dyn Visit<'a>") };
        let borrow = if mutable { "&mut " } else { "&" };
        let _ = writeln!(out, "/// The children of one node.");
        let _ = writeln!(out, "pub fn children{sfx}{lt}(e: {refm}NodeEnum, v: &mut {tr}) {{");
        let _ = writeln!(out, "    match e {{");
        for (variant, payload) in &variants {
            if structs.get(payload).is_some_and(|f| !f.is_empty()) {
                let _ = writeln!(out, "        NodeEnum::{variant}(x) => s{sfx}_{payload}(x, v),");
            }
        }
        let _ = writeln!(out, "        _ => {{}}");
        let _ = writeln!(out, "    }}\n}}\n");
        for (name, fields) in &structs {
            if fields.is_empty() {
                continue;
            }
            let _ = writeln!(out, "pub fn s{sfx}_{name}{lt}(x: {refm}{name}, v: &mut {tr}) {{");
            for f in fields {
                let call = match &f.kind {
                    Kind::Node => "v.node(c)".to_string(),
                    Kind::RangeVar => "v.range_var(c)".to_string(),
                    Kind::Struct(s) if structs.get(s).is_some_and(|f| !f.is_empty()) => format!("s{sfx}_{s}(c, v)"),
                    Kind::Struct(_) => continue,
                };
                let field = &f.name;
                let _ = match f.shape {
                    Shape::Vec => writeln!(out, "    for c in {borrow}x.{field} {{ {call}; }}"),
                    Shape::Option => writeln!(out, "    if let Some(c) = {borrow}x.{field} {{ {call}; }}"),
                };
            }
            let _ = writeln!(out, "}}\n");
        }
    }
    Ok(out)
}
