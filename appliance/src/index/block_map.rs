//! Hash maps and sets keyed by block name, for the hot paths that look up a
//! block per block (the planner, the fetcher's cache and in-flight table).
//!
//! Hasher: `rustc_hash`'s Fx. A key is a blake3 output (uniform), so SipHash's
//! resistance to chosen keys buys nothing here: an attacker cannot choose a
//! block's name without finding blake3 preimages. Fx costs a few multiplies per
//! key where SipHash costs tens of nanoseconds.

use rustc_hash::FxBuildHasher;

use super::BlockHash;

/// A hash map keyed by [`BlockHash`].
pub type BlockHashMap<V> = std::collections::HashMap<BlockHash, V, FxBuildHasher>;

/// A set of [`BlockHash`]es.
pub type BlockHashSet = std::collections::HashSet<BlockHash, FxBuildHasher>;
