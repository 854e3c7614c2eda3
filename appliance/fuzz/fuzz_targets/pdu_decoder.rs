//! Fuzz target `pdu_decoder`: see [`nearblock_fuzz::pdu_stream`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nearblock_fuzz::pdu_stream::run(data));
