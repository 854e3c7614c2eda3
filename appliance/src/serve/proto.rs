//! The peer protocol's frames and messages.
//!
//! A frame on the wire: `u32` length (big endian; counts everything after it), a
//! version byte ([`VERSION`]), a kind byte, a `u64` request id, then the payload.
//! A response carries the id of its request, so requests pipeline on one
//! connection and are answered in any order. Integers inside payloads are little
//! endian; strings and byte strings are `u32` length + bytes. Decoding never
//! panics: every length is checked against what is left of the frame, and frames
//! above the receiver's limit are refused before they are read.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{
    index::{BlockHash, Location},
    plan::HostMetrics,
};

/// Protocol version spoken by this build. Version 2: per-node keys and the Noise
/// channel (`auth`); the handshake messages of version 1 are gone.
pub const VERSION: u8 = 2;
/// Version byte + kind byte + request id.
pub const HEADER_LEN: usize = 1 + 1 + 8;
/// Default limit on one frame (length field), both directions.
pub const DEFAULT_MAX_FRAME: u32 = 32 << 20;
/// Most hashes one `GetBlocks` or `Holders` request may carry.
pub const MAX_HASHES: usize = 16_384;
/// Most host reports one `HostMetrics` request may carry.
pub const MAX_REPORTS: usize = 16_384;
/// Most changes one `Push` may carry: 2^20 (a normal push carries at most 256,
/// a resync piece is cut at this count too). A change is at least 12 bytes on
/// the wire but 40 decoded, so the count is bounded, not just the bytes.
pub const MAX_PUSH_CHANGES: usize = 1 << 20;
/// Most host → address pairs one `Push` may carry (one per host below the child).
pub const MAX_PUSH_ADDRS: usize = 1 << 20;
/// Most manifest bytes one `ManifestReply` carries (a larger manifest comes in
/// pieces, each asked for by offset): 16 MiB, half the default frame limit — a
/// 1 GiB image at 4 KiB (262,144 blocks, ~8.4 MB encoded) fits in one.
pub const MAX_MANIFEST_PIECE: u32 = 16 << 20;

/// What a peer is (sent in the handshake and bound into its MAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    /// Serves blocks of its own files.
    Agent,
    /// A local or global indexer.
    Indexer,
    /// Only asks (the splicer, the CLI).
    Client,
}

impl Role {
    pub fn code(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Indexer => 2,
            Role::Client => 3,
        }
    }
    pub fn from_code(c: u8) -> Result<Self, ProtoError> {
        Ok(match c {
            1 => Role::Agent,
            2 => Role::Indexer,
            3 => Role::Client,
            _ => return Err(ProtoError::Malformed("role")),
        })
    }
}

/// Error codes carried by [`Msg::Error`].
pub mod code {
    /// Authentication failed (wrong secret) or a request before authentication.
    pub const AUTH: u16 = 1;
    /// The request was malformed or not understood by this role.
    pub const BAD_REQUEST: u16 = 2;
    /// The server failed (store error); retry later.
    pub const INTERNAL: u16 = 3;
    /// Push: the changes do not follow what the parent acknowledged; resync.
    pub const GAP: u16 = 4;
    /// This server does not offer the service (e.g. blocks from an indexer).
    pub const UNSUPPORTED: u16 = 5;
    /// Push: some changes were refused (each named in the message, e.g. over
    /// `max_image_blocks`); the others were applied and everything up to
    /// `acked` is acknowledged, so the child moves on (it does not resend them).
    pub const REFUSED: u16 = 6;
}

/// One block in a [`Msg::Blocks`] reply, in the order of the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReply {
    Found(Bytes),
    /// The server holds no copy of this hash (never an empty block).
    NotFound,
    /// Left out to keep the reply under the frame limit: ask again.
    Skipped,
    /// The server has it indexed but could not read it.
    Failed(String),
}

/// A copy of a block and the address of the peer serving it (if known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub location: Location,
    /// `ip:port` of the host's block service.
    pub addr: Option<String>,
}

/// A host's load (used fractions in [0, 1], each optional) and how long ago it
/// was measured (relative, so the peers' clocks need not agree).
#[derive(Clone, Debug, PartialEq)]
pub struct HostReport {
    pub host: String,
    pub metrics: HostMetrics,
    pub age_ms: u64,
}

/// One piece of an image's manifest ([`Msg::ManifestReply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestPiece {
    /// Neither the server nor (when it asked) its parent has the image.
    Absent,
    /// The manifest's digest is the one the request said it knows.
    Unchanged,
    /// Bytes `offset..offset + data.len()` of the manifest's encoding
    /// ([`crate::index::Manifest::encode`]), `total` bytes in all; `digest` is
    /// blake3 of the whole encoding (the pieces of one manifest share it).
    Part {
        digest: [u8; 32],
        total: u64,
        offset: u64,
        data: Bytes,
    },
}

