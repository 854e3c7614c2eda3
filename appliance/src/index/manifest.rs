//! Block names and manifests.

use std::fmt;

/// blake3 hash of a block's bytes (the whole block; a short tail block is hashed as
/// its own, shorter, bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
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

impl Manifest {
    /// Byte length of block `i` (the last one may be short).
    pub fn block_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.block_size as u64;
        (self.size - start).min(self.block_size as u64)
    }
}
