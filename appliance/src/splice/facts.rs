//! What the target itself says about a served LUN: its logical block length and
//! capacity (READ CAPACITY(10/16)) and whether it is write-protected (the WP bit of
//! MODE SENSE(6/10)), read from the target's answers to initiators' own commands as
//! they pass through.
//!
//! Why: a READ's LBA means `LBA × block length` bytes, and a configured block length
//! that differs from the target's (a LUN exported with 4096-byte blocks, a config
//! left at 512) serves the wrong bytes with GOOD status. So a LUN is served only
//! once the target's block length and capacity are known and agree with the config
//! (when it declares one) and with the manifest ([`disagreement`]); until then, and
//! whenever they disagree, its READs pass through.
//!
//! Facts are kept per declared LUN (not per session): the conformance suite, like
//! other tools, asks READ CAPACITY once and then opens many sessions. Every later
//! answer refreshes them, so a re-exported LUN whose block length changed stops
//! being served at the first READ CAPACITY any session sends.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// SCSI opcodes of the commands whose answers carry facts.
pub mod probe_opcode {
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// SERVICE ACTION IN(16); service action 0x10 is READ CAPACITY(16).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const READ_CAPACITY_16_ACTION: u8 = 0x10;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const MODE_SENSE_10: u8 = 0x5a;
}

/// A command whose answer tells a fact about its LUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    ReadCapacity10,
    ReadCapacity16,
    ModeSense6,
    ModeSense10,
}

impl Probe {
    /// The probe a CDB is, if any.
    pub fn of(cdb: &[u8; 16]) -> Option<Probe> {
        use probe_opcode::{
            MODE_SENSE_10, MODE_SENSE_6, READ_CAPACITY_10, READ_CAPACITY_16_ACTION,
            SERVICE_ACTION_IN_16,
        };
        match cdb[0] {
            READ_CAPACITY_10 => Some(Probe::ReadCapacity10),
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == READ_CAPACITY_16_ACTION => {
                Some(Probe::ReadCapacity16)
            }
            MODE_SENSE_6 => Some(Probe::ModeSense6),
            MODE_SENSE_10 => Some(Probe::ModeSense10),
            _ => None,
        }
    }
}

/// One fact read from the first bytes of a probe's Data-In.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fact {
    /// Block length in bytes and capacity in blocks (last LBA + 1).
    Geometry {
        block_length: u32,
        capacity: u64,
    },
    WriteProtected(bool),
}

/// The fact in a probe's answer (`data` from buffer offset 0), if the answer is long
/// enough and sane. READ CAPACITY(10)'s last LBA of `0xffff_ffff` means "too large,
/// ask READ CAPACITY(16)": no fact.
pub fn parse_answer(probe: Probe, data: &[u8]) -> Option<Fact> {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let geometry = |last_lba: u64, block_length: u32| {
        let sane = block_length.is_power_of_two() && (512..=1 << 20).contains(&block_length);
        let capacity = last_lba.checked_add(1)?;
        sane.then_some(Fact::Geometry {
            block_length,
            capacity,
        })
    };
    match probe {
        Probe::ReadCapacity10 if data.len() >= 8 => {
            let last = be32(&data[0..4]);
            if last == u32::MAX {
                return None;
            }
            geometry(u64::from(last), be32(&data[4..8]))
        }
        Probe::ReadCapacity16 if data.len() >= 12 => {
            let mut last = [0u8; 8];
            last.copy_from_slice(&data[0..8]);
            geometry(u64::from_be_bytes(last), be32(&data[8..12]))
        }
        // Mode parameter header: the device-specific parameter's bit 7 is WP
        // (SBC-4 §6.5.1) — byte 2 of the 6-byte form, byte 3 of the 10-byte form.
        Probe::ModeSense6 if data.len() >= 4 => Some(Fact::WriteProtected(data[2] & 0x80 != 0)),
        Probe::ModeSense10 if data.len() >= 8 => Some(Fact::WriteProtected(data[3] & 0x80 != 0)),
        _ => None,
    }
}

