//! The splicer: accepts the connections the steering program hands it, opens the
//! transparent upstream connection, and relays; iSCSI-aware, it answers READs of
//! immutable LUNs from nearer copies.
//!
//! The files are listed below in the order one READ meets them, from the
//! accepted socket to the reply: read them in that order to follow it. The
//! three after the READ path work beside it.

/// 1. Accept what steering (`crate::steer`) handed over, admit, connect upstream
///    transparently, hand the pair to [`connection`] (iSCSI) or [`bytes`].
pub mod relay;

/// 2. The plain byte relay: non-iSCSI ports, over-cap connections, sessions with
///    nothing to serve once logged in.
pub mod bytes;

/// 2b. Sessions with nothing to serve handed to the kernel after login: the
///     steering program forwards their packets, rewritten (no relay at all).
pub mod handoff;

/// 2c. The HTTP front end: image transfers over HTTP answered from the block
///     core, the origin validating every response.
pub mod http;

/// 3. One task per iSCSI connection, PDUs both ways; `Conn::on_initiator` names a
///    READ's phases in the order they run.
pub mod connection;

/// 4. The iSCSI PDU codec: BHS, AHS, digests; streaming, zero-copy.
pub mod pdu;

/// 5. The login observed, and the initiator's offer edited.
pub mod login;

/// 6. iSCSI text parameters (the login's keys; passive discovery too).
pub mod text;

/// 7. The per-connection state machine: phases, tasks, sequence numbers; which
///    commands are READ candidates and how each is answered.
pub mod session;

/// 8. SCSI: READ CDBs, the shadow rewrite, sense data.
pub mod scsi;

/// 9. Which LUNs are served and with what: the LUN a command addresses, its
///    current manifest and access history. A READ's blocks are then the block
///    core's ([`crate::block_core`]): a byte range of the LUN's image.
pub mod catalog;

/// 10. The reply: the Data-In sequence and status carrying a served READ's data.
pub mod datain;

/// Beside the READ path: what the target reports about a served LUN (block
/// length, capacity, write protection), learned from its answers.
pub mod facts;

/// Beside the READ path: where each served LUN's manifest comes from, kept
/// current.
pub mod manifests;

/// Beside the READ path: the splicer's counters, as status and metrics report them.
pub mod stats;
