//! Fuzz target `config`: see [`nearblock_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nearblock_fuzz::config::run(data));
