//! Kernel handoff: an iSCSI connection with nothing to serve behind its target
//! leaves user space after login. The splicer reads where each of its two TCP
//! connections stands (`TCP_REPAIR` gives the exact next sequence numbers),
//! installs the rewrite of each direction in the steering program's `HANDOFFS`
//! map, delivers the login response it held, and closes its sockets silently
//! (in repair mode: no FIN, no RST). From then on the steering program rewrites
//! each packet into the other connection's numbering and the kernel forwards
//! it; no socket and no task of the splicer's is in the path
//! (docs/decisions.md, "Kernel handoff").
//!
//! The handoff happens at the one moment both connections are quiet: the
//! target has sent its final Login Response and waits for commands, and the
//! initiator waits for that response, which the splicer holds. Anything that
//! breaks that (unacknowledged or unread bytes, differing TCP options, a full
//! map) declines the handoff and the connection stays in the user-space relay;
//! bytes arriving at a socket in the instant of the switch reset both
//! connections (the initiator logs in again) rather than lose them.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use nearblock_common::{HandoffKey, HandoffRewrite};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tracing::{debug, warn};

use crate::datapath::{monotonic_ns, HandoffMap};

/// How long the connections may take to have everything sent acknowledged.
const QUIET_WITHIN: Duration = Duration::from_millis(200);
/// How long the initiator may take to acknowledge the held login response
/// before the socket that sent it is closed anyway.
const DELIVERED_WITHIN: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(1);
/// A handed-off connection that has sent a FIN or RST is forgotten this long
/// after its last packet (its retransmissions still need rewriting meanwhile).
pub const CLOSED_GRACE: Duration = Duration::from_mins(1);
/// A handed-off connection silent this long is forgotten (iSCSI initiators
/// send NOP-Outs every few seconds; a session silent for an hour is gone).
pub const IDLE_LIMIT: Duration = Duration::from_hours(1);
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// `tcp_info` options bits (linux/tcp.h).
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const TCPI_OPT_ECN: u8 = 8;
const TCPI_OPT_USEC_TS: u8 = 64;
/// Options that must be the same on both connections.
const NEGOTIATED: u8 = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE | TCPI_OPT_ECN;
const TCP_ESTABLISHED: u8 = 1;
/// `TCP_REPAIR_QUEUE` values and `TCP_REPAIR` off without a window probe.
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// Where one of the splicer's TCP connections stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketState {
    /// Next sequence number this socket sends.
    pub snd_nxt: u32,
    /// Next sequence number it expects from its peer.
    pub rcv_nxt: u32,
    /// Its timestamp clock minus `CLOCK_MONOTONIC`, milliseconds.
    pub ts_offset_ms: u32,
    /// `tcpi_options`.
    pub options: u8,
    /// The scale its peer applies to the windows it sends (`tcpi_snd_wscale`).
    pub peer_wscale: u8,
    /// The scale it applies to its own windows (`tcpi_rcv_wscale`).
    pub own_wscale: u8,
}

/// Why the connections can or cannot be joined in the kernel.
pub fn joinable(initiator_side: &SocketState, target_side: &SocketState) -> Result<(), &'static str> {
    if (initiator_side.options | target_side.options) & TCPI_OPT_USEC_TS != 0 {
        return Err("microsecond timestamps");
    }
    if initiator_side.options & NEGOTIATED != target_side.options & NEGOTIATED {
        return Err("the two connections negotiated different TCP options");
    }
    Ok(())
}

/// Whether the two connections join the same two ends: the rewrite changes
/// numbers, not addresses or ports, so the upstream connection must come from
/// the initiator's own address and port (it does unless that port was taken)
/// and go to the portal the initiator dialled.
pub fn same_ends(
    initiator: std::net::SocketAddr,
    portal: std::net::SocketAddr,
    upstream_source: std::net::SocketAddr,
    target: std::net::SocketAddr,
) -> Result<(), &'static str> {
    if upstream_source != initiator {
        return Err("the upstream connection has another source address or port");
    }
    if portal != target {
        return Err("the upstream connection goes elsewhere than the portal dialled");
    }
    Ok(())
}

