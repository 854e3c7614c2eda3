//! `cargo xtask`: the project's tasks. Deliberately small (clap + anyhow) so a
//! fresh machine compiles it in seconds, before anything else is installed.
//!
//! - `bootstrap`: install what is missing, skip what is there (idempotent).
//! - `build`: the `nearblock` binary (its build script builds the eBPF programs).
//! - `test`: bootstrap, build, and run every test (unit + namespace integration).
//! - `demo`: bootstrap, build, and run the demo topology with one qemu-img copy.
//! - `bench <datapath|splice|http|index|plan|fanout|migrate|scale|all>`: the benchmarks, as ratios to a baseline
//!   measured in the same run; `--baseline-rev REV` compares (datapath, splice) with
//!   a `nearblock` built from another revision, rounds interleaved.
//! - `fuzz [SECONDS]`: each fuzz target for SECONDS, logged in appliance/fuzz/fuzz-log.md;
//!   `fuzz --replay`: the checked-in corpora plus 10 s per target (a phase of `test`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod package;

/// Debian packages the project needs (see docs/decisions.md for each).
const APT_PACKAGES: &[&str] = &[
    // eBPF toolchain: Debian's rustc with its library source, LLVM 22 for bpf-linker.
    "rustc-web",
    "rust-web-src",
    "cargo-web",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "clang-22",
    // The lab and the real peers.
    "iproute2",
    "tgt",
    "libiscsi-bin",
    // The HTTP front end's real peers: the origin and two clients.
    "nginx-light",
    "curl",
    "wget",
    // The global index's real store: a Redis Cluster (the lab makes its TLS
    // certificates with openssl).
    "redis-server",
    "redis-tools",
    "openssl",
    "libiscsi7",
    "iperf3",
    "python3",
    "python3-pip",
    // libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    "g++",
    // qemu-system-x86 7.2 (unpacked, see QEMU_SYSTEM_DIR) links these; debugfs
    // copies a corpus image's kernel out for the recorded boot.
    "libcapstone4",
    "libfdt1",
    "libpmem1",
    "libslirp0",
    "libvdeplug2",
    "e2fsprogs",
    // The console's browser test: headless Chromium (driven by playwright-core).
    "chromium",
];

/// playwright-core, the browser test's driver, from npm (the newest release
/// that runs on Debian's Node.js 18 as well as newer), into [`BROWSER_DIR`].
const PLAYWRIGHT_CORE: &str = "1.61.1";
const BROWSER_DIR: &str = "/var/cache/nearblock/browser";

/// The cargo-fuzz targets (`appliance/fuzz/fuzz_targets`), in the order they run.
const FUZZ_TARGETS: &[&str] = &[
    "pdu_decoder",
    "connection",
    "peer_messages",
    "config",
    "http_messages",
];
/// Fuzzing per target on top of replaying the corpus, in `fuzz --replay` (and so in
/// `cargo xtask test`): keeps CI's cost small (see docs/decisions.md).
const FUZZ_REPLAY_SECS: u64 = 10;

/// qemu-img with its iSCSI driver: Debian bookworm's 7.2 build, unpacked, not installed.
const QEMU_VERSION: &str = "1:7.2+dfsg-7+deb12u18+b3";
const QEMU_DIR: &str = "/var/cache/nearblock/qemu-7.2";

/// qemu-system-x86 7.2 (same build as the qemu-img above, with its iSCSI
/// module): boots a corpus image once per machine to record its reads.
const QEMU_SYSTEM_DIR: &str = "/var/cache/nearblock/qemu-system-7.2";

/// The recorded boot of corpus image b: its access history (see
/// `tests/src/bin/record-boot.rs`).
const BOOT_HISTORY: &str = "/var/cache/nearblock/corpus/history/b-bookworm-cloud.boot.history.json";

