//! A datacenter lab for the demo and the fan-out bench: the library, core and
//! three racks of three hypervisors (`FANOUT_TOPOLOGY`: the library's uplink
//! shaped to 1 Gbit/s, the racks' to 2 Gbit/s), core's appliance running the
//! global indexer, the manager and the console, an indexer per rack, an agent
//! per hypervisor with the plain hook, the library's agent. Plus what both
//! measure: the manager's CLI, jobs followed to their end, and the bytes each
//! topology link carried (kernel interface counters, sampled).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{fabric::Fabric, toml_path, ApplianceOptions, Lab, LunSpec, FANOUT_TOPOLOGY};

/// The hypervisors, `hv1`..`hv9`, three a rack.
pub const HOSTS: usize = 9;

/// The rack of hypervisor `hvN`.
pub fn rack_of(n: usize) -> String {
    format!("rack{}", (n - 1) / 3 + 1)
}

pub struct Datacenter {
    pub lab: Lab,
    pub fabric: Fabric,
    /// The library's target: its LUNs are the images, `IQN/1`, `IQN/2`, …
    pub iqn: String,
}

impl Datacenter {
    /// The lab with `images` as the library's LUNs 1.., every service started
    /// (`manager_lines` in core's `[manager]`; `hosts_metrics(n)`: hvN's pinned
    /// CPU and memory load), and every image indexed and every agent reporting.
    pub fn start(
        iqn: &str,
        images: &[PathBuf],
        ports: (u16, u16),
        manager_lines: &str,
        host_metrics: impl Fn(usize) -> (f64, f64),
    ) -> Result<Self> {
        let mut dc = Self::new(iqn, images, ports, manager_lines)?;
        dc.start_hosts(images.len(), host_metrics)?;
        Ok(dc)
    }

    /// The lab, its LUNs, core's appliance and the racks' indexers; no agent
    /// yet (VMs the hosts hold at their agents' first scan go in
    /// [`Self::vm_dir`] before [`Self::start_hosts`]).
    pub fn new(
        iqn: &str,
        images: &[PathBuf],
        ports: (u16, u16),
        manager_lines: &str,
    ) -> Result<Self> {
        let lab = Lab::new(FANOUT_TOPOLOGY)?;
        let topo = lab.write_file("topology.toml", FANOUT_TOPOLOGY.as_bytes())?;
        let fabric = Fabric::new(&lab, ports.0, ports.1)?;
        let mut dc = Self {
            lab,
            fabric,
            iqn: iqn.to_owned(),
        };
        for (i, path) in images.iter().enumerate() {
            dc.lab.add_lun(LunSpec {
                lun: u32::try_from(i + 1)?,
                ..LunSpec::read_only(iqn, path.clone())
            })?;
        }
        // core: monitor-only (counts nearblock and direct copies alike), the
        // global indexer, the manager and its console.
        let ix = dc.fabric.indexer_config(&dc.lab, "core", None)?;
        let extra_config = format!(
            "[cost]\ntopology = {}\n[planner]\n[manager]\ndb = {}\n{manager_lines}\n[indexer]\nconfig = {}\n",
            toml_path(&topo),
            toml_path(&dc.lab.dir.path().join("manager.redb")),
            toml_path(&ix),
        );
        dc.lab.start_appliance(
            "core",
            ApplianceOptions {
                steer: false,
                extra_config,
            },
        )?;
        for rack in ["rack1", "rack2", "rack3"] {
            dc.fabric.start_indexer(&dc.lab, rack, Some("core"))?;
        }
        for n in 1..=HOSTS {
            std::fs::create_dir_all(dc.vm_dir(&format!("hv{n}")))?;
        }
        Ok(dc)
    }