const UNKNOWN_U32: u32 = 0;
const UNKNOWN_U64: u64 = u64::MAX;
const WP_UNKNOWN: u8 = 0;
const WP_NO: u8 = 1;
const WP_YES: u8 = 2;

/// A declared LUN's facts as last reported by its target (lock-free: read per READ).
#[derive(Debug)]
pub struct TargetFacts {
    block_length: AtomicU32,
    capacity: AtomicU64,
    write_protected: AtomicU8,
}

impl Default for TargetFacts {
    fn default() -> Self {
        TargetFacts {
            block_length: AtomicU32::new(UNKNOWN_U32),
            capacity: AtomicU64::new(UNKNOWN_U64),
            write_protected: AtomicU8::new(WP_UNKNOWN),
        }
    }
}

/// A snapshot of [`TargetFacts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    pub block_length: Option<u32>,
    pub capacity_blocks: Option<u64>,
    pub write_protected: Option<bool>,
}

impl TargetFacts {
    pub fn record(&self, fact: Fact) {
        match fact {
            Fact::Geometry {
                block_length,
                capacity,
            } => {
                // Capacity first: a reader that sees the new length sees a capacity
                // of the same answer or a later one, never an older one with it.
                self.capacity.store(capacity, Ordering::Release);
                self.block_length.store(block_length, Ordering::Release);
            }
            Fact::WriteProtected(wp) => self
                .write_protected
                .store(if wp { WP_YES } else { WP_NO }, Ordering::Release),
        }
    }

    pub fn get(&self) -> Facts {
        let block_length = self.block_length.load(Ordering::Acquire);
        let capacity = self.capacity.load(Ordering::Acquire);
        Facts {
            block_length: (block_length != UNKNOWN_U32).then_some(block_length),
            capacity_blocks: (capacity != UNKNOWN_U64).then_some(capacity),
            write_protected: match self.write_protected.load(Ordering::Acquire) {
                WP_YES => Some(true),
                WP_NO => Some(false),
                _ => None,
            },
        }
    }

    /// The target said the LUN is write-protected (and has not said otherwise since).
    pub fn write_protected(&self) -> bool {
        self.write_protected.load(Ordering::Acquire) == WP_YES
    }
}

