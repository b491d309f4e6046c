//! Results: table OIDs in row descriptions looked up, each description
//! classified into a mask plan, and every row checked against its
//! description and masked (COPY data lines too). The server side
//! (`server.rs`) calls these per message.

use super::*;

pub(super) async fn resolve_result_tables(
    batch: &[u8],
    tracker: &Mutex<Tracker>,
    ctx: &Ctx,
    cred: Option<&Credential>,
) -> Result<()> {
    let oids: Vec<(u32, i16)> = crate::postgres::frame::frames(batch)
        .filter(|f| f.tag == b'T')
        .flat_map(|f| row_description(f.body()))
        .map(|f| (f.table_oid, f.attnum))
        .collect();
    if oids.iter().all(|(o, _)| *o == 0) {
        return Ok(());
    }
    let (Some(cred), Some(catalog)) = (cred, tracker.lock().ok().and_then(|t| t.gov.catalog.clone())) else {
        return Ok(());
    };
    catalog.resolve_oids(ctx, cred, &oids).await
}

pub(super) fn row_description(body: &[u8]) -> Vec<Field> {
    let mut b = Body::new(body);
    let n = b.i16().unwrap_or(0).max(0) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let Some(name) = b.cstr() else { break };
        let (Some(table_oid), Some(attnum), Some(type_oid), Some(_len), Some(typmod), Some(format)) =
            (b.i32(), b.i16(), b.i32(), b.i16(), b.i32(), b.i16())
        else {
            break;
        };
        out.push(Field {
            name: String::from_utf8_lossy(name).into_owned(),
            table_oid: table_oid as u32,
            attnum,
            type_oid: type_oid as u32,
            typmod,
            binary: format == 1,
        });
    }
    out
}

/// Classify a result description into a plan.
pub(super) fn describe(t: &Tracker, fields: Vec<Field>, lookup_error: Option<&anyhow::Error>) -> Arc<Described> {
    let g = &t.gov;
    // A statement released (or to be released) by approval reads the
    // labels sent for approval in clear; any other, as the profile says.
    let profile = match &g.approved {
        Some(p) if head_approved(t) => p,
        _ => &g.profile,
    };
    let cols: Vec<ColumnDesc> = fields
        .iter()
        .map(|f| {
            let ty = types::value_type(f.type_oid, f.typmod);
            let source = if f.table_oid == 0 {
                Source::Computed
            } else if let Some(e) = lookup_error {
                Source::Unresolved(format!("the catalog lookup failed: {e:#}"))
            } else {
                match g.catalog.as_ref() {
                    // Passthrough: no catalog session; policy rules cannot
                    // name the column, detectors still run.
                    None => Source::Computed,
                    Some(c) => match c
                        .table(f.table_oid)
                        .and_then(|ti| ti.column(f.attnum).map(|col| (ti.clone(), col.clone())))
                    {
                        Some((ti, col)) => Source::Table {
                            db: ti.db.clone(),
                            schema: ti.schema.clone(),
                            table: ti.name.clone(),
                            column: col.name.clone(),
                            db_label: g.classifier.labels.from_comment(&col.labels_text),
                            table_db_label: g.classifier.labels.from_comment(&ti.labels_text),
                        },
                        None => Source::Unresolved(format!("table OID {} is not in the catalog", f.table_oid)),
                    },
                }
            };
            // A masked binary value must be writable in the binary format;
            // the plan refuses a column where it is not.
            let encodable = !f.binary
                || types::text_to_binary(f.type_oid, &crate::pipeline::mask::redact(ty).unwrap_or_default()).is_some();
            ColumnDesc { name: f.name.clone(), source, ty, encodable }
        })
        .collect();
    let plan = plan::plan(&cols, &g.classifier, profile, g.key.is_some());
    Arc::new(Described { fields, plan: Arc::new(plan) })
}

/// Whether the request at the head of the FIFO is approved or is held at
/// each execution (its description then applies to approved runs only).
fn head_approved(t: &Tracker) -> bool {
    match t.queue.front() {
        Some(Req::Exec(r) | Req::Simple(r) | Req::Func(r)) => r.approved,
        Some(Req::DescribeStmt(name, gen)) => {
            t.prepared.get(name).is_some_and(|p| p.gen == *gen && p.approval.is_some())
        }
        Some(Req::DescribePortal(name, gen)) => {
            t.portals.get(name).is_some_and(|p| p.gen == *gen && p.approval.is_some())
        }
        _ => false,
    }
}

