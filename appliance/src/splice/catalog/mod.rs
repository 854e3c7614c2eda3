//! Which LUNs the splicer may answer itself, and with what. [`Catalog`] is the
//! facade the rest of the splicer holds: every declared LUN, the shared block
//! cache, where missing blocks come from, and the per-READ limits. What it owns
//! lives in one file per concern, in the order a READ needs them:
//!
//! - [`lun_address`]: the LUN field of a command decoded to a LUN number.
//! - [`lun_slot`]: the declared LUNs (`[[splicer.lun]]`), each holding the
//!   [`ServedLun`] of its current manifest, and their status.
//! - [`served_lun`]: one LUN served from one manifest: taint, block length, a
//!   READ assembled from zero and cached blocks, what is missing, read-ahead.
//!
//! The LUN's image, its blocks and the cache are the block core's
//! ([`crate::block_core`]): a READ is a byte range of the image.
//! - [`access_history`]: the boot a session records and the history files.
//! - [`manifest_text`]: the manifest file format.
//!
//! A LUN is served only if the operator declared it immutable (a `[[splicer.lun]]`
//! entry; tgt should export it `readonly=1`) and a current manifest is available.
//! Sessions capture the slots of their target at login and read the slot's
//! current LUN at every READ (one read lock and an `Arc` clone), so a manifest
//! that arrives or changes is used from the next READ. Anything that suggests the
//! content no longer matches the manifest (a write the target accepted, library
//! data that fails verification, a newer manifest) *taints* that `ServedLun`:
//! from then on it is passed through untouched; only a different manifest
//! installs a new, untainted one ([`Catalog::install`]).
//!
//! # Manifest sources
//! [`LunSource`]: a manifest *file* in the text form of [`manifest_to_text`]
//! (written by whoever indexed the image, e.g. the lab tests with
//! [`manifest_of`]), or an image in the index as one host holds it, the LUN's
//! *authority* (the appliance's own store, else its indexer's parent: see
//! `splice::manifests`, which keeps them current). The appliance never needs
//! the image itself.

pub mod access_history;
pub mod lun_address;
pub mod lun_slot;
pub mod manifest_text;
pub mod served_lun;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::block_core::BlockCore;
use crate::fetch::BlockCache;
use crate::index::Manifest;

pub use access_history::{history_path, keeps_history, BootTrace};
pub use lun_address::{lun_name, lun_number};
pub use lun_slot::{FileStamp, LunDecl, LunSlot, LunSource, LunStatus, ManifestOrigin};
pub use manifest_text::{manifest_from_text, manifest_to_text};
#[cfg(any(test, feature = "testing"))]
pub use manifest_text::manifest_of;
pub use served_lun::{FetchMode, ServeDesign, ServedLun};

use access_history::{read_history, save_history_in_background};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("LUN {target}/{lun}: {message}")]
    Invalid {
        target: String,
        lun: u16,
        message: String,
    },
}

/// Every declared LUN, by target name and LUN number, and the block core they
/// are served from.
#[derive(Debug)]
pub struct Catalog {
    luns: HashMap<(String, u16), Arc<LunSlot>>,
    /// The cache, the sourcing and the per-read limits (shared with the HTTP
    /// front end).
    pub core: Arc<BlockCore>,
    /// A connection whose login has not reached Full Feature Phase by then is
    /// closed (`splicer.login_timeout_secs`).
    pub login_timeout: std::time::Duration,
    /// Where each LUN's access history is kept (`None`: memory only).
    pub history_dir: Option<PathBuf>,
}

impl Catalog {
    pub fn new(cache: Arc<BlockCache>, learn: bool) -> Catalog {
        Catalog::with_core(BlockCore::new(cache, learn))
    }

    pub fn with_core(core: BlockCore) -> Catalog {
        Catalog {
            luns: HashMap::new(),
            core: Arc::new(core),
            login_timeout: std::time::Duration::from_secs(30),
            history_dir: None,
        }
    }

