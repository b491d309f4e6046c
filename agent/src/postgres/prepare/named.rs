//! The statements one session keeps prepared upstream under cordon's names
//! (see the parent module): first and second sightings, the least recently
//! used closed past the bounds, the messages that prepare, bind and close
//! them, and when preparing stops (a pooler, vanished statements).

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock,
    },
};

use bytes::{BufMut, BytesMut};

use super::{Memo, Parameterized, Plans, Recent, MAX_TEXT, MEMO_MAX_TEXT, PREFIX};

/// This agent run's part of the names (random: a pooled backend may hold
/// statements a previous run prepared).
pub(super) static RUN: LazyLock<String> = LazyLock::new(|| format!("{:08x}", rand::random::<u32>()));
/// The next name's number, counted across sessions.
static NEXT_NAME: AtomicU64 = AtomicU64::new(1);
/// Most statements one session keeps prepared upstream (least recently used
/// is closed first). PostgreSQL keeps each one's plan in the backend.
pub const MAX_PREPARED: usize = 128;
/// Most bytes of statement text one session keeps prepared (least recently
/// used closed first): 128 statements of 16 KiB would be 2 MiB a session.
pub(super) const MAX_PREPARED_BYTES: usize = 512 * 1024;
/// Most statements one session remembers having seen once, and most bytes
/// of their texts (counted as they come; all forgotten when either is
/// reached): a session of long distinct texts stays small.
const MAX_SEEN: usize = 2048;
pub(super) const MAX_SEEN_BYTES: usize = 256 * 1024;

/// One session's statements prepared upstream.
pub struct Upstream {
    enabled: bool,
    pub(super) slots: HashMap<String, Slot>,
    seen: usize,
    pub(super) seen_bytes: usize,
    pub(super) prepared_bytes: usize,
    pub(super) prepared: usize,
    tick: u64,
    /// How many of cordon's statements vanished from the server.
    vanished: u32,
    /// Names to close with the next statement sent this way.
    to_close: Vec<String>,
    /// Texts parameterised lately, most recent first (see `Memo`).
    pub(super) memos: Recent<Memo>,
}

/// Most texts a session keeps to parameterise without the scanner.
const MEMOS: usize = 16;

/// What a sighting of a statement means (see `Upstream::sighting`).
enum Sighting {
    First,
    /// Its Parse is in flight: sent as it came meanwhile.
    Pending,
    Ready(String),
    Second(String),
}

pub(super) enum Slot {
    /// Seen once, sent as it came.
    Seen,
    /// Parse sent, not yet confirmed: sent as it came meanwhile.
    Pending(String),
    Ready {
        name: String,
        used: u64,
    },
}

/// How a client's Parse of the unnamed statement goes upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseAs {
    /// As it came.
    Unnamed,
    /// Under this name of cordon's (the second time the text comes).
    Named { name: String, key: String },
    /// Not at all: this statement of cordon's has the text already; cordon
    /// answers the ParseComplete.
    Prepared { name: String, key: String },
}

/// A simple query sent as a prepared statement, for the server side.
#[derive(Debug)]
pub struct Sent {
    pub key: String,
    /// A Parse went with it (its ParseComplete confirms the statement).
    pub parse: bool,
    /// The server confirmed the Parse.
    pub parsed: bool,
    /// The text as a simple query would have sent it (for a retry).
    pub text: String,
    /// A stale statement's error, held while the statement is sent again
    /// as a simple query.
    pub retrying: Option<bytes::Bytes>,
}

