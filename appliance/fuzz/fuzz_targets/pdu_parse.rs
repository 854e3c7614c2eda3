//! Fuzz the PDU decoder (splice::pdu) with arbitrary bytes under every digest setting,
//! and everything the splicer reads out of a decoded PDU: BHS accessors, SCSI CDB and
//! sense parsing, login text, and the session state machine in both directions.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nearblock::splice::login::edit_initiator_text;
use nearblock::splice::pdu::{Digests, PduDecoder};
use nearblock::splice::scsi;
use nearblock::splice::session::{Disposition, Session};

fuzz_target!(|input: &[u8]| {
    let Some((&selector, bytes)) = input.split_first() else {
        return;
    };
    let digests = Digests {
        header: selector & 1 != 0,
        data: selector & 2 != 0,
    };
    let mut decoder = PduDecoder::new(digests);
    if selector & 4 != 0 {
        decoder.set_max_data_segment_length(8192);
    }
    let mut session = Session::new();
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(received)) = decoder.decode(&mut buf) {
        let bhs = received.pdu.bhs;
        let _ = scsi::parse_read(bhs.cdb());
        let _ = scsi::sense_from_response_segment(&received.pdu.data);
        let _ = edit_initiator_text(&received.pdu.data, selector & 8 != 0);
        let out = if bhs.opcode().is_initiator() {
            let disposition = if session.read_candidate(&bhs).is_some() {
                if selector & 16 != 0 {
                    Disposition::Local
                } else {
                    Disposition::Shadow
                }
            } else {
                Disposition::PassThrough
            };
            session.from_initiator(received, disposition)
        } else {
            session.from_target(received)
        };
        for fetch in out.fetch {
            let len = (fetch.read.blocks as usize).min(64) * 512;
            let _ = session.data_ready(fetch.itt, vec![bytes::Bytes::from(vec![0; len])]);
        }
        for item in out.to_initiator.into_iter().chain(out.to_target) {
            let _ = item.into_frame(session.digests());
        }
    }
});
