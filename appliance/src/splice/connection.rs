//! The splicer's inside for iSCSI: one task per connection decodes both directions
//! into PDUs, drives the [`Session`] state machine with them, and writes what it says.
//!
//! - Reads come into one `BytesMut` per direction; [`PduDecoder`] splits PDUs off it
//!   without copying, and PDUs that pass unchanged are written as the very bytes
//!   received (`Outgoing::Wire`).
//! - Writes go through one writer task per direction fed by a bounded queue of
//!   frames (vectored writes, several PDUs per system call). A full queue stops this
//!   task from reading either side: that is the backpressure.
//! - READs of LUNs in the [`Catalog`]: served (shadow or local design) when every block
//!   is a zero block or in the cache; otherwise passed through unmodified, and the
//!   Data-In the library returns is verified against the manifest and learned into the
//!   cache ([`crate::block_core::Learner`]).
//! - Bad input: a PDU that cannot be decoded (digest mismatch, data segment over the
//!   declared limit) means the byte stream can no longer be trusted, and after login
//!   edits and shadow rewrites it can no longer be relayed raw either: the connection
//!   is closed on both sides (what a target does at ErrorRecoveryLevel 0, §7.1.4). The
//!   initiator reconnects; nothing wrong is ever delivered. Nothing here panics on
//!   input.

use std::{
    collections::{HashMap, VecDeque},
    io::IoSlice,
    sync::{atomic::Ordering, Arc},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::mpsc,
};
use tracing::{debug, warn};

use crate::fetch::Provenance;

use super::catalog::{lun_number, BootTrace, Catalog, LunSlot, ServeDesign, ServedLun};
use crate::block_core::{self, BlockWait, Learner, ReadPlan};
use super::facts::{self, Probe};
use super::pdu::{
    Bhs, DecodeError, Digests, EncodeError, Opcode, PduDecoder, ReceivedPdu, WireChain,
};
use super::scsi;
use super::scsi::ReadCommand;
use super::session::{Disposition, Event, Output, Session};
use super::stats::SplicerStats;

/// Frames queued per direction before the connection task waits for the writer.
const WRITE_QUEUE: usize = 64;
/// Spare room kept in each receive buffer before a read.
const READ_CHUNK: usize = 64 * 1024;
/// A writer gathers at most this many bytes of queued frames into one write.
const WRITE_BATCH: usize = 1 << 20;
/// Outstanding pass-through READs learned from, per connection.
const MAX_LEARNING: usize = 256;
/// Outstanding commands that may write a served LUN, per connection. More than this
/// (a target that never answers them, out-of-window CmdSNs) stops serving that LUN
/// in this session only: one initiator cannot switch serving off for everyone.
const MAX_WRITES: usize = 1024;
/// Outstanding tasks per connection. A target grants a window of at most a few
/// hundred commands (tgt: 128); past this many the connection is closed.
pub const MAX_TASKS: usize = 4096;
/// Outstanding READ CAPACITY / MODE SENSE commands of served LUNs followed, per
/// connection (their answers are the target's facts about the LUN).
const MAX_PROBES: usize = 64;
/// The smallest data segment limit enforced on receive. Each direction's limit is the
/// receiver's declared MaxRecvDataSegmentLength, but never below this: the splicer
/// needs bounded buffers, not to police peers that a real target would tolerate
/// (tgt accepts segments above what it declared).
const MIN_SEGMENT_LIMIT: u32 = 256 * 1024;

