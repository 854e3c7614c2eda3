//! Locally sourced answers to a READ (RFC 7143 §11.7, §11.4, §13.12–13.14): the Data-In
//! PDU sequence and the status that ends it.
//!
//! This module owns segmentation and status placement only. The sequence numbers it
//! stamps come from the caller: in the shadow design the target's SCSI Response to the
//! zero-length shadow command ([`StatusCounters::from_target_response`]); in the local
//! design the session's own initiator-side counters. Data is never copied: each PDU's
//! data segment is a list of slices of the caller's buffers.

use super::pdu::{data_in_flags, Bhs, Opcode, OutgoingPdu, Residual, RESERVED_TAG};
use super::scsi::{self, Sense};
use bytes::Bytes;

/// The initiator's limits on what it receives (§13.12, §13.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInLimits {
    /// MaxRecvDataSegmentLength the *initiator* declared: the largest data segment of a
    /// PDU sent to it.
    pub max_recv_data_segment_length: u32,
    /// MaxBurstLength negotiated for the session: the largest Data-In sequence (ended by
    /// F) before the next one starts.
    pub max_burst_length: u32,
}

/// The target-side sequence numbers a status-bearing PDU carries toward the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    not(feature = "testing"),
    expect(
        clippy::struct_field_names,
        reason = "the RFC 7143 fields: StatSN, ExpCmdSN, MaxCmdSN"
    )
)]
pub struct StatusCounters {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl StatusCounters {
    /// The numbers of a target PDU: in the shadow design, the target's response to the
    /// shadow command, whose StatSN the local status takes over.
    pub fn from_target_response(bhs: &Bhs) -> StatusCounters {
        StatusCounters {
            stat_sn: bhs.stat_sn(),
            exp_cmd_sn: bhs.exp_cmd_sn(),
            max_cmd_sn: bhs.max_cmd_sn(),
        }
    }

    fn stamp(&self, bhs: &mut Bhs) {
        bhs.set_stat_sn(self.stat_sn);
        self.stamp_window(bhs);
    }

    /// ExpCmdSN / MaxCmdSN are carried by every Data-In, status or not (§11.7.6).
    fn stamp_window(&self, bhs: &mut Bhs) {
        bhs.set_exp_cmd_sn(self.exp_cmd_sn);
        bhs.set_max_cmd_sn(self.max_cmd_sn);
    }
}

/// The command being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadTask {
    pub itt: u32,
    pub lun: u64,
    /// Expected Data Transfer Length from the SCSI Command.
    pub edtl: u32,
}

/// The residual for a command that needed `needed` bytes with `edtl` expected (§11.4.5.1).
pub fn residual(edtl: u32, needed: u64) -> Residual {
    let edtl = u64::from(edtl);
    match needed.cmp(&edtl) {
        std::cmp::Ordering::Greater => {
            Residual::Overflow(u32::try_from(needed - edtl).unwrap_or(u32::MAX))
        }
        std::cmp::Ordering::Less => Residual::Underflow((edtl - needed) as u32),
        std::cmp::Ordering::Equal => Residual::None,
    }
}

/// The full answer to a READ whose requested blocks are `data` (the concatenation of the
/// buffers, exactly blocks × block size bytes): min(EDTL, data) bytes as Data-In PDUs
/// with GOOD status on the last (S, StatSN, residual O/U), or — when nothing is to be
/// transferred (EDTL 0 or 0 blocks) — a single SCSI Response (fact sheet: "EDTL 0 →
/// SCSI Response only"). Either way the answer consumes exactly one StatSN:
/// `counters.stat_sn`.
///
/// Segmentation (§11.7.1, §13.13): DataSN counts from 0, BufferOffset is contiguous, no
/// PDU exceeds the initiator's MaxRecvDataSegmentLength, no PDU straddles a
/// MaxBurstLength boundary, and F ends each burst and the last PDU.
pub fn read_answer(
    task: &ReadTask,
    data: &[Bytes],
    limits: DataInLimits,
    counters: StatusCounters,
) -> Vec<OutgoingPdu> {
    let needed: u64 = data.iter().map(|piece| piece.len() as u64).sum();
    let to_send = needed.min(u64::from(task.edtl)) as u32;
    let residual = residual(task.edtl, needed);
    if to_send == 0 {
        return vec![scsi_response(
            task,
            scsi::status::GOOD,
            None,
            residual,
            counters,
            0,
        )];
    }

    let max_segment = limits.max_recv_data_segment_length.max(1);
    let max_burst = limits.max_burst_length.max(1);
    let mut cursor = PieceCursor::new(data);
    let mut pdus = Vec::new();
    let mut offset = 0u32;
    while offset < to_send {
        let burst_left = max_burst - offset % max_burst;
        let len = (to_send - offset).min(max_segment).min(burst_left);
        let last = offset + len == to_send;
        let mut bhs = Bhs::new(Opcode::DataIn);
        bhs.set_itt(task.itt);
        bhs.set_ttt(RESERVED_TAG);
        bhs.set_data_sn(pdus.len() as u32);
        bhs.set_buffer_offset(offset);
        bhs.set_final_bit(last || len == burst_left);
        counters.stamp_window(&mut bhs);
        if last {
            bhs.set_flags(bhs.flags() | data_in_flags::STATUS);
            bhs.set_status(scsi::status::GOOD);
            bhs.set_residual(residual);
            counters.stamp(&mut bhs);
        }
        pdus.push(OutgoingPdu::new(bhs, cursor.take(len as usize)));
        offset += len;
    }
    pdus
}