/// The VM-image corpus (real, similar Debian images): built once per machine.
const CORPUS_DIR: &str = "/var/cache/nearblock/corpus";
const CORPUS_IMAGES: &[&str] = &[
    "a-bookworm-minbase",
    "b-bookworm-cloud",
    "c-bookworm-cloud-python",
    "d-bookworm-cloud-nginx",
    "g-bookworm-cloud-nginx-inplace",
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and tools this project needs (only what is missing).
    Bootstrap,
    /// Build the nearblock binary (release) with its eBPF programs.
    Build,
    /// Bootstrap, build, and run all tests (needs root for the namespace lab).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, and run the demo: placement, builds, a migration and
    /// the naive way, on 3 racks × 3 hypervisors, with a report.
    Demo {
        /// Small generated images (what CI runs, so the demo cannot rot).
        #[arg(long)]
        quick: bool,
        /// Keep the lab and the console up until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
    /// Build a .deb (binary, systemd units, default config) from the binary
    /// already built, and check it.
    Package {
        /// Cargo profile of the binary to package.
        #[arg(long, default_value = "release")]
        profile: String,
    },
    /// Run a benchmark (after bootstrap and build).
    Bench {
        #[arg(default_value = "all")]
        which: String,
        /// Compare with a nearblock built from this git revision (datapath or
        /// splice): both binaries run every round, alternating which goes first.
        #[arg(long)]
        baseline_rev: Option<String>,
        /// Rounds (per binary) for the namespace benches (default 7: the
        /// machine's noise needs that many for a median and a spread).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: Option<u64>,
        /// Cargo profile of the binaries (`dev` reuses the test build, for smoke
        /// runs of the bench itself; figures come from `release`).
        #[arg(long, default_value = "release")]
        profile: String,
    },
    /// Fuzz each target for SECONDS (libFuzzer via cargo-fuzz), grow and minimize its
    /// checked-in corpus, and append the run to appliance/fuzz/fuzz-log.md.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(default_value_t = 60)]
        seconds: u64,
        /// Replay the checked-in corpora and fuzz 10 s per target (what CI runs);
        /// nothing is written to the corpora or the log.
        #[arg(long, conflicts_with = "seeds")]
        replay: bool,
        /// (Re)write the seed inputs into the corpora (then minimize them).
        #[arg(long)]
        seeds: bool,
        /// Only these targets (default: all).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
}

/// Run one phase of a task and print how long it took (CI reads these lines).
fn phase<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    let result = f();
    let secs = start.elapsed().as_secs_f64();
    let outcome = if result.is_ok() { "done" } else { "failed" };
    eprintln!("xtask: phase {name}: {outcome} in {secs:.1} s");
    result
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bootstrap => bootstrap(),
        Cmd::Build => {
            bootstrap()?;
            build()
        }
        Cmd::Test { args } => {
            bootstrap()?;
            test(&args)
        }
        Cmd::Package { profile } => {
            let deb = phase("package", || package::build(&profile))?;
            phase("package: check", || package::check(&deb))
        }
        Cmd::Demo { quick, hold } => {
            bootstrap()?;
            build()?;
            demo("release", quick, hold)
        }
        Cmd::Bench {
            which,
            baseline_rev,
            rounds,
            profile,
        } => {
            bootstrap()?;
            bench::run(&bench::BenchArgs {
                which,
                baseline_rev,
                rounds: rounds.and_then(|r| usize::try_from(r).ok()),
                profile,
            })
        }
        Cmd::Fuzz {
            seconds,
            replay,
            seeds,
            targets,
        } => {
            // Only cargo-fuzz is needed (not the lab's tools or the VM corpus).
            phase("bootstrap: cargo-fuzz", cargo_fuzz)?;
            let targets = fuzz::targets(&targets)?;
            phase("fuzz: build", fuzz::build)?;
            if seeds {
                phase("fuzz: seeds", fuzz::seeds)?;
            }
            if replay {
                phase("fuzz: replay", || fuzz::replay(&targets))
            } else {
                phase("fuzz: run", || fuzz::run(&targets, seconds))
            }
        }
    }
}

/// The checkout this xtask runs for. `cargo xtask` (`cargo run`) sets
/// `CARGO_MANIFEST_DIR` for the run to the invoking checkout's xtask; the value
/// compiled in names whichever checkout last built the binary, which is
/// another one when several share a target directory (CI's clones and a
/// developer's tree under /var/cache/nearblock/target).
fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().expect("workspace root").to_path_buf()
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set (`.ci/run` keeps CI's builds
/// in /var/cache/nearblock/target, outside its clean clones), else `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).args(args);
    c
}

trait StatusOk {
    fn status_ok(&mut self) -> Result<()>;
}

impl StatusOk for Command {
    fn status_ok(&mut self) -> Result<()> {
        let st = self.status().with_context(|| format!("running {self:?}"))?;
        if !st.success() {
            bail!("{self:?} failed: {st}");
        }
        Ok(())
    }
}

