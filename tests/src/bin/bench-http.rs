//! `cargo xtask bench http`: image copies over HTTP through the rack appliance,
//! as ratios to the same copy with nothing in the way, measured in the same run,
//! on the default lab topology (hv1 → rack1 → core → library, nginx on the
//! library serving a 256 MiB image with no zero blocks, so every byte is data).
//!
//! Clients: `curl` (one `GET` of the whole file) and `qemu-img convert` (its
//! HTTP driver: a `HEAD`, then 256 KiB ranges).
//!
//! Configurations:
//! - direct: forwarding only, no nearblock;
//! - pass-through: rack1 steers HTTP to its front end, but the file is not
//!   indexed: every `GET` is validated with `HEAD` and then answered by the
//!   origin through the front end;
//! - cold: the file indexed by the library's agent, rack1's cache empty (the
//!   appliance restarts before each copy): blocks fetched by hash from the
//!   library's agent;
//! - warm: the same, after a copy filled the cache.
//!
//! Each copy runs `ROUNDS` times (`NEARBLOCK_BENCH_ROUNDS`), interleaved; the
//! median MB/s is reported with the minimum and maximum, and its ratio to
//! direct's, and the bytes the library sent during the last round's copy.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock_lab::{content, fabric::Fabric, origin, procs::Procs, ApplianceOptions, Lab};

const IMAGE_MIB: usize = 256;
const ROUNDS: usize = 5;
const AGENT_PORT: u16 = 7500;
const INDEXER_PORT: u16 = 7501;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Config {
    Direct,
    PassThrough,
    Cold,
    Warm,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::Direct,
        Config::PassThrough,
        Config::Cold,
        Config::Warm,
    ];

    fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct (forwarding only)",
            Config::PassThrough => "pass-through (not indexed: origin answers)",
            Config::Cold => "cold (library's agent by hash)",
            Config::Warm => "warm (rack1's cache)",
        }
    }

    /// The file copied: `/images/` is indexed, `/plain/` (the same bytes) is not.
    fn path(self) -> &'static str {
        match self {
            Config::PassThrough => "/plain/b.raw",
            _ => "/images/b.raw",
        }
    }
}

const TOOLS: [&str; 2] = ["curl", "qemu-img"];

fn main() -> Result<()> {
    let rounds: usize = std::env::var("NEARBLOCK_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let mut lab = Lab::default_topology()?;
    let lib_name = lab.library().to_string();
    let lib = lab.addr4(&lib_name);
    let www = lab.dir.path().join("www");
    let data = content::image(IMAGE_MIB << 20, 77, 0);
    for dir in ["images", "plain"] {
        std::fs::create_dir_all(www.join(dir))?;
        origin::publish(&www.join(dir), "b.raw", &data, Duration::from_mins(1))?;
    }
    let mut nginx = Procs::new();
    origin::start_nginx(&lab, &mut nginx, &lib_name, &www)?;
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT)?;
    fabric.start_indexer(&lab, "core", None)?;
    let agent_extra = format!(
        "[[http_root]]\ndir = {}\nurl_prefix = \"/images\"\norigin = \"http://127.0.0.1:80\"\n",
        nearblock_lab::toml_path(&www.join("images"))
    );
    fabric.start_agent(&lab, &lib_name, "core", &[], &agent_extra)?;
    fabric.wait_holder(
        &lab,
        "core",
        &data[..4096],
        &lib_name,
        Duration::from_mins(2),
    )?;
    let topo = lab.write_file("topology.toml", nearblock_lab::DEFAULT_TOPOLOGY.as_bytes())?;
    let rack1_ix = fabric.indexer_config(&lab, "rack1", Some("core"))?;
    #[expect(
        clippy::unnecessary_debug_formatting,
        reason = "Debug quotes and escapes the paths, which is what TOML wants"
    )]
    let extra_config = format!(
        "image_transfer_ports = [80, {AGENT_PORT}]\n[splicer]\ncache_bytes = {}\nfetch_deadline_ms = 3000\n[splicer.http]\nports = [80]\norigins = [\"{lib}:80\"]\nauthority = {lib_name:?}\n[cost]\ntopology = {topo:?}\n[planner]\n[indexer]\nconfig = {rack1_ix:?}\n",
        1u64 << 30
    );
    let (mbps, library) = measure(&mut lab, &extra_config, &data, rounds)?;
    report(&mbps, &library, rounds);
    drop(nginx);
    drop(fabric);
    Ok(())
}