/// What every connection shares.
#[derive(Debug)]
pub struct SpliceContext {
    pub catalog: Arc<Catalog>,
    pub stats: Arc<SplicerStats>,
    /// Where a session with nothing to serve is handed to the kernel after
    /// login (`None`: the user-space byte relay takes it).
    pub handoff: Option<Arc<crate::datapath::HandoffMap>>,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("undecodable PDU from the {side}: {source}")]
    Decode {
        side: &'static str,
        source: DecodeError,
    },
    #[error("cannot frame a PDU: {0}")]
    Encode(#[from] EncodeError),
    #[error("reading from the {side}: {source}")]
    Read {
        side: &'static str,
        source: std::io::Error,
    },
    #[error("writing to the {0} failed")]
    Write(&'static str),
    /// More tasks outstanding than any command window allows: the initiator
    /// ignores the window, or the target never answers. Closed rather than grown.
    #[error("over {MAX_TASKS} tasks outstanding")]
    TooManyTasks,
    #[error("the login did not reach Full Feature Phase within {0:?}")]
    LoginTimeout(std::time::Duration),
    #[error("handing the connection to the kernel: {0}")]
    Handoff(&'static str),
}

#[derive(Clone, Copy)]
enum Toward {
    Target,
    Initiator,
}

impl Toward {
    fn name(self) -> &'static str {
        match self {
            Toward::Target => "target",
            Toward::Initiator => "initiator",
        }
    }
}

/// Relay one iSCSI connection PDU by PDU until both sides have closed. Returns the
/// bytes written toward the target and the initiator.
pub async fn splice_iscsi(
    client: TcpStream,
    upstream: TcpStream,
    ctx: &SpliceContext,
) -> Result<(), ConnectionError> {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (tt_tx, tt_rx) = mpsc::channel(WRITE_QUEUE);
    let (ti_tx, ti_rx) = mpsc::channel(WRITE_QUEUE);
    let stats = ctx.stats.clone();
    let to_relay = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w_target = tokio::spawn(writer(
        uw,
        tt_rx,
        stats.clone(),
        Toward::Target,
        to_relay.clone(),
    ));
    let w_initiator = tokio::spawn(writer(cw, ti_rx, stats, Toward::Initiator, to_relay.clone()));
    let mut conn = Conn::new(ctx, tt_tx, ti_tx);
    let mut reads = Reads {
        client: cr,
        upstream: ur,
        from_client: BytesMut::with_capacity(READ_CHUNK),
        from_upstream: BytesMut::with_capacity(READ_CHUNK),
        client_done: false,
        upstream_done: false,
    };
    let result = conn.pump(&mut reads).await;
    let Reads {
        client: cr,
        upstream: ur,
        from_client: mut cbuf,
        from_upstream: mut ubuf,
        client_done: c_done,
        upstream_done: u_done,
    } = reads;
    let relay_raw = conn.relay_raw && !c_done && !u_done && result.is_ok();
    // The final login response, held back when the session may go to the
    // kernel: it is the last thing sent before the switch.
    let held = std::mem::take(&mut conn.held_for_handoff);
    let kernel = ctx
        .handoff
        .clone()
        .filter(|_| relay_raw && !held.is_empty() && cbuf.is_empty() && ubuf.is_empty());
    if relay_raw {
        // Nothing after login needs interpreting: flush what is queued, forward the
        // undecoded rest as it came, and relay bytes from here on.
        to_relay.store(true, Ordering::Release);
        if kernel.is_none() {
            if let Some(tx) = &conn.to_initiator {
                for frame in held.iter().cloned() {
                    let _ = tx.send(frame).await;
                }
            }
        }
        let queued = [
            (conn.to_target.take(), cbuf.split().freeze()),
            (conn.to_initiator.take(), ubuf.split().freeze()),
        ];
        for (tx, rest) in queued {
            if let Some(tx) = tx {
                if !rest.is_empty() {
                    let _ = tx.send(WireChain::from_wire(rest)).await;
                }
            }
        }
    }
    drop(conn);
    if relay_raw {
        let halves = (w_target.await, w_initiator.await);
        let (Ok(Ok(Some(uw))), Ok(Ok(Some(cw)))) = halves else {
            return Err(ConnectionError::Write("target or initiator"));
        };
        let (Ok(client), Ok(upstream)) = (cr.reunite(cw), ur.reunite(uw)) else {
            return Err(ConnectionError::Write("target or initiator"));
        };
        return relay_after_login(client, upstream, held, kernel, ctx).await;
    }
    match result {
        Ok(()) => {
            let _ = w_target.await;
            let _ = w_initiator.await;
            Ok(())
        }
        Err(e) => {
            // Close both sides now: dropping the halves resets what is left.
            w_target.abort();
            w_initiator.abort();
            Err(e)
        }
    }
}

/// A session with nothing to serve, after login: to the kernel (`kernel`: the
/// held login response is sent as the switch's last step), or, declined or
/// not asked, to the user-space byte relay.
async fn relay_after_login(
    mut client: TcpStream,
    mut upstream: TcpStream,
    held: Vec<WireChain>,
    kernel: Option<Arc<crate::datapath::HandoffMap>>,
    ctx: &SpliceContext,
) -> Result<(), ConnectionError> {
    use super::handoff::{hand_over, Handoff};
    ctx.stats.raw_relayed.fetch_add(1, Ordering::Relaxed);
    if let Some(map) = kernel {
        let mut bytes = Vec::new();
        for mut frame in held {
            while frame.has_remaining() {
                let chunk = frame.chunk();
                bytes.extend_from_slice(chunk);
                let n = chunk.len();
                frame.advance(n);
            }
        }
        match hand_over(client, upstream, &bytes, &map).await {
            Handoff::Done => {
                ctx.stats.handed_off.fetch_add(1, Ordering::Relaxed);
                debug!("handed to the kernel");
                return Ok(());
            }
            Handoff::Declined {
                why,
                client: c,
                upstream: u,
            } => {
                ctx.stats.handoff_declined.fetch_add(1, Ordering::Relaxed);
                debug!(why, "kernel handoff declined: relayed in user space");
                (client, upstream) = (c, u);
                if client.write_all(&bytes).await.is_err() {
                    return Err(ConnectionError::Write("initiator"));
                }
            }
            Handoff::Broken(why) => return Err(ConnectionError::Handoff(why)),
        }
    }
    super::bytes::relay(client, upstream, &ctx.stats).await;
    Ok(())
}

/// Write queued frames (gathered, vectored) until the queue closes, then half-close
/// — unless the connection is dropping to the byte relay (`to_relay`), in which
/// case the write half is returned, open, with everything queued written.
async fn writer(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<WireChain>,
    stats: Arc<SplicerStats>,
    toward: Toward,
    to_relay: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<Option<OwnedWriteHalf>> {
    let counter = match toward {
        Toward::Target => &stats.bytes_to_target,
        Toward::Initiator => &stats.bytes_to_initiator,
    };
    while let Some(frame) = rx.recv().await {
        let mut batch = frame;
        while batch.remaining() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.append(more),
                Err(_) => break,
            }
        }
        let total = batch.remaining();
        while batch.has_remaining() {
            let mut slices = [IoSlice::new(&[]); 64];
            let n = batch.chunks_vectored(&mut slices);
            let written = w.write_vectored(&slices[..n]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            batch.advance(written);
        }
        counter.fetch_add(total as u64, Ordering::Relaxed);
    }
    if to_relay.load(Ordering::Acquire) {
        return Ok(Some(w));
    }
    w.shutdown().await?;
    Ok(None)
}

/// Both read halves of a connection and what has been read from each.
struct Reads {
    client: OwnedReadHalf,
    upstream: OwnedReadHalf,
    from_client: BytesMut,
    from_upstream: BytesMut,
    client_done: bool,
    upstream_done: bool,
}

/// A READ waiting for its missing blocks to be fetched (at most the deadline).
struct HeldRead {
    pdu: ReceivedPdu,
    wait: BlockWait,
}

/// Where a READ of a served LUN goes next.
enum ReadStep {
    /// To the session, answered as this says.
    Go(Disposition),
    /// Held until its blocks are fetched.
    Hold(BlockWait),
}

/// The held READ's wait, or never.
async fn wait_held(held: &mut Option<HeldRead>) -> bool {
    match held {
        Some(h) => h.wait.as_mut().await,
        None => std::future::pending().await,
    }
}

struct Conn<'a> {
    ctx: &'a SpliceContext,
    session: Session,
    from_initiator: PduDecoder,
    from_target: PduDecoder,
    /// Digests of the connection once in Full Feature Phase (for PDUs we encode).
    digests: Digests,
    to_target: Option<mpsc::Sender<WireChain>>,
    to_initiator: Option<mpsc::Sender<WireChain>>,
    /// Declared LUNs of the target this session logged in to (each READ takes
    /// the slot's current LUN, so a manifest installed later is used at once).
    luns: HashMap<u16, Arc<LunSlot>>,
    /// Pass-through READs of served LUNs, by ITT, whose Data-In is learned from.
    learning: HashMap<u32, Learner>,
    /// Commands that may write a served LUN, by ITT, until the target answers.
    writes: HashMap<u32, PendingWrite>,
    /// READ CAPACITY and MODE SENSE commands of declared LUNs, by ITT, until the
    /// target answers: their Data-In is recorded in the LUN's facts.
    probes: HashMap<u32, FollowedProbe>,
    /// LUNs this session no longer serves, and why: it may have written them (its
    /// own view of the medium may differ from the manifest) or it overflowed a
    /// per-session bound. Other sessions are not affected.
    tainted: HashMap<u16, String>,
    /// Data assembled for READs being served, by ITT, until the session asks for it.
    ready: HashMap<u32, (Vec<Bytes>, Provenance)>,
    /// Set at Full Feature Phase when the session's target has no served LUN:
    /// nothing more needs interpreting, so the connection drops to the byte relay.
    relay_raw: bool,
    /// With a kernel handoff to make: what goes to the initiator once the
    /// session drops to the relay (the final Login Response), held so it is
    /// the last thing sent before the switch.
    held_for_handoff: Vec<WireChain>,
    /// Per served LUN: the blocks this session read, in first-read order (one
    /// boot of the LUN's access history, recorded when the connection ends).
    boots: HashMap<u16, (Arc<ServedLun>, BootTrace)>,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        for (_, (lun, trace)) in self.boots.drain() {
            self.ctx.catalog.record_boot(&lun, trace.order());
        }
    }
}

