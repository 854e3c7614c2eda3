//! Keeping served LUNs' manifests current (issue 6, "what is served locally").
//!
//! Each declared LUN ([`LunSlot`]) names a [`LunSource`]. A lookup resolves it
//! in this order: the manifest file; else the LUN's authority's holding of the
//! image in the appliance's own index store; else the same holding from the
//! embedded indexer's parent over the peer protocol (`GetManifest` names the
//! host; the parent answers from its store or asks its own parent). Another
//! host's manifest of the same image name (a hypervisor may index its own copy
//! under the library LUN's name) is never looked at. [`decide`] turns
//! what the lookup found into a step: keep what is installed, install a new
//! manifest (the old `ServedLun` is tainted: sessions holding it pass through),
//! withdraw the LUN (the image is gone: pass-through until a manifest returns),
//! or note a failure (what is installed stays).
//!
//! [`refresh_loop`] runs that every `splicer.manifest_refresh_ms` for at most
//! [`MAX_PER_TICK`] LUNs a tick (round robin), each lookup bounded by
//! [`LOOKUP_TIMEOUT`]. A file is re-read only when its length or mtime changed;
//! an index lookup sends the installed digest, so an unchanged manifest costs
//! the parent a lookup and the wire one small reply.

use std::{sync::Arc, time::Duration};

use tracing::Instrument;

use super::catalog::{manifest_from_text, Catalog, FileStamp, LunSlot, LunSource, ManifestOrigin};
use crate::{
    index::{BlockStore, Manifest},
    peer::{
        client::{ManifestAnswer, Peer},
        indexer::SharedStore,
    },
};

/// LUNs looked up per refresh tick at most.
pub const MAX_PER_TICK: usize = 16;
/// One lookup's deadline (file read, store read, or the parent's answer).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where lookups go besides files.
#[derive(Clone, Default)]
pub struct Sources {
    /// The appliance's own index store (`[index]` / `[indexer]`).
    pub store: Option<SharedStore>,
    /// The embedded indexer's parent (the global index).
    pub parent: Option<Peer>,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found {
        manifest: Manifest,
        digest: [u8; 32],
        origin: ManifestOrigin,
    },
    /// The installed manifest is still current.
    Unchanged,
    /// No manifest (why).
    Absent(String),
}

/// What to do with a slot after a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Keep,
    Install {
        manifest: Manifest,
        digest: [u8; 32],
        origin: ManifestOrigin,
    },
    Withdraw(String),
    Failed(String),
}

/// The step for a slot whose installed manifest has digest `installed`.
pub fn decide(installed: Option<[u8; 32]>, lookup: Result<Lookup, String>) -> Step {
    match lookup {
        Ok(Lookup::Found { digest, .. }) if Some(digest) == installed => Step::Keep,
        Ok(Lookup::Found {
            manifest,
            digest,
            origin,
        }) => Step::Install {
            manifest,
            digest,
            origin,
        },
        Ok(Lookup::Unchanged) => Step::Keep,
        Ok(Lookup::Absent(why)) => Step::Withdraw(why),
        Err(e) => Step::Failed(e),
    }
}

/// blake3 of a manifest's encoding: its identity across sources.
pub fn digest_of(manifest: &Manifest) -> [u8; 32] {
    *blake3::hash(&manifest.encode()).as_bytes()
}

fn stamp_of(meta: &std::fs::Metadata) -> FileStamp {
    FileStamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    }
}

/// Look a manifest file up: unchanged when its stamp is `seen` and a manifest
/// is installed; absent when the file is gone. Returns the stamp read.
fn lookup_file(
    path: &std::path::Path,
    seen: Option<FileStamp>,
    installed: bool,
) -> (Result<Lookup, String>, Option<FileStamp>) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (
                Ok(Lookup::Absent(format!(
                    "manifest file {} is gone",
                    path.display()
                ))),
                None,
            )
        }
        Err(e) => return (Err(format!("{}: {e}", path.display())), seen),
    };
    let stamp = stamp_of(&meta);
    if installed && seen == Some(stamp) {
        return (Ok(Lookup::Unchanged), seen);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return (Err(format!("{}: {e}", path.display())), seen),
    };
    match manifest_from_text(&text) {
        Ok(manifest) => (
            Ok(Lookup::Found {
                digest: digest_of(&manifest),
                manifest,
                origin: ManifestOrigin::File,
            }),
            Some(stamp),
        ),
        // Perhaps caught mid-write: looked at again next tick.
        Err((line, message)) => (
            Err(format!("{} line {line}: {message}", path.display())),
            seen,
        ),
    }
}

