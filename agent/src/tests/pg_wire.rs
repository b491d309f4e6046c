//! Unit tests for `postgres/wire.rs`.
use super::*;

#[test]
fn tags() {
    assert_eq!(tag_rows("SELECT 3"), Some(3));
    assert_eq!(tag_rows("INSERT 0 5"), Some(5));
    assert_eq!(tag_rows("CREATE TABLE"), None);
    assert_eq!(tag_rows(""), None);
}

#[test]
fn error_round_trip() {
    let mut buf = BytesMut::new();
    error(&mut buf, "FATAL", "08P01", "bad message");
    assert_eq!(buf[0], b'E');
    let e = server_error(&buf[5..]);
    assert_eq!((e.severity.as_str(), e.code.as_str(), e.message.as_str()), ("FATAL", "08P01", "bad message"));
}

#[test]
fn rows_and_columns_tolerate_truncation() {
    // Two columns declared, one present.
    let body = [0u8, 2, 0, 0, 0, 2, b'h', b'i'];
    assert_eq!(data_row(&body), vec![Some("hi".to_string())]);
    let body = [0u8, 1, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(data_row(&body), vec![None]);
    assert!(row_description(&[0, 5, b'a']).is_empty());
    assert_eq!(data_row(&[0x80, 0]), Vec::<Option<String>>::new());
}

#[test]
fn cancel_request_layout() {
    let mut b = BytesMut::new();
    cancel_request(&mut b, 7, &[1, 2, 3, 4]);
    assert_eq!(&b[..], &[0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 1, 2, 3, 4]);
}
