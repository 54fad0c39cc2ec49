//! Fuzz target: a PROXY protocol header read by `proxy::read_header` (see `checks::proxy_header`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::proxy_header(data));
