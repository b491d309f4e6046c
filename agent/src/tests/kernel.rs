//! Unit tests for `kernel.rs`.
use super::*;

#[test]
fn tuple_normalises_v4_to_mapped() {
    let t = tuple_for("127.0.0.1:40000".parse().unwrap(), "127.0.0.1:7431".parse().unwrap());
    assert_eq!(&t.src_addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    assert_eq!(&t.src_addr[12..], &[127, 0, 0, 1]);
    assert_eq!((t.src_port, t.dst_port), (40000, 7431));
    let t6 = tuple_for("[::ffff:127.0.0.1]:40000".parse().unwrap(), "[::ffff:127.0.0.1]:7431".parse().unwrap());
    assert_eq!(t, t6);
}

#[test]
fn proxy_config_byte_orders() {
    let c = proxy_config("127.0.0.1:7431".parse().unwrap(), Some("[::1]:7431".parse().unwrap()), 7, 9);
    // user_ip4 holds network order: the first byte in memory is 127.
    assert_eq!(c.proxy_ip4.to_ne_bytes(), [127, 0, 0, 1]);
    assert_eq!(c.proxy_ip6[3].to_ne_bytes(), [0, 0, 0, 1]);
    assert_eq!(c.proxy_port, 7431);
}