/// A SCSI Response PDU (§11.4) for `task`: `status`, optional sense, the residual, and
/// ExpDataSN = the number of Data-In PDUs sent before it.
pub fn scsi_response(
    task: &ReadTask,
    status: u8,
    sense: Option<&Sense>,
    residual: Residual,
    counters: StatusCounters,
    exp_data_sn: u32,
) -> OutgoingPdu {
    let mut bhs = Bhs::new(Opcode::ScsiResponse);
    bhs.set_final_bit(true);
    bhs.set_itt(task.itt);
    bhs.set_status(status);
    bhs.set_residual(residual);
    bhs.set_data_sn(exp_data_sn);
    counters.stamp(&mut bhs);
    let data = sense
        .map(|sense| vec![scsi::response_sense_segment(*sense)])
        .unwrap_or_default();
    OutgoingPdu::new(bhs, data)
}

/// A CHECK CONDITION answer for a READ served locally (local design, e.g. LBA OUT OF
/// RANGE): nothing transferred, so the residual is an underflow of the whole EDTL.
pub fn check_condition(task: &ReadTask, sense: Sense, counters: StatusCounters) -> OutgoingPdu {
    let residual = residual(task.edtl, 0);
    scsi_response(
        task,
        scsi::status::CHECK_CONDITION,
        Some(&sense),
        residual,
        counters,
        0,
    )
}

/// Restore a target's non-GOOD SCSI Response to a shadow command before forwarding it:
/// the target saw EDTL 0, the initiator asked for `original_edtl` and got nothing, so
/// report the whole EDTL as underflow (what the target would have said for the READ it
/// never saw).
pub fn restore_shadow_failure(response: &Bhs, original_edtl: u32) -> Bhs {
    let mut bhs = *response;
    bhs.set_residual(residual(original_edtl, 0));
    bhs
}

/// Walks a list of buffers handing out consecutive zero-copy slices.
struct PieceCursor<'a> {
    pieces: &'a [Bytes],
    index: usize,
    offset: usize,
}

impl<'a> PieceCursor<'a> {
    fn new(pieces: &'a [Bytes]) -> Self {
        PieceCursor {
            pieces,
            index: 0,
            offset: 0,
        }
    }

