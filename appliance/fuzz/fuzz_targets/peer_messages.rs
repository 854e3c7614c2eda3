//! Fuzz target `peer_messages`: see [`nearblock_fuzz::peer`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nearblock_fuzz::peer::run(data));
