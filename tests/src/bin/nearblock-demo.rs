//! `cargo xtask demo`: what nearblock is for, on 3 racks × 3 hypervisors
//! (`library ─ core ─ rack1..3 ─ hv1..hv9`; the library's uplink shaped to
//! 1 Gbit/s, the racks' to 2 Gbit/s). Core's appliance runs the global index,
//! the manager and the console; every hypervisor runs an agent. Images b and c
//! are the library's LUNs: corpus images (real, similar Debian images) when the
//! corpus is built, generated stand-ins otherwise, small generated ones with
//! `--quick`. VM `web-b` (a copy of b) runs on hv1, its disk served by
//! qemu-storage-daemon and written by a guest workload.
//!
//! 1. The inventory; the ranked placement of image c under two policies.
//! 2. The placement and build of c (a progress bar; bytes by source and link).
//! 3. Eight placements at once, across the racks.
//! 4. The migration of the running `web-b` to another rack.
//! 5. The builds of 2 and 3 done the naive way (each a `qemu-img convert` of
//!    the library's LUN on its host), measured in the same run; the ratios.
//!
//! It writes `report.md` and `links.svg` (bytes per link, nearblock against
//! naive) into `$NEARBLOCK_ARTIFACTS/demo` (default
//! `/var/cache/nearblock/artifacts/demo`). With `--hold` it keeps the lab up,
//! forwards `127.0.0.1:7878` on this machine to the console and waits for
//! Ctrl-C; the lab is removed at the end either way.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock_lab::{
    content,
    datacenter::{Datacenter, LinkSamples},
    vmlab,
};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.demo.nearblock:library";
const PORTS: (u16, u16) = (7380, 7381);
/// The eight concurrent placements: (name, image LUN, rack).
const EIGHT: [(&str, usize, &str); 8] = [
    ("app-1", 2, "rack1"),
    ("app-2", 1, "rack2"),
    ("app-3", 2, "rack3"),
    ("app-4", 1, "rack1"),
    ("app-5", 2, "rack2"),
    ("app-6", 1, "rack3"),
    ("app-7", 2, "rack2"),
    ("app-8", 1, "rack3"),
];

struct Args {
    quick: bool,
    hold: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        hold: false,
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--hold" => a.hold = true,
            other => bail!("unknown argument {other:?} (--quick, --hold)"),
        }
    }
    Ok(a)
}

fn out_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_ARTIFACTS")
        .map_or_else(|| "/var/cache/nearblock/artifacts".into(), PathBuf::from)
        .join("demo")
}

/// Images b and c and how they were made. c shares most of b's blocks.
fn images(quick: bool, scratch: &Path) -> Result<(Vec<PathBuf>, String)> {
    let corpus = std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from)
        .join("images");
    let real = [
        corpus.join("b-bookworm-cloud.raw"),
        corpus.join("c-bookworm-cloud-python.raw"),
    ];
    if !quick && real.iter().all(|p| p.exists()) {
        return Ok((
            real.to_vec(),
            "corpus images b (Debian 12 cloud) and c (b plus Python), 1 GiB each".into(),
        ));
    }
    let size = if quick { 32 << 20 } else { 256 << 20 };
    let b = content::image(size, 2026, 40);
    // c: b with one block in ten rewritten (a derived image).
    let mut c = b.clone();
    let fresh = content::image(size, 2027, 0);
    for (i, block) in c.chunks_mut(4096).enumerate() {
        if i % 10 == 3 {
            block.copy_from_slice(&fresh[i * 4096..(i + 1) * 4096]);
        }
    }
    let (pb, pc) = (scratch.join("b.raw"), scratch.join("c.raw"));
    std::fs::write(&pb, &b)?;
    std::fs::write(&pc, &c)?;
    Ok((
        vec![pb, pc],
        format!(
            "generated stand-ins: b ({} MiB, 40% zero blocks) and c (b with one block in ten rewritten){}",
            size >> 20,
            if quick { "" } else { "; build the corpus for real images" }
        ),
    ))
}

