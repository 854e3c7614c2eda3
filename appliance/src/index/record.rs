//! The format of the index's stored records (a change in the log and on the
//! upward push, a source's row, a file's state): a format version byte, then the
//! record in [`postcard`]. A record of another version is refused with an error
//! naming both versions, never read as this one.
//!
//! postcard and lengths: a sequence's count is a varint read from the input.
//! postcard gives a visitor no size hint when the count exceeds the bytes left,
//! and serde's `Vec` reserves at most 1 MiB on a hint, growing only with items
//! actually decoded; so a forged count alone allocates little, but a long run of
//! one-byte items still decodes to many times its size. Every list whose length
//! follows from an image's size (a patch's entries) is therefore decoded with
//! [`bounded_seq`], which refuses a count above `max_image_blocks` before
//! anything is sized by it.

use std::{fmt, marker::PhantomData};

use serde::{
    de::{self, DeserializeSeed, SeqAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};

use super::DecodeError;

/// The version byte every record starts with. Version 5, not 1: the first byte of
/// the hand-written change encoding that came before was its kind tag (1 to 4), so
/// an old change (from an old peer's push) is refused by its version, never
/// misread. Bump it on any change of a record's fields or their order.
pub const RECORD_VERSION: u8 = 5;

/// `RECORD_VERSION` followed by `head` in postcard.
pub fn encode<T: Serialize + ?Sized>(head: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    append(&mut out, head);
    out
}

/// Appends `value` in postcard (a record's tail after its head).
pub fn append<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // postcard fails only on sequences of unknown length; no record has one.
    let buf = std::mem::take(out);
    *out = postcard::to_extend(value, buf).expect("postcard serializes a record");
}

/// The postcard bytes of a record after its version byte, which must be
/// [`RECORD_VERSION`].
pub fn body<'a>(record: &'static str, buf: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    match buf.split_first() {
        None => Err(DecodeError::Corrupt("empty record")),
        Some((&RECORD_VERSION, body)) => Ok(body),
        Some((&found, _)) => Err(DecodeError::Version {
            record,
            found,
            want: RECORD_VERSION,
        }),
    }
}

/// A whole record of type `T` (version byte checked, no trailing bytes).
pub fn decode<'a, T: Deserialize<'a>>(
    record: &'static str,
    buf: &'a [u8],
) -> Result<T, DecodeError> {
    let (value, rest) = take(record, body(record, buf)?)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(DecodeError::Corrupt("trailing bytes"))
    }
}

/// The postcard value `T` at the start of `buf`, and the bytes after it.
pub fn take<'a, T: Deserialize<'a>>(
    record: &'static str,
    buf: &'a [u8],
) -> Result<(T, &'a [u8]), DecodeError> {
    postcard::take_from_bytes(buf).map_err(|source| DecodeError::Postcard { record, source })
}

/// Why [`bounded_seq`] failed.
#[derive(Debug)]
pub enum SeqError {
    /// The sequence declares `count` items, more than the limit.
    TooLong {
        count: u64,
    },
    Decode(DecodeError),
}

/// The postcard sequence that is the whole of `buf`, refused on its count if it
/// declares more than `max` items (before anything is sized by the count; the
/// first reservation is at most 1 MiB and the vector grows only with items
/// actually decoded).
pub fn bounded_seq<'a, T: Deserialize<'a>>(
    record: &'static str,
    buf: &'a [u8],
    max: u64,
) -> Result<Vec<T>, SeqError> {
    let mut too_long = None;
    let mut de = postcard::Deserializer::from_bytes(buf);
    let seq = BoundedSeq {
        max,
        too_long: &mut too_long,
        item: PhantomData,
    }
    .deserialize(&mut de);
    if let Some(count) = too_long {
        return Err(SeqError::TooLong { count });
    }
    let postcard = |source| SeqError::Decode(DecodeError::Postcard { record, source });
    let seq = seq.map_err(postcard)?;
    if de.finalize().map_err(postcard)?.is_empty() {
        Ok(seq)
    } else {
        Err(SeqError::Decode(DecodeError::Corrupt("trailing bytes")))
    }
}

/// Most items a vector reserves on a count read from the input (1 MiB of them).
fn first_reservation<T>() -> usize {
    (1 << 20) / std::mem::size_of::<T>().max(1)
}

/// A sequence of at most `max` items; a longer one's count is left in `too_long`
/// (postcard's errors carry no message).
struct BoundedSeq<'c, T> {
    max: u64,
    too_long: &'c mut Option<u64>,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for BoundedSeq<'_, T> {
    type Value = Vec<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedSeq<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence of at most {} items", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // postcard gives no hint when the count exceeds the bytes left (every item
        // is at least a byte): malformed at once.
        let declared = seq
            .size_hint()
            .ok_or_else(|| de::Error::custom("count exceeds the bytes left"))?;
        if declared as u64 > self.max {
            *self.too_long = Some(declared as u64);
            return Err(de::Error::invalid_length(declared, &self));
        }
        let mut items = Vec::with_capacity(declared.min(first_reservation::<T>()));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(items)
    }
}

/// Serializes a byte string as postcard's bytes (length, then the bytes as they
/// are), not as a sequence of `u8` items: the same bytes on the wire, without a
/// call per byte.
pub fn as_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_another_version_is_refused_naming_both() {
        let mut rec = encode(&(7u32, "x"));
        assert_eq!(decode::<(u32, &str)>("test", &rec).unwrap(), (7, "x"));
        rec[0] = RECORD_VERSION + 1;
        let e = decode::<(u32, &str)>("test", &rec).unwrap_err();
        assert!(
            matches!(e, DecodeError::Version { found, want: RECORD_VERSION, .. } if found == RECORD_VERSION + 1)
        );
        let m = e.to_string();
        assert!(m.contains("test record") && m.contains("version 6"), "{m}");
        assert!(decode::<u32>("test", &[]).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut rec = encode(&1u32);
        rec.push(0);
        assert!(matches!(
            decode::<u32>("test", &rec),
            Err(DecodeError::Corrupt("trailing bytes"))
        ));
    }

    #[test]
    fn a_sequence_over_the_limit_is_refused_on_its_count() {
        let mut buf = Vec::new();
        append(&mut buf, &vec![1u32; 11]);
        assert!(matches!(
            bounded_seq::<u32>("test", &buf, 10),
            Err(SeqError::TooLong { count: 11 })
        ));
        assert_eq!(bounded_seq::<u32>("test", &buf, 11).unwrap(), vec![1; 11]);
        // A count far beyond the bytes: refused as malformed, nothing sized by it.
        let mut forged = Vec::new();
        append(&mut forged, &u64::MAX); // varint, read back as the count
        assert!(matches!(
            bounded_seq::<u32>("test", &forged, u64::MAX),
            Err(SeqError::Decode(_))
        ));
        // A count within the bytes but past the limit: refused before decoding.
        let many = vec![0u8; 1 << 16];
        let mut buf = Vec::new();
        append(&mut buf, &many);
        assert!(matches!(
            bounded_seq::<u8>("test", &buf, 100),
            Err(SeqError::TooLong { count: 65_536 })
        ));
    }
}
