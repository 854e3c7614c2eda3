//! The iSCSI PDU codec (RFC 7143 §11): framing, the Basic Header Segment and its
//! per-opcode fields, and CRC32C digests.
//!
//! This module owns the wire format and nothing else: it knows no session state. The
//! relay gives a [`PduDecoder`] the bytes read from one direction of a connection and gets
//! back whole [`ReceivedPdu`]s, whose AHS and data segment are zero-copy slices of the
//! receive buffer, together with the exact wire bytes so an unmodified PDU is forwarded
//! without re-encoding. A PDU the splicer builds or rewrites is framed with [`encode`],
//! which recomputes the digests and yields a [`WireChain`]: a chain of buffers (header, data
//! pieces, padding and digest) that implements [`bytes::Buf`], so a vectored write sends
//! cached block buffers without copying them.
//!
//! Layout of a PDU (§11.1–11.2): BHS (48 bytes) | AHS (TotalAHSLength × 4 bytes) |
//! header digest (4, if negotiated) | data segment (DataSegmentLength bytes, padded to a
//! multiple of 4; the padding is not counted) | data digest (4, if negotiated).

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Length of the Basic Header Segment (§11.2).
pub const BHS_LEN: usize = 48;
/// Length of a CRC32C digest on the wire (§13.1).
pub const DIGEST_LEN: usize = 4;
/// The reserved tag value: "no task" for ITT, "no reply wanted" for TTT (§11.18, §11.19).
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// DataSegmentLength is a 24-bit field (§11.2.1.5).
pub const MAX_DATA_SEGMENT_LENGTH: u32 = (1 << 24) - 1;
/// TotalAHSLength is an 8-bit count of 4-byte words (§11.2.1.4).
pub const MAX_AHS_LEN: usize = 255 * 4;

/// Byte 0: the Immediate delivery bit (§11.2.1.1).
const IMMEDIATE_BIT: u8 = 0x40;
/// Byte 1: the Final bit (§11.2.1.2).
const FINAL_BIT: u8 = 0x80;

/// Whether header and data digests are in use on one direction of a connection.
/// Digests apply only in Full Feature Phase (§13.1): login PDUs never carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over BHS + AHS follows the AHS.
    pub header: bool,
    /// CRC32C over data + padding follows the padded data segment.
    pub data: bool,
}

impl Digests {
    /// No digests (login phase, or negotiated `None`).
    pub const NONE: Digests = Digests {
        header: false,
        data: false,
    };
}

/// The iSCSI CRC32C (Castagnoli) of `bytes` (§13.1, RFC 3720 Appendix B.4).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The digest of several buffers as if concatenated.
fn crc32c_of_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    pieces.into_iter().fold(0, crc32c::crc32c_append)
}

/// Bytes of padding after a data segment of `len` bytes (§11.1: pad to 4).
pub fn padding_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// iSCSI opcodes (§11.2.1.2). Initiator opcodes are 0x00–0x1f, target opcodes 0x20–0x3f.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    NopOut,
    ScsiCommand,
    TaskManagementRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    Snack,
    NopIn,
    ScsiResponse,
    TaskManagementResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    LogoutResponse,
    ReadyToTransfer,
    AsyncMessage,
    Reject,
    /// Vendor-specific or undefined; passed through untouched.
    Other(u8),
}

impl Opcode {
    /// The opcode of a 6-bit code.
    pub fn from_code(code: u8) -> Opcode {
        match code & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskManagementRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::Snack,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskManagementResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::ReadyToTransfer,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            other => Opcode::Other(other),
        }
    }

    /// The 6-bit code of this opcode.
    pub fn code(self) -> u8 {
        match self {
            Opcode::NopOut => 0x00,
            Opcode::ScsiCommand => 0x01,
            Opcode::TaskManagementRequest => 0x02,
            Opcode::LoginRequest => 0x03,
            Opcode::TextRequest => 0x04,
            Opcode::DataOut => 0x05,
            Opcode::LogoutRequest => 0x06,
            Opcode::Snack => 0x10,
            Opcode::NopIn => 0x20,
            Opcode::ScsiResponse => 0x21,
            Opcode::TaskManagementResponse => 0x22,
            Opcode::LoginResponse => 0x23,
            Opcode::TextResponse => 0x24,
            Opcode::DataIn => 0x25,
            Opcode::LogoutResponse => 0x26,
            Opcode::ReadyToTransfer => 0x31,
            Opcode::AsyncMessage => 0x32,
            Opcode::Reject => 0x3f,
            Opcode::Other(code) => code & 0x3f,
        }
    }

    /// Sent by the initiator (§11.2.1.2: target opcodes have bit 5 set).
    pub fn is_initiator(self) -> bool {
        self.code() & 0x20 == 0
    }

    /// Whether a target PDU of this opcode carries a StatSN that advances the connection's
    /// StatSN (§4.2.2.2 and §11). Data-In only when S is set, NOP-In only when it answers a
    /// NOP-Out (ITT ≠ 0xffffffff): see [`Bhs::advances_stat_sn`].
    fn may_carry_status(self) -> bool {
        matches!(
            self,
            Opcode::ScsiResponse
                | Opcode::TaskManagementResponse
                | Opcode::LoginResponse
                | Opcode::TextResponse
                | Opcode::LogoutResponse
                | Opcode::AsyncMessage
                | Opcode::Reject
                | Opcode::DataIn
                | Opcode::NopIn
        )
    }
}

/// SCSI Command flags, byte 1 (§11.3.1).
pub mod command_flags {
    /// Read: data is expected from the target.
    pub const READ: u8 = 0x40;
    /// Write: data is expected from the initiator.
    pub const WRITE: u8 = 0x20;
    /// Task attributes (untagged, simple, ordered, head of queue, ACA).
    #[cfg(any(test, feature = "testing"))]
    pub const ATTR_MASK: u8 = 0x07;
}

/// SCSI Data-In flags, byte 1 (§11.7.1–11.7.3).
pub mod data_in_flags {
    /// Final: last PDU of a sequence.
    #[cfg(any(test, feature = "testing"))]
    pub const FINAL: u8 = 0x80;
    /// Acknowledge requested (ERL > 0 only).
    #[cfg(any(test, feature = "testing"))]
    pub const ACKNOWLEDGE: u8 = 0x40;
    /// Residual overflow.
    pub const OVERFLOW: u8 = 0x04;
    /// Residual underflow.
    pub const UNDERFLOW: u8 = 0x02;
    /// Status: this PDU carries the command's status and StatSN.
    pub const STATUS: u8 = 0x01;
}

/// SCSI Response flags, byte 1 (§11.4.5).
pub mod response_flags {
    /// Bidirectional read residual overflow.
    #[cfg(any(test, feature = "testing"))]
    pub const BIDI_OVERFLOW: u8 = 0x10;
    /// Bidirectional read residual underflow.
    #[cfg(any(test, feature = "testing"))]
    pub const BIDI_UNDERFLOW: u8 = 0x08;
}

/// Login and Text flags, byte 1 (§11.10.1, §11.12.1).
pub mod login_flags {
    /// Transit (login) / Final (text).
    pub const TRANSIT: u8 = 0x80;
    /// Continue: the text continues in the next PDU.
    pub const CONTINUE: u8 = 0x40;
}

/// A Basic Header Segment, with typed accessors for every field the splicer reads or
/// writes. Accessors are plain offset reads; which fields are meaningful depends on the
/// opcode, as each accessor's documentation says.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bhs")
            .field("opcode", &self.opcode())
            .field("immediate", &self.immediate())
            .field("flags", &format_args!("{:#04x}", self.flags()))
            .field("ahs_len", &self.total_ahs_len())
            .field("data_len", &self.data_segment_length())
            .field("itt", &format_args!("{:#010x}", self.itt()))
            .field("raw", &hex::encode(self.0))
            .finish()
    }
}

