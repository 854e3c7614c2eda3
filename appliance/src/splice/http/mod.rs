//! The HTTP front end: image transfers over HTTP/1.1 (curl, wget, qemu-img's
//! HTTP driver) answered from the block core like iSCSI READs, so a block
//! learned from either protocol serves the other.
//!
//! The origin stays the authority: every `GET` is first asked of the origin as
//! `HEAD` (the same request otherwise), and only a `200`/`206` answer whose
//! validators name a version of the file the library's agent indexed is served
//! from blocks, with the origin's own status and headers. Everything else is
//! the origin's answer, passed through.
//!
//! - [`request`]: a client's request head and whether it is servable.
//! - [`response`]: the origin's response head: framing, and the body it describes.
//! - [`images`]: the manifests of the versions the origin validated.
//! - [`exchange`]: one connection, request by request.

pub mod exchange;
pub mod images;
pub mod request;
pub mod response;

use std::sync::Arc;

use crate::block_core::BlockCore;

use super::stats::SplicerStats;

/// What the HTTP front end's connections share.
#[derive(Debug)]
pub struct HttpContext {
    /// Destination ports the front end answers (`splicer.http.ports`).
    pub ports: Vec<u16>,
    pub core: Arc<BlockCore>,
    pub images: Arc<images::HttpImages>,
    pub stats: Arc<SplicerStats>,
}
