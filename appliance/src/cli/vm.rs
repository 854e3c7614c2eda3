//! `nearblock vm`: the manager's inventory and place-and-build jobs, over the
//! daemon's `/api/v1` (the appliance that runs `[manager]`).
//!
//! - `vm list`: library images, hosts and their VMs.
//! - `vm targets IMAGE [--mode …] [--weighting …]`: the hypervisors ranked
//!   for IMAGE now (nothing is built).
//! - `vm place IMAGE --name NAME [--policy …] [--target HOST] [--mode …]
//!   [--watch]`: create a job; `--watch` follows it with a progress bar.
//! - `vm job ID [--watch]`, `vm jobs`, `vm cancel ID`.
//! - `vm set HOST NAME start|pause|resume|retire`.

use std::{io::Write, net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::status::{api_get, api_post, TokenArgs};
use crate::{
    config,
    manage::{inventory::Inventory, Job, JobState},
};

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The manager's API address.
    #[arg(long, default_value_t = config::default_api_listen(), global = true)]
    pub api: SocketAddr,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Library images, hypervisors and their VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// The hypervisors ranked for IMAGE, as a placement would rank them now.
    Targets(TargetsArgs),
    /// Place IMAGE as a new VM and build it (needs an admin token).
    Place(PlaceArgs),
    /// Show a job (`--watch`: follow it to the end).
    Job {
        id: u64,
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every job: id, kind, state, VM (`--json`: as the API gives them).
    Jobs {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job (needs an admin token).
    Cancel { id: u64 },
    /// Start, pause, resume or retire a VM (needs an admin token); retire
    /// removes it and its disk.
    Set {
        /// The VM's host.
        host: String,
        /// The VM's name.
        name: String,
        /// start | pause | resume | retire, or prestage (a job that keeps the
        /// VM's unique blocks pinned at its top targets' rack caches)
        action: String,
    },
}

#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// The library image (as `vm list` names it).
    pub image: String,
    /// best | top:X:METRIC | within:P%:METRIC.
    #[arg(long, default_value = "best")]
    pub policy: String,
    /// agent or transparent.
    #[arg(long, default_value = "agent")]
    pub mode: String,
    /// usage | none (default: usage for transparent with a history).
    #[arg(long)]
    pub weighting: Option<String>,
    /// Only these hosts or racks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub within: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// The library image (as `vm list` names it).
    pub image: String,
    /// The new VM's name.
    #[arg(long)]
    pub name: String,
    /// best | top:X:METRIC | within:P%:METRIC (METRIC: cpu, mem, disk).
    #[arg(long, default_value = "best")]
    pub policy: String,
    /// Build on this host instead of the policy's choice.
    #[arg(long)]
    pub target: Option<String>,
    /// agent (all at once) or transparent (on demand).
    #[arg(long, default_value = "agent")]
    pub mode: String,
    /// Only these hosts or racks are candidates (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub within: Vec<String>,
    /// usage | none: price blocks by their read probability (default: usage
    /// for transparent when the image has an access history).
    #[arg(long)]
    pub weighting: Option<String>,
    /// Follow the job to its end with a progress bar.
    #[arg(long)]
    pub watch: bool,
    #[arg(long)]
    pub json: bool,
}

/// A path segment with everything but ASCII letters and digits
/// percent-encoded (image names hold `/` and `:`).
pub fn path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn run(args: &VmArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let token = args.token.path();
    let token = token.as_deref();
    match &args.command {
        VmCommand::List { json } => {
            let body = api_get(args.api, "/api/v1/vms", token)?;
            if *json {
                writeln!(out, "{body}")?;
                return Ok(());
            }
            let inv: Inventory = serde_json::from_str(&body).context("parsing the inventory")?;
            print_inventory(&inv, out)
        }
        VmCommand::Targets(t) => targets(args.api, token, t, out),
        VmCommand::Place(p) => {
            let body = serde_json::json!({
                "name": p.name, "policy": p.policy, "mode": p.mode,
                "target": p.target, "within": p.within, "weighting": p.weighting,
            });
            let path = format!("/api/v1/vms/{}/place", path_segment(&p.image));
            let reply = api_post(args.api, &path, token, &body)?;
            let job: Job = serde_json::from_str(&reply).context("parsing the job")?;
            if p.watch {
                return watch(args.api, token, job.id, p.json, out);
            }
            if p.json {
                writeln!(out, "{reply}")?;
            } else {
                writeln!(
                    out,
                    "job {} created: place {} as {}",
                    job.id, p.image, p.name
                )?;
            }
            Ok(())
        }
        VmCommand::Job { id, watch: w, json } => {
            if *w {
                return watch(args.api, token, *id, *json, out);
            }
            let body = api_get(args.api, &format!("/api/v1/jobs/{id}"), token)?;
            if *json {
                writeln!(out, "{body}")?;
                return Ok(());
            }
            let job: Job = serde_json::from_str(&body).context("parsing the job")?;
            print_job(&job, out)
        }
        VmCommand::Jobs { json } => {
            let body = api_get(args.api, "/api/v1/jobs", token)?;
            if *json {
                writeln!(out, "{body}")?;
                return Ok(());
            }
            let jobs: Vec<Job> = serde_json::from_str(&body).context("parsing the jobs")?;
            for j in &jobs {
                writeln!(
                    out,
                    "{:>6} {:<9} {:<10} {} ({})",
                    j.id,
                    format!("{:?}", j.kind).to_lowercase(),
                    format!("{:?}", j.state).to_lowercase(),
                    j.spec.name,
                    j.spec.image
                )?;
            }
            Ok(())
        }
        VmCommand::Set { host, name, action } => {
            let path = format!(
                "/api/v1/hosts/{}/vms/{}/{}",
                path_segment(host),
                path_segment(name),
                path_segment(action)
            );
            let body = api_post(args.api, &path, token, &serde_json::Value::Null)?;
            let job: Option<serde_json::Value> = serde_json::from_str(&body).ok();
            match job
                .as_ref()
                .and_then(|j| j.get("id"))
                .and_then(serde_json::Value::as_u64)
            {
                Some(id) => writeln!(out, "{host}/{name}: {action} (job {id})")?,
                None => writeln!(out, "{host}/{name}: {action}")?,
            }
            Ok(())
        }
        VmCommand::Cancel { id } => {
            let body = api_post(
                args.api,
                &format!("/api/v1/jobs/{id}/cancel"),
                token,
                &serde_json::Value::Null,
            )?;
            let job: Job = serde_json::from_str(&body).context("parsing the job")?;
            writeln!(out, "job {} cancel requested (was {:?})", job.id, job.state)?;
            Ok(())
        }
    }
}

/// `vm targets`: the ranking the manager would make now.
fn targets(
    api: SocketAddr,
    token: Option<&std::path::Path>,
    t: &TargetsArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut query = vec![
        format!("policy={}", path_segment(&t.policy)),
        format!("mode={}", path_segment(&t.mode)),
    ];
    if let Some(w) = &t.weighting {
        query.push(format!("weighting={}", path_segment(w)));
    }
    if !t.within.is_empty() {
        query.push(format!("within={}", path_segment(&t.within.join(","))));
    }
    let path = format!(
        "/api/v1/vms/{}/targets?{}",
        path_segment(&t.image),
        query.join("&")
    );
    let body = api_get(api, &path, token)?;
    if t.json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing the targets")?;
    writeln!(
        out,
        "{} ({}, weighting {}):",
        t.image,
        t.mode,
        v["weighting"].as_str().unwrap_or("?")
    )?;
    for n in v["notes"].as_array().into_iter().flatten() {
        writeln!(out, "  {}", n.as_str().unwrap_or_default())?;
    }
    let chosen = v["placement"]["chosen"].as_str();
    for c in v["placement"]["candidates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let host = c["host"].as_str().unwrap_or_default();
        let cost = c["total_cost"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |k| format!("{k:.1}"));
        let mark = if Some(host) == chosen { "*" } else { " " };
        writeln!(
            out,
            "{mark} {host:12} cost {cost:>14}  local {}  fetched {}",
            c["blocks_local"], c["blocks_fetched"]
        )?;
    }
    Ok(())
}

/// Polls the job every 250 ms (bounded by the job ending), printing its new
/// events and a progress bar; an error when it does not end `done`.
fn watch(
    api: SocketAddr,
    token: Option<&std::path::Path>,
    id: u64,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:40}] {pos}/{len} blocks {binary_bytes_per_sec}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut seen = 0;
    let job = loop {
        let body = api_get(api, &format!("/api/v1/jobs/{id}"), token)?;
        let job: Job = serde_json::from_str(&body).context("parsing the job")?;
        for e in job.events.iter().skip(seen) {
            bar.println(format!("job {id}: {}", e.message));
        }
        seen = job.events.len();
        bar.set_length(job.progress.blocks_total);
        bar.set_position(job.progress.blocks_done);
        bar.set_message(format!("{:?}", job.state).to_lowercase());
        if job.state.is_final() {
            bar.finish_and_clear();
            break job;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if json {
        writeln!(out, "{}", serde_json::to_string(&job)?)?;
    } else {
        print_job(&job, out)?;
    }
    match job.state {
        JobState::Done => Ok(()),
        s => bail!(
            "job {id} ended {s:?}: {}",
            job.error.as_deref().unwrap_or("see its events")
        ),
    }
}

fn print_job(job: &Job, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "job {}: place {} as {} ({}, {:?}): {:?}",
        job.id, job.spec.image, job.spec.name, job.spec.policy, job.spec.mode, job.state
    )?;
    if let Some(p) = &job.placement {
        writeln!(out, "  chosen: {}", p.chosen.as_deref().unwrap_or("-"))?;
        for c in &p.candidates {
            writeln!(
                out,
                "    {:10} cost {:>12} fetch {:>8} local {:>8} cpu {:>5} mem {:>5}",
                c.host,
                c.total_cost.map_or("-".into(), |k| format!("{k:.0}")),
                c.blocks_fetched.map_or("-".into(), |k| k.to_string()),
                c.blocks_local.map_or("-".into(), |k| k.to_string()),
                c.cpu.map_or("-".into(), |k| format!("{k:.2}")),
                c.mem.map_or("-".into(), |k| format!("{k:.2}")),
            )?;
        }
    }
    let p = &job.progress;
    writeln!(
        out,
        "  blocks {}/{}, {} bytes written",
        p.blocks_done, p.blocks_total, p.bytes_written
    )?;
    for (class, bytes) in &p.by_class {
        writeln!(out, "    from {class:10} {bytes:>14} bytes")?;
    }
    for (link, bytes) in &p.by_link {
        writeln!(out, "    over {link:20} {bytes:>14} bytes")?;
    }
    if let Some(ms) = job.indexed_after_ms {
        writeln!(out, "  indexed {ms} ms after the build")?;
    }
    if let Some(e) = &job.error {
        writeln!(out, "  error: {e}")?;
    }
    Ok(())
}

