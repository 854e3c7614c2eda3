//! The demo: the default lab topology (library ─ core ─ rack1, rack2 ─ hv1..hv4),
//! a nearblock appliance on each rack, and one VM instantiation: hv1 copies an image
//! LUN from the library with qemu-img through rack1. Prints what crossed each link
//! (kernel interface counters, per direction) and what the appliance saw (its eBPF
//! flow and interface counters, the splicer, the discovery table).
//!
//! The image: a corpus image if one was built (`$NEARBLOCK_CORPUS_DIR` or
//! /var/cache/nearblock/corpus), else a generated 256 MiB image, 60% zero blocks.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use nearblock_lab::{content, ApplianceOptions, Lab, LunSpec};

const IQN: &str = "iqn.2026-11.demo.nearblock:image";

fn corpus_image() -> Option<PathBuf> {
    let dir = std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from);
    let p = dir.join("images/b-bookworm-cloud.raw");
    p.exists().then_some(p)
}

fn main() -> Result<()> {
    let mut lab = Lab::default_topology()?;
    let (backing, label) = match corpus_image() {
        Some(p) => (p.clone(), format!("corpus image {}", p.display())),
        None => (
            lab.write_file("demo.raw", &content::image(256 << 20, 2026, 60))?,
            "generated 256 MiB image (60% zero blocks)".to_string(),
        ),
    };
    let size = std::fs::metadata(&backing)?.len();
    lab.add_lun(LunSpec::read_only(IQN, backing.clone()))?;
    for rack in ["rack1", "rack2"] {
        lab.start_appliance(rack, ApplianceOptions::default())?;
    }
    println!("nearblock demo: library ─ core ─ rack1, rack2 ─ hv1, hv2 / hv3, hv4");
    println!(
        "image: {label}, {} MiB, exported read-only by tgtd on {}",
        size >> 20,
        lab.addr4(lab.library())
    );

    let before = all_link_bytes(&lab)?;
    let url = lab.lun_url(IQN, 1);
    let out = lab.dir.path().join("hv1-copy.raw");
    println!("\nhv1: qemu-img convert -O raw {url} (through rack1) ...");
    let t = Instant::now();
    let o = lab.qemu_convert("hv1", &url, &out)?;
    let secs = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!("qemu-img failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let same = files_equal(&out, &backing)?;
    println!(
        "copied {} MiB in {secs:.2} s ({:.0} MiB/s); identical to the library's LUN: {}",
        size >> 20,
        size as f64 / 1_048_576.0 / secs,
        if same { "yes" } else { "NO" }
    );
    let after = all_link_bytes(&lab)?;

    println!("\nwhat crossed each link during the copy (kernel interface counters):");
    println!(
        "  {:<18} {:>16} {:>16}",
        "link a ─ b", "a→b bytes", "b→a bytes"
    );
    for l in &lab.topology.links {
        let key = (l.a.clone(), l.b.clone());
        let (tx0, rx0) = before.get(&key).copied().unwrap_or_default();
        let (tx1, rx1) = after.get(&key).copied().unwrap_or_default();
        println!(
            "  {:<18} {:>16} {:>16}",
            format!("{} ─ {}", l.a, l.b),
            tx1 - tx0,
            rx1 - rx0
        );
    }

    let r = lab.status("rack1")?;
    println!("\nrack1 appliance (eBPF counters since it started):");
    let mut text = Vec::new();
    nearblock::cli::status::print_report(&r, &mut text)?;
    println!("{}", String::from_utf8_lossy(&text));
    if !same {
        bail!("the copy differs from the library's LUN");
    }
    Ok(())
}

/// (a, b) → (bytes a sent toward b, bytes b sent toward a), from a's interface.
fn all_link_bytes(lab: &Lab) -> Result<BTreeMap<(String, String), (u64, u64)>> {
    let mut out = BTreeMap::new();
    for l in &lab.topology.links {
        let stats = lab.link_bytes(&l.a)?;
        let (_, rx, tx) = stats
            .into_iter()
            .find(|(iface, _, _)| iface == &l.b)
            .context("link interface")?;
        out.insert((l.a.clone(), l.b.clone()), (tx, rx));
    }
    Ok(out)
}

fn files_equal(a: &std::path::Path, b: &std::path::Path) -> Result<bool> {
    use std::io::Read;
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}
