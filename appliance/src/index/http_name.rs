//! The index name of one version of a file an HTTP origin serves:
//! `http:PATH@VERSION`, where VERSION is 16 hex digits of blake3 over the
//! validators the origin itself sends for it (`ETag`, `Last-Modified`) and its
//! length. The library's agent indexes a document root under these names; a
//! rack appliance looks up the name of exactly the version the origin has
//! just validated, so a file that changed at the origin (a new validator) is
//! another name — never the old manifest.

/// The index name of the version of `path` with these validators and length.
pub fn http_image_name(
    path: &str,
    etag: Option<&str>,
    last_modified: Option<&str>,
    length: u64,
) -> String {
    let mut h = blake3::Hasher::new();
    for part in [etag.unwrap_or(""), last_modified.unwrap_or("")] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&length.to_le_bytes());
    format!("http:{path}@{}", &h.finalize().to_hex()[..16])
}

/// A URL path images are named by: `/` then segments of letters,
/// digits, `.`, `-`, `_`; no empty, `.` or `..` segment, no query or fragment
/// (so there is no second way to spell it, no decoding to disagree on).
pub fn plain_url_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    path.len() <= 1024
        && rest.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_validator_and_the_length_name_the_version() {
        let a = http_image_name("/i/b.raw", Some("\"1-2\""), Some("Mon"), 10);
        assert!(a.starts_with("http:/i/b.raw@") && a.len() == "http:/i/b.raw@".len() + 16);
        assert_ne!(a, http_image_name("/i/b.raw", Some("\"1-3\""), Some("Mon"), 10));
        assert_ne!(a, http_image_name("/i/b.raw", Some("\"1-2\""), Some("Tue"), 10));
        assert_ne!(a, http_image_name("/i/b.raw", Some("\"1-2\""), Some("Mon"), 11));
        assert_ne!(a, http_image_name("/i/c.raw", Some("\"1-2\""), Some("Mon"), 10));
        assert_ne!(
            http_image_name("/a", Some("x"), None, 1),
            http_image_name("/a", None, Some("x"), 1)
        );
    }

    #[test]
    fn plain_paths_have_one_spelling() {
        for ok in ["/a", "/images/b-1_x.raw", "/a/b/c"] {
            assert!(plain_url_path(ok), "{ok}");
        }
        for bad in ["", "a", "/", "//a", "/a/", "/a/./b", "/a/../b", "/a%2fb", "/a?b", "/a#b", "/a b"] {
            assert!(!plain_url_path(bad), "{bad}");
        }
    }
}
