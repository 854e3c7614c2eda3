//! Steering: the user-space half of handing classified connections to the splicer.
//!
//! Owns the splicer's transparent listening sockets (registered in the kernel's
//! `LISTENERS` SockMap), the transparent upstream sockets (bound to the initiator's
//! own address, DSCP-marked so no nearblock appliance steers them again), and the
//! policy routing that delivers marked packets locally:
//!
//! ```text
//! ip rule add pref P fwmark M iif IFACE lookup T     # per steered interface, v4 and v6
//! ip route add local 0.0.0.0/0 dev lo table T        # and ::/0 for v6
//! ```
//!
//! Rules are scoped with `iif` so they never catch the splicer's own upstream
//! traffic (docs/decisions.md). They are installed at start (stale copies removed
//! first) and removed on exit; if the daemon is killed they stay but match nothing,
//! because nothing sets the mark once the TC links are gone.
//!
//! Also the user-space half of failing open on a *hung* daemon ([`FailOpen`]):
//! each accept loop writes its listener's heartbeat (the kernel stops steering new
//! SYNs to a listener whose heartbeat is older than 1 s, or that says it is not
//! accepting); connections are capped in total and per source ([`Admission`]), and
//! sources at their cap are marked so that their new SYNs are forwarded untouched.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, MutexGuard};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use tracing::{info, warn};

use crate::datapath::{monotonic_ns, FailOpenMaps};

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(io::Error),
    #[error("socket {what}: {source}")]
    Socket { what: String, source: io::Error },
}

impl SteerError {
    /// Whether this failed because the process (EMFILE) or the system (ENFILE) is
    /// out of file descriptors.
    pub fn is_fd_exhaustion(&self) -> bool {
        matches!(self, SteerError::Socket { source, .. } if is_fd_exhaustion(source))
    }
}

/// EMFILE / ENFILE: no descriptor for a new socket.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The policy routing for one daemon.
#[derive(Clone, Debug)]
pub struct PolicyRouting {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
    /// Interfaces whose marked ingress packets are delivered locally.
    pub interfaces: Vec<String>,
}

impl PolicyRouting {
    /// The `ip` invocations that install this routing (pure; tested).
    pub fn install_commands(&self) -> Vec<Vec<String>> {
        let mut cmds = Vec::new();
        for (fam, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            cmds.push(args(&[
                fam,
                "route",
                "replace",
                "local",
                default,
                "dev",
                "lo",
                "table",
                &self.table.to_string(),
            ]));
            for iface in &self.interfaces {
                cmds.push(self.rule(fam, "add", iface));
            }
        }
        cmds
    }

    /// The `ip` invocations that remove it.
    pub fn remove_commands(&self) -> Vec<Vec<String>> {
        let mut cmds = Vec::new();
        for (fam, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            for iface in &self.interfaces {
                cmds.push(self.rule(fam, "del", iface));
            }
            cmds.push(args(&[
                fam,
                "route",
                "del",
                "local",
                default,
                "dev",
                "lo",
                "table",
                &self.table.to_string(),
            ]));
        }
        cmds
    }

    fn rule(&self, fam: &str, op: &str, iface: &str) -> Vec<String> {
        args(&[
            fam,
            "rule",
            op,
            "pref",
            &self.priority.to_string(),
            "fwmark",
            &format!("{:#x}", self.mark),
            "iif",
            iface,
            "lookup",
            &self.table.to_string(),
        ])
    }

    /// Install, after removing what an earlier (killed) daemon may have left.
    pub fn install(&self) -> Result<(), SteerError> {
        self.remove_quietly();
        for cmd in self.install_commands() {
            run_ip(&cmd)?;
        }
        Ok(())
    }

