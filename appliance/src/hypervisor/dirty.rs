//! Knowing what a running VM wrote: the extents of its disk that may have
//! changed since a token, for migration's pre-copy rounds.
//!
//! Linux tracks no per-block changes for a regular file, so without the
//! hypervisor's help the answer is every allocated extent of the disk (a
//! rescan: its cost grows with the allocated bytes, not with what changed).
//! With qemu's dirty bitmaps the answer is what was written: the VM's disk is
//! served by `qemu-storage-daemon` (its run file names the QMP and NBD sockets
//! and the block node), one bitmap per round records the writes, and a round's
//! extents are read over NBD through the `qemu:dirty-bitmap:` metadata context
//! (`qemu-img map` with `x-dirty-bitmap`, as incremental-backup tools read
//! them), which reports dirty ranges as `"data": false`.
//!
//! Rounds (bitmaps `nearblock-N`): the first call clears what an interrupted
//! migration left and adds `nearblock-1`; the call with token `bitmap:N`
//! atomically (one QMP transaction) adds `nearblock-(N+1)` and disables
//! `nearblock-N`, exports `nearblock-N` read-only with that bitmap, reads its
//! dirty extents, and removes the export and the bitmap. A write racing the
//! transaction is in `nearblock-N`, `nearblock-(N+1)` or both: none is lost.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{qmp::Qmp, HookError, ImageTool};

/// Bitmap and export names nearblock owns on a node.
const PREFIX: &str = "nearblock-";
/// Dirty-bitmap granularity: one 4 KiB block (a 1 GiB disk's bitmap is 32 KiB).
pub const GRANULARITY: u32 = 4096;
/// Tries to remove a round's bitmap while its export closes.
const REMOVE_TRIES: usize = 100;

/// How a VM's writes are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tracking {
    /// The hypervisor's dirty bitmap: exactly what was written.
    DirtyBitmap,
    /// Every allocated extent (no tracking): the caller rehashes them all.
    Rescan,
}

/// The extents of a disk that may have changed since a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirty {
    /// `(offset, length)`, sorted, disjoint and not adjacent.
    pub extents: Vec<(u64, u64)>,
    /// For the next call: the writes from now on.
    pub token: String,
    pub tracking: Tracking,
}

impl Dirty {
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

/// How a running VM's disk is served by `qemu-storage-daemon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDaemon {
    /// Its QMP monitor socket.
    pub qmp: PathBuf,
    /// Its NBD server's Unix socket.
    pub nbd: PathBuf,
    /// The block node holding the VM's disk.
    pub node: String,
}

/// Sorted, disjoint, non-adjacent, without empty extents.
pub fn merge(mut extents: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    extents.retain(|e| e.1 > 0);
    extents.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
    for (off, len) in extents {
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => {
                last.1 = last.1.max(off + len - last.0);
            }
            _ => out.push((off, len)),
        }
    }
    out
}

/// The dirty extents in `qemu-img map --output=json` of an export read with
/// `x-dirty-bitmap` (dirty ranges say `"data": false`).
pub fn dirty_in_map(json: &str) -> Result<Vec<(u64, u64)>, String> {
    #[derive(Deserialize)]
    struct Range {
        start: u64,
        length: u64,
        data: bool,
    }
    let ranges: Vec<Range> =
        serde_json::from_str(json).map_err(|e| format!("qemu-img map output: {e}"))?;
    Ok(merge(
        ranges
            .into_iter()
            .filter(|r| !r.data)
            .map(|r| (r.start, r.length))
            .collect(),
    ))
}

/// The round a token names: `bitmap:N` → `Some(N)`; none → `None` (start).
pub fn bitmap_round(token: Option<&str>) -> Result<Option<u64>, String> {
    let Some(t) = token else {
        return Ok(None);
    };
    t.strip_prefix("bitmap:")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .map(Some)
        .ok_or_else(|| format!("`{t}` is not a dirty-bitmap token (bitmap:N)"))
}

fn bitmap_name(round: u64) -> String {
    format!("{PREFIX}{round}")
}

fn tracking_error(vm: &str, reason: impl std::fmt::Display) -> HookError {
    HookError::Tracking {
        vm: vm.to_owned(),
        reason: reason.to_string(),
    }
}

