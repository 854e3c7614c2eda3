//! The default hook: VMs as raw sparse image files in one directory.
//!
//! VM `NAME` is `NAME.raw` (its disk) and `NAME.vm.json` (the image it was built
//! from, its size and state). A build writes `.NAME.raw.part`, syncs it, and
//! renames it into place before the state file is written, so a crash leaves
//! either no VM or a whole one (a stale `.part` is replaced by the next build of
//! that name). There is no VM process behind a plain file: start, pause, resume
//! and retire record the state an adapter for a real hypervisor would act on.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{check_vm_name, DiskBuild, HookError, Hypervisor, VmDisk, VmState};
use crate::peer::durable_file::{self, Existing};

const DISK_SUFFIX: &str = ".raw";
const STATE_SUFFIX: &str = ".vm.json";
const RUN_SUFFIX: &str = ".run.json";
/// How long a paused VM's last writes may take to land.
const QUIESCE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// `NAME.run.json`, written by whatever runs the VM (the lab's workload
/// launcher; an adapter for a real hypervisor asks the hypervisor instead):
/// the VM's process group leader, whose group pause, resume and retire stop,
/// continue and kill, and the storage daemon serving its disk, whose dirty
/// bitmaps say what it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub storage_daemon: Option<super::StorageDaemon>,
}

/// What `NAME.vm.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    image: Option<String>,
    size: u64,
    state: VmState,
}

/// The image tool `import_disk` runs: `qemu-img` (with its iSCSI driver).
#[derive(Clone, Debug, Default)]
pub struct ImageTool {
    /// The `qemu-img` binary (default: `qemu-img` on the PATH).
    pub qemu_img: Option<PathBuf>,
    /// Its block-driver modules (`QEMU_MODULE_DIR`), for an unpacked build.
    pub module_dir: Option<PathBuf>,
}

impl ImageTool {
    /// `qemu-img`, with its modules' directory when one is set.
    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(
            self.qemu_img
                .clone()
                .unwrap_or_else(|| PathBuf::from("qemu-img")),
        );
        if let Some(m) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        cmd
    }
}

/// How long an import may run before it is given up.
const IMPORT_LIMIT: std::time::Duration = std::time::Duration::from_hours(4);

/// VMs as image files in `dir`.
pub struct PlainFiles {
    dir: PathBuf,
    tool: ImageTool,
    /// Names with a build in progress (a second build of one is refused).
    building: Arc<Mutex<HashSet<String>>>,
}

/// Removes `path`; one already gone is fine.
fn remove_if_present(path: &Path) -> Result<(), HookError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HookError {
    let what = what.into();
    move |source| HookError::Io { what, source }
}

