//! Classification, seen from user space: the flow table, per-interface link
//! counters and verdicts the XDP program keeps, turned into records for status and
//! metrics; and passive discovery, which reads the Login Request segments the XDP
//! program copies to the ring buffer and learns which initiator opened which target.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use nearblock_common::{flow::ip_of, FlowKey, LoginEvent};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{datapath::DatapathError, splice::text};

/// The address pair and ports of a flow key, for display.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowView {
    pub interface: String,
    pub src: String,
    pub dst: String,
    pub vlan: u16,
    pub packets: u64,
    /// TCP payload that crossed the link, retransmissions included.
    pub payload_bytes: u64,
    /// Of `payload_bytes`, payload that did not advance the flow's sequence space
    /// (retransmitted); `payload_bytes - retrans_bytes` is what the application sent.
    pub retrans_bytes: u64,
    pub frame_bytes: u64,
}

fn sock_str(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Source and destination of a flow key as `addr:port` strings.
pub fn endpoints(key: &FlowKey) -> (String, String) {
    (
        sock_str(ip_of(key.family, &key.saddr), key.sport),
        sock_str(ip_of(key.family, &key.daddr), key.dport),
    )
}

/// Live rate of one interface, from two samples of its byte counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct LinkRate {
    pub rx_bps: f64,
    pub tx_bps: f64,
    /// max(rx, tx) / capacity, when the link's capacity is configured (0..=1+).
    pub utilization: Option<f64>,
}

/// Rate between two counter samples `dt_secs` apart (pure). Counters only grow;
/// a reset (daemon restart, map recreated) yields 0 rather than a negative rate.
pub fn link_rate(
    prev: (u64, u64),
    cur: (u64, u64),
    dt_secs: f64,
    capacity_mbps: Option<f64>,
) -> LinkRate {
    if dt_secs <= 0.0 {
        return LinkRate::default();
    }
    let rx_bps = cur.0.saturating_sub(prev.0) as f64 * 8.0 / dt_secs;
    let tx_bps = cur.1.saturating_sub(prev.1) as f64 * 8.0 / dt_secs;
    let utilization = capacity_mbps
        .filter(|c| *c > 0.0)
        .map(|c| rx_bps.max(tx_bps) / (c * 1e6));
    LinkRate {
        rx_bps,
        tx_bps,
        utilization,
    }
}

/// `(rx_bytes, tx_bytes)` per ifindex at one instant.
pub type ByteSample = BTreeMap<u32, (u64, u64)>;

/// Every interface's rate between two samples `dt_secs` apart (pure). An
/// interface new since `before` counts from zero.
pub fn link_rates(
    before: &ByteSample,
    now: &ByteSample,
    dt_secs: f64,
    capacity_mbps: &BTreeMap<u32, f64>,
) -> BTreeMap<u32, LinkRate> {
    now.iter()
        .map(|(ifindex, cur)| {
            let prev = before.get(ifindex).copied().unwrap_or((0, 0));
            let capacity = capacity_mbps.get(ifindex).copied();
            (*ifindex, link_rate(prev, *cur, dt_secs, capacity))
        })
        .collect()
}

/// What the link sampler reads its counters from and hands its rates to (the
/// running appliance: the datapath's counters in, status and live costs out).
pub trait LinkCounters: Send + Sync {
    /// Each interface's byte counters now.
    fn byte_counters(&self) -> Result<ByteSample, DatapathError>;
    /// The rates over the last interval, every interface at once.
    fn publish_rates(&self, rates: BTreeMap<u32, LinkRate>);
}

/// Turn the kernel's per-interface byte counters into live rates (and, through
/// `counters`, utilisation), every `interval`. `capacity_mbps`: per ifindex.
pub async fn sample_links_loop<C: LinkCounters + ?Sized>(
    counters: Arc<C>,
    capacity_mbps: BTreeMap<u32, f64>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    let mut prev: Option<(Instant, ByteSample)> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let cur = match counters.byte_counters() {
            Ok(c) => c,
            Err(e) => {
                warn!(cause = %e, "sampling interface counters");
                continue;
            }
        };
        if let Some((t0, before)) = &prev {
            let dt = now.duration_since(*t0).as_secs_f64();
            counters.publish_rates(link_rates(before, &cur, dt, &capacity_mbps));
        }
        prev = Some((now, cur));
    }
}

