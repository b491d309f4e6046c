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
