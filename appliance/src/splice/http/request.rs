//! A client's request head, read with `httparse`, and whether the HTTP front
//! end may answer it from blocks. Only the plainest requests qualify: `GET` or
//! `HEAD` of an origin-form path of safe characters (no query), HTTP/1.x, with
//! no body, no upgrade, no expectation, at most one `Range` of one range.
//! Anything else — and anything ambiguous, like two `Content-Length`s or a
//! `Transfer-Encoding` — is passed to the origin untouched, with the rest of
//! the connection: the front end never reads a request differently from the
//! origin.

/// Request heads longer than this are passed through.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers per request at most (more: passed through).
const MAX_HEADERS: usize = 64;

/// A request the front end may answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, as sent (origin-form, safe characters only).
    pub path: String,
    /// The one `Host` header's value (the front end's own range requests
    /// name the same host).
    pub host: String,
    /// Bytes of the head, request line to the blank line.
    pub head_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// What the bytes at the start of a client's buffer are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole head yet (and under [`MAX_HEAD`]).
    Partial,
    /// A request the front end may answer.
    Servable(Request),
    /// Passed through, with the rest of the connection (why).
    Pass(&'static str),
}

/// Read the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) => return Parsed::Pass("request head over the size cap"),
        Err(httparse::Error::TooManyHeaders) => return Parsed::Pass("too many headers"),
        Err(_) => return Parsed::Pass("not an HTTP/1.x request head"),
    };
    if head_len > MAX_HEAD {
        return Parsed::Pass("request head over the size cap");
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        _ => return Parsed::Pass("method other than GET or HEAD"),
    };
    // httparse skips empty lines before the request line (RFC 9112 allows
    // it); the validation form is made by rewriting the head's first bytes,
    // so a servable head starts with its method (found by the fuzz target).
    if !(buf.starts_with(b"GET ") || buf.starts_with(b"HEAD ")) {
        return Parsed::Pass("bytes before the request line");
    }
    let Some(path) = req.path.filter(|p| crate::index::http_name::plain_url_path(p)) else {
        return Parsed::Pass("path not a plain origin-form path");
    };
    if req.version != Some(1) {
        return Parsed::Pass("HTTP/1.0");
    }
    if let Some(why) = refused_headers(req.headers) {
        return Parsed::Pass(why);
    }
    // Exactly one Host, in UTF-8 (checked just above).
    let host = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .unwrap_or_default()
        .to_string();
    Parsed::Servable(Request {
        method,
        path: path.to_string(),
        host,
        head_len,
    })
}

/// Why the request's headers make it one to pass through, if they do.
fn refused_headers(headers: &[httparse::Header<'_>]) -> Option<&'static str> {
    let mut hosts = 0;
    let mut ranges = 0;
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        // Every header is checked: one that cannot be read stops the request
        // from being served (it used to stop the checks instead: found by
        // the fuzz target, a Transfer-Encoding after such a header).
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Some("a header value that is not UTF-8");
        };
        match name.as_str() {
            "content-length" | "transfer-encoding" => return Some("a request body"),
            "expect" => return Some("Expect"),
            "upgrade" | "http2-settings" => return Some("an upgrade"),
            // `close` works direct but would close the origin's side after
            // the validation: passed through. Only keep-alive is plain.
            "connection"
                if value
                    .split(',')
                    .any(|t| !t.trim().eq_ignore_ascii_case("keep-alive")) =>
            {
                return Some("Connection other than keep-alive");
            }
            "host" => hosts += 1,
            "range" => {
                ranges += 1;
                if value.contains(',') {
                    return Some("a multi-range request");
                }
            }
            _ => {}
        }
    }
    if hosts != 1 {
        return Some("not exactly one Host");
    }
    if ranges > 1 {
        return Some("several Range headers");
    }
    None
}

/// `head` (a servable request's head) as a `HEAD` request: the same headers,
/// so the origin's answer carries the status and headers the `GET` would get.
pub fn as_head(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 1);
    match head.strip_prefix(b"GET ") {
        Some(rest) => {
            out.extend_from_slice(b"HEAD ");
            out.extend_from_slice(rest);
        }
        None => out.extend_from_slice(head),
    }
    out
}

/// A `GET` of `range` (inclusive end) of `path`, only if the origin still has
/// the version `validator` names (`If-Match` for an entity tag, else
/// `If-Unmodified-Since`): the front end's own request for blocks no peer had.
pub fn range_request(host: &str, path: &str, range: std::ops::Range<u64>, validator: &Validator) -> Vec<u8> {
    let condition = match validator {
        Validator::ETag(tag) => format!("If-Match: {tag}"),
        Validator::LastModified(date) => format!("If-Unmodified-Since: {date}"),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={}-{}\r\n{condition}\r\n\r\n",
        range.start,
        range.end - 1
    )
    .into_bytes()
}

/// What names one version of a file at the origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validator {
    /// A strong entity tag, quotes included.
    ETag(String),
    LastModified(String),
}


#[cfg(test)]
mod tests {
    use super::*;

    fn servable(text: &str) -> Request {
        match parse(text.as_bytes()) {
            Parsed::Servable(r) => r,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn passed(text: &str) -> &'static str {
        match parse(text.as_bytes()) {
            Parsed::Pass(why) => why,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn plain_gets_and_heads_are_servable() {
        let r = servable("GET /images/b.raw HTTP/1.1\r\nHost: lib\r\nRange: bytes=0-9\r\n\r\nGET /x");
        assert_eq!(
            r,
            Request {
                method: Method::Get,
                path: "/images/b.raw".into(),
                host: "lib".into(),
                head_len: 59,
            }
        );
        let r = servable("HEAD /a HTTP/1.1\r\nhost: lib\r\nConnection: Keep-Alive\r\n\r\n");
        assert_eq!(r.method, Method::Head);
        assert_eq!(parse(b"GET /a HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
    }

    #[test]
    fn anything_unusual_or_ambiguous_passes_through() {
        let cases = [
            "POST /a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a/../b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a%20b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET //a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1,5-6\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /a HTTP/1.1\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
        ];
        for c in cases {
            passed(c);
        }
        // The fuzz target's find: a header value that is not UTF-8 before a
        // Transfer-Encoding.
        assert_eq!(
            parse(b"\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Pass("bytes before the request line")
        );
        let mut odd = b"GET /a HTTP/1.1\r\nHost: x\x86\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        assert_eq!(
            parse(&odd),
            Parsed::Pass("a header value that is not UTF-8")
        );
        odd.retain(|&b| b != 0x86);
        assert_eq!(parse(&odd), Parsed::Pass("a request body"));
        let long = format!("GET /a HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(passed(&long), "request head over the size cap");
        let unfinished = format!("GET /a HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(passed(&unfinished), "request head over the size cap");
    }

    #[test]
    fn the_validation_request_is_the_same_request_as_head() {
        let head = b"GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n\r\n";
        assert_eq!(
            as_head(head),
            b"HEAD /a HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n\r\n".to_vec()
        );
        let r = range_request("x", "/a", 4096..8192, &Validator::ETag("\"5f-10\"".into()));
        assert_eq!(
            r,
            b"GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=4096-8191\r\nIf-Match: \"5f-10\"\r\n\r\n".to_vec()
        );
    }
}
