//! Masking a byte stream that arrives in arbitrary chunks: terminal and
//! exec output (SSH today). A stateful transducer:
//!
//! 1. an ANSI/VT tokenizer (ground, ESC, CSI, OSC, DCS/SOS/PM/APC) whose
//!    state survives chunk boundaries; control sequences pass verbatim,
//!    except OSC 52 (clipboard writes), which is dropped;
//! 2. a UTF-8 carry of an incomplete character;
//! 3. the detectors run on the visible text only, so `AKIA\e[0mXXXX…` is
//!    still one key;
//! 4. text is held back only while a match may still be forming: the
//!    current line (up to `MAX_HOLD` characters) is released at its newline,
//!    or by `flush` after a short idle gap (the caller's timer), so typed
//!    echo stays interactive;
//! 5. a match is replaced by as many `*` as it has characters, so
//!    cursor-addressed screens keep their layout.
//!
//! Limits (README): a secret split across an idle gap, or drawn by cursor
//! movement, overwriting or backspaces, is not seen whole; this protects
//! against accidental exposure, not a hostile remote program.
//! Output that is not text (a NUL, invalid UTF-8) makes the stream binary:
//! it is then passed through or blocked by the caller, never masked.

use std::collections::BTreeMap;

use super::{
    classify::{Action, Classifier},
    detect,
};
use crate::config::Profile;

/// Visible characters held back at most before they are released anyway.
pub const MAX_HOLD: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vt {
    Ground,
    Esc,
    /// ESC followed by an intermediate byte (charset selection …).
    EscInter,
    Csi,
    /// OSC: whether it is a clipboard write, and its number while it is
    /// still being read.
    Osc {
        clipboard: bool,
        num: Option<u32>,
    },
    OscEsc {
        clipboard: bool,
    },
    /// DCS, SOS, PM, APC: strings up to ST.
    Str,
    StrEsc,
}

/// A piece of held output: a visible character, or control bytes.
#[derive(Debug, Clone)]
enum Piece {
    Char(char),
    Ctl(Vec<u8>),
}

pub struct StreamMask<'a> {
    classifier: &'a Classifier,
    profile: &'a Profile,
    vt: Vt,
    /// Bytes of the control sequence being read.
    ctl: Vec<u8>,
    /// An incomplete UTF-8 character.
    carry: Vec<u8>,
    held: Vec<Piece>,
    visible: usize,
    pub binary: bool,
    /// Findings masked, by detector.
    pub masked: BTreeMap<String, u64>,
}

impl<'a> StreamMask<'a> {
    pub fn new(classifier: &'a Classifier, profile: &'a Profile) -> Self {
        Self {
            classifier,
            profile,
            vt: Vt::Ground,
            ctl: Vec::new(),
            carry: Vec::new(),
            held: Vec::new(),
            visible: 0,
            binary: false,
            masked: BTreeMap::new(),
        }
    }

    /// Whether anything is masked at all (else the caller may skip this).
    pub fn needed(classifier: &Classifier, profile: &Profile) -> bool {
        classifier.detectors && profile.protects_anything()
    }