/// The rewrites of both directions: (initiator → target, target → initiator).
/// `held` bytes (the login response) are still to be sent by the initiator
/// side's socket: the target's next byte comes after them. Both are stamped
/// as last seen at `now_ns` (the handoff): a direction that has carried no
/// packet yet (the target's, until it answers the first command) is as fresh
/// as the handoff, not silent since boot, for the sweeper.
pub fn rewrites(
    initiator_side: &SocketState,
    target_side: &SocketState,
    held: u32,
    now_ns: u64,
) -> (HandoffRewrite, HandoffRewrite) {
    let to_initiator_next = initiator_side.snd_nxt.wrapping_add(held);
    let to_target_seq = target_side.snd_nxt.wrapping_sub(initiator_side.rcv_nxt);
    let to_initiator_seq = to_initiator_next.wrapping_sub(target_side.rcv_nxt);
    let timestamps = u8::from(initiator_side.options & TCPI_OPT_TIMESTAMPS != 0);
    let scaled = initiator_side.options & TCPI_OPT_WSCALE != 0;
    let shift = |sender: u8, receiver: u8| {
        if scaled {
            i8::try_from(sender).unwrap_or(0) - i8::try_from(receiver).unwrap_or(0)
        } else {
            0
        }
    };
    let to_target = HandoffRewrite {
        seq_delta: to_target_seq,
        ack_delta: 0u32.wrapping_sub(to_initiator_seq),
        receiver_ts_offset_ms: target_side.ts_offset_ms,
        watch_ack: to_initiator_next,
        window_shift: shift(initiator_side.peer_wscale, target_side.own_wscale),
        timestamps,
        last_seen_ns: now_ns,
        ..HandoffRewrite::default()
    };
    let to_initiator = HandoffRewrite {
        seq_delta: to_initiator_seq,
        ack_delta: 0u32.wrapping_sub(to_target_seq),
        receiver_ts_offset_ms: initiator_side.ts_offset_ms,
        watch_ack: target_side.snd_nxt,
        window_shift: shift(target_side.peer_wscale, initiator_side.own_wscale),
        timestamps,
        last_seen_ns: now_ns,
        ..HandoffRewrite::default()
    };
    (to_target, to_initiator)
}

/// Whether a handed-off direction's entry may go: closed and quiet for
/// [`CLOSED_GRACE`], or silent for [`IDLE_LIMIT`].
pub fn expired(entry: &HandoffRewrite, now_ns: u64) -> bool {
    let quiet = Duration::from_nanos(now_ns.saturating_sub(entry.last_seen_ns));
    (entry.closing != 0 && quiet >= CLOSED_GRACE) || quiet >= IDLE_LIMIT
}

