//! Fuzz target `connection`: see [`nearblock_fuzz::connection`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nearblock_fuzz::connection::run(data));