/// Why a LUN must not be served with these facts, or `None` when it may be: the
/// target's block length must be known, equal the declared one (if declared) and
/// divide the manifest's block size; the target's capacity must be known and cover
/// exactly the manifest's bytes (the last partial block of an image whose size is
/// not a multiple of the block length is not addressable, as tgt rounds down).
pub fn disagreement(
    facts: &Facts,
    declared_block_length: Option<u32>,
    manifest_size: u64,
    manifest_block_size: u32,
) -> Option<String> {
    let Some(block_length) = facts.block_length else {
        return Some(
            "the target's block length is not known yet (no READ CAPACITY answer seen)".into(),
        );
    };
    let Some(capacity) = facts.capacity_blocks else {
        return Some("the target's capacity is not known yet".into());
    };
    if let Some(declared) = declared_block_length {
        if declared != block_length {
            return Some(format!(
                "logical_block_size {declared} is declared but the target reports {block_length}"
            ));
        }
    }
    if !manifest_block_size.is_multiple_of(block_length) {
        return Some(format!(
            "the manifest's block size {manifest_block_size} is not a multiple of the target's block length {block_length}"
        ));
    }
    if manifest_size / u64::from(block_length) != capacity {
        return Some(format!(
            "the target reports {capacity} blocks of {block_length} bytes; the manifest describes {manifest_size} bytes"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn probes_are_recognised() {
        assert_eq!(Probe::of(&cdb(&[0x25])), Some(Probe::ReadCapacity10));
        assert_eq!(Probe::of(&cdb(&[0x9e, 0x10])), Some(Probe::ReadCapacity16));
        // GET LBA STATUS is another SERVICE ACTION IN(16).
        assert_eq!(Probe::of(&cdb(&[0x9e, 0x12])), None);
        assert_eq!(Probe::of(&cdb(&[0x1a])), Some(Probe::ModeSense6));
        assert_eq!(Probe::of(&cdb(&[0x5a])), Some(Probe::ModeSense10));
        assert_eq!(Probe::of(&cdb(&[0x28])), None);
    }

    #[test]
    fn read_capacity_answers() {
        let rc10 = [0, 0, 0x3f, 0xff, 0, 0, 0x10, 0];
        assert_eq!(
            parse_answer(Probe::ReadCapacity10, &rc10),
            Some(Fact::Geometry {
                block_length: 4096,
                capacity: 0x4000
            })
        );
        let mut rc16 = [0u8; 32];
        rc16[4..8].copy_from_slice(&0x0001_ffffu32.to_be_bytes());
        rc16[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_answer(Probe::ReadCapacity16, &rc16),
            Some(Fact::Geometry {
                block_length: 512,
                capacity: 0x2_0000
            })
        );
        // Too large for READ CAPACITY(10), short answers, absurd lengths: no fact.
        assert_eq!(parse_answer(Probe::ReadCapacity10, &[0xff; 8]), None);
        assert_eq!(parse_answer(Probe::ReadCapacity10, &rc10[..7]), None);
        assert_eq!(
            parse_answer(Probe::ReadCapacity10, &[0, 0, 0, 1, 0, 0, 0x02, 1]),
            None
        );
        assert_eq!(parse_answer(Probe::ReadCapacity16, &[0xff; 12]), None);
    }

    #[test]
    fn mode_sense_write_protect_bit() {
        assert_eq!(
            parse_answer(Probe::ModeSense6, &[0x0b, 0, 0x80, 8]),
            Some(Fact::WriteProtected(true))
        );
        assert_eq!(
            parse_answer(Probe::ModeSense10, &[0, 0x0e, 0, 0x00, 0, 0, 0, 8]),
            Some(Fact::WriteProtected(false))
        );
        assert_eq!(parse_answer(Probe::ModeSense10, &[0, 0x0e, 0, 0x80]), None);
    }

    #[test]
    fn facts_are_recorded_and_read_back() {
        let f = TargetFacts::default();
        assert_eq!(f.get(), Facts::default());
        f.record(Fact::Geometry {
            block_length: 4096,
            capacity: 10,
        });
        f.record(Fact::WriteProtected(true));
        assert_eq!(
            f.get(),
            Facts {
                block_length: Some(4096),
                capacity_blocks: Some(10),
                write_protected: Some(true)
            }
        );
        assert!(f.write_protected());
        f.record(Fact::WriteProtected(false));
        assert!(!f.write_protected());
    }

    #[test]
    fn served_only_when_the_target_agrees() {
        let known = |bl, cap| Facts {
            block_length: Some(bl),
            capacity_blocks: Some(cap),
            write_protected: None,
        };
        let mib64 = 64u64 << 20;
        assert!(disagreement(&Facts::default(), None, mib64, 65536).is_some());
        // Not declared: the target's length is used.
        assert_eq!(disagreement(&known(4096, 16384), None, mib64, 65536), None);
        assert_eq!(
            disagreement(&known(4096, 16384), Some(4096), mib64, 65536),
            None
        );
        let why = disagreement(&known(4096, 16384), Some(512), mib64, 65536).unwrap();
        assert!(why.contains("declared"), "{why}");
        assert!(disagreement(&known(4096, 16383), None, mib64, 65536).is_some());
        assert!(disagreement(&known(4096, 16384), None, mib64, 2048).is_some());
        // tgt rounds an image's last partial block down.
        assert_eq!(disagreement(&known(4096, 1), None, 4096 + 100, 4096), None);
    }
}
