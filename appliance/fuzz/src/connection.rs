//! The splicer's connection layer without I/O: what
//! `nearblock::splice::connection::splice_iscsi` does between its reads and writes,
//! driven by the fuzz input instead of two sockets.
//!
//! Input: a sequence of steps, each an `op` byte. Bits 0–1 say what happens:
//! - [`OP_INITIATOR`] / [`OP_TARGET`]: a u16 length and that many bytes arrive from
//!   that side; every whole PDU is decoded and handed to the
//!   [`Session`] (`from_initiator` / `from_target`);
//! - [`OP_FETCH_READY`] / [`OP_FETCH_FAILED`]: the oldest outstanding block fetch
//!   completes (`data_ready` with blocks of the length asked) or fails (`data_failed`).
//!
//! Bits 2–3 choose the [`Disposition`] of READs the session offers to serve in this
//! step (pass through, shadow, local, shadow) and bit 4 their LUN's block size (4096,
//! else 512). As in the real connection, the digests and receive limits change on the
//! session's events, a decode error or more than `MAX_TASKS` outstanding tasks close
//! the connection (the run ends), and every PDU the session builds is encoded with
//! the connection's digests — and must decode as one whole PDU.
//!
//! The login and text PDUs are also fed to a separate [`Negotiation`], to
//! [`edit_initiator_text`] and to the strict text parser, and the target's data
//! segments to the sense parser, which must not panic whatever the session made
//! of them. (This target and `pdu_decoder` replace the first target, `pdu_parse`.)

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use nearblock::splice::{
    connection::MAX_TASKS,
    login::{edit_initiator_text, Negotiation, OperationalParams, Side},
    pdu::{Digests, Opcode, PduDecoder, ReceivedPdu},
    scsi,
    session::{Disposition, Event, FetchRequest, Outgoing, Output, Session},
    text,
};

use crate::input::Input;

pub const OP_INITIATOR: u8 = 0;
pub const OP_TARGET: u8 = 1;
pub const OP_FETCH_READY: u8 = 2;
pub const OP_FETCH_FAILED: u8 = 3;
/// Bits 2–3: the disposition of READs offered in the step.
pub const OP_SHADOW: u8 = 1 << 2;
pub const OP_LOCAL: u8 = 2 << 2;
/// Bit 4: served LUNs have 4096-byte blocks (else 512).
pub const OP_BLOCK_4096: u8 = 1 << 4;

/// The receive limit the connection never goes below (its `MIN_SEGMENT_LIMIT`).
const MIN_SEGMENT_LIMIT: u32 = 256 * 1024;
/// The largest READ served locally here: the daemon's default
/// `max_served_read_bytes` is 16 MiB; 1 MiB keeps each run fast and still spans
/// many Data-In PDUs at any negotiated segment length.
const MAX_SERVED_READ_BYTES: u64 = 1 << 20;
/// The LUN's capacity in blocks, for the servable check.
const CAPACITY_BLOCKS: u64 = 1 << 32;

static BLOCK: [u8; 4096] = [0x5a; 4096];

/// The connection was closed (decode error, too many tasks, unencodable PDU).
struct Closed;

struct Connection {
    session: Session,
    from_initiator: PduDecoder,
    from_target: PduDecoder,
    digests: Digests,
    initiator_bytes: BytesMut,
    target_bytes: BytesMut,
    /// Outstanding fetches, oldest first, with the bytes each must deliver.
    fetches: VecDeque<(FetchRequest, usize)>,
    /// Text parsing checked on its own, beside the session's.
    negotiation: Negotiation,
    /// The initiator's last login PDU had the C bit (its text continues).
    initiator_text_continues: bool,
    reached: Reached,
}

/// How far a run got (the seeds are checked to reach serving).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reached {
    pub full_feature: bool,
    /// READs the session served locally (fetches it asked for).
    pub fetches: usize,
}

pub fn run(data: &[u8]) {
    run_and_report(data);
}

pub fn run_and_report(data: &[u8]) -> Reached {
    let mut input = Input::new(data);
    let mut conn = Connection {
        session: Session::new(),
        from_initiator: PduDecoder::default(),
        from_target: PduDecoder::default(),
        digests: Digests::NONE,
        initiator_bytes: BytesMut::new(),
        target_bytes: BytesMut::new(),
        fetches: VecDeque::new(),
        negotiation: Negotiation::default(),
        initiator_text_continues: false,
        reached: Reached::default(),
    };
    while let Some(op) = input.byte() {
        let step = match op & 0x03 {
            OP_INITIATOR | OP_TARGET => {
                let len = usize::from(input.u16());
                conn.receive(op, input.take(len))
            }
            OP_FETCH_READY => conn.fetch_done(true),
            _ => conn.fetch_done(false),
        };
        if step.is_err() {
            break;
        }
    }
    conn.reached
}

fn disposition(op: u8) -> Disposition {
    match (op >> 2) & 0x03 {
        0 => Disposition::PassThrough,
        2 => Disposition::Local,
        _ => Disposition::Shadow,
    }
}

fn block_size(op: u8) -> u32 {
    if op & OP_BLOCK_4096 != 0 {
        4096
    } else {
        512
    }
}