    /// Start prefetching `lun` in the background unless it is already running
    /// or there is no one to fetch from.
    pub fn start_prefetch(&self, lun: &Arc<ServedLun>) {
        self.core
            .start_prefetch(&lun.image, lun_name(&lun.target, lun.lun));
    }

    /// Every LUN's latest prefetch (those that ever ran).
    pub fn prefetches(&self) -> Vec<crate::fetch::prefetch::PrefetchStatus> {
        let mut v: Vec<_> = self
            .luns
            .values()
            .filter_map(|s| s.current())
            .map(|l| {
                l.prefetch.lock().clone()
            })
            .filter(|s| !s.lun.is_empty())
            .collect();
        v.sort_by(|a, b| a.lun.cmp(&b.lun));
        v
    }

    /// Load each LUN's saved access history from `dir` (missing files are fine;
    /// unreadable ones are reported and ignored: a history only orders fetches).
    /// LUNs installed later load theirs when they are installed.
    pub fn load_histories(&mut self, dir: PathBuf) {
        for lun in self.luns.values().filter_map(|s| s.current()) {
            load_history(&dir, &lun);
        }
        self.history_dir = Some(dir);
    }

    /// Record one session's reads of `lun` and save its history (atomically and
    /// durably: [`save_history`]).
    /// A boot of a LUN that has since been replaced goes to its successor if
    /// that keeps the history ([`keeps_history`]), else it is dropped.
    pub fn record_boot(&self, lun: &Arc<ServedLun>, reads: &[u64]) {
        let current = self
            .luns
            .get(&(lun.target.clone(), lun.lun))
            .and_then(|s| s.current());
        let lun = match current {
            Some(c) if Arc::ptr_eq(&c, lun) => c,
            Some(c) if keeps_history(&lun.manifest, &c.manifest) => c,
            _ => return,
        };
        lun.record_boot(reads);
        let Some(dir) = &self.history_dir else {
            return;
        };
        save_history_in_background(history_path(dir, &lun.target, lun.lun), lun.history());
    }

    /// The history of the served LUN whose manifest is image `image`.
    pub fn history_of(&self, image: &str) -> Option<crate::plan::AccessHistory> {
        self.luns
            .values()
            .filter_map(|s| s.current())
            .find(|l| l.manifest.image == image)
            .map(|l| l.history())
            .filter(|h| h.boots > 0)
    }

    pub fn empty() -> Catalog {
        Catalog::new(Arc::new(BlockCache::new(0)), false)
    }

    /// A LUN with a manifest given in code, served from now on (never refreshed).
    pub fn add(&mut self, lun: ServedLun) {
        let slot = self.declare(LunDecl {
            target: lun.target.clone(),
            lun: lun.lun,
            design: lun.design,
            logical_block_size: match lun.logical_block_size() {
                0 => None,
                declared => Some(declared),
            },
            mode: lun.mode,
            source: LunSource::Fixed,
        });
        let digest = *blake3::hash(&lun.manifest.encode()).as_bytes();
        slot.replace_current(Arc::new(lun), ManifestOrigin::Fixed, digest);
    }

    /// Declare a LUN (not served until a manifest is installed).
    pub fn declare(&mut self, decl: LunDecl) -> Arc<LunSlot> {
        let key = (decl.target.clone(), decl.lun);
        let slot = Arc::new(LunSlot::new(decl));
        self.luns.insert(key, slot.clone());
        slot
    }

    pub fn is_empty(&self) -> bool {
        self.luns.is_empty()
    }

    /// Every declared LUN, in (target, LUN) order.
    pub fn slots(&self) -> Vec<Arc<LunSlot>> {
        let mut v: Vec<_> = self.luns.values().cloned().collect();
        v.sort_by(|a, b| (&a.decl.target, a.decl.lun).cmp(&(&b.decl.target, b.decl.lun)));
        v
    }