/// One learned (initiator, target) association.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Discovery {
    pub initiator_addr: String,
    pub initiator_iqn: String,
    pub target_iqn: String,
    /// `Discovery` for SendTargets sessions, `Normal` otherwise.
    pub session_type: String,
    pub portal: String,
    pub logins: u64,
}

/// What one Login Request segment says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginSeen {
    pub initiator_addr: IpAddr,
    pub portal: String,
    pub initiator_iqn: String,
    pub target_iqn: Option<String>,
    pub session_type: String,
}

const BHS_LEN: usize = 48;

/// Parse a captured Login Request segment (pure). `None` if the bytes are not a
/// Login Request carrying an InitiatorName (continuation PDUs, garbage).
pub fn parse_login(key: &FlowKey, payload: &[u8]) -> Option<LoginSeen> {
    if payload.len() < BHS_LEN || payload[0] & 0x3f != 0x03 {
        return None;
    }
    let dlen = u32::from_be_bytes([0, payload[5], payload[6], payload[7]]) as usize;
    let ahs = payload[4] as usize * 4;
    let start = BHS_LEN + ahs;
    // Only the captured part of the data segment is available.
    let end = (start + dlen).min(payload.len());
    let data = payload.get(start..end)?;
    let initiator = text::value(data, "InitiatorName")?.to_string();
    let session_type = text::value(data, "SessionType")
        .unwrap_or("Normal")
        .to_string();
    Some(LoginSeen {
        initiator_addr: ip_of(key.family, &key.saddr),
        portal: sock_str(ip_of(key.family, &key.daddr), key.dport),
        initiator_iqn: initiator,
        target_iqn: text::value(data, "TargetName").map(str::to_string),
        session_type,
    })
}

/// The discovery table: (initiator address, initiator IQN, target IQN) → record.
#[derive(Default, Debug)]
pub struct DiscoveryTable {
    entries: BTreeMap<(String, String, String), Discovery>,
}

impl DiscoveryTable {
    pub fn record(&mut self, seen: LoginSeen) {
        let target = seen.target_iqn.clone().unwrap_or_default();
        let k = (
            seen.initiator_addr.to_string(),
            seen.initiator_iqn.clone(),
            target.clone(),
        );
        self.entries
            .entry(k)
            .and_modify(|d| d.logins += 1)
            .or_insert(Discovery {
                initiator_addr: seen.initiator_addr.to_string(),
                initiator_iqn: seen.initiator_iqn,
                target_iqn: target,
                session_type: seen.session_type,
                portal: seen.portal,
                logins: 1,
            });
    }

    pub fn entries(&self) -> Vec<Discovery> {
        self.entries.values().cloned().collect()
    }
}

/// Decode a ring-buffer record into its key and captured payload.
pub fn decode_event(bytes: &[u8]) -> Option<(FlowKey, Vec<u8>)> {
    if bytes.len() < std::mem::size_of::<LoginEvent>() {
        return None;
    }
    // SAFETY: the ring buffer record is a LoginEvent written by the kernel program
    // (same #[repr(C)] definition); read_unaligned copes with any alignment.
    let ev: LoginEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let len = (ev.len as usize).min(ev.data.len());
    Some((ev.key, ev.data[..len].to_vec()))
}