/// A READ CAPACITY or MODE SENSE of a declared LUN, waiting for its answer.
struct FollowedProbe {
    slot: Arc<LunSlot>,
    probe: Probe,
    /// Read from the Data-In at offset 0; recorded once the status is GOOD.
    fact: Option<facts::Fact>,
}

impl FollowedProbe {
    fn record(self) {
        if let Some(fact) = self.fact {
            debug!(target = %self.slot.decl.target, lun = self.slot.decl.lun, ?fact, "target fact");
            self.slot.facts.record(fact);
        }
    }
}

/// A command that may write a served LUN, waiting for its status.
struct PendingWrite {
    lun: Arc<ServedLun>,
    slot: Arc<LunSlot>,
    opcode: u8,
    /// The CDB itself writes blocks (WRITE, WRITE SAME, UNMAP, ...): GOOD status
    /// means the medium changed, whatever the target said about write protection.
    writes_medium: bool,
}

impl<'a> Conn<'a> {
    fn new(
        ctx: &'a SpliceContext,
        to_target: mpsc::Sender<WireChain>,
        to_initiator: mpsc::Sender<WireChain>,
    ) -> Self {
        Conn {
            ctx,
            session: Session::new(),
            from_initiator: PduDecoder::default(),
            from_target: PduDecoder::default(),
            digests: Digests::NONE,
            to_target: Some(to_target),
            to_initiator: Some(to_initiator),
            luns: HashMap::new(),
            learning: HashMap::new(),
            writes: HashMap::new(),
            probes: HashMap::new(),
            tainted: HashMap::new(),
            ready: HashMap::new(),
            relay_raw: false,
            held_for_handoff: Vec::new(),
            boots: HashMap::new(),
        }
    }