impl ManifestPiece {
    /// The answer to a `GetManifest` from a manifest's `encoded` bytes: unchanged
    /// if `known` is its digest, else at most `max_len` (at least 1) bytes from
    /// `offset` (clamped to the end).
    pub fn of(encoded: &[u8], known: [u8; 32], offset: u64, max_len: u32) -> ManifestPiece {
        let digest = *blake3::hash(encoded).as_bytes();
        if digest == known {
            return ManifestPiece::Unchanged;
        }
        let total = encoded.len() as u64;
        let from = offset.min(total);
        let to = from.saturating_add(u64::from(max_len.max(1))).min(total);
        ManifestPiece::Part {
            digest,
            total,
            offset: from,
            data: Bytes::copy_from_slice(&encoded[from as usize..to as usize]),
        }
    }
}

/// One change of a push: the child's sequence number and the change in the
/// index's own encoding ([`crate::index::Change::encode`]).
pub type PushedChange = (u64, Bytes);

#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// The server accepted the client's key (the first frame on the channel).
    AuthOk,
    Error {
        code: u16,
        /// For [`code::GAP`] and [`code::REFUSED`]: what the parent acknowledged.
        acked: u64,
        message: String,
    },
    GetBlocks {
        hashes: Vec<BlockHash>,
    },
    Blocks {
        items: Vec<BlockReply>,
    },
    Holders {
        /// Do not ask the parent for hashes without a local holder.
        local_only: bool,
        hashes: Vec<BlockHash>,
    },
    HoldersReply {
        items: Vec<Vec<Holder>>,
    },
    /// Changes of `node` (a child indexer or agent). `resync`: the changes are a
    /// full restatement (puts of everything the child holds); the parent then
    /// records `upto` as acknowledged, except when it is `u64::MAX` (more resync
    /// frames follow).
    Push {
        node: String,
        resync: bool,
        upto: u64,
        /// Host → block service address, as known to the child.
        addrs: Vec<(String, String)>,
        changes: Vec<PushedChange>,
    },
    /// The parent applied the child's changes up to `seq` (durably). The reply
    /// to [`Msg::HostMetrics`] too: `seq` = reports recorded.
    Ack {
        seq: u64,
    },
    /// Host load reports, child → parent: an agent's own (measured or pinned),
    /// or an indexer forwarding the latest of every host below it. Added after
    /// version 1 shipped, as a new kind: a peer that does not know it answers
    /// `BAD_REQUEST` and closes the connection (the sender then backs off).
    HostMetrics {
        reports: Vec<HostReport>,
    },
    /// An image's manifest as `host` holds it (at `block_size`; 0: the smallest
    /// `host` indexed), from byte `offset` of its encoding, at most `max_len`
    /// bytes (the server may send less). `known`: the digest the asker already
    /// has (all zero: none); if it is still current the answer is
    /// [`ManifestPiece::Unchanged`]. An indexer without that holding asks its
    /// parent (with the same host); another host's manifest of the same image
    /// name is never the answer. An empty `host` is malformed. Added after
    /// version 1 shipped, as a new kind: an older peer answers `BAD_REQUEST`.
    GetManifest {
        host: String,
        image: String,
        block_size: u32,
        known: [u8; 32],
        offset: u64,
        max_len: u32,
    },
    ManifestReply {
        piece: ManifestPiece,
    },
    Ping,
    Pong,
    /// The server's counters and state.
    Status,
    /// JSON text.
    StatusReply {
        json: String,
    },
    /// A piece of a request too large for one frame: the pieces of one request
    /// share its id and, concatenated, are its kind byte followed by its payload.
    /// The last piece completes the request.
    Fragment {
        last: bool,
        data: Bytes,
    },
}

// Kinds 1-3 were version 1's handshake (Hello, Challenge, Auth).
const K_AUTH_OK: u8 = 4;
const K_ERROR: u8 = 5;
const K_GET_BLOCKS: u8 = 16;
const K_BLOCKS: u8 = 17;
const K_HOLDERS: u8 = 18;
const K_HOLDERS_REPLY: u8 = 19;
const K_PUSH: u8 = 20;
const K_ACK: u8 = 21;
const K_PING: u8 = 22;
const K_PONG: u8 = 23;
const K_STATUS: u8 = 24;
const K_STATUS_REPLY: u8 = 25;
const K_HOST_METRICS: u8 = 26;
const K_GET_MANIFEST: u8 = 27;
const K_MANIFEST_REPLY: u8 = 28;
/// Kind of [`Msg::Fragment`].
pub const K_FRAGMENT: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(u64, u32),
    #[error("frame shorter than its header ({0} bytes)")]
    Short(u32),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// A received frame, not yet decoded.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub id: u64,
    pub payload: Bytes,
}

/// Reads one frame. `Ok(None)`: the peer closed the connection between frames.
/// (For a stream of frames, [`FrameReader`] reads in large chunks.)
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame: u32,
) -> Result<Option<Frame>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame_len(len, max_frame)?;
    // Read into spare capacity: a block reply is megabytes, and zeroing it first
    // costs a pass over memory for nothing.
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let n = r.read_buf(&mut (&mut buf).limit(want)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    parse_frame(buf.freeze()).map(Some)
}

