//! The peer protocol's decoders: every message kind ([`Msg::decode`]), image
//! manifests ([`Manifest::decode`]) and index changes ([`Change::decode`]), the
//! bytes a peer (agent, indexer, client) sends.
//!
//! Input: a selector byte, then the bytes to decode.
//! - [`SELECT_MESSAGE`]: a frame's body (postcard, the kind byte first, and the
//!   hand-encoded tail of a `Blocks` reply or a `Fragment`).
//! - [`SELECT_MANIFEST`]: a manifest encoding without its trailing CRC32C, which the
//!   harness appends (a peer computes it as easily; without it the fuzzer would
//!   stop at the checksum).
//! - [`SELECT_CHANGE`]: a change encoding.
//!
//! Asserted: what decodes re-encodes, and the encoding decodes to the same value
//! (messages: to the same bytes, since a message may carry a NaN load figure).

use bytes::Bytes;
use nearblock::index::{Change, Manifest};
use nearblock::peer::proto::{Msg, HEADER_LEN};
use nearblock::splice::pdu::crc32c;

pub const SELECT_MESSAGE: u8 = 0;
pub const SELECT_MANIFEST: u8 = 1;
pub const SELECT_CHANGE: u8 = 2;

pub fn run(data: &[u8]) {
    let Some((&select, rest)) = data.split_first() else {
        return;
    };
    match select % 3 {
        SELECT_MESSAGE => message(rest),
        SELECT_MANIFEST => manifest(rest),
        _ => change(rest),
    }
}

/// A body's offset in an encoded frame: after the 4-byte length and the header.
const BODY_AT: usize = 4 + HEADER_LEN;

fn message(body: &[u8]) {
    let Ok(msg) = Msg::decode(Bytes::copy_from_slice(body)) else {
        return;
    };
    let wire = msg.encode(0);
    let again = Msg::decode(wire.slice(BODY_AT..)).expect("an encoded message decodes");
    assert_eq!(
        again.encode(0),
        wire,
        "encode(decode(encode(m))) == encode(m)"
    );
}

fn manifest(body: &[u8]) {
    let mut encoded = body.to_vec();
    encoded.extend_from_slice(&crc32c(body).to_le_bytes());
    let Ok(manifest) = Manifest::decode(&encoded) else {
        return;
    };
    let again = Manifest::decode(&manifest.encode()).expect("an encoded manifest decodes");
    assert_eq!(again, manifest, "decode(encode(m)) == m");
}

fn change(data: &[u8]) {
    let Ok(change) = Change::decode(data) else {
        return;
    };
    let again = Change::decode(&change.encode()).expect("an encoded change decodes");
    assert_eq!(again, change, "decode(encode(c)) == c");
}
