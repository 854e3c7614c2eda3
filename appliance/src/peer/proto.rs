//! The peer protocol's frames and messages.
//!
//! A frame on the wire: `u32` length (big endian; counts everything after it), a
//! version byte ([`VERSION`]), a `u64` request id (big endian), then the message
//! body. A response carries the id of its request, so requests pipeline on one
//! connection and are answered in any order. [`FrameCodec`] cuts a stream into
//! frames (`tokio_util::codec`); frames above the receiver's limit are refused
//! before they are read.
//!
//! A body is the [`postcard`] encoding of a [`Msg`]: its first byte is the
//! variant index (the message's kind), then the fields (integers as varints,
//! strings and byte strings length-prefixed). Two kinds carry a raw tail after
//! that, by hand, so that megabytes of block data are never copied: a
//! [`Msg::Blocks`] reply (a postcard header per item, then the found blocks'
//! bytes concatenated; decoded blocks are slices of the frame's buffer) and a
//! [`Msg::Fragment`] (its piece of a larger request). Decoding never panics:
//! every count read from the wire is checked against its limit before anything
//! is sized by it, and anything malformed is an error.

use std::{fmt, marker::PhantomData};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{
    de::{self, DeserializeSeed, SeqAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

use super::build_order::{BuildOrder, BuildReport};
use crate::{
    index::{BlockHash, Location},
    plan::HostMetrics,
};

/// Protocol version spoken by this build. Version 2: per-node keys and the Noise
/// channel (`auth`), the handshake messages of version 1 gone, and message
/// bodies in postcard. Version 3: host reports carry absolute resources and the
/// host's VMs; build orders (`Build`, `BuildStatus`, `BuildCancel`).
pub const VERSION: u8 = 3;
/// Version byte + request id.
pub const HEADER_LEN: usize = 1 + 8;
/// Default limit on one frame (length field), both directions.
pub const DEFAULT_MAX_FRAME: u32 = 32 << 20;
/// Most hashes one `GetBlocks` or `Holders` request may carry.
pub const MAX_HASHES: usize = 16_384;
/// Most host reports one `HostMetrics` request may carry.
pub const MAX_REPORTS: usize = 16_384;
/// Most changes one `Push` may carry: 2^20 (a normal push carries at most 256,
/// a resync piece is cut at this count too). A change is at least 2 bytes on
/// the wire but 40 decoded, so the count is bounded, not just the bytes.
pub const MAX_PUSH_CHANGES: usize = 1 << 20;
/// Most host → address pairs one `Push` may carry (one per host below the child).
pub const MAX_PUSH_ADDRS: usize = 1 << 20;
/// Most manifest bytes one `ManifestReply` carries (a larger manifest comes in
/// pieces, each asked for by offset): 16 MiB, half the default frame limit — a
/// 1 GiB image at 4 KiB (262,144 blocks, ~8.4 MB encoded) fits in one.
pub const MAX_MANIFEST_PIECE: u32 = 16 << 20;
/// Most holders one `HoldersReply` may carry, over all its hashes: 2^20, about
/// what the default frame held in version 2's first, fixed-width encoding (a
/// holder is at least 6 bytes in postcard but ~150 decoded).
pub const MAX_HOLDERS: usize = 1 << 20;

/// What a peer is (sent in the handshake and bound into its MAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub location: Location,
    /// `ip:port` of the host's block service.
    pub addr: Option<String>,
}

/// A host's load (used fractions in [0, 1], each optional) and how long ago it
/// was measured (relative, so the peers' clocks need not agree).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    pub metrics: HostMetrics,
    pub age_ms: u64,
    /// Absolute resources, as far as the agent knows them.
    pub resources: HostResources,
    /// The host's VMs (an agent with a hypervisor hook; empty otherwise).
    #[serde(deserialize_with = "bounded::<_, _, MAX_VMS>")]
    pub vms: Vec<VmReport>,
}

/// Most VMs one host report may list.
pub const MAX_VMS: usize = 4096;

/// A host's absolute resources (unknown when absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostResources {
    pub cores: Option<u32>,
    pub mem_bytes: Option<u64>,
    pub mem_free_bytes: Option<u64>,
    /// Free for new VM disks (the hook's filesystem).
    pub disk_free_bytes: Option<u64>,
}

/// One VM as its host's agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    pub name: String,
    /// The image it was built from, when known.
    pub image: Option<String>,
    pub size: u64,
    pub state: crate::hypervisor::VmState,
}

/// One piece of an image's manifest ([`Msg::ManifestReply`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
/// index's own encoding ([`crate::index::Change::encode`]), opaque here.
pub type PushedChange = (u64, Bytes);

