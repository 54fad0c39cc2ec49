//! Fuzz target: a request head read by `read_request` (see `checks::request_head`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::request_head(data));
