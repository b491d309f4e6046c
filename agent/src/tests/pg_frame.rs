//! Unit tests for `postgres/frame.rs`.
use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn frames_split_across_reads_and_batched() {
    let mut r = FrameReader::new(1 << 20);
    let mut wire = msg(b'Q', b"select 1\0");
    wire.extend(msg(b'S', b""));
    let (a, b) = wire.split_at(7);
    r.buf.extend_from_slice(a);
    assert_eq!(r.next_frame().unwrap(), None);
    r.buf.extend_from_slice(b);
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!((f.tag, f.body()), (b'Q', &b"select 1\0"[..]));
    assert_eq!(r.next_frame().unwrap().unwrap().tag, b'S');
    assert_eq!(r.next_frame().unwrap(), None);
}

#[test]
fn bad_and_oversized_lengths_are_errors() {
    let mut r = FrameReader::new(100);
    r.buf.extend_from_slice(&[b'Q', 0, 0, 0, 2]);
    assert!(matches!(r.next_frame(), Err(FrameError::BadLength { .. })));
    let mut r = FrameReader::new(100);
    r.buf.extend_from_slice(&[b'Q', 0x7f, 0, 0, 0]);
    assert!(matches!(r.next_frame(), Err(FrameError::Oversized { .. })));
    let mut r = FrameReader::new(100);
    r.buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert!(r.next_startup().is_err());
}

#[test]
fn body_reader_never_panics() {
    let mut b = Body::new(b"ab\0\x00\x01");
    assert_eq!(b.cstr(), Some(&b"ab"[..]));
    assert_eq!(b.i16(), Some(1));
    assert_eq!(b.i32(), None);
    assert_eq!(b.cstr(), None);
    let mut e = Body::new(b"");
    assert_eq!((e.u8(), e.i32(), e.bytes(3)), (None, None, None));
}

#[test]
fn complete_messages_are_read_in_place_then_consumed() {
    let mut r = FrameReader::new(100);
    let mut wire = msg(b'T', b"\0\0");
    wire.extend(msg(b'D', b"\0\x01\0\0\0\x01x"));
    wire.extend(msg(b'C', b"SELECT 1\0"));
    let whole = wire.len();
    // Half of a fourth message: not counted, and room is made for the rest.
    wire.extend(&msg(b'Z', &[b'I'; 40])[..9]);
    r.buf.extend_from_slice(&wire);
    let (n, err) = r.complete();
    assert_eq!((n, err), (whole, None));
    assert!(r.buf.capacity() - r.buf.len() >= 36, "room for the rest of Z");
    let seen: Vec<(u8, usize)> = frames(r.peek(n)).map(|f| (f.tag, f.body().len())).collect();
    assert_eq!(seen, [(b'T', 2), (b'D', 7), (b'C', 9)]);
    r.consume(n);
    assert_eq!(r.buffered(), 9);
    r.buf.extend_from_slice(&[b'I'; 36]);
    assert_eq!(r.complete().0, 45);
    // A broken message stops the count after the good ones before it.
    let mut r = FrameReader::new(100);
    r.buf.extend_from_slice(&msg(b'S', b""));
    r.buf.extend_from_slice(&[b'D', 0, 0, 0, 1]);
    assert!(matches!(r.complete(), (5, Some(FrameError::BadLength { .. }))));
    let mut r = FrameReader::new(100);
    r.buf.extend_from_slice(&msg(b'S', b""));
    r.buf.extend_from_slice(&msg(b'D', &[0; 200]));
    assert!(matches!(r.complete(), (5, Some(FrameError::Oversized { len: 204, .. }))));
}
