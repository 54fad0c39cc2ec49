//! Fuzz target: a client's WebSocket byte stream through the frame `Decoder` (see `checks::frames`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frames(data));