impl PlainFiles {
    /// VMs in `dir` (created if missing).
    pub fn open(dir: &Path, tool: ImageTool) -> Result<Self, HookError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
            tool,
            building: Arc::default(),
        })
    }

    fn disk_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}{DISK_SUFFIX}"))
    }

    fn state_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}{STATE_SUFFIX}"))
    }

    fn read_state(&self, vm: &str) -> Result<StateFile, HookError> {
        check_vm_name(vm)?;
        let path = self.state_path(vm);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HookError::NoSuchVm(vm.to_owned()))
            }
            Err(e) => return Err(io(format!("read {}", path.display()))(e)),
        };
        serde_json::from_slice(&text).map_err(|_| HookError::Corrupt(path.display().to_string()))
    }

    fn write_state(&self, vm: &str, st: &StateFile) -> Result<(), HookError> {
        let path = self.state_path(vm);
        let bytes = serde_json::to_vec_pretty(st).expect("a state file serialises");
        durable_file::write(&path, &bytes, Existing::Replace)
            .map_err(io(format!("write {}", path.display())))
    }

    fn run_file(&self, vm: &str) -> Result<RunFile, HookError> {
        check_vm_name(vm)?;
        let path = self.dir.join(format!("{vm}{RUN_SUFFIX}"));
        match std::fs::read(&path) {
            Ok(t) => serde_json::from_slice(&t)
                .map_err(|_| HookError::Corrupt(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunFile::default()),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    /// Sends `signal` to the VM's process group, if its run file names one.
    fn signal(&self, vm: &str, signal: libc::c_int) -> Result<(), HookError> {
        let Some(pid) = self.run_file(vm)?.pid.filter(|&p| p > 1) else {
            return Ok(());
        };
        // SAFETY: kill(2) of a process group (a negative pid above -1) with a
        // constant signal.
        if unsafe { libc::kill(-pid, signal) } != 0 {
            return Err(HookError::Process {
                vm: vm.to_owned(),
                reason: format!("signal to {pid}: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Waits until the storage daemon's write count for the disk stops moving
    /// (the stopped process's last requests have landed).
    fn quiesce(&self, vm: &str) -> Result<(), HookError> {
        let Some(sd) = self.run_file(vm)?.storage_daemon else {
            return Ok(());
        };
        let failed = |reason: String| HookError::Process {
            vm: vm.to_owned(),
            reason,
        };
        let mut qmp = super::qmp::Qmp::connect(&sd.qmp).map_err(|e| failed(e.to_string()))?;
        let started = std::time::Instant::now();
        let mut last = None;
        while started.elapsed() < QUIESCE_WITHIN {
            let stats = qmp
                .execute("query-blockstats", serde_json::json!({"query-nodes": true}))
                .map_err(|e| failed(e.to_string()))?;
            let writes = stats
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["node-name"].as_str() == Some(sd.node.as_str()))
                .and_then(|s| s["stats"]["wr_operations"].as_u64());
            if writes.is_some() && writes == last {
                return Ok(());
            }
            last = writes;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(failed(format!("its disk's writes did not stop within {QUIESCE_WITHIN:?}")))
    }

    /// Moves `vm` from one of `from` to `to`.
    fn transition(
        &self,
        vm: &str,
        from: &[VmState],
        to: VmState,
        action: &'static str,
    ) -> Result<(), HookError> {
        let mut st = self.read_state(vm)?;
        if !from.contains(&st.state) {
            return Err(HookError::WrongState {
                vm: vm.to_owned(),
                state: st.state,
                action,
            });
        }
        st.state = to;
        self.write_state(vm, &st)
    }
}

impl Hypervisor for PlainFiles {
    fn vms(&self) -> Result<Vec<VmDisk>, HookError> {
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&self.dir).map_err(io(format!("list {}", self.dir.display())))?;
        for e in entries {
            let e = e.map_err(io(format!("list {}", self.dir.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(vm) = name.strip_suffix(STATE_SUFFIX) else {
                continue;
            };
            if check_vm_name(vm).is_err() {
                continue;
            }
            // A state file without its disk (removed by hand) is no VM.
            let path = self.disk_path(vm);
            if !path.exists() {
                continue;
            }
            match self.read_state(vm) {
                Ok(st) => out.push(VmDisk {
                    name: vm.to_owned(),
                    image: st.image,
                    path,
                    size: st.size,
                    state: st.state,
                }),
                Err(e) => tracing::warn!(vm, "skipping VM: {e}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create_disk(
        &self,
        vm: &str,
        image: &str,
        size: u64,
    ) -> Result<Box<dyn DiskBuild>, HookError> {
        check_vm_name(vm)?;
        if !self.building.lock().insert(vm.to_owned()) {
            return Err(HookError::Exists(vm.to_owned()));
        }
        let guard = BuildingGuard {
            set: self.building.clone(),
            vm: vm.to_owned(),
        };
        if self.state_path(vm).exists() || self.disk_path(vm).exists() {
            return Err(HookError::Exists(vm.to_owned()));
        }
        let part = self.dir.join(format!(".{vm}{DISK_SUFFIX}.part"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .map_err(io(format!("create {}", part.display())))?;
        // Sparse: blocks never written (the image's zero blocks) take no space.
        file.set_len(size)
            .map_err(io(format!("size {}", part.display())))?;
        Ok(Box::new(PlainBuild {
            file,
            part,
            disk: self.disk_path(vm),
            state_path: self.state_path(vm),
            state: StateFile {
                image: Some(image.to_owned()),
                size,
                state: VmState::Stored,
            },
            vm: vm.to_owned(),
            finished: std::sync::atomic::AtomicBool::new(false),
            _guard: guard,
        }))
    }

    fn patch_disk(&self, vm: &str) -> Result<Box<dyn DiskBuild>, HookError> {
        let st = self.read_state(vm)?;
        if st.state != VmState::Stored {
            return Err(HookError::WrongState {
                vm: vm.to_owned(),
                state: st.state,
                action: "patch its disk",
            });
        }
        if !self.building.lock().insert(vm.to_owned()) {
            return Err(HookError::Exists(vm.to_owned()));
        }
        let guard = BuildingGuard {
            set: self.building.clone(),
            vm: vm.to_owned(),
        };
        let disk = self.disk_path(vm);
        let file = OpenOptions::new()
            .write(true)
            .open(&disk)
            .map_err(io(format!("open {}", disk.display())))?;
        Ok(Box::new(PlainPatch {
            file,
            disk,
            vm: vm.to_owned(),
            state: st,
            _guard: guard,
        }))
    }

    fn import_disk(
        &self,
        vm: &str,
        image: &str,
        size: u64,
        source: &str,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<VmDisk, HookError> {
        super::check_import_source(source)?;
        let build = self.create_disk(vm, image, size)?;
        let part = self.dir.join(format!(".{vm}{DISK_SUFFIX}.part"));
        // Into the sized sparse `.part` (`-n`: no creation, so the file stays
        // the build's); zero ranges become holes.
        let mut cmd = self.tool.command();
        cmd.args(["convert", "-n", "-f", "raw", "-O", "raw", source])
            .arg(&part)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let failed = |reason: String| HookError::Import {
            vm: vm.to_owned(),
            reason,
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| failed(format!("starting qemu-img: {e}")))?;
        // stderr is drained beside the wait, so a chatty tool never blocks.
        let mut stderr = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child
                .try_wait()
                .map_err(|e| failed(format!("waiting for qemu-img: {e}")))?
            {
                break st;
            }
            let over = started.elapsed() > IMPORT_LIMIT;
            if over || cancel.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(if over {
                    failed(format!("qemu-img ran longer than {IMPORT_LIMIT:?}"))
                } else {
                    HookError::Cancelled(vm.to_owned())
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let text = reader.join().unwrap_or_default();
        if !status.success() {
            let tail: String = text.trim().chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(failed(format!("qemu-img {status}: {tail}")));
        }
        build.finish()
    }

    fn start(&self, vm: &str) -> Result<(), HookError> {
        self.transition(vm, &[VmState::Stored], VmState::Running, "start")
    }

    fn pause(&self, vm: &str) -> Result<(), HookError> {
        self.transition(vm, &[VmState::Running], VmState::Paused, "pause")?;
        self.signal(vm, libc::SIGSTOP)?;
        self.quiesce(vm)
    }

    fn resume(&self, vm: &str) -> Result<(), HookError> {
        self.transition(vm, &[VmState::Paused], VmState::Running, "resume")?;
        self.signal(vm, libc::SIGCONT)
    }

    fn retire(&self, vm: &str) -> Result<(), HookError> {
        self.read_state(vm)?;
        // Its process, if one runs it, ends first (a stopped one too).
        match self.signal(vm, libc::SIGKILL) {
            Ok(()) | Err(HookError::Process { .. }) => {}
            Err(e) => return Err(e),
        }
        remove_if_present(&self.disk_path(vm))?;
        remove_if_present(&self.dir.join(format!("{vm}{RUN_SUFFIX}")))?;
        let state = self.state_path(vm);
        std::fs::remove_file(&state).map_err(io(format!("remove {}", state.display())))
    }

    fn dirty_since(&self, vm: &str, since: Option<&str>) -> Result<super::Dirty, HookError> {
        let st = self.read_state(vm)?;
        if let Some(sd) = self.run_file(vm)?.storage_daemon {
            return sd.dirty_since(vm, since, &self.tool);
        }
        // Nothing tracks writes to a plain file: from the start, every
        // allocated extent may have changed.
        let extents = if since.is_some() {
            let path = self.disk_path(vm);
            let f = File::open(&path).map_err(io(format!("open {}", path.display())))?;
            crate::index::chunk::data_extents(&f, st.size)
                .into_iter()
                .map(|(start, end)| (start, end - start))
                .collect()
        } else {
            Vec::new()
        };
        Ok(super::Dirty {
            extents,
            token: "rescan".into(),
            tracking: super::Tracking::Rescan,
        })
    }

    fn stop_tracking(&self, vm: &str) -> Result<(), HookError> {
        match self.run_file(vm)?.storage_daemon {
            Some(sd) => sd.stop(vm),
            None => Ok(()),
        }
    }

    fn free_bytes(&self) -> Result<u64, HookError> {
        crate::peer::hostmetrics::read_disk_free(&self.dir).map_err(|e| HookError::Io {
            what: format!("free space of {}", self.dir.display()),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

/// A stored VM's disk patched in place (a migration's later rounds).
struct PlainPatch {
    file: File,
    disk: PathBuf,
    vm: String,
    state: StateFile,
    _guard: BuildingGuard,
}

impl DiskBuild for PlainPatch {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), HookError> {
        if offset.saturating_add(data.len() as u64) > self.state.size {
            return Err(HookError::Io {
                what: format!("patch {}", self.disk.display()),
                source: std::io::Error::other("a write past the disk's size"),
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io(format!("write {}", self.disk.display())))
    }

    fn finish(&self) -> Result<VmDisk, HookError> {
        self.file
            .sync_data()
            .map_err(io(format!("sync {}", self.disk.display())))?;
        Ok(VmDisk {
            name: self.vm.clone(),
            image: self.state.image.clone(),
            path: self.disk.clone(),
            size: self.state.size,
            state: self.state.state,
        })
    }
}

/// Removes a name from the building set when its build ends, however it ends.
struct BuildingGuard {
    set: Arc<Mutex<HashSet<String>>>,
    vm: String,
}

impl Drop for BuildingGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.vm);
    }
}

struct PlainBuild {
    file: File,
    part: PathBuf,
    disk: PathBuf,
    state_path: PathBuf,
    state: StateFile,
    vm: String,
    finished: std::sync::atomic::AtomicBool,
    _guard: BuildingGuard,
}

impl DiskBuild for PlainBuild {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), HookError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.state.size {
            return Err(HookError::Io {
                what: format!("write to {}", self.part.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("bytes {offset}..{end} past the disk's {} bytes", self.state.size),
                ),
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io(format!("write {}", self.part.display())))
    }

    fn finish(&self) -> Result<VmDisk, HookError> {
        use std::sync::atomic::Ordering;
        if self.finished.swap(true, Ordering::AcqRel) {
            return Err(HookError::Exists(self.vm.clone()));
        }
        self.file
            .sync_all()
            .map_err(io(format!("sync {}", self.part.display())))?;
        // The disk first, then the state file that makes it a VM.
        std::fs::rename(&self.part, &self.disk)
            .map_err(io(format!("rename {}", self.part.display())))?;
        let bytes = serde_json::to_vec_pretty(&self.state).expect("a state file serialises");
        durable_file::write(&self.state_path, &bytes, Existing::Keep)
            .map_err(io(format!("write {}", self.state_path.display())))?;
        Ok(VmDisk {
            name: self.vm.clone(),
            image: self.state.image.clone(),
            path: self.disk.clone(),
            size: self.state.size,
            state: self.state.state,
        })
    }
}

impl Drop for PlainBuild {
    fn drop(&mut self) {
        if !self.finished.load(std::sync::atomic::Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_becomes_a_stored_vm_whose_unwritten_blocks_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let hv = PlainFiles::open(dir.path(), ImageTool::default()).unwrap();
        let b = hv.create_disk("web1", "lib/1", 3 * 4096).unwrap();
        assert!(hv.vms().unwrap().is_empty(), "a build in progress is no VM");
        b.write_at(&[7u8; 4096], 4096).unwrap();
        assert!(b.write_at(&[1u8; 4096], 9000).is_err(), "past the end");
        let disk = b.finish().unwrap();
        assert_eq!(disk.state, VmState::Stored);
        let bytes = std::fs::read(&disk.path).unwrap();
        assert_eq!(bytes.len(), 3 * 4096);
        assert!(bytes[..4096].iter().all(|&x| x == 0));
        assert!(bytes[4096..8192].iter().all(|&x| x == 7));
        assert_eq!(hv.vms().unwrap(), vec![disk]);
    }

    #[test]
    fn an_abandoned_build_leaves_nothing_and_a_name_is_built_once() {
        let dir = tempfile::tempdir().unwrap();
        let hv = PlainFiles::open(dir.path(), ImageTool::default()).unwrap();
        let b = hv.create_disk("vm", "img", 4096).unwrap();
        assert!(matches!(
            hv.create_disk("vm", "img", 4096),
            Err(HookError::Exists(_))
        ));
        drop(b);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        hv.create_disk("vm", "img", 4096).unwrap().finish().unwrap();
        assert!(matches!(
            hv.create_disk("vm", "img", 4096),
            Err(HookError::Exists(_))
        ));
    }

    #[test]
    fn lifecycle_follows_the_states_and_retire_removes_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let hv = PlainFiles::open(dir.path(), ImageTool::default()).unwrap();
        hv.create_disk("a", "img", 4096).unwrap().finish().unwrap();
        assert!(matches!(hv.resume("a"), Err(HookError::WrongState { .. })));
        hv.start("a").unwrap();
        hv.pause("a").unwrap();
        assert_eq!(hv.vms().unwrap()[0].state, VmState::Paused);
        hv.resume("a").unwrap();
        assert_eq!(hv.vms().unwrap()[0].state, VmState::Running);
        hv.retire("a").unwrap();
        assert!(hv.vms().unwrap().is_empty());
        assert!(matches!(hv.start("a"), Err(HookError::NoSuchVm(_))));
        assert!(matches!(hv.start("../x"), Err(HookError::BadName(_))));
    }
}
