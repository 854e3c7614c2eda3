//! iSCSI text parameters (RFC 7143 §6): `key=value` pairs separated by NUL bytes,
//! as carried in Login and Text PDUs' data segments.

/// Iterate over the `key=value` pairs of a text data segment. Malformed entries
/// (no `=`, not UTF-8) are skipped; trailing NULs and padding are ignored.
pub fn pairs(data: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    data.split(|&b| b == 0).filter_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.split_once('=')
    })
}

/// The value of `key` in a text data segment, if present.
pub fn value<'a>(data: &'a [u8], key: &str) -> Option<&'a str> {
    pairs(data).find(|(k, _)| *k == key).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_skips_garbage() {
        let d = b"InitiatorName=iqn.a\0TargetName=iqn.b:t1\0junk\0\xff=1\0\0\0";
        let v: Vec<_> = pairs(d).collect();
        assert_eq!(v, [("InitiatorName", "iqn.a"), ("TargetName", "iqn.b:t1")]);
        assert_eq!(value(d, "TargetName"), Some("iqn.b:t1"));
        assert_eq!(value(d, "SessionType"), None);
    }

    #[test]
    fn value_may_contain_equals() {
        assert_eq!(value(b"X=a=b\0", "X"), Some("a=b"));
    }
}
