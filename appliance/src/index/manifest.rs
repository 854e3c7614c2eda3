//! Block names and manifests.

use std::fmt;

/// blake3 hash of a block's bytes (the whole block; a short tail block is hashed as
/// its own, shorter, bytes).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The 16-byte prefix the holder index is keyed by (collision odds for 10^12
    /// blocks: ~2^-49; a fetched block is verified against its full hash anyway).
    pub fn prefix(&self) -> [u8; 16] {
        let mut p = [0u8; 16];
        p.copy_from_slice(&self.0[..16]);
        p
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &hex::encode(&self.0[..8]))
    }
}

/// An image at one block size: its name, byte size, and the ordered hashes of its
/// blocks. `None` marks an all-zero block (never stored, never transferred).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub image: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: Vec<Option<BlockHash>>,
}

/// Errors decoding a stored manifest or record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("index encoding: {0}")]
    Corrupt(&'static str),
    /// A record written in another format version ([`super::record`]): refused,
    /// never read as this one.
    #[error(
        "{record} record of format version {found}; this build reads version {want} \
         (written by another nearblock version)"
    )]
    Version {
        record: &'static str,
        found: u8,
        want: u8,
    },
    #[error("{record} record: {source}")]
    Postcard {
        record: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// The manifest claims more blocks than the reader accepts; refused before
    /// anything was allocated for them.
    #[error(
        "manifest of `{image}` at {block_size}-byte blocks claims {blocks} blocks, \
         more than max_image_blocks = {max}"
    )]
    TooLarge {
        image: String,
        block_size: u32,
        blocks: u64,
        max: u64,
    },
}

/// The most blocks any source may have: a leaf's index must stay below
/// [`super::lookup::COARSE_BIT`] (2^31), which marks coarse-group entries.
pub const MAX_IMAGE_BLOCKS_LIMIT: u64 = 1 << 31;

/// Default of `max_image_blocks`: 2^27 blocks — 512 GiB at 4 KiB, 2 TiB at
/// 16 KiB, 8 TiB at 64 KiB. Applying one change to a source of N blocks holds
/// its old and new decoded manifests (33 bytes per block each; measured peak
/// ≈ 67 bytes per block, docs/index.md), so a change at this cap costs about
/// 9 GB while it is applied; 2^31 (the format's limit) would be about 144 GB.
/// See docs/decisions.md.
pub const DEFAULT_MAX_IMAGE_BLOCKS: u64 = 1 << 27;

/// Checks a configured `max_image_blocks` (1..=[`MAX_IMAGE_BLOCKS_LIMIT`]).
pub fn check_max_image_blocks(max: u64) -> Result<(), String> {
    if (1..=MAX_IMAGE_BLOCKS_LIMIT).contains(&max) {
        Ok(())
    } else {
        Err(format!(
            "{max} is not within 1..={MAX_IMAGE_BLOCKS_LIMIT} (a block index must stay below 2^31)"
        ))
    }
}

const MAGIC: &[u8; 4] = b"NBM1";
/// magic, size, block size, block count, name length.
const HEADER_LEN: usize = 4 + 8 + 4 + 8 + 4;

impl Manifest {
    /// An image of no blocks yet: what a patch to a source nobody indexed
    /// starts from.
    pub fn empty(image: &str, block_size: u32) -> Self {
        Manifest {
            image: image.to_owned(),
            size: 0,
            block_size,
            blocks: Vec::new(),
        }
    }

    /// Applies a patch (what [`super::Change::PatchImage`] means): the image is
    /// now `size` bytes, blocks past the new end are dropped, new blocks are
    /// zero, then block `i` is named `hash` for every `(i, hash)`. Every `i`
    /// must be inside the new size ([`super::Change::check`] makes sure).
    pub fn patch(&mut self, size: u64, blocks: &[(u32, Option<BlockHash>)]) {
        self.size = size;
        self.blocks
            .resize(Self::block_count(size, self.block_size), None);
        for &(i, hash) in blocks {
            self.blocks[i as usize] = hash;
        }
    }

