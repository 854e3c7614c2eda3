//! Learning blocks from the origin: the data of a read passed through (an
//! iSCSI READ's Data-In, an HTTP response body) is followed segment by segment,
//! and every whole manifest block it carries goes into the cache once its hash
//! checks out (a block that fails taints the image).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::fetch::BlockCache;
use crate::index::BlockHash;
use super::image::ServedImage;

/// What one segment of origin data taught the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub inserted: u64,
    pub already: u64,
    pub mismatched: u64,
}

/// Follows the data of one read passed through to the origin and inserts every
/// whole manifest block it carries into the cache once its hash checks out.
/// Data must arrive in order (iSCSI: DataPDUInOrder=Yes is forced at login);
/// anything else ends the learning for that read.
#[derive(Debug)]
pub struct Learner {
    image: Arc<ServedImage>,
    /// Byte range of the read on the image.
    start: u64,
    end: u64,
    /// The BufferOffset expected next.
    next_offset: u64,
    /// Bytes of the block being assembled across PDUs.
    pending: BytesMut,
    pending_block: Option<usize>,
}

impl Learner {
    /// Start learning from the origin's answer to a read of `range` of `image`
    /// passed through (`None` when the range reaches past the manifest).
    pub fn new(image: &Arc<ServedImage>, range: std::ops::Range<u64>) -> Option<Learner> {
        if !image.inside(&range) {
            return None;
        }
        Some(Learner {
            image: image.clone(),
            start: range.start,
            end: range.end,
            next_offset: 0,
            pending: BytesMut::new(),
            pending_block: None,
        })
    }

    /// Feed one segment at `offset` within the read. Returns `None` when the
    /// stream is out of order (stop learning).
    pub fn feed(&mut self, offset: u64, data: &[u8], cache: &BlockCache) -> Option<Learned> {
        if offset != self.next_offset {
            return None;
        }
        self.next_offset += data.len() as u64;
        let bs = u64::from(self.image.manifest.block_size);
        let mut learned = Learned::default();
        let mut pos = self.start + offset;
        let mut rest = data;
        while !rest.is_empty() && pos < self.end {
            let index = (pos / bs) as usize;
            let block_start = index as u64 * bs;
            let block_len = self.image.manifest.block_len(index);
            let block_end = block_start + block_len;
            let take = ((block_end - pos) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let wanted = match self.image.manifest.blocks.get(index) {
                Some(Some(hash)) if !cache.contains(hash) => Some(*hash),
                Some(Some(_)) => {
                    if pos == block_start {
                        learned.already += 1;
                    }
                    None
                }
                _ => None,
            };
            if let Some(hash) = wanted {
                if pos == block_start && take as u64 == block_len {
                    // The whole block in one segment: verify in place, copy once.
                    learned.add(self.check(hash, chunk, cache));
                } else if pos == block_start {
                    self.pending.clear();
                    self.pending.extend_from_slice(chunk);
                    self.pending_block = Some(index);
                } else if self.pending_block == Some(index) {
                    self.pending.extend_from_slice(chunk);
                    if pos + take as u64 == block_end {
                        let data = std::mem::take(&mut self.pending);
                        self.pending_block = None;
                        learned.add(self.check(hash, &data, cache));
                    }
                }
            }
            pos += take as u64;
        }
        Some(learned)
    }

    fn check(&self, hash: BlockHash, data: &[u8], cache: &BlockCache) -> Result<(), ()> {
        if BlockHash::of(data) == hash {
            cache.insert(hash, Bytes::copy_from_slice(data));
            Ok(())
        } else {
            self.image.taint("origin data does not match the manifest");
            Err(())
        }
    }
}

/// Check `data`, the origin's bytes of `image` from `start` (a block
/// boundary) through whole blocks (the last may be the image's short tail),
/// against the manifest: every block must hash to its name, a zero block be
/// all zero. Verified non-zero blocks go into the cache when `learn`. A
/// mismatch taints the image (the origin no longer has the manifest's
/// content) and nothing of `data` may be served.
pub fn verify_blocks(
    image: &ServedImage,
    start: u64,
    data: &[u8],
    cache: &BlockCache,
    learn: bool,
) -> Result<Learned, VerifyError> {
    let bs = u64::from(image.manifest.block_size);
    if !start.is_multiple_of(bs) || !image.inside(&(start..start + data.len() as u64)) {
        return Err(VerifyError::NotWholeBlocks);
    }
    let mut learned = Learned::default();
    let first = (start / bs) as usize;
    let mut rest = data;
    let mut index = first;
    while !rest.is_empty() {
        let len = image.manifest.block_len(index) as usize;
        if rest.len() < len {
            return Err(VerifyError::NotWholeBlocks);
        }
        let (block, tail) = rest.split_at(len);
        rest = tail;
        match image.manifest.blocks.get(index).copied().flatten() {
            None if crate::index::chunk::is_zero(block) => {}
            Some(hash) if BlockHash::of(block) == hash => {
                if cache.contains(&hash) {
                    learned.already += 1;
                } else if learn {
                    cache.insert(hash, Bytes::copy_from_slice(block));
                    learned.inserted += 1;
                }
            }
            _ => {
                image.taint("origin data does not match the manifest");
                return Err(VerifyError::Mismatch(index));
            }
        }
        index += 1;
    }
    Ok(learned)
}

/// Why origin data was not verified.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("origin data is not whole blocks of the image")]
    NotWholeBlocks,
    #[error("origin block {0} does not match the manifest")]
    Mismatch(usize),
}

impl Learned {
    fn add(&mut self, r: Result<(), ()>) {
        match r {
            Ok(()) => self.inserted += 1,
            Err(()) => self.mismatched += 1,
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_blocks_are_verified_whole_and_a_mismatch_taints() {
        let mut data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 | 1).collect();
        data[4096..8192].fill(0);
        let m = crate::index::chunk::manifest_of_bytes("i", &data, 4096);
        let image = ServedImage::new("i".into(), m);
        let cache = BlockCache::new(1 << 20);
        let l = verify_blocks(&image, 0, &data, &cache, true).unwrap();
        assert_eq!((l.inserted, l.already), (2, 0), "block 1 is zero");
        let l = verify_blocks(&image, 8192, &data[8192..], &cache, true).unwrap();
        assert_eq!((l.inserted, l.already), (0, 1));
        assert_eq!(
            verify_blocks(&image, 100, &data[100..4196], &cache, true),
            Err(VerifyError::NotWholeBlocks)
        );
        assert_eq!(
            verify_blocks(&image, 0, &data[..5000], &cache, true),
            Err(VerifyError::NotWholeBlocks)
        );
        assert!(!image.tainted());
        let mut bad = data[4096..8192].to_vec();
        bad[9] = 1;
        assert_eq!(
            verify_blocks(&image, 4096, &bad, &cache, true),
            Err(VerifyError::Mismatch(1))
        );
        assert!(image.tainted());
    }
}