/// The length a frame's 4-byte prefix announces, checked against the limits.
fn frame_len(prefix: [u8; 4], max_frame: u32) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix);
    if len > max_frame {
        return Err(ProtoError::TooLarge(len as u64, max_frame));
    }
    if (len as usize) < HEADER_LEN {
        return Err(ProtoError::Short(len));
    }
    Ok(len as usize)
}

/// A frame from its bytes after the length prefix (version, kind, id, payload).
fn parse_frame(buf: Bytes) -> Result<Frame, ProtoError> {
    if buf[0] != VERSION {
        return Err(ProtoError::Version(buf[0]));
    }
    let kind = buf[1];
    let id = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
    Ok(Frame {
        kind,
        id,
        payload: buf.slice(HEADER_LEN..),
    })
}

/// Frames from a stream, read in large chunks into one buffer that frames are
/// split off (no copy): the block service's replies are megabytes, and a
/// buffered reader in between would copy every byte once more.
pub struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    max_frame: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Read at least this much at a time.
    const CHUNK: usize = 256 << 10;

    pub fn new(rd: R, max_frame: u32) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// The next frame; `Ok(None)`: the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtoError> {
        loop {
            let mut need = 4;
            if self.buf.len() >= 4 {
                let prefix: [u8; 4] = self.buf[..4].try_into().expect("4 bytes");
                need = 4 + frame_len(prefix, self.max_frame)?;
                if self.buf.len() >= need {
                    self.buf.advance(4);
                    let frame = self.buf.split_to(need - 4).freeze();
                    return parse_frame(frame).map(Some);
                }
            }
            self.buf.reserve((need - self.buf.len()).max(Self::CHUNK));
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    put_bytes(b, s.as_bytes());
}

fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}

