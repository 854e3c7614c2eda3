//! The declared LUNs: each `[[splicer.lun]]` ([`LunDecl`], with where its
//! manifest comes from, [`LunSource`]) is a [`LunSlot`] holding the
//! [`ServedLun`] of its current manifest, if any, what the target reported about
//! it, and its state as `nearblock status` shows it ([`LunStatus`]).

use std::{path::PathBuf, sync::Arc};

use parking_lot::{Mutex, RwLock};

use super::served_lun::{FetchMode, ServeDesign, ServedLun};

/// Where a declared LUN's manifest comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LunSource {
    /// A manifest file in the text form ([`super::manifest_text`]).
    File(PathBuf),
    /// An image in the index, as its authority holds it: the appliance's own
    /// store, else its indexer's parent (which asks up the tree). The library's
    /// agent names tgt LUNs `IQN/LUN`.
    Index {
        image: String,
        /// `None`: the smallest block size the authority indexed.
        block_size: Option<u32>,
        /// The host whose holding of `image` is the LUN's manifest (the
        /// library's agent): any other host's manifest of the same name is
        /// that host's own copy, never what this LUN serves.
        authority: String,
    },
    /// A manifest given in code ([`super::Catalog::add`]); never refreshed.
    Fixed,
}

impl std::fmt::Display for LunSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LunSource::File(p) => write!(f, "file {}", p.display()),
            LunSource::Index { image, .. } => write!(f, "index {image}"),
            LunSource::Fixed => f.write_str("fixed"),
        }
    }
}

/// One `[[splicer.lun]]`: how the LUN is served once it has a manifest.
#[derive(Clone, Debug)]
pub struct LunDecl {
    pub target: String,
    pub lun: u16,
    pub design: ServeDesign,
    /// Declared in config; `None`: the target's own.
    pub logical_block_size: Option<u32>,
    pub mode: FetchMode,
    pub source: LunSource,
}

/// Where the installed manifest was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestOrigin {
    File,
    /// The appliance's own index store.
    Index,
    /// The embedded indexer's parent (the global index).
    Parent,
    Fixed,
}

/// A manifest file's identity on disk: a change re-reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// One declared LUN in `nearblock status` (`splicer.luns`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LunStatus {
    pub target: String,
    pub lun: u16,
    /// Where its manifest is looked for (`file PATH`, `index IMAGE`).
    pub source: String,
    /// READs may be answered locally now.
    pub served: bool,
    /// Why not, when not served.
    #[serde(default)]
    pub why: Option<String>,
    #[serde(default)]
    pub origin: Option<ManifestOrigin>,
    /// With an index origin: the host whose holding the installed manifest is
    /// (the LUN's authority).
    #[serde(default)]
    pub authority: Option<String>,
    /// The installed manifest: image, size, block size, blocks, digest (blake3
    /// of its encoding, hex).
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub block_size: u32,
    #[serde(default)]
    pub blocks: u64,
    #[serde(default)]
    pub digest: Option<String>,
    /// Manifests installed for this LUN so far (1: the first; each change +1).
    #[serde(default)]
    pub manifest_seq: u64,
    /// The latest failure to look the manifest up (the LUN keeps what it had).
    #[serde(default)]
    pub last_error: Option<String>,
    /// What the target reported about the LUN (READ CAPACITY, MODE SENSE).
    #[serde(default)]
    pub target_facts: crate::splice::facts::Facts,
}

#[derive(Debug, Default)]
struct SlotState {
    origin: Option<ManifestOrigin>,
    digest: Option<[u8; 32]>,
    stamp: Option<FileStamp>,
    installed: u64,
    /// Why nothing is installed (when nothing is).
    why: Option<String>,
    last_error: Option<String>,
}

/// A declared LUN and the [`ServedLun`] of its current manifest, if any.
#[derive(Debug)]
pub struct LunSlot {
    pub decl: LunDecl,
    current: RwLock<Option<Arc<ServedLun>>>,
    state: Mutex<SlotState>,
    /// What the target reports about the LUN (block length, capacity, WP).
    pub facts: crate::splice::facts::TargetFacts,
}

impl LunSlot {
    pub fn new(decl: LunDecl) -> LunSlot {
        LunSlot {
            decl,
            current: RwLock::new(None),
            state: Mutex::new(SlotState {
                why: Some("no manifest yet".into()),
                ..Default::default()
            }),
            facts: crate::splice::facts::TargetFacts::default(),
        }
    }

    /// The LUN of the current manifest (tainted or not). Per READ: a read lock
    /// held for an `Arc` clone.
    pub fn current(&self) -> Option<Arc<ServedLun>> {
        self.current.read().clone()
    }

