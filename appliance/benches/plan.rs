//! Planner benchmark (`cargo bench -p nearblock --bench plan`, or `cargo xtask
//! bench plan`): construction of a 1M-block image over 1,000 hosts, and placement
//! over 1,000 candidates, each next to a naive per-block scan of every host. The
//! naive scans would take minutes, so they run on a sample and are scaled up
//! (the scaling is printed). Figures are printed, never asserted.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nearblock::cost::{live::LiveCostConfig, Graph, LiveCosts, NodeId, Topology, TwinClasses};
use nearblock::index::{synthetic::SplitMix64, BlockHash, Manifest};
use nearblock::plan::{
    construct, construct_capacity_aware, place, CapacityConfig, HolderIndex, ImageHolders,
    MemoryIndex,
};

/// Blocks of the image (`NB_PLAN_BLOCKS`, default 2^20) and hosts
/// (`NB_PLAN_HOSTS`, default 1,000): `cargo xtask bench scale` runs this bench
/// at 1,000, 3,000 and 10,000 hosts with a 1 GiB image.
fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

static SIZES: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

fn blocks() -> usize {
    SIZES
        .get_or_init(|| {
            (
                env_or("NB_PLAN_BLOCKS", 1 << 20),
                env_or("NB_PLAN_HOSTS", 1000),
            )
        })
        .0
}

fn hosts() -> usize {
    SIZES
        .get_or_init(|| {
            (
                env_or("NB_PLAN_BLOCKS", 1 << 20),
                env_or("NB_PLAN_HOSTS", 1000),
            )
        })
        .1
}
const RACK: usize = 20;
const RACKS_PER_POD: usize = 10;
const LIBRARIES: usize = 2;
const HOT_HOSTS: usize = 8;

fn host_name(i: usize) -> String {
    if i < LIBRARIES {
        format!("lib{i}")
    } else {
        format!("hv{:04}", i - LIBRARIES)
    }
}

/// Libraries on the core switch; hypervisors in racks of 20 under top-of-rack
/// switches, 10 racks per pod switch, pods on the core. Every link weight 1;
/// libraries on 1 Gb/s (an old library server), hypervisors on 25 Gb/s, racks
/// on 40, pods on 100.
fn topology() -> Topology {
    let mut t = String::new();
    let mut node = |name: &str, role: &str| {
        let _ = writeln!(t, "[[node]]\nname = \"{name}\"\nrole = \"{role}\"");
    };
    node("core", "switch");
    let hypervisors = hosts() - LIBRARIES;
    let racks = hypervisors.div_ceil(RACK);
    let pods = racks.div_ceil(RACKS_PER_POD);
    for p in 0..pods {
        node(&format!("pod{p}"), "switch");
    }
    for r in 0..racks {
        node(&format!("tor{r}"), "switch");
    }
    for i in 0..hosts() {
        node(
            &host_name(i),
            if i < LIBRARIES {
                "library"
            } else {
                "hypervisor"
            },
        );
    }
    let mut link = |a: &str, b: &str, mbps: u32| {
        let _ = writeln!(
            t,
            "[[link]]\na = \"{a}\"\nb = \"{b}\"\ncapacity_mbps = {mbps}"
        );
    };
    for p in 0..pods {
        link(&format!("pod{p}"), "core", 100_000);
    }
    for r in 0..racks {
        link(
            &format!("tor{r}"),
            &format!("pod{}", r / RACKS_PER_POD),
            40_000,
        );
    }
    for i in 0..hosts() {
        if i < LIBRARIES {
            link(&host_name(i), "core", 1_000);
        } else {
            link(
                &host_name(i),
                &format!("tor{}", (i - LIBRARIES) / RACK),
                25_000,
            );
        }
    }
    Topology::parse(&t).expect("generated topology is valid")
}

/// Host index of a rack's members (hypervisors only).
fn rack_members(rack: usize) -> std::ops::Range<usize> {
    let start = LIBRARIES + rack * RACK;
    start..(start + RACK).min(hosts())
}

/// A skewed host: the libraries and a few hot hypervisors hold most blocks.
fn skewed_host(rng: &mut SplitMix64) -> usize {
    let u = rng.unit();
    if u < 0.45 {
        rng.below(LIBRARIES)
    } else if u < 0.75 {
        LIBRARIES + rng.below(HOT_HOSTS) * 97 % (hosts() - LIBRARIES)
    } else {
        // Power-law over everyone else.
        #[expect(clippy::cast_sign_loss, reason = "unit() is in [0, 1)")]
        let host = ((hosts() as f64) * rng.unit().powi(3)) as usize;
        host % hosts()
    }
}

struct Data {
    manifest: Manifest,
    index: MemoryIndex,
    /// Per host: the hashes it holds (only for the naive scan).
    host_sets: Vec<HashSet<BlockHash>>,
    target: String,
}