    /// Feed a chunk; what may be released now is appended to `out`. Once
    /// the stream turns out binary, nothing more is masked: the rest passes
    /// as it came (after what was held).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.binary {
            out.extend_from_slice(chunk);
            return;
        }
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            if b == 0 {
                self.turn_binary(chunk.get(i..).unwrap_or_default(), out);
                return;
            }
            match self.vt {
                Vt::Ground => {
                    if b == 0x1b {
                        self.vt = Vt::Esc;
                        self.ctl.push(b);
                    } else if b < 0x20 || b == 0x7f {
                        self.held.push(Piece::Ctl(vec![b]));
                        if b == b'\n' {
                            self.release_all(out);
                        }
                    } else if !self.utf8(b, out) {
                        self.turn_binary(chunk.get(i..).unwrap_or_default(), out);
                        return;
                    }
                }
                Vt::Esc => {
                    self.ctl.push(b);
                    self.vt = match b {
                        b'[' => Vt::Csi,
                        b']' => Vt::Osc { clipboard: false, num: Some(0) },
                        b'P' | b'X' | b'^' | b'_' => Vt::Str,
                        0x20..=0x2f => Vt::EscInter,
                        _ => self.end_ctl(),
                    };
                }
                Vt::EscInter => {
                    self.ctl.push(b);
                    if !(0x20..=0x2f).contains(&b) {
                        self.vt = self.end_ctl();
                    }
                }
                Vt::Csi => {
                    self.ctl.push(b);
                    if (0x40..=0x7e).contains(&b) {
                        self.vt = self.end_ctl();
                    }
                }
                Vt::Osc { clipboard, num } => {
                    self.ctl.push(b);
                    self.vt = match (b, num) {
                        (0x07, _) => self.end_osc(clipboard),
                        (0x1b, _) => Vt::OscEsc { clipboard },
                        (b'0'..=b'9', Some(n)) if n < 10_000 => {
                            Vt::Osc { clipboard, num: Some(n * 10 + u32::from(b - b'0')) }
                        }
                        (b';', Some(n)) => Vt::Osc { clipboard: n == 52, num: None },
                        _ => Vt::Osc { clipboard, num: None },
                    };
                }
                Vt::OscEsc { clipboard } => {
                    self.ctl.push(b);
                    self.vt = if b == b'\\' { self.end_osc(clipboard) } else { Vt::Osc { clipboard, num: None } };
                }
                Vt::Str => {
                    self.ctl.push(b);
                    if b == 0x1b {
                        self.vt = Vt::StrEsc;
                    } else if b == 0x07 {
                        self.vt = self.end_ctl();
                    }
                }
                Vt::StrEsc => {
                    self.ctl.push(b);
                    self.vt = if b == b'\\' { self.end_ctl() } else { Vt::Str };
                }
            }
            // A control sequence that never ends is bounded too.
            if self.ctl.len() > 64 * 1024 {
                let bytes = std::mem::take(&mut self.ctl);
                self.held.push(Piece::Ctl(bytes));
                self.vt = Vt::Ground;
            }
            if self.visible >= MAX_HOLD {
                self.release_all(out);
            }
            i += 1;
        }
    }

    /// Release everything held (the idle timer fired, or the stream ended).
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        self.release_all(out);
        if !self.carry.is_empty() {
            out.extend_from_slice(&self.carry);
            self.carry.clear();
        }
    }

    /// Whether anything waits for `flush`.
    pub fn holding(&self) -> bool {
        !self.held.is_empty() || !self.carry.is_empty()
    }

    fn end_ctl(&mut self) -> Vt {
        let bytes = std::mem::take(&mut self.ctl);
        self.held.push(Piece::Ctl(bytes));
        Vt::Ground
    }

    fn end_osc(&mut self, clipboard: bool) -> Vt {
        if clipboard {
            // OSC 52 writes the terminal's clipboard (base64): dropped.
            self.ctl.clear();
            *self.masked.entry("osc52".into()).or_default() += 1;
            return Vt::Ground;
        }
        self.end_ctl()
    }

    /// Add a byte of visible text; false if it is not UTF-8.
    fn utf8(&mut self, b: u8, _out: &mut [u8]) -> bool {
        self.carry.push(b);
        match std::str::from_utf8(&self.carry) {
            Ok(s) => {
                if let Some(c) = s.chars().next() {
                    self.held.push(Piece::Char(c));
                    self.visible += 1;
                }
                self.carry.clear();
                true
            }
            Err(e) if e.error_len().is_none() && self.carry.len() < 4 => true,
            Err(_) => false,
        }
    }

    fn turn_binary(&mut self, rest: &[u8], out: &mut Vec<u8>) {
        self.flush(out);
        if !self.ctl.is_empty() {
            out.append(&mut self.ctl);
        }
        self.binary = true;
        out.extend_from_slice(rest);
    }

    /// Mask what is held and write it out.
    fn release_all(&mut self, out: &mut Vec<u8>) {
        if self.held.is_empty() {
            return;
        }
        let text: String = self
            .held
            .iter()
            .filter_map(|p| match p {
                Piece::Char(c) => Some(*c),
                Piece::Ctl(_) => None,
            })
            .collect();
        // Byte offsets in `text` → which visible characters to star out.
        let mut star = vec![false; self.visible];
        for f in detect::scan(&text, detect::Context::default()) {
            if self.profile.action(self.classifier.detector_label(f.kind)) == Action::Allow {
                continue;
            }
            *self.masked.entry(format!("detector:{}", f.kind.name())).or_default() += 1;
            for (n, (at, _)) in text.char_indices().enumerate() {
                if at >= f.start && at < f.end {
                    if let Some(s) = star.get_mut(n) {
                        *s = true;
                    }
                }
            }
        }
        let mut n = 0;
        let mut buf = [0u8; 4];
        for p in self.held.drain(..) {
            match p {
                Piece::Ctl(b) => out.extend_from_slice(&b),
                Piece::Char(c) => {
                    if star.get(n).copied().unwrap_or(false) && !c.is_whitespace() {
                        out.push(b'*');
                    } else {
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    n += 1;
                }
            }
        }
        self.visible = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (String, bool) {
        let classifier = Classifier::default();
        let profile =
            crate::config::parse(std::path::Path::new("t.toml"), "[profiles.ci]\n").expect("policy").profiles.remove(0);
        let mut m = StreamMask::new(&classifier, &profile);
        let mut out = Vec::new();
        for c in chunks {
            m.push(c, &mut out);
        }
        m.flush(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), m.binary)
    }

    #[test]
    fn a_card_split_at_every_boundary_is_masked_with_equal_width() {
        let line = b"card: 4111 1111 1111 1111 ok\n";
        for cut in 1..line.len() {
            let (a, b) = line.split_at(cut);
            let (out, _) = run(&[a, b]);
            assert_eq!(out, "card: **** **** **** **** ok\n", "cut at {cut}");
        }
    }

    #[test]
    fn escapes_inside_a_secret_do_not_hide_it_and_pass_verbatim() {
        let (out, _) = run(&[b"key AKIA\x1b[1mIOSFODNN7\x1b[0mABCDEFG end\n"]);
        assert!(!out.contains("IOSFODNN7"), "{out:?}");
        assert!(out.contains("\x1b[1m") && out.contains("\x1b[0m"), "{out:?}");
    }

    #[test]
    fn utf8_split_across_chunks_survives_and_osc52_is_dropped() {
        let s = "héllo wörld\n".as_bytes();
        let (out, _) = run(&[&s[..2], &s[2..9], &s[9..]]);
        assert_eq!(out, "héllo wörld\n");
        let (out, _) = run(&[b"a\x1b]52;c;c2VjcmV0\x07b\n"]);
        assert_eq!(out, "ab\n");
        let (out, _) = run(&[b"\x1b]0;title\x07x\n"]);
        assert_eq!(out, "\x1b]0;title\x07x\n");
    }

    #[test]
    fn binary_output_is_detected_and_passed_as_is() {
        let (out, binary) = run(&[b"text\n", b"\x00\x01\xff 4111 1111 1111 1111"]);
        assert!(binary);
        assert!(out.ends_with("4111 1111 1111 1111"));
    }
}
