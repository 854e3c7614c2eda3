//! Running VMs for the migration test and bench: a VM's disk served by
//! `qemu-storage-daemon` (NBD export `disk`, a QMP monitor, so its dirty
//! bitmaps see every write), written by `vm-workload` (the lab's "guest"), and
//! the run file the plain hypervisor hook reads to pause, resume and retire it
//! and to read its dirty extents.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// qemu-storage-daemon 7.2, unpacked by `cargo xtask bootstrap` with qemu-system.
pub fn qemu_storage_daemon() -> PathBuf {
    PathBuf::from(
        std::env::var_os("NEARBLOCK_QEMU_SYSTEM")
            .unwrap_or_else(|| "/var/cache/nearblock/qemu-system-7.2".into()),
    )
    .join("usr/bin/qemu-storage-daemon")
}

/// Processes killed, with their process groups, however the caller ends.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // The workload leads a process group (with its qemu-io).
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) of a child's process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A VM's disk served by qemu-storage-daemon.
pub struct ServedDisk {
    pub qmp: PathBuf,
    pub nbd: PathBuf,
}

/// Serves `disk` (raw) as NBD export `disk` on a Unix socket in `dir`, with
/// a QMP monitor beside it (both named after `name`); the daemon joins
/// `children`.
pub fn serve_disk(
    dir: &Path,
    name: &str,
    disk: &Path,
    children: &mut Children,
) -> Result<ServedDisk> {
    let qmp = dir.join(format!("{name}.qmp"));
    let nbd = dir.join(format!("{name}.nbd"));
    let daemon = Command::new(qemu_storage_daemon())
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            disk.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk,file=file0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .args([
            "--export",
            "type=nbd,id=disk,node-name=disk,name=disk,writable=on",
        ])
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qmp.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-storage-daemon (cargo xtask bootstrap unpacks it)")?;
    children.0.push(daemon);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(nbd.exists() && qmp.exists()) {
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon for {name} is not listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ServedDisk { qmp, nbd })
}

/// What the lab's guest writes.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Bytes per second.
    pub rate: u64,
    /// Bytes per write (a multiple of 4096).
    pub write: u64,
    pub seed: u64,
}

impl Workload {
    /// Starts `binary` (`vm-workload`) writing into `served`'s export of a
    /// `size`-byte disk; its totals go to `stats`. It joins `children`;
    /// returns its pid (its process group's) once it has written.
    pub fn start(
        self,
        binary: &Path,
        served: &ServedDisk,
        size: u64,
        stats: &Path,
        children: &mut Children,
    ) -> Result<u32> {
        let child = Command::new(binary)
            .arg(&served.nbd)
            .args([
                "disk",
                &size.to_string(),
                &self.rate.to_string(),
                &self.write.to_string(),
                &self.seed.to_string(),
            ])
            .arg(stats)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id();
        children.0.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while workload_bytes(stats) == 0 {
            if Instant::now() > deadline {
                bail!("the workload wrote nothing within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pid)
    }
}

/// The bytes the workload has written so far (0 before its first write).
pub fn workload_bytes(stats: &Path) -> u64 {
    std::fs::read(stats)
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .and_then(|v| v["bytes"].as_u64())
        .unwrap_or(0)
}

/// The plain hook's files for running VM `name` in `vm_dir`: its state (a
/// copy of `image`, `size` bytes, running) and, with a process, its run file
/// (with `served`, the storage daemon whose bitmaps track its writes).
pub fn write_vm_files(
    vm_dir: &Path,
    name: &str,
    image: &str,
    size: u64,
    pid: Option<u32>,
    served: Option<&ServedDisk>,
) -> Result<()> {
    std::fs::write(
        vm_dir.join(format!("{name}.vm.json")),
        json!({"image": image, "size": size, "state": "running"}).to_string(),
    )?;
    if let Some(pid) = pid {
        let mut run = json!({ "pid": pid });
        if let Some(s) = served {
            run["storage_daemon"] = json!({"qmp": s.qmp, "nbd": s.nbd, "node": "disk"});
        }
        std::fs::write(vm_dir.join(format!("{name}.run.json")), run.to_string())?;
    }
    Ok(())
}

/// Writes `len` bytes of seeded random data (no block of it held anywhere
/// else) into `disk` at `offset`, synced: data only this VM holds.
pub fn write_random(disk: &Path, offset: u64, len: usize, seed: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let mut random = nearblock::index::synthetic::SplitMix64::new(seed);
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| random.next_u64().to_le_bytes())
        .collect();
    f.write_all_at(&data, offset)?;
    f.sync_all()?;
    Ok(())
}

/// A sparse copy of `from` at `to`.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()?
        .success();
    if !ok {
        bail!("cp {} {}", from.display(), to.display());
    }
    Ok(())
}

/// Bytes free on the file system holding `dir` (`df`).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let o = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("df output")
}

/// `nearblock vm WORDS…` in `node` with the token in `token`, its stdout as
/// JSON (a failing command is an error naming its stderr).
pub fn vm_json(lab: &crate::Lab, node: &str, token: &Path, words: &[&str]) -> Result<Value> {
    let bin = crate::nearblock_bin()?;
    let token = token.display().to_string();
    let mut argv = vec![
        bin.to_str().context("binary path")?,
        "vm",
        "--token-file",
        &token,
    ];
    argv.extend_from_slice(words);
    let o = lab.exec(node, &argv)?;
    if !o.status.success() {
        bail!("vm {words:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// The highest rate, Mbit/s, over any window of at least `window_s` seconds
/// that starts after the first second, in `(seconds, cumulative bytes)`
/// samples. A paced sender may put one batch ahead of its budget at any
/// moment, so the shorter the window the more that batch weighs: a budget is
/// checked over 2-second windows where two pacers share one link.
pub fn peak_mbps(samples: &[(f64, u64)], window_s: f64) -> f64 {
    let mut peak: f64 = 0.0;
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        if t0 < 1.0 {
            continue;
        }
        if let Some(&(t1, b1)) = samples[i..].iter().find(|(t, _)| *t - t0 >= window_s) {
            peak = peak.max(b1.saturating_sub(b0) as f64 * 8.0 / (t1 - t0) / 1e6);
        }
    }
    peak
}

/// A counter's reading `read()` stamped with the seconds since `started` at
/// the middle of the reading: reading the kernel's counters through the CLI
/// takes tens of milliseconds, and a stamp taken before it would skew the
/// 1-second windows of [`peak_mbps`] by as much.
pub fn stamped<T>(started: Instant, read: impl FnOnce() -> T) -> (f64, T) {
    let before = started.elapsed().as_secs_f64();
    let value = read();
    let after = started.elapsed().as_secs_f64();
    (f64::midpoint(before, after), value)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_over_one_second_windows_after_the_first() {
        // 1 MB/s, then 2 MB in the next second; the first second is skipped.
        let samples = [
            (0.0, 0),
            (0.5, 5_000_000),
            (1.0, 6_000_000),
            (2.0, 7_000_000),
            (3.0, 9_000_000),
        ];
        assert!((super::peak_mbps(&samples, 1.0) - 16.0).abs() < 1e-9);
        assert!((super::peak_mbps(&samples, 2.0) - 12.0).abs() < 1e-9);
        assert!(super::peak_mbps(&[], 1.0).abs() < f64::EPSILON);
    }
}
