//! One HTTP connection, request by request. For each servable `GET` the
//! origin is asked the same request as `HEAD`; when its answer describes a
//! body of an indexed version of the file ([`super::images`]), the client gets
//! the origin's own status and headers, and the body from the block core
//! (zero, cached and fetched blocks; what no peer has, from the origin by
//! range, only if its version is unchanged, verified before a byte is sent).
//! Anything else gets the origin's answer to the request itself. The first
//! request that is not servable hands the rest of the connection, both ways,
//! to the byte relay: the origin reads it as it was sent.

use std::collections::HashMap;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::{atomic::Ordering, Arc};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::debug;

use crate::block_core::{self, ReadPlan, ServedImage};
use crate::index::http_image_name;
use crate::splice::catalog::BootTrace;

use super::request::{self, Method, Parsed};
use super::response::{self, Framing, ResponseHead, ServedBody};
use super::HttpContext;

/// Bytes of a body planned and written at a time (a multiple of every block size).
const CHUNK: u64 = 1 << 20;

/// Why a connection ended before its requests did.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{side}: {source}")]
    Io {
        side: &'static str,
        source: std::io::Error,
    },
    #[error("the origin's response: {0}")]
    Response(&'static str),
    #[error("the origin closed the connection after validating")]
    OriginClosed,
    #[error("the origin's range answer: {0}")]
    OriginRange(String),
    #[error("origin data: {0}")]
    Verify(#[from] block_core::VerifyError),
}

fn client_io(source: std::io::Error) -> ExchangeError {
    ExchangeError::Io {
        side: "client",
        source,
    }
}

fn origin_io(source: std::io::Error) -> ExchangeError {
    ExchangeError::Io {
        side: "origin",
        source,
    }
}

/// The two sockets and what has been read from each but not handled.
struct Conn {
    client: TcpStream,
    origin: TcpStream,
    from_client: BytesMut,
    from_origin: BytesMut,
    /// What this connection read of each version served (its boot of it).
    boots: HashMap<String, (Arc<ServedImage>, BootTrace)>,
}

/// What is left of the connection after one request.
enum Next {
    Request,
    /// Both sides closed (or the origin closes).
    Done,
    /// The rest goes to the byte relay.
    Relay,
}

/// Serve the connection until it ends.
pub async fn serve(
    client: TcpStream,
    origin: TcpStream,
    ctx: &HttpContext,
) -> Result<(), ExchangeError> {
    let mut conn = Conn {
        client,
        origin,
        from_client: BytesMut::with_capacity(8192),
        from_origin: BytesMut::with_capacity(8192),
        boots: HashMap::new(),
    };
    let next = loop {
        match one_request(&mut conn, ctx).await {
            Ok(Next::Request) => {}
            other => break other,
        }
    };
    // The connection's reads are one boot of each version it was served.
    for (name, (image, trace)) in conn.boots.drain() {
        ctx.images.record_boot(&name, &image, trace.order());
    }
    match next? {
        Next::Relay => relay_rest(conn, ctx).await,
        _ => Ok(()),
    }
}

/// Read the next request head and answer it.
async fn one_request(conn: &mut Conn, ctx: &HttpContext) -> Result<Next, ExchangeError> {
    let parsed = loop {
        match request::parse(&conn.from_client) {
            Parsed::Partial => {}
            p => break p,
        }
        tokio::select! {
            n = conn.client.read_buf(&mut conn.from_client) => {
                if n.map_err(client_io)? == 0 {
                    if conn.from_client.is_empty() {
                        return Ok(Next::Done);
                    }
                    break Parsed::Pass("the client closed mid-request");
                }
            }
            // The origin speaks unasked (or closes): nothing more is ours.
            n = conn.origin.read_buf(&mut conn.from_origin) => {
                if n.map_err(origin_io)? == 0 {
                    return Ok(Next::Done);
                }
                break Parsed::Pass("the origin spoke unasked");
            }
        }
    };
    let req = match parsed {
        Parsed::Servable(req) => req,
        Parsed::Pass(why) => {
            debug!(why, "passed through");
            ctx.stats.http_passed.fetch_add(1, Ordering::Relaxed);
            return Ok(Next::Relay);
        }
        Parsed::Partial => unreachable!("the loop above ends only on a whole head"),
    };
    ctx.stats.http_requests.fetch_add(1, Ordering::Relaxed);
    let head = conn.from_client.split_to(req.head_len).freeze();
    if req.method == Method::Head {
        ctx.stats.http_passed.fetch_add(1, Ordering::Relaxed);
        conn.origin.write_all(&head).await.map_err(origin_io)?;
        return forward_response(conn, true).await;
    }
    conn.origin
        .write_all(&request::as_head(&head))
        .await
        .map_err(origin_io)?;
    let validated = read_response_head(conn).await?;
    if validated.status < 200 {
        // An interim answer to the validation: which final answer is whose
        // would be guesswork.
        return Err(ExchangeError::Response("an interim response to HEAD"));
    }
    let served = match validated.served_body() {
        Ok(body) => {
            let name = http_image_name(
                &req.path,
                body.etag.as_deref(),
                body.last_modified.as_deref(),
                body.total,
            );
            match ctx.images.get(&name).await {
                Some(image) if image.manifest.size == body.total => Some((image, body, name)),
                _ => None,
            }
        }
        Err(why) => {
            debug!(why, path = req.path, "not served from blocks");
            None
        }
    };
    let Some((image, body, name)) = served else {
        // Not ours: the origin answers the request itself.
        conn.from_origin.advance(validated.head_len);
        if validated.closes {
            return Err(ExchangeError::OriginClosed);
        }
        ctx.stats.http_passed.fetch_add(1, Ordering::Relaxed);
        conn.origin.write_all(&head).await.map_err(origin_io)?;
        return forward_response(conn, false).await;
    };
    let head_bytes = conn.from_origin.split_to(validated.head_len);
    conn.client
        .write_all(&head_bytes)
        .await
        .map_err(client_io)?;
    ctx.stats.http_served.fetch_add(1, Ordering::Relaxed);
    ctx.images.served(&ctx.core, &name, &image);
    let trace = &mut conn
        .boots
        .entry(name)
        .or_insert_with(|| (image.clone(), BootTrace::default()))
        .1;
    trace.note(image.blocks_read(&body.range));
    serve_body(conn, ctx, &image, &body, &req.host, &req.path, validated.closes).await?;
    Ok(if validated.closes {
        Next::Done
    } else {
        Next::Request
    })
}

/// The body of a served response, chunk by chunk from the block core.
async fn serve_body(
    conn: &mut Conn,
    ctx: &HttpContext,
    image: &ServedImage,
    body: &ServedBody,
    host: &str,
    path: &str,
    origin_closes: bool,
) -> Result<(), ExchangeError> {
    let mut pos = body.range.start;
    while pos < body.range.end {
        let end = ((pos / CHUNK + 1) * CHUNK).min(body.range.end);
        let range = pos..end;
        let mut plan = block_core::plan_read(&ctx.core, image, &range, true, false);
        if let ReadPlan::Fetching(wait) = plan {
            wait.await;
            plan = block_core::plan_read(&ctx.core, image, &range, true, true);
        }
        match plan {
            ReadPlan::Ready(pieces, provenance) => {
                ctx.stats.count_provenance(&provenance);
                write_pieces(&mut conn.client, &pieces)
                    .await
                    .map_err(client_io)?;
            }
            ReadPlan::Fetching(_) | ReadPlan::Origin => {
                if origin_closes {
                    return Err(ExchangeError::OriginClosed);
                }
                let data = from_origin(conn, ctx, image, body, host, path, &range).await?;
                conn.client.write_all(&data).await.map_err(client_io)?;
            }
        }
        pos = end;
    }
    Ok(())
}

/// Slices per `writev(2)`: a whole 1 MiB chunk of 4 KiB blocks.
const WRITE_SLICES: usize = 256;

/// Writes `pieces` in as few `writev(2)` calls as the socket takes: a warm
/// chunk is 256 blocks, which one `write` each made 256 system calls (the
/// iSCSI writer gathers its Data-In the same way).
async fn write_pieces(client: &mut TcpStream, pieces: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(WRITE_SLICES);
        let written = client.write_vectored(&rest[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// `range` of the file from the origin, only in the validated version: a
/// conditional range request for the whole blocks around it, verified against
/// the manifest (and learned) before any of it is returned.
async fn from_origin(
    conn: &mut Conn,
    ctx: &HttpContext,
    image: &ServedImage,
    body: &ServedBody,
    host: &str,
    path: &str,
    range: &Range<u64>,
) -> Result<bytes::Bytes, ExchangeError> {
    let bs = u64::from(image.manifest.block_size);
    let whole = (range.start / bs * bs)..(range.end.div_ceil(bs) * bs).min(body.total);
    let ask = request::range_request(host, path, whole.clone(), &body.validator);
    conn.origin.write_all(&ask).await.map_err(origin_io)?;
    let answer = read_response_head(conn).await?;
    conn.from_origin.advance(answer.head_len);
    let got = answer
        .served_body()
        .map_err(|e| ExchangeError::OriginRange(e.to_string()))?;
    if answer.status != 206 || got.range != whole || got.total != body.total || got.validator != body.validator {
        return Err(ExchangeError::OriginRange(format!(
            "status {} for {whole:?}: {:?} of {}",
            answer.status, got.range, got.total
        )));
    }
    let len = (whole.end - whole.start) as usize;
    while conn.from_origin.len() < len {
        conn.read_origin().await?;
    }
    let data = conn.from_origin.split_to(len).freeze();
    ctx.stats
        .library_bytes
        .fetch_add(len as u64, Ordering::Relaxed);
    let learned = match block_core::verify_blocks(image, whole.start, &data, &ctx.core.cache, ctx.core.learn) {
        Ok(l) => l,
        Err(e) => {
            ctx.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
    };
    ctx.stats
        .learned_blocks
        .fetch_add(learned.inserted, Ordering::Relaxed);
    let from = (range.start - whole.start) as usize;
    Ok(data.slice(from..from + (range.end - range.start) as usize))
}

impl Conn {
    /// Read more of the origin's bytes into `from_origin`; the origin closing
    /// here, mid-answer, is an error.
    async fn read_origin(&mut self) -> Result<(), ExchangeError> {
        match self.origin.read_buf(&mut self.from_origin).await {
            Ok(0) => Err(ExchangeError::OriginClosed),
            Ok(_) => Ok(()),
            Err(e) => Err(origin_io(e)),
        }
    }
}

/// Read one response head from the origin into `from_origin` (not consumed).
async fn read_response_head(conn: &mut Conn) -> Result<ResponseHead, ExchangeError> {
    loop {
        if let Some(head) = response::parse(&conn.from_origin).map_err(ExchangeError::Response)? {
            return Ok(head);
        }
        conn.read_origin().await?;
    }
}

/// Copy the origin's response to the request just sent to the client, framed
/// by its head; a body without a length ends the front end's part.
async fn forward_response(conn: &mut Conn, head_request: bool) -> Result<Next, ExchangeError> {
    let head = read_response_head(conn).await?;
    let framing = head.framing(head_request);
    let mut left = match framing {
        Framing::Empty => 0,
        Framing::Length(n) => n,
        Framing::ToTheEnd => return Ok(Next::Relay),
    } + head.head_len as u64;
    while left > 0 {
        if conn.from_origin.is_empty() {
            conn.read_origin().await?;
        }
        let take = (left as usize).min(conn.from_origin.len());
        let piece = conn.from_origin.split_to(take);
        conn.client.write_all(&piece).await.map_err(client_io)?;
        left -= take as u64;
    }
    Ok(if head.closes { Next::Done } else { Next::Request })
}

/// Hand the rest of the connection to the byte relay, after what each side
/// sent that the other has not been given yet.
async fn relay_rest(mut conn: Conn, ctx: &HttpContext) -> Result<(), ExchangeError> {
    if !conn.from_client.is_empty() {
        conn.origin
            .write_all(&conn.from_client)
            .await
            .map_err(origin_io)?;
    }
    if !conn.from_origin.is_empty() {
        conn.client
            .write_all(&conn.from_origin)
            .await
            .map_err(client_io)?;
    }
    let stats: &Arc<crate::splice::stats::SplicerStats> = &ctx.stats;
    let (up, down) = crate::splice::bytes::relay(conn.client, conn.origin, stats).await;
    debug!(up, down, "HTTP connection relayed as bytes");
    Ok(())
}
