//! `cargo xtask package`: a Debian package of the `nearblock` binary already
//! built (no second build), its systemd units and a commented default config;
//! and the check CI runs on it (contents, control fields, the units verified
//! by `systemd-analyze`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{root, target_dir, StatusOk as _};

/// The units and config, as installed (source in `appliance/packaging/`).
const UNITS: [&str; 3] = [
    "nearblock.service",
    "nearblock-agent.service",
    "nearblock-indexer.service",
];
const DOCS: [&str; 4] = [
    "operations.md",
    "architecture.md",
    "security.md",
    "decisions.md",
];

/// The workspace's version (`[workspace.package] version`).
fn version() -> Result<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let package = &manifest[manifest
        .find("[workspace.package]")
        .context("no [workspace.package] in Cargo.toml")?..];
    package
        .lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .context("no version in [workspace.package]")
}

/// Builds `target/debian/nearblock_VERSION_amd64.deb` from the binary of cargo
/// profile `profile` (`dev` or `release`); returns its path.
pub fn build(profile: &str) -> Result<PathBuf> {
    let dir = if profile == "dev" { "debug" } else { profile };
    let binary = target_dir().join(dir).join("nearblock");
    if !binary.exists() {
        bail!(
            "{} is not built: `cargo build -p nearblock{}` first",
            binary.display(),
            if profile == "release" {
                " --release"
            } else {
                ""
            }
        );
    }
    let version = version()?;
    let out = target_dir().join("debian");
    let staging = out.join("nearblock");
    let _ = std::fs::remove_dir_all(&staging);
    let sources = root().join("appliance/packaging");
    let install = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = staging.join(to);
        std::fs::create_dir_all(dest.parent().context("a path with a parent")?)?;
        std::fs::copy(from, &dest).with_context(|| format!("{} → {to}", from.display()))?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        Ok(())
    };
    install(&binary, "usr/bin/nearblock", 0o755)?;
    for unit in UNITS {
        install(
            &sources.join(unit),
            &format!("lib/systemd/system/{unit}"),
            0o644,
        )?;
    }
    install(
        &sources.join("nearblock.toml"),
        "etc/nearblock/nearblock.toml",
        0o644,
    )?;
    for doc in DOCS {
        install(
            &root().join("docs").join(doc),
            &format!("usr/share/doc/nearblock/{doc}"),
            0o644,
        )?;
    }
    let size_kib = crate::disk_usage(&staging)? / 1024;
    let control = format!(
        "Package: nearblock\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: nearblock developers <nearblock@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6, iproute2\n\
         Recommends: tgt, qemu-utils\n\
         Section: net\n\
         Priority: optional\n\
         Description: in-path appliance that makes VM instantiation and migration cheap\n \
         nearblock sits inline in a datacenter network, indexes VM images as\n \
         content-addressed blocks, answers hypervisors' iSCSI image reads from the\n \
         nearest copies, places VMs where building them costs least, and moves\n \
         running VMs with only what nothing nearer holds crossing from their host.\n"
    );
    std::fs::create_dir_all(staging.join("DEBIAN"))?;
    std::fs::write(staging.join("DEBIAN/control"), control)?;
    // The config is the operator's: upgrades keep their edits.
    std::fs::write(
        staging.join("DEBIAN/conffiles"),
        "/etc/nearblock/nearblock.toml\n",
    )?;
    let deb = out.join(format!("nearblock_{version}_amd64.deb"));
    // A release package is compressed hard; CI's check of the debug build
    // (its debug info is most of it) only needs it built.
    let compression: &[&str] = if profile == "release" {
        &["-Zxz"]
    } else {
        &["-Zgzip", "-z1"]
    };
    Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .args(compression)
        .arg("--build")
        .arg(&staging)
        .arg(&deb)
        .status_ok()?;
    eprintln!("package: {}", deb.display());
    Ok(deb)
}

/// What CI checks of the package: its files, its control fields, the units
/// (verified by `systemd-analyze verify` against the packaged binary) and the
/// default config (the packaged binary's `run --check` reports only what the
/// operator must fill in).
pub fn check(deb: &Path) -> Result<()> {
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let mut expected = vec![
        "./usr/bin/nearblock".to_owned(),
        "./etc/nearblock/nearblock.toml".to_owned(),
    ];
    expected.extend(UNITS.iter().map(|u| format!("./lib/systemd/system/{u}")));
    expected.extend(
        DOCS.iter()
            .map(|d| format!("./usr/share/doc/nearblock/{d}")),
    );
    for path in &expected {
        if !contents.lines().any(|l| l.ends_with(path.as_str())) {
            bail!("{} lacks {path}:\n{contents}", deb.display());
        }
    }
    if !contents
        .lines()
        .any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with("./usr/bin/nearblock"))
    {
        bail!("the binary is not root-owned and executable:\n{contents}");
    }
    let package = output(
        Command::new("dpkg-deb")
            .args(["--field"])
            .arg(deb)
            .arg("Package"),
    )?;
    if package.trim() != "nearblock" {
        bail!("Package field: {package:?}");
    }
    let tmp = deb.with_extension("check");
    let _ = std::fs::remove_dir_all(&tmp);
    Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&tmp)
        .status_ok()?;
    // The units name /usr/bin/nearblock; verify copies that name the unpacked one.
    let bin = tmp.join("usr/bin/nearblock");
    let units = tmp.join("units");
    std::fs::create_dir_all(&units)?;
    for unit in UNITS {
        let text = std::fs::read_to_string(tmp.join("lib/systemd/system").join(unit))?;
        let text = text.replace("/usr/bin/nearblock", bin.to_str().context("a UTF-8 path")?);
        std::fs::write(units.join(unit), text)?;
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.iter().map(|u| units.join(u)))
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    if !verify.status.success() || !complaints.trim().is_empty() {
        bail!("systemd-analyze verify: {}\n{complaints}", verify.status);
    }
    // The default config is refused only for what the operator must fill in.
    let checked = Command::new(&bin)
        .args(["run", "--check", "--config"])
        .arg(tmp.join("etc/nearblock/nearblock.toml"))
        .output()?;
    let said = String::from_utf8_lossy(&checked.stderr);
    if checked.status.success() || !said.contains("interfaces") {
        bail!(
            "the default config should be refused for its empty interfaces, got {}: {said}",
            checked.status
        );
    }
    std::fs::remove_dir_all(&tmp)?;
    eprintln!(
        "package: {} checked ({} files)",
        deb.display(),
        contents.lines().count()
    );
    Ok(())
}

fn output(c: &mut Command) -> Result<String> {
    let o = c.output()?;
    if !o.status.success() {
        bail!("{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
