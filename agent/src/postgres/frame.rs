//! Cancel-safe, zero-copy framing of PostgreSQL messages.
//!
//! Bytes are read into one `BytesMut` per direction with `read_buf` (many
//! messages per syscall, and cancel-safe: a dropped read loses nothing).
//! Complete messages are split off as `Bytes` without copying; nothing is
//! decoded until a handler asks. Every length is checked against a bound
//! before any of the body is buffered.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest startup-phase packet accepted (libpq's own limit is 10 000).
pub const MAX_STARTUP: usize = 10_000;
/// Read buffer size hint: large enough to batch a pgbench round trip or a
/// run of DataRows per syscall.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message {tag:?} declares length {len}, more than the {max}-byte limit")]
    Oversized { tag: char, len: usize, max: usize },
    #[error("message {tag:?} declares impossible length {len}")]
    BadLength { tag: char, len: i64 },
}

/// One message: `tag`, and the whole message (tag and length included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        self.bytes.get(5..).unwrap_or_default()
    }
}

/// One message seen where it lies (see [`FrameReader::complete`]): `tag`,
/// and the whole message (tag and length included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub tag: u8,
    pub bytes: &'a [u8],
}

impl FrameRef<'_> {
    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        self.bytes.get(5..).unwrap_or_default()
    }
}

/// The messages of `batch`: complete messages, as
/// [`FrameReader::complete`] measured them.
pub fn frames(batch: &[u8]) -> impl Iterator<Item = FrameRef<'_>> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        let (tag, total) = header(rest.get(..5)?.try_into().ok()?).ok()?;
        let bytes = rest.get(..total)?;
        rest = rest.get(total..)?;
        Some(FrameRef { tag, bytes })
    })
}

/// A message's tag and whole length (tag included) from its five header
/// bytes, bounded by nothing but the protocol (`FrameReader` bounds it).
fn header([tag, a, b, c, d]: [u8; 5]) -> Result<(u8, usize), FrameError> {
    let len = i32::from_be_bytes([a, b, c, d]);
    if len < 4 {
        return Err(FrameError::BadLength { tag: tag as char, len: i64::from(len) });
    }
    Ok((tag, len as usize + 1))
}

pub struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        Self { buf: BytesMut::with_capacity(READ_CHUNK), max }
    }

    /// Append bytes as if read (benchmarks and tests).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes read but not yet framed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Read more; 0 means EOF.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        r.read_buf(&mut self.buf).await
    }

    /// The next complete tagged message, if buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match self.measure(0)? {
            Some((tag, total)) => Ok(Some(Frame { tag, bytes: self.buf.split_to(total).freeze() })),
            None => Ok(None),
        }
    }

    /// The message starting `at` bytes into the buffer, if it is buffered
    /// whole: its tag and length; if it is not, room is made for the rest.
    fn measure(&mut self, at: usize) -> Result<Option<(u8, usize)>, FrameError> {
        let Some(h) = self.buf.get(at..at + 5).and_then(|h| <[u8; 5]>::try_from(h).ok()) else { return Ok(None) };
        let (tag, total) = header(h)?;
        if total - 1 > self.max {
            return Err(FrameError::Oversized { tag: tag as char, len: total - 1, max: self.max });
        }
        let have = self.buf.len() - at;
        if have < total {
            self.buf.reserve(total - have);
            return Ok(None);
        }
        Ok(Some((tag, total)))
    }

    /// The complete messages buffered, read where they lie: how many bytes
    /// they take, and the framing error after them, if any. The caller walks
    /// them with [`frames`] over [`FrameReader::peek`], then drops them with
    /// [`FrameReader::consume`]: a streamed result is framed with no `Bytes`
    /// (no reference count to take and drop) per row.
    pub fn complete(&mut self) -> (usize, Option<FrameError>) {
        let mut at = 0;
        loop {
            match self.measure(at) {
                Ok(Some((_, total))) => at += total,
                Ok(None) => return (at, None),
                Err(e) => return (at, Some(e)),
            }
        }
    }

    /// The first `n` bytes buffered (after [`FrameReader::complete`]).
    pub fn peek(&self, n: usize) -> &[u8] {
        self.buf.get(..n).unwrap_or_default()
    }

    /// Drop the first `n` bytes buffered: messages handled in place.
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }

    /// The next startup-phase packet (length-prefixed, no tag), if buffered.
    pub fn next_startup(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(header) = self.buf.get(..4) else { return Ok(None) };
        let len = i32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if len < 8 {
            return Err(FrameError::BadLength { tag: '\0', len: i64::from(len) });
        }
        let len = len as usize;
        if len > MAX_STARTUP {
            return Err(FrameError::Oversized { tag: '\0', len, max: MAX_STARTUP });
        }
        if self.buf.len() < len {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Take whatever is buffered (used where the protocol forbids it, to
    /// report it).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// A reader over a message body: bounds-checked, never panics.
pub struct Body<'a> {
    b: &'a [u8],
}

impl<'a> Body<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    pub fn remaining(&self) -> usize {
        self.b.len()
    }

    pub fn i32(&mut self) -> Option<i32> {
        let v = self.b.get(..4)?;
        let r = i32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        self.b.advance(4);
        Some(r)
    }

    pub fn i16(&mut self) -> Option<i16> {
        let v = self.b.get(..2)?;
        let r = i16::from_be_bytes([v[0], v[1]]);
        self.b.advance(2);
        Some(r)
    }

    pub fn u8(&mut self) -> Option<u8> {
        let v = *self.b.first()?;
        self.b.advance(1);
        Some(v)
    }

    /// A NUL-terminated string (bytes, without the NUL).
    pub fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.b.iter().position(|c| *c == 0)?;
        let s = self.b.get(..end)?;
        self.b = self.b.get(end + 1..)?;
        Some(s)
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(..n)?;
        self.b = self.b.get(n..)?;
        Some(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

#[cfg(test)]
#[path = "../tests/pg_frame.rs"]
mod tests;
