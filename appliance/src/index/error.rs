//! The index's errors (the library's `thiserror` type; the CLI adds context with
//! anyhow at the edge).

use super::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A file operation failed; `what` names the operation and the path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The database file could not be opened (missing directory, locked by
    /// another process, not a redb file).
    #[error("open index {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    /// The embedded database failed.
    #[error("index database: {0}")]
    Db(#[from] redb::Error),
    /// The Redis Cluster backend failed (unreachable, a refused script, a
    /// `WAIT` short of replicas): nothing was acknowledged.
    #[error("index on redis cluster: {0}")]
    Redis(String),
    /// A bad argument (block size, limits).
    #[error("{0}")]
    Invalid(String),
    /// A change whose size implies more blocks than `max_image_blocks`: refused
    /// before anything was allocated for it.
    #[error("{change}: {size} bytes is {blocks} blocks, more than max_image_blocks = {max}")]
    TooLarge {
        change: String,
        size: u64,
        blocks: u64,
        max: u64,
    },
    /// Stored data that does not check out (snapshot header, checksums, bounds).
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The database file was written in another store format (see
    /// `STORE_FORMAT` in `redb_store`): refused before any record is read.
    #[error("{path}: {}", format_refusal(*found, *want))]
    Format {
        path: String,
        /// `None`: a store from before the format was recorded (format 1).
        found: Option<u64>,
        want: u64,
    },
}

/// Why a store of another format is refused, and what to do about it.
fn format_refusal(found: Option<u64>, want: u64) -> String {
    let found = match found {
        None => "index store of format 1 (hand-written records, before formats were recorded)"
            .to_string(),
        Some(f) => format!("index store of format {f}"),
    };
    format!(
        "{found}; this build reads format {want} only. Move the file (and its .holders \
         snapshot) aside and start with an empty index: an agent re-indexes its images, \
         an indexer is refilled by its children's resync"
    )
}

pub type Result<T, E = IndexError> = std::result::Result<T, E>;

impl IndexError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        IndexError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<std::io::Error> for IndexError {
    fn from(source: std::io::Error) -> Self {
        IndexError::io("I/O", source)
    }
}

/// redb reports each kind of failure as its own type; all of them are
/// `redb::Error`s.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> Self {
                IndexError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::CompactionError
);

/// Turns an I/O result into the index's, naming the operation and path that
/// failed (the peer module has its own, for its own error type).
pub trait IndexIoContext<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IndexIoContext<T> for std::io::Result<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| IndexError::io(what(), e))
    }
}