/// A peer message. The order of the variants is the wire's numbering of kinds
/// (postcard's variant index): add new kinds at the end, never reorder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
        #[serde(deserialize_with = "bounded::<_, _, MAX_HASHES>")]
        hashes: Vec<BlockHash>,
    },
    /// Encoded by hand after the kind byte (see [`encode_blocks`]): the blocks
    /// are the frame's bytes, not copies.
    Blocks {
        #[serde(skip)]
        items: Vec<BlockReply>,
    },
    Holders {
        /// Do not ask the parent for hashes without a local holder.
        local_only: bool,
        #[serde(deserialize_with = "bounded::<_, _, MAX_HASHES>")]
        hashes: Vec<BlockHash>,
    },
    HoldersReply {
        #[serde(deserialize_with = "holder_lists")]
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
        #[serde(deserialize_with = "bounded::<_, _, MAX_PUSH_ADDRS>")]
        addrs: Vec<(String, String)>,
        #[serde(deserialize_with = "bounded::<_, _, MAX_PUSH_CHANGES>")]
        changes: Vec<PushedChange>,
    },
    /// The parent applied the child's changes up to `seq` (durably). The reply
    /// to [`Msg::HostMetrics`] too: `seq` = reports recorded.
    Ack {
        seq: u64,
    },
    /// Host load reports, child → parent: an agent's own (measured or pinned),
    /// or an indexer forwarding the latest of every host below it. A peer that
    /// does not know a kind answers `BAD_REQUEST` and closes the connection (the
    /// sender then backs off).
    HostMetrics {
        #[serde(deserialize_with = "bounded::<_, _, MAX_REPORTS>")]
        reports: Vec<HostReport>,
    },
    /// An image's manifest as `host` holds it (at `block_size`; 0: the smallest
    /// `host` indexed), from byte `offset` of its encoding, at most `max_len`
    /// bytes (the server may send less). `known`: the digest the asker already
    /// has (all zero: none); if it is still current the answer is
    /// [`ManifestPiece::Unchanged`]. An indexer without that holding asks its
    /// parent (with the same host); another host's manifest of the same image
    /// name is never the answer. An empty `host` is malformed.
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
    /// share its id and, concatenated, are its body (kind byte included). The
    /// last piece completes the request. `data` is the raw tail of the body.
    Fragment {
        last: bool,
        #[serde(skip)]
        data: Bytes,
    },
    /// Manager → agent: build a VM's disk ([`super::build_order`]); a second
    /// order for a job waiting in `NeedsSources` is its re-plan. The reply is a
    /// [`Msg::BuildReply`].
    Build {
        order: Box<BuildOrder>,
    },
    /// Manager → agent: where build `job` is.
    BuildStatus {
        job: u64,
    },
    /// Manager → agent: stop build `job` and remove what it wrote.
    BuildCancel {
        job: u64,
    },
    BuildReply {
        report: Box<BuildReport>,
    },
    /// Manager → agent: start, pause, resume or retire a VM through the hook.
    /// The reply is `Ack{seq: 0}` or an error.
    VmAction {
        vm: String,
        action: crate::hypervisor::VmAction,
    },
    /// Manager → agent: new pacing for build `job`'s sources (bytes/s, 0:
    /// none, in the order's source order), when the budgets' shares change.
    /// The reply is a [`Msg::BuildReply`].
    BuildRates {
        job: u64,
        #[serde(deserialize_with = "bounded::<_, _, { super::build_order::MAX_SOURCES }>")]
        rates: Vec<u64>,
    },
    /// Manager → agent: build VM `vm`'s disk (`size` bytes of `image`) with the
    /// host's own image tool reading `source`, an `iscsi://` URL whose reads
    /// the rack's appliance answers (transparent mode). Followed and cancelled
    /// as a build (`BuildStatus`, `BuildCancel`); the reply is a
    /// [`Msg::BuildReply`].
    Import {
        job: u64,
        vm: String,
        image: String,
        size: u64,
        source: String,
    },
    /// Manager → rack appliance: its prefetches' share of its uplink's budget
    /// (bytes/s; 0: none, its own budget again) while builds cross that
    /// uplink, and whether the manager counted it as prefetching. The reply
    /// is a [`Msg::PrefetchState`].
    PrefetchShare {
        bytes_per_s: u64,
        counted: bool,
    },
    /// Whether a prefetch runs on the appliance now.
    PrefetchState {
        prefetching: bool,
    },
    /// Manager → agent: patch stored VM `order.vm`'s disk at `positions`
    /// (runs `(start, count)`) to the order's manifest (a migration's round
    /// after the first). Followed like a build; the reply is a
    /// [`Msg::BuildReply`].
    Patch {
        order: Box<super::build_order::BuildOrder>,
        #[serde(deserialize_with = "bounded::<_, _, { super::build_order::MAX_RUNS }>")]
        positions: Vec<(u32, u32)>,
    },
    /// Manager → migration source's agent: VM `vm`'s writes since `since`
    /// (none: start tracking), re-indexed and pushed. The reply is a
    /// [`Msg::Tracked`].
    Track {
        vm: String,
        since: Option<String>,
    },
    Tracked {
        report: Box<TrackReport>,
    },
    /// Manager → agent: stop tracking VM `vm`'s writes. The reply is
    /// `Ack{seq: 0}`.
    Untrack {
        vm: String,
    },
    /// Manager → rack appliance: stage the blocks `order` assigns to a source
    /// (SKIP: not wanted) in the cache and pin them for `owner` (a VM likely
    /// to move), replacing its earlier pins. Followed like a build; the reply
    /// is a [`Msg::BuildReply`].
    Prestage {
        order: Box<super::build_order::BuildOrder>,
        owner: String,
    },
    /// Manager → rack appliance: release `owner`'s pins. The reply is
    /// `Ack{seq: 0}`.
    Unpin {
        owner: String,
    },
}

/// One round of a migration source's write tracking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackReport {
    pub vm: String,
    /// For the next round.
    pub token: String,
    pub tracking: crate::hypervisor::Tracking,
    /// Bytes the hook named as possibly written.
    pub bytes_dirty: u64,
    /// Bytes read and hashed to re-index them.
    pub bytes_hashed: u64,
    /// Blocks recorded as changed.
    pub changed: u64,
    /// The agent's index sequence number after it.
    pub seq: u64,
    /// The manifest the agent now holds at `block_size` (blake3 of its
    /// encoding): the manager waits for the global index to have it.
    pub block_size: u32,
    pub digest: [u8; 32],
}

