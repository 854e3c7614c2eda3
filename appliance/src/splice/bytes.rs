//! The plain byte relay: both directions carried until both end, a clean EOF
//! passed on as a half-close, an error in either direction ending both. For
//! non-iSCSI ports, over-cap connections, and iSCSI sessions with nothing to
//! serve once logged in.
//!
//! The bytes move with splice(2), socket → pipe → socket, one pipe per
//! direction: no byte crosses a user-space buffer, because the kernel moves
//! page references from the source socket's receive queue into the pipe and
//! on to the destination's send path. This relay inspects nothing, so copying
//! every byte out to user space and back in would be pure overhead. When no
//! pipe can be had (out of file descriptors), the connection is still relayed,
//! through a user-space buffer.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::stats::SplicerStats;

/// Relay buffer per direction of the user-space fallback: large enough for a
/// whole 256 KiB iSCSI burst.
const RELAY_BUF: usize = 256 * 1024;

/// Pipe size asked for: a few iSCSI bursts in flight per direction. Only the
/// slot array is allocated up front; pages are held only while bytes sit in
/// the pipe.
const PIPE_WANT: usize = 1024 * 1024;

/// The kernel's default pipe size, assumed if it cannot even be read back.
const PIPE_DEFAULT: usize = 64 * 1024;

/// `SPLICE_F_MOVE` is advisory (the kernel moves page references regardless);
/// `SPLICE_F_NONBLOCK` keeps the pipe end from waiting, and the sockets are
/// nonblocking already, so a call never parks a runtime thread. No
/// `SPLICE_F_MORE`: the kernel already sets `MSG_MORE` while the pipe holds more,
/// and setting it on the last piece would delay it.
const SPLICE_FLAGS: libc::c_uint = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;

/// Relay both directions until both have ended; an error in one direction tears
/// down the other (a clean EOF is passed on as a half-close). Returns the bytes
/// that reached the upstream and the client, also when torn down.
pub async fn relay(client: TcpStream, upstream: TcpStream, stats: &SplicerStats) -> (u64, u64) {
    let pipes = Pipe::open().and_then(|up| Ok((up, Pipe::open()?)));
    let (up_pipe, down_pipe) = match pipes {
        Ok(pipes) => pipes,
        Err(e) => {
            warn!(cause = %e, "no pipe for splice(2): relaying through user space");
            return relay_copied(client, upstream, stats).await;
        }
    };
    let (mut to_target, mut to_initiator) = (0, 0);
    let up = splice_pump(
        &client,
        &upstream,
        &up_pipe,
        &stats.bytes_to_target,
        &mut to_target,
    );
    let down = splice_pump(
        &upstream,
        &client,
        &down_pipe,
        &stats.bytes_to_initiator,
        &mut to_initiator,
    );
    if let Err(e) = tokio::try_join!(up, down) {
        debug!(cause = %e, "byte relay torn down");
    }
    (to_target, to_initiator)
}

/// One direction: fill the pipe from `src`, drain it all into `dst`, repeat;
/// at EOF shut `dst`'s write side. Adds what reached `dst` to `moved` and
/// `counter` as it goes.
///
/// The pipe is filled only when empty. A full pipe answers EAGAIN exactly as
/// an empty socket does, and clearing the socket's readiness on that EAGAIN
/// would strand the bytes already queued on it (readiness is edge-triggered:
/// no new edge comes for them). With an empty pipe, EAGAIN means the socket.
/// It also gives backpressure for free: while `dst` cannot take the pipe's
/// bytes, `src` is not read, so its receive window closes.
async fn splice_pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
    moved: &mut u64,
) -> io::Result<()> {
    loop {
        let filled = fill(src, pipe).await?;
        if filled == 0 {
            // Only ever reached with the pipe empty: everything read has gone on.
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(());
        }
        drain(pipe, filled, dst, counter, moved).await?;
    }
}

