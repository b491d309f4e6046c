//! `[labels]`, `[[classify]]`, `[detectors]`, `[profiles.*]` and `[[tag]]`.

use super::*;

impl Validator<'_> {
    pub(super) fn classifier(
        &mut self,
        labels: Option<Spanned<RawLabels>>,
        rules: Vec<Spanned<RawClassify>>,
        detectors: Option<Spanned<RawDetectors>>,
    ) -> crate::pipeline::classify::Classifier {
        use crate::pipeline::{
            classify::{Classifier, Labels, Rule, Strategy},
            detect::Kind,
        };
        let mut c = Classifier::default();
        if let Some(l) = labels {
            let l = l.into_inner();
            let names = l.order.get_ref().clone();
            let mut seen = std::collections::BTreeSet::new();
            if names.len() < 2 || names.iter().any(|n| !valid_name(n) || !seen.insert(n.to_ascii_lowercase())) {
                self.error(
                    l.order.span(),
                    "labels.order",
                    "at least two distinct names (letters, digits, '-', '_'), lowest first",
                );
            } else {
                c.labels = Labels::new(names);
                c.detector_labels = Kind::ALL.iter().map(|k| (*k, c.labels.scaled(k.default_rank()))).collect();
            }
        }
        for (i, r) in rules.into_iter().enumerate() {
            let span = r.span();
            let r = r.into_inner();
            let field = |f: &str| format!("classify[{i}].{f}");
            let (pattern, pspan, parts) = match (&r.column, &r.table) {
                (Some(c), None) => (c.get_ref().clone(), c.span(), 4),
                (None, Some(t)) => (t.get_ref().clone(), t.span(), 3),
                _ => {
                    self.error(
                        span,
                        &format!("classify[{i}]"),
                        "give exactly one of `column` (db.schema.table.column) or `table` (db.schema.table)",
                    );
                    continue;
                }
            };
            if pattern.split('.').count() != parts {
                let what =
                    if parts == 4 { "column = \"db.schema.table.column\"" } else { "table = \"db.schema.table\"" };
                self.error(
                    pspan,
                    &field(if parts == 4 { "column" } else { "table" }),
                    format!("use {what} (globs allowed, e.g. \"*.public.customers.ssn\")"),
                );
                continue;
            }
            let strategy = match &r.mask {
                Some(m) => match m.get_ref().parse::<Strategy>() {
                    Ok(s) => Some(s),
                    Err(e) => {
                        self.error(m.span(), &field("mask"), e);
                        None
                    }
                },
                None => Some(Strategy::Redact),
            };
            let label = c.labels.rank(r.label.get_ref());
            if label.is_none() {
                let known: Vec<&str> = (0..c.labels.len()).map(|k| c.labels.name(k)).collect();
                self.error(
                    r.label.span(),
                    &field("label"),
                    format!("unknown label {:?}; labels are [{}]", r.label.get_ref(), known.join(", ")),
                );
            }
            let (Some(label), Some(strategy)) = (label, strategy) else { continue };
            match Rule::new(&pattern, label, strategy) {
                Ok(rule) => c.rules.push(rule),
                Err(e) => self.error(pspan, &field("column"), e),
            }
        }
        if let Some(d) = detectors {
            let span = d.span();
            let d = d.into_inner();
            c.detectors = d.enabled.unwrap_or(true);
            for (k, v) in d.labels {
                let Some(kind) = Kind::from_name(&k) else {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                    self.error(
                        span.clone(),
                        &format!("detectors.{k}"),
                        format!("unknown detector; known: [{}]", known.join(", ")),
                    );
                    continue;
                };
                match c.labels.rank(&v) {
                    Some(r) => {
                        c.detector_labels.insert(kind, r);
                    }
                    None => self.error(span.clone(), &format!("detectors.{k}"), format!("unknown label {v:?}")),
                }
            }
        }
        c
    }

    pub(super) fn actions(
        &mut self,
        profile: &str,
        raw: &BTreeMap<String, Spanned<String>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> Vec<crate::pipeline::classify::Action> {
        use crate::pipeline::classify::Action;
        // Default: the lowest label is allowed, every other one masked.
        let mut out: Vec<Action> =
            (0..labels.len()).map(|r| if r == 0 { Action::Allow } else { Action::Mask }).collect();
        for (name, v) in raw {
            let field = format!("profiles.{profile}.labels.{name}");
            let Some(rank) = labels.rank(name) else {
                self.error(v.span(), &field, format!("unknown label {name:?}"));
                continue;
            };
            match v.get_ref().parse::<Action>() {
                Ok(a) => {
                    if let Some(slot) = out.get_mut(rank) {
                        *slot = a;
                    }
                }
                Err(e) => self.error(v.span(), &field, e),
            }
        }
        out
    }

    pub(super) fn lookups(
        &mut self,
        profile: &str,
        raw: &BTreeMap<String, Spanned<String>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> Vec<bool> {
        let mut out = vec![true; labels.len()];
        for (name, v) in raw {
            let field = format!("profiles.{profile}.lookups.{name}");
            let Some(rank) = labels.rank(name) else {
                self.error(v.span(), &field, format!("unknown label {name:?}"));
                continue;
            };
            let on = match v.get_ref().as_str() {
                "equality" => true,
                "none" => false,
                other => {
                    self.error(
                        v.span(),
                        &field,
                        format!("unknown lookup mode {other:?}; use \"equality\" or \"none\""),
                    );
                    continue;
                }
            };
            if let Some(slot) = out.get_mut(rank) {
                *slot = on;
            }
        }
        out
    }

    pub(super) fn guardrails(
        &mut self,
        profile: &str,
        raw: Option<Spanned<RawGuardrails>>,
        labels: &crate::pipeline::classify::Labels,
    ) -> crate::pipeline::guard::Guardrails {
        use crate::pipeline::guard::{Guardrails, Outcome};
        let mut g = Guardrails::defaults(labels.highest());
        let Some(raw) = raw else { return g };
        let raw = raw.into_inner();
        let mut outcome = |v: &Option<Spanned<String>>, name: &str, slot: &mut Outcome| {
            if let Some(v) = v {
                match v.get_ref().parse() {
                    Ok(o) => *slot = o,
                    Err(e) => self.error(v.span(), &format!("profiles.{profile}.guardrails.{name}"), e),
                }
            }
        };
        outcome(&raw.ddl, "ddl", &mut g.ddl);
        outcome(&raw.unbounded_write, "unbounded_write", &mut g.unbounded_write);
        outcome(&raw.copy_out, "copy_out", &mut g.copy_out);
        outcome(&raw.restricted_read, "restricted_read", &mut g.restricted_read);
        outcome(&raw.labeled_write, "labeled_write", &mut g.labeled_write);
        outcome(&raw.dangerous_functions, "dangerous_functions", &mut g.dangerous_functions);
        outcome(&raw.do_block, "do_block", &mut g.do_block);
        outcome(&raw.user_functions, "user_functions", &mut g.user_functions);
        outcome(&raw.sensitive_literals, "sensitive_literals", &mut g.sensitive_literals);
        for (v, name, slot) in [
            (&raw.copy_out_min_label, "copy_out_min_label", &mut g.copy_out_min_label),
            (&raw.restricted_read_min_label, "restricted_read_min_label", &mut g.restricted_read_min_label),
            (&raw.labeled_write_min_label, "labeled_write_min_label", &mut g.labeled_write_min_label),
            (&raw.sensitive_literals_min_label, "sensitive_literals_min_label", &mut g.sensitive_literals_min_label),
        ] {
            if let Some(v) = v {
                match labels.rank(v.get_ref()) {
                    Some(r) => *slot = r,
                    None => self.error(
                        v.span(),
                        &format!("profiles.{profile}.guardrails.{name}"),
                        format!("unknown label {:?}", v.get_ref()),
                    ),
                }
            }
        }
        if let Some(f) = raw.functions {
            g.functions = f.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        if let Some(f) = raw.allowed_functions {
            g.allowed_functions = f.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        g
    }

    pub(super) fn tag(&mut self, i: usize, raw: Spanned<RawTag>, profiles: &[Profile]) -> Option<TagRule> {
        let span = raw.span();
        let raw = raw.into_inner();
        let target = match (&raw.cgroup, &raw.unit) {
            (Some(c), None) => {
                let g = c.get_ref().trim_matches('/').to_string();
                if let Err(e) = globset::Glob::new(&g) {
                    self.error(c.span(), &format!("tag[{i}].cgroup"), format!("bad glob: {e}"));
                    return None;
                }
                if g.split('/').any(|c| c == ".." || c == ".") {
                    self.error(c.span(), &format!("tag[{i}].cgroup"), "no '.' or '..' components");
                    return None;
                }
                TagTarget::CgroupGlob(g)
            }
            (None, Some(u)) => {
                let u = u.get_ref();
                if u.contains('/') || !UNIT_SUFFIXES.iter().any(|s| u.ends_with(s)) {
                    let span = raw.unit.as_ref().map(Spanned::span).unwrap_or(span.clone());
                    self.error(
                        span,
                        &format!("tag[{i}].unit"),
                        "a systemd unit name such as \"backup.service\" (.service, .scope or .slice)",
                    );
                    return None;
                }
                TagTarget::Unit(u.clone())
            }
            _ => {
                self.error(span, &format!("tag[{i}]"), "give exactly one of `cgroup` or `unit`");
                return None;
            }
        };
        let profile = raw.profile.get_ref();
        if !profiles.iter().any(|p| &p.name == profile) {
            let known: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            self.error(
                raw.profile.span(),
                &format!("tag[{i}].profile"),
                format!("unknown profile {profile:?}; defined: [{}]", known.join(", ")),
            );
            return None;
        }
        Some(TagRule { target, profile: profile.clone() })
    }
}