/// Passive discovery: read the Login Request segments the classifier copies to
/// the ring buffer, record who logged in to what in `table` and tell `on_login`,
/// until the ring cannot be polled any more (the programs were unloaded).
pub async fn discovery_loop(
    table: Arc<Mutex<DiscoveryTable>>,
    ring: RingBuf<MapData>,
    on_login: impl Fn(&LoginSeen) + Send + 'static,
) {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, so the fd
    // stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(cause = %e, "discovery disabled: cannot poll the ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some((key, payload)) = decode_event(&item) else {
                continue;
            };
            if let Some(seen) = parse_login(&key, &payload) {
                info!(
                    initiator = %seen.initiator_addr,
                    iqn = %seen.initiator_iqn,
                    target = ?seen.target_iqn,
                    "login seen"
                );
                on_login(&seen);
                table.lock().record(seen);
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearblock_common::flow::FAMILY_IPV4;

    fn login_pdu(text: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; BHS_LEN];
        p[0] = 0x43; // I bit + Login Request
        p[1] = 0x87; // T, CSG 1, NSG 3
        let n = text.len() as u32;
        p[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        p.extend_from_slice(text);
        while !p.len().is_multiple_of(4) {
            p.push(0);
        }
        p
    }

    fn key() -> FlowKey {
        let mut k = FlowKey {
            family: FAMILY_IPV4,
            proto: 6,
            sport: 40000,
            dport: 3260,
            ..Default::default()
        };
        k.saddr[..4].copy_from_slice(&[198, 18, 1, 2]);
        k.daddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        k
    }

    #[test]
    fn parses_initiator_and_target() {
        let p = login_pdu(b"InitiatorName=iqn.2026-11.test:hv1\0TargetName=iqn.2026-11.lib:img\0SessionType=Normal\0");
        let s = parse_login(&key(), &p).unwrap();
        assert_eq!(s.initiator_addr.to_string(), "198.18.1.2");
        assert_eq!(s.portal, "198.18.0.1:3260");
        assert_eq!(s.initiator_iqn, "iqn.2026-11.test:hv1");
        assert_eq!(s.target_iqn.as_deref(), Some("iqn.2026-11.lib:img"));
        let mut t = DiscoveryTable::default();
        t.record(s.clone());
        t.record(s);
        let e = t.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].logins, 2);
    }

    #[test]
    fn discovery_session_has_no_target() {
        let p = login_pdu(b"InitiatorName=iqn.x\0SessionType=Discovery\0");
        let s = parse_login(&key(), &p).unwrap();
        assert_eq!(s.target_iqn, None);
        assert_eq!(s.session_type, "Discovery");
    }

    #[test]
    fn rejects_non_login_and_truncated() {
        let mut p = login_pdu(b"InitiatorName=iqn.x\0");
        p[0] = 0x01;
        assert!(parse_login(&key(), &p).is_none());
        assert!(parse_login(&key(), &[3u8; 20]).is_none());
        // A continuation PDU without InitiatorName teaches nothing.
        assert!(parse_login(&key(), &login_pdu(b"MaxBurstLength=262144\0")).is_none());
        // Data segment length beyond the capture: parse what is there.
        let mut p = login_pdu(b"InitiatorName=iqn.y\0TargetName=t");
        p[5..8].copy_from_slice(&5000u32.to_be_bytes()[1..]);
        assert_eq!(parse_login(&key(), &p).unwrap().initiator_iqn, "iqn.y");
    }

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[test]
    fn link_rate_from_samples() {
        let r = link_rate((0, 1000), (125_000_000, 1000), 1.0, Some(10_000.0));
        assert_eq!(r.rx_bps, 1e9);
        assert_eq!(r.tx_bps, 0.0);
        assert_eq!(r.utilization, Some(0.1));
        let reset = link_rate((500, 500), (10, 10), 1.0, None);
        assert_eq!(
            (reset.rx_bps, reset.tx_bps, reset.utilization),
            (0.0, 0.0, None)
        );
        assert_eq!(link_rate((0, 0), (8, 8), 0.0, None), LinkRate::default());
    }

    #[test]
    fn link_rates_cover_every_interface_sampled_now() {
        let before = ByteSample::from([(1, (0, 0)), (9, (100, 100))]);
        let now = ByteSample::from([(1, (1_000, 250)), (2, (500, 0))]);
        let rates = link_rates(&before, &now, 2.0, &BTreeMap::from([(1, 0.01)]));
        // Interface 9 is gone (not reported); interface 2 is new (counts from 0).
        assert_eq!(rates.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!((rates[&1].rx_bps, rates[&1].tx_bps), (4_000.0, 1_000.0));
        // 4 kb/s on a 10 kb/s link.
        assert_eq!(rates[&1].utilization, Some(0.4));
        assert_eq!((rates[&2].rx_bps, rates[&2].utilization), (2_000.0, None));
    }

    #[test]
    fn decodes_ring_record() {
        let mut ev = LoginEvent {
            key: key(),
            len: 3,
            data: [0; nearblock_common::event::LOGIN_CAPTURE_MAX],
        };
        ev.data[..3].copy_from_slice(b"abc");
        // SAFETY: LoginEvent is plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const ev).cast::<u8>(),
                std::mem::size_of::<LoginEvent>(),
            )
        };
        let (k, d) = decode_event(bytes).unwrap();
        assert_eq!(k, key());
        assert_eq!(d, b"abc");
        assert!(decode_event(&bytes[..10]).is_none());
    }
}