/// hvN's pinned load (CPU, memory): uneven, so policies differ.
fn load(n: usize) -> (f64, f64) {
    const CPU: [f64; 9] = [0.85, 0.20, 0.55, 0.35, 0.75, 0.15, 0.60, 0.30, 0.45];
    const MEM: [f64; 9] = [0.40, 0.70, 0.30, 0.50, 0.20, 0.60, 0.35, 0.25, 0.55];
    (CPU[n - 1], MEM[n - 1])
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

/// The demo's story, printed as it goes and kept for the report.
#[derive(Default)]
struct Story(String);

impl Story {
    fn say(&mut self, text: &str) {
        println!("{text}");
        self.0.push_str(text);
        self.0.push('\n');
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the story, step by step, as the module doc tells it"
)]
fn main() -> Result<()> {
    let args = args()?;
    let started = Instant::now();
    let scratch = tempdir()?;
    let (images, label) = images(args.quick, scratch.path())?;
    let mut story = Story::default();
    story.say("# nearblock demo\n");
    story.say(&format!(
        "3 racks × 3 hypervisors; the library's uplink shaped to 1 Gbit/s, the racks' to 2 Gbit/s. Images: {label}.\n"
    ));
    let mut dc = Datacenter::new(
        IQN,
        &images,
        PORTS,
        "index_wait_secs = 600\nretire_grace_secs = 2\nmigrate_final_mib = 4",
    )?;
    // web-b runs on hv1: its disk (a copy of b) served by qemu-storage-daemon,
    // written by its guest (a 4096th of the disk a second, at least 64 KiB:
    // the blocks it rewrites are no longer b's, so the index only learns them
    // at the agent's next scan or, in the migration, the next round).
    let mut children = vmlab::Children::default();
    let web_b = dc.vm_dir("hv1").join("web-b.raw");
    vmlab::sparse_copy(&images[0], &web_b)?;
    let size = std::fs::metadata(&images[0])?.len();
    let served = vmlab::serve_disk(dc.lab.dir.path(), "web-b", &web_b, &mut children)?;
    let workload = std::env::current_exe()?.with_file_name("vm-workload");
    let pid = vmlab::Workload {
        rate: (size / 4096).max(64 << 10),
        write: 64 << 10,
        seed: 11,
    }
    .start(
        &workload,
        &served,
        size,
        &dc.lab.dir.path().join("web-b.workload.json"),
        &mut children,
    )?;
    vmlab::write_vm_files(
        &dc.vm_dir("hv1"),
        "web-b",
        &dc.image(1),
        size,
        Some(pid),
        Some(&served),
    )?;
    dc.start_hosts(images.len(), load)?;
    dc.wait_inventory(Duration::from_mins(5), |inv| {
        inv["vms"].as_array().is_some_and(|v| {
            v.iter()
                .any(|v| v["name"] == "web-b" && v["indexed"] == true)
        })
    })?;
    story.say(&format!(
        "lab ready in {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));

    // 1. The inventory and the ranking.
    let inv = dc.vm_json(&["list"])?;
    inventory(&mut story, &inv);
    let c = dc.image(2);
    for policy in ["best", "top:3:cpu"] {
        let t = dc.vm_json(&["targets", &c, "--policy", policy])?;
        ranking(&mut story, &c, policy, &t);
    }

    // 2. Place and build c.
    story.say("\n## 2. Place and build c (policy best)\n");
    let mut near = LinkSamples::default();
    let t0 = Instant::now();
    near.take(&dc.lab, t0)?;
    let id = dc.place(&c, "app-c", &["--policy", "best"])?;
    let jobs = dc.wait_jobs(&[id], |jobs| {
        progress(&jobs[0]);
        near.take(&dc.lab, t0)
    })?;
    let c_secs = t0.elapsed().as_secs_f64();
    println!();
    job_summary(&mut story, &jobs[0], c_secs);
    let c_host = jobs[0]["plan"]["target"]
        .as_str()
        .context("target")?
        .to_owned();

    // 3. Eight at once.
    story.say("\n## 3. Eight placements at once, across the racks\n");
    let t1 = Instant::now();
    let mut ids = Vec::new();
    for (name, lun, rack) in EIGHT {
        ids.push(dc.place(
            &dc.image(lun),
            name,
            &["--policy", "top:2:cpu", "--within", rack],
        )?);
    }
    let eight = dc.wait_jobs(&ids, |jobs| {
        let done = jobs.iter().filter(|j| j["state"] == "done").count();
        print!("\r  {done}/8 done");
        let _ = std::io::stdout().flush();
        near.take(&dc.lab, t0)
    })?;
    let eight_secs = t1.elapsed().as_secs_f64();
    let near_secs = t0.elapsed().as_secs_f64();
    near.take(&dc.lab, t0)?;
    println!();
    story.say("| VM | image | host | by source class | time |");
    story.say("| --- | --- | --- | --- | --- |");
    for j in &eight {
        story.say(&format!(
            "| {} | {} | {} | {} | {:.1} s |",
            j["spec"]["name"].as_str().unwrap_or(""),
            if j["spec"]["image"] == c.as_str() {
                "c"
            } else {
                "b"
            },
            j["plan"]["target"].as_str().unwrap_or(""),
            classes(&j["progress"]["by_class"]),
            (j["updated_ms"].as_u64().unwrap_or(0) - j["created_ms"].as_u64().unwrap_or(0)) as f64
                / 1000.0
        ));
    }
    story.say(&format!("\nall eight done in {eight_secs:.1} s"));
    // Every built disk is its image, byte for byte.
    for j in jobs.iter().chain(&eight) {
        let (name, host) = (
            j["spec"]["name"].as_str().context("name")?,
            j["plan"]["target"].as_str().context("host")?,
        );
        let lun = usize::from(j["spec"]["image"] == c.as_str());
        if !Datacenter::same_file(&dc.vm_dir(host).join(format!("{name}.raw")), &images[lun])? {
            bail!("{name} on {host} is not its image");
        }
    }
    story.say("every built disk compared byte for byte with its image: identical");

    // 4. Migrate the running web-b.
    story.say("\n## 4. Migrate the running VM web-b (hv1) to rack3\n");
    let id = dc.place("vm/web-b", "web-b", &["--within", "rack3"])?;
    let mig = dc.wait_jobs(&[id], |jobs| {
        progress(&jobs[0]);
        Ok(())
    })?;
    println!();
    migration(&mut story, &mig[0]);

    // 5. The same builds, naively.
    story.say("\n## 5. The same nine builds the naive way (qemu-img convert of the library's LUN on each host)\n");
    let mut naive = LinkSamples::default();
    let t2 = Instant::now();
    naive.take(&dc.lab, t2)?;
    let direct = dc.lab.dir.path().join("naive");
    std::fs::create_dir_all(&direct)?;
    dc.copy_luns(&[("app-c".into(), 2, c_host)], &direct, &mut naive, t2)?;
    let naive_c = t2.elapsed().as_secs_f64();
    let targets: Vec<(String, usize, String)> = EIGHT
        .iter()
        .zip(&eight)
        .map(|((name, lun, _), j)| {
            (
                (*name).to_owned(),
                *lun,
                j["plan"]["target"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    dc.copy_luns(&targets, &direct, &mut naive, t2)?;
    let naive_secs = t2.elapsed().as_secs_f64();
    naive.take(&dc.lab, t2)?;
    std::fs::remove_dir_all(&direct)?;
    let (n, d) = (near.summary(), naive.summary());
    compare(
        &mut story,
        (near_secs, c_secs),
        (naive_secs, naive_c),
        &n,
        &d,
    );

    let out = out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("links.svg"), links_svg(&n, &d))?;
    story.say("\n![bytes per link](links.svg)");
    std::fs::write(out.join("report.md"), &story.0)?;
    println!(
        "\nreport: {} (and links.svg); the demo took {:.0} s",
        out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    if args.hold {
        hold(&dc)?;
    }
    Ok(())
}

fn tempdir() -> Result<nearblock_lab::tempdir::Dir> {
    Ok(nearblock_lab::tempdir::Dir::new("nearblock-demo")?)
}

fn classes(by_class: &Value) -> String {
    by_class
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k} {}", mib(v.as_u64().unwrap_or(0))))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nothing fetched (all local)".into())
}

fn inventory(story: &mut Story, inv: &Value) {
    story.say("## 1. The inventory\n");
    story.say("| image | host | size |");
    story.say("| --- | --- | --- |");
    for i in inv["images"].as_array().into_iter().flatten() {
        story.say(&format!(
            "| {} | {} | {} |",
            i["image"].as_str().unwrap_or(""),
            i["host"].as_str().unwrap_or(""),
            mib(i["size"].as_u64().unwrap_or(0))
        ));
    }
    story.say("\n| host | rack | CPU | memory | VMs |");
    story.say("| --- | --- | --- | --- | --- |");
    for h in inv["hosts"].as_array().into_iter().flatten() {
        story.say(&format!(
            "| {} | {} | {:.0}% | {:.0}% | {} |",
            h["host"].as_str().unwrap_or(""),
            h["rack"].as_str().unwrap_or("–"),
            h["cpu"].as_f64().unwrap_or(0.0) * 100.0,
            h["mem"].as_f64().unwrap_or(0.0) * 100.0,
            h["vms"]
        ));
    }
    story.say("\n| VM | state | host | held elsewhere |");
    story.say("| --- | --- | --- | --- |");
    for v in inv["vms"].as_array().into_iter().flatten() {
        story.say(&format!(
            "| {} | {} | {} | {:.0}% |",
            v["name"].as_str().unwrap_or(""),
            v["state"].as_str().unwrap_or(""),
            v["host"].as_str().unwrap_or(""),
            v["held_elsewhere"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
}

fn ranking(story: &mut Story, image: &str, policy: &str, t: &Value) {
    let p = &t["placement"];
    story.say(&format!(
        "\nPlacing c (`{image}`) under `{policy}`: picks **{}**\n",
        p["chosen"].as_str().unwrap_or("nothing")
    ));
    story.say("| # | host | cost | bytes by source class | CPU | memory |");
    story.say("| --- | --- | --- | --- | --- | --- |");
    let by: BTreeMap<&str, &Value> = p["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["host"].as_str()?, c)))
        .collect();
    for (i, host) in p["ranked"].as_array().into_iter().flatten().enumerate() {
        let Some(c) = host.as_str().and_then(|h| by.get(h)) else {
            continue;
        };
        story.say(&format!(
            "| {} | {} | {:.0} | {} | {:.0}% | {:.0}% |",
            i + 1,
            c["host"].as_str().unwrap_or(""),
            c["total_cost"].as_f64().unwrap_or(f64::NAN),
            classes(&c["bytes_by_class"]),
            c["cpu"].as_f64().unwrap_or(0.0) * 100.0,
            c["mem"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
}

/// One line, redrawn: the job's state and a progress bar.
fn progress(job: &Value) {
    let total = job["progress"]["blocks_total"].as_u64().unwrap_or(0).max(1);
    let done = job["progress"]["blocks_done"].as_u64().unwrap_or(0);
    let width = 30;
    let filled = usize::try_from(done * width / total).unwrap_or(0);
    print!(
        "\r  [{}{}] {:>3}% {} ({})   ",
        "#".repeat(filled),
        ".".repeat(usize::try_from(width).unwrap_or(30) - filled.min(30)),
        done * 100 / total,
        job["state"].as_str().unwrap_or(""),
        mib(job["progress"]["bytes_written"].as_u64().unwrap_or(0))
    );
    let _ = std::io::stdout().flush();
}

fn job_summary(story: &mut Story, job: &Value, secs: f64) {
    story.say(&format!(
        "built on **{}** in {secs:.1} s: {}",
        job["plan"]["target"].as_str().unwrap_or(""),
        classes(&job["progress"]["by_class"])
    ));
    story.say("\n| source | class | hops | bytes |");
    story.say("| --- | --- | --- | --- |");
    for (node, s) in job["progress"]["by_source"]
        .as_object()
        .into_iter()
        .flatten()
    {
        story.say(&format!(
            "| {node} | {} | {} | {} |",
            s["class"].as_str().unwrap_or(""),
            s["hops"],
            mib(s["bytes"].as_u64().unwrap_or(0))
        ));
    }
    story.say("\n| link | bytes |");
    story.say("| --- | --- |");
    for (link, b) in job["progress"]["by_link"].as_object().into_iter().flatten() {
        story.say(&format!("| {link} | {} |", mib(b.as_u64().unwrap_or(0))));
    }
}

fn migration(story: &mut Story, job: &Value) {
    let m = &job["migration"];
    story.say(&format!(
        "moved to **{}** ({} tracking); the VM stopped for {} ms; verified: {}; hv1's copy retired: {}",
        job["plan"]["target"].as_str().unwrap_or(""),
        m["tracking"].as_str().unwrap_or(""),
        m["pause_to_resume_ms"],
        m["verified"],
        m["source_retired"]
    ));
    story.say("\n| round | dirty | from hv1 | from others | ms | |");
    story.say("| --- | --- | --- | --- | --- | --- |");
    for r in m["rounds"].as_array().into_iter().flatten() {
        let from: u64 = r["bytes_by_source"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k == "hv1")
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum();
        let all: u64 = r["bytes_by_source"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum();
        story.say(&format!(
            "| {} | {} | {} | {} | {} | {} |",
            r["round"],
            mib(r["bytes_dirty"].as_u64().unwrap_or(0)),
            mib(from),
            mib(all - from),
            r["ms"],
            if r["paused"] == true { "paused" } else { "" }
        ));
    }
}

fn compare(
    story: &mut Story,
    (near_secs, near_c): (f64, f64),
    (naive_secs, naive_c): (f64, f64),
    near: &BTreeMap<String, (u64, f64)>,
    naive: &BTreeMap<String, (u64, f64)>,
) {
    let lib = "library-core";
    story.say("| nine builds (c, then eight at once) | naive | nearblock | naive / nearblock |");
    story.say("| --- | --- | --- | --- |");
    story.say(&format!(
        "| wall time | {naive_secs:.1} s | {near_secs:.1} s | **{:.2}** |",
        naive_secs / near_secs.max(1e-3)
    ));
    story.say(&format!(
        "| c alone | {naive_c:.1} s | {near_c:.1} s | {:.2} |",
        naive_c / near_c.max(1e-3)
    ));
    story.say(&format!(
        "| library-link bytes | {} | {} | **{:.1}** |",
        mib(naive[lib].0),
        mib(near[lib].0),
        naive[lib].0 as f64 / near[lib].0.max(1) as f64
    ));
    story.say("\n| link | naive | nearblock | naive / nearblock | peak naive | peak nearblock |");
    story.say("| --- | --- | --- | --- | --- | --- |");
    for (link, (nb, np)) in near {
        let (db, dp) = naive.get(link).copied().unwrap_or_default();
        // A ratio of two links' idle chatter says nothing.
        let ratio = if db.max(*nb) >= 1 << 20 {
            format!("{:.1}", db as f64 / (*nb).max(1) as f64)
        } else {
            "–".to_owned()
        };
        story.say(&format!(
            "| {link} | {} | {} | {ratio} | {dp:.0} Mbit/s | {np:.0} Mbit/s |",
            mib(db),
            mib(*nb)
        ));
    }
    story.say("\n(link bytes: both directions, all traffic, from the kernel's interface counters; peaks over 1-second windows)");
}

/// Bytes per link, nearblock against naive, as horizontal bars.
fn links_svg(near: &BTreeMap<String, (u64, f64)>, naive: &BTreeMap<String, (u64, f64)>) -> String {
    let max = near
        .values()
        .chain(naive.values())
        .map(|v| v.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (row, left, width) = (34.0, 120.0, 560.0);
    let height = 50.0 + row * near.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Bytes per link: nearblock (blue) and naive copies (grey), same nine builds</text>\n"
    );
    for (i, (link, (nb, _))) in near.iter().enumerate() {
        let db = naive.get(link).map_or(0, |v| v.0);
        let y = 40.0 + row * i as f64;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{link}</text>", y + 14.0);
        for (j, (bytes, colour)) in [(db, "#9aa0a6"), (*nb, "#1f6feb")].iter().enumerate() {
            let w = (width * *bytes as f64 / max).max(1.0);
            let yy = y + 14.0 * j as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{left}\" y=\"{yy}\" width=\"{w:.1}\" height=\"12\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                left + w + 4.0,
                yy + 10.0,
                mib(*bytes)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Keeps the lab up with the console reachable at 127.0.0.1:7878 (a
/// forwarder into core's namespace) until SIGINT or SIGTERM.
fn hold(dc: &Datacenter) -> Result<()> {
    // The signals are taken synchronously by this thread: blocked before the
    // forwarder threads start, so they inherit the mask.
    // SAFETY: plain libc signal-set calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:7878")
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let ns = dc.lab.ns("core");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let ns = ns.clone();
            std::thread::spawn(move || forward(client, &ns));
        }
    });
    println!(
        "\nconsole: http://127.0.0.1:{port}/console/ (read token: {}, admin token: {})",
        dc.lab.api_read_token_file().display(),
        dc.lab.api_admin_token_file().display()
    );
    println!("holding the lab; Ctrl-C removes it");
    let mut sig = 0;
    // SAFETY: waits for one of the blocked signals of `set`.
    unsafe { libc::sigwait(&raw const set, &raw mut sig) };
    println!("signal {sig}: removing the lab");
    Ok(())
}

/// One console connection, relayed to core's API.
fn forward(client: std::net::TcpStream, ns: &str) {
    let upstream = (|| -> Result<std::net::TcpStream> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        // SAFETY: setns on a namespace file we opened; this thread connects
        // and then only relays.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(std::net::TcpStream::connect("127.0.0.1:7878")?)
    })();
    let Ok(upstream) = upstream else { return };
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let (mut c, mut u) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut u, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
