//! Fuzz target `http_messages`: see [`nearblock_fuzz::http`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nearblock_fuzz::http::run(data));
