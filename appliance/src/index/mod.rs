//! The block index: images split into fixed-size blocks named by their blake3 hash.
//!
//! - [`BlockHash`]: a block's name; [`BlockHashMap`], [`BlockHashSet`]: keyed by it.
//! - [`Manifest`]: an image as an ordered list of block names (zero blocks marked).
//! - [`chunk`]: splitting files and block devices into blocks, hashing on all cores.
//! - [`store`]: the [`BlockStore`] trait and the [`Change`]s it applies;
//!   [`redb_store`]: the embedded implementation; [`lookup`]: its holder index;
//!   [`redis_store`]: the implementation on Redis Cluster (a datacenter's
//!   global index); [`store_suite`]: the model-based suite both must pass.
//! - [`delta`]: (re-)indexing a file, recording only what changed.
//! - [`stats`]: zero / unique / shared fractions.
//! - [`http_name`]: the name of one version of a file an HTTP origin serves.
//! - [`synthetic`]: the seeded generator synthetic images are drawn from (benches, lab tests).

mod block_map;
pub mod chunk;
pub mod delta;
mod error;
pub mod http_name;
mod manifest;
mod record;

pub use block_map::{BlockHashMap, BlockHashSet};
pub use http_name::http_image_name;
pub use error::{IndexError, IndexIoContext, Result};
pub use manifest::{
    check_max_image_blocks, BlockHash, DecodeError, Manifest, DEFAULT_MAX_IMAGE_BLOCKS,
};
pub mod lookup;
mod many_hashes;
pub use many_hashes::hash_many;
pub mod redb_store;
pub mod redis_store;
pub mod stats;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod store_suite;
#[cfg(any(test, feature = "testing"))]
pub mod synthetic;

pub use redb_store::{RedbStore, StoreOptions};
pub use redis_store::{RedisClusterStore, RedisOptions};
pub use store::{BlockStore, Change, Location};
