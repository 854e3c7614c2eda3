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

impl Learned {
    fn add(&mut self, r: Result<(), ()>) {
        match r {
            Ok(()) => self.inserted += 1,
            Err(()) => self.mismatched += 1,
        }
    }
}