/// Look `slot`'s source up (files and the local store on a blocking thread).
pub async fn lookup(slot: &LunSlot, sources: &Sources) -> Result<Lookup, String> {
    let installed = slot.digest();
    match &slot.decl.source {
        LunSource::Fixed => Ok(Lookup::Unchanged),
        LunSource::File(path) => {
            let (path, seen) = (path.clone(), slot.stamp());
            let (found, stamp) =
                tokio::task::spawn_blocking(move || lookup_file(&path, seen, installed.is_some()))
                    .await
                    .map_err(|e| e.to_string())?;
            slot.set_stamp(stamp);
            found
        }
        LunSource::Index {
            image,
            block_size,
            authority,
        } => lookup_index(sources, authority, image, *block_size, installed).await,
    }
}

/// Look up `image` as `authority` holds it (at `block_size`, else the smallest
/// it indexed): the appliance's own store, else the indexer's parent, which
/// answers `Unchanged` when its digest is `installed`.
pub async fn lookup_index(
    sources: &Sources,
    authority: &str,
    image: &str,
    block_size: Option<u32>,
    installed: Option<[u8; 32]>,
) -> Result<Lookup, String> {
    if let Some(store) = &sources.store {
        let (store, host, name) = (store.clone(), authority.to_string(), image.to_string());
        let local =
            tokio::task::spawn_blocking(move || store.host_manifest(&host, &name, block_size))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("index store: {e:#}"))?;
        if let Some(manifest) = local {
            return Ok(Lookup::Found {
                digest: digest_of(&manifest),
                manifest,
                origin: ManifestOrigin::Index,
            });
        }
    }
    let Some(parent) = &sources.parent else {
        return Ok(Lookup::Absent(format!(
            "{authority} holds no {image} in the index"
        )));
    };
    match parent
        .manifest(authority, image, block_size, installed)
        .await
    {
        Ok(ManifestAnswer::Found { manifest, digest }) => Ok(Lookup::Found {
            manifest,
            digest,
            origin: ManifestOrigin::Parent,
        }),
        Ok(ManifestAnswer::Unchanged) => Ok(Lookup::Unchanged),
        Ok(ManifestAnswer::Absent) => Ok(Lookup::Absent(format!(
            "{authority} holds no {image} in this index or its parent's"
        ))),
        Err(e) => Err(format!("parent index: {e}")),
    }
}

/// Look one LUN up and apply the step. Returns the step taken.
pub async fn refresh_one(catalog: &Catalog, slot: &LunSlot, sources: &Sources) -> Step {
    let found = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup(slot, sources)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    };
    let step = decide(slot.digest(), found);
    match &step {
        Step::Keep => slot.note_error(None),
        Step::Install {
            manifest,
            digest,
            origin,
        } => {
            if let Err(e) = catalog.install(slot, manifest.clone(), *digest, *origin) {
                // A manifest this LUN cannot be served from (block sizes):
                // nothing stale may stay.
                slot.withdraw(&e.to_string());
            }
        }
        Step::Withdraw(why) => slot.withdraw(why),
        Step::Failed(e) => {
            tracing::warn!(target = %slot.decl.target, lun = slot.decl.lun, cause = %e,
                "manifest lookup failed; the LUN keeps what it had");
            slot.note_error(Some(e.clone()));
        }
    }
    step
}

/// Refresh at most `max` LUNs starting at `*next` (round robin over the
/// declared LUNs); returns how many were looked up.
pub async fn refresh_some(
    catalog: &Catalog,
    sources: &Sources,
    next: &mut usize,
    max: usize,
) -> usize {
    let slots = catalog.slots();
    if slots.is_empty() {
        return 0;
    }
    let n = max.min(slots.len());
    for i in 0..n {
        let slot = &slots[(*next + i) % slots.len()];
        refresh_one(catalog, slot, sources).await;
    }
    *next = (*next + n) % slots.len();
    n
}

