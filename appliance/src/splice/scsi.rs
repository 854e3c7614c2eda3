//! The SCSI layer the splicer looks into (SBC-3/SPC-4 as carried by RFC 7143 §11.3):
//! READ(6/10/12/16) CDB parsing, recognising commands that modify the medium, the
//! shadow rewrite of a READ, and sense data for CHECK CONDITION responses.
//!
//! Everything here is a pure function of a CDB or BHS. Whether a READ may be served
//! locally (LUN policy, capacity, cache contents) is the caller's decision;
//! [`ReadCommand::servable`] gives the protocol-level preconditions the fact sheet lists.

use super::pdu::{Bhs, Opcode};
use bytes::{BufMut, Bytes, BytesMut};

/// SCSI operation codes the splicer distinguishes.
pub mod opcode {
    pub const READ_6: u8 = 0x08;
    pub const READ_10: u8 = 0x28;
    pub const READ_12: u8 = 0xa8;
    pub const READ_16: u8 = 0x88;
    pub const FORMAT_UNIT: u8 = 0x04;
    pub const WRITE_6: u8 = 0x0a;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const WRITE_LONG_10: u8 = 0x3f;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const XDWRITEREAD_10: u8 = 0x53;
    pub const VARIABLE_LENGTH: u8 = 0x7f;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_STREAM_16: u8 = 0x9a;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    /// SERVICE ACTION OUT(16): WRITE LONG(16), WRITE SCATTERED.
    pub const SERVICE_ACTION_OUT_16: u8 = 0x9f;
    pub const WRITE_12: u8 = 0xaa;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const LOG_SELECT: u8 = 0x4c;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const VERIFY_10: u8 = 0x2f;
    pub const VERIFY_12: u8 = 0xaf;
    pub const VERIFY_16: u8 = 0x8f;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
}

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    #[cfg(feature = "testing")]
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// Sense keys (SPC-4 §4.5.6).
pub mod sense_key {
    #[cfg(any(test, feature = "testing"))]
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    #[cfg(any(test, feature = "testing"))]
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const ABORTED_COMMAND: u8 = 0xb;
}

/// Which READ CDB a command used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadKind {
    Read6,
    Read10,
    Read12,
    Read16,
}

/// A parsed READ(6/10/12/16) CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadCommand {
    pub kind: ReadKind,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (READ(6) length 0 already turned into 256).
    pub blocks: u32,
    /// RDPROTECT (byte 1 bits 7–5): non-zero asks for protection information.
    pub rdprotect: u8,
    /// Disable page out (a caching hint).
    pub dpo: bool,
    /// Force unit access: read from the medium, not the target's cache.
    pub fua: bool,
    /// Group number (READ(10/12/16)).
    pub group: u8,
    /// The CONTROL byte (last byte of the CDB).
    pub control: u8,
}

fn be_u32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u32::from(b))
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

/// Parse a READ(6/10/12/16) CDB (SBC-3 §5.7–5.11); `None` for any other command.
pub fn parse_read(cdb: &[u8; 16]) -> Option<ReadCommand> {
    let flags = cdb[1];
    let rdprotect = flags >> 5;
    let dpo = flags & 0x10 != 0;
    let fua = flags & 0x08 != 0;
    let read = match cdb[0] {
        opcode::READ_6 => ReadCommand {
            kind: ReadKind::Read6,
            lba: u64::from(be_u32(&[cdb[1] & 0x1f, cdb[2], cdb[3]])),
            // SBC-3 §5.7: a TRANSFER LENGTH of 0 in READ(6) means 256 blocks.
            blocks: match cdb[4] {
                0 => 256,
                n => u32::from(n),
            },
            rdprotect: 0,
            dpo: false,
            fua: false,
            group: 0,
            control: cdb[5],
        },
        opcode::READ_10 => ReadCommand {
            kind: ReadKind::Read10,
            lba: u64::from(be_u32(&cdb[2..6])),
            blocks: be_u32(&cdb[7..9]),
            rdprotect,
            dpo,
            fua,
            group: cdb[6] & 0x3f,
            control: cdb[9],
        },
        opcode::READ_12 => ReadCommand {
            kind: ReadKind::Read12,
            lba: u64::from(be_u32(&cdb[2..6])),
            blocks: be_u32(&cdb[6..10]),
            rdprotect,
            dpo,
            fua,
            group: cdb[10] & 0x3f,
            control: cdb[11],
        },
        opcode::READ_16 => ReadCommand {
            kind: ReadKind::Read16,
            lba: be_u64(&cdb[2..10]),
            blocks: be_u32(&cdb[10..14]),
            rdprotect,
            dpo,
            fua,
            group: cdb[14] & 0x3f,
            control: cdb[15],
        },
        _ => return None,
    };
    Some(read)
}