fn put_hashes(b: &mut BytesMut, hashes: &[BlockHash]) {
    b.put_u32_le(hashes.len() as u32);
    for h in hashes {
        b.put_slice(&h.0);
    }
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::AuthOk => K_AUTH_OK,
            Msg::Error { .. } => K_ERROR,
            Msg::GetBlocks { .. } => K_GET_BLOCKS,
            Msg::Blocks { .. } => K_BLOCKS,
            Msg::Holders { .. } => K_HOLDERS,
            Msg::HoldersReply { .. } => K_HOLDERS_REPLY,
            Msg::Push { .. } => K_PUSH,
            Msg::Ack { .. } => K_ACK,
            Msg::Ping => K_PING,
            Msg::Pong => K_PONG,
            Msg::Status => K_STATUS,
            Msg::StatusReply { .. } => K_STATUS_REPLY,
            Msg::Fragment { .. } => K_FRAGMENT,
            Msg::HostMetrics { .. } => K_HOST_METRICS,
            Msg::GetManifest { .. } => K_GET_MANIFEST,
            Msg::ManifestReply { .. } => K_MANIFEST_REPLY,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::AuthOk => "AuthOk",
            Msg::Error { .. } => "Error",
            Msg::GetBlocks { .. } => "GetBlocks",
            Msg::Blocks { .. } => "Blocks",
            Msg::Holders { .. } => "Holders",
            Msg::HoldersReply { .. } => "HoldersReply",
            Msg::Push { .. } => "Push",
            Msg::Ack { .. } => "Ack",
            Msg::Ping => "Ping",
            Msg::Pong => "Pong",
            Msg::Status => "Status",
            Msg::StatusReply { .. } => "StatusReply",
            Msg::Fragment { .. } => "Fragment",
            Msg::HostMetrics { .. } => "HostMetrics",
            Msg::GetManifest { .. } => "GetManifest",
            Msg::ManifestReply { .. } => "ManifestReply",
        }
    }

    /// The whole frame (length prefix included) carrying this message as `id`.
    pub fn encode(&self, id: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0); // length, patched below
        b.put_u8(VERSION);
        b.put_u8(self.kind());
        b.put_u64(id);
        match self {
            Msg::AuthOk | Msg::Ping | Msg::Pong | Msg::Status => {}
            Msg::StatusReply { json } => put_str(&mut b, json),
            Msg::Fragment { last, data } => {
                b.put_u8(*last as u8);
                b.put_slice(data);
            }
            Msg::Error {
                code,
                acked,
                message,
            } => {
                b.put_u16_le(*code);
                b.put_u64_le(*acked);
                put_str(&mut b, message);
            }
            Msg::GetBlocks { hashes } => put_hashes(&mut b, hashes),
            Msg::Blocks { items } => {
                b.put_u32_le(items.len() as u32);
                for it in items {
                    match it {
                        BlockReply::Found(d) => {
                            b.put_u8(0);
                            put_bytes(&mut b, d);
                        }
                        BlockReply::NotFound => b.put_u8(1),
                        BlockReply::Skipped => b.put_u8(2),
                        BlockReply::Failed(m) => {
                            b.put_u8(3);
                            put_str(&mut b, m);
                        }
                    }
                }
            }
            Msg::Holders { local_only, hashes } => {
                b.put_u8(*local_only as u8);
                put_hashes(&mut b, hashes);
            }
            Msg::HoldersReply { items } => {
                b.put_u32_le(items.len() as u32);
                for hs in items {
                    b.put_u32_le(hs.len() as u32);
                    for h in hs {
                        let l = &h.location;
                        put_str(&mut b, &l.host);
                        put_str(&mut b, &l.image);
                        b.put_u32_le(l.block_size);
                        b.put_u64_le(l.offset);
                        b.put_u32_le(l.len);
                        put_str(&mut b, h.addr.as_deref().unwrap_or(""));
                    }
                }
            }
            Msg::Push {
                node,
                resync,
                upto,
                addrs,
                changes,
            } => {
                put_str(&mut b, node);
                b.put_u8(*resync as u8);
                b.put_u64_le(*upto);
                b.put_u32_le(addrs.len() as u32);
                for (h, a) in addrs {
                    put_str(&mut b, h);
                    put_str(&mut b, a);
                }
                b.put_u32_le(changes.len() as u32);
                for (seq, c) in changes {
                    b.put_u64_le(*seq);
                    put_bytes(&mut b, c);
                }
            }
            Msg::Ack { seq } => b.put_u64_le(*seq),
            Msg::GetManifest {
                host,
                image,
                block_size,
                known,
                offset,
                max_len,
            } => {
                put_str(&mut b, host);
                put_str(&mut b, image);
                b.put_u32_le(*block_size);
                b.put_slice(known);
                b.put_u64_le(*offset);
                b.put_u32_le(*max_len);
            }
            Msg::ManifestReply { piece } => match piece {
                ManifestPiece::Absent => b.put_u8(0),
                ManifestPiece::Unchanged => b.put_u8(1),
                ManifestPiece::Part {
                    digest,
                    total,
                    offset,
                    data,
                } => {
                    b.put_u8(2);
                    b.put_slice(digest);
                    b.put_u64_le(*total);
                    b.put_u64_le(*offset);
                    put_bytes(&mut b, data);
                }
            },
            Msg::HostMetrics { reports } => {
                b.put_u32_le(reports.len() as u32);
                for r in reports {
                    put_str(&mut b, &r.host);
                    let m = &r.metrics;
                    let vals = [m.cpu, m.mem, m.disk];
                    let flags = vals
                        .iter()
                        .enumerate()
                        .fold(0u8, |f, (i, v)| f | ((v.is_some() as u8) << i));
                    b.put_u8(flags);
                    for v in vals.into_iter().flatten() {
                        b.put_f64_le(v);
                    }
                    b.put_u64_le(r.age_ms);
                }
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }

    /// The frames carrying this message as `id`: one frame if it fits in
    /// `max_frame`, else [`Msg::Fragment`]s (for requests only; the receiver
    /// reassembles them up to its message limit).
    pub fn encode_frames(&self, id: u64, max_frame: u32) -> Vec<Bytes> {
        let whole = self.encode(id);
        if whole.len() - 4 <= max_frame as usize {
            return vec![whole];
        }
        // kind byte + payload, cut into pieces that fit with their own header.
        let mut inner = BytesMut::with_capacity(whole.len() - 4 - HEADER_LEN + 1);
        inner.put_u8(whole[5]);
        inner.put_slice(&whole[4 + HEADER_LEN..]);
        let inner = inner.freeze();
        let piece = (max_frame as usize).saturating_sub(HEADER_LEN + 1).max(1);
        let n = inner.len().div_ceil(piece);
        (0..n)
            .map(|i| {
                Msg::Fragment {
                    last: i + 1 == n,
                    data: inner.slice(i * piece..((i + 1) * piece).min(inner.len())),
                }
                .encode(id)
            })
            .collect()
    }

    /// Decodes the payload of a frame of `kind`. Found blocks share `payload`'s
    /// buffer (no copy).
    pub fn decode(kind: u8, payload: Bytes) -> Result<Msg, ProtoError> {
        let mut r = Rd {
            buf: payload,
            pos: 0,
        };
        let m = match kind {
            K_AUTH_OK => Msg::AuthOk,
            K_PING => Msg::Ping,
            K_PONG => Msg::Pong,
            K_STATUS => Msg::Status,
            K_STATUS_REPLY => Msg::StatusReply { json: r.string()? },
            K_FRAGMENT => {
                let last = r.bool()?;
                let data = r.buf.slice(r.pos..);
                r.pos = r.buf.len();
                Msg::Fragment { last, data }
            }
            K_ERROR => Msg::Error {
                code: r.u16()?,
                acked: r.u64()?,
                message: r.string()?,
            },
            K_GET_BLOCKS => Msg::GetBlocks {
                hashes: r.hashes()?,
            },
            K_BLOCKS => {
                let n = r.count(1)?;
                // One item per hash of the request.
                if n > MAX_HASHES {
                    return Err(ProtoError::Malformed("too many items in one Blocks reply"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(match r.u8()? {
                        0 => BlockReply::Found(r.bytes()?),
                        1 => BlockReply::NotFound,
                        2 => BlockReply::Skipped,
                        3 => BlockReply::Failed(r.string()?),
                        _ => return Err(ProtoError::Malformed("block status")),
                    });
                }
                Msg::Blocks { items }
            }
            K_HOLDERS => Msg::Holders {
                local_only: r.bool()?,
                hashes: r.hashes()?,
            },
            K_HOLDERS_REPLY => {
                let n = r.count(4)?;
                // One item per hash of the request.
                if n > MAX_HASHES {
                    return Err(ProtoError::Malformed("too many items in one HoldersReply"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let m = r.count(4 + 4 + 4 + 8 + 4 + 4)?;
                    let mut hs = Vec::with_capacity(m);
                    for _ in 0..m {
                        let location = Location {
                            host: r.string()?.into(),
                            image: r.string()?.into(),
                            block_size: r.u32()?,
                            offset: r.u64()?,
                            len: r.u32()?,
                        };
                        let addr = r.string()?;
                        hs.push(Holder {
                            location,
                            addr: (!addr.is_empty()).then_some(addr),
                        });
                    }
                    items.push(hs);
                }
                Msg::HoldersReply { items }
            }
            K_PUSH => {
                let node = r.string()?;
                let resync = r.bool()?;
                let upto = r.u64()?;
                let n = r.count(8)?;
                if n > MAX_PUSH_ADDRS {
                    return Err(ProtoError::Malformed("too many addresses in one Push"));
                }
                let mut addrs = Vec::with_capacity(n);
                for _ in 0..n {
                    addrs.push((r.string()?, r.string()?));
                }
                let n = r.count(12)?;
                if n > MAX_PUSH_CHANGES {
                    return Err(ProtoError::Malformed("too many changes in one Push"));
                }
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    changes.push((r.u64()?, r.bytes()?));
                }
                Msg::Push {
                    node,
                    resync,
                    upto,
                    addrs,
                    changes,
                }
            }
            K_ACK => Msg::Ack { seq: r.u64()? },
            K_GET_MANIFEST => Msg::GetManifest {
                host: r.string().and_then(|h| {
                    if h.is_empty() {
                        Err(ProtoError::Malformed("GetManifest names no host"))
                    } else {
                        Ok(h)
                    }
                })?,
                image: r.string()?,
                block_size: r.u32()?,
                known: r.arr32()?,
                offset: r.u64()?,
                max_len: r.u32()?,
            },
            K_MANIFEST_REPLY => Msg::ManifestReply {
                piece: match r.u8()? {
                    0 => ManifestPiece::Absent,
                    1 => ManifestPiece::Unchanged,
                    2 => {
                        let digest = r.arr32()?;
                        let total = r.u64()?;
                        let offset = r.u64()?;
                        let data = r.bytes()?;
                        if offset.saturating_add(data.len() as u64) > total {
                            return Err(ProtoError::Malformed("manifest piece past its total"));
                        }
                        ManifestPiece::Part {
                            digest,
                            total,
                            offset,
                            data,
                        }
                    }
                    _ => return Err(ProtoError::Malformed("manifest piece")),
                },
            },
            K_HOST_METRICS => {
                // host (≥ 4) + flags (1) + age (8)
                let n = r.count(4 + 1 + 8)?;
                if n > MAX_REPORTS {
                    return Err(ProtoError::Malformed(
                        "too many host reports in one request",
                    ));
                }
                let mut reports = Vec::with_capacity(n);
                for _ in 0..n {
                    let host = r.string()?;
                    let flags = r.u8()?;
                    if flags & !0b111 != 0 {
                        return Err(ProtoError::Malformed("host metric flags"));
                    }
                    let mut vals = [None; 3];
                    for (i, v) in vals.iter_mut().enumerate() {
                        if flags & (1 << i) != 0 {
                            let x = r.f64()?;
                            if !(0.0..=1.0).contains(&x) {
                                return Err(ProtoError::Malformed(
                                    "host metric is not a fraction in [0, 1]",
                                ));
                            }
                            *v = Some(x);
                        }
                    }
                    let [cpu, mem, disk] = vals;
                    reports.push(HostReport {
                        host,
                        metrics: HostMetrics { cpu, mem, disk },
                        age_ms: r.u64()?,
                    });
                }
                Msg::HostMetrics { reports }
            }
            k => return Err(ProtoError::UnknownKind(k)),
        };
        if r.pos != r.buf.len() {
            return Err(ProtoError::Malformed("trailing bytes"));
        }
        Ok(m)
    }
}

/// Bounds-checked reader over a payload.
struct Rd {
    buf: Bytes,
    pos: usize,
}

impl Rd {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtoError> {
        if self.buf.len() - self.pos < n {
            return Err(ProtoError::Malformed("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed("flag")),
        }
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn f64(&mut self) -> Result<f64, ProtoError> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn arr32(&mut self) -> Result<[u8; 32], ProtoError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    /// A count of items of at least `min_item` bytes each: refused if the rest of
    /// the payload cannot hold that many (so a forged count cannot allocate).
    fn count(&mut self, min_item: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() - self.pos {
            return Err(ProtoError::Malformed("count exceeds payload"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Bytes, ProtoError> {
        let n = self.u32()? as usize;
        self.take(n)?;
        Ok(self.buf.slice(self.pos - n..self.pos))
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError::Malformed("utf-8"))
    }
    fn hashes(&mut self) -> Result<Vec<BlockHash>, ProtoError> {
        let n = self.count(32)?;
        if n > MAX_HASHES {
            return Err(ProtoError::Malformed("too many hashes in one request"));
        }
        (0..n)
            .map(|_| Ok(BlockHash(self.arr32()?)))
            .collect::<Result<_, _>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn round(m: &Msg, id: u64) -> Msg {
        let wire = m.encode(id);
        let mut r = &wire[..];
        let f = read_frame(&mut r, DEFAULT_MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.id, id);
        assert!(r.is_empty());
        Msg::decode(f.kind, f.payload).unwrap()
    }

    fn samples() -> Vec<Msg> {
        let h = BlockHash::of(b"x");
        let loc = Location {
            host: "hv1".into(),
            image: "img".into(),
            block_size: 4096,
            offset: 8192,
            len: 4096,
        };
        vec![
            Msg::AuthOk,
            Msg::Ping,
            Msg::Pong,
            Msg::Error {
                code: code::GAP,
                acked: 9,
                message: "gap".into(),
            },
            Msg::Error {
                code: code::REFUSED,
                acked: 12,
                message: "change 11: PatchImage of `x`: more than max_image_blocks".into(),
            },
            Msg::GetBlocks { hashes: vec![h, h] },
            Msg::Blocks {
                items: vec![
                    BlockReply::Found(Bytes::from_static(b"abc")),
                    BlockReply::NotFound,
                    BlockReply::Skipped,
                    BlockReply::Failed("eio".into()),
                ],
            },
            Msg::Holders {
                local_only: true,
                hashes: vec![h],
            },
            Msg::HoldersReply {
                items: vec![
                    vec![],
                    vec![
                        Holder {
                            location: loc.clone(),
                            addr: Some("198.18.3.2:7900".into()),
                        },
                        Holder {
                            location: loc,
                            addr: None,
                        },
                    ],
                ],
            },
            Msg::Push {
                node: "rack1".into(),
                resync: false,
                upto: 0,
                addrs: vec![("hv1".into(), "1.2.3.4:5".into())],
                changes: vec![(1, Bytes::from_static(b"\x04\x00\x00\x00\x00"))],
            },
            Msg::Ack { seq: 42 },
            Msg::Status,
            Msg::StatusReply { json: "{}".into() },
            Msg::Fragment {
                last: true,
                data: Bytes::from_static(b"\x10abc"),
            },
            Msg::HostMetrics {
                reports: vec![
                    HostReport {
                        host: "hv1".into(),
                        metrics: HostMetrics {
                            cpu: Some(0.25),
                            mem: None,
                            disk: Some(1.0),
                        },
                        age_ms: 1500,
                    },
                    HostReport {
                        host: "hv2".into(),
                        metrics: HostMetrics::default(),
                        age_ms: 0,
                    },
                ],
            },
            Msg::GetManifest {
                host: "library".into(),
                image: "iqn.2026-11.test:lib/1".into(),
                block_size: 4096,
                known: [9; 32],
                offset: 17,
                max_len: MAX_MANIFEST_PIECE,
            },
            Msg::ManifestReply {
                piece: ManifestPiece::Absent,
            },
            Msg::ManifestReply {
                piece: ManifestPiece::Unchanged,
            },
            Msg::ManifestReply {
                piece: ManifestPiece::Part {
                    digest: [4; 32],
                    total: 10,
                    offset: 7,
                    data: Bytes::from_static(b"abc"),
                },
            },
        ]
    }

    #[tokio::test]
    async fn every_message_round_trips() {
        for (i, m) in samples().iter().enumerate() {
            assert_eq!(&round(m, i as u64 * 1000 + 1).await, m);
        }
    }

    #[tokio::test]
    async fn frames_above_the_limit_are_refused_before_reading() {
        let m = Msg::Blocks {
            items: vec![BlockReply::Found(Bytes::from(vec![1u8; 5000]))],
        };
        let wire = m.encode(1);
        let mut r = &wire[..];
        assert!(matches!(
            read_frame(&mut r, 4096).await,
            Err(ProtoError::TooLarge(_, 4096))
        ));
        // A forged length with nothing behind it.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut r, DEFAULT_MAX_FRAME).await,
            Err(ProtoError::TooLarge(..))
        ));
    }

    /// A stream that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frame_reader_splits_a_stream_into_frames() {
        let msgs = samples();
        let big = Msg::Blocks {
            items: vec![BlockReply::Found(Bytes::from(vec![7u8; 700_000]))],
        };
        let mut wire = Vec::new();
        for (i, m) in msgs.iter().chain([&big]).enumerate() {
            wire.extend_from_slice(&m.encode(i as u64));
        }
        for step in [1, 3, 4096, 1 << 20] {
            let mut r = FrameReader::new(Trickle { data: &wire, step }, DEFAULT_MAX_FRAME);
            for (i, m) in msgs.iter().chain([&big]).enumerate() {
                let f = r.next().await.unwrap().unwrap();
                assert_eq!(f.id, i as u64, "step {step}");
                assert_eq!(&Msg::decode(f.kind, f.payload).unwrap(), m);
            }
            assert!(r.next().await.unwrap().is_none());
        }
        // Cut inside a frame: an error, not a clean close; limits still hold.
        let cut = &wire[..wire.len() - 1];
        let mut r = FrameReader::new(
            Trickle {
                data: cut,
                step: 1 << 20,
            },
            DEFAULT_MAX_FRAME,
        );
        for _ in 0..msgs.len() {
            r.next().await.unwrap().unwrap();
        }
        assert!(r.next().await.is_err());
        let mut r = FrameReader::new(&[0xffu8, 0xff, 0xff, 0xff][..], DEFAULT_MAX_FRAME);
        assert!(matches!(r.next().await, Err(ProtoError::TooLarge(..))));
    }

    #[tokio::test]
    async fn wrong_version_short_frames_and_eof() {
        let mut wire = Msg::Ping.encode(1).to_vec();
        wire[4] = 9;
        assert!(matches!(
            read_frame(&mut &wire[..], DEFAULT_MAX_FRAME).await,
            Err(ProtoError::Version(9))
        ));
        let short = [0u8, 0, 0, 3, 1, 22, 0];
        assert!(matches!(
            read_frame(&mut &short[..], DEFAULT_MAX_FRAME).await,
            Err(ProtoError::Short(3))
        ));
        assert!(read_frame(&mut &[][..], DEFAULT_MAX_FRAME)
            .await
            .unwrap()
            .is_none());
        // EOF inside a frame is an error, not a clean close.
        let wire = Msg::Ack { seq: 1 }.encode(1);
        assert!(read_frame(&mut &wire[..wire.len() - 1], DEFAULT_MAX_FRAME)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn large_requests_are_fragmented_and_reassemble() {
        let m = Msg::GetBlocks {
            hashes: (0..1000u32)
                .map(|i| BlockHash::of(&i.to_le_bytes()))
                .collect(),
        };
        let frames = m.encode_frames(7, 4096);
        assert!(frames.len() >= 8, "{}", frames.len());
        let mut inner = BytesMut::new();
        for (k, f) in frames.iter().enumerate() {
            assert!(f.len() - 4 <= 4096);
            let fr = read_frame(&mut &f[..], 4096).await.unwrap().unwrap();
            assert_eq!((fr.kind, fr.id), (K_FRAGMENT, 7));
            match Msg::decode(fr.kind, fr.payload).unwrap() {
                Msg::Fragment { last, data } => {
                    assert_eq!(last, k + 1 == frames.len());
                    inner.put_slice(&data);
                }
                m => panic!("{m:?}"),
            }
        }
        let inner = inner.freeze();
        assert_eq!(Msg::decode(inner[0], inner.slice(1..)).unwrap(), m);
        assert_eq!(m.encode_frames(7, 1 << 20).len(), 1);
    }

    #[test]
    fn manifest_pieces_cut_and_recognise_the_known_digest() {
        let enc: Vec<u8> = (0..100u8).collect();
        let digest = *blake3::hash(&enc).as_bytes();
        assert_eq!(
            ManifestPiece::of(&enc, digest, 0, 10),
            ManifestPiece::Unchanged
        );
        let part = |offset, max_len| match ManifestPiece::of(&enc, [0; 32], offset, max_len) {
            ManifestPiece::Part {
                digest: d,
                total,
                offset,
                data,
            } => {
                assert_eq!((d, total), (digest, 100));
                (offset, data.to_vec())
            }
            p => panic!("{p:?}"),
        };
        assert_eq!(part(0, 10), (0, enc[..10].to_vec()));
        assert_eq!(part(95, 10), (95, enc[95..].to_vec()));
        assert_eq!(part(500, 10), (100, vec![]));
        assert_eq!(part(3, 0), (3, vec![3]), "at least one byte");
    }

    #[test]
    fn malformed_payloads_are_errors() {
        // Unknown kind.
        assert!(matches!(
            Msg::decode(200, Bytes::new()),
            Err(ProtoError::UnknownKind(200))
        ));
        // A forged count that the payload cannot hold.
        let mut p = BytesMut::new();
        p.put_u32_le(u32::MAX);
        assert!(Msg::decode(K_GET_BLOCKS, p.freeze()).is_err());
        // Trailing bytes.
        let mut p = BytesMut::new();
        p.put_u64_le(1);
        p.put_u8(0);
        assert!(Msg::decode(K_ACK, p.freeze()).is_err());
        // Bad status byte.
        let mut p = BytesMut::new();
        p.put_u32_le(1);
        p.put_u8(9);
        assert!(Msg::decode(K_BLOCKS, p.freeze()).is_err());
        // A metric outside [0, 1], and unknown metric flags.
        let bad = |flags: u8, v: f64| {
            let mut p = BytesMut::new();
            p.put_u32_le(1);
            put_str(&mut p, "hv1");
            p.put_u8(flags);
            p.put_f64_le(v);
            p.put_u64_le(0);
            Msg::decode(K_HOST_METRICS, p.freeze())
        };
        assert!(bad(0b001, 0.5).is_ok());
        assert!(bad(0b001, 1.5).is_err());
        assert!(bad(0b010, f64::NAN).is_err());
        assert!(bad(0b1001, 0.5).is_err());
        // A manifest piece reaching past its total, and an unknown piece state.
        let piece = |total: u64, state: u8| {
            let mut p = BytesMut::new();
            p.put_u8(state);
            p.put_slice(&[0; 32]);
            p.put_u64_le(total);
            p.put_u64_le(8);
            put_bytes(&mut p, b"abc");
            Msg::decode(K_MANIFEST_REPLY, p.freeze())
        };
        assert!(piece(11, 2).is_ok());
        assert!(piece(10, 2).is_err());
        assert!(piece(11, 3).is_err());
        // A manifest asked for without naming whose holding: refused, never
        // answered from any host's.
        let get_manifest = |host: &str| {
            let mut p = BytesMut::new();
            put_str(&mut p, host);
            put_str(&mut p, "iqn.t:lib/1");
            p.put_u32_le(0);
            p.put_slice(&[0; 32]);
            p.put_u64_le(0);
            p.put_u32_le(MAX_MANIFEST_PIECE);
            Msg::decode(K_GET_MANIFEST, p.freeze())
        };
        assert!(get_manifest("library").is_ok());
        assert!(matches!(
            get_manifest(""),
            Err(ProtoError::Malformed(m)) if m.contains("no host")
        ));
        // Too many hashes.
        let mut p = BytesMut::new();
        p.put_u32_le(MAX_HASHES as u32 + 1);
        p.put_slice(&vec![0u8; 32 * (MAX_HASHES + 1)]);
        assert!(Msg::decode(K_GET_BLOCKS, p.freeze()).is_err());
    }

    /// A count the payload could hold but no honest peer sends: refused on the
    /// count, before a vector is sized by it.
    fn refused_count(kind: u8, payload: BytesMut, what: &str) {
        match Msg::decode(kind, payload.freeze()) {
            Err(ProtoError::Malformed(m)) => assert!(m.contains(what), "{m}"),
            r => panic!("{what}: expected a refusal, got {r:?}"),
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocation() {
        // Blocks / HoldersReply: more items than a request may ask for (each
        // item's minimum bytes present, so only the bound refuses them).
        let mut p = BytesMut::new();
        p.put_u32_le(MAX_HASHES as u32 + 1);
        p.put_bytes(1, MAX_HASHES + 1);
        refused_count(K_BLOCKS, p, "Blocks reply");
        let mut p = BytesMut::new();
        p.put_u32_le(MAX_HASHES as u32 + 1);
        p.put_bytes(0, 4 * (MAX_HASHES + 1));
        refused_count(K_HOLDERS_REPLY, p, "HoldersReply");
        // Push: addresses and changes.
        let push_head = |p: &mut BytesMut| {
            put_str(p, "child");
            p.put_u8(0);
            p.put_u64_le(0);
        };
        let mut p = BytesMut::new();
        push_head(&mut p);
        p.put_u32_le(MAX_PUSH_ADDRS as u32 + 1);
        p.put_bytes(0, 8 * (MAX_PUSH_ADDRS + 1));
        refused_count(K_PUSH, p, "addresses");
        let mut p = BytesMut::new();
        push_head(&mut p);
        p.put_u32_le(0);
        p.put_u32_le(MAX_PUSH_CHANGES as u32 + 1);
        p.put_bytes(0, 12 * (MAX_PUSH_CHANGES + 1));
        refused_count(K_PUSH, p, "changes");
        // A count of u32::MAX with nothing behind it: refused against the payload.
        let mut p = BytesMut::new();
        push_head(&mut p);
        p.put_u32_le(0);
        p.put_u32_le(u32::MAX);
        refused_count(K_PUSH, p, "count exceeds payload");
        // At the bounds, accepted.
        let m = Msg::Blocks {
            items: vec![BlockReply::NotFound; MAX_HASHES],
        };
        let wire = m.encode(1);
        assert_eq!(
            Msg::decode(K_BLOCKS, wire.slice(4 + HEADER_LEN..)).unwrap(),
            m
        );
    }

    proptest! {
        /// Every truncation or corruption of a valid payload decodes to an error or
        /// to some message — never a panic.
        #[test]
        fn decode_never_panics(i in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>(), flip in any::<(usize, u8)>()) {
            let all = samples();
            let m = &all[i.index(all.len())];
            let wire = m.encode(1);
            let payload = wire.slice(4 + HEADER_LEN..);
            let kind = wire[5];
            let n = cut.index(payload.len() + 1);
            let _ = Msg::decode(kind, payload.slice(..n));
            let mut v = payload.to_vec();
            if !v.is_empty() {
                let k = flip.0 % v.len();
                v[k] ^= flip.1;
            }
            let _ = Msg::decode(kind, Bytes::from(v));
        }

        #[test]
        fn get_blocks_round_trip(hs in prop::collection::vec(any::<[u8; 32]>(), 0..50), id in any::<u64>()) {
            let m = Msg::GetBlocks { hashes: hs.into_iter().map(BlockHash).collect() };
            let wire = m.encode(id);
            let payload = wire.slice(4 + HEADER_LEN..);
            prop_assert_eq!(Msg::decode(wire[5], payload).unwrap(), m);
        }
    }
}