/// Keep every declared LUN's manifest current, one tick every `every`.
pub async fn refresh_loop(catalog: Arc<Catalog>, sources: Sources, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0;
    loop {
        tick.tick().await;
        refresh_some(&catalog, &sources, &mut next, MAX_PER_TICK)
            .instrument(tracing::debug_span!("manifest_refresh"))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::BlockCache;
    use crate::splice::catalog::{manifest_of, manifest_to_text, FetchMode, LunDecl, ServeDesign};

    /// What a READ CAPACITY answer from the target would record: 512-byte blocks.
    fn target_reports(slot: &crate::splice::catalog::LunSlot, size: u64) {
        slot.facts.record(crate::splice::facts::Fact::Geometry {
            block_length: 512,
            capacity: size / 512,
        });
    }

    fn decl(source: LunSource) -> LunDecl {
        LunDecl {
            target: "iqn.t:lib".into(),
            lun: 1,
            design: ServeDesign::Shadow,
            logical_block_size: Some(512),
            mode: FetchMode::OnDemand,
            source,
        }
    }

    fn found(m: &Manifest) -> Lookup {
        Lookup::Found {
            manifest: m.clone(),
            digest: digest_of(m),
            origin: ManifestOrigin::Index,
        }
    }

    #[test]
    fn decide_keeps_installs_withdraws_and_fails() {
        let a = manifest_of("a", &[1u8; 8192], 4096);
        let b = manifest_of("a", &[2u8; 8192], 4096);
        assert!(matches!(decide(None, Ok(found(&a))), Step::Install { .. }));
        assert_eq!(decide(Some(digest_of(&a)), Ok(found(&a))), Step::Keep);
        assert!(matches!(
            decide(Some(digest_of(&a)), Ok(found(&b))),
            Step::Install { digest, .. } if digest == digest_of(&b)
        ));
        assert_eq!(
            decide(Some(digest_of(&a)), Ok(Lookup::Unchanged)),
            Step::Keep
        );
        assert_eq!(
            decide(Some(digest_of(&a)), Ok(Lookup::Absent("gone".into()))),
            Step::Withdraw("gone".into())
        );
        assert_eq!(
            decide(Some(digest_of(&a)), Err("down".into())),
            Step::Failed("down".into())
        );
    }

    #[tokio::test]
    async fn a_changed_manifest_replaces_the_lun_and_taints_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun.manifest");
        let mut catalog = Catalog::new(Arc::new(BlockCache::new(0)), false);
        let slot = catalog.declare(decl(LunSource::File(path.clone())));
        let sources = Sources::default();

        // No file yet: declared, not served; the daemon goes on.
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Withdraw(_)
        ));
        let st = slot.status();
        assert!(!st.served && st.why.unwrap().contains("gone"));

        let old = manifest_of("img", &[1u8; 8192], 4096);
        std::fs::write(&path, manifest_to_text(&old)).unwrap();
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Install { .. }
        ));
        // Installed, but not served before the target told its block length.
        assert!(slot.serving().is_none());
        let why = slot.status().why.unwrap();
        assert!(why.contains("block length is not known"), "{why}");
        target_reports(&slot, 8192);
        let first = slot.serving().expect("served");
        first.record_boot(&[1, 0]);
        // Unchanged file: kept without re-reading.
        assert_eq!(refresh_one(&catalog, &slot, &sources).await, Step::Keep);
        assert!(slot.is_current(&first));

        // New content of the same length: a new LUN, the old one tainted, the
        // history kept (same block count).
        let new = manifest_of("img", &[2u8; 8192], 4096);
        std::fs::write(&path, manifest_to_text(&new)).unwrap();
        slot.set_stamp(None); // mtime granularity: force the re-read
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Install { .. }
        ));
        let second = slot.serving().expect("served");
        assert!(first.tainted() && !second.tainted());
        assert_eq!(second.manifest, new);
        assert_eq!(second.history().boots, 1);
        let st = slot.status();
        assert_eq!((st.served, st.manifest_seq, st.blocks), (true, 2, 2));
        assert_eq!(st.digest, Some(hex::encode(digest_of(&new))));

        // A longer image: history starts afresh.
        let longer = manifest_of("img", &[3u8; 12288], 4096);
        std::fs::write(&path, manifest_to_text(&longer)).unwrap();
        refresh_one(&catalog, &slot, &sources).await;
        // The target still reports the old capacity: the new manifest does not
        // describe the LUN the target exports (yet), so it is not served.
        assert!(slot.serving().is_none());
        assert!(slot.status().why.unwrap().contains("the target reports"));
        target_reports(&slot, 12288);
        let third = slot.serving().unwrap();
        assert!(second.tainted());
        assert_eq!(third.history().boots, 0);

        // A broken file (caught mid-write): kept, error shown.
        std::fs::write(&path, "nearblock-manifest 1 12288 4096 img\nzz\n").unwrap();
        slot.set_stamp(None);
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Failed(_)
        ));
        assert!(slot.is_current(&third) && !third.tainted());
        assert!(slot.status().last_error.is_some());

        // The file disappears: withdrawn and tainted until it returns.
        std::fs::remove_file(&path).unwrap();
        refresh_one(&catalog, &slot, &sources).await;
        assert!(third.tainted() && slot.current().is_none());
        assert!(!slot.status().served);
    }

    /// An index source's manifest is its authority's holding: another host's
    /// manifest of the same image name (newer, same block size) in the same
    /// store is never installed.
    #[tokio::test]
    async fn index_sources_come_from_the_local_store_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::index::RedbStore::open(
                &dir.path().join("i"),
                crate::index::StoreOptions::default(),
            )
            .unwrap(),
        );
        let m = manifest_of("iqn.t:lib/1", &[5u8; 8192], 4096);
        let mut catalog = Catalog::new(Arc::new(BlockCache::new(0)), false);
        let slot = catalog.declare(decl(LunSource::Index {
            image: "iqn.t:lib/1".into(),
            block_size: None,
            authority: "lib".into(),
        }));
        target_reports(&slot, 8192);
        let sources = Sources {
            store: Some(store.clone() as SharedStore),
            parent: None,
        };
        // Not indexed and no parent: declared, not served.
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Withdraw(_)
        ));
        // hv1 indexes other bytes under the LUN's image name: still not served.
        let hostile = manifest_of("iqn.t:lib/1", &[6u8; 8192], 4096);
        store
            .apply(&[crate::index::Change::PutImage {
                host: "hv1".into(),
                manifest: hostile.clone(),
            }])
            .unwrap();
        match refresh_one(&catalog, &slot, &sources).await {
            Step::Withdraw(why) => assert!(why.contains("lib holds no iqn.t:lib/1"), "{why}"),
            s => panic!("{s:?}"),
        }
        assert!(slot.current().is_none());
        store
            .apply(&[crate::index::Change::PutImage {
                host: "lib".into(),
                manifest: m.clone(),
            }])
            .unwrap();
        assert!(matches!(
            refresh_one(&catalog, &slot, &sources).await,
            Step::Install {
                origin: ManifestOrigin::Index,
                ..
            }
        ));
        assert_eq!(refresh_one(&catalog, &slot, &sources).await, Step::Keep);
        let st = slot.status();
        assert_eq!((st.served, st.origin), (true, Some(ManifestOrigin::Index)));
        assert_eq!(st.authority.as_deref(), Some("lib"));
        assert_eq!(slot.current().unwrap().manifest, m);
        // hv1 re-indexes its copy (newer than the library's): nothing changes.
        store
            .apply(&[crate::index::Change::PutImage {
                host: "hv1".into(),
                manifest: manifest_of("iqn.t:lib/1", &[7u8; 8192], 4096),
            }])
            .unwrap();
        assert_eq!(refresh_one(&catalog, &slot, &sources).await, Step::Keep);
        assert_eq!(slot.current().unwrap().manifest, m);
    }

    #[tokio::test]
    async fn refresh_some_is_bounded_and_round_robin() {
        let mut catalog = Catalog::new(Arc::new(BlockCache::new(0)), false);
        for lun in 0..5 {
            let mut d = decl(LunSource::File("/nonexistent/nearblock".into()));
            d.lun = lun;
            catalog.declare(d);
        }
        let mut next = 0;
        let sources = Sources::default();
        assert_eq!(refresh_some(&catalog, &sources, &mut next, 3).await, 3);
        assert_eq!(next, 3);
        assert_eq!(refresh_some(&catalog, &sources, &mut next, 3).await, 3);
        assert_eq!(next, 1);
    }
}
