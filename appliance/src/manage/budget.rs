//! Per-link budgets (`[[link]] budget_mbps`): the traffic nearblock itself
//! starts on a link stays within its budget. The manager is the one allocator:
//! each running build's connection to each of its sources is a flow over the
//! links of its path, and so is a rack appliance's prefetching (one flow on
//! its uplink, while it prefetches); a link's budget is shared equally by the
//! flows crossing it, and a flow's rate is its smallest share along its path.
//! Re-allocated whenever a build starts, re-plans or ends, and when an
//! appliance starts or stops prefetching. Pure; the runner and
//! [`super::prefetchers`] send the rates.

/// Builds pace their block bytes at this fraction of their share, so that the
/// peer protocol's framing and sealing (0.9% measured in the lab: 1,649,359 B
/// on the wire for 1,634,304 B of blocks) and the pacing's round granularity
/// keep the wire within the budget.
pub const PACE: f64 = 0.95;

/// One build's connection to one source, or one appliance's prefetching.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    /// Topology link indices on its path.
    pub links: Vec<usize>,
}

/// The pacing rate of every flow in bytes/s (`None`: no budget on its path),
/// from the links' budgets in Mbit/s (by topology link index).
pub fn allocate(budgets_mbps: &[Option<f64>], flows: &[Flow]) -> Vec<Option<f64>> {
    let mut crossing = vec![0usize; budgets_mbps.len()];
    for f in flows {
        for &l in &f.links {
            if let Some(c) = crossing.get_mut(l) {
                *c += 1;
            }
        }
    }
    flows
        .iter()
        .map(|f| {
            f.links
                .iter()
                .filter_map(|&l| {
                    let budget = budgets_mbps.get(l).copied().flatten()?;
                    Some(budget * 1e6 / 8.0 / crossing[l] as f64 * PACE)
                })
                .reduce(f64::min)
        })
        .collect()
}

/// The rate in bytes/s a new flow over `links` would get if it joined `flows`
/// (`None`: no budget on its path): an appliance not prefetching is told the
/// share it may use when it starts.
pub fn joining_share(budgets_mbps: &[Option<f64>], flows: &[Flow], links: &[usize]) -> Option<f64> {
    links
        .iter()
        .filter_map(|&l| {
            let budget = budgets_mbps.get(l).copied().flatten()?;
            let crossing = flows.iter().filter(|f| f.links.contains(&l)).count();
            Some(budget * 1e6 / 8.0 / (crossing + 1) as f64 * PACE)
        })
        .reduce(f64::min)
}

/// Seconds to move `bytes` at `rate` bytes/s.
pub fn seconds(bytes: u64, rate: f64) -> f64 {
    bytes as f64 / rate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(links: &[usize]) -> Flow {
        Flow {
            links: links.to_vec(),
        }
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "exact shares of round numbers")]
    fn a_link_budget_is_shared_by_the_flows_crossing_it() {
        // Link 0 has 200 Mbit/s, link 1 none, link 2 80 Mbit/s.
        let budgets = [Some(200.0), None, Some(80.0)];
        let one = allocate(&budgets, &[flow(&[0, 1])]);
        assert_eq!(one, [Some(25e6 * PACE)]);
        let two = allocate(&budgets, &[flow(&[0, 1]), flow(&[1, 0])]);
        assert_eq!(two, [Some(12.5e6 * PACE), Some(12.5e6 * PACE)]);
        // The smallest share on the path wins: 80/1 < 200/2.
        let mixed = allocate(&budgets, &[flow(&[0]), flow(&[0, 2])]);
        assert_eq!(mixed, [Some(12.5e6 * PACE), Some(10e6 * PACE)]);
        // No budget on the path: unpaced.
        assert_eq!(allocate(&budgets, &[flow(&[1])]), [None]);
        assert_eq!(seconds(25, 12.5), 2.0);
        // An appliance joining link 0 beside one build: half of it.
        assert_eq!(joining_share(&budgets, &[flow(&[0, 1])], &[0]), Some(12.5e6 * PACE));
        assert_eq!(joining_share(&budgets, &[], &[0]), Some(25e6 * PACE));
        assert_eq!(joining_share(&budgets, &[], &[1]), None);
    }
}
