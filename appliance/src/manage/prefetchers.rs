//! Rack appliances' prefetching as flows in the budget allocation. While
//! builds cross an appliance's budgeted uplink, the manager tells the
//! appliance every second the share its prefetches may use (the share they
//! have when counted; the share they would get on joining otherwise), and the
//! appliance answers whether it prefetches: a change re-allocates, so the
//! builds crossing that uplink slow down to make room, or speed up again.
//! When no build crosses the uplink any more the share is withdrawn: the
//! appliance's own budget (the whole uplink's) is in force again.
//!
//! An appliance takes part by naming the manager in `[splicer] managers`; one
//! that refuses (not naming it, or an agent) is left alone for a minute.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Weak,
    time::{Duration, Instant},
};

use super::Manager;
use crate::{cost::topology::Role, peer::proto::Msg};

/// How often appliances whose uplinks builds cross are polled.
pub const POLL: Duration = Duration::from_secs(1);
/// An appliance that refused a share is not asked again for this long.
const REFUSED_FOR: Duration = Duration::from_mins(1);

/// An appliance whose uplink a running build crosses.
#[derive(Clone, Debug)]
pub(super) struct Prefetcher {
    pub addr: String,
    /// Its uplink's topology link index.
    pub uplink: usize,
    /// It said it prefetches (it is a flow in the allocation).
    pub prefetching: bool,
}

/// A running build as the rates are sent to it.
pub(super) struct BuildAt {
    /// Its builder's address.
    pub addr: String,
    /// Its id there.
    pub build: u64,
    /// (source, planned bytes), in its order's source order.
    pub planned: Vec<(String, u64)>,
}

/// Shares for builds and prefetching appliances, as the runner sends them.
pub(super) struct Allocation {
    /// Bytes/s per source (0: none) by job.
    pub rates: BTreeMap<u64, Vec<u64>>,
    /// Per job: where its build runs and what it plans.
    pub agents: BTreeMap<u64, BuildAt>,
    /// Per appliance: (node, address, bytes/s (0: none), counted).
    pub prefetch: Vec<(String, String, u64, bool)>,
}

impl Manager {
    /// The appliances (topology nodes that are neither a library nor a
    /// hypervisor, with an address in the index) whose budgeted uplinks the
    /// running builds cross: node → (address, uplink).
    fn crossed_appliances(&self) -> BTreeMap<String, (String, usize)> {
        let Some(topology) = self.budget_topology.lock().clone() else {
            return BTreeMap::new();
        };
        let crossed: std::collections::BTreeSet<usize> = self
            .flows
            .lock()
            .values()
            .flat_map(|b| b.sources.iter().flat_map(|(_, links, _)| links.iter().copied()))
            .filter(|&l| topology.links.get(l).is_some_and(|l| l.budget_mbps.is_some()))
            .collect();
        if crossed.is_empty() {
            return BTreeMap::new();
        }
        let addrs: HashMap<String, String> = self.index.addrs().into_iter().collect();
        topology
            .nodes
            .iter()
            .filter(|n| !matches!(n.role, Role::Library | Role::Hypervisor))
            .filter_map(|n| {
                let uplink = topology.uplink(&n.name).filter(|l| crossed.contains(l))?;
                Some((n.name.clone(), (addrs.get(&n.name)?.clone(), uplink)))
            })
            .collect()
    }

    /// Tells every appliance in `shares` its share; records who prefetches.
    /// Returns whether any appliance's answer changed the allocation.
    pub(super) async fn tell_prefetchers(&self, shares: &[(String, String, u64, bool)]) -> bool {
        let mut changed = false;
        for (node, addr, bytes_per_s, counted) in shares {
            let reply = self
                .client
                .peer(addr)
                .request(&Msg::PrefetchShare {
                    bytes_per_s: *bytes_per_s,
                    counted: *counted,
                })
                .await;
            match reply {
                Ok(Msg::PrefetchState { prefetching }) => {
                    if let Some(p) = self.prefetchers.lock().get_mut(node) {
                        if p.prefetching != prefetching {
                            tracing::info!(%node, prefetching, "appliance prefetching changed: re-allocating");
                            p.prefetching = prefetching;
                            changed = true;
                        }
                    }
                }
                other => {
                    let why = match other {
                        Ok(m) => m.name().to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%node, %why, "appliance took no prefetch share");
                    // Unreachable or refusing: not a flow; asked again later.
                    if let Some(p) = self.prefetchers.lock().remove(node) {
                        changed |= p.prefetching;
                    }
                    self.refused.lock().insert(node.clone(), Instant::now());
                }
            }
        }
        changed
    }

    /// One poll: appliances whose uplinks builds no longer cross get their
    /// share withdrawn, new ones join, every one is told its share, and a
    /// change in who prefetches re-allocates every build's rates.
    async fn poll_prefetchers(&self) {
        let wanted = self.crossed_appliances();
        let now = Instant::now();
        self.refused
            .lock()
            .retain(|_, at| now.duration_since(*at) < REFUSED_FOR);
        let gone: Vec<(String, Prefetcher)> = {
            let mut p = self.prefetchers.lock();
            let gone = p
                .iter()
                .filter(|(n, _)| !wanted.contains_key(*n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect::<Vec<_>>();
            for (n, _) in &gone {
                p.remove(n);
            }
            let refused = self.refused.lock();
            for (node, (addr, uplink)) in &wanted {
                if refused.contains_key(node) {
                    continue;
                }
                p.entry(node.clone()).or_insert_with(|| Prefetcher {
                    addr: addr.clone(),
                    uplink: *uplink,
                    prefetching: false,
                });
            }
            gone
        };
        let withdrawn: Vec<_> = gone
            .iter()
            .map(|(n, p)| (n.clone(), p.addr.clone(), 0, false))
            .collect();
        let mut changed = gone.iter().any(|(_, p)| p.prefetching);
        self.tell_prefetchers(&withdrawn).await;
        if self.prefetchers.lock().is_empty() && !changed {
            return;
        }
        changed |= self.tell_prefetchers(&self.allocation().prefetch).await;
        if changed {
            self.reallocate(None).await;
        }
    }
}

/// Polls the appliances every [`POLL`] while the manager lives.
pub(super) async fn run(manager: Weak<Manager>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(m) = manager.upgrade() else {
            return;
        };
        m.poll_prefetchers().await;
    }
}

