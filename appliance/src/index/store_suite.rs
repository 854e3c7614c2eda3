//! The model-based suite every [`BlockStore`] backend must pass: random batches
//! of random changes applied to the store and to the obvious model (a map of
//! sources to manifests), the store checked against the model after every
//! batch (holders of every name, coarse names, sources, manifests, sequence
//! numbers, the log), reopened at a random point. The redb backend runs it in
//! its unit tests, the Redis Cluster backend in the lab against a real cluster
//! (`tests/tests/index_redis_cluster.rs`). Seeded, so a failure names the case
//! that reproduces it.

use std::collections::{BTreeMap, BTreeSet};

use super::lookup::coarse_for;
use super::store::{BlockStore, Change};
use super::synthetic::SplitMix64;
use super::{BlockHash, Manifest};

/// How the suite gets stores of one backend.
pub trait Backend {
    type Store: BlockStore;
    /// A fresh, empty store for case `case`.
    fn fresh(&mut self, case: u64) -> Self::Store;
    /// `store` closed and opened again, as after a restart.
    fn reopen(&mut self, store: Self::Store, case: u64) -> Self::Store;
    /// The coarse factor the stores index with.
    fn coarse(&self) -> Option<u32>;
}

type Key = (String, String, u32);
/// host, image, block size, offset, length
pub type Loc = (String, String, u32, u64, u32);

/// The i-th of the few block names the suite draws from (few, so that
/// sources share blocks and holders lists are long).
pub fn name(i: u8) -> BlockHash {
    BlockHash(*blake3::hash(&[i]).as_bytes())
}

const NAMES: u8 = 6;

/// The model: every source's manifest, and the sequence number of its last
/// change.
#[derive(Default, Clone)]
pub struct Model {
    pub sources: BTreeMap<Key, (Manifest, u64)>,
    pub seq: u64,
}

impl Model {
    pub fn apply(&mut self, c: &Change) {
        self.seq += 1;
        let seq = self.seq;
        match c {
            Change::PutImage { host, manifest } => {
                self.sources.insert(
                    (host.clone(), manifest.image.clone(), manifest.block_size),
                    (manifest.clone(), seq),
                );
            }
            Change::PatchImage {
                host,
                image,
                block_size,
                size,
                blocks,
            } => {
                // Written out, not `Manifest::patch`: the model is the oracle
                // the stores' use of that function is checked against.
                let (m, s) = self
                    .sources
                    .entry((host.clone(), image.clone(), *block_size))
                    .or_insert_with(|| {
                        (
                            Manifest {
                                image: image.clone(),
                                size: 0,
                                block_size: *block_size,
                                blocks: vec![],
                            },
                            0,
                        )
                    });
                m.size = *size;
                m.blocks
                    .resize(Manifest::block_count(*size, *block_size), None);
                for &(i, b) in blocks {
                    m.blocks[i as usize] = b;
                }
                *s = seq;
            }
            Change::RemoveImage {
                host,
                image,
                block_size,
            } => {
                self.sources
                    .remove(&(host.clone(), image.clone(), *block_size));
            }
            Change::RemoveHost { host } => self.sources.retain(|k, _| &k.0 != host),
        }
    }

    /// Every holder of every name, leaves and coarse groups.
    pub fn holders(&self, coarse: Option<u32>) -> BTreeMap<BlockHash, BTreeSet<Loc>> {
        let mut want: BTreeMap<BlockHash, BTreeSet<Loc>> = BTreeMap::new();
        for ((host, image, bs), (m, _)) in &self.sources {
            for (i, b) in m.blocks.iter().enumerate() {
                if let Some(b) = b {
                    want.entry(*b).or_default().insert((
                        host.clone(),
                        image.clone(),
                        *bs,
                        i as u64 * u64::from(*bs),
                        m.block_len(i) as u32,
                    ));
                }
            }
            let Some(f) = coarse_for(*bs, coarse) else {
                continue;
            };
            let gbs = bs * f;
            for (g, c) in m.coarse(f as usize).into_iter().enumerate() {
                if let Some(c) = c {
                    let off = g as u64 * u64::from(gbs);
                    let len = (m.size - off).min(u64::from(gbs)) as u32;
                    want.entry(c)
                        .or_default()
                        .insert((host.clone(), image.clone(), gbs, off, len));
                }
            }
        }
        want
    }
}

fn holders_of(store: &impl BlockStore, names: &[BlockHash]) -> Vec<BTreeSet<Loc>> {
    store
        .holders_many(names)
        .expect("holders_many")
        .into_iter()
        .map(|ls| {
            ls.into_iter()
                .map(|l| {
                    (
                        l.host.to_string(),
                        l.image.to_string(),
                        l.block_size,
                        l.offset,
                        l.len,
                    )
                })
                .collect()
        })
        .collect()
}