/// What became of a handoff.
pub enum Handoff {
    /// The kernel forwards the connection; the splicer's sockets are closed.
    Done,
    /// Not handed off: the caller still owns both sockets and the held bytes
    /// are unsent.
    Declined {
        why: &'static str,
        client: TcpStream,
        upstream: TcpStream,
    },
    /// Bytes reached a socket at the switch: both connections were reset.
    Broken(&'static str),
}

/// Hand the connection to the kernel, sending `held` (the final Login
/// Response) to the initiator as the last thing the splicer does.
pub async fn hand_over(
    mut client: TcpStream,
    upstream: TcpStream,
    held: &[u8],
    map: &HandoffMap,
) -> Handoff {
    let declined = |why, client, upstream| Handoff::Declined {
        why,
        client,
        upstream,
    };
    let (Ok(initiator), Ok(target), Ok(portal), Ok(upstream_source)) = (
        client.peer_addr(),
        upstream.peer_addr(),
        client.local_addr(),
        upstream.local_addr(),
    ) else {
        return declined("no peer address", client, upstream);
    };
    if let Err(why) = same_ends(initiator, portal, upstream_source, target) {
        return declined(why, client, upstream);
    }
    let Ok(held_len) = u32::try_from(held.len()) else {
        return declined("held bytes too long", client, upstream);
    };
    if !quiet(&client, &upstream).await {
        return declined("bytes unacknowledged", client, upstream);
    }
    if unread(client.as_raw_fd()) != Some(0) || unread(upstream.as_raw_fd()) != Some(0) {
        return declined("bytes unread", client, upstream);
    }
    let (down, up) = match (state(client.as_raw_fd()), state(upstream.as_raw_fd())) {
        (Ok(d), Ok(u)) => (d, u),
        (Err(e), _) | (_, Err(e)) => {
            debug!(cause = %e, "reading the connections' TCP state");
            return declined("TCP state unreadable", client, upstream);
        }
    };
    if let Err(why) = joinable(&down, &up) {
        return declined(why, client, upstream);
    }
    let to_target_key = HandoffKey::new(initiator, target);
    let (to_target, to_initiator) = rewrites(&down, &up, held_len, monotonic_ns());
    if let Err(e) = map.install(
        (to_target_key, to_target),
        (to_target_key.reversed(), to_initiator),
    ) {
        debug!(cause = %e, "installing the handoff");
        return declined("handoff map full", client, upstream);
    }
    // A packet the steering program assigned to a socket just before the
    // install may still be on its way up the stack: let it land, then check
    // that neither socket took anything (it would have acknowledged bytes
    // nobody forwards).
    tokio::time::sleep(POLL).await;
    let moved = match (queue_seqs(client.as_raw_fd()), queue_seqs(upstream.as_raw_fd())) {
        (Ok((_, d)), Ok((_, u))) => d != down.rcv_nxt || u != up.rcv_nxt,
        _ => true,
    };
    if moved {
        map.remove(&to_target_key);
        reset(&client);
        reset(&upstream);
        return Handoff::Broken("bytes arrived during the handoff");
    }
    if let Err(e) = client.write_all(held).await {
        // The initiator is gone; its connection's packets, if any, are
        // forwarded to the target, which resets them.
        debug!(cause = %e, "sending the held login response");
    }
    close_silently(&upstream);
    drop(upstream);
    let deadline = tokio::time::Instant::now() + DELIVERED_WITHIN;
    while map.get(&to_target_key).is_some_and(|e| e.acked == 0) {
        if tokio::time::Instant::now() >= deadline {
            warn!(%initiator, "the initiator did not acknowledge the login response in time; handed off anyway");
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    close_silently(&client);
    Handoff::Done
}

/// Wait until neither socket has bytes in flight.
async fn quiet(client: &TcpStream, upstream: &TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + QUIET_WITHIN;
    loop {
        if unsent(client.as_raw_fd()) == Some(0) && unsent(upstream.as_raw_fd()) == Some(0) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Bytes written but not yet acknowledged (`SIOCOUTQ`).
fn unsent(fd: RawFd) -> Option<i32> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes received but not yet read (`SIOCINQ`).
fn unread(fd: RawFd) -> Option<i32> {
    ioctl_int(fd, libc::FIONREAD)
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is an open socket; the request writes one int.
    let rc = unsafe { libc::ioctl(fd, request, &raw mut n) };
    (rc == 0).then_some(n)
}

/// The prefix of `struct tcp_info` (linux/tcp.h) the handoff reads.
#[repr(C)]
#[derive(Default)]
struct TcpInfoPrefix {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4`.
    wscales: u8,
    flags: u8,
}

fn state(fd: RawFd) -> io::Result<SocketState> {
    let mut info = TcpInfoPrefix::default();
    getsockopt(fd, libc::TCP_INFO, &mut info)?;
    if info.state != TCP_ESTABLISHED {
        return Err(io::Error::other("not established"));
    }
    let (snd_nxt, rcv_nxt) = queue_seqs(fd)?;
    let mut ts: u32 = 0;
    getsockopt(fd, libc::TCP_TIMESTAMP, &mut ts)?;
    // TCP's millisecond clock is CLOCK_MONOTONIC (ktime_get_ns) / 10^6.
    let now_ms = (monotonic_ns() / 1_000_000) as u32;
    Ok(SocketState {
        snd_nxt,
        rcv_nxt,
        ts_offset_ms: ts.wrapping_sub(now_ms),
        options: info.options,
        peer_wscale: info.wscales & 0x0f,
        own_wscale: info.wscales >> 4,
    })
}

/// (next sequence number to send, next expected) read in repair mode, which
/// is left without a window probe.
fn queue_seqs(fd: RawFd) -> io::Result<(u32, u32)> {
    setsockopt(fd, libc::TCP_REPAIR, 1)?;
    let read = || -> io::Result<(u32, u32)> {
        let mut snd: u32 = 0;
        let mut rcv: u32 = 0;
        setsockopt(fd, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        getsockopt(fd, libc::TCP_QUEUE_SEQ, &mut snd)?;
        setsockopt(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        getsockopt(fd, libc::TCP_QUEUE_SEQ, &mut rcv)?;
        Ok((snd, rcv))
    };
    let seqs = read();
    setsockopt(fd, libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    seqs
}

/// Close without a FIN or RST: a socket in repair mode is closed silently.
fn close_silently(stream: &TcpStream) {
    if let Err(e) = setsockopt(stream.as_raw_fd(), libc::TCP_REPAIR, 1) {
        warn!(cause = %e, "repair mode for a silent close");
    }
}

/// Close with a reset when dropped.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn setsockopt(fd: RawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; the option takes one int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt<T>(fd: RawFd, name: libc::c_int, out: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a plain-data value of `len` bytes; the kernel writes at
    // most that many.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            std::ptr::from_mut(out).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Forget handed-off connections that ended or went silent, every few
/// seconds, until `stop`.
pub async fn sweep(map: Arc<HandoffMap>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { return },
            _ = every.tick() => {
                let now = monotonic_ns();
                for (key, entry) in map.entries() {
                    if expired(&entry, now) {
                        debug!(?key, "forgetting a handed-off connection");
                        map.remove(&key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(snd_nxt: u32, rcv_nxt: u32) -> SocketState {
        SocketState {
            snd_nxt,
            rcv_nxt,
            ts_offset_ms: 0,
            options: TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE,
            peer_wscale: 7,
            own_wscale: 7,
        }
    }

    #[test]
    fn each_byte_keeps_its_place_in_the_other_numbering() {
        // The initiator's next byte is 1000 at the splicer's accepted socket
        // and 5_000_000 at its upstream socket; the splicer's next byte to the
        // initiator is 70, the target's next byte to the splicer 4_294_967_000
        // (wrapping).
        let down = side(70, 1000);
        let up = side(5_000_000, 4_294_967_000);
        let held = 48;
        let (to_target, to_initiator) = rewrites(&down, &up, held, 0);
        // The initiator's next byte lands where the target expects it.
        assert_eq!(1000u32.wrapping_add(to_target.seq_delta), 5_000_000);
        // The target's next byte comes after the held login response.
        assert_eq!(4_294_967_000u32.wrapping_add(to_initiator.seq_delta), 70 + held);
        // The initiator acknowledging the login response acknowledges
        // everything the target sent.
        assert_eq!((70 + held).wrapping_add(to_target.ack_delta), 4_294_967_000);
        // The target acknowledging k bytes of the initiator's is seen as such.
        assert_eq!(5_000_100u32.wrapping_add(to_initiator.ack_delta), 1100);
        assert_eq!(to_target.watch_ack, 70 + held);
        assert_eq!((to_target.window_shift, to_initiator.window_shift), (0, 0));
        assert_eq!(to_target.timestamps, 1);
    }

    #[test]
    fn windows_are_rescaled_between_the_connections_scales() {
        let mut down = side(0, 0);
        let mut up = side(0, 0);
        down.peer_wscale = 7; // the initiator's
        down.own_wscale = 9;
        up.peer_wscale = 10; // the target's
        up.own_wscale = 8;
        let (to_target, to_initiator) = rewrites(&down, &up, 0, 0);
        assert_eq!(to_target.window_shift, 7 - 8);
        assert_eq!(to_initiator.window_shift, 10 - 9);
        down.options &= !TCPI_OPT_WSCALE;
        let (to_target, _) = rewrites(&down, &up, 0, 0);
        assert_eq!(to_target.window_shift, 0);
    }

    #[test]
    fn connections_with_different_options_stay_in_user_space() {
        let down = side(0, 0);
        let mut up = side(0, 0);
        assert!(joinable(&down, &up).is_ok());
        up.options &= !TCPI_OPT_SACK;
        assert!(joinable(&down, &up).is_err());
        up.options = down.options | TCPI_OPT_USEC_TS;
        assert!(joinable(&down, &up).is_err());
    }

    #[test]
    fn only_connections_between_the_same_two_ends_are_joined() {
        let initiator: std::net::SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let portal: std::net::SocketAddr = "10.0.0.2:3260".parse().unwrap();
        assert!(same_ends(initiator, portal, initiator, portal).is_ok());
        // The initiator's port was taken: the upstream connection used another.
        let moved: std::net::SocketAddr = "10.0.0.1:40001".parse().unwrap();
        assert!(same_ends(initiator, portal, moved, portal).is_err());
        let elsewhere: std::net::SocketAddr = "10.0.0.3:3260".parse().unwrap();
        assert!(same_ends(initiator, portal, initiator, elsewhere).is_err());
    }

    #[test]
    fn entries_go_after_close_and_grace_or_a_long_silence() {
        let s = 1_000_000_000u64;
        let mut e = HandoffRewrite {
            last_seen_ns: 100 * s,
            ..HandoffRewrite::default()
        };
        assert!(!expired(&e, 150 * s));
        e.closing = 1;
        assert!(!expired(&e, 159 * s));
        assert!(expired(&e, 160 * s));
        e.closing = 0;
        assert!(expired(&e, 3700 * s));
    }

    #[test]
    fn a_fresh_handoff_is_not_swept_before_its_first_packet() {
        // Hours after boot, the target has not answered yet: its direction has
        // carried nothing, and neither direction may be forgotten (the sweep
        // used to see "quiet since boot" and delete a live connection's
        // entries: found under libiscsi's conformance suite).
        let s = 1_000_000_000u64;
        let handoff = 5 * 3600 * s;
        let (to_target, to_initiator) = rewrites(&side(0, 0), &side(0, 0), 48, handoff);
        for e in [to_target, to_initiator] {
            assert!(!expired(&e, handoff + 10 * s));
            assert!(expired(&e, handoff + 3601 * s));
        }
    }
}
