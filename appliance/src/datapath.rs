//! The loaded kernel programs: loads the eBPF object embedded at build time, sets
//! its load-time globals, fills the configuration maps, attaches programs, and gives
//! typed access to the counter maps. The classifier ([`crate::classify`]) and the
//! steering ([`crate::steer`]) use it; dropping it detaches everything (the links are
//! file descriptors of this process, so they also vanish if it is killed).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, SockMap},
    programs::{
        links::LinkOrder,
        tc::{TcAttachOptions, TcAttachType},
        xdp::XdpMode as AyaXdpMode,
        SchedClassifier, Xdp,
    },
    Ebpf, EbpfLoader,
};
use nearblock_common::{
    maps::{self as names},
    verdict::{VERDICT_COUNT, VERDICT_NAMES},
    FlowCounters, FlowKey, FlowSeq, Heartbeat, IfCounters, PortalKey, SourceKey,
};
use parking_lot::Mutex;

use crate::config::{ClassifierPlacement, XdpMode};

/// The handoff map's key and value, as its methods take and give them.
pub use nearblock_common::{HandoffKey, HandoffRewrite};

/// The listener slots and interface roles, for callers outside the daemon
/// (packet fixtures) that drive the steering maps directly.
#[cfg(feature = "testing")]
pub use nearblock_common::maps::{
    LISTENER_V4, LISTENER_V6, PROG_TC_CLASSIFY, PROG_TC_CLASSIFY_STEER, PROG_TC_EGRESS,
    PROG_TC_STEER, PROG_XDP_CLASSIFY, ROLE_CLIENT_FACING, ROLE_UPSTREAM_FACING,
};

/// The eBPF object built by `appliance/build.rs` (empty if the toolchain was missing).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nearblock-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this nearblock binary was built without its eBPF programs (no Debian rustc-web / \
         bpf-linker at build time): run `cargo xtask bootstrap`, then rebuild"
    )]
    NotBuilt,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map `{0}` is missing from the object")]
    MissingMap(&'static str),
    #[error("interface `{0}` does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error(
        "attaching XDP to `{iface}` in {mode:?} mode failed: {source} (try xdp_mode = \"skb\")"
    )]
    AttachXdp {
        iface: String,
        mode: XdpMode,
        source: aya::programs::ProgramError,
    },
    #[error("attaching TC {dir} program to `{iface}` failed: {source}")]
    AttachTc {
        iface: String,
        dir: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("steering on `{0}` asked for after its classifier: it attaches with the classifier")]
    SteeringAfterClassifier(String),
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    TestRun(std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// Load-time settings of the kernel programs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub classified_ports: Vec<u16>,
    pub dscp_mark: u8,
    pub steer_mark: u32,
    /// Steer new connections only to portals added with
    /// [`Datapath::serve_portal`].
    pub steer_served_only: bool,
}

/// Where an interface's classifier was attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassifierAttachment {
    /// TC ingress (TCX, first); on a steering interface, one program with
    /// the steering (`nb_classify_steer`).
    Tc,
    /// XDP in the driver.
    XdpNative,
    /// XDP in generic (skb) mode: every frame is made linear first.
    XdpGeneric,
}

impl ClassifierAttachment {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tc => "tc",
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
        }
    }
}

/// Where `auto` puts the classifier for an interface whose driver is `driver`,
/// before trying anything: `Some(Tc)` where XDP is known to copy every frame
/// (veth: its native mode makes a GSO skb linear just as generic XDP does),
/// `None` to try native XDP first (and take TC if the driver refuses it).
pub fn auto_placement(driver: Option<&str>) -> Option<ClassifierAttachment> {
    match driver {
        Some("veth") => Some(ClassifierAttachment::Tc),
        _ => None,
    }
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// Forwards the kernel programs' rare-event log lines (aya-log) to tracing;
    /// taken by the daemon to poll.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Interface name → where its classifier runs.
    attachments: BTreeMap<String, ClassifierAttachment>,
    /// The interfaces that steer (their roles are in the kernel's map).
    steering: BTreeSet<String>,
}

/// Summed counters of one directional flow.
#[derive(Clone, Copy, Debug)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub counters: FlowCounters,
    /// Payload that advanced the sequence space (application bytes).
    pub new_bytes: u64,
}

