//! The splicer: accepts the connections the steering program hands it, opens the
//! transparent upstream connection, and relays.
//!
//! - [`text`]: iSCSI text parameters (used by passive discovery too).

pub mod datain;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod text;
