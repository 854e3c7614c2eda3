//! The origin's response head, read with `httparse`: how its body is framed
//! (so a keep-alive connection can be followed response by response), and
//! whether it describes a body the front end may serve from blocks — a `200`
//! or `206` of an identity-encoded entity with a validator, whose length and
//! range are stated once and agree.

use std::ops::Range;

use super::request::Validator;

const MAX_HEADERS: usize = 64;
/// Response heads longer than this end the front end's part in the connection.
pub const MAX_HEAD: usize = 32 * 1024;

/// The parts of a response head the front end acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub head_len: usize,
    /// Every `Content-Length` value (one, if the response is plain).
    content_lengths: Vec<String>,
    content_range: Option<String>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// A `Transfer-Encoding` or a `Content-Encoding` other than identity.
    encoded: bool,
    chunked: bool,
    /// The origin closes the connection after this response.
    pub closes: bool,
}

/// How a response's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (an answer to `HEAD`, 1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked, or until the origin closes: followed as bytes to the end.
    ToTheEnd,
}

/// A body the front end may serve: which bytes of the file, of how many, and
/// the validator that names the file's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedBody {
    pub range: Range<u64>,
    pub total: u64,
    pub validator: Validator,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// Read the response head at the start of `buf` (`Ok(None)`: not whole yet).
pub fn parse(buf: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head over the size cap"),
        Err(_) => return Err("not an HTTP/1.x response head"),
    };
    let mut head = ResponseHead {
        status: resp.code.unwrap_or(0),
        head_len,
        ..ResponseHead::default()
    };
    let mut keep_alive = false;
    for h in resp.headers.iter() {
        // A value that is not UTF-8 could read as another (a validator
        // above all): such a response is never served from blocks.
        let Ok(value) = std::str::from_utf8(h.value).map(|v| v.trim().to_string()) else {
            head.encoded = true;
            continue;
        };
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => head.content_lengths.push(value),
            "content-range" => {
                // Two of them: ambiguous, never served.
                let twice = head.content_range.replace(value).is_some();
                head.encoded |= twice;
            }
            "etag" => head.etag = Some(value),
            "last-modified" => head.last_modified = Some(value),
            "transfer-encoding" => {
                head.encoded = true;
                head.chunked = true;
            }
            "content-encoding" if !value.eq_ignore_ascii_case("identity") => head.encoded = true,
            "connection" => {
                for t in value.split(',').map(str::trim) {
                    head.closes |= t.eq_ignore_ascii_case("close");
                    keep_alive |= t.eq_ignore_ascii_case("keep-alive");
                }
            }
            _ => {}
        }
    }
    if resp.version == Some(0) && !keep_alive {
        head.closes = true;
    }
    Ok(Some(head))
}

impl ResponseHead {
    /// How the body of this response to a request (`head_request`: a `HEAD`) ends.
    pub fn framing(&self, head_request: bool) -> Framing {
        if head_request || self.status < 200 || self.status == 204 || self.status == 304 {
            return Framing::Empty;
        }
        if self.chunked {
            return Framing::ToTheEnd;
        }
        match self.content_length() {
            Some(n) => Framing::Length(n),
            None => Framing::ToTheEnd,
        }
    }

    /// The one `Content-Length` (several, even equal, count as none).
    fn content_length(&self) -> Option<u64> {
        match self.content_lengths.as_slice() {
            [one] if one.bytes().all(|b| b.is_ascii_digit()) => one.parse().ok(),
            _ => None,
        }
    }

    /// The body a `GET` with these status and headers carries, if it may be
    /// served from blocks (why not, else).
    pub fn served_body(&self) -> Result<ServedBody, &'static str> {
        if self.encoded || self.chunked {
            return Err("encoded or chunked body");
        }
        let length = self.content_length().ok_or("no single Content-Length")?;
        let validator = match (&self.etag, &self.last_modified) {
            (Some(tag), _) if tag.starts_with('"') => Validator::ETag(tag.clone()),
            (_, Some(date)) => Validator::LastModified(date.clone()),
            _ => return Err("no strong validator"),
        };
        let (range, total) = match self.status {
            200 if self.content_range.is_none() => (0..length, length),
            206 => {
                let (range, total) = self
                    .content_range
                    .as_deref()
                    .and_then(content_range)
                    .ok_or("unreadable Content-Range")?;
                if range.end - range.start != length {
                    return Err("Content-Range and Content-Length disagree");
                }
                (range, total)
            }
            _ => return Err("status other than 200 or 206"),
        };
        Ok(ServedBody {
            range,
            total,
            validator,
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
        })
    }
}

/// `bytes a-b/total` as the range `a..b+1` and the total.
pub fn content_range(value: &str) -> Option<(Range<u64>, u64)> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let digits = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (a, b, total) = (digits(a)?, digits(b)?, digits(total)?);
    (a <= b && b < total).then_some((a..b + 1, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> ResponseHead {
        parse(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn nginx_answers_frame_and_serve() {
        let h = head("HTTP/1.1 206 Partial Content\r\nContent-Length: 11\r\nLast-Modified: Mon, 07 Dec 2026 14:45:41 GMT\r\nConnection: keep-alive\r\nETag: \"6b16c695-186a0\"\r\nContent-Range: bytes 10-20/100000\r\n\r\n");
        assert_eq!(h.framing(false), Framing::Length(11));
        assert_eq!(h.framing(true), Framing::Empty);
        assert!(!h.closes);
        let b = h.served_body().unwrap();
        assert_eq!((b.range, b.total), (10..21, 100_000));
        assert_eq!(b.validator, Validator::ETag("\"6b16c695-186a0\"".into()));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLast-Modified: x\r\n\r\n");
        assert_eq!(h.served_body().unwrap().range, 0..5);
        assert_eq!(
            h.served_body().unwrap().validator,
            Validator::LastModified("x".into())
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
    }

    #[test]
    fn anything_else_is_not_served_and_frames_safely() {
        let refused = [
            "HTTP/1.1 416 Requested Range Not Satisfiable\r\nContent-Length: 197\r\nContent-Range: bytes */100000\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: W/\"a\"\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Encoding: gzip\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 0-5/10\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 5-9/9\r\nETag: \"a\"\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
        ];
        for r in refused {
            assert!(head(r).served_body().is_err(), "{r}");
        }
        let dup = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!(dup.framing(false), Framing::ToTheEnd);
        let chunked = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(chunked.framing(false), Framing::ToTheEnd);
        assert_eq!(head("HTTP/1.1 304 Not Modified\r\n\r\n").framing(false), Framing::Empty);
        assert!(head("HTTP/1.0 200 OK\r\n\r\n").closes);
        assert!(!head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").closes);
        assert!(head("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").closes);
        assert!(parse(b"SSH-2.0-x\r\n\r\n").is_err());
        let odd = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"\u{80}\"\r\n\r\n");
        assert!(odd.served_body().is_ok(), "UTF-8 beyond ASCII is still text");
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"\xff\"\r\n\r\n";
        assert!(parse(bytes).unwrap().unwrap().served_body().is_err());
        assert_eq!(content_range("bytes 0-0/1"), Some((0..1, 1)));
        assert_eq!(content_range("bytes */1"), None);
        assert_eq!(content_range("bytes 1-0/5"), None);
        assert_eq!(content_range("bytes +1-2/5"), None);
    }
}