impl Datapath {
    /// Load the programs into the kernel (verifier runs here) and fill the port map.
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_DSCP_MARK, &opts.dscp_mark, true)
            .override_global(names::GLOBAL_STEER_MARK, &opts.steer_mark, true)
            .override_global(
                names::GLOBAL_STEER_SERVED_ONLY,
                &u8::from(opts.steer_served_only),
                true,
            )
            .load(EBPF_OBJECT)?;
        // Before the programs load: the logger takes the log map out of `ebpf`.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(cause = %e, "kernel program logging unavailable");
                None
            }
        };
        {
            let mut ports: Array<&mut MapData, u64> = Array::try_from(
                ebpf.map_mut(names::PORTS)
                    .ok_or(DatapathError::MissingMap(names::PORTS))?,
            )
            .map_err(map_err(names::PORTS))?;
            for (word, bits) in port_bitmap(&opts.classified_ports) {
                ports.set(word, bits, 0).map_err(map_err(names::PORTS))?;
            }
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(names::PROG_XDP_CLASSIFY)
            .ok_or(DatapathError::MissingMap(names::PROG_XDP_CLASSIFY))?
            .try_into()
            .map_err(prog_err(names::PROG_XDP_CLASSIFY))?;
        xdp.load().map_err(prog_err(names::PROG_XDP_CLASSIFY))?;
        for name in [
            names::PROG_TC_CLASSIFY,
            names::PROG_TC_STEER,
            names::PROG_TC_CLASSIFY_STEER,
            names::PROG_TC_EGRESS,
        ] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingMap(name))?
                .try_into()
                .map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
        }
        Ok(Self {
            ebpf,
            logger,
            attachments: BTreeMap::new(),
            steering: BTreeSet::new(),
        })
    }

    /// Attach the classifier (where `placement` and the driver say) and the
    /// egress counter to `iface`; returns where the classifier went.
    pub fn attach_classifier(
        &mut self,
        iface: &str,
        placement: ClassifierPlacement,
        mode: XdpMode,
    ) -> Result<ClassifierAttachment, DatapathError> {
        if_index(iface)?;
        let attached = match placement {
            ClassifierPlacement::Tc => self.attach_tc_classifier(iface)?,
            ClassifierPlacement::Xdp => self.attach_xdp(iface, mode)?,
            ClassifierPlacement::Auto => {
                let driver = driver_name(iface);
                match auto_placement(driver.as_deref()) {
                    Some(ClassifierAttachment::Tc) => self.attach_tc_classifier(iface)?,
                    _ => match self.attach_xdp(iface, XdpMode::Driver) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::debug!(iface, driver, cause = %e, "no native XDP: classifying in TC");
                            self.attach_tc_classifier(iface)?
                        }
                    },
                }
            }
        };
        tracing::info!(iface, classifier = attached.name(), "classifier attached");
        self.attachments.insert(iface.to_string(), attached);
        if attached != ClassifierAttachment::Tc && self.steering.contains(iface) {
            self.attach_tc(names::PROG_TC_STEER, iface, TcAttachType::Ingress)?;
        }
        self.attach_tc(names::PROG_TC_EGRESS, iface, TcAttachType::Egress)?;
        Ok(attached)
    }

    /// The TC programs the kernel runs on `iface`'s ingress and egress (TCX),
    /// in order, by name: what is attached, as the kernel says, not as this
    /// process remembers it. Empty where TCX is not available (before 6.6).
    pub fn tc_programs(iface: &str) -> (Vec<String>, Vec<String>) {
        let names_of = |dir| {
            SchedClassifier::query_tcx(iface, dir)
                .map(|(_, progs)| {
                    progs
                        .iter()
                        .map(|p| full_program_name(p.name_as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default()
        };
        (names_of(TcAttachType::Ingress), names_of(TcAttachType::Egress))
    }

    /// Where each interface's classifier is attached.
    pub fn attachments(&self) -> &BTreeMap<String, ClassifierAttachment> {
        &self.attachments
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpMode,
    ) -> Result<ClassifierAttachment, DatapathError> {
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP_CLASSIFY)
            .ok_or(DatapathError::MissingMap(names::PROG_XDP_CLASSIFY))?
            .try_into()
            .map_err(prog_err(names::PROG_XDP_CLASSIFY))?;
        let mut attach = |flags| {
            xdp.attach(iface, flags)
                .map_err(|source| DatapathError::AttachXdp {
                    iface: iface.to_string(),
                    mode,
                    source,
                })
        };
        Ok(match mode {
            XdpMode::Skb => {
                attach(AyaXdpMode::Skb)?;
                ClassifierAttachment::XdpGeneric
            }
            XdpMode::Driver => {
                attach(AyaXdpMode::Driver)?;
                ClassifierAttachment::XdpNative
            }
            XdpMode::Auto => match attach(AyaXdpMode::Driver) {
                Ok(_) => ClassifierAttachment::XdpNative,
                Err(e) => {
                    tracing::debug!(iface, cause = %e, "native XDP unavailable, using generic");
                    attach(AyaXdpMode::Skb)?;
                    ClassifierAttachment::XdpGeneric
                }
            },
        })
    }

    /// The TC classifier goes first on ingress: it hands on to the next program
    /// (`TC_ACT_UNSPEC`), and a steering program after it must see every
    /// packet. On a steering interface the classifier is the combined program
    /// (`nb_classify_steer`), which ends the chain itself.
    fn attach_tc_classifier(&mut self, iface: &str) -> Result<ClassifierAttachment, DatapathError> {
        let name = if self.steering.contains(iface) {
            names::PROG_TC_CLASSIFY_STEER
        } else {
            names::PROG_TC_CLASSIFY
        };
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingMap(name))?
            .try_into()
            .map_err(prog_err(name))?;
        let first = TcAttachOptions::TcxOrder(LinkOrder::first());
        if let Err(e) = p.attach_with_options(iface, TcAttachType::Ingress, first) {
            // Before 6.6 there is no TCX: netlink's automatic priorities also put
            // a later filter ahead of earlier ones.
            tracing::debug!(iface, cause = %e, "no TCX ordering: attaching through netlink");
            p.attach(iface, TcAttachType::Ingress)
                .map_err(|source| DatapathError::AttachTc {
                    iface: iface.to_string(),
                    dir: "ingress",
                    source,
                })?;
        }
        Ok(ClassifierAttachment::Tc)
    }

    /// Steer classified connections entering `iface` (role bits: client- or
    /// upstream-facing). Steering runs with the interface's classifier, so it
    /// is asked for first and attached by [`Self::attach_classifier`]: in the
    /// same program where the classifier runs in TC (one pass over the
    /// headers), after it where it runs in XDP.
    pub fn attach_steering(&mut self, iface: &str, role: u32) -> Result<(), DatapathError> {
        if self.attachments.contains_key(iface) {
            return Err(DatapathError::SteeringAfterClassifier(iface.to_string()));
        }
        let ifindex = if_index(iface)?;
        self.set_interface_role(ifindex, role)?;
        self.steering.insert(iface.to_string());
        Ok(())
    }

    /// Give the steering program role bits for `ifindex` (without attaching it:
    /// packet fixtures run it on the loopback device's index).
    pub fn set_interface_role(&mut self, ifindex: u32, role: u32) -> Result<(), DatapathError> {
        let mut roles: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
            self.ebpf
                .map_mut(names::IFACE_ROLES)
                .ok_or(DatapathError::MissingMap(names::IFACE_ROLES))?,
        )
        .map_err(map_err(names::IFACE_ROLES))?;
        roles
            .insert(ifindex, role, 0)
            .map_err(map_err(names::IFACE_ROLES))
    }

    /// Steer new connections to `portal` (it exports a served LUN). Returns
    /// whether it was new.
    pub fn serve_portal(&mut self, portal: SocketAddr) -> Result<bool, DatapathError> {
        let mut map: HashMap<&mut MapData, PortalKey, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(names::SERVED_PORTALS)
                .ok_or(DatapathError::MissingMap(names::SERVED_PORTALS))?,
        )
        .map_err(map_err(names::SERVED_PORTALS))?;
        let key = PortalKey::from(portal);
        if map.get(&key, 0).is_ok() {
            return Ok(false);
        }
        map.insert(key, 1, 0)
            .map_err(map_err(names::SERVED_PORTALS))?;
        Ok(true)
    }

    /// The portals whose new connections are steered.
    pub fn served_portals(&self) -> Result<Vec<SocketAddr>, DatapathError> {
        let map: HashMap<&MapData, PortalKey, u8> = HashMap::try_from(
            self.ebpf
                .map(names::SERVED_PORTALS)
                .ok_or(DatapathError::MissingMap(names::SERVED_PORTALS))?,
        )
        .map_err(map_err(names::SERVED_PORTALS))?;
        let mut out: Vec<SocketAddr> = map
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.socket_addr())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Take the maps through which the daemon tells the steering program it is
    /// alive (heartbeats) and which sources are over their cap; the accept loops
    /// write them.
    pub fn take_fail_open_maps(&mut self) -> Result<FailOpenMaps, DatapathError> {
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
        };
        let heartbeats = Array::try_from(take(&mut self.ebpf, names::HEARTBEATS)?)
            .map_err(map_err(names::HEARTBEATS))?;
        let over_cap = HashMap::try_from(take(&mut self.ebpf, names::OVERCAP_SOURCES)?)
            .map_err(map_err(names::OVERCAP_SOURCES))?;
        Ok(FailOpenMaps {
            heartbeats: Mutex::new(heartbeats),
            over_cap: Mutex::new(over_cap),
        })
    }

    /// Take the map of connections handed to the kernel; the splicer writes
    /// it at handoff and a sweeper removes ended connections.
    pub fn take_handoff_map(&mut self) -> Result<HandoffMap, DatapathError> {
        let map = self
            .ebpf
            .take_map(names::HANDOFFS)
            .ok_or(DatapathError::MissingMap(names::HANDOFFS))?;
        Ok(HandoffMap {
            map: Mutex::new(HashMap::try_from(map).map_err(map_err(names::HANDOFFS))?),
        })
    }

    fn attach_tc(
        &mut self,
        prog: &'static str,
        iface: &str,
        dir: TcAttachType,
    ) -> Result<(), DatapathError> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog)
            .ok_or(DatapathError::MissingMap(prog))?
            .try_into()
            .map_err(prog_err(prog))?;
        // On kernels >= 6.6 this is a TCX link owned by this process (no qdisc).
        p.attach(iface, dir)
            .map_err(|source| DatapathError::AttachTc {
                iface: iface.to_string(),
                dir: if dir == TcAttachType::Ingress {
                    "ingress"
                } else {
                    "egress"
                },
                source,
            })?;
        Ok(())
    }

    /// Put a listening socket in the steering SockMap (`LISTENER_V4`/`LISTENER_V6`).
    pub fn register_listener<S: AsRawFd>(
        &mut self,
        slot: u32,
        sock: &S,
    ) -> Result<(), DatapathError> {
        let mut map: SockMap<&mut MapData> = SockMap::try_from(
            self.ebpf
                .map_mut(names::LISTENERS)
                .ok_or(DatapathError::MissingMap(names::LISTENERS))?,
        )
        .map_err(map_err(names::LISTENERS))?;
        map.set(slot, sock, 0).map_err(map_err(names::LISTENERS))
    }

    /// Remove a listener: new connections are then forwarded untouched (fail-open),
    /// while packets of already spliced connections still reach their sockets.
    pub fn unregister_listener(&mut self, slot: u32) -> Result<(), DatapathError> {
        let mut map: SockMap<&mut MapData> = SockMap::try_from(
            self.ebpf
                .map_mut(names::LISTENERS)
                .ok_or(DatapathError::MissingMap(names::LISTENERS))?,
        )
        .map_err(map_err(names::LISTENERS))?;
        match map.clear_index(&slot) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::LISTENERS)(e)),
        }
    }

    /// Every directional flow, counters summed over CPUs.
    pub fn flows(&self) -> Result<Vec<FlowRecord>, DatapathError> {
        let map: PerCpuHashMap<&MapData, FlowKey, FlowCounters> = PerCpuHashMap::try_from(
            self.ebpf
                .map(names::FLOWS)
                .ok_or(DatapathError::MissingMap(names::FLOWS))?,
        )
        .map_err(map_err(names::FLOWS))?;
        let seq: HashMap<&MapData, FlowKey, FlowSeq> = HashMap::try_from(
            self.ebpf
                .map(names::FLOW_SEQ)
                .ok_or(DatapathError::MissingMap(names::FLOW_SEQ))?,
        )
        .map_err(map_err(names::FLOW_SEQ))?;
        let mut out = Vec::new();
        for item in &map {
            let (key, per_cpu) = item.map_err(map_err(names::FLOWS))?;
            let counters = sum_flow(per_cpu.iter());
            let new_bytes = seq
                .get(&key, 0)
                .map_or(counters.payload_bytes, |s| s.new_bytes);
            out.push(FlowRecord {
                key,
                counters,
                new_bytes,
            });
        }
        Ok(out)
    }

    /// Per-interface counters summed over CPUs, by ifindex.
    pub fn interfaces(&self) -> Result<BTreeMap<u32, IfCounters>, DatapathError> {
        let map: PerCpuHashMap<&MapData, u32, IfCounters> = PerCpuHashMap::try_from(
            self.ebpf
                .map(names::IF_COUNTERS)
                .ok_or(DatapathError::MissingMap(names::IF_COUNTERS))?,
        )
        .map_err(map_err(names::IF_COUNTERS))?;
        let mut out = BTreeMap::new();
        for item in &map {
            let (ifindex, per_cpu) = item.map_err(map_err(names::IF_COUNTERS))?;
            let mut sum = IfCounters::default();
            for c in per_cpu.iter() {
                sum.rx_packets += c.rx_packets;
                sum.rx_bytes += c.rx_bytes;
                sum.tx_packets += c.tx_packets;
                sum.tx_bytes += c.tx_bytes;
            }
            out.insert(ifindex, sum);
        }
        Ok(out)
    }

    /// Verdict counters by name, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(names::VERDICTS)
                .ok_or(DatapathError::MissingMap(names::VERDICTS))?,
        )
        .map_err(map_err(names::VERDICTS))?;
        let mut out = Vec::with_capacity(VERDICT_COUNT as usize);
        for i in 0..VERDICT_COUNT {
            let per_cpu = map.get(&i, 0).map_err(map_err(names::VERDICTS))?;
            out.push((VERDICT_NAMES[i as usize], per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Take the kernel-log forwarder (poll it when its fd is readable, then `flush`).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Take the login-event ring buffer (for the discovery task to poll).
    pub fn take_login_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(names::LOGIN_EVENTS)
            .ok_or(DatapathError::MissingMap(names::LOGIN_EVENTS))?;
        RingBuf::try_from(map).map_err(map_err(names::LOGIN_EVENTS))
    }

    /// Run program `name` (one of the `PROG_*` names) once on `frame` with
    /// `BPF_PROG_TEST_RUN` (packet fixtures); returns the action and the frame
    /// as the program left it (rewrites of handed-off connections). Maps are
    /// updated as for a real packet entering on the loopback device
    /// (ifindex 1).
    pub fn test_run_frame(
        &self,
        name: &'static str,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), DatapathError> {
        prog_test_run(self.program_fd(name)?, frame, 1)
            .map(|(action, out, _)| (action, out))
            .map_err(DatapathError::TestRun)
    }

    /// Run program `name` on `frame` `repeat` times in the kernel
    /// (`BPF_PROG_TEST_RUN`) and return the kernel's mean time per run, in ns:
    /// what the program costs a packet, without the network around it
    /// (`cargo xtask bench datapath`). Maps are updated as for real packets.
    pub fn time_program(
        &self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<u32, DatapathError> {
        prog_test_run(self.program_fd(name)?, frame, repeat.max(1))
            .map(|(_, _, ns)| ns)
            .map_err(DatapathError::TestRun)
    }

    fn program_fd(&self, name: &'static str) -> Result<i32, DatapathError> {
        let fd = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingMap(name))?
            .fd()
            .map_err(prog_err(name))?;
        Ok(fd.as_fd().as_raw_fd())
    }
}

/// The fail-open maps the daemon writes while it runs (see
/// `nearblock_common::failopen`). Each is behind its own lock: both accept loops
/// and the connections' release guards write them.
pub struct FailOpenMaps {
    heartbeats: Mutex<Array<MapData, Heartbeat>>,
    over_cap: Mutex<HashMap<MapData, SourceKey, u64>>,
}

impl FailOpenMaps {
    /// Write listener `slot`'s heartbeat: alive now, and whether it takes new
    /// connections.
    pub fn beat(&self, slot: u32, accepting: bool) -> Result<(), DatapathError> {
        let hb = Heartbeat {
            mono_ns: monotonic_ns(),
            accepting: u32::from(accepting),
            _pad: 0,
        };
        self.heartbeats
            .lock()
            .set(slot, hb, 0)
            .map_err(map_err(names::HEARTBEATS))
    }

    /// Forward `source`'s new connections untouched until `until_ns`
    /// (`CLOCK_MONOTONIC`).
    pub fn mark_over_cap(&self, source: IpAddr, until_ns: u64) -> Result<(), DatapathError> {
        self.over_cap
            .lock()
            .insert(SourceKey::from(source), until_ns, 0)
            .map_err(map_err(names::OVERCAP_SOURCES))
    }

    /// Steer `source`'s new connections again.
    pub fn unmark_over_cap(&self, source: IpAddr) -> Result<(), DatapathError> {
        match self.over_cap.lock().remove(&SourceKey::from(source)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::OVERCAP_SOURCES)(e)),
        }
    }
}