/// An Execute's description: its portal's own (Describe P), else its
/// statement's (Describe S) with the Bind's result formats.
pub(super) fn resolve_portal_description(t: &mut Tracker) {
    let Some(Req::Exec(run)) = t.queue.front() else { return };
    if run.described.is_some() {
        return;
    }
    let want = run.portal_gen;
    let Some(p) = run.portal.as_ref().and_then(|name| t.portals.get(name)).filter(|p| p.gen == want) else { return };
    let described = p.described.clone().or_else(|| {
        t.prepared.get(&p.statement).filter(|s| s.gen == p.statement_gen).and_then(|s| s.described.clone())
    });
    let n = described.as_ref().map_or(0, |d| d.fields.len());
    let binary: Vec<bool> = match (&p.described, p.result_formats.len()) {
        (Some(d), _) => d.fields.iter().map(|f| f.binary).collect(),
        (None, 0) => vec![false; n],
        (None, 1) => vec![p.result_formats.first() == Some(&1); n],
        (None, _) => (0..n).map(|i| p.result_formats.get(i) == Some(&1)).collect(),
    };
    if let Some(Req::Exec(run)) = t.queue.front_mut() {
        run.described = described;
        run.binary = binary;
    }
}

/// One DataRow of the statement at the head: checked against its
/// description, masked, recorded if asked, and copied out. Err(None): a row
/// cordon cannot attribute to a statement; Err(Some): the result is refused.
/// This runs once per row: it borrows what it needs from the tracker and
/// allocates nothing for a row that passes unchanged.
pub(super) fn data_row(
    t: &mut Tracker,
    f: FrameRef<'_>,
    out: &mut BytesMut,
) -> std::result::Result<(), Option<Denied>> {
    let Tracker { queue, gov, row_values, pipeline, .. } = t;
    let Some(Req::Exec(run) | Req::Simple(run) | Req::Func(run)) = queue.front_mut() else {
        // The books are out of step with the server. Never pass it on unread.
        return Err(None);
    };
    let run: &mut Running = run;
    run.outcome.rows = run.outcome.rows.saturating_add(1);
    let Some(described) = run.described.as_deref() else {
        // Rows with no description at all (the client never asked for one):
        // cordon cannot classify them, so they do not pass.
        return Err(Some(Denied::policy(
            "classification",
            "result rows arrived without a row description; describe the statement or portal",
        )));
    };
    if let Some(d) = &described.plan.deny {
        return Err(Some(d.clone()));
    }
    let columns = Body::new(f.body()).i16().unwrap_or(-1);
    if usize::try_from(columns).ok() != Some(described.fields.len()) {
        return Err(Some(Denied::policy("classification", "a result row does not match its row description")));
    }
    // Counted per description, not per row (see `settle_read_masked`).
    run.read_masked_rows += 1;
    let start = out.len();
    let rewritten = if described.plan.active() {
        mask_row(f.body(), described, &run.binary, gov, &mut run.outcome.masked, row_values, out)
            .map_err(|e| Some(Denied::policy("mask", e)))?
    } else {
        false
    };
    // An unchanged row is copied out from the frame as it came.
    if !rewritten {
        out.extend_from_slice(f.bytes);
    }
    if pipeline.wants_rows() {
        let row = out.get(start..).and_then(|r| r.get(5..)).unwrap_or_default();
        pipeline.row(run.admitted.id, &wire::data_row(row));
    }
    Ok(())
}

/// Values PostgreSQL masked as it read them (mask at read) are counted for
/// every result column computed from a masked one, by name: once per
/// description for the rows that passed under it, not per row.
pub(super) fn settle_read_masked(run: &mut Running) {
    let rows = std::mem::take(&mut run.read_masked_rows);
    let Some(described) = run.described.as_deref() else { return };
    if rows == 0 {
        return;
    }
    for m in &run.notes.masked {
        let col = m.split('/').next().unwrap_or_default();
        if described.fields.iter().any(|f| f.table_oid == 0 && f.name == col) {
            match run.outcome.masked.get_mut(m) {
                Some(n) => *n += rows,
                None => {
                    run.outcome.masked.insert(m.clone(), rows);
                }
            }
        }
    }
}