/// Every round: each configuration with each tool. Returns MB/s per
/// `[config][tool]` and round, and the library's bytes of the last round.
#[expect(
    clippy::type_complexity,
    reason = "two tables indexed alike, used once"
)]
fn measure(
    lab: &mut Lab,
    extra_config: &str,
    data: &[u8],
    rounds: usize,
) -> Result<(Vec<Vec<Vec<f64>>>, Vec<Vec<u64>>)> {
    let out = lab.dir.path().join("copy.raw");
    // [config][tool] = MB/s per round; library bytes of the last round.
    let mut mbps = vec![vec![Vec::new(); TOOLS.len()]; Config::ALL.len()];
    let mut library = vec![vec![0u64; TOOLS.len()]; Config::ALL.len()];
    let lib = lab.addr4(lab.library());
    let start = |lab: &mut Lab| -> Result<()> {
        lab.start_appliance(
            "rack1",
            ApplianceOptions {
                steer: true,
                extra_config: extra_config.to_string(),
            },
        )
    };
    for round in 0..rounds {
        for (ci, cfg) in Config::ALL.into_iter().enumerate() {
            for (ti, tool) in TOOLS.into_iter().enumerate() {
                let running = lab.appliance_pid("rack1").is_some();
                match cfg {
                    Config::Direct if running => {
                        lab.stop_appliance("rack1", Duration::from_secs(20))?;
                    }
                    Config::PassThrough | Config::Warm if !running => start(lab)?,
                    Config::Cold => {
                        // An empty cache for every cold copy.
                        if running {
                            lab.stop_appliance("rack1", Duration::from_secs(20))?;
                        }
                        start(lab)?;
                    }
                    _ => {}
                }
                let url = format!("http://{lib}{}", cfg.path());
                if cfg == Config::Warm {
                    copy(lab, "curl", &url, &out)?;
                }
                let before = library_bytes(lab, cfg)?;
                let took = copy(lab, tool, &url, &out)?;
                let copied = std::fs::read(&out)?;
                if copied != data {
                    bail!("{cfg:?} {tool}: the copy differs from the image");
                }
                std::fs::remove_file(&out)?;
                library[ci][ti] = library_bytes(lab, cfg)?.saturating_sub(before);
                mbps[ci][ti].push(data.len() as f64 / 1e6 / took.as_secs_f64());
                if cfg != Config::Direct {
                    let s = lab.status("rack1")?.splicer;
                    if s.http.requests == 0 {
                        bail!("{cfg:?} {tool}: nothing reached the HTTP front end");
                    }
                    if matches!(cfg, Config::Cold | Config::Warm) && s.http.served == 0 {
                        bail!(
                            "{cfg:?} {tool}: nothing was served from blocks: {:?}",
                            s.http
                        );
                    }
                }
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    if lab.appliance_pid("rack1").is_some() {
        lab.stop_appliance("rack1", Duration::from_secs(20))?;
    }
    Ok((mbps, library))
}

/// Copy `url` to `out` from hv1 with `tool`; how long it took.
fn copy(lab: &Lab, tool: &str, url: &str, out: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let o = match tool {
        "curl" => lab.exec(
            "hv1",
            &[
                "curl",
                "-sS",
                "--max-time",
                "300",
                "-o",
                out.to_str().context("path")?,
                url,
            ],
        )?,
        _ => lab.qemu_convert("hv1", url, out)?,
    };
    let elapsed = t0.elapsed();
    if !o.status.success() {
        bail!("{tool} {url}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(elapsed)
}

/// Bytes the library sent through rack1's upstream port so far (0 for direct:
/// no appliance counts them).
fn library_bytes(lab: &Lab, cfg: Config) -> Result<u64> {
    if cfg == Config::Direct || lab.appliance_pid("rack1").is_none() {
        return Ok(0);
    }
    Ok(lab.library_link_flows()?.values().sum())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

fn report(mbps: &[Vec<Vec<f64>>], library: &[Vec<u64>], rounds: usize) {
    println!(
        "bench http (2-core machine, hv1 → rack1 → core → library, nginx, {IMAGE_MIB} MiB image without zero blocks, median of {rounds} copies)"
    );
    for (ti, tool) in TOOLS.into_iter().enumerate() {
        let direct = median(&mbps[0][ti]);
        println!(
            "  {tool}: {:<44} {:>22} {:>7} {:>16}",
            "configuration", "MB/s (min–max)", "ratio", "library bytes*"
        );
        for (ci, cfg) in Config::ALL.into_iter().enumerate() {
            let v = &mbps[ci][ti];
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let m = median(v);
            println!(
                "  {tool}: {:<44} {:>22} {:>7.3} {:>16}",
                cfg.label(),
                format!("{m:.0} ({min:.0}–{max:.0})"),
                m / direct,
                if cfg == Config::Direct {
                    "n/a".to_string()
                } else {
                    library[ci][ti].to_string()
                }
            );
        }
    }
    println!("  * bytes the library sent (HTTP and its agent's block service) during the last round's copy (BPF flow counters on rack1's upstream port)");
    println!("  raw samples (MB/s) [config][tool]: {mbps:?}");
}