    /// Read both sides and handle what arrives until both have closed, an error
    /// ends the connection, or it drops to the byte relay (`relay_raw`).
    async fn pump(&mut self, reads: &mut Reads) -> Result<(), ConnectionError> {
        let mut held: Option<HeldRead> = None;
        let login_deadline = tokio::time::Instant::now() + self.ctx.catalog.login_timeout;
        while !(reads.client_done && reads.upstream_done) {
            if reads.from_client.capacity() - reads.from_client.len() < READ_CHUNK / 4 {
                reads.from_client.reserve(READ_CHUNK);
            }
            if reads.from_upstream.capacity() - reads.from_upstream.len() < READ_CHUNK / 4 {
                reads.from_upstream.reserve(READ_CHUNK);
            }
            tokio::select! {
                // While a READ waits for its blocks, later PDUs from the initiator
                // stay in the socket (order is kept; the target side flows on).
                r = reads.client.read_buf(&mut reads.from_client), if !reads.client_done && held.is_none() => match r {
                    Ok(0) => {
                        // Half-close passes on once everything before it is written.
                        reads.client_done = true;
                        self.to_target = None;
                    }
                    Ok(_) => self.drain_initiator(&mut reads.from_client, &mut held).await?,
                    Err(source) => return Err(ConnectionError::Read { side: "initiator", source }),
                },
                // A login that has not reached Full Feature Phase in time is closed
                // (a slow-loris initiator holds no splicer state for long); a live
                // idle session after login is never cut here.
                () = tokio::time::sleep_until(login_deadline),
                    if self.session.phase() == super::session::Phase::Login =>
                {
                    return Err(ConnectionError::LoginTimeout(self.ctx.catalog.login_timeout));
                }
                timed_out = wait_held(&mut held) => {
                    if let Some(h) = held.take() {
                        if timed_out {
                            if let Some(s) = self.ctx.catalog.core.sourcing() {
                                s.note_deadline_missed();
                            }
                        }
                        held = self.on_initiator(h.pdu, true).await?;
                        self.drain_initiator(&mut reads.from_client, &mut held).await?;
                    }
                },
                r = reads.upstream.read_buf(&mut reads.from_upstream), if !reads.upstream_done => match r {
                    Ok(0) => {
                        reads.upstream_done = true;
                        self.to_initiator = None;
                    }
                    Ok(_) => loop {
                        let decoded = self.from_target.decode(&mut reads.from_upstream).map_err(|source| {
                            ConnectionError::Decode { side: "target", source }
                        })?;
                        let Some(pdu) = decoded else { break };
                        self.on_target(pdu).await?;
                        if self.relay_raw {
                            break;
                        }
                    },
                    Err(source) => return Err(ConnectionError::Read { side: "target", source }),
                },
            }
            if self.relay_raw && !reads.client_done && !reads.upstream_done {
                break;
            }
        }
        Ok(())
    }

    /// The LUN a command addresses, if it is served now in this session (per
    /// command: a read lock and an `Arc` clone).
    fn served_lun(&self, field: u64) -> Option<(Arc<ServedLun>, &Arc<LunSlot>)> {
        let number = lun_number(field)?;
        if self.tainted.contains_key(&number) {
            return None;
        }
        let slot = self.luns.get(&number)?;
        Some((slot.serving()?, slot))
    }

    /// Stop serving LUN `number` in this session.
    fn taint_session(&mut self, number: u16, why: String) {
        if !self.tainted.contains_key(&number) {
            warn!(lun = number, why, "LUN no longer served in this session");
            self.ctx
                .stats
                .sessions_tainted
                .fetch_add(1, Ordering::Relaxed);
            self.tainted.insert(number, why);
        }
    }

    /// Follow a READ CAPACITY or MODE SENSE of a declared LUN to its answer.
    fn follow_probe(&mut self, bhs: &Bhs) {
        let Some(probe) = Probe::of(bhs.cdb()) else {
            return;
        };
        let Some(slot) = lun_number(bhs.lun()).and_then(|n| self.luns.get(&n)) else {
            return;
        };
        if self.probes.len() >= MAX_PROBES {
            // Answers never came: forget them rather than grow.
            self.probes.clear();
        }
        let followed = FollowedProbe {
            slot: slot.clone(),
            probe,
            fact: None,
        };
        self.probes.insert(bhs.itt(), followed);
    }

    /// Decode and handle the initiator's PDUs in `cbuf` until it runs dry, a READ
    /// is held for its blocks, or the connection drops to the byte relay.
    async fn drain_initiator(
        &mut self,
        cbuf: &mut BytesMut,
        held: &mut Option<HeldRead>,
    ) -> Result<(), ConnectionError> {
        while held.is_none() && !self.relay_raw {
            let decoded =
                self.from_initiator
                    .decode(cbuf)
                    .map_err(|source| ConnectionError::Decode {
                        side: "initiator",
                        source,
                    })?;
            let Some(pdu) = decoded else { break };
            *held = self.on_initiator(pdu, false).await?;
        }
        Ok(())
    }