/// Kind (first body byte) of [`Msg::Fragment`]: its variant index.
pub const K_FRAGMENT: u8 = 15;

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
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// A received frame, not yet decoded.
#[derive(Debug)]
pub struct Frame {
    pub id: u64,
    /// The message body ([`Msg::decode`]).
    pub body: Bytes,
}

impl Frame {
    /// Whether the frame carries a [`Msg::Fragment`] (to be reassembled first).
    pub fn is_fragment(&self) -> bool {
        self.body.first() == Some(&K_FRAGMENT)
    }
}

/// Reads exactly one frame, nothing past it (the handshake's verdict, after
/// which the stream is handed on). `Ok(None)`: the peer closed the connection
/// before the frame. For a stream of frames, use [`FrameCodec`].
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
        return Err(ProtoError::TooLarge(u64::from(len), max_frame));
    }
    if (len as usize) < HEADER_LEN {
        return Err(ProtoError::Short(len));
    }
    Ok(len as usize)
}

/// A frame from its bytes after the length prefix (version, id, body).
#[expect(
    clippy::needless_pass_by_value,
    reason = "the buffer is handed over as the codec split it off; what is kept of it are slices (no copy)"
)]
fn parse_frame(buf: Bytes) -> Result<Frame, ProtoError> {
    if buf[0] != VERSION {
        return Err(ProtoError::Version(buf[0]));
    }
    let id = u64::from_be_bytes(buf[1..HEADER_LEN].try_into().expect("8 bytes"));
    Ok(Frame {
        id,
        body: buf.slice(HEADER_LEN..),
    })
}

/// The frame codec (`tokio_util::codec`): under a `FramedRead`, frames are split
/// off the read buffer without a copy (a block reply is megabytes), and a frame
/// above `max_frame` is refused on its length prefix, before it is read.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame: u32,
}

impl FrameCodec {
    /// Read buffer to give a `FramedRead` (`FramedRead::with_capacity`): reads
    /// of at least this much at a time.
    pub const READ_CHUNK: usize = 256 << 10;

    pub fn new(max_frame: u32) -> Self {
        FrameCodec { max_frame }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let prefix: [u8; 4] = src[..4].try_into().expect("4 bytes");
        let need = 4 + frame_len(prefix, self.max_frame)?;
        if src.len() < need {
            // Room for the whole frame, so it arrives in few large reads.
            src.reserve(need - src.len());
            return Ok(None);
        }
        src.advance(4);
        parse_frame(src.split_to(need - 4).freeze()).map(Some)
    }
}

/// Encodes a message with its request id.
impl Encoder<(u64, &Msg)> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, (id, msg): (u64, &Msg), dst: &mut BytesMut) -> Result<(), ProtoError> {
        let at = dst.len();
        dst.put_u32(0); // length, patched below
        dst.put_u8(VERSION);
        dst.put_u64(id);
        msg.encode_body(dst);
        let len = (dst.len() - at - 4) as u32;
        dst[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// postcard's output straight into a `BytesMut` (no intermediate vector).
struct BufFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BufFlavor<'_> {
    type Output = ();
    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.0.put_u8(b);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.put_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn put<T: Serialize + ?Sized>(b: &mut BytesMut, v: &T) {
    // Only sequences of unknown length fail to serialize; none is in a message.
    postcard::serialize_with_flavor(v, BufFlavor(b)).expect("postcard serializes a message");
}

/// A sequence of at most `MAX` items: the count is checked before anything is
/// sized by it, and the vector grows only with items actually decoded (its
/// first reservation is capped at 1 MiB).
pub(super) fn bounded<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(BoundedSeq::<T, MAX>(PhantomData))
}

struct BoundedSeq<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedSeq<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence of at most {MAX} items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let n = declared_len(&seq)?;
        if n > MAX {
            return Err(de::Error::invalid_length(n, &self));
        }
        let mut v = Vec::with_capacity(n.min(first_reservation::<T>()));
        while let Some(x) = seq.next_element()? {
            if v.len() == MAX {
                return Err(de::Error::invalid_length(MAX + 1, &self));
            }
            v.push(x);
        }
        Ok(v)
    }
}

/// The count a sequence declares. postcard gives none when the count exceeds
/// the bytes left (every item is at least a byte): refused at once.
fn declared_len<'de, A: SeqAccess<'de>>(seq: &A) -> Result<usize, A::Error> {
    seq.size_hint()
        .ok_or_else(|| de::Error::custom("count exceeds payload"))
}

/// Most items a vector of `T` reserves on a count read from the wire (1 MiB).
fn first_reservation<T>() -> usize {
    (1 << 20) / std::mem::size_of::<T>().max(1)
}

/// `HoldersReply`'s lists: at most [`MAX_HASHES`] lists and [`MAX_HOLDERS`]
/// holders in all (each count checked before it sizes anything).
fn holder_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<Holder>>, D::Error> {
    struct Lists;
    /// One list, drawing on what is left of the reply's holder budget.
    struct List<'b>(&'b mut usize);

    impl<'de> Visitor<'de> for Lists {
        type Value = Vec<Vec<Holder>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(
                f,
                "at most {MAX_HASHES} holder lists of {MAX_HOLDERS} holders in all"
            )
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let n = declared_len(&seq)?;
            if n > MAX_HASHES {
                return Err(de::Error::invalid_length(n, &self));
            }
            let mut budget = MAX_HOLDERS;
            let mut v = Vec::with_capacity(n.min(first_reservation::<Vec<Holder>>()));
            while let Some(list) = seq.next_element_seed(List(&mut budget))? {
                if v.len() == MAX_HASHES {
                    return Err(de::Error::invalid_length(MAX_HASHES + 1, &self));
                }
                v.push(list);
            }
            Ok(v)
        }
    }
    impl<'de> DeserializeSeed<'de> for List<'_> {
        type Value = Vec<Holder>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Holder>, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for List<'_> {
        type Value = Vec<Holder>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "at most {} more holders", self.0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Holder>, A::Error> {
            let n = declared_len(&seq)?;
            if n > *self.0 {
                return Err(de::Error::invalid_length(n, &self));
            }
            *self.0 -= n;
            let mut v = Vec::with_capacity(n.min(first_reservation::<Holder>()));
            while let Some(h) = seq.next_element()? {
                if v.len() == n {
                    return Err(de::Error::invalid_length(n + 1, &self));
                }
                v.push(h);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Lists)
}