impl StorageDaemon {
    /// The extents written since `since` (a token of an earlier call), or —
    /// with none — starts tracking: no extents, and the token to ask with.
    pub fn dirty_since(
        &self,
        vm: &str,
        since: Option<&str>,
        tool: &ImageTool,
    ) -> Result<Dirty, HookError> {
        let round = bitmap_round(since).map_err(|e| tracking_error(vm, e))?;
        let mut qmp = Qmp::connect(&self.qmp).map_err(|e| tracking_error(vm, e))?;
        let node = self.node.as_str();
        let Some(round) = round else {
            self.clear(&mut qmp).map_err(|e| tracking_error(vm, e))?;
            qmp.execute(
                "block-dirty-bitmap-add",
                json!({"node": node, "name": bitmap_name(1), "granularity": GRANULARITY}),
            )
            .map_err(|e| tracking_error(vm, e))?;
            return Ok(Dirty {
                extents: Vec::new(),
                token: "bitmap:1".into(),
                tracking: Tracking::DirtyBitmap,
            });
        };
        let (this, next) = (bitmap_name(round), bitmap_name(round + 1));
        qmp.execute(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": node, "name": next, "granularity": GRANULARITY}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": this}},
            ]}),
        )
        .map_err(|e| tracking_error(vm, e))?;
        qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": this, "node-name": node, "name": this,
                   "writable": false, "bitmaps": [this]}),
        )
        .map_err(|e| tracking_error(vm, e))?;
        let map = self.read_map(&this, tool);
        // The export and the bitmap go whatever the map said.
        let _ = qmp.execute("block-export-del", json!({"id": this}));
        let removed = (0..REMOVE_TRIES).find_map(|_| {
            match qmp.execute("block-dirty-bitmap-remove", json!({"node": node, "name": this})) {
                Ok(_) => Some(Ok(())),
                // Busy while the export closes.
                Err(super::qmp::QmpError::Command { desc, .. }) if desc.contains("busy") || desc.contains("in use") => {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
                Err(e) => Some(Err(e)),
            }
        });
        let extents = map.map_err(|e| tracking_error(vm, e))?;
        match removed {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(tracking_error(vm, e)),
            None => return Err(tracking_error(vm, format!("bitmap {this} stayed busy"))),
        }
        Ok(Dirty {
            extents,
            token: format!("bitmap:{}", round + 1),
            tracking: Tracking::DirtyBitmap,
        })
    }

    /// Stops tracking: removes every bitmap and export nearblock left.
    pub fn stop(&self, vm: &str) -> Result<(), HookError> {
        let mut qmp = Qmp::connect(&self.qmp).map_err(|e| tracking_error(vm, e))?;
        self.clear(&mut qmp).map_err(|e| tracking_error(vm, e))
    }

    /// Removes nearblock's exports and bitmaps on the node (an interrupted
    /// migration's).
    fn clear(&self, qmp: &mut Qmp) -> Result<(), super::qmp::QmpError> {
        let exports = qmp.execute("query-block-exports", Value::Null)?;
        for e in exports.as_array().into_iter().flatten() {
            if let Some(id) = e["id"].as_str().filter(|id| id.starts_with(PREFIX)) {
                let _ = qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}));
            }
        }
        let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
        let names: Vec<String> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["node-name"].as_str() == Some(self.node.as_str()))
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .filter(|n| n.starts_with(PREFIX))
            .collect();
        for name in names {
            for _ in 0..REMOVE_TRIES {
                match qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": self.node, "name": name}),
                ) {
                    Err(super::qmp::QmpError::Command { desc, .. })
                        if desc.contains("busy") || desc.contains("in use") =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(_) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// `qemu-img map` of export `name` read with its dirty bitmap.
    fn read_map(&self, name: &str, tool: &ImageTool) -> Result<Vec<(u64, u64)>, String> {
        let socket = self.nbd.to_str().ok_or("the NBD socket path is not UTF-8")?;
        if socket.contains(',') {
            return Err("the NBD socket path contains a comma".into());
        }
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={socket},export={name},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
        );
        let out = tool
            .command()
            .args(["map", "--output=json", "--image-opts", &opts])
            .output()
            .map_err(|e| format!("running qemu-img map: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img map {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        dirty_in_map(&String::from_utf8_lossy(&out.stdout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_sorted_and_disjoint() {
        assert_eq!(
            merge(vec![(8, 4), (0, 4), (4, 2), (20, 0), (11, 5), (30, 1)]),
            [(0, 6), (8, 8), (30, 1)]
        );
        assert_eq!(merge(vec![]), []);
    }

    #[test]
    fn dirty_ranges_are_the_ones_without_data() {
        // What qemu-img 7.2 printed for 8 KiB at 1 MiB and 4 KiB at 10 MiB
        // written under a 64 KiB-granularity bitmap of a 64 MiB disk.
        let map = r#"[{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0},
{ "start": 1048576, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 1114112, "length": 9371648, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1114112},
{ "start": 10485760, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 10551296, "length": 56557568, "depth": 0, "present": true, "zero": false, "data": true, "offset": 10551296}]"#;
        assert_eq!(
            dirty_in_map(map).unwrap(),
            [(1_048_576, 65_536), (10_485_760, 65_536)]
        );
        assert!(dirty_in_map("not json").is_err());
    }

    #[test]
    fn tokens_name_rounds() {
        assert_eq!(bitmap_round(None), Ok(None));
        assert_eq!(bitmap_round(Some("bitmap:3")), Ok(Some(3)));
        for bad in ["bitmap:0", "bitmap:", "rescan", "bitmap:-1", "bitmap:x"] {
            assert!(bitmap_round(Some(bad)).is_err(), "{bad}");
        }
    }
}
