//! The errors of the peer services — indexers and agents — as the library's
//! `thiserror` type ([`PeerError`]); the binary adds context with anyhow at its
//! edge.

use super::client::FetchError;

/// Why an indexer or agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A file, socket, signal or process operation failed; `what` names the
    /// operation and its object.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A state file that does not (de)serialise.
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// The parent (or another peer) failed or refused a request.
    #[error(transparent)]
    Remote(#[from] FetchError),
    /// A blocking task (store work off the runtime) panicked or was cancelled.
    #[error("blocking task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// tgtd's control interface failed.
    #[error("{0}")]
    Tgt(String),
    /// The hypervisor hook failed (listing VMs, building a disk).
    #[error("hypervisor: {0}")]
    Hypervisor(#[from] crate::hypervisor::HookError),
    /// A config part read when it is used (the index backend's secrets).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The parent broke the push protocol.
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T, E = PeerError> = std::result::Result<T, E>;

impl PeerError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        PeerError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<std::io::Error> for PeerError {
    fn from(source: std::io::Error) -> Self {
        PeerError::io("I/O", source)
    }
}

impl From<serde_json::Error> for PeerError {
    fn from(source: serde_json::Error) -> Self {
        PeerError::Json {
            what: "JSON".into(),
            source,
        }
    }
}

/// Attach the operation and its object to an I/O error (`open /x/y`), making it
/// a [`PeerError::Io`].
pub trait AnnotateIo<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> AnnotateIo<T> for std::io::Result<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| PeerError::io(what(), e))
    }
}