fn print_inventory(inv: &Inventory, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "images:")?;
    for i in &inv.images {
        writeln!(
            out,
            "  {:50} on {:10} {:>14} bytes, {} blocks of {} ({} zero)",
            i.image, i.host, i.size, i.blocks, i.block_size, i.zero_blocks
        )?;
    }
    writeln!(out, "hosts:")?;
    for h in &inv.hosts {
        writeln!(
            out,
            "  {:10} rack {:8} {} cpu {:>5} mem {:>5} free disk {:>14} VMs {}",
            h.host,
            h.rack.as_deref().unwrap_or("-"),
            if h.reporting {
                "reporting"
            } else {
                "silent   "
            },
            h.cpu.map_or("-".into(), |k| format!("{k:.2}")),
            h.mem.map_or("-".into(), |k| format!("{k:.2}")),
            h.resources
                .disk_free_bytes
                .map_or("-".into(), |k| k.to_string()),
            h.vms
        )?;
    }
    writeln!(out, "vms:")?;
    for v in &inv.vms {
        writeln!(
            out,
            "  {:16} on {:10} {:8} {:>14} bytes from {:40} held elsewhere {}",
            v.name,
            v.host,
            format!("{:?}", v.state).to_lowercase(),
            v.size,
            v.image.as_deref().unwrap_or("?"),
            v.held_elsewhere
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_one_path_segment() {
        assert_eq!(
            path_segment("iqn.2026-11.test:lib/1"),
            "iqn%2E2026%2D11%2Etest%3Alib%2F1"
        );
        assert_eq!(path_segment("a b"), "a%20b");
    }
}