    /// The next `len` bytes as slices of the pieces (fewer if the pieces run out).
    fn take(&mut self, mut len: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        while len > 0 {
            let Some(piece) = self.pieces.get(self.index) else {
                break;
            };
            let available = piece.len() - self.offset;
            let n = available.min(len);
            if n > 0 {
                out.push(piece.slice(self.offset..self.offset + n));
            }
            len -= n;
            self.offset += n;
            if self.offset == piece.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::pdu::{Digests, PduDecoder};
    use bytes::BytesMut;
    use proptest::prelude::*;

    const COUNTERS: StatusCounters = StatusCounters {
        stat_sn: 100,
        exp_cmd_sn: 200,
        max_cmd_sn: 328,
    };

    fn task(edtl: u32) -> ReadTask {
        ReadTask {
            itt: 0x10,
            lun: 0x0001_0000_0000_0000,
            edtl,
        }
    }

    fn blocks(n: usize, size: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(vec![i as u8; size]))
            .collect::<Vec<_>>()
    }

    fn limits(mrdsl: u32, mbl: u32) -> DataInLimits {
        DataInLimits {
            max_recv_data_segment_length: mrdsl,
            max_burst_length: mbl,
        }
    }

    /// The invariants of a Data-In answer, checked on every sequence built.
    fn check_sequence(pdus: &[OutgoingPdu], data: &[Bytes], edtl: u32, limits: DataInLimits) {
        let whole: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
        let to_send = whole.len().min(edtl as usize);
        let mut offset = 0usize;
        for (i, pdu) in pdus.iter().enumerate() {
            let bhs = &pdu.bhs;
            let last = i == pdus.len() - 1;
            assert_eq!(bhs.opcode(), Opcode::DataIn);
            assert_eq!(bhs.itt(), 0x10);
            assert_eq!(bhs.ttt(), RESERVED_TAG);
            assert_eq!(bhs.data_sn(), i as u32, "DataSN from 0, no gaps");
            assert_eq!(bhs.buffer_offset() as usize, offset, "contiguous offsets");
            let len = pdu.data_len();
            assert!(len > 0 && len as u32 <= limits.max_recv_data_segment_length);
            let end = offset + len;
            let burst = limits.max_burst_length as usize;
            assert_eq!(offset / burst, (end - 1) / burst, "PDU straddles a burst");
            assert_eq!(
                bhs.final_bit(),
                last || end.is_multiple_of(burst),
                "F at burst ends"
            );
            assert_eq!(bhs.data_in_status(), last, "S only on the last");
            let joined: Vec<u8> = pdu.data.iter().flat_map(|b| b.iter().copied()).collect();
            assert_eq!(&joined[..], &whole[offset..end]);
            assert_eq!(
                (bhs.exp_cmd_sn(), bhs.max_cmd_sn()),
                (COUNTERS.exp_cmd_sn, COUNTERS.max_cmd_sn)
            );
            if last {
                assert_eq!(bhs.stat_sn(), COUNTERS.stat_sn);
                assert_eq!(bhs.status(), 0);
                assert_eq!(bhs.residual(), residual(edtl, whole.len() as u64));
            } else {
                assert_eq!(bhs.flags() & 0x07, 0, "no S/O/U before the last");
            }
            offset = end;
        }
        assert_eq!(offset, to_send, "sends min(EDTL, data)");
    }

    #[test]
    fn exact_fit_single_pdu() {
        let data = blocks(2, 512);
        let pdus = read_answer(&task(1024), &data, limits(8192, 262_144), COUNTERS);
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].bhs.flags(), 0x81, "F|S, no residual");
        check_sequence(&pdus, &data, 1024, limits(8192, 262_144));
        assert_eq!(pdus[0].data.len(), 2, "two buffers, shared");
        assert_eq!(pdus[0].data[0].as_ptr(), data[0].as_ptr());
    }

    #[test]
    fn mrdsl_512_splits_every_512_bytes() {
        let data = blocks(4, 1000);
        let lim = limits(512, 262_144);
        let pdus = read_answer(&task(4000), &data, lim, COUNTERS);
        assert_eq!(pdus.len(), 8); // 7 × 512 + 416
        check_sequence(&pdus, &data, 4000, lim);
        // A PDU spanning two buffers gets two slices.
        assert_eq!(pdus[1].data.len(), 2);
    }

    #[test]
    fn mrdsl_8192_with_4k_blocks() {
        let data = blocks(16, 4096);
        let lim = limits(8192, 262_144);
        let pdus = read_answer(&task(65536), &data, lim, COUNTERS);
        assert_eq!(pdus.len(), 8);
        check_sequence(&pdus, &data, 65536, lim);
    }

    #[test]
    fn read_larger_than_max_burst_sets_f_per_burst() {
        let data = blocks(128, 4096); // 512 KiB
        let lim = limits(65536, 262_144);
        let pdus = read_answer(&task(524_288), &data, lim, COUNTERS);
        assert_eq!(pdus.len(), 8);
        let finals: Vec<usize> = (0..8).filter(|&i| pdus[i].bhs.final_bit()).collect();
        assert_eq!(finals, [3, 7]);
        check_sequence(&pdus, &data, 524_288, lim);
    }

    #[test]
    fn burst_not_a_multiple_of_segment_cuts_at_the_boundary() {
        let data = blocks(10, 1000);
        let lim = limits(3000, 4096);
        let pdus = read_answer(&task(10_000), &data, lim, COUNTERS);
        let lens: Vec<usize> = pdus.iter().map(OutgoingPdu::data_len).collect();
        assert_eq!(lens, [3000, 1096, 3000, 1096, 1808]);
        check_sequence(&pdus, &data, 10_000, lim);
    }

    #[test]
    fn edtl_smaller_than_data_is_overflow() {
        let data = blocks(8, 512);
        let lim = limits(8192, 262_144);
        let pdus = read_answer(&task(1000), &data, lim, COUNTERS);
        check_sequence(&pdus, &data, 1000, lim);
        let last = &pdus.last().unwrap().bhs;
        assert_eq!(last.residual(), Residual::Overflow(4096 - 1000));
        assert_eq!(last.flags(), 0x85, "F|O|S");
    }

    #[test]
    fn edtl_larger_than_data_is_underflow() {
        let data = blocks(2, 512);
        let lim = limits(8192, 262_144);
        let pdus = read_answer(&task(4096), &data, lim, COUNTERS);
        check_sequence(&pdus, &data, 4096, lim);
        let last = &pdus.last().unwrap().bhs;
        assert_eq!(last.residual(), Residual::Underflow(3072));
        assert_eq!(last.flags(), 0x83, "F|U|S");
    }

    #[test]
    fn edtl_zero_is_a_scsi_response_only() {
        let data = blocks(1, 512);
        let pdus = read_answer(&task(0), &data, limits(8192, 262_144), COUNTERS);
        assert_eq!(pdus.len(), 1);
        let bhs = &pdus[0].bhs;
        assert_eq!(bhs.opcode(), Opcode::ScsiResponse);
        assert_eq!((bhs.status(), bhs.response()), (0, 0));
        assert_eq!(bhs.residual(), Residual::Overflow(512));
        assert_eq!(bhs.stat_sn(), COUNTERS.stat_sn);
        assert_eq!(bhs.data_sn(), 0, "ExpDataSN");
        assert!(pdus[0].data.is_empty());
    }

    #[test]
    fn zero_blocks_with_edtl_is_a_response_with_underflow() {
        let pdus = read_answer(&task(4096), &[], limits(8192, 262_144), COUNTERS);
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].bhs.opcode(), Opcode::ScsiResponse);
        assert_eq!(pdus[0].bhs.residual(), Residual::Underflow(4096));
    }

    #[test]
    fn check_condition_carries_sense_and_full_underflow() {
        let pdu = check_condition(&task(4096), Sense::LBA_OUT_OF_RANGE, COUNTERS);
        assert_eq!(pdu.bhs.opcode(), Opcode::ScsiResponse);
        assert_eq!(pdu.bhs.status(), scsi::status::CHECK_CONDITION);
        assert_eq!(pdu.bhs.residual(), Residual::Underflow(4096));
        assert_eq!(
            scsi::sense_from_response_segment(&pdu.data[0]),
            Some(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn shadow_counters_and_failure_restore() {
        let mut response = Bhs::new(Opcode::ScsiResponse);
        response.set_stat_sn(7);
        response.set_exp_cmd_sn(8);
        response.set_max_cmd_sn(9);
        response.set_status(scsi::status::CHECK_CONDITION);
        let counters = StatusCounters::from_target_response(&response);
        assert_eq!(
            counters,
            StatusCounters {
                stat_sn: 7,
                exp_cmd_sn: 8,
                max_cmd_sn: 9
            }
        );
        let restored = restore_shadow_failure(&response, 2048);
        assert_eq!(restored.residual(), Residual::Underflow(2048));
        assert_eq!(restored.stat_sn(), 7);
    }

    #[test]
    fn answers_decode_as_what_was_built() {
        let data = blocks(3, 700);
        let pdus = read_answer(&task(2100), &data, limits(1024, 262_144), COUNTERS);
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut wire = BytesMut::new();
        for pdu in &pdus {
            wire.extend_from_slice(&pdu.encode(digests).unwrap().to_bytes());
        }
        let decoder = PduDecoder::new(digests);
        for pdu in &pdus {
            let got = decoder.decode(&mut wire).unwrap().unwrap().pdu;
            assert_eq!(got.bhs.data_sn(), pdu.bhs.data_sn());
            assert_eq!(got.data.len(), pdu.data_len());
        }
        assert!(wire.is_empty());
    }

    proptest! {
        #[test]
        fn segmentation_invariants(
            block_count in 0usize..40,
            block_size in prop::sample::select(vec![512usize, 4096, 1000]),
            edtl in 0u32..200_000,
            mrdsl in prop::sample::select(vec![512u32, 1000, 8192, 65536, 262_144]),
            mbl in prop::sample::select(vec![512u32, 4096, 65536, 262_144]),
        ) {
            let data = blocks(block_count, block_size);
            let lim = limits(mrdsl, mbl);
            let pdus = read_answer(&task(edtl), &data, lim, COUNTERS);
            let needed = (block_count * block_size) as u64;
            if needed.min(u64::from(edtl)) == 0 {
                prop_assert_eq!(pdus.len(), 1);
                prop_assert_eq!(pdus[0].bhs.opcode(), Opcode::ScsiResponse);
            } else {
                check_sequence(&pdus, &data, edtl, lim);
            }
        }
    }
}