impl ReadCommand {
    /// Bytes the command asks for with `block_size`-byte logical blocks.
    pub fn byte_len(&self, block_size: u32) -> u64 {
        u64::from(self.blocks) * u64::from(block_size)
    }

    /// Whether every block lies below `capacity_blocks` (READ CAPACITY's last LBA + 1).
    pub fn within(&self, capacity_blocks: u64) -> bool {
        self.lba
            .checked_add(u64::from(self.blocks))
            .is_some_and(|end| end <= capacity_blocks)
    }

    /// The protocol preconditions for answering this READ locally (fact sheet, "Answering
    /// a READ locally"): no protection information asked, all blocks inside the LUN.
    /// The caller also checks the BHS with [`local_candidate`].
    pub fn servable(&self, capacity_blocks: u64) -> bool {
        self.rdprotect == 0 && self.within(capacity_blocks)
    }

    /// The CDB the shadow design sends upstream in place of this READ: the same LBA and
    /// flags with a transfer length of 0, so the target still checks the LBA, unit
    /// attentions, reservations and ordering but transfers nothing. READ(6) becomes
    /// READ(10) because a READ(6) length of 0 means 256 blocks; READ(12/16) keep their
    /// opcode so a 64-bit LBA survives.
    pub fn shadow_cdb(&self, original: &[u8; 16]) -> [u8; 16] {
        let mut cdb = *original;
        match self.kind {
            ReadKind::Read6 => {
                cdb = [0; 16];
                cdb[0] = opcode::READ_10;
                cdb[2..6].copy_from_slice(&(self.lba as u32).to_be_bytes());
                // transfer length (7..9) stays 0
                cdb[9] = self.control;
            }
            ReadKind::Read10 => cdb[7..9].fill(0),
            ReadKind::Read12 => cdb[6..10].fill(0),
            ReadKind::Read16 => cdb[10..14].fill(0),
        }
        cdb
    }
}

/// The READ in a SCSI Command PDU, if the PDU may be answered locally as far as iSCSI is
/// concerned: a SCSI Command with R set and W clear, no AHS (extended CDBs and
/// bidirectional commands) and a READ(6/10/12/16) CDB (fact sheet: "pass through
/// anything with RDPROTECT ≠ 0, LBAs out of range, an AHS, or the W bit").
pub fn local_candidate(bhs: &Bhs) -> Option<ReadCommand> {
    if bhs.opcode() != Opcode::ScsiCommand
        || !bhs.command_read()
        || bhs.command_write()
        || bhs.total_ahs_len() != 0
        || bhs.data_segment_length() != 0
    {
        return None;
    }
    parse_read(bhs.cdb()).filter(|read| read.rdprotect == 0)
}

/// Whether a CDB may change the medium's contents (cached blocks of that LUN become
/// stale). Conservative: every write-family command, the variable-length CDBs (WRITE(32)
/// and friends live there), and the commands that erase or reformat.
pub fn may_write_medium(cdb: &[u8; 16]) -> bool {
    matches!(
        cdb[0],
        opcode::FORMAT_UNIT
            | opcode::WRITE_6
            | opcode::WRITE_10
            | opcode::WRITE_12
            | opcode::WRITE_16
            | opcode::WRITE_AND_VERIFY_10
            | opcode::WRITE_AND_VERIFY_12
            | opcode::WRITE_AND_VERIFY_16
            | opcode::WRITE_LONG_10
            | opcode::WRITE_SAME_10
            | opcode::WRITE_SAME_16
            | opcode::UNMAP
            | opcode::SANITIZE
            | opcode::XDWRITEREAD_10
            | opcode::VARIABLE_LENGTH
            | opcode::ORWRITE_16
            | opcode::COMPARE_AND_WRITE
            | opcode::WRITE_STREAM_16
            | opcode::WRITE_ATOMIC_16
            | opcode::SERVICE_ACTION_OUT_16
    )
}

