//! The block index: images split into fixed-size blocks named by their blake3 hash.
//!
//! - [`BlockHash`]: a block's name.
//! - [`Manifest`]: an image as an ordered list of block names (zero blocks marked).
//! - [`chunk`]: splitting files and block devices into blocks, hashing on all cores.

pub mod chunk;
mod manifest;

pub use manifest::{BlockHash, DecodeError, Manifest};
pub mod lookup;
pub mod redb_store;
pub mod store;

pub use redb_store::{FileState, RedbStore, StoreOptions};
pub use store::{BlockStore, Change, ImageInfo, Location};