/// Checks `store` against `model`; the error says what differs.
pub fn check(store: &impl BlockStore, model: &Model, coarse: Option<u32>) -> Result<(), String> {
    if store.seq() != model.seq {
        return Err(format!("seq {} want {}", store.seq(), model.seq));
    }
    let want = model.holders(coarse);
    // The leaf names (present or not) and every coarse name the model has.
    let leaves: Vec<BlockHash> = (0..NAMES).map(name).collect();
    let mut names = leaves.clone();
    names.extend(want.keys().filter(|k| !leaves.contains(k)).copied());
    let got = holders_of(store, &names);
    for (n, g) in names.iter().zip(&got) {
        let w = want.get(n).cloned().unwrap_or_default();
        if *g != w {
            return Err(format!("holders of {n:?}: got {g:?}, want {w:?}"));
        }
        let one = store.holders(n).map_err(|e| format!("holders({n:?}): {e}"))?;
        if one.len() != w.len() {
            return Err(format!("holders({n:?}) disagrees with holders_many"));
        }
    }
    let imgs = store.images().map_err(|e| e.to_string())?;
    let want_imgs: Vec<(String, String, u32, u64, u64, u64, u64)> = {
        let mut v: Vec<_> = model
            .sources
            .iter()
            .map(|((h, i, bs), (m, seq))| {
                (
                    i.clone(),
                    h.clone(),
                    *bs,
                    m.size,
                    m.blocks.len() as u64,
                    m.zero_blocks() as u64,
                    *seq,
                )
            })
            .collect();
        v.sort();
        v
    };
    let got_imgs: Vec<_> = imgs
        .iter()
        .map(|i| {
            (
                i.image.clone(),
                i.host.clone(),
                i.block_size,
                i.size,
                i.blocks,
                i.zero_blocks,
                i.seq,
            )
        })
        .collect();
    if got_imgs != want_imgs {
        return Err(format!("images: got {got_imgs:?}, want {want_imgs:?}"));
    }
    for ((host, image, bs), (m, _)) in &model.sources {
        let got = store.manifest_at(host, image, *bs).map_err(|e| e.to_string())?;
        if got.as_ref() != Some(m) {
            return Err(format!("manifest_at({host}, {image}, {bs}) differs"));
        }
        if store.source_blocks(host, image, *bs).map_err(|e| e.to_string())?
            != m.blocks.len() as u64
        {
            return Err(format!("source_blocks({host}, {image}, {bs}) differs"));
        }
        // The smallest size this host holds the image at.
        let smallest = model
            .sources
            .keys()
            .filter(|k| &k.0 == host && &k.1 == image)
            .map(|k| k.2)
            .min();
        if *bs == smallest.unwrap_or(0) {
            let got = store
                .host_manifest(host, image, None)
                .map_err(|e| e.to_string())?;
            if got.as_ref() != Some(m) {
                return Err(format!("host_manifest({host}, {image}) differs"));
            }
        }
    }
    // `manifest(image, None)`: the smallest size, the latest change there.
    let by_image: BTreeSet<&String> = model.sources.keys().map(|k| &k.1).collect();
    for image in by_image {
        let pick = model
            .sources
            .iter()
            .filter(|(k, _)| &k.1 == image)
            .min_by_key(|(k, (_, seq))| (k.2, std::cmp::Reverse(*seq)))
            .map(|(_, (m, _))| m);
        let got = store.manifest(image, None).map_err(|e| e.to_string())?;
        if got.as_ref() != pick {
            return Err(format!("manifest({image}) differs"));
        }
    }
    if store.manifest_at("nobody", "nothing", 4096).ok().flatten().is_some() {
        return Err("a manifest nobody holds".into());
    }
    Ok(())
}

/// A random change over 3 hosts, 2 images and 2 block sizes, drawing block
/// names from [`name`] (30% zero).
pub fn random_change(r: &mut SplitMix64) -> Change {
    let host = ["h1", "h2", "h3"][r.below(3)].to_string();
    let image = ["a", "b"][r.below(2)].to_string();
    let bs = [4096u32, 8192][r.below(2)];
    let block = |r: &mut SplitMix64| {
        (r.below(10) >= 3).then(|| name(r.below(usize::from(NAMES)) as u8))
    };
    match r.below(9) {
        0..=3 => {
            let size = r.below(40_000) as u64;
            let n = Manifest::block_count(size, bs);
            Change::PutImage {
                host,
                manifest: Manifest {
                    image,
                    size,
                    block_size: bs,
                    blocks: (0..n).map(|_| block(r)).collect(),
                },
            }
        }
        4..=6 => {
            let size = r.below(40_000) as u64;
            let n = Manifest::block_count(size, bs);
            let blocks = if n == 0 {
                vec![]
            } else {
                (0..r.below(5))
                    .map(|_| (r.below(n) as u32, block(r)))
                    .collect()
            };
            Change::PatchImage {
                host,
                image,
                block_size: bs,
                size,
                blocks,
            }
        }
        7 => Change::RemoveImage {
            host,
            image,
            block_size: bs,
        },
        _ => Change::RemoveHost { host },
    }
}