    /// The current LUN if it may be served: not tainted, and the target's own block
    /// length and capacity are known and agree with it ([`crate::splice::facts`]).
    pub fn serving(&self) -> Option<Arc<ServedLun>> {
        let lun = self.current().filter(|l| !l.tainted())?;
        // Per READ: before the target has answered a READ CAPACITY (the common
        // not-served case) answer without building the reason string.
        self.facts.get().block_length?;
        self.disagreement(&lun).is_none().then_some(lun)
    }

    /// Why `lun` may not be served with what the target reported, if it may not.
    /// Adopts the target's block length into a LUN that declared none.
    fn disagreement(&self, lun: &ServedLun) -> Option<String> {
        let facts = self.facts.get();
        if let Some(why) = crate::splice::facts::disagreement(
            &facts,
            self.decl.logical_block_size,
            lun.manifest.size,
            lun.manifest.block_size,
        ) {
            return Some(why);
        }
        let target_length = facts.block_length?;
        lun.adopt_block_length(target_length);
        let served_length = lun.logical_block_size();
        (served_length != target_length).then(|| {
            format!(
                "served with block length {served_length}, the target now reports {target_length}"
            )
        })
    }

    /// `lun` is this slot's current LUN.
    pub fn is_current(&self, lun: &Arc<ServedLun>) -> bool {
        self.current().is_some_and(|c| Arc::ptr_eq(&c, lun))
    }

    /// Digest of the installed manifest.
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.state.lock().digest
    }

    /// The manifest file's stamp when it was last read.
    pub fn stamp(&self) -> Option<FileStamp> {
        self.state.lock().stamp
    }

    pub fn set_stamp(&self, stamp: Option<FileStamp>) {
        self.state.lock().stamp = stamp;
    }

    /// Record a failed lookup (what is installed stays).
    pub fn note_error(&self, error: Option<String>) {
        self.state.lock().last_error = error;
    }

    fn swap(&self, new: Option<Arc<ServedLun>>) -> Option<Arc<ServedLun>> {
        std::mem::replace(&mut *self.current.write(), new)
    }

    /// Serve `lun` (from a manifest found at `origin`, whose encoding hashes to
    /// `digest`) from now on. The LUN it replaces, if any, is tainted (every
    /// session still holding it passes through) and returned.
    pub(super) fn replace_current(
        &self,
        lun: Arc<ServedLun>,
        origin: ManifestOrigin,
        digest: [u8; 32],
    ) -> Option<Arc<ServedLun>> {
        let old = self.swap(Some(lun));
        if let Some(o) = &old {
            o.taint("replaced by a newer manifest");
        }
        let mut st = self.state.lock();
        st.origin = Some(origin);
        st.digest = Some(digest);
        st.installed += 1;
        st.why = None;
        st.last_error = None;
        old
    }

    /// Stop serving: the current LUN (if any) is tainted and removed; `why`
    /// shows in status until a manifest is installed.
    pub fn withdraw(&self, why: &str) {
        if let Some(old) = self.swap(None) {
            old.taint(why);
        }
        let mut st = self.state.lock();
        if st.why.as_deref() != Some(why) {
            tracing::info!(target = %self.decl.target, lun = self.decl.lun, why,
                "LUN declared but not served (pass-through)");
        }
        st.why = Some(why.to_string());
        st.digest = None;
        st.origin = None;
        st.last_error = None;
    }

    pub fn status(&self) -> LunStatus {
        let st = self.state.lock();
        let current = self.current();
        let why = match &current {
            Some(l) if l.tainted() => {
                Some(format!("tainted: {}", l.taint_reason().unwrap_or_default()))
            }
            Some(l) => self.disagreement(l),
            None => st.why.clone(),
        };
        let served = current.is_some() && why.is_none();
        let m = current.as_ref().map(|l| &l.manifest);
        LunStatus {
            target: self.decl.target.clone(),
            lun: self.decl.lun,
            source: self.decl.source.to_string(),
            served,
            why,
            origin: current.as_ref().and(st.origin),
            authority: match (&self.decl.source, current.as_ref().and(st.origin)) {
                (
                    LunSource::Index { authority, .. },
                    Some(ManifestOrigin::Index | ManifestOrigin::Parent),
                ) => Some(authority.clone()),
                _ => None,
            },
            image: m.map(|m| m.image.clone()),
            size: m.map_or(0, |m| m.size),
            block_size: m.map_or(0, |m| m.block_size),
            blocks: m.map_or(0, |m| m.blocks.len() as u64),
            digest: current.as_ref().and(st.digest).map(hex::encode),
            manifest_seq: st.installed,
            last_error: st.last_error.clone(),
            target_facts: self.facts.get(),
        }
    }
}
