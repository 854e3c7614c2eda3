//! The fuzz harnesses behind `fuzz_targets/` (each target is one call into this
//! crate), and the input formats they read, which `seeds/` writes.
//!
//! - [`pdu_stream`]: the iSCSI PDU decoder fed in chunks, digests and the segment
//!   limit changing between chunks.
//! - [`connection`]: the splicer's connection layer without I/O: both directions'
//!   bytes decoded and driven through a [`nearblock::splice::session::Session`].
//! - [`peer`]: the peer protocol's message, manifest and change decoders.
//! - [`config`]: the daemon, agent and indexer configuration parsers.
//! - [`http`]: the HTTP front end's request and response head parsers.
//!
//! Each harness asserts what must hold for any input (no panic, bounded work,
//! decoded values re-encode and decode to themselves); libFuzzer reports any
//! panic, timeout or allocation over `-rss_limit_mb` as a crash.

pub mod config;
pub mod connection;
pub mod http;
pub mod input;
pub mod pdu_stream;
pub mod peer;