    /// The hypervisors' agents and the library's; waits until the library's
    /// `images` images are indexed and every agent reports.
    pub fn start_hosts(
        &mut self,
        images: usize,
        host_metrics: impl Fn(usize) -> (f64, f64),
    ) -> Result<()> {
        let dc = self;
        for n in 1..=HOSTS {
            let hv = format!("hv{n}");
            let vm_dir = dc.vm_dir(&hv);
            dc.fabric.start_hypervisor(
                &dc.lab,
                &hv,
                &rack_of(n),
                &vm_dir,
                "core",
                host_metrics(n),
                1 << 40,
            )?;
        }
        dc.fabric.start_library_agent(&dc.lab, "core")?;
        dc.wait_inventory(Duration::from_mins(10), |inv| {
            let listed = inv["images"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|i| i["host"] == "library").count());
            let hosts = inv["hosts"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|h| h["reporting"] == true).count());
            listed >= images && hosts == HOSTS
        })?;
        Ok(())
    }

    pub fn vm_dir(&self, hv: &str) -> PathBuf {
        self.lab.dir.path().join(format!("vms-{hv}"))
    }

    /// The library's image `lun` as the index names it.
    pub fn image(&self, lun: usize) -> String {
        format!("{}/{lun}", self.iqn)
    }

    /// `nearblock vm ARGS…` in core with the admin token: stdout.
    pub fn vm_cli(&self, words: &[&str]) -> Result<String> {
        let bin = crate::nearblock_bin()?;
        let token = self.lab.api_admin_token_file().display().to_string();
        let mut argv = vec![bin.to_str().context("path")?, "vm", "--token-file", &token];
        argv.extend_from_slice(words);
        let o = self.lab.exec("core", &argv)?;
        if !o.status.success() {
            bail!("vm {words:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `nearblock vm ARGS… --json`, parsed.
    pub fn vm_json(&self, words: &[&str]) -> Result<Value> {
        let mut words = words.to_vec();
        words.push("--json");
        Ok(serde_json::from_str(&self.vm_cli(&words)?)?)
    }

    /// Waits (at most `limit`) until the inventory satisfies `done`.
    pub fn wait_inventory(&self, limit: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let inv = self.vm_json(&["list"])?;
            if done(&inv) {
                return Ok(inv);
            }
            if Instant::now() > deadline {
                bail!("the inventory did not get there within {limit:?}: {inv:#}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Places `image` as `name` (`args`: more `vm place` options): the job id.
    pub fn place(&self, image: &str, name: &str, args: &[&str]) -> Result<u64> {
        let mut words = vec!["place", image, "--name", name];
        words.extend_from_slice(args);
        self.vm_json(&words)?["id"].as_u64().context("job id")
    }

    pub fn job(&self, id: u64) -> Result<Value> {
        self.vm_json(&["job", &id.to_string()])
    }

    /// Follows the jobs (at most 30 min) until every one ended, calling
    /// `tick` with their latest state twice a second; fails unless all are
    /// done.
    pub fn wait_jobs(
        &self,
        ids: &[u64],
        mut tick: impl FnMut(&[Value]) -> Result<()>,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_mins(30);
        loop {
            let jobs: Vec<Value> = ids.iter().map(|&id| self.job(id)).collect::<Result<_>>()?;
            tick(&jobs)?;
            let open = jobs
                .iter()
                .filter(|j| !matches!(j["state"].as_str(), Some("done" | "failed" | "cancelled")))
                .count();
            if open == 0 {
                if let Some(bad) = jobs.iter().find(|j| j["state"] != "done") {
                    bail!("a job did not end done: {bad:#}");
                }
                return Ok(jobs);
            }
            if Instant::now() > deadline {
                bail!("{open} jobs still running after 30 min");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The naive way: a `qemu-img convert` of each (name, LUN, host) at once,
    /// each on its host into `dir`, sampling the links meanwhile (at most 30
    /// min); fails if a copy fails.
    pub fn copy_luns(
        &self,
        vms: &[(String, usize, String)],
        dir: &Path,
        samples: &mut LinkSamples,
        start: Instant,
    ) -> Result<()> {
        let (qemu, modules) = crate::qemu_img()?;
        let mut copies = Vec::new();
        for (name, lun, host) in vms {
            let url = self.lab.lun_url(&self.iqn, u32::try_from(*lun)?);
            let child = self
                .lab
                .cmd(
                    host,
                    &[qemu.to_str().context("path")?, "convert", "-O", "raw", &url],
                )
                .arg(dir.join(format!("{name}.raw")))
                .env("QEMU_MODULE_DIR", &modules)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            copies.push((name.clone(), child));
        }
        let deadline = Instant::now() + Duration::from_mins(30);
        while copies
            .iter_mut()
            .any(|(_, c)| c.try_wait().ok().flatten().is_none())
        {
            if Instant::now() > deadline {
                bail!("qemu-img copies still running after 30 min");
            }
            samples.take(&self.lab, start)?;
            std::thread::sleep(Duration::from_millis(500));
        }
        samples.take(&self.lab, start)?;
        for (name, c) in &mut copies {
            let st = c.wait()?;
            if !st.success() {
                bail!("qemu-img for {name} failed: {st}");
            }
        }
        Ok(())
    }

    /// `path`'s bytes equal `want`'s.
    pub fn same_file(path: &Path, want: &Path) -> Result<bool> {
        Ok(std::fs::read(path)? == std::fs::read(want)?)
    }
}

/// Bytes each topology link carried (both directions), by link name `a-b`,
/// from the kernel counters of the interface at its `a` end: one command per
/// node.
pub fn link_bytes(lab: &Lab) -> Result<BTreeMap<String, u64>> {
    let mut by_node: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for l in &lab.topology.links {
        if !by_node.contains_key(l.a.as_str()) {
            let o = lab.exec_ok(
                &l.a,
                &[
                    "sh",
                    "-c",
                    "for d in /sys/class/net/*; do echo \"${d##*/} $(cat $d/statistics/rx_bytes) $(cat $d/statistics/tx_bytes)\"; done",
                ],
            )?;
            let counters = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|line| {
                    let mut w = line.split_whitespace();
                    let iface = w.next()?.to_owned();
                    let rx: u64 = w.next()?.parse().ok()?;
                    let tx: u64 = w.next()?.parse().ok()?;
                    Some((iface, rx + tx))
                })
                .collect();
            by_node.insert(&l.a, counters);
        }
        let iface = &lab.port_toward(&l.a, &l.b).context("port")?.iface;
        let bytes = by_node[l.a.as_str()]
            .get(iface)
            .copied()
            .with_context(|| format!("{}'s {iface}", l.a))?;
        out.insert(format!("{}-{}", l.a, l.b), bytes);
    }
    Ok(out)
}

/// Samples of [`link_bytes`] over a run: totals and peak rates per link.
#[derive(Default)]
pub struct LinkSamples(Vec<(f64, BTreeMap<String, u64>)>);

impl LinkSamples {
    pub fn take(&mut self, lab: &Lab, start: Instant) -> Result<()> {
        let (at, bytes) = crate::vmlab::stamped(start, || link_bytes(lab));
        self.0.push((at, bytes?));
        Ok(())
    }

    /// Per link: bytes over the samples, and the peak rate (Mbit/s) over any
    /// window of at least 1 s between samples.
    pub fn summary(&self) -> BTreeMap<String, (u64, f64)> {
        let mut out = BTreeMap::new();
        let Some((_, first)) = self.0.first() else {
            return out;
        };
        for link in first.keys() {
            let series: Vec<(f64, u64)> = self.0.iter().map(|(t, m)| (*t, m[link])).collect();
            let total = series.last().map_or(0, |l| l.1) - series[0].1;
            let mut peak = 0.0f64;
            for (i, &(t0, b0)) in series.iter().enumerate() {
                if let Some(&(t1, b1)) = series[i..].iter().find(|(t, _)| *t - t0 >= 1.0) {
                    peak = peak.max((b1 - b0) as f64 * 8.0 / (t1 - t0) / 1e6);
                }
            }
            out.insert(link.clone(), (total, peak));
        }
        out
    }
}
