//! Messages cordon creates (encoded with pgwire) and the few it reads
//! (decoded lazily, by hand, from the forwarded bytes).

use bytes::{BufMut, BytesMut};
use pgwire::messages::{
    response::ErrorResponse,
    startup::{Authentication, BackendKeyData, Password, SASLInitialResponse, SASLResponse, SecretKey, Startup},
    Message,
};

use super::frame::Body;
use crate::pipeline::ServerError;

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// cordon's own SQLSTATEs (class "CD", outside PostgreSQL's classes), so a
/// client can tell an agent condition from a server error.
pub mod code {
    /// The audit log cannot be written: sessions and statements are refused.
    pub const AUDIT_UNAVAILABLE: &str = "CD001";
    /// An agent limit was reached (message size, connections, timeouts).
    pub const LIMIT: &str = "CD002";
    /// A policy rule refused the statement (PostgreSQL's
    /// insufficient_privilege, which clients already handle).
    pub const POLICY: &str = "42501";
    /// A statement is held for approval (a WARNING notice).
    pub const HELD: &str = "CD003";
    /// query_canceled: the workload cancelled a held statement.
    pub const CANCELLED: &str = "57014";
}

/// The SQLSTATE for a refusal.
pub fn sqlstate(kind: crate::pipeline::DenyKind) -> &'static str {
    match kind {
        crate::pipeline::DenyKind::Policy => code::POLICY,
        crate::pipeline::DenyKind::AuditUnavailable => code::AUDIT_UNAVAILABLE,
        crate::pipeline::DenyKind::Limit => code::LIMIT,
        crate::pipeline::DenyKind::Cancelled => code::CANCELLED,
    }
}

/// An ErrorResponse for the client: severity, SQLSTATE, message.
pub fn error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let e = ErrorResponse::new(vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ]);
    encode(buf, &e);
}

fn encode<M: Message>(buf: &mut BytesMut, m: &M) {
    if let Err(e) = m.encode(buf) {
        // Only oversize messages fail to encode; ours are small.
        tracing::error!("encoding a protocol message failed: {e}");
    }
}

pub fn startup(buf: &mut BytesMut, version: i32, params: &[(String, String)]) {
    let mut s = Startup::new();
    s.protocol_number_major = (version >> 16) as u16;
    s.protocol_number_minor = (version & 0xffff) as u16;
    s.parameters = params.iter().cloned().collect();
    encode(buf, &s);
}

pub fn password(buf: &mut BytesMut, password: String) {
    encode(buf, &Password::new(password));
}

pub fn sasl_initial(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    encode(buf, &SASLInitialResponse::new(mechanism.to_string(), Some(bytes::Bytes::copy_from_slice(data))));
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    encode(buf, &SASLResponse::new(bytes::Bytes::copy_from_slice(data)));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: Vec<String>) {
    encode(buf, &Authentication::SASL(mechanisms));
}

pub fn backend_key(buf: &mut BytesMut, pid: i32, key: &[u8]) {
    let secret_key = match <[u8; 4]>::try_from(key) {
        Ok(k) => SecretKey::I32(i32::from_be_bytes(k)),
        Err(_) => SecretKey::Bytes(bytes::Bytes::copy_from_slice(key)),
    };
    encode(buf, &BackendKeyData::new(pid, secret_key));
}

pub fn cancel_request(buf: &mut BytesMut, pid: i32, key: &[u8]) {
    buf.put_i32(12 + key.len() as i32);
    buf.put_i32(CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_slice(key);
}

/// Fields of an ErrorResponse or NoticeResponse body.
pub fn server_error(body: &[u8]) -> ServerError {
    let mut b = Body::new(body);
    let mut e = ServerError { severity: String::new(), code: String::new(), message: String::new() };
    while let Some(t) = b.u8() {
        if t == 0 {
            break;
        }
        let Some(v) = b.cstr() else { break };
        let v = String::from_utf8_lossy(v).into_owned();
        match t {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            _ => {}
        }
    }
    e
}

/// Column names of a RowDescription body.
pub fn row_description(body: &[u8]) -> Vec<String> {
    let mut b = Body::new(body);
    let n = b.i16().unwrap_or(0).max(0) as usize;
    let mut names = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let Some(name) = b.cstr() else { break };
        names.push(String::from_utf8_lossy(name).into_owned());
        if b.bytes(18).is_none() {
            break;
        }
    }
    names
}

/// Values of a DataRow body as the client would print them: text as is,
/// anything that is not UTF-8 (binary format) as `\x` hex.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut b = Body::new(body);
    let n = b.i16().unwrap_or(0).max(0) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let Some(len) = b.i32() else { break };
        if len < 0 {
            out.push(None);
            continue;
        }
        let Some(v) = b.bytes(len as usize) else { break };
        out.push(Some(match std::str::from_utf8(v) {
            Ok(s) => s.to_string(),
            Err(_) => format!("\\x{}", hex::encode(v)),
        }));
    }
    out
}

/// Rows affected or returned, from a CommandComplete tag ("SELECT 3",
/// "INSERT 0 5", "COPY 10").
pub fn tag_rows(tag: &str) -> Option<u64> {
    let last = tag.rsplit(' ').next()?;
    let verb = tag.split(' ').next()?;
    matches!(verb, "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE")
        .then(|| last.parse().ok())
        .flatten()
}

#[cfg(test)]
#[path = "../tests/pg_wire.rs"]
mod tests;

/// A NoticeResponse with these fields (severity, code, message, detail,
/// hint…), each a (field type, value) pair.
pub fn notice_with(buf: &mut BytesMut, fields: &[(u8, &str)]) {
    let mut body = BytesMut::new();
    for (t, v) in fields {
        body.put_u8(*t);
        // A NUL inside a value would end the field early.
        body.put_slice(v.replace('\0', " ").as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    buf.put_u8(b'N');
    buf.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    buf.put_slice(&body);
}
