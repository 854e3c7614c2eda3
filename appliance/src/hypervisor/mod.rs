//! The hypervisor hook: what nearblock asks of a hypervisor host, and nothing
//! more. An agent lists its host's VMs with their disks and state, builds a VM's
//! disk from blocks it is handed (or has the host's own image tool import it
//! through the rack's appliance: `import_disk`), and starts, pauses, resumes and retires VMs
//! through a [`Hypervisor`]. The manager never touches a disk itself: it sends
//! build orders to the agent, which writes through this interface.
//!
//! [`PlainFiles`] is the default implementation (raw sparse image files in one
//! directory, the VM's state in a small JSON file beside each); the lab and the
//! tests use it. A libvirt or OpenStack adapter is another implementation of the
//! same trait: `vms` from the domain list, `create_disk` into a storage pool
//! volume, `import_disk` as the pool's own volume upload from the URL,
//! `start`/`pause`/`resume`/`retire` as domain calls.
//!
//! For migration, the hook says which extents of a running VM's disk were
//! written since a token ([`Hypervisor::dirty_since`], [`dirty`]): exactly,
//! from qemu's dirty bitmaps when the disk is served by qemu-storage-daemon,
//! or every allocated extent (a rescan) when nothing tracks writes.

pub mod dirty;
mod plain;
pub mod qmp;

pub use dirty::{Dirty, StorageDaemon, Tracking};
pub use plain::{ImageTool, PlainFiles};

use serde::{Deserialize, Serialize};

/// Longest VM name the hook accepts.
pub const MAX_VM_NAME: usize = 64;

/// A VM's lifecycle state as the hypervisor reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The disk exists; the VM does not run.
    Stored,
    Running,
    Paused,
}

/// One VM disk on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// The VM's name (unique on its host).
    pub name: String,
    /// The image the disk was built from, when nearblock built it (or the
    /// operator said so); `None` for a disk of unknown origin.
    pub image: Option<String>,
    /// The disk's file on the host (what the agent indexes).
    pub path: std::path::PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    pub state: VmState,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("VM name `{0}`: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with `.`")]
    BadName(String),
    #[error("VM `{0}` does not exist")]
    NoSuchVm(String),
    #[error("VM `{0}` exists already")]
    Exists(String),
    #[error("VM `{vm}` is {state:?}: cannot {action}")]
    WrongState {
        vm: String,
        state: VmState,
        action: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}: corrupt state file")]
    Corrupt(String),
    #[error("import source `{0}`: an iscsi:// URL of A-Z a-z 0-9 . : / - _ [ ] %")]
    BadSource(String),
    #[error("importing VM `{vm}`: {reason}")]
    Import { vm: String, reason: String },
    #[error("VM `{0}`: cancelled")]
    Cancelled(String),
    #[error("VM `{vm}`: tracking its writes: {reason}")]
    Tracking { vm: String, reason: String },
    #[error("VM `{vm}`: its process: {reason}")]
    Process { vm: String, reason: String },
}

/// A disk being built: blocks are written at their offsets (anything never
/// written reads as zero, from any thread), then [`DiskBuild::finish`] makes it
/// the VM's disk; dropping it unfinished leaves no VM behind.
pub trait DiskBuild: Send + Sync {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), HookError>;
    /// Durable (data synced), under the VM's name, in state `Stored`. Once.
    fn finish(&self) -> Result<VmDisk, HookError>;
}

