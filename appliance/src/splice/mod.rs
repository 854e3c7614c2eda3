//! The splicer: accepts the connections the steering program hands it, opens the
//! transparent upstream connection, and relays; iSCSI-aware, it answers READs of
//! immutable LUNs from nearer copies.
//!
//! - [`relay`]: accept loop, admission and caps, upstream connect.
//! - [`bytes`]: the plain byte relay (non-iSCSI ports, over-cap connections).
//! - [`stats`]: the splicer's counters, as status and metrics report them.
//! - [`connection`]: the iSCSI-aware inside: PDUs both ways through a [`session::Session`].
//! - [`catalog`]: which LUNs are served, their manifests, assembling and learning blocks.
//! - [`facts`]: what the target reports about a served LUN (block length, capacity, WP).
//! - [`manifests`]: where each served LUN's manifest comes from, kept current.
//! - [`pdu`]: the iSCSI PDU codec (BHS, AHS, digests), streaming and zero-copy.
//! - [`text`]: iSCSI text parameters (used by passive discovery too).
//! - [`login`]: login negotiation observed and the initiator's offer edited.
//! - [`scsi`]: READ CDBs, the shadow rewrite, sense data.
//! - [`datain`]: locally sourced Data-In sequences.
//! - [`session`]: the per-connection state machine (phases, tasks, sequence numbers).

pub mod bytes;
pub mod catalog;
pub mod connection;
pub mod datain;
pub mod facts;
pub mod login;
pub mod manifests;
pub mod pdu;
pub mod relay;
pub mod scsi;
pub mod session;
pub mod stats;
pub mod text;
