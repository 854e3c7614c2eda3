//! How a LUN is addressed: the 8-byte LUN field of a SCSI command decoded to
//! the LUN's number (one canonical encoding only), and the `TARGET/LUN` name
//! status, logs and history files use.

/// The LUN number of an 8-byte LUN field, if it is in the one canonical encoding
/// initiators use (SAM single-level): peripheral addressing with bus 0 below 256,
/// flat space from 256. Anything else (a peripheral bus other than 0, flat space
/// below 256, a second level, other methods) is `None` and passes through: a target
/// may map such a field to a LUN other than the one the splicer would pick, and two
/// encodings of one number must never select different LUNs here and at the target.
pub fn lun_number(field: u64) -> Option<u16> {
    let bytes = field.to_be_bytes();
    if bytes[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match bytes[0] >> 6 {
        0 if bytes[0] == 0 => Some(u16::from(bytes[1])),
        1 => {
            let n = (u16::from(bytes[0] & 0x3f) << 8) | u16::from(bytes[1]);
            (n >= 256).then_some(n)
        }
        _ => None,
    }
}

/// A LUN's name for humans and file names: `TARGET/LUN`.
pub fn lun_name(target: &str, lun: u16) -> String {
    format!("{target}/{lun}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_numbers() {
        assert_eq!(lun_number(0x0001_0000_0000_0000), Some(1));
        assert_eq!(lun_number(0), Some(0));
        assert_eq!(lun_number(0x4101_0000_0000_0000), Some(0x101));
        assert_eq!(lun_number(0x0001_0000_0000_0001), None);
        assert_eq!(lun_number(0x8001_0000_0000_0000), None);
        // Peripheral addressing on bus 1 would read as 257 with the bus ignored.
        assert_eq!(lun_number(0x0101_0000_0000_0000), None);
        // Flat space below 256 aliases the peripheral form of the same number.
        assert_eq!(lun_number(0x4001_0000_0000_0000), None);
        assert_eq!(lun_number(0x40ff_0000_0000_0000), None);
        assert_eq!(lun_number(0x4100_0000_0000_0000), Some(256));
        assert_eq!(lun_number(0x7fff_0000_0000_0000), Some(0x3fff));
    }
}
