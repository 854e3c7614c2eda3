//! A LUN's access history outside the LUN itself: the [`BootTrace`] a session
//! collects (which blocks it read first, in what order: one boot), when a
//! history survives a manifest change ([`keeps_history`]), and the history
//! files (`splicer.history_dir`): where each LUN's lives, reading it, and
//! replacing it durably. The history in memory, and the read-ahead order
//! derived from it, live with the LUN (`served_lun`).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use crate::index::Manifest;
use crate::plan::AccessHistory;

use super::lun_address::lun_name;

/// The order in which one session first read a LUN's blocks (one boot).
#[derive(Debug, Default)]
pub struct BootTrace {
    seen: Vec<u64>,
    order: Vec<u64>,
}

impl BootTrace {
    /// Note the blocks of one READ (each block counts once, at its first read).
    pub fn note(&mut self, blocks: std::ops::Range<usize>) {
        for b in blocks {
            let (word, bit) = (b / 64, b % 64);
            if self.seen.len() <= word {
                self.seen.resize(word + 1, 0);
            }
            if self.seen[word] & (1 << bit) == 0 {
                self.seen[word] |= 1 << bit;
                self.order.push(b as u64);
            }
        }
    }

    pub fn order(&self) -> &[u64] {
        &self.order
    }
}

/// Keep a LUN's access history across a manifest change? Only when the new
/// manifest has the same blocks count and block size (positions still mean the
/// same places on the LUN; a resized or re-blocked image starts afresh).
pub fn keeps_history(old: &Manifest, new: &Manifest) -> bool {
    old.blocks.len() == new.blocks.len() && old.block_size == new.block_size
}

/// Where a LUN's access history is kept in `dir`.
pub fn history_path(dir: &Path, target: &str, lun: u16) -> PathBuf {
    named_history_path(dir, &lun_name(target, lun))
}

/// Where the access history of the image named `name` is kept in `dir` (an
/// HTTP image's index name, `http:PATH@VERSION`).
pub fn named_history_path(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.history.json"))
}

/// The saved history at `path`: `None` when there is none, or when it cannot be
/// read or parsed (reported and ignored: a history only orders fetches).
pub fn read_history(path: &Path) -> Option<AccessHistory> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "access history ignored");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "access history ignored");
            None
        }
    }
}

/// Replace the history at `path` with `history`, atomically and durably: a
/// temporary file of this writer's own in the same directory (two sessions
/// ending together never interleave in one file), synced, renamed over the old
/// one, and the directory synced so the rename survives a crash. A failure
/// leaves the old file whole.
pub fn save_history(path: &Path, history: &AccessHistory) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let json = serde_json::to_vec(history).map_err(std::io::Error::from)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&json)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// [`save_history`] off the caller's thread: serialising and writing a big
/// image's history is file I/O, so with a tokio runtime it goes to a blocking
/// thread (a failure is logged: a history only orders fetches).
pub fn save_history_in_background(path: PathBuf, history: AccessHistory) {
    let write = move || {
        if let Err(e) = save_history(&path, &history) {
            tracing::warn!(cause = %e, path = %path.display(), "saving the access history");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(write)),
        Err(_) => write(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_histories_read_back_and_bad_files_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = history_path(dir.path(), "iqn.x:y", 2);
        assert_eq!(path.file_name().unwrap(), "iqn.x:y_2.history.json");
        assert!(read_history(&path).is_none(), "no file yet");
        let mut history = AccessHistory::new("img");
        history.record_boot([3, 1]);
        save_history(&path, &history).unwrap();
        history.record_boot([1]);
        save_history(&path, &history).unwrap();
        let back = read_history(&path).unwrap();
        assert_eq!((back.boots, back.probability(1)), (2, 1.0));
        // Only the history itself is left behind: no temporary files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(read_history(&path).is_none());
    }

    #[test]
    fn a_boot_counts_each_block_once_at_its_first_read() {
        let mut trace = BootTrace::default();
        trace.note(3..5);
        trace.note(0..4);
        trace.note(70..71);
        assert_eq!(trace.order(), [3, 4, 0, 1, 2, 70]);
    }
}
