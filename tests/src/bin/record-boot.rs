//! Records one real boot's block reads of a corpus image, once per machine:
//! the usage history the placement's usage-weighted cost is checked against
//! (`tests/tests/usage_weighting.rs`).
//!
//! On the default lab, tgtd exports the image read-only and rack1's appliance
//! splices hv1's iSCSI session with an access history (`[splicer]
//! history_dir`). hv1 boots the image under qemu-system (TCG) with its root
//! file system on that LUN; the kernel and initrd are copied out of the image
//! first (`debugfs`: the corpus images are bare ext4 file systems, no boot
//! loader). When the serial console shows a login prompt the VM is stopped; the
//! session's end saves the history, which is copied to the output path.
//!
//! `record-boot IMAGE OUT`: nothing is written to IMAGE (the LUN is read-only,
//! the VM's writes go to qemu's temporary overlay).

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock::splice::catalog::{
    access_history::read_history, history_path, manifest_of, manifest_to_text,
};
use nearblock_lab::{toml_path, ApplianceOptions, Lab, LunSpec};

const IQN: &str = "iqn.2026-12.corpus.nearblock:boot";
/// qemu-system-x86 7.2 with its iSCSI module, unpacked by `cargo xtask bootstrap`.
const QEMU_SYSTEM_DIR: &str = "/var/cache/nearblock/qemu-system-7.2";
/// The boot, at most (about 22 s under TCG on the 2-core machines).
const BOOT_LIMIT: Duration = Duration::from_mins(5);

/// `/boot/NAME-*` of the ext4 image, copied to `dir`.
fn copy_out(image: &Path, prefix: &str, dir: &Path) -> Result<PathBuf> {
    let o = Command::new("debugfs")
        .args(["-R", "ls /boot"])
        .arg(image)
        .output()
        .context("debugfs (e2fsprogs)")?;
    let listing = String::from_utf8_lossy(&o.stdout);
    let name = listing
        .split_whitespace()
        .filter(|w| w.starts_with(prefix))
        .max()
        .with_context(|| format!("no /boot/{prefix}* in {}", image.display()))?
        .to_owned();
    let out = dir.join(&name);
    let st = Command::new("debugfs")
        .args(["-R", &format!("dump /boot/{name} {}", out.display())])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() || !out.exists() {
        bail!("debugfs could not copy /boot/{name}");
    }
    Ok(out)
}

#[expect(
    clippy::too_many_lines,
    reason = "one recording, top to bottom: lab, VM, boot, history"
)]
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, image, out] = args.as_slice() else {
        bail!("usage: record-boot IMAGE OUT");
    };
    let (image, out) = (PathBuf::from(image), PathBuf::from(out));
    let qemu = Path::new(QEMU_SYSTEM_DIR).join("usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        bail!("{} missing: run `cargo xtask bootstrap`", qemu.display());
    }
    let started = Instant::now();
    let mut lab = Lab::default_topology()?;
    let kernel = copy_out(&image, "vmlinuz-", lab.dir.path())?;
    let initrd = copy_out(&image, "initrd.img-", lab.dir.path())?;
    let data = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
    let manifest = manifest_of(&format!("{IQN}/1"), &data, 4096);
    drop(data);
    let manifest_path = lab.write_file("boot.manifest", manifest_to_text(&manifest).as_bytes())?;
    lab.add_lun(LunSpec::read_only(IQN, image.clone()))?;
    let history_dir = lab.dir.path().join("history");
    std::fs::create_dir_all(&history_dir)?;
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config: format!(
                "[splicer]\nhistory_dir = {}\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\nmanifest = {}\n",
                toml_path(&history_dir),
                toml_path(&manifest_path)
            ),
        },
    )?;

    let serial = lab.dir.path().join("serial.log");
    let url = lab.lun_url(IQN, 1);
    let share = |sub: &str| Path::new(QEMU_SYSTEM_DIR).join(sub);
    let mut vm = lab
        .cmd("hv1", &[qemu.to_str().context("path")?])
        .args(["-L"])
        .arg(share("usr/share/qemu"))
        .args(["-L"])
        .arg(share("usr/share/seabios"))
        .args([
            "-nodefaults",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-display",
            "none",
            "-monitor",
            "none",
            "-net",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "root=/dev/vda ro console=ttyS0"])
        .arg("-drive")
        .arg(format!(
            "file={url},if=virtio,format=raw,snapshot=on,cache=unsafe"
        ))
        .env("QEMU_MODULE_DIR", share("usr/lib/x86_64-linux-gnu/qemu"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system")?;
    let boot = Instant::now();
    let outcome = loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains("login:") {
            break Ok(boot.elapsed());
        }
        if let Some(st) = vm.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = vm.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            break Err(anyhow::anyhow!(
                "qemu-system exited ({st}): {err}\n{console}"
            ));
        }
        if boot.elapsed() > BOOT_LIMIT {
            break Err(anyhow::anyhow!(
                "no login prompt within {BOOT_LIMIT:?}:\n{console}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = vm.kill();
    let _ = vm.wait();
    let booted = outcome?;
    // The session's end saves the history (bounded wait).
    let path = history_path(&history_dir, IQN, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let history = loop {
        if let Some(h) = read_history(&path).filter(|h| h.boots > 0) {
            break h;
        }
        if Instant::now() > deadline {
            bail!(
                "no history saved at {}:\n{}",
                path.display(),
                lab.appliance_log("rack1")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let splicer = lab.status("rack1")?.splicer;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("part");
    std::fs::write(&tmp, serde_json::to_vec(&history)?)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "record-boot: {} booted to a login prompt in {:.1} s (TCG); {} distinct blocks read ({} MiB) of {} non-zero; READs served {}, passed {}; history in {} ({:.0} s in all)",
        image.display(),
        booted.as_secs_f64(),
        history.blocks.len(),
        (history.blocks.len() * 4096) >> 20,
        manifest.blocks.iter().filter(|b| b.is_some()).count(),
        splicer.reads_served_shadow + splicer.reads_served_local,
        splicer.reads_passed,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