/// Write a DataRow with masked values into `out`; Ok(false) when nothing
/// changed (nothing written: the caller copies the row as it came).
/// `spans` is the session's scratch for the row's value positions (reused
/// row after row: a large result allocates nothing for the rows it passes).
/// Every error is found before anything is written.
pub(super) fn mask_row(
    body: &[u8],
    d: &Described,
    binary: &[bool],
    g: &Governance,
    counts: &mut BTreeMap<String, u64>,
    spans: &mut Vec<Option<(usize, usize)>>,
    out: &mut BytesMut,
) -> std::result::Result<bool, String> {
    let mut b = Body::new(body);
    let n = b.i16().ok_or("a DataRow without a column count")?.max(0) as usize;
    spans.clear();
    for _ in 0..n {
        let len = b.i32().ok_or("a DataRow cut short")?;
        spans.push(if len < 0 {
            None
        } else {
            let start = body.len() - b.remaining();
            b.bytes(len as usize).ok_or("a DataRow value cut short")?;
            Some((start, len as usize))
        });
    }
    let value = |i: usize| -> Option<&[u8]> {
        spans.get(i).copied().flatten().and_then(|(start, len)| body.get(start..start.checked_add(len)?))
    };
    // Only a row that changes allocates its replacements.
    let mut changed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
    for (i, action) in d.plan.cols.iter().enumerate() {
        if *action == ColAction::Keep {
            continue;
        }
        let (Some(v), Some(field)) = (value(i), d.fields.get(i)) else { continue };
        let is_binary = binary.get(i).copied().unwrap_or(false);
        let ty = types::value_type(field.type_oid, field.typmod);
        let text: std::borrow::Cow<'_, str> = if is_binary {
            match types::binary_to_text(field.type_oid, v) {
                Some(t) => t.into(),
                // Masking by constant needs no reading; detection does.
                None if matches!(action, ColAction::Mask { .. }) => "".into(),
                None => continue,
            }
        } else {
            match std::str::from_utf8(v) {
                Ok(s) => s.into(),
                // Not readable: masked whole rather than passed unread.
                Err(_) => match action {
                    ColAction::Mask { .. } => "".into(),
                    _ => {
                        let redacted =
                            crate::pipeline::mask::redact(ty).map_err(|e| format!("column {:?}: {e}", field.name))?;
                        changed.push((i, Some(redacted.into_bytes())));
                        continue;
                    }
                },
            }
        };
        let masked = plan::apply(action, ty, &text, &g.classifier, &g.profile, g.key.as_deref(), counts)
            .map_err(|e| format!("column {:?}: {e}", field.name))?;
        if let Some(m) = masked {
            let bytes = match m {
                None => None,
                Some(s) if is_binary => Some(
                    types::text_to_binary(field.type_oid, &s)
                        .ok_or_else(|| format!("column {:?}: cannot encode the masked value in binary", field.name))?,
                ),
                Some(s) => Some(s.into_bytes()),
            };
            changed.push((i, bytes));
        }
    }
    if changed.is_empty() {
        return Ok(false);
    }
    // Straight into the batch going to the client: no row of its own.
    let start = out.len();
    out.reserve(body.len() + 32);
    out.put_u8(b'D');
    out.put_i32(0);
    out.put_i16(n as i16);
    for i in 0..n {
        let v: Option<&[u8]> = match changed.iter().find(|(c, _)| *c == i) {
            Some((_, c)) => c.as_deref(),
            None => value(i),
        };
        match v {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
    let len = (out.len() - start - 1) as i32;
    if let Some(slot) = out.get_mut(start + 1..start + 5) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
    Ok(true)
}

/// COPY TO STDOUT text lines: detected spans are masked field by field.
pub(super) fn mask_copy_line(body: &[u8], t: &mut Tracker) -> Option<Bytes> {
    let line = std::str::from_utf8(body).ok()?;
    let g = &t.gov;
    let mut counts = BTreeMap::new();
    let mut changed = false;
    let fields: Vec<String> = line
        .split('\t')
        .map(|field| {
            let action = ColAction::Detect { ctx: Default::default(), counter: "copy".into() };
            let ty = ValueType::Text { max_chars: None, fixed: false };
            match plan::apply(&action, ty, field, &g.classifier, &g.profile, None, &mut counts) {
                Ok(Some(Some(m))) => {
                    changed = true;
                    m
                }
                _ => field.to_string(),
            }
        })
        .collect();
    if !changed {
        return None;
    }
    if let Some(run) = current_run(t) {
        for (k, v) in counts {
            *run.outcome.masked.entry(k).or_default() += v;
        }
    }
    let text = fields.join("\t");
    let mut out = BytesMut::with_capacity(text.len() + 5);
    out.put_u8(b'd');
    out.put_i32((text.len() + 4) as i32);
    out.put_slice(text.as_bytes());
    Some(out.freeze())
}
