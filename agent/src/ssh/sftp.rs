//! `transfer = "read-only"` for SFTP: the client's requests are read one
//! packet at a time (uint32 length, type, request id, …) and anything that
//! would change the server — writes, opens for writing, removes, renames,
//! links, attribute changes, and extensions not known to be read-only — is
//! answered by cordon with SSH_FXP_STATUS "permission denied" instead of
//! being forwarded. Packets are bounded; a malformed one ends the channel.

/// Longest SFTP packet cordon reads (OpenSSH's own limit is 256 KiB).
const MAX_PACKET: usize = 256 * 1024;

const FXP_OPEN: u8 = 3;
const FXP_STATUS: u8 = 101;
const FXF_WRITE: u32 = 0x02;
const FXF_APPEND: u32 = 0x04;
const FXF_CREAT: u32 = 0x08;
const FXF_TRUNC: u32 = 0x10;
const FX_PERMISSION_DENIED: u32 = 3;

/// Requests that only read: init, open (checked), close, read, lstat, fstat,
/// opendir, readdir, realpath, stat, readlink.
const READ_ONLY: &[u8] = &[1, 3, 4, 5, 7, 8, 11, 12, 16, 17, 19];
const EXTENDED: u8 = 200;
const READ_ONLY_EXTENSIONS: &[&str] = &[
    "statvfs@openssh.com",
    "fstatvfs@openssh.com",
    "limits@openssh.com",
    "expand-path@openssh.com",
    "home-directory",
    "users-groups-by-id@openssh.com",
];

#[derive(Default)]
pub struct ReadOnly {
    buf: Vec<u8>,
    /// What was refused, for the audit.
    pub refused: Vec<String>,
}

/// What to do with the client's bytes.
#[derive(Default)]
pub struct Filtered {
    /// Forward upstream.
    pub forward: Vec<u8>,
    /// Answer the client directly.
    pub reply: Vec<u8>,
}

impl ReadOnly {
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Filtered, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Filtered::default();
        while let Some(len) = self.buf.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize) {
            if len == 0 || len > MAX_PACKET {
                return Err(format!("an SFTP packet of {len} bytes (at most {MAX_PACKET})"));
            }
            let Some(packet) = self.buf.get(..4 + len) else { break };
            let packet = packet.to_vec();
            self.buf.drain(..4 + len);
            match refusal(&packet) {
                None => out.forward.extend_from_slice(&packet),
                Some((id, what)) => {
                    self.refused.push(what.clone());
                    status(&mut out.reply, id, &format!("cordon: read-only: {what} is not allowed"));
                }
            }
        }
        Ok(out)
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// A string field at `at`: its bytes and where the next field starts.
fn string_at(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let n = u32_at(b, at)? as usize;
    Some((b.get(at + 4..at + 4 + n)?, at + 4 + n))
}

/// The request id and what is refused, or None to forward.
fn refusal(p: &[u8]) -> Option<(u32, String)> {
    let kind = *p.get(4)?;
    if kind == 1 {
        return None; // INIT carries a version, not an id.
    }
    let id = u32_at(p, 5).unwrap_or(0);
    let name = |k: u8| match k {
        6 => "write",
        9 | 10 => "setstat",
        13 => "remove",
        14 => "mkdir",
        15 => "rmdir",
        18 => "rename",
        20 => "symlink",
        _ => "request",
    };
    if kind == FXP_OPEN {
        let Some((path, next)) = string_at(p, 9) else { return Some((id, "a malformed open".into())) };
        let flags = u32_at(p, next).unwrap_or(u32::MAX);
        if flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC) != 0 {
            return Some((id, format!("opening {} for writing", String::from_utf8_lossy(path))));
        }
        return None;
    }
    if kind == EXTENDED {
        let ext = string_at(p, 9).map(|(s, _)| String::from_utf8_lossy(s).into_owned()).unwrap_or_default();
        if READ_ONLY_EXTENSIONS.contains(&ext.as_str()) {
            return None;
        }
        return Some((id, format!("the extension {ext}")));
    }
    if READ_ONLY.contains(&kind) {
        return None;
    }
    Some((id, name(kind).to_string()))
}

fn status(out: &mut Vec<u8>, id: u32, message: &str) {
    let mut body = vec![FXP_STATUS];
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&FX_PERMISSION_DENIED.to_be_bytes());
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message.as_bytes());
    body.extend_from_slice(&0u32.to_be_bytes()); // language tag
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, id: u32, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(rest);
        let mut p = (b.len() as u32).to_be_bytes().to_vec();
        p.extend(b);
        p
    }

    fn open(path: &str, flags: u32) -> Vec<u8> {
        let mut r = (path.len() as u32).to_be_bytes().to_vec();
        r.extend_from_slice(path.as_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        packet(FXP_OPEN, 7, &r)
    }

    #[test]
    fn reads_pass_and_writes_are_answered_here_even_split_byte_by_byte() {
        let mut f = ReadOnly::default();
        let mut input = open("/etc/hosts", 0x01);
        input.extend(open("/tmp/x", FXF_WRITE | FXF_CREAT));
        input.extend(packet(13, 9, b"\0\0\0\x01x"));
        input.extend(packet(5, 10, b"\0\0\0\x01h\0\0\0\0\0\0\0\0\0\0\x10\0"));
        let (mut fwd, mut reply) = (Vec::new(), Vec::new());
        for b in &input {
            let out = f.feed(std::slice::from_ref(b)).expect("feed");
            fwd.extend(out.forward);
            reply.extend(out.reply);
        }
        assert_eq!(f.refused.len(), 2, "{:?}", f.refused);
        assert!(fwd.starts_with(&open("/etc/hosts", 0x01)));
        assert_eq!(reply.get(4), Some(&FXP_STATUS));
        assert!(f.feed(&u32::MAX.to_be_bytes()).is_err(), "oversized packets end the channel");
    }
}
