//! One LUN the splicer may serve: an image of the block core
//! ([`ServedImage`]: manifest, taint, history, assembly by byte range) under a
//! LUN address, with the logical block length its READs count in. A READ's
//! blocks are the image's byte range `lba × length .. (lba + blocks) × length`.

use std::ops::{Deref, Range};
use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use crate::block_core::ServedImage;
use crate::index::Manifest;
use crate::splice::scsi::ReadCommand;

use super::CatalogError;

/// How a served LUN answers READs (see `docs/splicer-protocol.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeDesign {
    /// A zero-length READ goes to the target, which stays the authority for status.
    #[default]
    Shadow,
    /// Cached READs never reach the target (split sequence numbers).
    Local,
}

/// When a served LUN's blocks are fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchMode {
    /// What READs touch, plus read-ahead (in the access history's order).
    #[default]
    OnDemand,
    /// The whole image into the cache at a session's login, in the background,
    /// within the per-link budget (`splicer.prefetch_budget_mbps`).
    Prefetch,
}

/// One LUN the splicer may serve.
#[derive(Debug)]
pub struct ServedLun {
    pub target: String,
    pub lun: u16,
    pub design: ServeDesign,
    /// Logical block length of the LUN (what READ LBAs count): the declared one, or
    /// the target's once it reported one (0 until then: nothing is served).
    logical_block_size: AtomicU32,
    pub mode: FetchMode,
    /// The image served under this address.
    pub image: Arc<ServedImage>,
}

/// A LUN is its image under an address: the image's manifest, taint and
/// history are the LUN's.
impl Deref for ServedLun {
    type Target = ServedImage;
    fn deref(&self) -> &ServedImage {
        &self.image
    }
}

impl ServedLun {
    pub fn new(
        target: String,
        lun: u16,
        design: ServeDesign,
        declared_block_length: Option<u32>,
        manifest: Manifest,
    ) -> Result<ServedLun, CatalogError> {
        let invalid = |message: &str| CatalogError::Invalid {
            target: target.clone(),
            lun,
            message: message.to_string(),
        };
        if declared_block_length == Some(0) || manifest.block_size == 0 {
            return Err(invalid("block sizes must be non-zero"));
        }
        if declared_block_length.is_some_and(|l| !manifest.block_size.is_multiple_of(l)) {
            return Err(invalid(
                "the manifest block size must be a multiple of the logical block size",
            ));
        }
        let logical_block_size = AtomicU32::new(declared_block_length.unwrap_or(0));
        let image = Arc::new(ServedImage::new(
            super::lun_name(&target, lun),
            manifest,
        ));
        Ok(ServedLun {
            target,
            lun,
            design,
            logical_block_size,
            mode: FetchMode::OnDemand,
            image,
        })
    }

