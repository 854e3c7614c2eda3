//! The lab's "VM": a process that writes into its disk at a set rate, as a
//! guest writing files would, through the disk's NBD export served by
//! qemu-storage-daemon (so the daemon's dirty bitmaps see every write).
//!
//! `vm-workload SOCKET EXPORT DISK_BYTES RATE_BYTES_PER_S WRITE_BYTES SEED STATS_FILE`
//!
//! It leads its own process group, so the hypervisor hook's pause (SIGSTOP to
//! the group) stops the writer. Its `qemu-io` child, the disk's NBD client,
//! has a group of its own, as a hypervisor's device emulation finishes the
//! requests in flight when the guest is paused: stopped with half a request
//! sent, it would leave the storage daemon's drain (the dirty-bitmap
//! transaction of the next migration round) waiting for the rest. With the
//! writer stopped it gets no more commands, and it ends when the writer does
//! (its standard input closes). Writes go to
//! consecutive offsets from a seeded start, wrapping at the disk's end, each
//! of fresh pseudo-random bytes (no two blocks alike, as file contents);
//! after every write the total written is in `STATS_FILE` (`{"writes": N,
//! "bytes": B}`). It runs until killed.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, export, disk, rate, write, seed, stats] = &args[..] else {
        bail!("usage: vm-workload SOCKET EXPORT DISK_BYTES RATE_BYTES_PER_S WRITE_BYTES SEED STATS_FILE");
    };
    let disk: u64 = disk.parse().context("DISK_BYTES")?;
    let rate: f64 = rate.parse().context("RATE_BYTES_PER_S")?;
    let write: u64 = write.parse().context("WRITE_BYTES")?;
    let seed: u64 = seed.parse().context("SEED")?;
    if write == 0 || !write.is_multiple_of(4096) || write > disk || rate <= 0.0 {
        bail!("WRITE_BYTES: a multiple of 4096 up to the disk's size; RATE: positive");
    }
    // SAFETY: setpgid(0, 0) makes this process a group leader; no memory.
    if unsafe { libc::setpgid(0, 0) } != 0 {
        bail!("setpgid: {}", std::io::Error::last_os_error());
    }
    let (qemu_img, modules) = nearblock_lab::qemu_img()?;
    let qemu_io = qemu_img.with_file_name("qemu-io");
    let mut child = Command::new(&qemu_io)
        .env("QEMU_MODULE_DIR", modules)
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///{export}?socket={socket}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", qemu_io.display()))?;
    let mut input = child.stdin.take().context("qemu-io stdin")?;
    let mut output = BufReader::new(child.stdout.take().context("qemu-io stdout")?);
    let slots = disk / write;
    let mut slot = seed % slots;
    // qemu-io fills each write from this file (`write -s`).
    let buffer = format!("{stats}.data");
    let mut random = nearblock::index::synthetic::SplitMix64::new(seed);
    let mut data = vec![0u8; usize::try_from(write)?];
    let started = Instant::now();
    let (mut writes, mut bytes) = (0u64, 0u64);
    loop {
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&random.next_u64().to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(&buffer, &data)?;
        writeln!(input, "write -s {buffer} {} {write}", slot * write)?;
        input.flush()?;
        // qemu-io answers each write with "wrote N/N bytes at offset O" and a
        // line of timing.
        let mut line = String::new();
        loop {
            line.clear();
            if output.read_line(&mut line)? == 0 {
                bail!("qemu-io ended");
            }
            if line.contains("wrote ") {
                break;
            }
            if line.contains("error") || line.contains("failed") {
                bail!(
                    "qemu-io on {socket}, write {writes} at {}: {}",
                    slot * write,
                    line.trim()
                );
            }
        }
        writes += 1;
        bytes += write;
        let tmp = format!("{stats}.tmp");
        std::fs::write(
            &tmp,
            format!("{{\"writes\": {writes}, \"bytes\": {bytes}}}"),
        )?;
        std::fs::rename(&tmp, stats)?;
        slot = (slot + 1) % slots;
        let due = Duration::from_secs_f64(bytes as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
