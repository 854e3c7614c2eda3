//! Learning blocks from the library: the Data-In of a READ passed through is
//! followed segment by segment, and every whole manifest block it carries goes
//! into the cache once its hash checks out (a block that fails taints the LUN).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::fetch::BlockCache;
use crate::index::BlockHash;
use crate::splice::scsi::ReadCommand;

use super::served_lun::ServedLun;

/// What one Data-In taught the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub inserted: u64,
    pub already: u64,
    pub mismatched: u64,
}

/// Follows the Data-In of one READ passed through to the library and inserts every
/// whole manifest block it carries into the cache once its hash checks out.
/// Data arrives in order (DataPDUInOrder=Yes is forced at login); anything else ends
/// the learning for that READ.
#[derive(Debug)]
pub struct Learner {
    lun: Arc<ServedLun>,
    /// Byte range of the READ on the LUN.
    start: u64,
    end: u64,
    /// The BufferOffset expected next.
    next_offset: u64,
    /// Bytes of the block being assembled across PDUs.
    pending: BytesMut,
    pending_block: Option<usize>,
}

impl Learner {
    /// Start learning from the library's answer to `read`, a READ of `lun`
    /// passed through (`None` when the READ reaches past the manifest).
    pub fn new(lun: &Arc<ServedLun>, read: &ReadCommand) -> Option<Learner> {
        let (start, end) = lun.byte_range(read)?;
        Some(Learner {
            lun: lun.clone(),
            start,
            end,
            next_offset: 0,
            pending: BytesMut::new(),
            pending_block: None,
        })
    }

    /// Feed one Data-In segment at `offset` within the READ. Returns `None` when the
    /// stream is out of order (stop learning).
    pub fn feed(&mut self, offset: u64, data: &[u8], cache: &BlockCache) -> Option<Learned> {
        if offset != self.next_offset {
            return None;
        }
        self.next_offset += data.len() as u64;
        let bs = u64::from(self.lun.manifest.block_size);
        let mut learned = Learned::default();
        let mut pos = self.start + offset;
        let mut rest = data;
        while !rest.is_empty() && pos < self.end {
            let index = (pos / bs) as usize;
            let block_start = index as u64 * bs;
            let block_len = self.lun.manifest.block_len(index);
            let block_end = block_start + block_len;
            let take = ((block_end - pos) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let wanted = match self.lun.manifest.blocks.get(index) {
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
            self.lun.taint("library data does not match the manifest");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::SourceClass;
    use crate::splice::catalog::fixtures::{image, read};
    use crate::splice::catalog::manifest_text::manifest_of;
    use crate::splice::catalog::served_lun::ServeDesign;

    #[test]
    fn learn_then_assemble() {
        let data = image();
        let lun = Arc::new(
            ServedLun::new(
                "iqn.t".into(),
                1,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap(),
        );
        let cache = BlockCache::new(1 << 20);
        // Block 0 is not cached: nothing to serve yet.
        assert!(lun.assemble(&read(0, 8), &cache).is_none());
        // Zero block alone: served cold.
        let (pieces, prov) = lun.assemble(&read(8, 8), &cache).unwrap();
        assert_eq!(pieces.concat(), vec![0u8; 4096]);
        assert_eq!(prov.blocks_of(SourceClass::Zero), 1);

        // A pass-through READ of blocks 0..3 at an unaligned start (LBA 4), in
        // segments that straddle blocks: the partial first block is not learned.
        let r = read(4, 8 * 3 - 4);
        let mut learner = Learner::new(&lun, &r).unwrap();
        let bytes = &data[2048..3 * 4096];
        let mut total = Learned::default();
        for (i, seg) in bytes.chunks(3000).enumerate() {
            let l = learner.feed(i as u64 * 3000, seg, &cache).unwrap();
            total.inserted += l.inserted;
        }
        assert_eq!(total.inserted, 1, "block 2 learned; 0 partial, 1 zero");
        assert!(learner.feed(0, b"x", &cache).is_none(), "out of order");

        // Whole block 0 plus the tail block in one segment each.
        let mut learner = Learner::new(&lun, &read(0, 8)).unwrap();
        assert_eq!(learner.feed(0, &data[..4096], &cache).unwrap().inserted, 1);
        let mut learner = Learner::new(&lun, &read(32, 2)).unwrap();
        assert_eq!(learner.feed(0, &data[16384..], &cache).unwrap().inserted, 1);

        // Now blocks 0, 1 (zero), 2 and the tail can be served, across boundaries.
        let (pieces, prov) = lun.assemble(&read(2, 20), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[1024..11264]);
        assert_eq!(
            (
                prov.blocks_of(SourceClass::Zero),
                prov.blocks_of(SourceClass::Cache)
            ),
            (1, 2)
        );
        assert!(
            lun.assemble(&read(24, 8), &cache).is_none(),
            "block 3 not learned"
        );
        let (pieces, _) = lun.assemble(&read(32, 2), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[16384..]);
        assert!(lun.assemble(&read(33, 2), &cache).is_none(), "past the end");
        assert!(!lun.tainted());
    }

    #[test]
    fn corrupt_library_data_taints_and_is_not_cached() {
        let data = image();
        let lun = Arc::new(
            ServedLun::new(
                "t".into(),
                1,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap(),
        );
        let cache = BlockCache::new(1 << 20);
        let mut bad = data[..4096].to_vec();
        bad[7] ^= 1;
        let l = Learner::new(&lun, &read(0, 8))
            .unwrap()
            .feed(0, &bad, &cache)
            .unwrap();
        assert_eq!((l.inserted, l.mismatched), (0, 1));
        assert!(lun.tainted());
        assert_eq!(cache.snapshot().blocks, 0);
    }
}