    /// Every declared LUN's state.
    pub fn statuses(&self) -> Vec<LunStatus> {
        self.slots().iter().map(|s| s.status()).collect()
    }

    /// The declared LUNs of one target, by LUN number (a session captures
    /// them at login and asks each for its current LUN per READ).
    pub fn for_target(&self, target: &str) -> HashMap<u16, Arc<LunSlot>> {
        self.luns
            .iter()
            .filter(|((t, _), _)| t == target)
            .map(|((_, l), slot)| (*l, slot.clone()))
            .collect()
    }

    /// Serve `slot` from `manifest` (whose encoding hashes to `digest`) from now
    /// on: a new [`ServedLun`] replaces the current one, which is tainted, so
    /// every session still holding it passes through ([`LunSlot::replace_current`]). The access history is
    /// kept when [`keeps_history`] says so; a LUN installed for the first time
    /// loads its saved history.
    pub fn install(
        &self,
        slot: &LunSlot,
        manifest: Manifest,
        digest: [u8; 32],
        origin: ManifestOrigin,
    ) -> Result<Arc<ServedLun>, CatalogError> {
        let d = &slot.decl;
        let mut lun = ServedLun::new(
            d.target.clone(),
            d.lun,
            d.design,
            d.logical_block_size,
            manifest,
        )?;
        lun.mode = d.mode;
        let lun = Arc::new(lun);
        let old = slot.current();
        match &old {
            Some(o) if keeps_history(&o.manifest, &lun.manifest) => lun.set_history(o.history()),
            Some(_) => {}
            None => {
                if let Some(dir) = &self.history_dir {
                    load_history(dir, &lun);
                }
            }
        }
        let old = slot.replace_current(lun.clone(), origin, digest);
        tracing::info!(target = %d.target, lun = d.lun, image = %lun.manifest.image,
            size = lun.manifest.size, blocks = lun.manifest.blocks.len(), ?origin,
            digest = %hex::encode(&digest[..8]), replaced = old.is_some(), "LUN served from a manifest");
        Ok(lun)
    }
}
/// Start `lun` from its saved access history in `dir`, if there is one.
fn load_history(dir: &Path, lun: &ServedLun) {
    if let Some(history) = read_history(&history_path(dir, &lun.target, lun.lun)) {
        lun.set_history(history);
    }
}

/// What the unit tests of the catalog's files share: a small image and READs.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::splice::scsi::{ReadCommand, ReadKind};

    pub fn read(lba: u64, blocks: u32) -> ReadCommand {
        ReadCommand {
            kind: ReadKind::Read10,
            lba,
            blocks,
            rdprotect: 0,
            dpo: false,
            fua: false,
            group: 0,
            control: 0,
        }
    }

    /// 4 blocks of 4096 (+ a short tail of 1024): data, zero, data, data, tail.
    pub fn image() -> Vec<u8> {
        let mut data: Vec<u8> = (0..(4 * 4096 + 1024))
            .map(|i| u8::try_from(i % 253).unwrap() | 1)
            .collect();
        data[4096..8192].fill(0);
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixtures::image;

    #[test]
    fn histories_are_saved_and_loaded() {
        let dir = std::env::temp_dir().join(format!("nb-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = image();
        let lun = || {
            ServedLun::new(
                "iqn.x:y".into(),
                2,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap()
        };
        let mut catalog = Catalog::new(Arc::new(BlockCache::new(0)), false);
        catalog.add(lun());
        catalog.load_histories(dir.clone());
        let served = catalog.for_target("iqn.x:y")[&2].current().unwrap();
        catalog.record_boot(&served, &[2, 0]);
        assert!(history_path(&dir, "iqn.x:y", 2).exists());
        let mut again = Catalog::new(Arc::new(BlockCache::new(0)), false);
        again.add(lun());
        again.load_histories(dir.clone());
        let h = again.history_of("i").unwrap();
        assert_eq!((h.boots, h.probability(2), h.probability(1)), (1, 1.0, 0.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
