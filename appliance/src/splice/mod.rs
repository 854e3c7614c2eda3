//! The splicer: accepts the connections the steering program hands it, opens the
//! transparent upstream connection, and relays.
//!
//! - [`relay`]: accept loop, upstream connect, byte relay (the transparent form).
//! - [`text`]: iSCSI text parameters (used by passive discovery too).

pub mod relay;
pub mod text;