/// The `HANDOFFS` map: one entry per direction of every connection the
/// splicer handed to the kernel (`splice::handoff`).
pub struct HandoffMap {
    map: Mutex<HashMap<MapData, HandoffKey, HandoffRewrite>>,
}

impl std::fmt::Debug for HandoffMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandoffMap")
    }
}

impl HandoffMap {
    /// Install both directions of a connection; on failure (the map is full)
    /// neither is left behind.
    pub fn install(
        &self,
        one: (HandoffKey, HandoffRewrite),
        other: (HandoffKey, HandoffRewrite),
    ) -> Result<(), DatapathError> {
        // BPF_NOEXIST: a stale entry of an earlier connection on this tuple
        // is not overwritten silently; the sweeper removes it first.
        const NOEXIST: u64 = 1;
        let mut map = self.map.lock();
        map.insert(one.0, one.1, NOEXIST)
            .map_err(map_err(names::HANDOFFS))?;
        if let Err(e) = map.insert(other.0, other.1, NOEXIST) {
            let _ = map.remove(&one.0);
            return Err(map_err(names::HANDOFFS)(e));
        }
        Ok(())
    }

    /// Remove both directions of a connection.
    pub fn remove(&self, key: &HandoffKey) {
        let mut map = self.map.lock();
        let _ = map.remove(key);
        let _ = map.remove(&key.reversed());
    }