/// The postcard header of one item of a `Blocks` reply; a found block's bytes
/// follow all the headers, in order.
#[derive(Serialize, Deserialize)]
enum BlockHead {
    Found { len: u32 },
    NotFound,
    Skipped,
    Failed(String),
}

/// A `Blocks` reply after its kind byte: the item count, a [`BlockHead`] per
/// item, then the found blocks' bytes concatenated.
fn encode_blocks(items: &[BlockReply], b: &mut BytesMut) {
    put(b, &(items.len() as u32));
    for it in items {
        match it {
            BlockReply::Found(d) => put(
                b,
                &BlockHead::Found {
                    len: d.len() as u32,
                },
            ),
            BlockReply::NotFound => put(b, &BlockHead::NotFound),
            BlockReply::Skipped => put(b, &BlockHead::Skipped),
            BlockReply::Failed(m) => {
                put(b, &BlockHead::Failed(m.clone()));
            }
        }
    }
    for it in items {
        if let BlockReply::Found(d) = it {
            b.put_slice(d);
        }
    }
}

/// Decodes what [`encode_blocks`] wrote (`rest`: the body after the kind byte);
/// found blocks are slices of `rest`'s buffer. One item per hash of the request,
/// so at most [`MAX_HASHES`], and each header is at least a byte: what this
/// allocates is at most [`MAX_HASHES`] items (32 bytes each) plus the failure
/// messages' text, whatever the frame holds.
#[expect(
    clippy::needless_pass_by_value,
    reason = "the buffer is handed over as the codec split it off; what is kept of it are slices (no copy)"
)]
fn decode_blocks(rest: Bytes) -> Result<Vec<BlockReply>, ProtoError> {
    let (n, mut heads) = postcard::take_from_bytes::<u32>(&rest)?;
    let n = n as usize;
    if n > MAX_HASHES {
        return Err(ProtoError::Malformed("too many items in one Blocks reply"));
    }
    if n > heads.len() {
        return Err(ProtoError::Malformed("count exceeds payload"));
    }
    let mut items = Vec::with_capacity(n);
    // Found blocks' lengths, in order: they are sliced once the data's start is
    // known, after the last header.
    let mut lens = Vec::new();
    for _ in 0..n {
        let (head, more) = postcard::take_from_bytes::<BlockHead>(heads)?;
        heads = more;
        items.push(match head {
            BlockHead::Found { len } => {
                lens.push(len as usize);
                BlockReply::Found(Bytes::new())
            }
            BlockHead::NotFound => BlockReply::NotFound,
            BlockHead::Skipped => BlockReply::Skipped,
            BlockHead::Failed(m) => BlockReply::Failed(m),
        });
    }
    if lens.iter().map(|&l| l as u64).sum::<u64>() != heads.len() as u64 {
        return Err(ProtoError::Malformed(
            "block lengths do not add up to the data",
        ));
    }
    let mut at = rest.len() - heads.len();
    let found = items.iter_mut().filter_map(|it| match it {
        BlockReply::Found(d) => Some(d),
        _ => None,
    });
    for (d, len) in found.zip(lens) {
        *d = rest.slice(at..at + len);
        at += len;
    }
    Ok(items)
}