    /// Handle one PDU from the initiator. A READ of a served LUN whose blocks are
    /// not all at hand, when peers may hold them, is returned to be held until
    /// they are fetched (or the deadline passes: `waited`, then it is decided with
    /// what arrived).
    ///
    /// A READ goes through these phases, in this order:
    /// 1. [`Self::check_task_bound`]: the task table has room.
    /// 2. [`Self::served_read`]: a READ (per the session) of a LUN served now.
    /// 3. [`Self::trace_boot`]: its blocks join this session's boot trace.
    /// 4. [`block_core::plan_read`] of the READ's byte range: read-ahead,
    ///    assembly, else a fetch to wait for.
    /// 5. [`Self::serve_ready`] or [`Self::pass_to_library`] (learning from the
    ///    library's answer), or the READ is held for its fetch.
    /// 6. [`Session::from_initiator`] with the disposition, and [`Self::carry`]
    ///    out what it says (a served READ's data goes out as Data-In from there).
    ///
    /// Any other command is followed for what it may tell ([`Self::follow_command`])
    /// and passed through.
    async fn on_initiator(
        &mut self,
        received: ReceivedPdu,
        waited: bool,
    ) -> Result<Option<HeldRead>, ConnectionError> {
        let bhs = received.pdu.bhs;
        self.check_task_bound(&bhs)?;
        let step = if let Some(read) = self.session.read_candidate(&bhs) {
            self.served_read(&bhs, read, waited)
        } else {
            self.follow_command(&bhs);
            None
        };
        let disposition = match step {
            Some(ReadStep::Hold(wait)) => {
                return Ok(Some(HeldRead {
                    pdu: received,
                    wait,
                }))
            }
            Some(ReadStep::Go(disposition)) => disposition,
            None => Disposition::PassThrough,
        };
        let out = self.session.on_initiator_pdu(received, disposition);
        self.carry(out).await?;
        Ok(None)
    }

    /// More tasks outstanding than any command window allows: close.
    fn check_task_bound(&self, bhs: &Bhs) -> Result<(), ConnectionError> {
        if bhs.opcode() == Opcode::ScsiCommand && self.session.outstanding_tasks() >= MAX_TASKS {
            return Err(ConnectionError::TooManyTasks);
        }
        Ok(())
    }

    /// The phases of a READ of a LUN served now (`None`: not served, it passes
    /// through untouched).
    fn served_read(&mut self, bhs: &Bhs, read: ReadCommand, waited: bool) -> Option<ReadStep> {
        let (lun, _) = self.served_lun(bhs.lun())?;
        if !waited {
            self.trace_boot(bhs.lun(), &lun, &read);
        }
        let servable = read.servable(lun.capacity_blocks());
        // A READ outside the manifest (or of a LUN whose block length is not
        // known yet) is the library's.
        let plan = match lun.byte_range(&read) {
            Some(range) => {
                block_core::plan_read(&self.ctx.catalog.core, &lun, &range, servable, waited)
            }
            None => ReadPlan::Origin,
        };
        let step = match plan {
            ReadPlan::Ready(data, provenance) => {
                ReadStep::Go(self.serve_ready(bhs.itt(), &lun, data, provenance))
            }
            ReadPlan::Fetching(wait) => ReadStep::Hold(wait),
            ReadPlan::Origin => {
                self.pass_to_library(bhs.itt(), &lun, &read);
                ReadStep::Go(Disposition::PassThrough)
            }
        };
        Some(step)
    }

    /// Note the blocks `read` touches in this session's boot of `lun`.
    fn trace_boot(&mut self, lun_field: u64, lun: &Arc<ServedLun>, read: &ReadCommand) {
        let Some(number) = lun_number(lun_field) else {
            return;
        };
        let boot = self
            .boots
            .entry(number)
            .or_insert_with(|| (lun.clone(), BootTrace::default()));
        if !Arc::ptr_eq(&boot.0, lun) {
            // A new manifest since this session's last READ: the boot so far
            // goes to the old LUN's record.
            let (old, trace) = std::mem::replace(boot, (lun.clone(), BootTrace::default()));
            self.ctx.catalog.record_boot(&old, trace.order());
        }
        boot.1.note(lun.blocks_read(read));
    }

    /// Keep a READ's assembled data until the session asks for it; how it is
    /// answered follows the LUN's design.
    fn serve_ready(
        &mut self,
        itt: u32,
        lun: &ServedLun,
        data: Vec<Bytes>,
        provenance: Provenance,
    ) -> Disposition {
        self.ready.insert(itt, (data, provenance));
        match lun.design {
            ServeDesign::Shadow => Disposition::Shadow,
            ServeDesign::Local => Disposition::Local,
        }
    }

    /// A READ of a served LUN goes to the library: count it, and learn the
    /// blocks of its answer when learning is on and the READ is not too long.
    fn pass_to_library(&mut self, itt: u32, lun: &Arc<ServedLun>, read: &ReadCommand) {
        let stats = &self.ctx.stats;
        let core = &self.ctx.catalog.core;
        stats.reads_passed.fetch_add(1, Ordering::Relaxed);
        let bytes = read.byte_len(lun.logical_block_size());
        stats.library_bytes.fetch_add(bytes, Ordering::Relaxed);
        if core.learn && bytes <= core.max_learn_bytes {
            if self.learning.len() >= MAX_LEARNING {
                self.learning.clear();
            }
            if let Some(learner) = lun
                .byte_range(read)
                .and_then(|range| Learner::new(&lun.image, range))
            {
                self.learning.insert(itt, learner);
            }
        }
    }