fn read_u16(bytes: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn write_u32(bytes: &mut [u8; BHS_LEN], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

#[cfg(any(test, feature = "testing"))]
fn write_u16(bytes: &mut [u8; BHS_LEN], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

impl Bhs {
    /// An all-zero BHS with `opcode` set.
    pub fn new(opcode: Opcode) -> Bhs {
        let mut bhs = Bhs([0; BHS_LEN]);
        bhs.0[0] = opcode.code();
        bhs
    }

    // ---- Common fields (§11.2.1) ----

    /// The opcode (byte 0, low 6 bits).
    pub fn opcode(&self) -> Opcode {
        Opcode::from_code(self.0[0])
    }

    /// The I bit: immediate delivery (initiator PDUs only, byte 0).
    pub fn immediate(&self) -> bool {
        self.0[0] & IMMEDIATE_BIT != 0
    }

    pub fn set_immediate(&mut self, immediate: bool) {
        set_bit(&mut self.0[0], IMMEDIATE_BIT, immediate);
    }

    /// Byte 1 whole: the F bit and the opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.0[1] = flags;
    }

    /// The F (final) bit, byte 1 bit 7. For Login and Text this is the T / F bit.
    #[cfg(any(test, feature = "testing"))]
    pub fn final_bit(&self) -> bool {
        self.0[1] & FINAL_BIT != 0
    }

    pub fn set_final_bit(&mut self, set: bool) {
        set_bit(&mut self.0[1], FINAL_BIT, set);
    }

    /// TotalAHSLength in bytes (byte 4 counts 4-byte words).
    pub fn total_ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    /// Set TotalAHSLength; `len` must be a multiple of 4 not above [`MAX_AHS_LEN`]
    /// ([`encode`] checks and sets this itself).
    fn set_total_ahs_len(&mut self, len: usize) {
        debug_assert!(len.is_multiple_of(4) && len <= MAX_AHS_LEN);
        self.0[4] = (len / 4) as u8;
    }

    /// DataSegmentLength (bytes 5–7), without padding.
    pub fn data_segment_length(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    /// Set DataSegmentLength; values above 24 bits are a caller bug ([`encode`] checks).
    fn set_data_segment_length(&mut self, len: u32) {
        debug_assert!(len <= MAX_DATA_SEGMENT_LENGTH);
        self.0[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    }

    /// The LUN field (bytes 8–15) as the raw 8-byte big-endian value (SAM LUN structure).
    /// Meaningful for SCSI Command, Data-In/Out, R2T, NOP, TMF, Text, SNACK, Async.
    pub fn lun(&self) -> u64 {
        u64::from_be_bytes(self.0[8..16].try_into().unwrap_or([0; 8]))
    }

    pub fn set_lun(&mut self, lun: u64) {
        self.0[8..16].copy_from_slice(&lun.to_be_bytes());
    }

    /// Initiator Task Tag (bytes 16–19), all opcodes.
    pub fn itt(&self) -> u32 {
        read_u32(&self.0, 16)
    }

    pub fn set_itt(&mut self, itt: u32) {
        write_u32(&mut self.0, 16, itt);
    }

    // ---- Sequence numbers (§4.2.2) ----

    /// CmdSN (bytes 24–27) of initiator PDUs that carry one: SCSI Command, NOP-Out,
    /// TMF request, Login, Text, Logout.
    pub fn cmd_sn(&self) -> u32 {
        read_u32(&self.0, 24)
    }

    pub fn set_cmd_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 24, sn);
    }

    /// ExpStatSN (bytes 28–31) of every initiator PDU except SNACK's reserved use.
    #[cfg(any(test, feature = "testing"))]
    pub fn exp_stat_sn(&self) -> u32 {
        read_u32(&self.0, 28)
    }

    pub fn set_exp_stat_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 28, sn);
    }

    /// StatSN (bytes 24–27) of target PDUs; valid in Data-In only with S set.
    pub fn stat_sn(&self) -> u32 {
        read_u32(&self.0, 24)
    }

    pub fn set_stat_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 24, sn);
    }

    /// ExpCmdSN (bytes 28–31) of target PDUs.
    pub fn exp_cmd_sn(&self) -> u32 {
        read_u32(&self.0, 28)
    }

    pub fn set_exp_cmd_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 28, sn);
    }

    /// MaxCmdSN (bytes 32–35) of target PDUs.
    pub fn max_cmd_sn(&self) -> u32 {
        read_u32(&self.0, 32)
    }

    pub fn set_max_cmd_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 32, sn);
    }

    /// Whether this target PDU consumes a StatSN (§4.2.2.2): status-bearing PDUs do;
    /// Data-In only with S; NOP-In only when answering a NOP-Out (ITT ≠ 0xffffffff); R2T
    /// never. Login responses carry StatSN but only the last one's matters (§11.13.4).
    pub fn advances_stat_sn(&self) -> bool {
        let opcode = self.opcode();
        if !opcode.may_carry_status() {
            return false;
        }
        match opcode {
            Opcode::DataIn => self.data_in_status(),
            Opcode::NopIn => self.itt() != RESERVED_TAG,
            _ => true,
        }
    }

    /// Whether this initiator PDU consumes a CmdSN (§4.2.2.1): commands without the I bit.
    /// Data-Out and SNACK carry no CmdSN.
    pub fn advances_cmd_sn(&self) -> bool {
        matches!(
            self.opcode(),
            Opcode::ScsiCommand
                | Opcode::NopOut
                | Opcode::TaskManagementRequest
                | Opcode::TextRequest
                | Opcode::LogoutRequest
        ) && !self.immediate()
    }

    // ---- Target Transfer Tag, data sequencing ----

    /// Target Transfer Tag (bytes 20–23): NOP-Out/In, Data-Out/In, R2T, Text, SNACK.
    pub fn ttt(&self) -> u32 {
        read_u32(&self.0, 20)
    }

    pub fn set_ttt(&mut self, ttt: u32) {
        write_u32(&mut self.0, 20, ttt);
    }

    /// DataSN (Data-In/Out), R2TSN (R2T), ExpDataSN (SCSI Response, TMF request) or the
    /// DataSN/R2TSN of a Reject: bytes 36–39.
    #[cfg(any(test, feature = "testing"))]
    pub fn data_sn(&self) -> u32 {
        read_u32(&self.0, 36)
    }

    pub fn set_data_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 36, sn);
    }

    /// Buffer Offset (bytes 40–43): Data-In/Out, R2T.
    pub fn buffer_offset(&self) -> u32 {
        read_u32(&self.0, 40)
    }

    pub fn set_buffer_offset(&mut self, offset: u32) {
        write_u32(&mut self.0, 40, offset);
    }

    /// Residual Count (bytes 44–47): Data-In (with S), SCSI Response. For R2T this is the
    /// Desired Data Transfer Length.
    #[cfg(any(test, feature = "testing"))]
    pub fn residual_count(&self) -> u32 {
        read_u32(&self.0, 44)
    }

    pub fn set_residual_count(&mut self, count: u32) {
        write_u32(&mut self.0, 44, count);
    }

    // ---- SCSI Command (§11.3) ----

    /// R bit: the command reads data.
    pub fn command_read(&self) -> bool {
        self.0[1] & command_flags::READ != 0
    }

    pub fn set_command_read(&mut self, set: bool) {
        set_bit(&mut self.0[1], command_flags::READ, set);
    }

    /// W bit: the command writes data.
    pub fn command_write(&self) -> bool {
        self.0[1] & command_flags::WRITE != 0
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_command_write(&mut self, set: bool) {
        set_bit(&mut self.0[1], command_flags::WRITE, set);
    }

    /// Task attribute (ATTR, 3 bits).
    #[cfg(any(test, feature = "testing"))]
    pub fn command_attr(&self) -> u8 {
        self.0[1] & command_flags::ATTR_MASK
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_command_attr(&mut self, attr: u8) {
        self.0[1] = (self.0[1] & !command_flags::ATTR_MASK) | (attr & command_flags::ATTR_MASK);
    }

    /// Expected Data Transfer Length (bytes 20–23).
    pub fn expected_data_transfer_length(&self) -> u32 {
        read_u32(&self.0, 20)
    }

    pub fn set_expected_data_transfer_length(&mut self, len: u32) {
        write_u32(&mut self.0, 20, len);
    }

    /// The 16-byte CDB field (bytes 32–47); longer CDBs continue in an AHS.
    pub fn cdb(&self) -> &[u8; 16] {
        self.0[32..48].try_into().unwrap_or(&[0; 16])
    }

    pub fn set_cdb(&mut self, cdb: &[u8; 16]) {
        self.0[32..48].copy_from_slice(cdb);
    }

    // ---- SCSI Data-In (§11.7) ----

    /// A bit: acknowledge requested (only at ErrorRecoveryLevel > 0).
    #[cfg(any(test, feature = "testing"))]
    pub fn data_in_acknowledge(&self) -> bool {
        self.0[1] & data_in_flags::ACKNOWLEDGE != 0
    }

    /// S bit: the PDU carries status.
    pub fn data_in_status(&self) -> bool {
        self.0[1] & data_in_flags::STATUS != 0
    }

    /// O bit (Data-In and SCSI Response): residual overflow.
    #[cfg(any(test, feature = "testing"))]
    pub fn residual_overflow(&self) -> bool {
        self.0[1] & data_in_flags::OVERFLOW != 0
    }

    /// U bit (Data-In and SCSI Response): residual underflow.
    #[cfg(any(test, feature = "testing"))]
    pub fn residual_underflow(&self) -> bool {
        self.0[1] & data_in_flags::UNDERFLOW != 0
    }

    /// Set the residual flags (O, U) and ResidualCount together, as SCSI Response and
    /// Data-In carry them (§11.4.5).
    pub fn set_residual(&mut self, residual: Residual) {
        let (o, u, count) = match residual {
            Residual::None => (false, false, 0),
            Residual::Overflow(n) => (true, false, n),
            Residual::Underflow(n) => (false, true, n),
        };
        set_bit(&mut self.0[1], data_in_flags::OVERFLOW, o);
        set_bit(&mut self.0[1], data_in_flags::UNDERFLOW, u);
        self.set_residual_count(count);
    }

    /// The residual as the O/U flags and ResidualCount say.
    #[cfg(any(test, feature = "testing"))]
    pub fn residual(&self) -> Residual {
        if self.residual_overflow() {
            Residual::Overflow(self.residual_count())
        } else if self.residual_underflow() {
            Residual::Underflow(self.residual_count())
        } else {
            Residual::None
        }
    }

    /// SCSI status (byte 3): SCSI Response, and Data-In with S.
    pub fn status(&self) -> u8 {
        self.0[3]
    }

    pub fn set_status(&mut self, status: u8) {
        self.0[3] = status;
    }

    // ---- SCSI Response (§11.4) ----

    /// iSCSI Response code (byte 2): SCSI Response (0 = command completed at target),
    /// TMF Response (function result), Logout Response; Reject reason for Reject.
    pub fn response(&self) -> u8 {
        self.0[2]
    }

    pub fn set_response(&mut self, response: u8) {
        self.0[2] = response;
    }

    /// Bidirectional read residual overflow (o) / underflow (u) flags.
    #[cfg(any(test, feature = "testing"))]
    pub fn bidi_residual_flags(&self) -> (bool, bool) {
        (
            self.0[1] & response_flags::BIDI_OVERFLOW != 0,
            self.0[1] & response_flags::BIDI_UNDERFLOW != 0,
        )
    }

    /// Bidirectional Read Residual Count (bytes 40–43) of a SCSI Response.
    #[cfg(any(test, feature = "testing"))]
    pub fn bidi_read_residual_count(&self) -> u32 {
        read_u32(&self.0, 40)
    }

    // ---- Task Management (§11.5, §11.6) ----

    /// TMF request function (byte 1, low 7 bits).
    pub fn tmf_function(&self) -> TmfFunction {
        TmfFunction::from_code(self.0[1] & 0x7f)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_tmf_function(&mut self, function: TmfFunction) {
        self.0[1] = FINAL_BIT | function.code();
    }

    /// Referenced Task Tag (bytes 20–23) of a TMF request: the ITT of the task to abort.
    pub fn referenced_task_tag(&self) -> u32 {
        read_u32(&self.0, 20)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_referenced_task_tag(&mut self, rtt: u32) {
        write_u32(&mut self.0, 20, rtt);
    }

    /// RefCmdSN (bytes 32–35) of a TMF request: the CmdSN of the task to abort.
    pub fn ref_cmd_sn(&self) -> u32 {
        read_u32(&self.0, 32)
    }

    pub fn set_ref_cmd_sn(&mut self, sn: u32) {
        write_u32(&mut self.0, 32, sn);
    }

    // ---- Login (§11.12, §11.13) and Text (§11.10, §11.11) ----

    /// T bit of Login (transit) — same bit as F for Text.
    pub fn login_transit(&self) -> bool {
        self.0[1] & login_flags::TRANSIT != 0
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_login_transit(&mut self, set: bool) {
        set_bit(&mut self.0[1], login_flags::TRANSIT, set);
    }

    /// C bit of Login and Text: the text continues in the next PDU.
    pub fn text_continue(&self) -> bool {
        self.0[1] & login_flags::CONTINUE != 0
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_text_continue(&mut self, set: bool) {
        set_bit(&mut self.0[1], login_flags::CONTINUE, set);
    }

    /// Current Stage (CSG, byte 1 bits 3–2).
    #[cfg(any(test, feature = "testing"))]
    pub fn login_csg(&self) -> LoginStage {
        LoginStage::from_code((self.0[1] >> 2) & 0x03)
    }

    /// Next Stage (NSG, byte 1 bits 1–0); meaningful only with T set.
    pub fn login_nsg(&self) -> LoginStage {
        LoginStage::from_code(self.0[1] & 0x03)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_login_stages(&mut self, csg: LoginStage, nsg: LoginStage) {
        self.0[1] = (self.0[1] & 0xf0) | (csg.code() << 2) | nsg.code();
    }

    /// Version-max (byte 2) of a login request/response.
    #[cfg(any(test, feature = "testing"))]
    pub fn login_version_max(&self) -> u8 {
        self.0[2]
    }

    /// Version-min (request) / Version-active (response), byte 3.
    #[cfg(any(test, feature = "testing"))]
    pub fn login_version_min_or_active(&self) -> u8 {
        self.0[3]
    }

    /// ISID (bytes 8–13) of Login.
    pub fn isid(&self) -> [u8; 6] {
        self.0[8..14].try_into().unwrap_or([0; 6])
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_isid(&mut self, isid: [u8; 6]) {
        self.0[8..14].copy_from_slice(&isid);
    }

    /// TSIH (bytes 14–15) of Login: 0 on a new session's first login.
    pub fn tsih(&self) -> u16 {
        read_u16(&self.0, 14)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_tsih(&mut self, tsih: u16) {
        write_u16(&mut self.0, 14, tsih);
    }

    /// CID (bytes 20–21) of Login request and Logout request.
    #[cfg(any(test, feature = "testing"))]
    pub fn cid(&self) -> u16 {
        read_u16(&self.0, 20)
    }

    /// Login response Status-Class (byte 36): 0 success, 1 redirect, 2 initiator error,
    /// 3 target error (§11.13.5).
    pub fn login_status_class(&self) -> u8 {
        self.0[36]
    }

    /// Login response Status-Detail (byte 37).
    pub fn login_status_detail(&self) -> u8 {
        self.0[37]
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn set_login_status(&mut self, class: u8, detail: u8) {
        self.0[36] = class;
        self.0[37] = detail;
    }

    // ---- Logout (§11.14, §11.15) ----

    /// Logout request reason code (byte 1, low 7 bits): 0 close session, 1 close
    /// connection, 2 remove connection for recovery.
    #[cfg(any(test, feature = "testing"))]
    pub fn logout_reason(&self) -> u8 {
        self.0[1] & 0x7f
    }

    /// Time2Wait (bytes 40–41) of a Logout response.
    #[cfg(any(test, feature = "testing"))]
    pub fn logout_time2wait(&self) -> u16 {
        read_u16(&self.0, 40)
    }

    /// Time2Retain (bytes 42–43) of a Logout response.
    #[cfg(any(test, feature = "testing"))]
    pub fn logout_time2retain(&self) -> u16 {
        read_u16(&self.0, 42)
    }

    // ---- Asynchronous Message (§11.9) ----

    /// AsyncEvent (byte 36).
    #[cfg(any(test, feature = "testing"))]
    pub fn async_event(&self) -> u8 {
        self.0[36]
    }

    /// `AsyncVCode` (byte 37).
    #[cfg(any(test, feature = "testing"))]
    pub fn async_vcode(&self) -> u8 {
        self.0[37]
    }

    /// Parameter1–3 (bytes 38–43).
    #[cfg(any(test, feature = "testing"))]
    pub fn async_parameters(&self) -> [u16; 3] {
        [
            read_u16(&self.0, 38),
            read_u16(&self.0, 40),
            read_u16(&self.0, 42),
        ]
    }

    // ---- Reject (§11.17) ----

    /// Reject reason (byte 2).
    #[cfg(any(test, feature = "testing"))]
    pub fn reject_reason(&self) -> u8 {
        self.0[2]
    }

    // ---- SNACK (§11.16) ----

    /// SNACK type (byte 1, low 4 bits).
    #[cfg(any(test, feature = "testing"))]
    pub fn snack_type(&self) -> u8 {
        self.0[1] & 0x0f
    }
}

fn set_bit(byte: &mut u8, mask: u8, set: bool) {
    if set {
        *byte |= mask;
    } else {
        *byte &= !mask;
    }
}

/// A residual as carried by Data-In with S and SCSI Response (§11.4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    None,
    /// O: the command wanted more than EDTL; the count is what did not fit.
    Overflow(u32),
    /// U: less than EDTL was transferred; the count is the shortfall.
    Underflow(u32),
}

/// Login stages (§11.12.3): CSG / NSG values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginStage {
    SecurityNegotiation,
    OperationalNegotiation,
    /// Value 2 is reserved.
    Reserved,
    FullFeature,
}

impl LoginStage {
    pub fn from_code(code: u8) -> LoginStage {
        match code & 0x03 {
            0 => LoginStage::SecurityNegotiation,
            1 => LoginStage::OperationalNegotiation,
            2 => LoginStage::Reserved,
            _ => LoginStage::FullFeature,
        }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn code(self) -> u8 {
        match self {
            LoginStage::SecurityNegotiation => 0,
            LoginStage::OperationalNegotiation => 1,
            LoginStage::Reserved => 2,
            LoginStage::FullFeature => 3,
        }
    }
}

/// Task management functions (§11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    Other(u8),
}

impl TmfFunction {
    pub fn from_code(code: u8) -> TmfFunction {
        match code {
            1 => TmfFunction::AbortTask,
            2 => TmfFunction::AbortTaskSet,
            3 => TmfFunction::ClearAca,
            4 => TmfFunction::ClearTaskSet,
            5 => TmfFunction::LogicalUnitReset,
            6 => TmfFunction::TargetWarmReset,
            7 => TmfFunction::TargetColdReset,
            8 => TmfFunction::TaskReassign,
            other => TmfFunction::Other(other),
        }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn code(self) -> u8 {
        match self {
            TmfFunction::AbortTask => 1,
            TmfFunction::AbortTaskSet => 2,
            TmfFunction::ClearAca => 3,
            TmfFunction::ClearTaskSet => 4,
            TmfFunction::LogicalUnitReset => 5,
            TmfFunction::TargetWarmReset => 6,
            TmfFunction::TargetColdReset => 7,
            TmfFunction::TaskReassign => 8,
            TmfFunction::Other(code) => code & 0x7f,
        }
    }
}

/// TMF response codes (§11.6.1).
pub mod tmf_response {
    pub const FUNCTION_COMPLETE: u8 = 0;
    #[cfg(any(test, feature = "testing"))]
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
}

/// A PDU: its BHS, AHS and unpadded data segment. The AHS and data are `Bytes` so a
/// decoded PDU shares the receive buffer and a built one may share a cache buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

impl Pdu {
    /// A PDU with no AHS and no data.
    pub fn header_only(bhs: Bhs) -> Pdu {
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// Frame this PDU for the wire with `digests` (BHS length fields are set from the
    /// AHS and data given).
    #[cfg(any(test, feature = "testing"))]
    pub fn encode(&self, digests: Digests) -> Result<WireChain, EncodeError> {
        encode(
            &self.bhs,
            self.ahs.clone(),
            std::slice::from_ref(&self.data),
            digests,
        )
    }
}

/// A PDU the splicer sends that it built or rewrote: its data segment is the
/// concatenation of shared buffers (locally sourced Data-In spanning several cache
/// blocks, or a received PDU's data), framed without copying them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingPdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Vec<Bytes>,
}

impl OutgoingPdu {
    /// A PDU with no AHS.
    pub fn new(bhs: Bhs, data: Vec<Bytes>) -> OutgoingPdu {
        OutgoingPdu {
            bhs,
            ahs: Bytes::new(),
            data,
        }
    }

    /// Length of the data segment.
    #[cfg(any(test, feature = "testing"))]
    pub fn data_len(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }

    /// Frame for the wire with `digests`; TotalAHSLength and DataSegmentLength are set
    /// from the AHS and data.
    pub fn encode(&self, digests: Digests) -> Result<WireChain, EncodeError> {
        encode(&self.bhs, self.ahs.clone(), &self.data, digests)
    }
}

impl From<Pdu> for OutgoingPdu {
    fn from(pdu: Pdu) -> OutgoingPdu {
        OutgoingPdu {
            bhs: pdu.bhs,
            ahs: pdu.ahs,
            data: if pdu.data.is_empty() {
                Vec::new()
            } else {
                vec![pdu.data]
            },
        }
    }
}

/// A PDU as received: the parsed [`Pdu`] and the exact bytes it occupied on the wire
/// (digests included), for forwarding unchanged without re-encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedPdu {
    pub pdu: Pdu,
    pub wire: Bytes,
}

/// Why bytes could not be decoded as a PDU. Every variant means the stream is no longer
/// trustworthy: at ErrorRecoveryLevel 0 the connection is dropped (§7.1.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    #[error("data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { computed: u32, received: u32 },
    #[error(
        "data segment of {length} bytes exceeds the {limit}-byte limit declared for this direction"
    )]
    DataSegmentTooLong { length: u32, limit: u32 },
}

/// Why a PDU could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("AHS length {0} is not a multiple of 4 up to {MAX_AHS_LEN}")]
    AhsLength(usize),
    #[error("data segment of {0} bytes does not fit the 24-bit DataSegmentLength")]
    DataTooLong(usize),
}

/// A streaming decoder for one direction of a connection.
///
/// Call [`PduDecoder::decode`] after each read; it consumes one whole PDU from the front
/// of the buffer or leaves the buffer untouched and returns `Ok(None)`. Digest settings
/// change at the start of Full Feature Phase: switch them with
/// [`PduDecoder::set_digests`] right after decoding the final Login Response, before
/// decoding anything else.
#[derive(Clone, Debug)]
pub struct PduDecoder {
    digests: Digests,
    max_data_segment_length: u32,
}

impl Default for PduDecoder {
    fn default() -> Self {
        PduDecoder::new(Digests::NONE)
    }
}

impl PduDecoder {
    /// A decoder checking `digests`, accepting any data segment length.
    pub fn new(digests: Digests) -> PduDecoder {
        PduDecoder {
            digests,
            max_data_segment_length: MAX_DATA_SEGMENT_LENGTH,
        }
    }

    #[cfg(feature = "testing")]
    pub fn digests(&self) -> Digests {
        self.digests
    }

    pub fn set_digests(&mut self, digests: Digests) {
        self.digests = digests;
    }

    /// Reject data segments longer than `limit` (the receiver's declared
    /// MaxRecvDataSegmentLength, §13.12): this bounds how much one PDU buffers.
    pub fn set_max_data_segment_length(&mut self, limit: u32) {
        self.max_data_segment_length = limit.min(MAX_DATA_SEGMENT_LENGTH);
    }

    /// The number of bytes of the next PDU's header (BHS + AHS + header digest) given its
    /// BHS, and its total wire length.
    fn lengths(&self, bhs: &[u8; BHS_LEN]) -> (usize, usize, usize, usize) {
        let ahs_len = usize::from(bhs[4]) * 4;
        let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let header_digest = if self.digests.header { DIGEST_LEN } else { 0 };
        let data_digest = if self.digests.data && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let header_len = BHS_LEN + ahs_len + header_digest;
        let total = header_len + data_len + padding_len(data_len) + data_digest;
        (ahs_len, data_len, header_len, total)
    }

    /// Decode one PDU from the front of `buf`. `Ok(None)`: more bytes are needed (and
    /// `buf` has been given the capacity for the rest of this PDU). Never panics.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<ReceivedPdu>, DecodeError> {
        let Some(bhs_bytes) = buf.get(..BHS_LEN) else {
            return Ok(None);
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(bhs_bytes);
        let (ahs_len, data_len, header_len, total) = self.lengths(&bhs);

        // Check the header digest as soon as the header is in: a corrupt
        // DataSegmentLength must not make us wait for (or buffer) a phantom payload.
        if buf.len() < header_len {
            // Reserve only the header: the data length is not trusted before the header
            // digest and the length limit are checked.
            buf.reserve(header_len - buf.len());
            return Ok(None);
        }
        if self.digests.header {
            let covered = BHS_LEN + ahs_len;
            let computed = crc32c(&buf[..covered]);
            let received = digest_at(buf, covered);
            if computed != received {
                return Err(DecodeError::HeaderDigest { computed, received });
            }
        }
        if data_len as u32 > self.max_data_segment_length {
            return Err(DecodeError::DataSegmentTooLong {
                length: data_len as u32,
                limit: self.max_data_segment_length,
            });
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        if self.digests.data && data_len > 0 {
            let padded_end = header_len + data_len + padding_len(data_len);
            let computed = crc32c(&buf[header_len..padded_end]);
            let received = digest_at(buf, padded_end);
            if computed != received {
                return Err(DecodeError::DataDigest { computed, received });
            }
        }

        let wire = buf.split_to(total).freeze();
        let pdu = Pdu {
            bhs: Bhs(bhs),
            ahs: wire.slice(BHS_LEN..BHS_LEN + ahs_len),
            data: wire.slice(header_len..header_len + data_len),
        };
        Ok(Some(ReceivedPdu { pdu, wire }))
    }
}

/// The little-endian digest at `at` (§13.1: digests are sent least-significant byte
/// first, which is how RFC 3720 B.4's test vectors are laid out).
fn digest_at(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; DIGEST_LEN];
    bytes.copy_from_slice(&buf[at..at + DIGEST_LEN]);
    u32::from_le_bytes(bytes)
}

const ZERO_PADDING: [u8; 3] = [0; 3];

/// Frame a PDU: `bhs` with TotalAHSLength and DataSegmentLength set from `ahs` and
/// `data` (the data segment as the concatenation of `data`'s pieces), the header digest,
/// the data pieces themselves (shared, not copied), padding and data digest.
#[expect(
    clippy::needless_pass_by_value,
    reason = "PDUs carry their AHS as `Bytes`, and callers (the lab's initiator too) pass it so"
)]
pub fn encode(
    bhs: &Bhs,
    ahs: Bytes,
    data: &[Bytes],
    digests: Digests,
) -> Result<WireChain, EncodeError> {
    if !ahs.len().is_multiple_of(4) || ahs.len() > MAX_AHS_LEN {
        return Err(EncodeError::AhsLength(ahs.len()));
    }
    let data_len: usize = data.iter().map(Bytes::len).sum();
    if data_len > MAX_DATA_SEGMENT_LENGTH as usize {
        return Err(EncodeError::DataTooLong(data_len));
    }
    let mut bhs = *bhs;
    bhs.set_total_ahs_len(ahs.len());
    bhs.set_data_segment_length(data_len as u32);

    let mut header = BytesMut::with_capacity(BHS_LEN + ahs.len() + DIGEST_LEN);
    header.extend_from_slice(&bhs.0);
    header.extend_from_slice(&ahs);
    if digests.header {
        let digest = crc32c(&header);
        header.extend_from_slice(&digest.to_le_bytes());
    }

    let mut pieces = VecDeque::with_capacity(data.len() + 2);
    pieces.push_back(header.freeze());
    pieces.extend(data.iter().filter(|piece| !piece.is_empty()).cloned());
    let padding = &ZERO_PADDING[..padding_len(data_len)];
    let mut trailer = BytesMut::with_capacity(3 + DIGEST_LEN);
    trailer.extend_from_slice(padding);
    if digests.data && data_len > 0 {
        let digest = crc32c_of_pieces(
            data.iter()
                .map(AsRef::as_ref)
                .chain(std::iter::once(padding)),
        );
        trailer.extend_from_slice(&digest.to_le_bytes());
    }
    if !trailer.is_empty() {
        pieces.push_back(trailer.freeze());
    }
    let remaining = pieces.iter().map(Bytes::len).sum();
    Ok(WireChain { pieces, remaining })
}

/// Bytes for the wire as a chain of buffers (one framed PDU, or several appended
/// into one batch), ready for a vectored write ([`Buf`] with `chunks_vectored`).
/// Not the peer protocol's `peer::proto::Frame`, which is one decoded message.
#[derive(Clone, Debug, Default)]
pub struct WireChain {
    pieces: VecDeque<Bytes>,
    remaining: usize,
}

impl WireChain {
    /// A chain of bytes already in the wire format (a received PDU forwarded unchanged).
    pub fn from_wire(bytes: Bytes) -> WireChain {
        let remaining = bytes.len();
        WireChain {
            pieces: VecDeque::from([bytes]),
            remaining,
        }
    }

    /// Copy the whole chain into one contiguous buffer (tests, small PDUs).
    #[cfg(any(test, feature = "testing"))]
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.remaining);
        for piece in &self.pieces {
            out.extend_from_slice(piece);
        }
        out.freeze()
    }

    /// Append another chain (several PDUs in one vectored write).
    pub fn append(&mut self, other: WireChain) {
        self.remaining += other.remaining;
        self.pieces.extend(other.pieces);
    }
}