/// What nearblock asks of a hypervisor host.
pub trait Hypervisor: Send + Sync {
    /// Every VM on the host, by name.
    fn vms(&self) -> Result<Vec<VmDisk>, HookError>;
    /// Starts building the disk of a new VM `vm` of `size` bytes from `image`.
    /// An existing VM of that name is an error; an abandoned earlier build of
    /// it is replaced.
    fn create_disk(
        &self,
        vm: &str,
        image: &str,
        size: u64,
    ) -> Result<Box<dyn DiskBuild>, HookError>;
    /// Opens stored VM `vm`'s disk to be patched in place (a migration's
    /// rounds after the first); it stays stored, whole or not, until started.
    fn patch_disk(&self, vm: &str) -> Result<Box<dyn DiskBuild>, HookError>;
    /// Builds the disk of a new VM `vm` of `size` bytes from `image` with the
    /// host's own image tool reading `source` (an `iscsi://PORTAL/TARGET/LUN`
    /// URL, see [`check_import_source`]): the transparent way, whose reads the
    /// rack's appliance answers. Blocks until the disk is whole and durable, or
    /// `cancel` is set (nothing is left behind then).
    fn import_disk(
        &self,
        vm: &str,
        image: &str,
        size: u64,
        source: &str,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<VmDisk, HookError>;
    fn start(&self, vm: &str) -> Result<(), HookError>;
    fn pause(&self, vm: &str) -> Result<(), HookError>;
    fn resume(&self, vm: &str) -> Result<(), HookError>;
    /// Stops the VM if it runs and removes it with its disk.
    fn retire(&self, vm: &str) -> Result<(), HookError>;
    /// Bytes free for new disks.
    fn free_bytes(&self) -> Result<u64, HookError>;
    /// The extents of `vm`'s disk written since `since` (the token an earlier
    /// call returned) and the token for the next call; with no token it starts
    /// tracking (no extents). A host that tracks nothing answers every
    /// allocated extent (the caller rehashes them: a rescan).
    fn dirty_since(&self, vm: &str, since: Option<&str>) -> Result<Dirty, HookError>;
    /// Stops tracking `vm`'s writes (the migration ended or was given up).
    fn stop_tracking(&self, vm: &str) -> Result<(), HookError>;
}

/// A lifecycle change the operator asks for (through the manager).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmAction {
    Start,
    Pause,
    Resume,
    Retire,
}

impl std::str::FromStr for VmAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "start" => Ok(Self::Start),
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            "retire" => Ok(Self::Retire),
            _ => Err(format!("`{s}`: start, pause, resume or retire")),
        }
    }
}

/// Applies `action` to `vm` through `hv`.
pub fn apply(hv: &dyn Hypervisor, vm: &str, action: VmAction) -> Result<(), HookError> {
    match action {
        VmAction::Start => hv.start(vm),
        VmAction::Pause => hv.pause(vm),
        VmAction::Resume => hv.resume(vm),
        VmAction::Retire => hv.retire(vm),
    }
}

/// Checks a VM name: it becomes a file name, an index image name and a URL
/// path segment.
pub fn check_vm_name(name: &str) -> Result<(), HookError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VM_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(HookError::BadName(name.to_owned()))
    }
}

/// Checks an import source: an `iscsi://` URL of plain characters only. It
/// becomes one argument of the image tool (no shell), and the tool must not be
/// handed its other syntaxes (`json:`, file names, options).
pub fn check_import_source(source: &str) -> Result<(), HookError> {
    let ok = source.len() <= 1024
        && source.strip_prefix("iscsi://").is_some_and(|rest| {
            !rest.is_empty()
                && rest.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'.' | b':' | b'/' | b'-' | b'_' | b'[' | b']' | b'%')
                })
        });
    if ok {
        Ok(())
    } else {
        Err(HookError::BadSource(source.to_owned()))
    }
}

/// The index image name a VM's disk is offered under: `vm/<name>`, apart from
/// library images (`IQN/LUN`) and configured ones.
pub fn vm_image_name(vm: &str) -> String {
    format!("vm/{vm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_sources_are_iscsi_urls_of_plain_characters() {
        for good in [
            "iscsi://198.18.0.1:3260/iqn.2026-12.x:img/1",
            "iscsi://[fd00::1]:3260/iqn.x/2",
        ] {
            assert!(check_import_source(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "iscsi://",
            "json:{\"driver\":\"file\"}",
            "/etc/shadow",
            "iscsi://h/t/1 -o x",
            "iscsi://h/t/1;rm",
            "nbd://h/x",
        ] {
            assert!(check_import_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_names_are_checked() {
        for good in ["web1", "a", "db-2.prod_x", &"x".repeat(64)] {
            assert!(check_vm_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(65), "..", "a\0"] {
            assert!(
                matches!(check_vm_name(bad), Err(HookError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