    /// The entry of one direction, as the kernel last wrote it.
    pub fn get(&self, key: &HandoffKey) -> Option<HandoffRewrite> {
        self.map.lock().get(key, 0).ok()
    }

    /// Every direction's entry.
    pub fn entries(&self) -> Vec<(HandoffKey, HandoffRewrite)> {
        self.map.lock().iter().filter_map(Result::ok).collect()
    }

    /// Connections handed off and still open, and those closing (a FIN or
    /// RST seen in either direction), each counted once.
    pub fn connections(&self) -> (u64, u64) {
        count_connections(&self.entries())
    }

    /// Connections handed off and still open.
    pub fn open_connections(&self) -> u64 {
        self.connections().0
    }
}

/// (open, closing) connections among `HANDOFFS` entries: each connection has
/// an entry per direction and is closing once either has carried a FIN or RST.
fn count_connections(entries: &[(HandoffKey, HandoffRewrite)]) -> (u64, u64) {
    let closing: std::collections::HashMap<HandoffKey, bool> =
        entries.iter().map(|(k, e)| (*k, e.closing != 0)).collect();
    closing.iter().fold((0, 0), |(open, ended), (key, c)| {
        let rev = key.reversed();
        // Each connection once: by the direction whose key sorts first.
        if closing.contains_key(&rev) && (rev.sport, rev.saddr) < (key.sport, key.saddr) {
            return (open, ended);
        }
        if *c || closing.get(&rev).copied().unwrap_or(false) {
            (open, ended + 1)
        } else {
            (open + 1, ended)
        }
    })
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    // The monotonic clock is never negative.
    ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
}

