//! `[profiles.X.ssh]`: what SSH sessions of a profile may do.

use super::*;
use crate::ssh::policy::{Shape, ShellMode, SshPolicy, TransferMode};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSsh {
    #[serde(default)]
    commands: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    approve: Vec<Spanned<String>>,
    shell: Option<Spanned<String>>,
    transfer: Option<Spanned<String>>,
    #[serde(default)]
    forwarding: Vec<String>,
    allow_hidden_commands: Option<bool>,
    binary: Option<Spanned<String>>,
}

impl Validator<'_> {
    pub(super) fn ssh(&mut self, profile: &str, raw: Option<Spanned<RawSsh>>) -> SshPolicy {
        let Some(raw) = raw else { return SshPolicy::default() };
        let raw = raw.into_inner();
        let field = |f: &str| format!("profiles.{profile}.ssh.{f}");
        let mut shapes = |list: &[Spanned<String>], name: &str| -> Vec<Shape> {
            let mut out = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match s.get_ref().parse::<Shape>() {
                    Ok(sh) => out.push(sh),
                    Err(e) => self.error(s.span(), &format!("{}[{i}]", field(name)), e),
                }
            }
            out
        };
        let commands = shapes(&raw.commands, "commands");
        let deny = shapes(&raw.deny, "deny");
        let approve = shapes(&raw.approve, "approve");
        let shell = match raw.shell.as_ref().map(|s| (s, s.get_ref().as_str())) {
            None => ShellMode::Deny,
            Some((_, "deny")) => ShellMode::Deny,
            Some((_, "record")) => ShellMode::Record,
            Some((_, "allow")) => ShellMode::Allow,
            Some((s, other)) => {
                self.error(
                    s.span(),
                    &field("shell"),
                    format!("unknown mode {other:?}; use \"deny\", \"record\" or \"allow\""),
                );
                ShellMode::Deny
            }
        };
        let transfer = match raw.transfer.as_ref().map(|s| (s, s.get_ref().as_str())) {
            None => TransferMode::Deny,
            Some((_, "deny")) => TransferMode::Deny,
            Some((_, "read-only")) => TransferMode::ReadOnly,
            Some((_, "allow")) => TransferMode::Allow,
            Some((s, other)) => {
                self.error(
                    s.span(),
                    &field("transfer"),
                    format!("unknown mode {other:?}; use \"deny\", \"read-only\" or \"allow\""),
                );
                TransferMode::Deny
            }
        };
        let binary_passes = match raw.binary.as_ref().map(|s| (s, s.get_ref().as_str())) {
            None | Some((_, "block")) => false,
            Some((_, "pass")) => true,
            Some((s, other)) => {
                self.error(s.span(), &field("binary"), format!("unknown mode {other:?}; use \"block\" or \"pass\""));
                false
            }
        };
        SshPolicy {
            binary_passes,
            commands,
            deny,
            approve,
            shell,
            transfer,
            forwarding: raw.forwarding,
            allow_hidden: raw.allow_hidden_commands.unwrap_or(false),
        }
    }
}