impl Msg {
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
            Msg::Build { .. } => "Build",
            Msg::BuildStatus { .. } => "BuildStatus",
            Msg::BuildCancel { .. } => "BuildCancel",
            Msg::BuildReply { .. } => "BuildReply",
            Msg::VmAction { .. } => "VmAction",
            Msg::BuildRates { .. } => "BuildRates",
            Msg::Import { .. } => "Import",
            Msg::PrefetchShare { .. } => "PrefetchShare",
            Msg::PrefetchState { .. } => "PrefetchState",
            Msg::Patch { .. } => "Patch",
            Msg::Track { .. } => "Track",
            Msg::Tracked { .. } => "Tracked",
            Msg::Untrack { .. } => "Untrack",
            Msg::Prestage { .. } => "Prestage",
            Msg::Unpin { .. } => "Unpin",
            Msg::HostMetrics { .. } => "HostMetrics",
            Msg::GetManifest { .. } => "GetManifest",
            Msg::ManifestReply { .. } => "ManifestReply",
        }
    }

    /// The whole frame (length prefix included) carrying this message as `id`.
    pub fn encode(&self, id: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        FrameCodec::new(u32::MAX)
            .encode((id, self), &mut b)
            .expect("encoding a frame cannot fail");
        b.freeze()
    }

    /// The body: postcard, then the raw tail of the two kinds that have one.
    fn encode_body(&self, b: &mut BytesMut) {
        put(b, self);
        match self {
            Msg::Blocks { items } => encode_blocks(items, b),
            Msg::Fragment { data, .. } => b.put_slice(data),
            _ => {}
        }
    }

    /// The frames carrying this message as `id`: one frame if it fits in
    /// `max_frame`, else [`Msg::Fragment`]s (for requests only; the receiver
    /// reassembles them up to its message limit).
    pub fn encode_frames(&self, id: u64, max_frame: u32) -> Vec<Bytes> {
        let whole = self.encode(id);
        if whole.len() - 4 <= max_frame as usize {
            return vec![whole];
        }
        // The body, cut into pieces that fit with their own header, the
        // fragment's kind byte and its `last` flag.
        let body = whole.slice(4 + HEADER_LEN..);
        let piece = (max_frame as usize).saturating_sub(HEADER_LEN + 2).max(1);
        let n = body.len().div_ceil(piece);
        (0..n)
            .map(|i| {
                Msg::Fragment {
                    last: i + 1 == n,
                    data: body.slice(i * piece..((i + 1) * piece).min(body.len())),
                }
                .encode(id)
            })
            .collect()
    }

    /// Decodes a frame's body. Found blocks share `body`'s buffer (no copy).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the buffer is handed over as the codec split it off; what is kept of it are slices (no copy)"
    )]
    pub fn decode(body: Bytes) -> Result<Msg, ProtoError> {
        let (msg, rest) = postcard::take_from_bytes::<Msg>(&body)?;
        let tail = body.slice(body.len() - rest.len()..);
        let msg = match msg {
            Msg::Blocks { .. } => Msg::Blocks {
                items: decode_blocks(tail)?,
            },
            Msg::Fragment { last, .. } => Msg::Fragment { last, data: tail },
            m if tail.is_empty() => m,
            _ => return Err(ProtoError::Malformed("trailing bytes")),
        };
        msg.check()?;
        Ok(msg)
    }

    /// What the types cannot say: the rules a decoded message must follow.
    fn check(&self) -> Result<(), ProtoError> {
        match self {
            Msg::GetManifest { host, .. } if host.is_empty() => {
                Err(ProtoError::Malformed("GetManifest names no host"))
            }
            Msg::ManifestReply {
                piece:
                    ManifestPiece::Part {
                        total,
                        offset,
                        data,
                        ..
                    },
            } if offset.saturating_add(data.len() as u64) > *total => {
                Err(ProtoError::Malformed("manifest piece past its total"))
            }
            Msg::HostMetrics { reports }
                if reports.iter().any(|r| {
                    let m = &r.metrics;
                    [m.cpu, m.mem, m.disk]
                        .into_iter()
                        .flatten()
                        .any(|x| !(0.0..=1.0).contains(&x))
                }) =>
            {
                Err(ProtoError::Malformed(
                    "host metric is not a fraction in [0, 1]",
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use proptest::prelude::*;
    use tokio_util::codec::FramedRead;

    /// A message's body, as a frame carries it.
    fn body_of(m: &Msg) -> Bytes {
        m.encode(1).slice(4 + HEADER_LEN..)
    }

    async fn round(m: &Msg, id: u64) -> Msg {
        let wire = m.encode(id);
        let mut r = &wire[..];
        let f = read_frame(&mut r, DEFAULT_MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.id, id);
        assert!(r.is_empty());
        Msg::decode(f.body).unwrap()
    }

    #[expect(clippy::too_many_lines, reason = "one sample of every message, listed")]
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
                        resources: HostResources {
                            cores: Some(8),
                            mem_bytes: Some(1 << 34),
                            mem_free_bytes: None,
                            disk_free_bytes: Some(1 << 40),
                        },
                        vms: vec![VmReport {
                            name: "web1".into(),
                            image: Some("iqn.2026-11.test:lib/1".into()),
                            size: 1 << 30,
                            state: crate::hypervisor::VmState::Running,
                        }],
                    },
                    HostReport {
                        host: "hv2".into(),
                        metrics: HostMetrics::default(),
                        age_ms: 0,
                        resources: HostResources::default(),
                        vms: Vec::new(),
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
            Msg::PrefetchShare {
                bytes_per_s: 12_500_000,
                counted: false,
            },
            Msg::PrefetchState { prefetching: true },
            Msg::Track {
                vm: "web1".into(),
                since: Some("bitmap:3".into()),
            },
            Msg::Tracked {
                report: Box::new(TrackReport {
                    vm: "web1".into(),
                    token: "bitmap:4".into(),
                    tracking: crate::hypervisor::Tracking::DirtyBitmap,
                    bytes_dirty: 8192,
                    bytes_hashed: 8192,
                    changed: 2,
                    seq: 17,
                    block_size: 4096,
                    digest: [5; 32],
                }),
            },
            Msg::Untrack { vm: "web1".into() },
            Msg::Unpin {
                owner: "hv1/web1".into(),
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

    fn framed<R: AsyncRead>(r: R) -> FramedRead<R, FrameCodec> {
        FramedRead::with_capacity(r, FrameCodec::new(DEFAULT_MAX_FRAME), 16)
    }

    #[tokio::test]
    async fn the_codec_splits_a_stream_into_frames() {
        let msgs = samples();
        let big = Msg::Blocks {
            items: vec![BlockReply::Found(Bytes::from(vec![7u8; 700_000]))],
        };
        let mut wire = Vec::new();
        for (i, m) in msgs.iter().chain([&big]).enumerate() {
            wire.extend_from_slice(&m.encode(i as u64));
        }
        for step in [1, 3, 4096, 1 << 20] {
            let mut r = framed(Trickle { data: &wire, step });
            for (i, m) in msgs.iter().chain([&big]).enumerate() {
                let f = r.next().await.unwrap().unwrap();
                assert_eq!(f.id, i as u64, "step {step}");
                assert_eq!(&Msg::decode(f.body).unwrap(), m);
            }
            assert!(r.next().await.is_none());
        }
        // Cut inside a frame: an error, not a clean close; limits still hold.
        let cut = &wire[..wire.len() - 1];
        let mut r = framed(Trickle {
            data: cut,
            step: 1 << 20,
        });
        for _ in 0..msgs.len() {
            r.next().await.unwrap().unwrap();
        }
        assert!(r.next().await.unwrap().is_err());
        let mut r = framed(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            r.next().await,
            Some(Err(ProtoError::TooLarge(..)))
        ));
    }

    #[test]
    fn the_codec_encodes_what_msg_encode_does() {
        let mut b = BytesMut::new();
        for (i, m) in samples().iter().enumerate() {
            FrameCodec::new(DEFAULT_MAX_FRAME)
                .encode((i as u64, m), &mut b)
                .unwrap();
            assert_eq!(b.split(), m.encode(i as u64));
        }
    }

    #[tokio::test]
    async fn a_verdict_read_leaves_the_next_frame_unread() {
        let mut wire = Msg::AuthOk.encode(0).to_vec();
        wire.extend_from_slice(&Msg::Pong.encode(3));
        let mut r = &wire[..];
        let f = read_frame(&mut r, DEFAULT_MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(Msg::decode(f.body).unwrap(), Msg::AuthOk);
        assert_eq!(r, &Msg::Pong.encode(3)[..]);
    }

    #[tokio::test]
    async fn wrong_version_short_frames_and_eof() {
        let mut wire = Msg::Ping.encode(1).to_vec();
        wire[4] = 9;
        assert!(matches!(
            read_frame(&mut &wire[..], DEFAULT_MAX_FRAME).await,
            Err(ProtoError::Version(9))
        ));
        let short = [0u8, 0, 0, 3, VERSION, 11, 0];
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
            assert!(fr.is_fragment());
            assert_eq!(fr.id, 7);
            match Msg::decode(fr.body).unwrap() {
                Msg::Fragment { last, data } => {
                    assert_eq!(last, k + 1 == frames.len());
                    inner.put_slice(&data);
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(Msg::decode(inner.freeze()).unwrap(), m);
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

    /// The kind byte of `m` (postcard's variant index).
    fn kind_of(m: &Msg) -> u8 {
        body_of(m)[0]
    }

    /// A body of `kind` with `fields` in postcard after it.
    fn body<T: Serialize>(kind: u8, fields: &T) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        put(&mut b, fields);
        b.freeze()
    }

    fn blocks_kind() -> u8 {
        kind_of(&Msg::Blocks { items: vec![] })
    }

    #[test]
    fn kinds_are_the_variant_order() {
        // K_FRAGMENT is what the server looks for before decoding; the others
        // pin the wire numbering (appending a variant must not move them).
        let fragment = Msg::Fragment {
            last: true,
            data: Bytes::new(),
        };
        assert_eq!(kind_of(&fragment), K_FRAGMENT);
        let kinds: Vec<u8> = samples().iter().map(kind_of).collect();
        assert_eq!(
            kinds,
            [0, 11, 12, 1, 1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 8, 9, 10, 10, 10, 23, 24, 26, 27, 28, 30]
        );
    }

    #[test]
    fn found_blocks_share_the_frame_buffer() {
        let wire = Msg::Blocks {
            items: vec![
                BlockReply::NotFound,
                BlockReply::Found(Bytes::from(vec![5u8; 4096])),
                BlockReply::Failed("eio".into()),
                BlockReply::Found(Bytes::from(vec![6u8; 100])),
            ],
        }
        .encode(1);
        let body = wire.slice(4 + HEADER_LEN..);
        let range = body.as_ptr_range();
        let Msg::Blocks { items } = Msg::decode(body.clone()).unwrap() else {
            panic!("not a Blocks reply");
        };
        let found: Vec<&Bytes> = items
            .iter()
            .filter_map(|it| match it {
                BlockReply::Found(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 2);
        for d in found {
            assert!(range.contains(&d.as_ptr()), "a decoded block was copied");
        }
        // The data is the body's tail: 4096 + 100 bytes after the headers.
        assert_eq!(&body[body.len() - 100..], &[6u8; 100][..]);
    }

    #[test]
    fn a_blocks_reply_of_tiny_items_is_bounded() {
        // Items are at least a byte each on the wire but 40 in memory: a frame
        // full of them is refused on its count, before any vector is sized.
        let tiny = 32 << 20;
        let mut b = BytesMut::new();
        b.put_u8(blocks_kind());
        put(&mut b, &(tiny as u32));
        b.put_bytes(put_head_not_found(), tiny);
        refused(Msg::decode(b.freeze()), "too many items");
        // A count the body cannot hold (a byte per header at least): refused too.
        let mut b = BytesMut::new();
        b.put_u8(blocks_kind());
        put(&mut b, &(MAX_HASHES as u32));
        b.put_bytes(put_head_not_found(), 10);
        refused(Msg::decode(b.freeze()), "count exceeds payload");
        // At the bound: what the decoded reply holds is one item (40 bytes) a byte
        // (the item count is at most the body's length) and MAX_HASHES items.
        // (Failure messages add their text, which the body holds too.)
        let m = Msg::Blocks {
            items: vec![BlockReply::NotFound; MAX_HASHES],
        };
        let body = body_of(&m);
        let Msg::Blocks { items } = Msg::decode(body.clone()).unwrap() else {
            panic!("not a Blocks reply");
        };
        assert_eq!(items.len(), MAX_HASHES);
        let decoded = items.capacity() * std::mem::size_of::<BlockReply>();
        let item = std::mem::size_of::<BlockReply>();
        assert!(decoded <= item * body.len(), "{decoded} for {}", body.len());
        assert!(decoded <= MAX_HASHES * item);
        // Lengths that do not add up to the data: refused.
        let mut b = BytesMut::new();
        b.put_u8(blocks_kind());
        put(&mut b, &1u32);
        put(&mut b, &BlockHead::Found { len: 5 });
        b.put_slice(b"abcd");
        refused(Msg::decode(b.freeze()), "do not add up");
    }

    /// The encoding of [`BlockHead::NotFound`] (one byte).
    fn put_head_not_found() -> u8 {
        let mut b = BytesMut::new();
        put(&mut b, &BlockHead::NotFound);
        assert_eq!(b.len(), 1);
        b[0]
    }

    fn refused(r: Result<Msg, ProtoError>, what: &str) {
        match r {
            Err(ProtoError::Malformed(m)) => assert!(m.contains(what), "{m}"),
            r => panic!("{what}: expected a refusal, got {r:?}"),
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        // Unknown kind, and an empty body.
        assert!(matches!(
            Msg::decode(Bytes::from_static(&[200])),
            Err(ProtoError::Decode(_))
        ));
        assert!(Msg::decode(Bytes::new()).is_err());
        let get_blocks = kind_of(&Msg::GetBlocks { hashes: vec![] });
        // A forged count that the payload cannot hold.
        assert!(Msg::decode(body(get_blocks, &(MAX_HASHES as u32))).is_err());
        // Trailing bytes.
        let ack = kind_of(&Msg::Ack { seq: 0 });
        refused(Msg::decode(body(ack, &(1u64, 0u8))), "trailing bytes");
        // A flag that is neither 0 nor 1.
        let holders = kind_of(&Msg::Holders {
            local_only: false,
            hashes: vec![],
        });
        assert!(Msg::decode(body(holders, &(0u8, 0u32))).is_ok());
        assert!(Msg::decode(body(holders, &(2u8, 0u32))).is_err());
        // Bad block status.
        let mut b = BytesMut::new();
        b.put_u8(blocks_kind());
        put(&mut b, &1u32);
        b.put_u8(9);
        assert!(Msg::decode(b.freeze()).is_err());
        // A metric outside [0, 1], NaN, and a bad option tag.
        let host_metrics = kind_of(&Msg::HostMetrics { reports: vec![] });
        let report = |tag: u8, v: f64| {
            let mut b = BytesMut::new();
            b.put_u8(host_metrics);
            put(&mut b, &(1u32, "hv1"));
            b.put_u8(tag);
            b.put_f64_le(v);
            // mem, disk, age; resources (four absent); no VMs.
            put(&mut b, &(None::<f64>, None::<f64>, 0u64));
            put(&mut b, &(None::<u32>, None::<u64>, None::<u64>, None::<u64>, 0u32));
            Msg::decode(b.freeze())
        };
        assert!(report(1, 0.5).is_ok());
        refused(report(1, 1.5), "fraction");
        refused(report(1, f64::NAN), "fraction");
        assert!(report(2, 0.5).is_err());
        // A manifest piece reaching past its total, and an unknown piece state.
        let manifest_reply = kind_of(&Msg::ManifestReply {
            piece: ManifestPiece::Absent,
        });
        let piece = |state: u8, total: u64| {
            let mut b = BytesMut::new();
            b.put_u8(manifest_reply);
            b.put_u8(state);
            put(
                &mut b,
                &([0u8; 32], total, 8u64, Bytes::from_static(b"abc")),
            );
            Msg::decode(b.freeze())
        };
        assert!(piece(2, 11).is_ok());
        refused(piece(2, 10), "past its total");
        assert!(piece(3, 11).is_err());
        // A manifest asked for without naming whose holding: refused, never
        // answered from any host's.
        let get_manifest = |host: &str| {
            let m = Msg::GetManifest {
                host: host.into(),
                image: "iqn.t:lib/1".into(),
                block_size: 0,
                known: [0; 32],
                offset: 0,
                max_len: MAX_MANIFEST_PIECE,
            };
            Msg::decode(body_of(&m))
        };
        assert!(get_manifest("library").is_ok());
        refused(get_manifest(""), "no host");
        // Invalid UTF-8 in a string.
        let status_reply = kind_of(&Msg::StatusReply {
            json: String::new(),
        });
        assert!(Msg::decode(body(status_reply, &Bytes::from_static(b"\xff\xfe"))).is_err());
    }

    /// Refused by a bound on a count (the only custom error the decoder raises
    /// inside postcard), not by running out of bytes.
    fn refused_count(body: Bytes, what: &str) {
        match Msg::decode(body) {
            Err(ProtoError::Decode(postcard::Error::SerdeDeCustom)) => {}
            r => panic!("{what}: expected a refusal on the count, got {r:?}"),
        }
    }

    /// `fields` then `zeros` zero bytes: enough for that many minimal items
    /// (an empty string, a zero, `None`: each one zero byte in postcard).
    fn padded<T: Serialize>(kind: u8, fields: &T, zeros: usize) -> Bytes {
        let mut b = BytesMut::from(&body(kind, fields)[..]);
        b.put_bytes(0, zeros);
        b.freeze()
    }

    #[test]
    fn huge_counts_are_refused_before_allocation() {
        // Over each bound, with every item's bytes present, so only the bound
        // refuses them (without it they would decode).
        let get_blocks = kind_of(&Msg::GetBlocks { hashes: vec![] });
        let n = MAX_HASHES + 1;
        refused_count(padded(get_blocks, &(n as u32), 32 * n), "hashes");
        let holders_reply = kind_of(&Msg::HoldersReply { items: vec![] });
        refused_count(padded(holders_reply, &(n as u32), n), "holder lists");
        // A holder is 6 bytes at least; the budget is over the whole reply.
        let n = MAX_HOLDERS + 1;
        refused_count(padded(holders_reply, &(1u32, n as u32), 6 * n), "holders");
        let mut b = BytesMut::from(
            &padded(holders_reply, &(2u32, MAX_HOLDERS as u32), 6 * MAX_HOLDERS)[..],
        );
        put(&mut b, &(1u32, [0u8; 6]));
        refused_count(b.freeze(), "holders in all");
        let push = kind_of(&Msg::Push {
            node: String::new(),
            resync: false,
            upto: 0,
            addrs: vec![],
            changes: vec![],
        });
        let n = MAX_PUSH_ADDRS + 1;
        refused_count(
            padded(push, &("child", false, 0u64, n as u32), 2 * n + 1),
            "addresses",
        );
        let n = MAX_PUSH_CHANGES + 1;
        refused_count(
            padded(push, &("child", false, 0u64, 0u32, n as u32), 2 * n),
            "changes",
        );
        let host_metrics = kind_of(&Msg::HostMetrics { reports: vec![] });
        let n = MAX_REPORTS + 1;
        refused_count(padded(host_metrics, &(n as u32), 5 * n), "reports");
        // A count with nothing behind it: refused on the count too.
        refused_count(body(get_blocks, &u32::MAX), "forged count");
        refused_count(
            body(push, &("child", false, 0u64, 0u32, u32::MAX)),
            "forged count",
        );
        // At the bounds, accepted.
        let m = Msg::GetBlocks {
            hashes: vec![BlockHash([1; 32]); MAX_HASHES],
        };
        assert_eq!(Msg::decode(body_of(&m)).unwrap(), m);
        let m = Msg::HostMetrics {
            reports: vec![
                HostReport {
                    host: "h".into(),
                    metrics: HostMetrics::default(),
                    age_ms: 0,
                    resources: HostResources::default(),
                    vms: Vec::new(),
                };
                MAX_REPORTS
            ],
        };
        assert_eq!(Msg::decode(body_of(&m)).unwrap(), m);
    }

    /// The size of a typical `Push` (256 changes of an agent's re-index) and
    /// `HoldersReply` (64 hashes, 2 holders each) against the fixed-width
    /// encoding postcard replaced (its size computed by that encoder's layout:
    /// `u32` counts and lengths, fixed-width integers, a 14-byte frame head).
    #[test]
    fn postcard_is_smaller_than_the_fixed_width_encoding() {
        use crate::index::Change;
        let change = |i: u32| Change::PatchImage {
            host: "hv12".into(),
            image: "iqn.2026-11.lab:vm/disk0".into(),
            block_size: 4096,
            size: 10 << 30,
            blocks: (0..4)
                .map(|k| (i * 97 + k, Some(BlockHash::of(&(i + k).to_le_bytes()))))
                .collect(),
        };
        let push = Msg::Push {
            node: "hv12".into(),
            resync: false,
            upto: 0,
            addrs: vec![("hv12".into(), "198.18.3.12:7900".into())],
            changes: (0..256)
                .map(|i| (1_000_000 + u64::from(i), Bytes::from(change(i).encode())))
                .collect(),
        };
        let Msg::Push {
            node,
            addrs,
            changes,
            ..
        } = &push
        else {
            unreachable!()
        };
        let fixed_push = 14
            + (4 + node.len())
            + 1
            + 8
            + 4
            + addrs
                .iter()
                .map(|(h, a)| 8 + h.len() + a.len())
                .sum::<usize>()
            + 4
            + changes.iter().map(|(_, c)| 12 + c.len()).sum::<usize>();
        let holder = |i: u64| Holder {
            location: Location {
                host: "hv12".into(),
                image: "iqn.2026-11.lab:vm/disk0".into(),
                block_size: 4096,
                offset: i * 4096 * 997,
                len: 4096,
            },
            addr: Some("198.18.3.12:7900".into()),
        };
        let items: Vec<Vec<Holder>> = (0..64).map(|i| vec![holder(i), holder(i + 64)]).collect();
        let fixed_holders = 14
            + 4
            + items
                .iter()
                .map(|hs| {
                    4 + hs
                        .iter()
                        .map(|h| {
                            let l = &h.location;
                            4 + l.host.len()
                                + 4
                                + l.image.len()
                                + 4
                                + 8
                                + 4
                                + 4
                                + h.addr.as_deref().map_or(0, str::len)
                        })
                        .sum::<usize>()
                })
                .sum::<usize>();
        let holders = Msg::HoldersReply { items };
        let (push_len, holders_len) = (push.encode(1).len(), holders.encode(1).len());
        println!("Push: {fixed_push} -> {push_len} bytes; HoldersReply: {fixed_holders} -> {holders_len} bytes");
        assert!(push_len < fixed_push);
        assert!(holders_len < fixed_holders);
    }

    proptest! {
        /// Every truncation or corruption of a valid payload decodes to an error or
        /// to some message — never a panic.
        #[test]
        fn decode_never_panics(i in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>(), flip in any::<(usize, u8)>()) {
            let all = samples();
            let m = &all[i.index(all.len())];
            let body = body_of(m);
            let n = cut.index(body.len() + 1);
            let _ = Msg::decode(body.slice(..n));
            let mut v = body.to_vec();
            let k = flip.0 % v.len();
            v[k] ^= flip.1;
            let _ = Msg::decode(Bytes::from(v));
        }

        #[test]
        fn get_blocks_round_trip(hs in prop::collection::vec(any::<[u8; 32]>(), 0..50), id in any::<u64>()) {
            let m = Msg::GetBlocks { hashes: hs.into_iter().map(BlockHash).collect() };
            let wire = m.encode(id);
            prop_assert_eq!(Msg::decode(wire.slice(4 + HEADER_LEN..)).unwrap(), m);
        }
    }
}