    /// Remove; missing pieces are not an error.
    pub fn remove_quietly(&self) {
        for cmd in self.remove_commands() {
            // A rule may have been added more than once by hand: bounded retries.
            for _ in 0..8 {
                if run_ip(&cmd).is_err() {
                    break;
                }
                if !cmd.iter().any(|a| a == "rule") {
                    break;
                }
            }
        }
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

fn run_ip(args: &[String]) -> Result<(), SteerError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(SteerError::Spawn)?;
    if !out.status.success() {
        return Err(SteerError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A listening socket that accepts connections assigned to it by `bpf_sk_assign`
/// for any destination address (`IP_TRANSPARENT`; accepted sockets inherit it, so
/// their replies may carry the original destination as source).
pub fn transparent_listener(addr: SocketAddr) -> Result<std::net::TcpListener, SteerError> {
    let err = |what: &str| {
        let what = format!("{what} {addr}");
        move |source| SteerError::Socket { what, source }
    };
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(err("create"))?;
    sock.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err("IPV6_V6ONLY"))?;
        sock.set_ip_transparent_v6(true)
            .map_err(err("IPV6_TRANSPARENT"))?;
    } else {
        sock.set_ip_transparent_v4(true)
            .map_err(err("IP_TRANSPARENT"))?;
    }
    sock.bind(&addr.into()).map_err(err("bind"))?;
    sock.listen(1024).map_err(err("listen"))?;
    sock.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    Ok(sock.into())
}

/// Connect to `dst` from the initiator's own address `src` (`IP_TRANSPARENT`), with
/// the DSCP mark, so the library sees the real initiator and no appliance on the
/// way steers this connection again. Tries the initiator's own port first (the
/// library then sees the exact tuple), else an ephemeral one.
pub async fn transparent_connect(
    src: SocketAddr,
    dst: SocketAddr,
    dscp: u8,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, SteerError> {
    let mut last = None;
    for port in [src.port(), 0] {
        let sock = upstream_socket(SocketAddr::new(src.ip(), port), dscp)?;
        match sock.bind(&SockAddr::from(SocketAddr::new(src.ip(), port))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && port != 0 => {
                last = Some(e);
                continue;
            }
            Err(source) => {
                return Err(SteerError::Socket {
                    what: format!("bind {src} (transparent)"),
                    source,
                })
            }
        }
        let std: std::net::TcpStream = sock.into();
        let tsock = tokio::net::TcpSocket::from_std_stream(std);
        return match tokio::time::timeout(timeout, tsock.connect(dst)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(SteerError::Socket {
                what: format!("connect {dst} from {src}"),
                source,
            }),
            Err(_) => Err(SteerError::Socket {
                what: format!("connect {dst} from {src}"),
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            }),
        };
    }
    Err(SteerError::Socket {
        what: format!("bind {src}"),
        source: last.unwrap_or_else(|| io::Error::other("no port")),
    })
}

fn upstream_socket(src: SocketAddr, dscp: u8) -> Result<Socket, SteerError> {
    let err = |what: &'static str| {
        move |source| SteerError::Socket {
            what: format!("{what} (upstream from {src})"),
            source,
        }
    };
    let sock = Socket::new(Domain::for_address(src), Type::STREAM, Some(Protocol::TCP))
        .map_err(err("create"))?;
    let tos = u32::from(dscp) << 2;
    match src.ip() {
        IpAddr::V4(_) => {
            sock.set_ip_transparent_v4(true)
                .map_err(err("IP_TRANSPARENT"))?;
            sock.set_tos_v4(tos).map_err(err("IP_TOS"))?;
        }
        IpAddr::V6(_) => {
            sock.set_only_v6(true).map_err(err("IPV6_V6ONLY"))?;
            sock.set_ip_transparent_v6(true)
                .map_err(err("IPV6_TRANSPARENT"))?;
            set_tclass_v6(&sock, tos).map_err(err("IPV6_TCLASS"))?;
        }
    }
    sock.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    sock.set_tcp_nodelay(true).map_err(err("TCP_NODELAY"))?;
    sock.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    Ok(sock)
}

fn set_tclass_v6(sock: &Socket, tclass: u32) -> io::Result<()> {
    // A traffic class is one byte: the conversion is exact.
    let v = tclass.cast_signed();
    // SAFETY: valid fd, option value pointer and length for IPV6_TCLASS.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Each connection the splicer holds costs two descriptors (the initiator's side
/// and the upstream socket).
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors kept for everything else: maps, programs, links, the API, the
/// indexer and its peers, history files, the runtime.
pub const FD_RESERVE: u64 = 256;
/// Free descriptors that must be obtainable before an fd-starved daemon takes
/// new connections again (a connection needs two, plus room to breathe).
const FD_HEADROOM_PROBE: usize = 8;
/// How long a source stays marked over its cap if its unmark is lost; refreshed
/// every third of it while the source stays at its cap.
pub const OVER_CAP_HOLD: Duration = Duration::from_secs(30);

/// Raise `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the soft limit in
/// force afterwards (unchanged if raising failed).
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid pointer to an rlimit for setrlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// Connection caps of the splicer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub total: usize,
    pub per_source: usize,
}

impl ConnectionCaps {
    /// The configured caps, with the total lowered to what `nofile` descriptors
    /// can hold ([`FDS_PER_CONNECTION`] each, [`FD_RESERVE`] kept back), so the
    /// cap, not EMFILE, is what normally stops new connections.
    pub fn within_fd_limit(total: usize, per_source: usize, nofile: u64) -> Self {
        let fits = nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
        let total = total
            .min(usize::try_from(fits).unwrap_or(usize::MAX))
            .max(1);
        Self {
            total,
            per_source: per_source.clamp(1, total),
        }
    }
}

/// What to do with one accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Within the caps: splice it.
    Splice,
    /// Over a cap: it is already ours (steered before the cap showed in the
    /// kernel), so relay its bytes untouched rather than drop it.
    RelayOverCap,
}

/// A change to a source's over-cap mark in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceMark {
    /// The source reached its cap: forward its new connections untouched.
    Mark(IpAddr),
    /// It is below its cap again: steer them again.
    Unmark(IpAddr),
}