fn data(blocks: usize, seed: u64) -> Data {
    let mut rng = SplitMix64::new(seed);
    let mut index = MemoryIndex::new();
    for i in 0..hosts() {
        index.host(&host_name(i));
    }
    let target_rack = 7;
    let target = rack_members(target_rack).start + 3;
    let mut host_sets = vec![HashSet::new(); hosts()];
    let mut hashes: Vec<Option<BlockHash>> = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let u = rng.unit();
        if u < 0.04 {
            hashes.push(None); // zero block
            continue;
        }
        if u < 0.07 && i > 0 {
            // A repeat of an earlier block.
            let j = rng.below(i);
            hashes.push(hashes[j]);
            continue;
        }
        let hash = rng.hash();
        // 1..=8 holders, mostly few.
        #[expect(clippy::cast_sign_loss, reason = "unit() is in [0, 1)")]
        let extra = (rng.unit().powi(2) * 8.0) as usize;
        let mut holders = vec![skewed_host(&mut rng)];
        for _ in 0..extra.min(7) {
            holders.push(skewed_host(&mut rng));
        }
        if rng.unit() < 0.5 {
            let r = rack_members(target_rack);
            holders.push(r.start + rng.below(r.len()));
        }
        holders.sort_unstable();
        holders.dedup();
        holders.truncate(8);
        for h in holders {
            index.add_block(h as u32, hash);
            host_sets[h].insert(hash);
        }
        hashes.push(Some(hash));
    }
    let manifest = Manifest {
        image: "bench".into(),
        size: blocks as u64 * 4096,
        block_size: 4096,
        blocks: hashes,
    };
    Data {
        manifest,
        index,
        host_sets,
        target: host_name(target),
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Naive construction cost: for each distinct block, scan every host.
fn naive_cost(
    blocks: &[BlockHash],
    host_sets: &[HashSet<BlockHash>],
    dist: &[f64],
    target: usize,
) -> f64 {
    let mut total = 0.0;
    for hash in blocks {
        if host_sets[target].contains(hash) {
            continue;
        }
        let mut best = f64::INFINITY;
        for (h, set) in host_sets.iter().enumerate() {
            if set.contains(hash) && dist[h] < best {
                best = dist[h];
            }
        }
        total += best;
    }
    total
}

/// The cost matrix (one single-source result per host, as the planner caches
/// them): time to fill, memory, and the incremental update when one link's
/// load changes (a hypervisor's link; a pod's uplink).
fn cost_matrix(graph: &Graph, hosts: &[NodeId]) {
    let mut live = LiveCosts::new(graph.clone(), LiveCostConfig::default()).expect("live costs");
    let t = Instant::now();
    for &n in hosts {
        std::hint::black_box(live.paths_from(n));
    }
    let fill = t.elapsed();
    let row = graph.node_count()
        * (std::mem::size_of::<f64>() + std::mem::size_of::<Option<(NodeId, u32)>>());
    println!(
        "cost matrix: {} sources x {} nodes filled in {:.3} s, {:.1} MiB ({} B per source row)",
        hosts.len(),
        graph.node_count(),
        secs(fill),
        (row * hosts.len()) as f64 / f64::from(1u32 << 20),
        row
    );
    let hv = graph.node_id(&host_name(LIBRARIES)).expect("a hypervisor");
    let tor = graph.node_id("tor0").expect("tor0");
    let pod = graph.node_id("pod0").expect("pod0");
    let core = graph.node_id("core").expect("core");
    for (what, link) in [
        ("a hypervisor's link", graph.link_between(hv, tor)),
        ("a pod's uplink", graph.link_between(pod, core)),
    ] {
        let link = link.expect("the link exists");
        let before = live.recomputes();
        let t = Instant::now();
        live.observe(&[(link, 0.6)]).expect("observe");
        let observe = t.elapsed();
        let t = Instant::now();
        for &n in hosts {
            std::hint::black_box(live.paths_from(n));
        }
        println!(
            "cost matrix, {what} at 60% load: invalidation {:.3} ms, {} of {} rows recomputed in {:.3} s",
            secs(observe) * 1000.0,
            live.recomputes() - before,
            hosts.len(),
            secs(t.elapsed())
        );
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores, {model}")
}

#[expect(
    clippy::too_many_lines,
    reason = "one scenario printed step by step; split, it would only pass its state around"
)]
fn main() {
    println!("planner bench on {}", machine());
    let t0 = Instant::now();
    let topo = topology();
    let graph = Graph::from_topology(&topo);
    let d = data(blocks(), 42);
    println!(
        "data: {} blocks, {} distinct hashes, {} hosts, {} graph nodes in {} twin classes (generated in {:.1} s)",
        d.manifest.blocks.len(),
        d.index.hash_count(),
        hosts(),
        graph.node_count(),
        TwinClasses::of(&graph).class_count(),
        secs(t0.elapsed())
    );
    // Index host id -> graph node, for the naive scans (same order of hosts).
    let node_of: Vec<NodeId> = d
        .index
        .hosts()
        .iter()
        .map(|n| graph.node_id(n).expect("every host is a node"))
        .collect();

    // --- Construction ---------------------------------------------------------
    let t = Instant::now();
    let target = graph.node_id(&d.target).expect("target is a node");
    let image = ImageHolders::resolve(&d.manifest, &d.index, &graph).expect("resolve");
    let resolved = t.elapsed();
    let paths = graph.shortest_paths(target);
    let plan = construct(&image, &graph, &paths).expect("construct");
    let construct_time = t.elapsed();
    println!(
        "construct: {:.3} s ({:.3} s index lookups and grouping) -> total_cost {}, {} fetched, {} local, {} zero, {} sources, {} holder sets",
        secs(construct_time),
        secs(resolved),
        plan.total_cost,
        plan.blocks_fetched,
        plan.blocks_local,
        plan.blocks_zero,
        plan.by_source.len(),
        image.group_count()
    );

    let distinct: Vec<BlockHash> = image.blocks.distinct.iter().map(|b| b.hash).collect();
    let sample = 20_000.min(distinct.len());
    let dist_by_host: Vec<f64> = node_of.iter().map(|&n| paths.dist[n as usize]).collect();
    let target_host = d
        .index
        .hosts()
        .iter()
        .position(|h| *h == d.target)
        .expect("target host");
    let t = Instant::now();
    let naive_sample = naive_cost(
        &distinct[..sample],
        &d.host_sets,
        &dist_by_host,
        target_host,
    );
    let naive_construct = secs(t.elapsed()) * distinct.len() as f64 / sample as f64;
    let planned_sample: f64 = (0..sample)
        .filter(|&i| plan.sources[i] != target)
        .map(|i| paths.dist[plan.sources[i] as usize])
        .sum();
    #[expect(
        clippy::float_cmp,
        reason = "both are sums of integer link weights, exact in f64"
    )]
    let sample_costs_agree = naive_sample == planned_sample;
    println!(
        "construct, naive per-block scan of every host: {naive_construct:.1} s (extrapolated from {sample} blocks; sample costs agree: {sample_costs_agree})"
    );
    println!(
        "construct speedup over naive: {:.0}x",
        naive_construct / secs(construct_time)
    );

    // --- Placement ------------------------------------------------------------
    let candidates: Vec<String> = (0..hosts()).map(host_name).collect();
    let t = Instant::now();
    let image = ImageHolders::resolve(&d.manifest, &d.index, &graph).expect("resolve");
    let placement = place(&image, &graph, &candidates).expect("place");
    let place_time = t.elapsed();
    let best = &placement.candidates[0];
    let ok = placement
        .candidates
        .iter()
        .filter(|c| c.cost.is_ok())
        .count();
    println!(
        "place over {} candidates: {:.3} s -> cheapest {} at {}, {} buildable",
        candidates.len(),
        secs(place_time),
        best.host,
        best.cost.as_ref().map_or(f64::NAN, |c| c.total_cost),
        ok
    );
    // One construction per candidate (the resolved image shared).
    let reps = 3;
    let t = Instant::now();
    for c in candidates.iter().take(reps) {
        let n = graph.node_id(c).expect("candidate is a node");
        let p = graph.shortest_paths(n);
        std::hint::black_box(construct(&image, &graph, &p).ok());
    }
    let per_candidate = secs(t.elapsed()) / reps as f64 * candidates.len() as f64 + secs(resolved);
    println!(
        "place, one construction per candidate: {:.1} s (extrapolated from {} candidates); speedup {:.1}x",
        per_candidate,
        reps,
        per_candidate / secs(place_time)
    );
    let naive_sample_blocks = 2_000.min(distinct.len());
    let naive_reps = 2;
    let t = Instant::now();
    for c in 0..naive_reps {
        let n = node_of[c];
        let p = graph.shortest_paths(n);
        let dist: Vec<f64> = node_of.iter().map(|&m| p.dist[m as usize]).collect();
        std::hint::black_box(naive_cost(
            &distinct[..naive_sample_blocks],
            &d.host_sets,
            &dist,
            c,
        ));
    }
    let naive_place =
        secs(t.elapsed()) / naive_reps as f64 * candidates.len() as f64 * distinct.len() as f64
            / naive_sample_blocks as f64;
    println!(
        "place, naive per-block scan per candidate: {:.0} s (extrapolated from {} candidates x {} blocks); speedup {:.0}x",
        naive_place,
        naive_reps,
        naive_sample_blocks,
        naive_place / secs(place_time)
    );

    // --- The cost matrix: every host's cheapest paths, kept live ---------------
    cost_matrix(&graph, &node_of);

    // --- Capacity-aware construction on a smaller image ------------------------
    let small = data(1 << 16, 7);
    let t = Instant::now();
    let image = ImageHolders::resolve(&small.manifest, &small.index, &graph).expect("resolve");
    let target = graph.node_id(&small.target).expect("target");
    let paths = graph.shortest_paths(target);
    let cp = construct_capacity_aware(&image, &graph, &paths, &CapacityConfig::default())
        .expect("capacity");
    println!(
        "capacity-aware construct, {} blocks ({} holder sets): {:.3} s; finish {:.3} s vs plain {:.3} s, cost {} vs {}",
        small.manifest.blocks.len(),
        image.group_count(),
        secs(t.elapsed()),
        cp.finish_time_s,
        cp.plain_finish_time_s,
        cp.plan.total_cost,
        cp.plain.total_cost
    );
    println!("total bench time {:.1} s", secs(t0.elapsed()));
}