/// The demo (`tests/src/bin/nearblock-demo.rs`) against the nearblock binary
/// of `profile` (built already), with its guest workload beside it.
fn demo(profile: &str, quick: bool, hold: bool) -> Result<()> {
    let dir = if profile == "dev" { "debug" } else { profile };
    let mut build = cargo(&["build", "-q", "--profile", profile, "-p", "nearblock-lab"]);
    build.args(["--bin", "nearblock-demo", "--bin", "vm-workload"]);
    build.status_ok()?;
    let mut c = Command::new(target_dir().join(dir).join("nearblock-demo"));
    if quick {
        c.arg("--quick");
    }
    if hold {
        c.arg("--hold");
    }
    c.env("NEARBLOCK_BIN", target_dir().join(dir).join("nearblock"))
        .env("NEARBLOCK_CORPUS_DIR", CORPUS_DIR)
        .status_ok()
}

fn build() -> Result<()> {
    cargo(&["build", "--release", "-p", "nearblock"]).status_ok()
}

/// The build caches outside the clone grow at every run (cargo never collects
/// stale artifacts or incremental sessions; a full disk failed CI once). Above
/// this size a cache loses its incremental sessions (the next build is about a
/// minute slower)...
const INCREMENTAL_LIMIT_BYTES: u64 = 16 << 30;
/// ...and above this one, after that, all of it (a cold build, minutes): the
/// stale artifacts of many dependency and toolchain updates.
const CACHE_LIMIT_BYTES: u64 = 40 << 30;

/// Keeps a build cache outside the clone bounded: a rebuild costs minutes, a
/// full disk costs the run.
fn prune_build_cache(dir: &Path) -> Result<()> {
    if dir.starts_with(root()) || !dir.exists() {
        return Ok(());
    }
    let size = disk_usage(dir)?;
    if size <= INCREMENTAL_LIMIT_BYTES {
        return Ok(());
    }
    for profile in std::fs::read_dir(dir)? {
        let incremental = profile?.path().join("incremental");
        if incremental.is_dir() {
            std::fs::remove_dir_all(&incremental)
                .with_context(|| format!("removing {}", incremental.display()))?;
        }
    }
    let after = disk_usage(dir)?;
    eprintln!(
        "xtask: {} was {} MiB: incremental sessions removed, now {} MiB",
        dir.display(),
        size >> 20,
        after >> 20
    );
    if after > CACHE_LIMIT_BYTES {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        eprintln!("xtask: {} removed (a cold build follows)", dir.display());
    }
    Ok(())
}

/// Bytes under `dir`, as `du` counts them.
fn disk_usage(dir: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output()?;
    if !out.status.success() {
        bail!("du -sb {} failed: {}", dir.display(), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sb {}: unexpected output", dir.display()))
}

fn test(extra: &[String]) -> Result<()> {
    phase("cache", || {
        prune_build_cache(&target_dir())?;
        prune_build_cache(Path::new(fuzz::FUZZ_TARGET_DIR))
    })?;
    // The lint gate first: it is the fastest to fail.
    phase("lint", || {
        cargo(&["fmt", "--all", "--check"]).status_ok()?;
        // With the corpus directory, as the build below: tests/build.rs reads it.
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("NEARBLOCK_CORPUS_DIR", CORPUS_DIR)
        .status_ok()?;
        // The appliance alone, without the lab's `testing` feature: its internal
        // modules are crate-private then, so code nothing uses is reported.
        cargo(&[
            "clippy",
            "-p",
            "nearblock",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .status_ok()
    })?;
    // The integration tests run the nearblock binary; build it in the test
    // profile's directory so the lab finds it beside the test executables.
    phase("build", || {
        cargo(&["build", "-p", "nearblock", "--bin", "nearblock"]).status_ok()?;
        // The corpus directory at build time too: tests that need it are built
        // ignored without it (tests/build.rs).
        cargo(&["test", "--workspace", "--no-run"])
            .env("NEARBLOCK_CORPUS_DIR", CORPUS_DIR)
            .status_ok()
    })?;
    // The .deb of the binary just built, and its check (contents, units).
    phase("package", || package::check(&package::build("dev")?))?;
    phase("corpus: boot history", boot_history)?;
    phase("test", || {
        let mut c = cargo(&["test", "--workspace"]);
        c.args(extra).env("NEARBLOCK_CORPUS_DIR", CORPUS_DIR);
        c.status_ok()
    })?;
    // The demo's story on small images, so it cannot rot.
    phase("demo --quick", || demo("dev", true, false))?;
    // Hostile input as a standing test: every checked-in fuzz input, plus a short run.
    phase("fuzz build", fuzz::build)?;
    phase("fuzz replay", || fuzz::replay(FUZZ_TARGETS))
}

fn bootstrap() -> Result<()> {
    if !is_root() {
        bail!("bootstrap installs system packages: run as root");
    }
    phase("bootstrap: Debian packages", apt_packages)?;
    phase("bootstrap: bpf-linker", bpf_linker)?;
    phase("bootstrap: cargo-fuzz", cargo_fuzz)?;
    phase("bootstrap: qemu-img 7.2", qemu_72)?;
    phase("bootstrap: qemu-system 7.2", qemu_system_72)?;
    phase("bootstrap: python blake3", python_blake3)?;
    phase("bootstrap: browser driver", browser_driver)?;
    phase("bootstrap: corpus", corpus)?;
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("bootstrap: Debian packages present");
        return Ok(());
    }
    eprintln!("bootstrap: installing {}", missing.join(" "));
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status_ok()?;
    Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .status_ok()
}

/// Node.js (Debian's, unless one is installed) and playwright-core
/// [`PLAYWRIGHT_CORE`] in [`BROWSER_DIR`] (`node_modules`; the test sets
/// `NODE_PATH`). Chromium itself is a Debian package: playwright's own browser
/// download cannot work without the internet.
fn browser_driver() -> Result<()> {
    let has = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("node") || !has("npm") {
        eprintln!("bootstrap: installing nodejs npm");
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "nodejs",
                "npm",
            ])
            .status_ok()?;
    }
    let manifest = Path::new(BROWSER_DIR).join("node_modules/playwright-core/package.json");
    let present = std::fs::read_to_string(&manifest)
        .is_ok_and(|t| t.contains(&format!("\"version\": \"{PLAYWRIGHT_CORE}\"")));
    if present {
        eprintln!("bootstrap: playwright-core {PLAYWRIGHT_CORE} present in {BROWSER_DIR}");
        return Ok(());
    }
    std::fs::create_dir_all(BROWSER_DIR)?;
    Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            BROWSER_DIR,
        ])
        .arg(format!("playwright-core@{PLAYWRIGHT_CORE}"))
        .status_ok()
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" 0.13"));
    if ok {
        eprintln!("bootstrap: bpf-linker 0.13 present");
        return Ok(());
    }
    eprintln!("bootstrap: building bpf-linker 0.13 against LLVM 22 (several minutes)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .env("PATH", path)
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
        ])
        .args(["--features", "llvm-22"])
        .status_ok()
}