    /// Byte length of block `i` (the last one may be short).
    pub fn block_len(&self, i: usize) -> u64 {
        let start = i as u64 * u64::from(self.block_size);
        (self.size - start).min(u64::from(self.block_size))
    }

    /// Number of blocks an image of `size` bytes has at `block_size`.
    pub fn block_count(size: u64, block_size: u32) -> usize {
        size.div_ceil(u64::from(block_size)) as usize
    }

    /// Number of all-zero blocks.
    pub fn zero_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.is_none()).count()
    }

    /// Bytes that would have to be transferred if no block were found anywhere
    /// (the non-zero blocks).
    pub fn nonzero_bytes(&self) -> u64 {
        (0..self.blocks.len())
            .filter(|&i| self.blocks[i].is_some())
            .map(|i| self.block_len(i))
            .sum()
    }

    /// The coarse level: one name per group of `factor` consecutive blocks (e.g. 16 ×
    /// 4 KiB = 64 KiB), computed from the leaf names without rereading data:
    /// blake3 over the leaves' 32-byte names (zero leaves as 32 zero bytes). A group
    /// whose leaves are all zero is `None`. Two images with an equal coarse name hold
    /// the same `factor` leaves in the same order, so one lookup answers `factor` of
    /// them; images derived in place share most coarse names.
    ///
    /// The store indexes these names next to the leaves (`StoreOptions::coarse`):
    /// `holders(coarse name)` returns locations whose `block_size` is the group size.
    pub fn coarse(&self, factor: usize) -> Vec<Option<BlockHash>> {
        assert!(factor > 0);
        self.blocks.chunks(factor).map(coarse_name).collect()
    }

    /// Coarse name of group `g` (of `factor` blocks), `None` if all zero or past the end.
    pub fn coarse_group(&self, g: usize, factor: usize) -> Option<BlockHash> {
        let start = g.checked_mul(factor)?;
        if start >= self.blocks.len() {
            return None;
        }
        coarse_name(&self.blocks[start..(start + factor).min(self.blocks.len())])
    }

    /// Compact binary encoding: magic, size, block size, name, a bitmap of non-zero
    /// blocks, then the 32-byte names of the non-zero blocks in order, then a CRC32C
    /// of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.blocks.len();
        let nz = self.blocks.iter().filter(|b| b.is_some()).count();
        let mut out = Vec::with_capacity(32 + self.image.len() + n.div_ceil(8) + 32 * nz);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&(self.image.len() as u32).to_le_bytes());
        out.extend_from_slice(self.image.as_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, b) in self.blocks.iter().enumerate() {
            if b.is_some() {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for b in self.blocks.iter().flatten() {
            out.extend_from_slice(&b.0);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// [`Self::decode_limited`] at [`DEFAULT_MAX_IMAGE_BLOCKS`].
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_limited(buf, DEFAULT_MAX_IMAGE_BLOCKS)
    }

    /// Decodes [`Self::encode`]'s bytes, refusing a manifest of more than
    /// `max_blocks` blocks (and any whose bitmap and names disagree with the
    /// length of `buf`) before allocating its block list: a zero block costs one
    /// bit in the encoding but 33 bytes decoded.
    pub fn decode_limited(buf: &[u8], max_blocks: u64) -> Result<Self, DecodeError> {
        use DecodeError::Corrupt;
        let h = Header::read(buf)?;
        if h.blocks > max_blocks {
            return Err(DecodeError::TooLarge {
                image: String::from_utf8_lossy(h.name).into_owned(),
                block_size: h.block_size,
                blocks: h.blocks,
                max: max_blocks,
            });
        }
        let n = h.blocks as usize;
        let image = String::from_utf8(h.name.to_vec()).map_err(|_| Corrupt("name"))?;
        let mut r = Reader(h.rest);
        let bitmap = r.take(n.div_ceil(8))?;
        let nonzero: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
        if r.0.len() != nonzero.saturating_mul(32) {
            return Err(Corrupt("names do not match the bitmap"));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                let h: [u8; 32] = r.take(32)?.try_into().map_err(|_| Corrupt("hash"))?;
                blocks.push(Some(BlockHash(h)));
            } else {
                blocks.push(None);
            }
        }
        if !r.0.is_empty() {
            return Err(Corrupt("trailing bytes"));
        }
        Ok(Self {
            image,
            size: h.size,
            block_size: h.block_size,
            blocks,
        })
    }

    /// Image name, block size and block count of an encoded manifest, without
    /// decoding its blocks (to weigh it, or name a manifest that is refused).
    pub fn peek(buf: &[u8]) -> Result<(String, u32, u64), DecodeError> {
        let h = Header::read(buf)?;
        let image = String::from_utf8(h.name.to_vec()).map_err(|_| DecodeError::Corrupt("name"))?;
        Ok((image, h.block_size, h.blocks))
    }
}