    /// The logical block length READs are served with (0: not known yet).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size.load(Ordering::Relaxed)
    }

    /// Take the target's block length if none was declared; a LUN keeps the first
    /// length it took (a later, different one makes it disagree: not served).
    pub(super) fn adopt_block_length(&self, block_length: u32) {
        let _ = self.logical_block_size.compare_exchange(
            0,
            block_length,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// LUN capacity in logical blocks, as the manifest describes it.
    pub fn capacity_blocks(&self) -> u64 {
        match self.logical_block_size() {
            0 => 0,
            lbs => self.manifest.size / u64::from(lbs),
        }
    }

    /// The READ's byte range on the image, if it lies inside the manifest.
    pub fn byte_range(&self, read: &ReadCommand) -> Option<Range<u64>> {
        let lbs = u64::from(self.logical_block_size());
        if lbs == 0 {
            return None;
        }
        let start = read.lba.checked_mul(lbs)?;
        let end = start.checked_add(u64::from(read.blocks) * lbs)?;
        (end <= self.manifest.size).then_some(start..end)
    }

    /// The blocks (manifest positions) a READ touches, for access history.
    pub fn blocks_read(&self, read: &ReadCommand) -> Range<usize> {
        self.byte_range(read)
            .map(|r| self.image.blocks_read(&r))
            .unwrap_or(0..0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_core::{learner::Learned, Learner};
    use crate::fetch::{BlockCache, Provenance, SourceClass};
    use crate::index::BlockHash;
    use bytes::Bytes;

    // A READ's work on blocks is the image's on the READ's byte range; these
    // put the two together the way the iSCSI front end does.
    impl ServedLun {
        fn assemble(&self, read: &ReadCommand, cache: &BlockCache) -> Option<(Vec<Bytes>, Provenance)> {
            self.image.assemble(&self.byte_range(read)?, cache)
        }

        fn missing(&self, read: &ReadCommand, cache: &BlockCache) -> Vec<BlockHash> {
            self.byte_range(read)
                .map(|r| self.image.missing(&r, cache))
                .unwrap_or_default()
        }

        fn readahead(&self, read: &ReadCommand, window: usize, cache: &BlockCache) -> Vec<BlockHash> {
            self.byte_range(read)
                .map(|r| self.image.readahead(&r, window, cache))
                .unwrap_or_default()
        }
    }
    use crate::splice::catalog::access_history::BootTrace;
    use crate::splice::catalog::fixtures::{image, read};
    use crate::splice::catalog::manifest_text::manifest_of;

    #[test]
    fn fetched_blocks_count_by_origin_once_and_missing_lists_what_is_absent() {
        use crate::fetch::Origin;
        let data = image();
        let m = manifest_of("i", &data, 4096);
        let lun = ServedLun::new("t".into(), 1, ServeDesign::Shadow, Some(512), m.clone()).unwrap();
        let cache = BlockCache::new(1 << 20);
        let whole = read(0, 34);
        let hashes: Vec<BlockHash> = m.blocks.iter().flatten().copied().collect();
        assert_eq!(lun.missing(&whole, &cache), hashes);
        let rack = Origin {
            class: SourceClass::Rack,
            hops: 1,
        };
        // Blocks 0 and 2 arrive from a rack peer; block 3 and the tail are absent.
        cache.insert_from(hashes[0], Bytes::copy_from_slice(&data[..4096]), Some(rack));
        cache.insert_from(
            hashes[1],
            Bytes::copy_from_slice(&data[8192..12288]),
            Some(rack),
        );
        assert_eq!(lun.missing(&whole, &cache), hashes[2..]);
        assert!(lun.assemble(&whole, &cache).is_none());
        // The failed assembly kept their origin: the first serve counts them as rack.
        let (_, prov) = lun.assemble(&read(0, 24), &cache).unwrap();
        assert_eq!(prov.blocks_of(SourceClass::Rack), 2);
        assert_eq!(prov.bytes_of(SourceClass::Rack), 8192);
        assert_eq!(prov.hop_bytes[1], 8192);
        let (_, prov) = lun.assemble(&read(0, 24), &cache).unwrap();
        assert_eq!(
            (
                prov.blocks_of(SourceClass::Cache),
                prov.blocks_of(SourceClass::Rack)
            ),
            (2, 0)
        );
    }

    #[test]
    fn boots_record_first_reads_and_order_read_ahead() {
        let data = image();
        let m = manifest_of("i", &data, 4096);
        let hashes: Vec<BlockHash> = m.blocks.iter().flatten().copied().collect();
        let lun = ServedLun::new("t".into(), 1, ServeDesign::Shadow, Some(512), m).unwrap();
        let cache = BlockCache::new(1 << 20);
        // Without history: what follows, in image order.
        assert_eq!(lun.readahead(&read(0, 8), 8, &cache), hashes[1..]);
        // A boot reads block 3 (LBAs 24..32), then 0 and 3 again, then the tail.
        let mut trace = BootTrace::default();
        for r in [read(24, 8), read(0, 8), read(24, 8), read(32, 2)] {
            trace.note(lun.blocks_read(&r));
        }
        assert_eq!(trace.order(), [3, 0, 4]);
        lun.record_boot(trace.order());
        let h = lun.history();
        assert_eq!((h.boots, h.blocks.len()), (1, 3));
        // After block 3 comes 0 then the tail (4); block 2 was never read.
        assert_eq!(
            lun.readahead(&read(24, 8), 8, &cache),
            [hashes[0], hashes[3]]
        );
        assert!(
            lun.readahead(&read(24, 8), 8, &cache).is_empty(),
            "already asked for"
        );
        // Far behind the mark (another reader): asked again, cached blocks left out.
        cache.insert(hashes[0], Bytes::copy_from_slice(&data[..4096]));
        lun.set_readahead_mark(100);
        assert!(
            lun.readahead(&read(24, 8), 1, &cache).is_empty(),
            "the next likely block (0) is cached"
        );
        assert_eq!(lun.readahead(&read(0, 8), 1, &cache), [hashes[3]]);
        // After a block no boot read, nothing is read ahead.
        assert!(lun.readahead(&read(16, 8), 8, &cache).is_empty());
    }

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
        let mut learner = Learner::new(&lun.image, lun.byte_range(&r).unwrap()).unwrap();
        let bytes = &data[2048..3 * 4096];
        let mut total = Learned::default();
        for (i, seg) in bytes.chunks(3000).enumerate() {
            let l = learner.feed(i as u64 * 3000, seg, &cache).unwrap();
            total.inserted += l.inserted;
        }
        assert_eq!(total.inserted, 1, "block 2 learned; 0 partial, 1 zero");
        assert!(learner.feed(0, b"x", &cache).is_none(), "out of order");

        // Whole block 0 plus the tail block in one segment each.
        let mut learner = Learner::new(&lun.image, lun.byte_range(&read(0, 8)).unwrap()).unwrap();
        assert_eq!(learner.feed(0, &data[..4096], &cache).unwrap().inserted, 1);
        let mut learner = Learner::new(&lun.image, lun.byte_range(&read(32, 2)).unwrap()).unwrap();
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
        let l = Learner::new(&lun.image, lun.byte_range(&read(0, 8)).unwrap())
            .unwrap()
            .feed(0, &bad, &cache)
            .unwrap();
        assert_eq!((l.inserted, l.mismatched), (0, 1));
        assert!(lun.tainted());
        assert_eq!(cache.snapshot().blocks, 0);
    }
}