/// Commands that may carry data to the target (W bit) but leave the medium's
/// blocks as they are: READs (whatever data comes with one, the CDB reads),
/// VERIFY with BYTCHK (the data is compared, not written), mode and log pages, and
/// persistent reservations (the conformance suite sends all of these to read-only
/// LUNs too).
pub fn data_out_leaves_medium(cdb: &[u8; 16]) -> bool {
    matches!(
        cdb[0],
        opcode::READ_6
            | opcode::READ_10
            | opcode::READ_12
            | opcode::READ_16
            | opcode::MODE_SELECT_6
            | opcode::MODE_SELECT_10
            | opcode::LOG_SELECT
            | opcode::PERSISTENT_RESERVE_OUT
            | opcode::VERIFY_10
            | opcode::VERIFY_12
            | opcode::VERIFY_16
    )
}

/// Whether a SCSI Command PDU may change the medium: its CDB does, or it carries data
/// to the target (W bit) and is not one of [`data_out_leaves_medium`]'s.
pub fn command_may_write(bhs: &Bhs) -> bool {
    let cdb = bhs.cdb();
    bhs.opcode() == Opcode::ScsiCommand
        && (may_write_medium(cdb) || (bhs.command_write() && !data_out_leaves_medium(cdb)))
}

/// The shadow rewrite of a READ command PDU (fact sheet, "Shadow design"): same ITT,
/// CmdSN, LUN and attributes; R bit cleared, EDTL 0, CDB transferring nothing.
pub fn shadow_command(bhs: &Bhs, read: &ReadCommand) -> Bhs {
    let mut shadow = *bhs;
    shadow.set_command_read(false);
    shadow.set_expected_data_transfer_length(0);
    shadow.set_cdb(&read.shadow_cdb(bhs.cdb()));
    shadow
}

/// Sense data (SPC-4 §4.5): the key, additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    #[cfg(any(test, feature = "testing"))]
    pub const LBA_OUT_OF_RANGE: Sense = Sense {
        key: sense_key::ILLEGAL_REQUEST,
        asc: 0x21,
        ascq: 0x00,
    };
    /// Power on, reset, or bus device reset occurred (what tgt reports on a session's
    /// first command).
    #[cfg(any(test, feature = "testing"))]
    pub const POWER_ON_RESET: Sense = Sense {
        key: sense_key::UNIT_ATTENTION,
        asc: 0x29,
        ascq: 0x00,
    };

    /// Fixed-format sense data (response code 0x70, current error; SPC-4 §4.5.3), 18
    /// bytes.
    pub fn fixed(self) -> [u8; 18] {
        let mut sense = [0u8; 18];
        sense[0] = 0x70;
        sense[2] = self.key & 0x0f;
        sense[7] = 10; // additional sense length: bytes 8..18
        sense[12] = self.asc;
        sense[13] = self.ascq;
        sense
    }

    /// Parse fixed (0x70/0x71) or descriptor (0x72/0x73) sense data.
    #[cfg(any(test, feature = "testing"))]
    pub fn parse(sense: &[u8]) -> Option<Sense> {
        match sense.first()? & 0x7f {
            0x70 | 0x71 => Some(Sense {
                key: sense.get(2)? & 0x0f,
                asc: sense.get(12).copied().unwrap_or(0),
                ascq: sense.get(13).copied().unwrap_or(0),
            }),
            0x72 | 0x73 => Some(Sense {
                key: sense.get(1)? & 0x0f,
                asc: *sense.get(2)?,
                ascq: *sense.get(3)?,
            }),
            _ => None,
        }
    }
}

/// The data segment of a SCSI Response carrying `sense` (§11.4.7.2: a 2-byte
/// `SenseLength`, then the sense data).
pub fn response_sense_segment(sense: Sense) -> Bytes {
    let fixed = sense.fixed();
    let mut data = BytesMut::with_capacity(2 + fixed.len());
    data.put_u16(fixed.len() as u16);
    data.put_slice(&fixed);
    data.freeze()
}

