//! Builds the kernel programs (`appliance-ebpf`) and embeds the object in the
//! `nearblock` binary.
//!
//! The eBPF crate needs Debian's rustc (`/usr/bin/rustc`, with `rust-web-src` for
//! `-Z build-std=core`) and `bpf-linker`; `cargo xtask bootstrap` installs both. If
//! they are missing (or `NEARBLOCK_SKIP_EBPF=1`), an empty object is embedded, the
//! crate still compiles (so pure parts can be developed and unit-tested), and loading
//! the datapath fails at run time with an error that says how to fix it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let ebpf_dir = root.join("appliance-ebpf");
    let common_dir = root.join("appliance-common");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("nearblock-ebpf.o");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=NEARBLOCK_SKIP_EBPF");
    // Rebuild once the toolchain appears (a missing path makes cargo rerun this).
    println!("cargo:rerun-if-changed=/usr/bin/rustc");
    if let Some(linker) = find("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    } else {
        println!("cargo:rerun-if-changed=/nonexistent/bpf-linker");
    }

    let skip = env::var("NEARBLOCK_SKIP_EBPF").is_ok_and(|v| v == "1");
    let toolchain = Path::new("/usr/bin/rustc").exists() && find("bpf-linker").is_some();
    if skip || !toolchain {
        println!(
            "cargo:warning=eBPF programs not built ({}); run `cargo xtask bootstrap`",
            if skip {
                "NEARBLOCK_SKIP_EBPF=1"
            } else {
                "no Debian rustc-web or bpf-linker"
            }
        );
        std::fs::write(&out, b"").unwrap();
        return;
    }
    let target_dir = ebpf_dir.join("target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--quiet"])
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target_dir);
    // The outer build's settings must not leak into the BPF build.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for appliance-ebpf");
    assert!(
        status.success(),
        "building appliance-ebpf failed (see above)"
    );
    let obj = target_dir.join("bpfel-unknown-none/release/nearblock-ebpf");
    std::fs::copy(&obj, &out).unwrap_or_else(|e| panic!("copying {} failed: {e}", obj.display()));
}

fn find(name: &str) -> Option<PathBuf> {
    let home_bin = Path::new(&env::var("HOME").unwrap_or_default()).join(".cargo/bin");
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([home_bin])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