    /// A command other than a READ: one that may write a served LUN is followed
    /// to its status (a write taints), a READ CAPACITY or MODE SENSE to its
    /// answer (the target's facts about the LUN).
    fn follow_command(&mut self, bhs: &Bhs) {
        if bhs.opcode() != Opcode::ScsiCommand {
            return;
        }
        if scsi::command_may_write(bhs) {
            self.follow_write(bhs);
        } else if bhs.command_read() {
            self.follow_probe(bhs);
        }
    }

    /// Follow a command that may write a served LUN to its status.
    fn follow_write(&mut self, bhs: &Bhs) {
        let Some((lun, slot)) = self.served_lun(bhs.lun()).filter(|_| !harmless_write(bhs)) else {
            return;
        };
        if self.writes.len() >= MAX_WRITES {
            if let Some(number) = lun_number(bhs.lun()) {
                self.taint_session(
                    number,
                    format!("over {MAX_WRITES} outstanding commands that may write"),
                );
            }
        } else {
            let write = PendingWrite {
                lun,
                slot: slot.clone(),
                opcode: bhs.cdb()[0],
                writes_medium: scsi::may_write_medium(bhs.cdb()),
            };
            self.writes.insert(bhs.itt(), write);
        }
    }

    async fn on_target(&mut self, received: ReceivedPdu) -> Result<(), ConnectionError> {
        let bhs = received.pdu.bhs;
        let itt = bhs.itt();
        match bhs.opcode() {
            Opcode::DataIn => {
                if let Some(followed) = self.probes.get_mut(&itt) {
                    // The fact is in the answer's first bytes (these answers are
                    // tens of bytes: one PDU at offset 0 from any real target).
                    if bhs.buffer_offset() == 0 {
                        followed.fact = facts::parse_answer(followed.probe, &received.pdu.data);
                    }
                    if bhs.data_in_status() {
                        if let Some(followed) = self.probes.remove(&itt) {
                            if bhs.status() == scsi::status::GOOD {
                                followed.record();
                            }
                        }
                    }
                }
                if let Some(learner) = self.learning.get_mut(&itt) {
                    let offset = u64::from(bhs.buffer_offset());
                    match learner.feed(offset, &received.pdu.data, &self.ctx.catalog.core.cache) {
                        Some(learned) => {
                            let stats = &self.ctx.stats;
                            stats
                                .learned_blocks
                                .fetch_add(learned.inserted, Ordering::Relaxed);
                            stats
                                .verify_failures
                                .fetch_add(learned.mismatched, Ordering::Relaxed);
                        }
                        None => {
                            self.learning.remove(&itt);
                        }
                    }
                }
                if bhs.data_in_status() {
                    self.learning.remove(&itt);
                }
            }
            Opcode::ScsiResponse => {
                self.learning.remove(&itt);
                if let Some(followed) = self.probes.remove(&itt) {
                    if bhs.response() == 0 && bhs.status() == scsi::status::GOOD {
                        followed.record();
                    }
                }
                if let Some(write) = self.writes.remove(&itt) {
                    if bhs.response() == 0 && bhs.status() == scsi::status::GOOD {
                        self.write_completed(&write);
                    }
                }
            }
            _ => {}
        }
        let out = self.session.on_target_pdu(received);
        self.carry(out).await
    }

    /// A command that may write a served LUN completed with GOOD. The LUN is tainted
    /// for everyone only when the medium is known to have changed: the CDB writes
    /// blocks, or the target has not said the LUN is write-protected. Otherwise (a
    /// data-out command outside the allow-list on a write-protected LUN) only this
    /// session stops being served.
    fn write_completed(&mut self, write: &PendingWrite) {
        let why = format!(
            "a command that may write (opcode {:#04x}) completed with GOOD",
            write.opcode
        );
        if write.writes_medium || !write.slot.facts.write_protected() {
            // Also whatever manifest was installed meanwhile: it may predate the
            // write.
            write.lun.taint(&why);
            if let Some(now) = write.slot.current() {
                now.taint(&why);
            }
        } else {
            self.taint_session(write.lun.lun, format!("{why} (the LUN is write-protected)"));
        }
    }

    /// Carry out an [`Output`] and whatever serving the fetches it asks for produces.
    async fn carry(&mut self, out: Output) -> Result<(), ConnectionError> {
        let mut pending = VecDeque::from([out]);
        while let Some(out) = pending.pop_front() {
            for event in &out.events {
                self.on_event(event);
            }
            for item in out.to_target {
                let frame = item.into_wire_chain(self.digests)?;
                send(self.to_target.as_ref(), frame, Toward::Target).await?;
            }
            for item in out.to_initiator {
                let frame = item.into_wire_chain(self.digests)?;
                if self.relay_raw && self.ctx.handoff.is_some() {
                    self.held_for_handoff.push(frame);
                    continue;
                }
                send(self.to_initiator.as_ref(), frame, Toward::Initiator).await?;
            }
            for itt in out.cancel {
                self.ready.remove(&itt);
            }
            for fetch in out.fetch {
                let next = match self.ready.remove(&fetch.itt) {
                    Some((data, prov)) => {
                        self.count_served(fetch.design, prov);
                        self.session.data_ready(fetch.itt, data)
                    }
                    None => self.session.data_failed(fetch.itt),
                };
                pending.push_back(next);
            }
        }
        Ok(())
    }