/// The sense in a SCSI Response's data segment, if any.
#[cfg(any(test, feature = "testing"))]
pub fn sense_from_response_segment(data: &[u8]) -> Option<Sense> {
    let len = usize::from(u16::from_be_bytes([*data.first()?, *data.get(1)?]));
    Sense::parse(data.get(2..2 + len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut cdb = [0u8; 16];
        cdb[..bytes.len()].copy_from_slice(bytes);
        cdb
    }

    #[test]
    fn read6() {
        let read = parse_read(&cdb(&[0x08, 0xff, 0x34, 0x56, 8, 0x00])).unwrap();
        assert_eq!(read.kind, ReadKind::Read6);
        assert_eq!(
            read.lba, 0x1f_3456,
            "21-bit LBA, top 3 bits of byte 1 ignored"
        );
        assert_eq!(read.blocks, 8);
        assert_eq!((read.rdprotect, read.dpo, read.fua), (0, false, false));
        let zero = parse_read(&cdb(&[0x08, 0, 0, 1, 0, 0])).unwrap();
        assert_eq!(zero.blocks, 256, "READ(6) length 0 means 256 blocks");
    }

    #[test]
    fn read10_flags_and_fields() {
        let read = parse_read(&cdb(&[
            0x28,
            0b0111_1000, // RDPROTECT 3, DPO, FUA
            0x12,
            0x34,
            0x56,
            0x78,
            0x05,
            0x01,
            0x00,
            0x44,
        ]))
        .unwrap();
        assert_eq!(read.kind, ReadKind::Read10);
        assert_eq!(read.lba, 0x1234_5678);
        assert_eq!(read.blocks, 256);
        assert_eq!(read.rdprotect, 3);
        assert!(read.dpo && read.fua);
        assert_eq!((read.group, read.control), (5, 0x44));
        let zero = parse_read(&cdb(&[0x28, 0, 0, 0, 0, 1, 0, 0, 0, 0])).unwrap();
        assert_eq!(zero.blocks, 0, "READ(10) length 0 transfers nothing");
    }

    #[test]
    fn read12() {
        let read = parse_read(&cdb(&[
            0xa8, 0x08, 0, 0, 0x10, 0, 0, 0x01, 0, 0, 0x02, 0x00,
        ]))
        .unwrap();
        assert_eq!(read.kind, ReadKind::Read12);
        assert_eq!(read.lba, 0x1000);
        assert_eq!(read.blocks, 0x1_0000);
        assert!(read.fua && !read.dpo);
        assert_eq!(read.group, 2);
    }

    #[test]
    fn read16() {
        let read = parse_read(&cdb(&[
            0x88, 0x10, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x10,
            0x03, 0x00,
        ]))
        .unwrap();
        assert_eq!(read.kind, ReadKind::Read16);
        assert_eq!(read.lba, 0x1_0000_0002);
        assert_eq!(read.blocks, 16);
        assert!(read.dpo && !read.fua);
        assert_eq!(read.group, 3);
    }

    #[test]
    fn non_reads_are_not_parsed() {
        for op in [0x00, 0x12, 0x25, 0x2a, 0x1a, 0x9e, 0x7f, 0x2f] {
            assert_eq!(parse_read(&cdb(&[op])), None, "{op:#x}");
        }
    }

    #[test]
    fn range_checks() {
        let read = parse_read(&cdb(&[0x28, 0, 0, 0, 0, 10, 0, 0, 6, 0])).unwrap();
        assert!(read.within(16));
        assert!(!read.within(15));
        assert_eq!(read.byte_len(4096), 6 * 4096);
        let huge = ReadCommand {
            lba: u64::MAX,
            blocks: 1,
            ..read
        };
        assert!(!huge.within(u64::MAX), "no overflow");
        let protected = ReadCommand {
            rdprotect: 1,
            ..read
        };
        assert!(!protected.servable(100));
        assert!(read.servable(100));
    }

    #[test]
    fn writes_are_recognised() {
        for op in [
            0x0a, 0x2a, 0xaa, 0x8a, 0x2e, 0x41, 0x93, 0x89, 0x42, 0x7f, 0x04,
        ] {
            assert!(may_write_medium(&cdb(&[op])), "{op:#x}");
        }
        for op in [0x08, 0x28, 0xa8, 0x88, 0x12, 0x25, 0x9e, 0x00, 0x1a, 0xa0] {
            assert!(!may_write_medium(&cdb(&[op])), "{op:#x}");
        }
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_cdb(&cdb(&[0x12]));
        assert!(!command_may_write(&bhs));
        bhs.set_command_write(true);
        assert!(command_may_write(&bhs), "W bit alone counts");
        // Data for mode/log pages and persistent reservations leaves the blocks be.
        for op in [
            0x08, 0x28, 0xa8, 0x88, 0x15, 0x55, 0x4c, 0x5f, 0x2f, 0xaf, 0x8f,
        ] {
            bhs.set_cdb(&cdb(&[op]));
            assert!(!command_may_write(&bhs), "{op:#x}");
        }
        bhs.set_cdb(&cdb(&[0x2a]));
        bhs.set_command_write(false);
        assert!(command_may_write(&bhs), "a WRITE without data still counts");
    }

    fn read_command_bhs(cdb_bytes: &[u8]) -> Bhs {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_final_bit(true);
        bhs.set_command_read(true);
        bhs.set_command_attr(1);
        bhs.set_itt(0x42);
        bhs.set_cmd_sn(77);
        bhs.set_exp_stat_sn(5);
        bhs.set_lun(0x0001_0000_0000_0000);
        bhs.set_expected_data_transfer_length(8 * 512);
        bhs.set_cdb(&cdb(cdb_bytes));
        bhs
    }

    #[test]
    fn local_candidates() {
        let bhs = read_command_bhs(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0]);
        assert!(local_candidate(&bhs).is_some());
        let mut w = bhs;
        w.set_command_write(true);
        assert_eq!(local_candidate(&w), None, "W bit");
        let mut no_r = bhs;
        no_r.set_command_read(false);
        assert_eq!(local_candidate(&no_r), None, "R bit clear");
        let mut ahs = bhs;
        ahs.0[4] = 1;
        assert_eq!(local_candidate(&ahs), None, "AHS");
        let protect = read_command_bhs(&[0x28, 0x20, 0, 0, 0, 1, 0, 0, 8, 0]);
        assert_eq!(local_candidate(&protect), None, "RDPROTECT");
        let inquiry = read_command_bhs(&[0x12, 0, 0, 0, 36, 0]);
        assert_eq!(local_candidate(&inquiry), None);
    }

    #[test]
    fn shadow_of_read6_is_a_zero_length_read10() {
        let bhs = read_command_bhs(&[0x08, 0x01, 0x02, 0x03, 0, 0x00]);
        let read = local_candidate(&bhs).unwrap();
        let shadow = shadow_command(&bhs, &read);
        assert!(!shadow.command_read() && !shadow.command_write());
        assert!(shadow.final_bit());
        assert_eq!(shadow.command_attr(), 1);
        assert_eq!(shadow.expected_data_transfer_length(), 0);
        assert_eq!(
            (
                shadow.itt(),
                shadow.cmd_sn(),
                shadow.exp_stat_sn(),
                shadow.lun()
            ),
            (bhs.itt(), bhs.cmd_sn(), bhs.exp_stat_sn(), bhs.lun())
        );
        assert_eq!(
            shadow.cdb(),
            &cdb(&[0x28, 0, 0, 0x01, 0x02, 0x03, 0, 0, 0, 0])
        );
        let reparsed = parse_read(shadow.cdb()).unwrap();
        assert_eq!((reparsed.lba, reparsed.blocks), (read.lba, 0));
    }

    #[test]
    fn shadow_keeps_lba_and_flags_of_longer_reads() {
        for bytes in [
            &[0x28, 0x18, 0, 0, 0, 9, 0x01, 0, 8, 0x00][..],
            &[0xa8, 0x08, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0][..],
            &[0x88, 0x10, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0][..],
        ] {
            let bhs = read_command_bhs(bytes);
            let read = local_candidate(&bhs).unwrap();
            let shadow = shadow_command(&bhs, &read);
            assert_eq!(shadow.cdb()[0], bytes[0]);
            let reparsed = parse_read(shadow.cdb()).unwrap();
            assert_eq!(reparsed.blocks, 0);
            assert_eq!(
                ReadCommand { blocks: 0, ..read },
                reparsed,
                "only the length changed"
            );
        }
    }

    #[test]
    fn fixed_sense_layout_and_response_segment() {
        let sense = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(sense.len(), 18);
        assert_eq!(sense[0], 0x70);
        assert_eq!(sense[2], 0x05);
        assert_eq!(sense[7], 10);
        assert_eq!((sense[12], sense[13]), (0x21, 0x00));
        let segment = response_sense_segment(Sense::LBA_OUT_OF_RANGE);
        assert_eq!(&segment[..2], &[0, 18]);
        assert_eq!(&segment[2..], &sense);
        assert_eq!(
            sense_from_response_segment(&segment),
            Some(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn parses_descriptor_sense() {
        let descriptor = [0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0];
        assert_eq!(Sense::parse(&descriptor), Some(Sense::POWER_ON_RESET));
        assert_eq!(Sense::parse(&[0x00]), None);
        assert_eq!(Sense::parse(&[]), None);
        assert_eq!(sense_from_response_segment(&[0, 30, 0x70]), None, "short");
    }

    proptest! {
        #[test]
        fn parsing_any_cdb_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
            if let Some(read) = parse_read(&bytes) {
                let shadow = read.shadow_cdb(&bytes);
                prop_assert_eq!(parse_read(&shadow).map(|r| r.blocks), Some(0));
            }
            let _ = Sense::parse(&bytes);
            let _ = sense_from_response_segment(&bytes);
        }
    }
}
