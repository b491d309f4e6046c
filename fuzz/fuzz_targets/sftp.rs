#![no_main]
//! See agent/src/fuzz.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| cordon::fuzz::sftp(data));