    fn count_served(&self, design: ServeDesign, prov: Provenance) {
        let stats = &self.ctx.stats;
        match design {
            ServeDesign::Shadow => &stats.reads_served_shadow,
            ServeDesign::Local => &stats.reads_served_local,
        }
        .fetch_add(1, Ordering::Relaxed);
        stats.count_provenance(&prov);
    }

    fn on_event(&mut self, event: &Event) {
        match event {
            Event::FullFeature(params) => {
                if let Some(why) = &params.ambiguity {
                    warn!(why, "login text is ambiguous: the session passes through");
                    self.ctx
                        .stats
                        .sessions_ambiguous
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.digests = params.digests();
                for decoder in [&mut self.from_initiator, &mut self.from_target] {
                    decoder.set_digests(self.digests);
                }
                self.set_limits(params);
                if params.serving_allowed() {
                    if let Some(target) = &params.target_name {
                        self.luns = self.ctx.catalog.for_target(target);
                    }
                }
                // Declared LUNs without a manifest yet keep the session
                // interpreted: a manifest may arrive before its next READ.
                self.relay_raw = self.luns.is_empty();
                // Prefetch only warms the cache with blocks verified by hash, so it
                // starts before the target has told the LUN's geometry (that comes
                // with the session's first READ CAPACITY, after login).
                let installed = self.luns.values().filter_map(|s| s.current());
                for lun in installed.filter(|l| !l.tainted()) {
                    if lun.mode == super::catalog::FetchMode::Prefetch {
                        self.ctx.catalog.start_prefetch(&lun);
                    }
                }
                debug!(
                    target = params.target_name.as_deref().unwrap_or("-"),
                    initiator = params.initiator_name.as_deref().unwrap_or("-"),
                    serving = params.serving_allowed(),
                    served_luns = self.luns.len(),
                    header_digest = params.header_digest,
                    data_digest = params.data_digest,
                    "full feature phase"
                );
            }
            Event::ParamsChanged(params) => {
                self.set_limits(params);
                if !params.serving_allowed() {
                    if let Some(why) = &params.ambiguity {
                        warn!(why, "session text became ambiguous: nothing more is served");
                    }
                    self.luns.clear();
                }
            }
            Event::MediumMayChange { .. } => {}
            Event::LoginEnded(progress) => debug!(?progress, "login ended"),
            Event::LoggedOut => debug!("logged out"),
        }
    }

    fn set_limits(&mut self, params: &super::login::OperationalParams) {
        self.from_initiator.set_max_data_segment_length(
            params
                .target_max_recv_data_segment_length
                .max(MIN_SEGMENT_LIMIT),
        );
        self.from_target.set_max_data_segment_length(
            params
                .initiator_max_recv_data_segment_length
                .max(MIN_SEGMENT_LIMIT),
        );
    }
}

/// A WRITE(10/12/16) or WRITE AND VERIFY(10/12/16) that transfers nothing (EDTL 0,
/// no W bit) cannot change the medium: a transfer length of 0 means no blocks for
/// these CDBs (unlike WRITE(6) and WRITE SAME, which stay suspect). The conformance
/// suite sends such commands, and a read-only target answers them GOOD.
fn harmless_write(bhs: &Bhs) -> bool {
    use super::scsi::opcode;
    let cdb = bhs.cdb();
    let length = match cdb[0] {
        opcode::WRITE_10 | opcode::WRITE_AND_VERIFY_10 => &cdb[7..9],
        opcode::WRITE_12 | opcode::WRITE_AND_VERIFY_12 => &cdb[6..10],
        opcode::WRITE_16 | opcode::WRITE_AND_VERIFY_16 => &cdb[10..14],
        _ => return false,
    };
    !bhs.command_write()
        && bhs.expected_data_transfer_length() == 0
        && length.iter().all(|&b| b == 0)
}

async fn send(
    tx: Option<&mpsc::Sender<WireChain>>,
    chain: WireChain,
    toward: Toward,
) -> Result<(), ConnectionError> {
    let Some(tx) = tx else {
        // That direction was half-closed: nothing more may go there.
        warn!(toward = toward.name(), "PDU after half-close dropped");
        return Ok(());
    };
    tx.send(chain)
        .await
        .map_err(|_| ConnectionError::Write(toward.name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::pdu::{Bhs, Pdu};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn login(opcode: Opcode, text: &str) -> Bytes {
        let mut bhs = Bhs::new(opcode);
        bhs.set_flags(0x87); // T, CSG 1, NSG 3
        if opcode == Opcode::LoginRequest {
            bhs.set_immediate(true);
        }
        let pdu = Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::copy_from_slice(text.as_bytes()),
        };
        pdu.encode(Digests::NONE).unwrap().to_bytes()
    }

    /// Login with header digests through the splicer, then a PDU whose header digest
    /// is wrong: the splicer closes both sides and reports a decode error (no panic,
    /// nothing forwarded).
    #[tokio::test]
    async fn bad_header_digest_closes_the_connection() {
        let (mut initiator, client) = pair().await;
        let (upstream, mut target) = pair().await;
        // A served LUN on the target keeps the session in PDU mode after login.
        let mut catalog = Catalog::new(Arc::new(crate::fetch::BlockCache::new(1 << 20)), true);
        catalog.add(
            ServedLun::new(
                "iqn.t".into(),
                0,
                super::super::catalog::ServeDesign::Shadow,
                Some(512),
                super::super::catalog::manifest_of("img", &[0u8; 4096], 4096),
            )
            .unwrap(),
        );
        let ctx = SpliceContext {
            catalog: Arc::new(catalog),
            stats: Arc::new(SplicerStats::default()),
            handoff: None,
        };
        let splicer = tokio::spawn(async move { splice_iscsi(client, upstream, &ctx).await });

        initiator
            .write_all(&login(
                Opcode::LoginRequest,
                "InitiatorName=iqn.i\0TargetName=iqn.t\0SessionType=Normal\0HeaderDigest=CRC32C\0",
            ))
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let decoder = PduDecoder::default();
        let req = loop {
            target.read_buf(&mut buf).await.unwrap();
            if let Some(p) = decoder.decode(&mut buf).unwrap() {
                break p;
            }
        };
        assert_eq!(req.pdu.bhs.opcode(), Opcode::LoginRequest);
        target
            .write_all(&login(Opcode::LoginResponse, "HeaderDigest=CRC32C\0"))
            .await
            .unwrap();
        let mut resp = vec![0u8; 48 + 20];
        initiator.read_exact(&mut resp).await.unwrap();

        // A NOP-Out with a corrupted header digest.
        let mut nop = Bhs::new(Opcode::NopOut);
        nop.set_immediate(true);
        nop.set_final_bit(true);
        let digests = Digests {
            header: true,
            data: false,
        };
        let mut frame = Pdu::header_only(nop)
            .encode(digests)
            .unwrap()
            .to_bytes()
            .to_vec();
        frame[50] ^= 0xff;
        initiator.write_all(&frame).await.unwrap();

        let result = splicer.await.unwrap();
        assert!(
            matches!(
                result,
                Err(ConnectionError::Decode {
                    side: "initiator",
                    ..
                })
            ),
            "{result:?}"
        );
        let mut after_login = Vec::new();
        let n = target.read_to_end(&mut after_login).await.unwrap_or(0);
        assert_eq!(n, 0, "nothing after the login reached the target");
    }

    /// An initiator that connects and never completes its login (a slow-loris
    /// sender: half a Login PDU, then nothing) is closed once the login timeout
    /// passes; a logged-in session idle for longer is not (the test above idles
    /// after login under the default timeout without being cut).
    #[tokio::test]
    async fn a_login_that_stalls_is_closed() {
        let (mut initiator, client) = pair().await;
        let (upstream, mut target) = pair().await;
        let mut catalog = Catalog::empty();
        catalog.login_timeout = std::time::Duration::from_millis(200);
        let ctx = SpliceContext {
            catalog: Arc::new(catalog),
            stats: Arc::new(SplicerStats::default()),
            handoff: None,
        };
        let splicer = tokio::spawn(async move { splice_iscsi(client, upstream, &ctx).await });
        let pdu = login(
            Opcode::LoginRequest,
            "InitiatorName=iqn.i\0TargetName=iqn.t\0",
        );
        initiator.write_all(&pdu[..30]).await.unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), splicer)
            .await
            .expect("closed within the bound")
            .unwrap();
        assert!(
            matches!(result, Err(ConnectionError::LoginTimeout(_))),
            "{result:?}"
        );
        let mut rest = Vec::new();
        assert_eq!(target.read_to_end(&mut rest).await.unwrap_or(0), 0);
        let mut rest = Vec::new();
        assert_eq!(initiator.read_to_end(&mut rest).await.unwrap_or(0), 0);
    }