/// The splicer's connection accounting (pure: the kernel maps are written by
/// [`FailOpen`] from what it returns).
#[derive(Debug)]
pub struct Admission {
    caps: ConnectionCaps,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    fd_exhausted: bool,
}

impl Admission {
    pub fn new(caps: ConnectionCaps) -> Self {
        Self {
            caps,
            total: 0,
            per_source: HashMap::new(),
            fd_exhausted: false,
        }
    }

    /// Count a connection from `source` (relayed ones too: they hold descriptors).
    pub fn admit(&mut self, source: IpAddr) -> (Admit, Option<SourceMark>) {
        let n = self.per_source.entry(source).or_insert(0);
        let admit = if self.total >= self.caps.total || *n >= self.caps.per_source {
            Admit::RelayOverCap
        } else {
            Admit::Splice
        };
        *n += 1;
        self.total += 1;
        // Marked as soon as it reaches the cap, so its next SYN is not steered.
        let mark = (*n == self.caps.per_source).then_some(SourceMark::Mark(source));
        (admit, mark)
    }

    /// A connection from `source` ended.
    pub fn release(&mut self, source: IpAddr) -> Option<SourceMark> {
        // A release without its admit changes nothing.
        let n = self.per_source.get_mut(&source)?;
        self.total = self.total.saturating_sub(1);
        let was_at_cap = *n >= self.caps.per_source;
        *n = n.saturating_sub(1);
        let below = *n < self.caps.per_source;
        if *n == 0 {
            self.per_source.remove(&source);
        }
        (was_at_cap && below).then_some(SourceMark::Unmark(source))
    }

    /// Whether new connections may be steered here at all.
    pub fn accepting(&self) -> bool {
        !self.fd_exhausted && self.total < self.caps.total
    }

