//! An HTTP origin's document root as the library's agent indexes it
//! (`[[http_root]]`): every file under the directory whose URL path is plain
//! ([`plain_url_path`]) is one image, named by the version the origin serves
//! ([`http_image_name`]: its `ETag`, `Last-Modified` and length, asked of the
//! origin itself with `HEAD`, so the names are the origin's own words).
//!
//! A file modified within [`SETTLE`] is left for a later scan: nginx's `ETag`
//! is the modification second and the length, so a same-length rewrite within
//! one second keeps it, and only a settled file's content is what its
//! validators name. The agent checks after indexing that the file's length and
//! modification time are still those it validated ([`unchanged`]); a file that
//! changed meanwhile is dropped until the next scan.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::index::{http_image_name, http_name::plain_url_path};
use crate::peer::config::HttpRootConfig;

/// Files modified more recently than this are not indexed yet.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Files looked at per root at most, and directory depth.
const MAX_FILES: usize = 100_000;
const MAX_DEPTH: usize = 16;

/// A file's length and modification time, as validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub len: u64,
    pub modified: SystemTime,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        Ok(Stamp {
            len: meta.len(),
            modified: meta.modified()?,
        })
    }
}

/// One version of one file, ready to index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub name: String,
    pub path: PathBuf,
    pub stamp: Stamp,
}

/// What one look at a root found.
#[derive(Debug, Default)]
pub struct RootScan {
    pub versions: Vec<Version>,
    /// Files modified within [`SETTLE`] (indexed by a later scan).
    pub unsettled: usize,
    pub errors: Vec<String>,
}

/// The URL path of `rel` (relative to the root) under `prefix`, if plain.
pub fn url_path(prefix: &str, rel: &Path) -> Option<String> {
    let rel = rel.to_str()?;
    let prefix = prefix.trim_end_matches('/');
    let path = format!("{prefix}/{rel}");
    plain_url_path(&path).then_some(path)
}

/// Whether a file last modified at `modified` has settled by `now`.
pub fn settled(modified: SystemTime, now: SystemTime) -> bool {
    now.duration_since(modified).is_ok_and(|age| age >= SETTLE)
}

/// The file still has the length and modification time it was validated with.
pub fn unchanged(version: &Version) -> bool {
    Stamp::of(&version.path).is_ok_and(|s| s == version.stamp)
}

/// Every regular file under `dir` (bounded), relative paths, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![(PathBuf::new(), 0usize)];
    while let Some((rel, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            if out.len() >= MAX_FILES {
                break;
            }
            let Ok(kind) = e.file_type() else { continue };
            let child = rel.join(e.file_name());
            if kind.is_dir() && depth + 1 < MAX_DEPTH {
                stack.push((child, depth + 1));
            } else if kind.is_file() {
                out.push(child);
            }
        }
    }
    out.sort();
    out
}

/// The versions of `root`'s settled files the origin serves now.
pub fn scan_root(root: &HttpRootConfig, http: &ureq::Agent, now: SystemTime) -> RootScan {
    let mut scan = RootScan::default();
    for rel in files(&root.dir) {
        let Some(url) = url_path(&root.url_prefix, &rel) else {
            continue;
        };
        let path = root.dir.join(&rel);
        let stamp = match Stamp::of(&path) {
            Ok(s) => s,
            Err(e) => {
                scan.errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if !settled(stamp.modified, now) {
            scan.unsettled += 1;
            continue;
        }
        match validators(http, &root.origin, &url) {
            Ok((etag, last_modified, len)) if len == stamp.len => scan.versions.push(Version {
                name: http_image_name(&url, etag.as_deref(), last_modified.as_deref(), len),
                path,
                stamp,
            }),
            Ok((_, _, len)) => scan.errors.push(format!(
                "{url}: the origin serves {len} B, the file has {} B",
                stamp.len
            )),
            Err(e) => scan.errors.push(format!("{url}: {e}")),
        }
    }
    scan
}

/// `ETag`, `Last-Modified` and `Content-Length` of `url` at the origin.
fn validators(
    http: &ureq::Agent,
    origin: &str,
    url: &str,
) -> Result<(Option<String>, Option<String>, u64), String> {
    let resp = http
        .head(format!("{}{url}", origin.trim_end_matches('/')))
        .call()
        .map_err(|e| format!("HEAD: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("HEAD: status {}", resp.status()));
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if header("content-encoding").is_some_and(|e| !e.eq_ignore_ascii_case("identity")) {
        return Err("HEAD: an encoded body".into());
    }
    let len = header("content-length")
        .and_then(|l| l.parse().ok())
        .ok_or("HEAD: no Content-Length")?;
    let etag = header("etag").filter(|t| t.starts_with('"'));
    let last_modified = header("last-modified");
    if etag.is_none() && last_modified.is_none() {
        return Err("HEAD: no strong validator".into());
    }
    Ok((etag, last_modified, len))
}

/// The client the agent asks origins with (bounded; statuses are answers).
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_paths_and_settling() {
        assert_eq!(url_path("/images/", Path::new("b.raw")).as_deref(), Some("/images/b.raw"));
        assert_eq!(url_path("/", Path::new("a/b.raw")).as_deref(), Some("/a/b.raw"));
        assert_eq!(url_path("/", Path::new("a b.raw")), None);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(settled(t, t + SETTLE));
        assert!(!settled(t, t + Duration::from_millis(1_999)));
        assert!(!settled(t + Duration::from_secs(5), t), "modified in the future");
    }

    #[test]
    fn files_are_found_recursively_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("x.raw"), b"x").unwrap();
        std::fs::write(dir.path().join("a/b/y.raw"), b"y").unwrap();
        assert_eq!(files(dir.path()), [PathBuf::from("a/b/y.raw"), PathBuf::from("x.raw")]);
        let path = dir.path().join("x.raw");
        let v = Version {
            name: "n".into(),
            path: path.clone(),
            stamp: Stamp::of(&path).unwrap(),
        };
        assert!(unchanged(&v));
        std::fs::write(&path, b"xy").unwrap();
        assert!(!unchanged(&v));
    }
}
