//! Whole-file writes that survive a crash: the new content is written to a
//! temporary file beside the target (owner-only from its creation), fsynced,
//! moved into place in one step, and the directory fsynced so the move itself
//! is on disk. A reader sees the old file or the new one, never a torn one.

use std::{io::Write, os::unix::fs::PermissionsExt, path::Path};

/// How the move into place treats a file already at the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (state files rewritten as they change).
    Replace,
    /// Refuse (`AlreadyExists`): a key file is never written over.
    Keep,
}

/// Write `bytes` as the whole content of `path`, mode 0600, durably.
pub fn write(path: &Path, bytes: &[u8], existing: Existing) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".nearblock-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map(drop),
        Existing::Keep => tmp.persist_noclobber(path).map(drop),
    }
    .map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Files in `dir` besides `keep` (a temporary file left behind).
    fn others(dir: &Path, keep: &str) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != keep)
            .collect()
    }

    #[test]
    fn replace_writes_and_rewrites_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, b"one", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);
        write(&path, b"two", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(others(dir.path(), "state.json").is_empty());
    }

    #[test]
    fn keep_never_writes_over_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write(&path, b"first", Existing::Keep).unwrap();
        assert_eq!(mode(&path), 0o600);
        let e = write(&path, b"second", Existing::Keep).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert!(others(dir.path(), "node.key").is_empty(), "no temp left");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent/state.json");
        assert!(write(&path, b"x", Existing::Replace).is_err());
    }

    #[test]
    fn a_bare_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("x.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/x.json")), Path::new("/a"));
    }
}