/// cargo-fuzz, which drives libFuzzer for `cargo xtask fuzz` (built with the stable
/// toolchain; `RUSTC_BOOTSTRAP` lets it pass its -Z flags, see docs/decisions.md).
fn cargo_fuzz() -> Result<()> {
    let present = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        eprintln!("bootstrap: cargo-fuzz present");
        return Ok(());
    }
    eprintln!("bootstrap: cargo install cargo-fuzz --locked (about two minutes)");
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "cargo-fuzz", "--locked"])
        .status_ok()
}

fn qemu_72() -> Result<()> {
    let dir = Path::new(QEMU_DIR);
    if dir.join("usr/bin/qemu-img").exists() {
        eprintln!("bootstrap: qemu-img 7.2 present in {QEMU_DIR}");
        return Ok(());
    }
    let tmp = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let download = |utils: &str, extra: &str| {
        Command::new("apt-get")
            .current_dir(&tmp)
            .args(["download", "-qq"])
            .arg(format!("qemu-utils={utils}"))
            .arg(format!("qemu-block-extra={extra}"))
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download(QEMU_VERSION, QEMU_VERSION) {
        // The pinned build is gone: take each package's newest 7.2 build.
        let (utils, extra) = (newest_72("qemu-utils")?, newest_72("qemu-block-extra")?);
        eprintln!("bootstrap: {QEMU_VERSION} unavailable, using {utils} / {extra}");
        if !download(&utils, &extra) {
            bail!("cannot download qemu-utils {utils} / qemu-block-extra {extra}");
        }
    }
    let staging = unpack_debs(&tmp, dir)?;
    std::fs::rename(&staging, dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("bootstrap: qemu-img 7.2 unpacked into {QEMU_DIR}");
    Ok(())
}

/// Every .deb in `debs` unpacked (`dpkg -x`) into `dir`'s staging directory
/// (returned; the caller renames it into place).
fn unpack_debs(debs: &Path, dir: &Path) -> Result<PathBuf> {
    let staging = dir.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    for deb in std::fs::read_dir(debs)? {
        Command::new("dpkg")
            .arg("-x")
            .arg(deb?.path())
            .arg(&staging)
            .status_ok()?;
    }
    Ok(staging)
}

/// qemu-system-x86 7.2 unpacked into [`QEMU_SYSTEM_DIR`]: the emulator, its TCG
/// module (qemu-system-common), the firmware (qemu-system-data, seabios,
/// ipxe-qemu), and the iSCSI block module of the qemu-img 7.2 build beside it
/// (`QEMU_MODULE_DIR` names one directory).
fn qemu_system_72() -> Result<()> {
    let dir = Path::new(QEMU_SYSTEM_DIR);
    if dir.join("usr/bin/qemu-system-x86_64").exists() {
        eprintln!("bootstrap: qemu-system 7.2 present in {QEMU_SYSTEM_DIR}");
        return Ok(());
    }
    let tmp = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let packages = ["qemu-system-x86", "qemu-system-common", "qemu-system-data"];
    let download = |versions: &[String]| {
        Command::new("apt-get")
            .current_dir(&tmp)
            .args(["download", "-qq", "seabios", "ipxe-qemu"])
            .args(
                packages
                    .iter()
                    .zip(versions)
                    .map(|(p, v)| format!("{p}={v}")),
            )
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download(&[
        QEMU_VERSION.to_owned(),
        QEMU_VERSION.to_owned(),
        QEMU_VERSION.to_owned(),
    ]) {
        // Each package's own newest 7.2 build: qemu-system-data is
        // architecture-independent, so a binNMU (`+bN`) of the others is not
        // one of its versions.
        let versions = packages
            .iter()
            .map(|p| newest_72(p))
            .collect::<Result<Vec<_>>>()?;
        eprintln!("bootstrap: {QEMU_VERSION} unavailable, using {versions:?}");
        if !download(&versions) {
            bail!("cannot download {packages:?} {versions:?}");
        }
    }
    let staging = unpack_debs(&tmp, dir)?;
    let modules = "usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so";
    std::fs::copy(Path::new(QEMU_DIR).join(modules), staging.join(modules))
        .context("the iSCSI module of qemu-img 7.2 (bootstrap installs it first)")?;
    std::fs::rename(&staging, dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("bootstrap: qemu-system 7.2 unpacked into {QEMU_SYSTEM_DIR}");
    Ok(())
}

/// One boot of corpus image b under qemu-system through an appliance,
/// recorded once per machine (about 30 s; needs the built daemon).
fn boot_history() -> Result<()> {
    if Path::new(BOOT_HISTORY).exists() {
        eprintln!("corpus: boot history present in {BOOT_HISTORY}");
        return Ok(());
    }
    let image = Path::new(CORPUS_DIR).join("images/b-bookworm-cloud.raw");
    cargo(&[
        "run",
        "-q",
        "-p",
        "nearblock-lab",
        "--bin",
        "record-boot",
        "--",
    ])
    .arg(image)
    .arg(BOOT_HISTORY)
    .env("NEARBLOCK_BIN", target_dir().join("debug/nearblock"))
    .status_ok()
}

/// PyPI's blake3 for the independent corpus computation (tests/corpus).
fn python_blake3() -> Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import blake3"])
        .status()
        .is_ok_and(|s| s.success());
    if have {
        eprintln!("bootstrap: python blake3 present");
        return Ok(());
    }
    eprintln!("bootstrap: pip install blake3");
    Command::new("python3")
        .args(["-m", "pip", "install", "-q", "blake3"])
        .status_ok()
}

/// Build the corpus images once (about 5 minutes, 3.5 GiB), outside the clone.
fn corpus() -> Result<()> {
    let images = Path::new(CORPUS_DIR).join("images");
    let complete = CORPUS_IMAGES.iter().all(|n| {
        images.join(format!("{n}.raw")).exists() && images.join(format!("{n}.qcow2")).exists()
    });
    if complete {
        eprintln!("bootstrap: corpus present in {CORPUS_DIR}");
        return Ok(());
    }
    eprintln!("bootstrap: building the VM-image corpus into {CORPUS_DIR} (about 5 minutes)");
    Command::new("bash")
        .arg(root().join("tests/corpus/build-corpus.sh"))
        .env("CORPUS_DIR", CORPUS_DIR)
        .status_ok()
}

/// The newest 7.2 version of `package` in the package lists.
fn newest_72(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["madison", package])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut best: Option<String> = None;
    for v in text
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .map(str::trim)
    {
        if !v.starts_with("1:7.2") {
            continue;
        }
        let newer = match &best {
            None => true,
            Some(b) => Command::new("dpkg")
                .args(["--compare-versions", v, "gt", b])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer {
            best = Some(v.to_string());
        }
    }
    best.with_context(|| format!("no {package} 7.2 build in the package lists"))
}