fn sum_flow<'a>(per_cpu: impl Iterator<Item = &'a FlowCounters>) -> FlowCounters {
    let mut s = FlowCounters::default();
    for c in per_cpu {
        if c.packets == 0 {
            continue;
        }
        s.packets += c.packets;
        s.frame_bytes += c.frame_bytes;
        s.payload_bytes += c.payload_bytes;
        s.tcp_flags |= c.tcp_flags;
        if s.first_seen_ns == 0 || (c.first_seen_ns != 0 && c.first_seen_ns < s.first_seen_ns) {
            s.first_seen_ns = c.first_seen_ns;
        }
        s.last_seen_ns = s.last_seen_ns.max(c.last_seen_ns);
    }
    s
}

/// Forward the kernel programs' aya-log lines (rare events) to `log`/tracing,
/// until the logger's fd cannot be polled any more (the programs were unloaded).
pub async fn kernel_log_loop(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered.
    let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// ifindex of `iface` in the current network namespace.
pub fn if_index(iface: &str) -> Result<u32, DatapathError> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| DatapathError::NoSuchInterface(iface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(DatapathError::NoSuchInterface(iface.into()));
    }
    Ok(idx)
}

/// Name of interface `ifindex` in the current network namespace.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// The kernel driver behind `iface` (`ETHTOOL_GDRVINFO`), if it says.
pub fn driver_name(iface: &str) -> Option<String> {
    // struct ethtool_drvinfo (include/uapi/linux/ethtool.h): driver is the
    // 32 bytes after `cmd`; the rest is not read.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    // struct ifreq: the name, then a union whose member here is a pointer.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` is a valid ifreq whose data pointer points at `info`, a
    // drvinfo buffer at least as large as the kernel's; both outlive the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return None;
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// The kernel keeps 15 bytes of a program's name: this project's programs get
/// their whole names back; any other program keeps what the kernel kept.
fn full_program_name(kept: &str) -> String {
    [
        names::PROG_XDP_CLASSIFY,
        names::PROG_TC_CLASSIFY,
        names::PROG_TC_STEER,
        names::PROG_TC_CLASSIFY_STEER,
        names::PROG_TC_EGRESS,
    ]
    .into_iter()
    .find(|full| full.len() > kept.len() && full.starts_with(kept) && kept.len() == 15)
    .unwrap_or(kept)
    .to_string()
}

/// The classified-port bitmap's non-zero words (`nearblock_common::maps::port_bit`).
fn port_bitmap(ports: &[u16]) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for &p in ports {
        let (word, bit) = names::port_bit(p);
        *words.entry(word).or_insert(0) |= bit;
    }
    words
}

