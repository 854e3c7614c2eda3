//! nearblock processes (agents, indexers, …) started inside lab nodes, owned by a
//! guard: dropping [`Procs`] SIGKILLs and reaps every process still running.
//! Declare it *after* the [`Lab`] so it is dropped first (locals drop in reverse).

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{nearblock_bin, Lab};

struct Proc {
    name: String,
    node: String,
    child: Child,
    log: PathBuf,
}

/// Named nearblock processes in lab nodes.
#[derive(Default)]
pub struct Procs {
    procs: Vec<Proc>,
    /// Every log ever started here (kept after a kill, for restarts).
    logs: Vec<(String, PathBuf)>,
}

impl Procs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `nearblock ARGS…` in `node` as `name` (unique); stdout and stderr go
    /// to `<lab dir>/<name>.log` (appended, so a restart keeps the earlier log).
    pub fn spawn(&mut self, lab: &Lab, name: &str, node: &str, args: &[&str]) -> Result<()> {
        let bin = nearblock_bin()?;
        let mut command = vec![bin.to_str().context("binary path")?];
        command.extend_from_slice(args);
        self.spawn_program(lab, name, node, &command)
    }

    /// Starts `argv` (any program, e.g. nginx) in `node` as `name` (unique),
    /// logging like [`Self::spawn`]; killed with the others.
    pub fn spawn_program(
        &mut self,
        lab: &Lab,
        name: &str,
        node: &str,
        command: &[&str],
    ) -> Result<()> {
        if self.procs.iter().any(|p| p.name == name) {
            bail!("a process named {name} is already running");
        }
        let log = lab.dir.path().join(format!("{name}.log"));
        let f = File::options().create(true).append(true).open(&log)?;
        let child = lab
            .cmd(node, command)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name} in {node}"))?;
        if !self.logs.iter().any(|(n, _)| n == name) {
            self.logs.push((name.into(), log.clone()));
        }
        self.procs.push(Proc {
            name: name.into(),
            node: node.into(),
            child,
            log,
        });
        Ok(())
    }

    fn get(&mut self, name: &str) -> Result<&mut Proc> {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process named {name}"))
    }

    /// The log so far (also of a killed process).
    pub fn log(&self, name: &str) -> String {
        self.logs
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, p)| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The node `name` runs in.
    pub fn node(&self, name: &str) -> Option<&str> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.node.as_str())
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`).
    pub fn signal(&mut self, name: &str, sig: i32) -> Result<()> {
        let p = self.get(name)?;
        // `ip netns exec` execs the command, so the child's pid is nearblock's.
        // SAFETY: signalling our own child.
        if unsafe { libc::kill(p.child.id().cast_signed(), sig) } != 0 {
            bail!("kill({name}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL and reap; the process is forgotten (its log stays).
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no process named {name}"))?;
        let mut p = self.procs.remove(i);
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// Fails with the log if the process has exited.
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        let p = self.get(name)?;
        if let Some(st) = p.child.try_wait()? {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            bail!("{name} exited ({st}):\n{log}");
        }
        Ok(())
    }

    /// Waits until `pred(log)` holds (the process must stay alive).
    pub fn wait_log(
        &mut self,
        name: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if pred(&self.log(name)) {
                return Ok(());
            }
            self.check_alive(name)?;
            if Instant::now() > deadline {
                bail!(
                    "{name}: condition not met within {within:?}:\n{}",
                    self.log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
        }
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
    }
}