    /// With no served LUN on the target, the connection drops to the byte relay
    /// after login: later bytes reach the target exactly as sent (even a PDU the
    /// splicer would not have decoded), and the session ends cleanly.
    #[tokio::test]
    async fn session_without_served_luns_is_handed_to_the_byte_relay() {
        let (mut initiator, client) = pair().await;
        let (upstream, mut target) = pair().await;
        let stats = Arc::new(SplicerStats::default());
        let ctx = SpliceContext {
            catalog: Arc::new(Catalog::empty()),
            stats: stats.clone(),
            handoff: None,
        };
        let splicer = tokio::spawn(async move { splice_iscsi(client, upstream, &ctx).await });
        initiator
            .write_all(&login(
                Opcode::LoginRequest,
                "InitiatorName=iqn.i\0TargetName=iqn.t\0SessionType=Normal\0",
            ))
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let decoder = PduDecoder::default();
        loop {
            target.read_buf(&mut buf).await.unwrap();
            if decoder.decode(&mut buf).unwrap().is_some() {
                break;
            }
        }
        target
            .write_all(&login(Opcode::LoginResponse, ""))
            .await
            .unwrap();
        let mut resp = vec![0u8; 48];
        initiator.read_exact(&mut resp).await.unwrap();
        // Garbage the PDU decoder would reject (an absurd data segment length).
        let garbage = [0xffu8; 64];
        initiator.write_all(&garbage).await.unwrap();
        let mut got = vec![0u8; garbage.len()];
        target.read_exact(&mut got).await.unwrap();
        assert_eq!(got, garbage);
        drop(initiator);
        drop(target);
        assert!(splicer.await.unwrap().is_ok());
        assert_eq!(stats.raw_relayed.load(Ordering::Relaxed), 1);
    }
}
