//! Ring-buffer records sent from XDP to user space.

use crate::flow::FlowKey;

/// How many bytes of a Login Request segment's TCP payload are copied (BHS + text).
pub const LOGIN_CAPTURE_MAX: usize = 1024;

/// The first segment of an iSCSI Login Request (opcode 0x03) on a classified flow:
/// user space parses InitiatorName / TargetName out of `data[..len]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoginEvent {
    pub key: FlowKey,
    /// Bytes of `data` that are valid.
    pub len: u32,
    pub data: [u8; LOGIN_CAPTURE_MAX],
}

const _: () = assert!(core::mem::size_of::<LoginEvent>() == 44 + 4 + LOGIN_CAPTURE_MAX);