/// Random batches for one case.
pub fn random_batches(r: &mut SplitMix64) -> Vec<Vec<Change>> {
    (0..=r.below(7))
        .map(|_| (0..=r.below(3)).map(|_| random_change(r)).collect())
        .collect()
}

/// Runs `cases` cases from `seed`; panics naming the case on the first
/// difference.
pub fn run<B: Backend>(backend: &mut B, seed: u64, cases: u64) {
    let coarse = backend.coarse();
    for case in 0..cases {
        let mut r = SplitMix64::new(seed ^ case.wrapping_mul(0x9e37_79b9));
        let batches = random_batches(&mut r);
        let reopen_at = r.below(batches.len());
        let mut store = backend.fresh(case);
        let mut model = Model::default();
        let fail = |what: &str, e: String| -> ! {
            panic!("store suite, seed {seed} case {case}: {what}: {e}")
        };
        for (bi, batch) in batches.iter().enumerate() {
            let seq = store
                .apply(batch)
                .unwrap_or_else(|e| fail(&format!("apply batch {bi}"), e.to_string()));
            for c in batch {
                model.apply(c);
            }
            if seq != model.seq {
                fail("apply's seq", format!("{seq} want {}", model.seq));
            }
            check(&store, &model, coarse)
                .unwrap_or_else(|e| fail(&format!("after batch {bi}"), e));
            if bi == reopen_at {
                store = backend.reopen(store, case);
                check(&store, &model, coarse)
                    .unwrap_or_else(|e| fail(&format!("reopened after batch {bi}"), e));
            }
        }
        // An empty batch changes nothing and returns the current number.
        if store.apply(&[]).ok() != Some(model.seq) {
            fail("empty batch", "seq moved".into());
        }
        let log = store
            .changes_since(0, usize::MAX)
            .unwrap_or_else(|e| fail("changes_since", e.to_string()));
        let all: Vec<Change> = batches.concat();
        if log.iter().map(|(_, c)| c).ne(all.iter())
            || !log.iter().enumerate().all(|(i, (s, _))| *s == i as u64 + 1)
        {
            fail("log", format!("{} entries, want {}", log.len(), all.len()));
        }
        let mid = model.seq / 2;
        store
            .trim_log(mid)
            .unwrap_or_else(|e| fail("trim_log", e.to_string()));
        let rest = store
            .changes_since(0, 2)
            .unwrap_or_else(|e| fail("changes_since", e.to_string()));
        if rest.first().map(|(s, _)| *s) != (mid < model.seq).then_some(mid + 1) {
            fail("trimmed log", format!("{:?}", rest.first().map(|(s, _)| s)));
        }
        if store
            .changes_since(mid, usize::MAX)
            .unwrap_or_else(|e| fail("changes_since", e.to_string()))
            .len() as u64
            != model.seq - mid
        {
            fail("trimmed log", "entries after the trim point lost".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{RedbStore, StoreOptions};

    struct Redb {
        dir: tempfile::TempDir,
        opts: StoreOptions,
    }

    impl Backend for Redb {
        type Store = RedbStore;
        fn fresh(&mut self, case: u64) -> RedbStore {
            RedbStore::open(&self.dir.path().join(format!("{case}.redb")), self.opts.clone())
                .unwrap()
        }
        fn reopen(&mut self, store: RedbStore, case: u64) -> RedbStore {
            if case.is_multiple_of(3) {
                // A compaction rewrites the holder snapshot the reopen reads.
                store.compact().unwrap();
            }
            if case.is_multiple_of(2) {
                store.close().unwrap();
            } else {
                drop(store);
            }
            self.fresh(case)
        }
        fn coarse(&self) -> Option<u32> {
            self.opts.coarse
        }
    }

    #[test]
    fn redb_passes_the_store_suite() {
        for (coarse, compact_min) in [(Some(16), 1 << 20), (Some(2), 0), (None, 3)] {
            let mut b = Redb {
                dir: tempfile::tempdir().unwrap(),
                opts: StoreOptions {
                    coarse,
                    compact_min,
                    close_compact_min: compact_min,
                    ..StoreOptions::default()
                },
            };
            run(&mut b, 0x5eed, 30);
        }
    }

    #[test]
    fn the_model_is_the_obvious_one() {
        let mut m = Model::default();
        m.apply(&Change::PatchImage {
            host: "h".into(),
            image: "i".into(),
            block_size: 4096,
            size: 5000,
            blocks: vec![(1, Some(name(1)))],
        });
        let (man, seq) = &m.sources[&("h".into(), "i".into(), 4096)];
        assert_eq!((man.blocks.clone(), *seq), (vec![None, Some(name(1))], 1));
        let h = m.holders(None);
        assert_eq!(
            h[&name(1)],
            BTreeSet::from([("h".to_string(), "i".to_string(), 4096, 4096, 904)])
        );
        m.apply(&Change::RemoveHost { host: "h".into() });
        assert!(m.sources.is_empty() && m.seq == 2);
    }
}