    pub fn set_fd_exhausted(&mut self, exhausted: bool) {
        self.fd_exhausted = exhausted;
    }

    pub fn fd_exhausted(&self) -> bool {
        self.fd_exhausted
    }

    /// Sources at (or over) their cap: the ones marked in the kernel.
    pub fn sources_at_cap(&self) -> Vec<IpAddr> {
        self.per_source
            .iter()
            .filter(|(_, n)| **n >= self.caps.per_source)
            .map(|(s, _)| *s)
            .collect()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn active(&self) -> usize {
        self.total
    }
}

/// Keepalive and user timeout of the splicer's sockets: a dead peer (host gone,
/// link cut) is found; a live idle one answers the probes and is never cut
/// (`TCP_USER_TIMEOUT` only counts while sent data goes unacknowledged or the
/// peer's receive window stays shut, never on an idle connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    /// `None`: the kernel's default (retransmission limits only).
    pub user_timeout: Option<Duration>,
}

impl From<&crate::config::SplicerConfig> for Keepalive {
    /// The `[splicer]` keepalive and user-timeout keys.
    fn from(c: &crate::config::SplicerConfig) -> Self {
        Keepalive {
            idle: Duration::from_secs(c.keepalive_idle_secs),
            interval: Duration::from_secs(c.keepalive_interval_secs),
            count: c.keepalive_count,
            user_timeout: (c.user_timeout_secs > 0)
                .then(|| Duration::from_secs(c.user_timeout_secs)),
        }
    }
}

/// Put `keepalive` on a connected TCP socket.
pub fn set_keepalive<S: AsFd>(sock: &S, keepalive: &Keepalive) -> io::Result<()> {
    let sock = SockRef::from(sock);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(keepalive.idle)
            .with_interval(keepalive.interval)
            .with_retries(keepalive.count),
    )?;
    sock.set_tcp_user_timeout(keepalive.user_timeout)
}

/// The fail-open state shared by the accept loops and the connections: the
/// kernel maps, the connection accounting, and one descriptor held in reserve.
pub struct FailOpen {
    maps: FailOpenMaps,
    admission: Mutex<Admission>,
    /// Held back so that, out of descriptors, a connection already steered into
    /// the backlog can still be accepted and reset (its initiator retries, and the
    /// retry is forwarded untouched) instead of waiting there unanswered.
    spare_fd: Mutex<Option<std::fs::File>>,
    /// When the over-cap marks were last written (they expire in the kernel).
    marks_written: Mutex<Instant>,
    /// systemd's watchdog period, pinged with the heartbeat.
    watchdog: Option<std::time::Duration>,
}

/// One counted connection; dropping it releases the count (and the source's
/// mark, when it falls below its cap).
pub struct Admitted {
    fail_open: Arc<FailOpen>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let change = self.fail_open.admission().release(self.source);
        self.fail_open.apply(change);
    }
}

impl FailOpen {
    pub fn new(maps: FailOpenMaps, caps: ConnectionCaps) -> Arc<Self> {
        Arc::new(Self {
            maps,
            admission: Mutex::new(Admission::new(caps)),
            spare_fd: Mutex::new(std::fs::File::open("/dev/null").ok()),
            marks_written: Mutex::new(Instant::now()),
            watchdog: crate::service::watchdog(),
        })
    }