impl Buf for WireChain {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.pieces.front().map_or(&[], Bytes::as_ref)
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a WireChain");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.pieces.front_mut() else {
                break;
            };
            if cnt < front.len() {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.pieces.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, piece) in dst.iter_mut().zip(&self.pieces) {
            *slot = IoSlice::new(piece);
            filled += 1;
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc32c_matches_rfc3720_b4_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let incrementing: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&incrementing), 0x46dd_794e);
        let decrementing: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&decrementing), 0x113f_db5c);
        // B.4 lists the zeros' CRC as the wire bytes aa 36 91 8a: LSB first.
        assert_eq!(0x8a91_36aau32.to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    }

    #[test]
    fn crc_over_pieces_equals_crc_over_concatenation() {
        let whole: Vec<u8> = (0..100).collect();
        let pieces = [&whole[..7], &whole[7..50], &whole[50..]];
        assert_eq!(crc32c_of_pieces(pieces), crc32c(&whole));
    }

    #[test]
    fn opcode_codes_round_trip_and_directions() {
        for code in 0..0x40u8 {
            let op = Opcode::from_code(code);
            assert_eq!(op.code(), code);
            assert_eq!(op.is_initiator(), code < 0x20);
        }
        assert_eq!(
            Opcode::from_code(0x41),
            Opcode::ScsiCommand,
            "I bit ignored"
        );
        assert_eq!(Opcode::from_code(0x25), Opcode::DataIn);
        assert_eq!(Opcode::from_code(0x31), Opcode::ReadyToTransfer);
        assert_eq!(Opcode::from_code(0x3f), Opcode::Reject);
        assert_eq!(Opcode::from_code(0x1c), Opcode::Other(0x1c));
    }

    fn frame_bytes(pdu: &Pdu, digests: Digests) -> Bytes {
        pdu.encode(digests).unwrap().to_bytes()
    }

    fn decode_all(bytes: &[u8], digests: Digests) -> Vec<ReceivedPdu> {
        let decoder = PduDecoder::new(digests);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(pdu) = decoder.decode(&mut buf).unwrap() {
            out.push(pdu);
        }
        assert!(buf.is_empty(), "left {} bytes", buf.len());
        out
    }

    fn sample_pdu(data_len: usize, ahs_len: usize) -> Pdu {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_itt(0x1234_5678);
        Pdu {
            bhs,
            ahs: Bytes::from(vec![0xa5; ahs_len]),
            data: Bytes::from((0..data_len).map(|i| i as u8).collect::<Vec<_>>()),
        }
    }

    #[test]
    fn encode_lays_out_header_padding_and_digests() {
        let pdu = sample_pdu(5, 4);
        let digests = Digests {
            header: true,
            data: true,
        };
        let wire = frame_bytes(&pdu, digests);
        // 48 BHS + 4 AHS + 4 HD + 5 data + 3 pad + 4 DD
        assert_eq!(wire.len(), 48 + 4 + 4 + 5 + 3 + 4);
        assert_eq!(wire[4], 1, "TotalAHSLength in words");
        assert_eq!(&wire[5..8], &[0, 0, 5], "DataSegmentLength without padding");
        let hd = u32::from_le_bytes(wire[52..56].try_into().unwrap());
        assert_eq!(hd, crc32c(&wire[..52]));
        assert_eq!(&wire[61..64], &[0, 0, 0], "zero padding");
        let dd = u32::from_le_bytes(wire[64..68].try_into().unwrap());
        assert_eq!(dd, crc32c(&wire[56..64]), "data digest covers padding");
    }

    #[test]
    fn no_data_digest_for_empty_data_segment() {
        let pdu = sample_pdu(0, 0);
        let wire = frame_bytes(
            &pdu,
            Digests {
                header: false,
                data: true,
            },
        );
        assert_eq!(wire.len(), 48);
        let got = decode_all(
            &wire,
            Digests {
                header: false,
                data: true,
            },
        );
        assert_eq!(got[0].pdu, pdu);
    }

    #[test]
    fn decode_is_zero_copy_and_keeps_wire_bytes() {
        let pdu = sample_pdu(10, 8);
        let digests = Digests {
            header: true,
            data: true,
        };
        let wire = frame_bytes(&pdu, digests);
        let got = decode_all(&wire, digests);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].wire, wire);
        let mut expected = pdu.clone();
        expected.bhs.set_total_ahs_len(8);
        expected.bhs.set_data_segment_length(10);
        assert_eq!(got[0].pdu, expected);
        // The data segment points into the wire buffer: no copy.
        let wire_range = got[0].wire.as_ptr_range();
        assert!(wire_range.contains(&got[0].pdu.data.as_ptr()));
        assert!(wire_range.contains(&got[0].pdu.ahs.as_ptr()));
    }

    #[test]
    fn decode_waits_for_each_byte_and_reserves() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let wire = frame_bytes(&sample_pdu(13, 0), digests);
        let decoder = PduDecoder::new(digests);
        let mut buf = BytesMut::new();
        for (i, byte) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let got = decoder.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == wire.len() - 1, "at byte {i}");
            if got.is_none() && i >= BHS_LEN + DIGEST_LEN {
                assert!(buf.capacity() >= wire.len());
            }
        }
    }

    #[test]
    fn decodes_back_to_back_pdus() {
        let mut wire = BytesMut::new();
        for len in [0, 1, 2, 3, 4, 4097] {
            wire.extend_from_slice(&frame_bytes(&sample_pdu(len, 0), Digests::NONE));
        }
        let got = decode_all(&wire, Digests::NONE);
        let lens: Vec<usize> = got.iter().map(|p| p.pdu.data.len()).collect();
        assert_eq!(lens, [0, 1, 2, 3, 4, 4097]);
    }

    #[test]
    fn header_digest_mismatch_is_an_error_before_the_data_arrives() {
        let digests = Digests {
            header: true,
            data: false,
        };
        let mut wire = BytesMut::from(&frame_bytes(&sample_pdu(1000, 0), digests)[..]);
        wire[20] ^= 1;
        wire.truncate(BHS_LEN + DIGEST_LEN); // only the header has arrived
        let err = PduDecoder::new(digests).decode(&mut wire).unwrap_err();
        assert!(matches!(err, DecodeError::HeaderDigest { .. }), "{err}");
    }

    #[test]
    fn data_digest_mismatch_is_an_error() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut wire = BytesMut::from(&frame_bytes(&sample_pdu(6, 0), digests)[..]);
        let last = wire.len() - 5; // a padding byte: padding is covered too
        wire[last] ^= 0x80;
        let err = PduDecoder::new(digests).decode(&mut wire).unwrap_err();
        assert!(matches!(err, DecodeError::DataDigest { .. }), "{err}");
    }

    #[test]
    fn oversized_data_segment_is_refused_from_the_header() {
        let mut decoder = PduDecoder::new(Digests::NONE);
        decoder.set_max_data_segment_length(8192);
        let mut buf = BytesMut::from(&frame_bytes(&sample_pdu(8193, 0), Digests::NONE)[..48]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(DecodeError::DataSegmentTooLong {
                length: 8193,
                limit: 8192
            })
        );
        let mut ok = BytesMut::from(&frame_bytes(&sample_pdu(8192, 0), Digests::NONE)[..]);
        assert!(decoder.decode(&mut ok).unwrap().is_some());
    }

    #[test]
    fn encode_refuses_bad_lengths() {
        let bhs = Bhs::new(Opcode::NopOut);
        assert_eq!(
            encode(&bhs, Bytes::from_static(&[0; 3]), &[], Digests::NONE).unwrap_err(),
            EncodeError::AhsLength(3)
        );
        let big = Bytes::from(vec![0; MAX_DATA_SEGMENT_LENGTH as usize + 1]);
        assert!(matches!(
            encode(&bhs, Bytes::new(), &[big], Digests::NONE),
            Err(EncodeError::DataTooLong(_))
        ));
    }

    #[test]
    fn frame_from_pieces_equals_frame_from_one_buffer_and_shares_them() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let bhs = Bhs::new(Opcode::DataIn);
        let a = Bytes::from(vec![1u8; 511]);
        let b = Bytes::from(vec![2u8; 7]);
        let joined = Bytes::from([&a[..], &b[..]].concat());
        let split = encode(&bhs, Bytes::new(), &[a.clone(), b.clone()], digests).unwrap();
        let whole = encode(&bhs, Bytes::new(), &[joined], digests).unwrap();
        assert_eq!(split.to_bytes(), whole.to_bytes());
        let mut slices = [IoSlice::new(&[]); 8];
        let n = split.chunks_vectored(&mut slices);
        assert_eq!(n, 4, "header, two data pieces, trailer");
        assert_eq!(slices[1].as_ptr(), a.as_ptr(), "data piece not copied");
    }

    #[test]
    fn frame_buf_advances_across_pieces() {
        let bhs = Bhs::new(Opcode::DataIn);
        let mut frame = encode(
            &bhs,
            Bytes::new(),
            &[Bytes::from_static(b"abc"), Bytes::from_static(b"defg")],
            Digests::NONE,
        )
        .unwrap();
        let mut second = frame.clone();
        assert_eq!(frame.remaining(), 48 + 8);
        frame.advance(49);
        assert_eq!(frame.chunk(), b"bc");
        frame.advance(4);
        assert_eq!(frame.chunk(), b"fg");
        frame.advance(3);
        assert_eq!(frame.chunk(), &[] as &[u8]);
        assert_eq!(frame.remaining(), 0);
        let total = second.remaining();
        second.append(second.clone());
        assert_eq!(second.remaining(), 2 * total);
        assert_eq!(second.copy_to_bytes(2 * total).len(), 2 * total);
    }

    #[test]
    fn common_fields() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_immediate(true);
        assert!(bhs.immediate());
        assert_eq!(bhs.0[0], 0x41);
        bhs.set_final_bit(true);
        assert!(bhs.final_bit());
        assert_eq!(bhs.flags(), 0x80);
        bhs.set_lun(0x0001_0000_0000_0000);
        assert_eq!(&bhs.0[8..16], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bhs.lun(), 0x0001_0000_0000_0000);
        bhs.set_itt(0xdead_beef);
        assert_eq!(&bhs.0[16..20], &[0xde, 0xad, 0xbe, 0xef]);
        bhs.set_total_ahs_len(8);
        assert_eq!(bhs.total_ahs_len(), 8);
        bhs.set_data_segment_length(0x01_0203);
        assert_eq!(&bhs.0[5..8], &[1, 2, 3]);
        assert_eq!(bhs.data_segment_length(), 0x01_0203);
        bhs.set_immediate(false);
        bhs.set_final_bit(false);
        assert_eq!(bhs.0[0], 0x01);
        assert_eq!(bhs.flags(), 0);
    }

    #[test]
    fn sequence_number_fields_by_direction() {
        let mut cmd = Bhs::new(Opcode::ScsiCommand);
        cmd.set_cmd_sn(7);
        cmd.set_exp_stat_sn(9);
        assert_eq!(&cmd.0[24..28], &7u32.to_be_bytes());
        assert_eq!(&cmd.0[28..32], &9u32.to_be_bytes());
        assert_eq!((cmd.cmd_sn(), cmd.exp_stat_sn()), (7, 9));

        let mut resp = Bhs::new(Opcode::ScsiResponse);
        resp.set_stat_sn(1);
        resp.set_exp_cmd_sn(2);
        resp.set_max_cmd_sn(3);
        assert_eq!(&resp.0[24..36], &[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(
            (resp.stat_sn(), resp.exp_cmd_sn(), resp.max_cmd_sn()),
            (1, 2, 3)
        );
    }

    #[test]
    fn which_pdus_advance_stat_sn() {
        let mut data_in = Bhs::new(Opcode::DataIn);
        assert!(!data_in.advances_stat_sn());
        data_in.set_flags(data_in_flags::FINAL | data_in_flags::STATUS);
        assert!(data_in.advances_stat_sn());
        let mut nop_in = Bhs::new(Opcode::NopIn);
        nop_in.set_itt(RESERVED_TAG);
        assert!(!nop_in.advances_stat_sn(), "unsolicited NOP-In");
        nop_in.set_itt(5);
        assert!(nop_in.advances_stat_sn(), "NOP-In answering a ping");
        assert!(!Bhs::new(Opcode::ReadyToTransfer).advances_stat_sn());
        for op in [
            Opcode::ScsiResponse,
            Opcode::TaskManagementResponse,
            Opcode::TextResponse,
            Opcode::LogoutResponse,
            Opcode::AsyncMessage,
            Opcode::Reject,
        ] {
            assert!(Bhs::new(op).advances_stat_sn(), "{op:?}");
        }
    }

    #[test]
    fn which_pdus_advance_cmd_sn() {
        let mut cmd = Bhs::new(Opcode::ScsiCommand);
        assert!(cmd.advances_cmd_sn());
        cmd.set_immediate(true);
        assert!(!cmd.advances_cmd_sn());
        assert!(!Bhs::new(Opcode::DataOut).advances_cmd_sn());
        assert!(!Bhs::new(Opcode::Snack).advances_cmd_sn());
        assert!(Bhs::new(Opcode::NopOut).advances_cmd_sn());
        assert!(Bhs::new(Opcode::TaskManagementRequest).advances_cmd_sn());
        assert!(Bhs::new(Opcode::TextRequest).advances_cmd_sn());
        assert!(Bhs::new(Opcode::LogoutRequest).advances_cmd_sn());
    }

    #[test]
    fn scsi_command_fields() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_flags(0x80);
        bhs.set_command_read(true);
        assert_eq!(bhs.flags(), 0xc0);
        bhs.set_command_write(true);
        assert_eq!(bhs.flags(), 0xe0);
        bhs.set_command_attr(1);
        assert_eq!(bhs.flags(), 0xe1);
        assert!(bhs.command_read() && bhs.command_write() && bhs.final_bit());
        assert_eq!(bhs.command_attr(), 1);
        bhs.set_command_read(false);
        bhs.set_command_write(false);
        assert_eq!(bhs.flags(), 0x81);
        bhs.set_expected_data_transfer_length(4096);
        assert_eq!(&bhs.0[20..24], &[0, 0, 0x10, 0]);
        assert_eq!(bhs.expected_data_transfer_length(), 4096);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x28;
        cdb[15] = 0xee;
        bhs.set_cdb(&cdb);
        assert_eq!(bhs.0[32], 0x28);
        assert_eq!(bhs.0[47], 0xee);
        assert_eq!(bhs.cdb(), &cdb);
    }

    #[test]
    fn data_in_fields() {
        // The flag byte as a real target sends it: F|S|U.
        let mut bhs = Bhs::new(Opcode::DataIn);
        bhs.0[1] = 0x83;
        bhs.0[3] = 0x02;
        bhs.0[36..40].copy_from_slice(&3u32.to_be_bytes());
        bhs.0[40..44].copy_from_slice(&8192u32.to_be_bytes());
        bhs.0[44..48].copy_from_slice(&512u32.to_be_bytes());
        bhs.set_ttt(RESERVED_TAG);
        assert!(bhs.final_bit() && bhs.data_in_status() && bhs.residual_underflow());
        assert!(!bhs.residual_overflow() && !bhs.data_in_acknowledge());
        assert_eq!(bhs.status(), 2);
        assert_eq!(bhs.data_sn(), 3);
        assert_eq!(bhs.buffer_offset(), 8192);
        assert_eq!(bhs.residual(), Residual::Underflow(512));
        assert_eq!(bhs.ttt(), RESERVED_TAG);
        bhs.0[1] = 0x40;
        assert!(bhs.data_in_acknowledge());

        let mut built = Bhs::new(Opcode::DataIn);
        built.set_final_bit(true);
        built.set_flags(built.flags() | data_in_flags::STATUS);
        built.set_residual(Residual::Overflow(10));
        assert_eq!(built.flags(), 0x85);
        assert_eq!(built.residual_count(), 10);
        built.set_residual(Residual::Underflow(4));
        assert_eq!(built.flags(), 0x83);
        built.set_residual(Residual::None);
        assert_eq!(built.flags(), 0x81);
        assert_eq!(built.residual_count(), 0);
        built.set_data_sn(9);
        built.set_buffer_offset(100);
        built.set_status(0);
        assert_eq!(&built.0[36..44], &[0, 0, 0, 9, 0, 0, 0, 100]);
    }

    #[test]
    fn scsi_response_fields() {
        let mut bhs = Bhs::new(Opcode::ScsiResponse);
        bhs.0[1] = 0x80 | 0x10 | 0x08 | 0x04;
        bhs.0[2] = 0x01;
        bhs.0[3] = 0x02;
        bhs.0[36..40].copy_from_slice(&4u32.to_be_bytes());
        bhs.0[40..44].copy_from_slice(&77u32.to_be_bytes());
        bhs.0[44..48].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(bhs.response(), 1);
        assert_eq!(bhs.status(), 2);
        assert_eq!(bhs.bidi_residual_flags(), (true, true));
        assert_eq!(bhs.residual(), Residual::Overflow(99));
        assert_eq!(bhs.data_sn(), 4, "ExpDataSN");
        assert_eq!(bhs.bidi_read_residual_count(), 77);
        bhs.set_response(0);
        bhs.set_status(0);
        assert_eq!(&bhs.0[2..4], &[0, 0]);
    }

    #[test]
    fn nop_fields() {
        let mut bhs = Bhs::new(Opcode::NopIn);
        bhs.0[20..24].copy_from_slice(&0x0000_0010u32.to_be_bytes());
        assert_eq!(bhs.ttt(), 0x10);
        bhs.set_ttt(RESERVED_TAG);
        assert_eq!(&bhs.0[20..24], &[0xff; 4]);
        let mut out = Bhs::new(Opcode::NopOut);
        out.set_immediate(true);
        out.set_final_bit(true);
        assert_eq!(&out.0[..2], &[0x40, 0x80]);
    }

    #[test]
    fn task_management_fields() {
        let mut bhs = Bhs::new(Opcode::TaskManagementRequest);
        bhs.0[1] = 0x81;
        assert_eq!(bhs.tmf_function(), TmfFunction::AbortTask);
        for code in 1..=8u8 {
            bhs.0[1] = 0x80 | code;
            assert_eq!(bhs.tmf_function().code(), code);
        }
        assert_eq!(TmfFunction::from_code(9), TmfFunction::Other(9));
        bhs.set_tmf_function(TmfFunction::LogicalUnitReset);
        assert_eq!(bhs.0[1], 0x85);
        bhs.set_referenced_task_tag(0x55);
        bhs.set_ref_cmd_sn(0x66);
        assert_eq!(&bhs.0[20..24], &[0, 0, 0, 0x55]);
        assert_eq!(&bhs.0[32..36], &[0, 0, 0, 0x66]);
        assert_eq!((bhs.referenced_task_tag(), bhs.ref_cmd_sn()), (0x55, 0x66));
        let mut resp = Bhs::new(Opcode::TaskManagementResponse);
        resp.set_response(tmf_response::TASK_DOES_NOT_EXIST);
        assert_eq!(resp.0[2], 1);
    }

    #[test]
    fn login_fields() {
        let mut bhs = Bhs::new(Opcode::LoginRequest);
        bhs.0[0] = 0x43;
        bhs.0[1] = 0x87; // T, CSG 1, NSG 3
        bhs.0[2] = 0;
        bhs.0[3] = 0;
        bhs.0[8..14].copy_from_slice(&[0x80, 1, 2, 3, 4, 5]);
        bhs.0[14..16].copy_from_slice(&[0x12, 0x34]);
        bhs.0[20..22].copy_from_slice(&[0, 7]);
        assert!(bhs.immediate());
        assert_eq!(bhs.opcode(), Opcode::LoginRequest);
        assert!(bhs.login_transit() && !bhs.text_continue());
        assert_eq!(bhs.login_csg(), LoginStage::OperationalNegotiation);
        assert_eq!(bhs.login_nsg(), LoginStage::FullFeature);
        assert_eq!(bhs.isid(), [0x80, 1, 2, 3, 4, 5]);
        assert_eq!(bhs.tsih(), 0x1234);
        assert_eq!(bhs.cid(), 7);
        assert_eq!(
            (bhs.login_version_max(), bhs.login_version_min_or_active()),
            (0, 0)
        );
        bhs.set_text_continue(true);
        bhs.set_login_transit(false);
        assert_eq!(bhs.0[1], 0x47);
        bhs.set_login_stages(
            LoginStage::SecurityNegotiation,
            LoginStage::OperationalNegotiation,
        );
        assert_eq!(bhs.0[1], 0x41);
        bhs.set_isid([9; 6]);
        bhs.set_tsih(1);
        assert_eq!(&bhs.0[8..16], &[9, 9, 9, 9, 9, 9, 0, 1]);
        assert_eq!(LoginStage::from_code(2), LoginStage::Reserved);

        let mut resp = Bhs::new(Opcode::LoginResponse);
        resp.set_login_status(2, 1);
        assert_eq!(&resp.0[36..38], &[2, 1]);
        assert_eq!(
            (resp.login_status_class(), resp.login_status_detail()),
            (2, 1)
        );
    }

    #[test]
    fn text_fields() {
        let mut bhs = Bhs::new(Opcode::TextRequest);
        bhs.0[1] = 0x40;
        assert!(bhs.text_continue() && !bhs.final_bit());
        bhs.0[1] = 0x80;
        assert!(!bhs.text_continue() && bhs.final_bit());
        bhs.set_ttt(3);
        assert_eq!(bhs.ttt(), 3);
    }

    #[test]
    fn logout_fields() {
        let mut req = Bhs::new(Opcode::LogoutRequest);
        req.0[1] = 0x81;
        req.0[20..22].copy_from_slice(&[0, 2]);
        assert_eq!(req.logout_reason(), 1);
        assert_eq!(req.cid(), 2);
        let mut resp = Bhs::new(Opcode::LogoutResponse);
        resp.0[2] = 0;
        resp.0[40..44].copy_from_slice(&[0, 2, 0, 20]);
        assert_eq!(resp.response(), 0);
        assert_eq!(resp.logout_time2wait(), 2);
        assert_eq!(resp.logout_time2retain(), 20);
    }

    #[test]
    fn async_message_fields() {
        let mut bhs = Bhs::new(Opcode::AsyncMessage);
        bhs.0[36] = 1;
        bhs.0[37] = 0;
        bhs.0[38..44].copy_from_slice(&[0, 1, 0, 2, 0, 3]);
        assert_eq!(bhs.async_event(), 1);
        assert_eq!(bhs.async_vcode(), 0);
        assert_eq!(bhs.async_parameters(), [1, 2, 3]);
    }

    #[test]
    fn reject_r2t_and_snack_fields() {
        let mut reject = Bhs::new(Opcode::Reject);
        reject.0[2] = 0x09;
        assert_eq!(reject.reject_reason(), 9);
        let mut r2t = Bhs::new(Opcode::ReadyToTransfer);
        r2t.0[36..48].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0x20, 0, 0, 1, 0, 0]);
        assert_eq!(r2t.data_sn(), 1, "R2TSN");
        assert_eq!(r2t.buffer_offset(), 0x2000);
        assert_eq!(r2t.residual_count(), 0x1_0000, "DesiredDataTransferLength");
        let mut snack = Bhs::new(Opcode::Snack);
        snack.0[1] = 0x81;
        assert_eq!(snack.snack_type(), 1);
    }

    fn arb_pdu() -> impl Strategy<Value = Pdu> {
        (
            proptest::array::uniform32(any::<u8>()),
            proptest::array::uniform16(any::<u8>()),
            0usize..8,
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(head, tail, ahs_words, data)| {
                let mut raw = [0u8; BHS_LEN];
                raw[..32].copy_from_slice(&head);
                raw[32..].copy_from_slice(&tail);
                let mut bhs = Bhs(raw);
                bhs.set_total_ahs_len(ahs_words * 4);
                bhs.set_data_segment_length(data.len() as u32);
                Pdu {
                    bhs,
                    ahs: Bytes::from(vec![0x5a; ahs_words * 4]),
                    data: Bytes::from(data),
                }
            })
    }

    fn arb_digests() -> impl Strategy<Value = Digests> {
        (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(pdus in proptest::collection::vec(arb_pdu(), 1..4), digests in arb_digests(), split in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for pdu in &pdus {
                wire.extend_from_slice(&pdu.encode(digests).unwrap().to_bytes());
            }
            // Deliver in two reads split at an arbitrary point.
            let cut = split.index(wire.len() + 1);
            let rest = wire.split_off(cut);
            let decoder = PduDecoder::new(digests);
            let mut got = Vec::new();
            while let Some(p) = decoder.decode(&mut wire).unwrap() { got.push(p.pdu); }
            wire.extend_from_slice(&rest);
            while let Some(p) = decoder.decode(&mut wire).unwrap() { got.push(p.pdu); }
            prop_assert!(wire.is_empty());
            prop_assert_eq!(got, pdus);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), digests in arb_digests(), limit in any::<u32>()) {
            let mut decoder = PduDecoder::new(digests);
            decoder.set_max_data_segment_length(limit);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }
    }
}
