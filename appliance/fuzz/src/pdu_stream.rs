//! The PDU decoder ([`PduDecoder`]) on an adversarial byte stream.
//!
//! Input: a sequence of steps, each `op` (bit 0: header digest on, bit 1: data digest
//! on, bit 2: a new data segment limit follows), then if bit 2 a u16 limit in units
//! of 256 bytes, then a u16 length and that many bytes appended to the receive buffer.
//! After each step every whole PDU is decoded. A decode error means the stream can
//! no longer be trusted (the connection closes): the buffer is dropped and decoding
//! starts over on the bytes that follow, with the current settings.
//!
//! Asserted for every decoded PDU: its AHS and data match the lengths in its BHS; it
//! re-encodes with the same digests; the encoding decodes to the same PDU; and when
//! the received padding was zero, the encoding is byte for byte what was received.

use bytes::BytesMut;
use nearblock::splice::pdu::{padding_len, Digests, PduDecoder, ReceivedPdu, BHS_LEN, DIGEST_LEN};

use crate::input::Input;

pub const OP_HEADER_DIGEST: u8 = 0x01;
pub const OP_DATA_DIGEST: u8 = 0x02;
pub const OP_SET_LIMIT: u8 = 0x04;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut decoder = PduDecoder::default();
    let mut buf = BytesMut::new();
    while let Some(op) = input.byte() {
        decoder.set_digests(Digests {
            header: op & OP_HEADER_DIGEST != 0,
            data: op & OP_DATA_DIGEST != 0,
        });
        if op & OP_SET_LIMIT != 0 {
            decoder.set_max_data_segment_length(u32::from(input.u16()) << 8);
        }
        let len = usize::from(input.u16());
        buf.extend_from_slice(input.take(len));
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(received)) => check_round_trip(&received, decoder.digests()),
                Ok(None) => break,
                Err(_) => {
                    buf.clear();
                    break;
                }
            }
        }
    }
}

/// What must hold for any PDU the decoder accepted with `digests`.
pub fn check_round_trip(received: &ReceivedPdu, digests: Digests) {
    let pdu = &received.pdu;
    assert_eq!(pdu.ahs.len(), pdu.bhs.total_ahs_len(), "AHS length");
    assert_eq!(
        pdu.data.len(),
        pdu.bhs.data_segment_length() as usize,
        "data segment length"
    );
    let encoded = pdu
        .encode(digests)
        .expect("a decoded PDU re-encodes")
        .to_bytes();
    let mut again = BytesMut::from(&encoded[..]);
    let back = PduDecoder::new(digests)
        .decode(&mut again)
        .expect("a re-encoded PDU decodes")
        .expect("a re-encoded PDU is whole");
    assert!(again.is_empty(), "one PDU re-encodes as one PDU");
    assert_eq!(back.pdu, *pdu, "decode(encode(pdu)) == pdu");

    let header_len = BHS_LEN + pdu.ahs.len() + if digests.header { DIGEST_LEN } else { 0 };
    let data_end = header_len + pdu.data.len();
    let padding = &received.wire[data_end..data_end + padding_len(pdu.data.len())];
    if padding.iter().all(|&b| b == 0) {
        assert_eq!(
            encoded, received.wire,
            "re-encoding reproduces the wire bytes"
        );
    }
}
