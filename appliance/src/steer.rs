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

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(io::Error),
    #[error("socket {what}: {source}")]
    Socket { what: String, source: io::Error },
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
    a.iter().map(|s| s.to_string()).collect()
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
/// for any destination address (IP_TRANSPARENT; accepted sockets inherit it, so
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

/// Connect to `dst` from the initiator's own address `src` (IP_TRANSPARENT), with
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
    let v = tclass as libc::c_int;
    // SAFETY: valid fd, option value pointer and length for IPV6_TCLASS.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