/// Move what `src` has queued (up to the pipe's size) into the empty pipe;
/// waits for at least one byte. 0 is EOF.
async fn fill(src: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_io(Interest::READABLE, || {
            let spliced = splice_once(src.as_fd(), pipe.writer.as_fd(), pipe.size);
            if says_nothing(&spliced) {
                return recv_into_pipe(src.as_fd(), pipe);
            }
            spliced
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

/// Whether splice(2) reported an empty socket or an EOF, which it also does
/// in front of TCP urgent data.
fn says_nothing(spliced: &io::Result<usize>) -> bool {
    match spliced {
        Ok(n) => *n == 0,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// When splice(2) says "nothing", recv(2) has the last word; what it reads
/// goes into the empty pipe.
///
/// splice(2) never passes TCP urgent data (`tcp_read_sock` stops at the mark and
/// leaves it to recv): it answers EAGAIN there with bytes queued behind the
/// mark, which would stall the direction for good, or 0 once a FIN is queued
/// too, which would cut the stream short. recv(2) steps over the urgent byte
/// as any plain read does (the user-space path drops it the same way), and
/// its EAGAIN or 0 is the truth. Otherwise this costs one more syscall per
/// wait for readiness.
fn recv_into_pipe(src: BorrowedFd<'_>, pipe: &Pipe) -> io::Result<usize> {
    let mut buf = [0u8; libc::PIPE_BUF];
    let got = retrying(|| {
        // SAFETY: `buf` is writable for its whole length; the descriptor is
        // borrowed, so open.
        unsafe {
            libc::recv(
                src.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        }
    })?;
    if got == 0 {
        return Ok(0);
    }
    // An empty pipe takes up to PIPE_BUF bytes in one write, whole.
    let put = retrying(|| {
        // SAFETY: the first `got` bytes of `buf` are initialised and readable;
        // the descriptor is borrowed, so open.
        unsafe { libc::write(pipe.writer.as_raw_fd(), buf.as_ptr().cast(), got) }
    })?;
    if put != got {
        return Err(io::Error::other("short write into an empty pipe"));
    }
    Ok(got)
}

/// Move all `len` bytes in the pipe into `dst`, counting each piece as it
/// lands in `dst`'s send queue. With the pipe known to hold bytes, EAGAIN can
/// only mean `dst`'s send buffer is full, so clearing its readiness is right.
async fn drain(
    pipe: &Pipe,
    mut len: usize,
    dst: &TcpStream,
    counter: &AtomicU64,
    moved: &mut u64,
) -> io::Result<()> {
    while len > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            splice_once(pipe.reader.as_fd(), dst.as_fd(), len)
        }) {
            // The pipe is known to hold `len` bytes, so 0 would loop forever.
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                len -= n;
                *moved += n as u64;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One splice(2) of up to `len` bytes.
///
/// Splicing into a socket whose peer has gone raises SIGPIPE (the kernel does
/// not add `MSG_NOSIGNAL`); Rust's runtime ignores SIGPIPE, so it surfaces as
/// EPIPE instead.
fn splice_once(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    retrying(|| {
        // SAFETY: both descriptors are borrowed, so open for the whole call;
        // null offsets are what pipes and sockets require (no file position).
        unsafe {
            libc::splice(
                from.as_raw_fd(),
                ptr::null_mut(),
                to.as_raw_fd(),
                ptr::null_mut(),
                len,
                SPLICE_FLAGS,
            )
        }
    })
}

/// A byte-count syscall's result, its errno as the error; EINTR retried (a
/// signal's handler ran, nothing moved).
fn retrying(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        if let Ok(n) = usize::try_from(call()) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A nonblocking pipe, both ends closed on drop.
struct Pipe {
    reader: OwnedFd,
    writer: OwnedFd,
    /// Bytes it holds at most (as the kernel granted it).
    size: usize,
}

impl Pipe {
    fn open() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: `fds` is a writable array of two c_ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing
        // else owns; from here they are closed on every path.
        let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = grow(writer.as_fd());
        Ok(Self {
            reader,
            writer,
            size,
        })
    }
}

/// Grow the pipe to [`PIPE_WANT`], else to the unprivileged limit
/// (/proc/sys/fs/pipe-max-size), else leave it; returns its size. A smaller
/// pipe only means more splice(2) calls, so no failure here is an error.
fn grow(pipe: BorrowedFd<'_>) -> usize {
    if let Some(size) = set_pipe_size(pipe, PIPE_WANT) {
        return size;
    }
    let limit = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|text| parse_size(&text))
        .and_then(|max| capped_retry(PIPE_WANT, max));
    if let Some(size) = limit.and_then(|limit| set_pipe_size(pipe, limit)) {
        return size;
    }
    pipe_size(pipe).unwrap_or(PIPE_DEFAULT)
}

fn parse_size(text: &str) -> Option<usize> {
    text.trim().parse().ok()
}

/// The size worth a second try after `want` was refused: the limit, if it is
/// below what was asked and above the default a pipe has anyway.
fn capped_retry(want: usize, limit: usize) -> Option<usize> {
    (limit < want && limit > PIPE_DEFAULT).then_some(limit)
}

fn set_pipe_size(pipe: BorrowedFd<'_>, size: usize) -> Option<usize> {
    let size = libc::c_int::try_from(size).ok()?;
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours; the
    // descriptor is borrowed, so open.
    let granted = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    usize::try_from(granted).ok()
}

fn pipe_size(pipe: BorrowedFd<'_>) -> Option<usize> {
    // SAFETY: F_GETPIPE_SZ takes no argument; the descriptor is borrowed, so open.
    let size = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    usize::try_from(size).ok().filter(|&size| size > 0)
}

/// The user-space relay, for when no pipe is to be had: the same half-close
/// and tear-down, each byte copied through a buffer.
async fn relay_copied(client: TcpStream, upstream: TcpStream, stats: &SplicerStats) -> (u64, u64) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (mut to_target, mut to_initiator) = (0, 0);
    let up = pump(cr, uw, &stats.bytes_to_target, &mut to_target);
    let down = pump(ur, cw, &stats.bytes_to_initiator, &mut to_initiator);
    if let Err(e) = tokio::try_join!(up, down) {
        debug!(cause = %e, "byte relay torn down");
    }
    (to_target, to_initiator)
}

/// Copy until EOF, then shut the write side down. Adds what was written to
/// `moved` and `counter` as it goes.
async fn pump<R, W>(mut r: R, mut w: W, counter: &AtomicU64, moved: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        *moved += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::Arc,
        time::{Duration, Instant},
    };

    use tokio::{net::TcpListener, task::JoinHandle, time::timeout};

    use super::*;

    /// Bound on any one wait; generous, as the whole suite runs on two cores.
    const WAIT: Duration = Duration::from_secs(10);

    /// The relay carries both directions intact and passes a half-close on.
    #[tokio::test]
    async fn relays_both_directions_and_half_close() {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(a_addr).await.unwrap();
            let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let server = tokio::spawn(async move {
            let (mut s, _) = lb.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let (c, _) = la.accept().await.unwrap();
        let u = TcpStream::connect(b_addr).await.unwrap();
        let stats = SplicerStats::default();
        let (up, down) = relay(c, u, &stats).await;
        let back = client.await.unwrap();
        server.await.unwrap();
        let mut expect: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        expect.reverse();
        assert_eq!(back, expect);
        assert_eq!((up, down), (1_000_000, 1_000_000));
        assert_eq!(stats.snapshot().bytes_to_target, 1_000_000);
    }

    /// A reader slower than the writer: the relay stops taking from the writer
    /// (it is still writing well after the reader's slow stretch) and delivers
    /// every byte once, in order, the EOF only after the last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_reader_holds_the_sender_back_and_loses_nothing() {
        const TOTAL: u64 = 64 << 20;
        const SLOW_FOR: Duration = Duration::from_millis(1500);
        let Relayed {
            client,
            mut server,
            relay,
            stats,
        } = relayed(Path::Splice).await;
        let sender = tokio::spawn(async move {
            let mut client = client;
            send_pattern(&mut client, TOTAL).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });

        let start = Instant::now();
        let mut at = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        while start.elapsed() < SLOW_FOR {
            let n = timeout(WAIT, server.read(&mut buf)).await.unwrap().unwrap();
            assert_ne!(n, 0, "EOF after {at} bytes while reading slowly");
            check_pattern(&buf[..n], at);
            at += n as u64;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let relayed_so_far = stats.snapshot().bytes_to_target;
        assert!(
            !sender.is_finished(),
            "the sender got all {TOTAL} bytes away while {at} were read"
        );
        assert!(relayed_so_far < TOTAL);
        println!("after the slow stretch: {at} bytes read, {relayed_so_far} relayed");

        let (rest, end) = timeout(WAIT, receive_pattern(&mut server, at, u64::MAX))
            .await
            .unwrap();
        end.unwrap();
        assert_eq!(at + rest, TOTAL);
        server.shutdown().await.unwrap();
        let mut client = timeout(WAIT, sender).await.unwrap().unwrap();
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        let moved = timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(moved, (TOTAL, 0));
        assert_eq!(stats.snapshot().bytes_to_target, TOTAL);
    }

    /// The server half-closes first; the client's direction stays open and all
    /// it sends after seeing the server's EOF arrives.
    #[tokio::test]
    async fn server_half_close_first_leaves_the_client_direction_open() {
        half_close_first(Path::Splice, Side::Server).await;
    }

    /// The client half-closes first; the server's direction stays open.
    #[tokio::test]
    async fn client_half_close_first_leaves_the_server_direction_open() {
        half_close_first(Path::Splice, Side::Client).await;
    }

    /// The server resets mid-transfer: the relay ends, the client's
    /// connection ends, and what reached the client is a prefix.
    #[tokio::test]
    async fn server_reset_mid_transfer_ends_the_relay() {
        reset_mid_transfer(Path::Splice, Side::Server).await;
    }

    /// The client resets mid-transfer: the same, the other way round.
    #[tokio::test]
    async fn client_reset_mid_transfer_ends_the_relay() {
        reset_mid_transfer(Path::Splice, Side::Client).await;
    }

    /// The user-space fallback keeps the same semantics: both directions,
    /// half-close from either side, reset from either side.
    #[tokio::test]
    async fn copy_fallback_relays_half_close_and_reset() {
        let Relayed {
            mut client,
            mut server,
            relay,
            stats,
        } = relayed(Path::Copy).await;
        let (got_by_client, got_by_server) = tokio::join!(
            async {
                send_pattern(&mut client, 3 << 20).await.unwrap();
                client.shutdown().await.unwrap();
                receive_pattern(&mut client, 0, u64::MAX).await
            },
            async {
                send_pattern(&mut server, 2 << 20).await.unwrap();
                server.shutdown().await.unwrap();
                receive_pattern(&mut server, 0, u64::MAX).await
            },
        );
        assert_eq!(got_by_client.0, 2 << 20);
        assert_eq!(got_by_server.0, 3 << 20);
        let moved = timeout(WAIT, relay).await.unwrap().unwrap();
        assert_eq!(moved, (3 << 20, 2 << 20));
        assert_eq!(stats.snapshot().bytes_to_initiator, 2 << 20);

        half_close_first(Path::Copy, Side::Server).await;
        half_close_first(Path::Copy, Side::Client).await;
        reset_mid_transfer(Path::Copy, Side::Server).await;
        reset_mid_transfer(Path::Copy, Side::Client).await;
    }

    /// TCP urgent data stops splice(2) short of the bytes behind it; they must
    /// still arrive, with or without a FIN queued behind them, and the urgent
    /// byte is dropped as a plain read drops it.
    #[tokio::test]
    async fn urgent_data_neither_stalls_nor_truncates_the_stream() {
        for path in [Path::Splice, Path::Copy] {
            for fin_queued in [false, true] {
                let Relayed {
                    client,
                    mut server,
                    relay,
                    ..
                } = relayed(path).await;
                // Sent without yielding, so all of it is queued at the relay
                // before the relay first looks.
                let sock = socket2::SockRef::from(&client);
                assert_eq!(sock.send(b"abc").unwrap(), 3);
                assert_eq!(sock.send_out_of_band(b"X").unwrap(), 1);
                assert_eq!(sock.send(b"def").unwrap(), 3);
                if fin_queued {
                    sock.shutdown(Shutdown::Write).unwrap();
                }
                let mut got = [0u8; 6];
                timeout(WAIT, server.read_exact(&mut got))
                    .await
                    .unwrap_or_else(|_| panic!("{path:?}, FIN queued {fin_queued}: stalled"))
                    .unwrap();
                assert_eq!(&got, b"abcdef", "{path:?}, FIN queued {fin_queued}");
                sock.shutdown(Shutdown::Write).ok();
                let mut rest = Vec::new();
                timeout(WAIT, server.read_to_end(&mut rest))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(rest, b"");
                drop(server);
                drop(client);
                timeout(WAIT, relay).await.unwrap().unwrap();
            }
        }
    }

    #[test]
    fn only_an_empty_or_ended_splice_asks_recv() {
        assert!(says_nothing(&Ok(0)));
        assert!(says_nothing(&Err(io::ErrorKind::WouldBlock.into())));
        assert!(!says_nothing(&Ok(1)));
        assert!(!says_nothing(&Err(io::ErrorKind::ConnectionReset.into())));
    }

    #[test]
    fn pipe_size_retry_only_between_the_default_and_what_was_asked() {
        assert_eq!(capped_retry(PIPE_WANT, 512 * 1024), Some(512 * 1024));
        assert_eq!(capped_retry(PIPE_WANT, PIPE_WANT), None);
        assert_eq!(capped_retry(PIPE_WANT, 4 * PIPE_WANT), None);
        assert_eq!(capped_retry(PIPE_WANT, PIPE_DEFAULT), None);
        assert_eq!(capped_retry(PIPE_WANT, 4096), None);
        assert_eq!(parse_size("1048576\n"), Some(1_048_576));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn a_pipe_reports_the_size_the_kernel_granted() {
        let pipe = Pipe::open().unwrap();
        assert_eq!(pipe_size(pipe.writer.as_fd()), Some(pipe.size));
        assert!((4096..=PIPE_WANT).contains(&pipe.size), "{}", pipe.size);
    }

    #[derive(Clone, Copy, Debug)]
    enum Path {
        Splice,
        Copy,
    }

    #[derive(Clone, Copy, Debug)]
    enum Side {
        Client,
        Server,
    }

    /// Both endpoints of a relayed connection, and the relay running between.
    struct Relayed {
        client: TcpStream,
        server: TcpStream,
        relay: JoinHandle<(u64, u64)>,
        stats: Arc<SplicerStats>,
    }

    async fn relayed(path: Path) -> Relayed {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, c) = connected(&front).await;
        let (u, server) = connected(&back).await;
        let stats = Arc::new(SplicerStats::default());
        let counters = stats.clone();
        let relay = tokio::spawn(async move {
            match path {
                Path::Splice => relay(c, u, &counters).await,
                Path::Copy => relay_copied(c, u, &counters).await,
            }
        });
        Relayed {
            client,
            server,
            relay,
            stats,
        }
    }

    /// A connection to `listener`: (connecting end, accepted end).
    async fn connected(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (connecting, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connecting.unwrap(), accepted.unwrap().0)
    }

    /// `first` sends 1 MiB and half-closes; the other end reads it to EOF, then
    /// sends 8 MiB the other way and closes; `first` gets all of it.
    async fn half_close_first(path: Path, first: Side) {
        const BEFORE: u64 = 1 << 20;
        const AFTER: u64 = 8 << 20;
        let Relayed {
            client,
            server,
            relay,
            ..
        } = relayed(path).await;
        let (closer, stayer) = match first {
            Side::Client => (client, server),
            Side::Server => (server, client),
        };
        let closer = tokio::spawn(async move {
            let mut s = closer;
            send_pattern(&mut s, BEFORE).await.unwrap();
            s.shutdown().await.unwrap();
            let (n, end) = receive_pattern(&mut s, 0, u64::MAX).await;
            end.unwrap();
            n
        });
        let stayer = tokio::spawn(async move {
            let mut s = stayer;
            let (n, end) = receive_pattern(&mut s, 0, u64::MAX).await;
            end.unwrap();
            // EOF seen: everything from here on crosses a half-closed relay.
            send_pattern(&mut s, AFTER).await.unwrap();
            s.shutdown().await.unwrap();
            n
        });
        let got_by_stayer = timeout(WAIT, stayer).await.unwrap().unwrap();
        let got_by_closer = timeout(WAIT, closer).await.unwrap().unwrap();
        assert_eq!((got_by_stayer, got_by_closer), (BEFORE, AFTER), "{path:?}");
        let moved = timeout(WAIT, relay).await.unwrap().unwrap();
        let expect = match first {
            Side::Client => (BEFORE, AFTER),
            Side::Server => (AFTER, BEFORE),
        };
        assert_eq!(moved, expect, "{path:?}, {first:?} first");
    }

    /// Both ends stream to each other; `resetter` sends 2 MiB, reads 1 MiB,
    /// then closes with `SO_LINGER` 0 (a reset). The relay must end promptly,
    /// the other end's connection must end, and each side has only seen a
    /// prefix of the other's stream.
    async fn reset_mid_transfer(path: Path, resetter: Side) {
        const SENT: u64 = 2 << 20;
        const READ: u64 = 1 << 20;
        let Relayed {
            client,
            server,
            relay,
            ..
        } = relayed(path).await;
        let (mut resetting, other) = match resetter {
            Side::Client => (client, server),
            Side::Server => (server, client),
        };
        let (mut other_r, mut other_w) = other.into_split();
        let other_writer =
            tokio::spawn(async move { send_pattern(&mut other_w, u64::MAX).await.is_err() });
        let other_reader =
            tokio::spawn(async move { receive_pattern(&mut other_r, 0, u64::MAX).await.0 });

        timeout(WAIT, send_pattern(&mut resetting, SENT))
            .await
            .unwrap()
            .unwrap();
        let (read, end) = timeout(WAIT, receive_pattern(&mut resetting, 0, READ))
            .await
            .unwrap();
        end.unwrap();
        assert_eq!(read, READ);
        socket2::SockRef::from(&resetting)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(resetting);

        let (up, down) = timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay outlived a reset by 5 s")
            .unwrap();
        assert!(timeout(WAIT, other_writer).await.unwrap().unwrap(), "{path:?}");
        let got_by_other = timeout(WAIT, other_reader).await.unwrap().unwrap();
        let (to_resetter, from_resetter) = match resetter {
            Side::Client => (down, up),
            Side::Server => (up, down),
        };
        assert!(to_resetter >= READ, "{path:?}: {to_resetter}");
        assert!(got_by_other <= from_resetter && from_resetter <= SENT, "{path:?}");
    }

    /// The test stream's bytes from `start`: each 8-byte word a hash of its
    /// index, so a byte lost, repeated or moved shows.
    fn fill_pattern(buf: &mut [u8], start: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = start + i as u64;
            *b = splitmix64(pos / 8).to_le_bytes()[(pos % 8) as usize];
        }
    }

    fn check_pattern(buf: &[u8], start: u64) {
        let mut expect = vec![0u8; buf.len()];
        fill_pattern(&mut expect, start);
        if let Some(i) = buf.iter().zip(&expect).position(|(a, b)| a != b) {
            panic!("byte {} of the stream is out of place", start + i as u64);
        }
    }

    fn splitmix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Write the first `total` bytes of the stream.
    async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, total: u64) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut at = 0u64;
        while at < total {
            let n = buf.len().min(usize::try_from(total - at).unwrap_or(usize::MAX));
            fill_pattern(&mut buf[..n], at);
            w.write_all(&buf[..n]).await?;
            at += n as u64;
        }
        Ok(())
    }

    /// Read the stream from byte `start` until EOF, an error, or `upto` bytes,
    /// checking every byte; returns how many were read and how it ended.
    async fn receive_pattern<R: AsyncRead + Unpin>(
        r: &mut R,
        start: u64,
        upto: u64,
    ) -> (u64, io::Result<()>) {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < upto {
            let want = buf.len().min(usize::try_from(upto - got).unwrap_or(usize::MAX));
            match r.read(&mut buf[..want]).await {
                Ok(0) => break,
                Ok(n) => {
                    check_pattern(&buf[..n], start + got);
                    got += n as u64;
                }
                Err(e) => return (got, Err(e)),
            }
        }
        (got, Ok(()))
    }
}
