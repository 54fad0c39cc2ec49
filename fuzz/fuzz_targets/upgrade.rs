//! Fuzz target: a request through the upgrade decision (`respond`) over a fixed route table (see `checks::upgrade`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::upgrade(data));