/// The fixed part of an encoded manifest, checked (length, checksum, magic, block
/// count against size) but not expanded.
struct Header<'a> {
    size: u64,
    block_size: u32,
    blocks: u64,
    name: &'a [u8],
    /// Bitmap and names.
    rest: &'a [u8],
}

impl<'a> Header<'a> {
    fn read(buf: &'a [u8]) -> Result<Self, DecodeError> {
        use DecodeError::Corrupt;
        if buf.len() < HEADER_LEN + 4 {
            return Err(Corrupt("short"));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(Corrupt("checksum"));
        }
        let mut r = Reader(body);
        if r.take(4)? != MAGIC {
            return Err(Corrupt("magic"));
        }
        let size = r.u64()?;
        let block_size = r.u32()?;
        let blocks = r.u64()?;
        if block_size == 0 || blocks != size.div_ceil(u64::from(block_size)) {
            return Err(Corrupt("block count"));
        }
        let name_len = r.u32()? as usize;
        let name = r.take(name_len)?;
        Ok(Self {
            size,
            block_size,
            blocks,
            name,
            rest: r.0,
        })
    }
}

/// The coarse name of a group of consecutive leaves: blake3 over a domain tag, the
/// group length, and the leaves' names (zero leaves as 32 zero bytes); `None` if every
/// leaf is zero. A different domain from leaf names, so the two never collide.
pub fn coarse_name(group: &[Option<BlockHash>]) -> Option<BlockHash> {
    if group.iter().all(Option::is_none) {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update(b"nearblock-coarse");
    h.update(&(group.len() as u32).to_le_bytes());
    for b in group {
        h.update(&b.map_or([0; 32], |b| b.0));
    }
    Some(BlockHash(*h.finalize().as_bytes()))
}

/// Reads a manifest's fixed-width fields in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Corrupt("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (
            0u64..200_000,
            prop::sample::select(vec![4096u32, 16384, 65536]),
            "[a-z0-9/._-]{0,40}",
        )
            .prop_flat_map(|(size, bs, name)| {
                let n = Manifest::block_count(size, bs);
                (
                    Just(size),
                    Just(bs),
                    Just(name),
                    prop::collection::vec(prop::option::of(any::<[u8; 32]>()), n..=n),
                )
            })
            .prop_map(|(size, block_size, image, blocks)| Manifest {
                image,
                size,
                block_size,
                blocks: blocks.into_iter().map(|b| b.map(BlockHash)).collect(),
            })
    }

    proptest! {
        #[test]
        fn manifest_round_trip(m in arb_manifest()) {
            let enc = m.encode();
            prop_assert_eq!(Manifest::decode(&enc).unwrap(), m);
        }

        #[test]
        fn corrupt_manifest_is_rejected(m in arb_manifest(), flip in any::<prop::sample::Index>()) {
            let mut enc = m.encode();
            let i = flip.index(enc.len());
            enc[i] ^= 0x40;
            prop_assert!(Manifest::decode(&enc).is_err());
        }
    }

    /// An encoding of `n` zero blocks named `name`, checksummed: what a peer can
    /// send in n/8 bytes.
    fn zero_manifest_bytes(name: &str, n: u64) -> Vec<u8> {
        Manifest {
            image: name.into(),
            size: n * 4096,
            block_size: 4096,
            blocks: vec![None; n as usize],
        }
        .encode()
    }

    #[test]
    fn a_bitmap_claiming_more_blocks_than_the_cap_is_refused() {
        let enc = zero_manifest_bytes("big", 1001);
        match Manifest::decode_limited(&enc, 1000) {
            Err(DecodeError::TooLarge {
                image,
                block_size,
                blocks,
                max,
            }) => {
                assert_eq!(
                    (image.as_str(), block_size, blocks, max),
                    ("big", 4096, 1001, 1000)
                );
            }
            r => panic!("expected TooLarge, got {r:?}"),
        }
        let msg = Manifest::decode_limited(&enc, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`big`") && msg.contains("max_image_blocks = 1000"),
            "{msg}"
        );
        assert_eq!(
            Manifest::decode_limited(&enc, 1001).unwrap().blocks.len(),
            1001
        );
        assert_eq!(
            Manifest::peek(&enc).unwrap(),
            ("big".to_string(), 4096, 1001)
        );
    }

    #[test]
    fn the_default_cap_refuses_a_forged_count_without_allocating() {
        // Header of a 2^32 - 1 block image with its bitmap cut off: the claim is
        // refused on the header alone (before the fix this allocated 141 GB).
        let n = u64::from(u32::MAX);
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(n * 4096).to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(b"huge");
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&b),
            Err(DecodeError::TooLarge { blocks, .. }) if blocks == n
        ));
        // Within the cap but with the bitmap missing: truncated, not allocated.
        assert!(matches!(
            Manifest::decode_limited(&b, MAX_IMAGE_BLOCKS_LIMIT * 2),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[test]
    fn names_must_match_the_bitmap() {
        let mut m = Manifest {
            image: "x".into(),
            size: 3 * 4096,
            block_size: 4096,
            blocks: vec![Some(BlockHash([1; 32])), None, None],
        };
        let mut enc = m.encode();
        // Claim a second non-zero block without its name; fix the checksum.
        let bitmap_at = HEADER_LEN + 1;
        enc[bitmap_at] |= 0b10;
        let body = enc.len() - 4;
        let crc = crc32c::crc32c(&enc[..body]);
        enc[body..].copy_from_slice(&crc.to_le_bytes());
        assert!(Manifest::decode(&enc).is_err());
        m.blocks[1] = Some(BlockHash([2; 32]));
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn max_image_blocks_range() {
        assert!(check_max_image_blocks(0).is_err());
        assert!(check_max_image_blocks(1).is_ok());
        assert!(check_max_image_blocks(DEFAULT_MAX_IMAGE_BLOCKS).is_ok());
        assert!(check_max_image_blocks(MAX_IMAGE_BLOCKS_LIMIT).is_ok());
        assert!(check_max_image_blocks(MAX_IMAGE_BLOCKS_LIMIT + 1).is_err());
    }

    #[test]
    fn coarse_groups() {
        let h = |b: u8| Some(BlockHash([b; 32]));
        let m = Manifest {
            image: "x".into(),
            size: 5 * 4096,
            block_size: 4096,
            blocks: vec![h(1), h(2), None, None, h(1)],
        };
        let c = m.coarse(2);
        assert_eq!(c.len(), 3);
        assert!(c[0].is_some() && c[1].is_none() && c[2].is_some());
        assert_ne!(c[0], c[2], "a short group differs from a full one");
        let mut m2 = m.clone();
        m2.blocks[1] = h(3);
        assert_ne!(m2.coarse(2)[0], c[0]);
        assert_eq!(m2.coarse(2)[2], c[2]);
    }
}