/// `bpf(BPF_PROG_TEST_RUN)` on an XDP or TC program, `repeat` times; aya 0.14
/// has no wrapper. Returns the last run's action and frame and the kernel's
/// mean ns per run.
fn prog_test_run(prog_fd: i32, frame: &[u8], repeat: u32) -> std::io::Result<(u32, Vec<u8>, u32)> {
    // union bpf_attr, test member (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestAttr {
        // A valid descriptor is non-negative.
        prog_fd: prog_fd.cast_unsigned(),
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; the buffers it
    // points at outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            std::mem::size_of::<TestAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out, attr.duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_program_names_are_given_back_whole() {
        assert_eq!(full_program_name("nb_classify_ste"), "nb_classify_steer");
        assert_eq!(full_program_name("nb_steer"), "nb_steer");
        assert_eq!(full_program_name("nb_egress_count"), "nb_egress_count");
        assert_eq!(full_program_name("other_prog_name"), "other_prog_name");
        assert_eq!(full_program_name("nb_class"), "nb_class");
    }

    #[test]
    fn classified_ports_set_their_bits_and_no_others() {
        let words = port_bitmap(&[3260, 80, 3261, 0, 65535]);
        // 3260 = 50 * 64 + 60, 3261 the next bit; 80 = 64 + 16.
        assert_eq!(
            words.into_iter().collect::<Vec<_>>(),
            vec![(0, 1), (1, 1 << 16), (50, (1 << 60) | (1 << 61)), (1023, 1 << 63)]
        );
        assert!(port_bitmap(&[]).is_empty());
    }

    #[test]
    fn auto_takes_tc_on_veth_and_tries_native_xdp_elsewhere() {
        assert_eq!(auto_placement(Some("veth")), Some(ClassifierAttachment::Tc));
        assert_eq!(auto_placement(Some("mlx5_core")), None);
        assert_eq!(auto_placement(None), None);
    }

    #[test]
    fn a_connection_counts_once_and_closes_with_either_direction() {
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:3260".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:40001".parse().unwrap();
        let open = HandoffRewrite::default();
        let closing = HandoffRewrite {
            closing: 1,
            ..HandoffRewrite::default()
        };
        let ab = HandoffKey::new(a, b);
        let cb = HandoffKey::new(c, b);
        let entries = [(ab, open), (ab.reversed(), open), (cb, open), (cb.reversed(), closing)];
        assert_eq!(count_connections(&entries), (1, 1));
        assert_eq!(count_connections(&entries[..2]), (1, 0));
        assert_eq!(count_connections(&[]), (0, 0));
    }
}