    fn admission(&self) -> MutexGuard<'_, Admission> {
        self.admission.lock()
    }

    /// Write listener `slot`'s heartbeat (called by its accept loop every
    /// `HEARTBEAT_INTERVAL_NS`): alive, and accepting unless out of descriptors or
    /// at the total cap. Out of descriptors, first see whether they came back.
    pub fn beat(&self, slot: u32) {
        if self.admission().fd_exhausted() && fd_headroom() {
            self.admission().set_fd_exhausted(false);
            self.restore_spare();
            info!("file descriptors available again: new connections are steered");
        }
        self.refresh_marks();
        let accepting = self.admission().accepting();
        match self.maps.beat(slot, accepting) {
            Err(e) => warn!(cause = %e, "writing the heartbeat"),
            // Alive for the kernel, alive for systemd.
            Ok(()) => {
                if let Some(period) = self.watchdog {
                    crate::service::ping(period);
                }
            }
        }
    }

    /// The process ran out of descriptors (accept or an upstream socket): stop
    /// steering new connections until [`FailOpen::beat`] finds headroom again.
    pub fn note_fd_exhaustion(&self) {
        let mut a = self.admission();
        if !a.fd_exhausted() {
            a.set_fd_exhausted(true);
            warn!(
                "out of file descriptors: new connections bypass the splicer until some are free"
            );
        }
    }

    /// Whether new connections may be steered here now (not at the total cap,
    /// not out of descriptors).
    pub fn accepting(&self) -> bool {
        self.admission().accepting()
    }

    /// Count an accepted connection from `source`.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> (Admit, Admitted) {
        let (admit, change) = self.admission().admit(source);
        self.apply(change);
        let admitted = Admitted {
            fail_open: self.clone(),
            source,
        };
        (admit, admitted)
    }

    /// Give up the spare descriptor (to accept one connection and reset it).
    pub fn take_spare(&self) -> Option<std::fs::File> {
        self.spare_fd.lock().take()
    }

    /// Take a spare descriptor again, if there is none and one can be had.
    pub fn restore_spare(&self) {
        let mut spare = self.spare_fd.lock();
        if spare.is_none() {
            *spare = std::fs::File::open("/dev/null").ok();
        }
    }

    fn apply(&self, change: Option<SourceMark>) {
        match change {
            None => {}
            Some(SourceMark::Mark(source)) => {
                info!(%source, "source at its connection cap: its new connections bypass the splicer");
                self.mark(source);
            }
            Some(SourceMark::Unmark(source)) => {
                info!(%source, "source below its connection cap: its new connections are steered again");
                if let Err(e) = self.maps.unmark_over_cap(source) {
                    warn!(%source, cause = %e, "removing the over-cap mark");
                }
            }
        }
    }

    fn mark(&self, source: IpAddr) {
        let until = monotonic_ns() + OVER_CAP_HOLD.as_nanos() as u64;
        if let Err(e) = self.maps.mark_over_cap(source, until) {
            warn!(%source, cause = %e, "writing the over-cap mark");
        }
    }

    /// Re-write the marks of sources still at their cap before they expire.
    fn refresh_marks(&self) {
        {
            let mut written = self.marks_written.lock();
            if written.elapsed() < OVER_CAP_HOLD / 3 {
                return;
            }
            *written = Instant::now();
        }
        let sources = self.admission().sources_at_cap();
        for source in sources {
            self.mark(source);
        }
    }
}

