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

/// Why a text data segment cannot be read one way only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("entry {index} is not UTF-8")]
    NotUtf8 { index: usize },
    #[error("entry {index} has no `=`")]
    NoEquals { index: usize },
    #[error("entry {index} has an empty key or a key over {MAX_KEY_LEN} bytes")]
    BadKey { index: usize },
}

/// §6.1: a key is at most 63 bytes.
pub const MAX_KEY_LEN: usize = 63;

/// The `key=value` pairs of a text data segment, read strictly: every non-empty
/// entry must be UTF-8 with a key of 1 to 63 bytes and a `=`. The splicer reads a
/// login's text this way because a target may read a malformed entry differently
/// from [`pairs`] (which skips it); empty entries (a doubled or trailing NUL) carry
/// nothing and are allowed.
pub fn strict_pairs(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let mut out = Vec::new();
    for (index, entry) in data.split(|&b| b == 0).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let entry = std::str::from_utf8(entry).map_err(|_| TextError::NotUtf8 { index })?;
        let (key, value) = entry.split_once('=').ok_or(TextError::NoEquals { index })?;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(TextError::BadKey { index });
        }
        out.push((key, value));
    }
    Ok(out)
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
    fn strict_pairs_refuse_what_pairs_skip() {
        assert_eq!(
            strict_pairs(b"A=1\0\0B=2\0\0").unwrap(),
            [("A", "1"), ("B", "2")]
        );
        assert_eq!(
            strict_pairs(b"A=1\0junk\0"),
            Err(TextError::NoEquals { index: 1 })
        );
        assert_eq!(
            strict_pairs(b"\xff=1\0"),
            Err(TextError::NotUtf8 { index: 0 })
        );
        assert_eq!(strict_pairs(b"=1\0"), Err(TextError::BadKey { index: 0 }));
        let long = format!("{}=1", "K".repeat(64));
        assert_eq!(
            strict_pairs(long.as_bytes()),
            Err(TextError::BadKey { index: 0 })
        );
    }

    #[test]
    fn value_may_contain_equals() {
        assert_eq!(value(b"X=a=b\0", "X"), Some("a=b"));
    }
}