impl Upstream {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            slots: HashMap::new(),
            seen: 0,
            seen_bytes: 0,
            prepared_bytes: 0,
            prepared: 0,
            tick: 0,
            vanished: 0,
            to_close: Vec::new(),
            memos: Recent::new(MEMOS),
        }
    }

    /// The messages that run `text` as a prepared statement, appended to
    /// `out`, or None: send it as it came. The caller keeps the text in
    /// `Sent::text`.
    pub fn send(&mut self, plans: &Plans, text: &str, out: &mut BytesMut) -> Option<Sent> {
        if !self.enabled {
            return None;
        }
        let p = self.parameterize(plans, text)?;
        let (name, parse) = match self.sighting(&p.key) {
            Sighting::First | Sighting::Pending => return None,
            Sighting::Ready(name) => (name, false),
            Sighting::Second(name) => (name, true),
        };
        for c in self.to_close.drain(..) {
            close(out, &c);
        }
        if parse {
            parse_msg(out, &name, &p.text, &p.types);
        }
        bind(out, &name, &p.values);
        // Describe the portal: a simple query's answer starts with its
        // RowDescription.
        out.put_u8(b'D');
        out.put_i32(4 + 2);
        out.put_u8(b'P');
        out.put_u8(0);
        out.put_u8(b'E');
        out.put_i32(4 + 1 + 4);
        out.put_u8(0);
        out.put_i32(0);
        out.put_u8(b'S');
        out.put_i32(4);
        Some(Sent { key: p.key, parse, parsed: false, text: String::new(), retrying: None })
    }

    /// `text` parameterised: by a memo of the same shape if one matches
    /// (no scanner, no shared lock), else by the shared plans.
    fn parameterize(&mut self, plans: &Plans, text: &str) -> Option<Parameterized> {
        if text.len() > MAX_TEXT {
            return None;
        }
        if let Some(p) = self.memos.find(|m| m.apply(text)) {
            return Some(p);
        }
        let (p, memo) = plans.parameterize_memo(text)?;
        if text.len() <= MEMO_MAX_TEXT {
            self.memos.push(memo);
        }
        Some(p)
    }

    /// What becomes of a client's Parse of the unnamed statement (`types`:
    /// the rest of its Parse, the parameter types). Drivers that parse an
    /// unnamed statement before every execution (pgbench -M extended,
    /// node-postgres, pgjdbc's first runs, psycopg without `prepare`) make
    /// PostgreSQL plan each time; a text parsed before is parsed once, under
    /// a name of cordon's, and later Parses are answered by cordon.
    pub fn parse_unnamed(&mut self, text: &str, types: &[u8]) -> ParseAs {
        if !self.enabled || text.len() > MAX_TEXT {
            return ParseAs::Unnamed;
        }
        let mut key = String::with_capacity(text.len() + 2 + types.len() * 2);
        key.push_str("E\0");
        for b in types {
            let _ = write!(key, "{b:02x}");
        }
        key.push('\0');
        key.push_str(text);
        match self.sighting(&key) {
            Sighting::First | Sighting::Pending => ParseAs::Unnamed,
            Sighting::Ready(name) => ParseAs::Prepared { name, key },
            Sighting::Second(name) => ParseAs::Named { name, key },
        }
    }

    /// Another sighting of the statement `key` (counted for the LRU): the
    /// first is remembered, the second gets a name to prepare under.
    fn sighting(&mut self, key: &str) -> Sighting {
        self.tick += 1;
        match self.slots.get_mut(key) {
            None => {
                if self.seen >= MAX_SEEN || self.seen_bytes + key.len() > MAX_SEEN_BYTES {
                    self.slots.retain(|_, s| !matches!(s, Slot::Seen));
                    self.seen = 0;
                    self.seen_bytes = 0;
                }
                self.slots.insert(key.to_string(), Slot::Seen);
                self.seen += 1;
                self.seen_bytes += key.len();
                Sighting::First
            }
            Some(Slot::Pending(_)) => Sighting::Pending,
            Some(Slot::Ready { name, used }) => {
                *used = self.tick;
                Sighting::Ready(name.clone())
            }
            Some(Slot::Seen) => Sighting::Second(self.name_for(key)),
        }
    }

    /// A new name for a statement seen before (its slot becomes pending).
    fn name_for(&mut self, key: &str) -> String {
        while self.prepared >= MAX_PREPARED || self.prepared_bytes + key.len() > MAX_PREPARED_BYTES {
            if !self.evict() {
                break;
            }
        }
        let name = format!("{PREFIX}{}_{}", *RUN, NEXT_NAME.fetch_add(1, Ordering::Relaxed));
        self.seen = self.seen.saturating_sub(1);
        self.prepared += 1;
        self.prepared_bytes += key.len();
        self.slots.insert(key.to_string(), Slot::Pending(name.clone()));
        name
    }

    /// Statements to close before the next Parse of cordon's (evicted or
    /// stale ones).
    pub fn take_closes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.to_close)
    }

    /// Close the least recently used statement; false when none is ready.
    fn evict(&mut self) -> bool {
        let oldest = self
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { used, .. } => Some((*used, k.clone())),
                _ => None,
            })
            .min();
        let Some((_, k)) = oldest else { return false };
        if let Some(Slot::Ready { name, .. }) = self.slots.remove(&k) {
            self.to_close.push(name);
            self.prepared = self.prepared.saturating_sub(1);
            self.prepared_bytes = self.prepared_bytes.saturating_sub(k.len());
        }
        true
    }

    /// Whether statements are prepared upstream.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The server proved it keeps this session's statements (see the module
    /// comment).
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// A statement of cordon's vanished from the server (already
    /// forgotten). Once may be the workload's own DEALLOCATE run where
    /// cordon cannot see it (in a function); twice, and the server is taken
    /// not to keep statements between transactions: nothing more is
    /// prepared, and what was is forgotten (the server may lack any of it).
    pub fn vanished(&mut self) {
        self.vanished = self.vanished.saturating_add(1);
        if self.vanished < 2 {
            return;
        }
        self.enabled = false;
        self.slots.clear();
        self.seen = 0;
        self.seen_bytes = 0;
        self.prepared = 0;
        self.prepared_bytes = 0;
        self.to_close.clear();
    }

    /// The server confirmed the Parse.
    pub fn confirmed(&mut self, key: &str) {
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(key) {
            if let Slot::Pending(name) = slot {
                *slot = Slot::Ready { name: std::mem::take(name), used: tick };
            }
        }
    }

    /// The statement failed to parse, vanished (26000) or went stale (a
    /// result type changed under it): forget it, and close it if it exists.
    pub fn forget(&mut self, key: &str, close_it: bool) {
        match self.slots.remove(key) {
            Some(Slot::Ready { name, .. }) | Some(Slot::Pending(name)) => {
                self.prepared = self.prepared.saturating_sub(1);
                self.prepared_bytes = self.prepared_bytes.saturating_sub(key.len());
                if close_it {
                    self.to_close.push(name);
                }
            }
            Some(Slot::Seen) => self.seen = self.seen.saturating_sub(1),
            None => {}
        }
    }

    /// DISCARD ALL or DEALLOCATE ALL ran: the server holds none of them.
    pub fn cleared(&mut self) {
        self.slots.retain(|_, s| matches!(s, Slot::Seen));
        self.prepared = 0;
        self.prepared_bytes = 0;
        self.to_close.clear();
    }
}

pub fn close(out: &mut BytesMut, name: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

fn parse_msg(out: &mut BytesMut, name: &str, text: &str, types: &[u32]) {
    out.put_u8(b'P');
    out.put_i32((4 + name.len() + 1 + text.len() + 1 + 2 + 4 * types.len()) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(text.as_bytes());
    out.put_u8(0);
    out.put_u16(types.len() as u16);
    for t in types {
        out.put_u32(*t);
    }
}

fn bind(out: &mut BytesMut, name: &str, values: &[String]) {
    let len = 4 + 1 + name.len() + 1 + 2 + 2 + values.iter().map(|v| 4 + v.len()).sum::<usize>() + 2;
    out.put_u8(b'B');
    out.put_i32(len as i32);
    out.put_u8(0);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    // Every parameter in text, every result column in text: what a simple
    // query gives.
    out.put_i16(0);
    out.put_u16(values.len() as u16);
    for v in values {
        out.put_i32(v.len() as i32);
        out.put_slice(v.as_bytes());
    }
    out.put_i16(0);
}