/// Whether [`FD_HEADROOM_PROBE`] descriptors can be opened now (they are closed
/// again at once).
fn fd_headroom() -> bool {
    let mut held = Vec::with_capacity(FD_HEADROOM_PROBE);
    for _ in 0..FD_HEADROOM_PROBE {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 3, last])
    }

    #[test]
    fn caps_fit_the_fd_limit() {
        // Plenty of descriptors: the configured caps.
        assert_eq!(
            ConnectionCaps::within_fd_limit(4096, 256, 1 << 20),
            ConnectionCaps {
                total: 4096,
                per_source: 256
            }
        );
        // 1024 descriptors: (1024 - 256) / 2 connections; per-source never above.
        assert_eq!(
            ConnectionCaps::within_fd_limit(4096, 1000, 1024),
            ConnectionCaps {
                total: 384,
                per_source: 384
            }
        );
        // Too few for anything: still one (EMFILE handling covers the rest).
        assert_eq!(ConnectionCaps::within_fd_limit(4096, 8, 100).total, 1);
    }

    #[test]
    fn a_source_is_marked_at_its_cap_and_unmarked_below_it() {
        let mut a = Admission::new(ConnectionCaps {
            total: 10,
            per_source: 2,
        });
        assert_eq!(a.admit(ip(1)), (Admit::Splice, None));
        assert_eq!(
            a.admit(ip(1)),
            (Admit::Splice, Some(SourceMark::Mark(ip(1))))
        );
        // Steered before the mark took effect: relayed, not marked twice.
        assert_eq!(a.admit(ip(1)), (Admit::RelayOverCap, None));
        // Other sources are unaffected.
        assert_eq!(a.admit(ip(2)), (Admit::Splice, None));
        assert_eq!(a.sources_at_cap(), vec![ip(1)]);
        assert_eq!(a.release(ip(1)), None, "still at the cap");
        assert_eq!(a.release(ip(1)), Some(SourceMark::Unmark(ip(1))));
        assert_eq!(a.release(ip(1)), None);
        assert_eq!(a.release(ip(1)), None, "an extra release is harmless");
        assert!(a.sources_at_cap().is_empty());
        assert_eq!(a.active(), 1);
    }

    #[test]
    fn total_cap_and_fd_exhaustion_stop_accepting() {
        let mut a = Admission::new(ConnectionCaps {
            total: 2,
            per_source: 2,
        });
        assert!(a.accepting());
        assert_eq!(a.admit(ip(1)).0, Admit::Splice);
        assert_eq!(a.admit(ip(2)).0, Admit::Splice);
        assert!(!a.accepting(), "at the total cap");
        assert_eq!(a.admit(ip(3)).0, Admit::RelayOverCap);
        a.release(ip(3));
        a.release(ip(2));
        assert!(a.accepting());
        a.set_fd_exhausted(true);
        assert!(!a.accepting(), "out of descriptors");
        a.set_fd_exhausted(false);
        assert!(a.accepting());
    }

    #[test]
    fn keepalive_and_user_timeout_are_set_on_the_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let k = Keepalive {
            idle: Duration::from_secs(31),
            interval: Duration::from_secs(7),
            count: 4,
            user_timeout: Some(Duration::from_secs(59)),
        };
        set_keepalive(&sock, &k).unwrap();
        let r = SockRef::from(&sock);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), k.idle);
        assert_eq!(r.tcp_keepalive_interval().unwrap(), k.interval);
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(r.tcp_user_timeout().unwrap(), k.user_timeout);
    }

    #[test]
    fn fd_exhaustion_is_recognised() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        let e = SteerError::Socket {
            what: "create".into(),
            source: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(e.is_fd_exhaustion());
    }

    #[test]
    fn commands_scope_rules_by_interface_and_cover_both_families() {
        let pr = PolicyRouting {
            mark: 0x6e62,
            table: 2600,
            priority: 100,
            interfaces: vec!["hv1".into(), "up".into()],
        };
        let install: Vec<String> = pr.install_commands().iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            install,
            [
                "-4 route replace local 0.0.0.0/0 dev lo table 2600",
                "-4 rule add pref 100 fwmark 0x6e62 iif hv1 lookup 2600",
                "-4 rule add pref 100 fwmark 0x6e62 iif up lookup 2600",
                "-6 route replace local ::/0 dev lo table 2600",
                "-6 rule add pref 100 fwmark 0x6e62 iif hv1 lookup 2600",
                "-6 rule add pref 100 fwmark 0x6e62 iif up lookup 2600",
            ]
        );
        let remove: Vec<String> = pr.remove_commands().iter().map(|c| c.join(" ")).collect();
        assert!(remove.iter().all(|c| c.contains(" del ")));
        assert_eq!(remove.len(), install.len());
        // Every rule is scoped with iif: an unscoped rule would catch the
        // splicer's own upstream traffic.
        assert!(install
            .iter()
            .filter(|c| c.contains("rule"))
            .all(|c| c.contains(" iif ")));
    }
}