impl Connection {
    /// Bytes from one side: decode and handle every whole PDU.
    fn receive(&mut self, op: u8, bytes: &[u8]) -> Result<(), Closed> {
        let from_target = op & 0x03 == OP_TARGET;
        if from_target {
            self.target_bytes.extend_from_slice(bytes);
        } else {
            self.initiator_bytes.extend_from_slice(bytes);
        }
        loop {
            let decoded = if from_target {
                self.from_target.decode(&mut self.target_bytes)
            } else {
                self.from_initiator.decode(&mut self.initiator_bytes)
            };
            let Some(received) = decoded.map_err(|_| Closed)? else {
                return Ok(());
            };
            if from_target {
                self.on_target(received)?;
            } else {
                self.on_initiator(received, op)?;
            }
        }
    }

    fn on_initiator(&mut self, received: ReceivedPdu, op: u8) -> Result<(), Closed> {
        let bhs = received.pdu.bhs;
        if bhs.opcode() == Opcode::ScsiCommand && self.session.outstanding_tasks() >= MAX_TASKS {
            return Err(Closed);
        }
        self.check_text(Side::Initiator, &received);
        let block_size = block_size(op);
        let mut chosen = Disposition::PassThrough;
        if let Some(read) = self.session.read_candidate(&bhs) {
            if read.servable(CAPACITY_BLOCKS) && read.byte_len(block_size) <= MAX_SERVED_READ_BYTES
            {
                chosen = disposition(op);
            }
        }
        let out = self.session.on_initiator_pdu(received, chosen);
        self.carry(out, block_size)
    }

    fn on_target(&mut self, received: ReceivedPdu) -> Result<(), Closed> {
        self.check_text(Side::Target, &received);
        let _ = scsi::sense_from_response_segment(&received.pdu.data);
        let out = self.session.on_target_pdu(received);
        // Fetches are only asked for on initiator READs; the size is irrelevant here.
        self.carry(out, 512)
    }

    /// The oldest outstanding fetch completes (with blocks of the length it asked
    /// for) or fails.
    fn fetch_done(&mut self, ok: bool) -> Result<(), Closed> {
        let Some((fetch, bytes)) = self.fetches.pop_front() else {
            return Ok(());
        };
        let out = if ok {
            let blocks = fetch.read.blocks as usize;
            let block = bytes / blocks.max(1);
            let data = (0..blocks)
                .map(|_| Bytes::from_static(&BLOCK[..block]))
                .collect();
            self.session.data_ready(fetch.itt, data)
        } else {
            self.session.data_failed(fetch.itt)
        };
        self.carry(out, 512)
    }

    /// What the connection does with an [`Output`]: events first (digests and limits),
    /// then the PDUs in order, then cancels and new fetches.
    fn carry(&mut self, out: Output, block_size: u32) -> Result<(), Closed> {
        for event in &out.events {
            match event {
                Event::FullFeature(params) => {
                    self.reached.full_feature = true;
                    self.digests = params.digests();
                    self.from_initiator.set_digests(self.digests);
                    self.from_target.set_digests(self.digests);
                    self.set_limits(params);
                }
                Event::ParamsChanged(params) => self.set_limits(params),
                Event::MediumMayChange { .. } | Event::LoginEnded(_) | Event::LoggedOut => {}
            }
        }
        for item in out.to_target.into_iter().chain(out.to_initiator) {
            self.write(item)?;
        }
        for itt in out.cancel {
            self.fetches.retain(|(fetch, _)| fetch.itt != itt);
        }
        for fetch in out.fetch {
            self.reached.fetches += 1;
            let bytes = fetch.read.byte_len(block_size) as usize;
            self.fetches.push_back((fetch, bytes));
        }
        Ok(())
    }

    fn set_limits(&mut self, params: &OperationalParams) {
        self.from_initiator.set_max_data_segment_length(
            params
                .target_max_recv_data_segment_length
                .max(MIN_SEGMENT_LIMIT),
        );
        self.from_target.set_max_data_segment_length(
            params
                .initiator_max_recv_data_segment_length
                .max(MIN_SEGMENT_LIMIT),
        );
    }

    /// Encode as the writer would; a PDU the session built must frame as exactly
    /// one PDU that decodes with the connection's digests.
    fn write(&mut self, item: Outgoing) -> Result<(), Closed> {
        let built = matches!(item, Outgoing::Pdu(_));
        let frame = item.into_wire_chain(self.digests).map_err(|_| Closed)?;
        if built {
            let mut bytes = BytesMut::from(&frame.to_bytes()[..]);
            let decoded = PduDecoder::new(self.digests)
                .decode(&mut bytes)
                .expect("a PDU the session built decodes");
            assert!(decoded.is_some(), "a PDU the session built is whole");
            assert!(
                bytes.is_empty(),
                "a PDU the session built frames as one PDU"
            );
        }
        Ok(())
    }

    /// Login and text data through the text parsers on their own.
    fn check_text(&mut self, side: Side, received: &ReceivedPdu) {
        let pdu = &received.pdu;
        let opcode = pdu.bhs.opcode();
        if !matches!(
            opcode,
            Opcode::LoginRequest
                | Opcode::LoginResponse
                | Opcode::TextRequest
                | Opcode::TextResponse
        ) {
            return;
        }
        self.negotiation.observe(side, &pdu.bhs, &pdu.data);
        let _ = self.negotiation.operational();
        let _ = text::strict_pairs(&pdu.data);
        if side == Side::Initiator && opcode == Opcode::LoginRequest {
            let _ = edit_initiator_text(&pdu.data, self.initiator_text_continues);
            self.initiator_text_continues = pdu.bhs.text_continue();
        }
    }
}
