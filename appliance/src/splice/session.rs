//! Per-connection iSCSI session state for the splicer: a pure state machine the tokio
//! relay feeds with every PDU it decodes, and which tells it what to send where.
//!
//! It owns: the phase (login → full feature → logout), whether the session may be
//! served at all (discovery and sessions whose negotiation came out wrong are passed
//! through untouched), the negotiated parameters per direction, the ITT → task table
//! (which tasks are served locally and in which design), the sequence-number
//! translation of the split ("local") design, and the order in which PDUs reach the
//! initiator.
//!
//! # How the relay drives it
//! 1. For each PDU from the initiator: if [`Session::read_candidate`] returns a READ,
//!    decide the [`Disposition`] (LUN policy, capacity, cache); then call
//!    [`Session::from_initiator`].
//! 2. For each PDU from the target: [`Session::from_target`].
//! 3. For each [`FetchRequest`] in an [`Output`], read the blocks and call
//!    [`Session::data_ready`] (or [`Session::data_failed`]); drop fetches listed in
//!    [`Output::cancel`].
//! 4. After every call, write `to_target` then `to_initiator` in order (encoding
//!    [`Outgoing::Pdu`] with [`Session::digests`]), and apply `events` (digests and
//!    receive limits change at [`Event::FullFeature`]).
//!
//! # Sequence numbers (RFC 7143 §4.2.2)
//! While no task is served in the local design the counters are shared: everything the
//! target numbers reaches the initiator unchanged (the shadow design needs nothing
//! else). The first locally served task switches the session to *split* counters,
//! kept as two offsets: `cmd_offset` counts the non-immediate initiator commands the
//! target never saw, `stat_offset` the status PDUs the splicer numbered itself.
//! Initiator CmdSN − `cmd_offset` is the target's CmdSN (one connection, so commands
//! arrive in CmdSN order), and target StatSN/ExpCmdSN/MaxCmdSN + offset is what the
//! initiator sees. Because the offsets only grow, the window advertised to the initiator
//! never admits a command beyond the target's MaxCmdSN, so no command ever has to be
//! queued for a closed target window.
//!
//! # Ordering toward the initiator
//! StatSN must reach the initiator in order (strict initiators reconnect otherwise), so
//! a locally answered READ takes a place in the outgoing queue when its StatSN is fixed
//! (shadow: when the target's GOOD response arrives; local: when its data is ready) and
//! later PDUs wait behind it until its data is there. The relay should start fetching
//! as soon as it sees [`Output::fetch`], which is emitted when the READ arrives.

use super::catalog::ServeDesign;
use super::datain::{self, ReadTask, StatusCounters};
use super::login::{LoginProgress, LoginTracker, Negotiation, OperationalParams, Side};
use super::pdu::{
    tmf_response, Bhs, Digests, EncodeError, Opcode, OutgoingPdu, Pdu, ReceivedPdu, TmfFunction,
    WireChain, BHS_LEN, RESERVED_TAG,
};
use super::scsi::{self, ReadCommand, Sense};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// Where the connection is in its life (§6.3, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Login,
    FullFeature,
    /// A Logout Request was forwarded; waiting for the response.
    LoggingOut,
    /// Logged out, or the login failed: the connection is closing.
    Ended,
}

/// How the relay wants a READ handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    PassThrough,
    /// Forward a zero-length shadow of the READ; serve the data locally with the
    /// target's status (the default).
    Shadow,
    /// Serve entirely locally with split counters (opt-in per LUN). Downgraded to shadow
    /// until the target has answered one command in this session, so the unit attention
    /// tgt reports on a session's first command is not hidden.
    Local,
}

/// A PDU to write: the received bytes unchanged, or a PDU to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    Wire(Bytes),
    Pdu(OutgoingPdu),
}

impl Outgoing {
    /// The bytes to write with the connection's current `digests`.
    pub fn into_wire_chain(self, digests: Digests) -> Result<WireChain, EncodeError> {
        match self {
            Outgoing::Wire(bytes) => Ok(WireChain::from_wire(bytes)),
            Outgoing::Pdu(pdu) => pdu.encode(digests),
        }
    }

    /// The BHS of a built PDU (tests and logging); `None` for raw wire bytes.
    #[cfg(any(test, feature = "testing"))]
    pub fn bhs(&self) -> Option<Bhs> {
        match self {
            Outgoing::Wire(bytes) => {
                let raw: [u8; BHS_LEN] = bytes.get(..BHS_LEN)?.try_into().ok()?;
                Some(Bhs(raw))
            }
            Outgoing::Pdu(pdu) => Some(pdu.bhs),
        }
    }
}

/// Blocks the relay must read for a served READ (lba and blocks in `read`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub itt: u32,
    pub lun: u64,
    pub read: ReadCommand,
    pub design: ServeDesign,
}

/// Things the relay must act on besides sending PDUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Full Feature Phase started after the PDU just handled: switch both decoders to
    /// `params.digests()` and the receive limits to the declared lengths.
    FullFeature(Box<OperationalParams>),
    /// A Text renegotiation changed the parameters (e.g. MaxRecvDataSegmentLength).
    ParamsChanged(Box<OperationalParams>),
    /// A command that may write this LUN went to the target: cached blocks are stale.
    MediumMayChange { lun: u64 },
    /// The login failed or was redirected; the target closes the connection.
    LoginEnded(LoginProgress),
    /// The logout completed; the connection closes.
    LoggedOut,
}

/// What one call produced, to be carried out in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub to_target: Vec<Outgoing>,
    pub to_initiator: Vec<Outgoing>,
    pub fetch: Vec<FetchRequest>,
    /// ITTs whose fetches are no longer wanted.
    pub cancel: Vec<u32>,
    pub events: Vec<Event>,
}

/// A READ task the splicer serves itself: how, and its data once fetched.
#[derive(Clone, Debug)]
struct ServedRead {
    design: ServeDesign,
    edtl: u32,
    /// The blocks, once fetched; `Err` when the fetch failed.
    data: Option<Result<Vec<Bytes>, ()>>,
    /// The numbers the answer carries, fixed when it takes its place in the queue.
    counters: Option<StatusCounters>,
}

/// An outstanding task, by ITT.
#[derive(Clone, Debug)]
struct Task {
    lun: u64,
    /// CmdSN as the target saw it (for RefCmdSN translation); `None` if never sent.
    target_cmd_sn: Option<u32>,
    served: Option<ServedRead>,
}

/// A TMF request forwarded to the target, by its ITT.
#[derive(Clone, Copy, Debug)]
struct PendingTmf {
    function: TmfFunction,
    lun: u64,
    referenced_itt: u32,
}

/// A place in the queue toward the initiator.
#[derive(Clone, Debug)]
enum Slot {
    Ready(Outgoing),
    /// The answer to a served READ, sent once its data is there.
    Answer(u32),
}

/// Split-design counters (see the module documentation).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    split: bool,
    cmd_offset: u32,
    stat_offset: u32,
    /// The target's next StatSN (last status-bearing StatSN + 1).
    next_target_stat_sn: u32,
    /// The target's latest ExpCmdSN / MaxCmdSN.
    target_exp_cmd_sn: u32,
    target_max_cmd_sn: u32,
    /// The next CmdSN the target expects from us.
    next_target_cmd_sn: u32,
}

/// Serial-number comparison (RFC 1982, as §4.2.2 uses it): `a` is after `b`.
fn serial_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl Counters {
    /// Note the numbers of a target PDU before translation.
    fn observe_target(&mut self, bhs: &Bhs) {
        if bhs.advances_stat_sn() {
            self.next_target_stat_sn = bhs.stat_sn().wrapping_add(1);
        }
        if carries_window(bhs) {
            // §4.2.2.1: MaxCmdSN < ExpCmdSN - 1 means both are to be ignored.
            let exp = bhs.exp_cmd_sn();
            let max = bhs.max_cmd_sn();
            if !serial_after(exp.wrapping_sub(1), max) {
                if serial_after(exp, self.target_exp_cmd_sn) || self.target_exp_cmd_sn == 0 {
                    self.target_exp_cmd_sn = exp;
                }
                if serial_after(max, self.target_max_cmd_sn) || self.target_max_cmd_sn == 0 {
                    self.target_max_cmd_sn = max;
                }
            }
        }
    }

    /// Rewrite an initiator PDU's numbers into the target's space.
    fn translate_toward_target(&self, bhs: &mut Bhs) {
        if carries_cmd_sn(bhs) {
            bhs.set_cmd_sn(bhs.cmd_sn().wrapping_sub(self.cmd_offset));
        }
        bhs.set_exp_stat_sn(self.next_target_stat_sn);
    }

    /// Rewrite a target PDU's numbers into the initiator's space.
    fn translate_toward_initiator(&self, bhs: &mut Bhs) {
        let stat_sn_valid = bhs.opcode() != Opcode::DataIn || bhs.data_in_status();
        if stat_sn_valid {
            bhs.set_stat_sn(bhs.stat_sn().wrapping_add(self.stat_offset));
        }
        if carries_window(bhs) {
            bhs.set_exp_cmd_sn(bhs.exp_cmd_sn().wrapping_add(self.cmd_offset));
            bhs.set_max_cmd_sn(bhs.max_cmd_sn().wrapping_add(self.cmd_offset));
        }
    }

    /// Numbers for a status the splicer sends itself: takes the next initiator-side
    /// StatSN (split design only).
    fn allocate_local_status(&mut self) -> StatusCounters {
        let counters = StatusCounters {
            stat_sn: self.next_target_stat_sn.wrapping_add(self.stat_offset),
            exp_cmd_sn: self.target_exp_cmd_sn.wrapping_add(self.cmd_offset),
            max_cmd_sn: self.target_max_cmd_sn.wrapping_add(self.cmd_offset),
        };
        self.stat_offset = self.stat_offset.wrapping_add(1);
        counters
    }

    /// A command the target will never see consumed an initiator CmdSN.
    fn consume_locally(&mut self, bhs: &Bhs) {
        if bhs.advances_cmd_sn() {
            self.cmd_offset = self.cmd_offset.wrapping_add(1);
        }
    }

    fn translate_target_counters(&self, counters: StatusCounters) -> StatusCounters {
        StatusCounters {
            stat_sn: counters.stat_sn.wrapping_add(self.stat_offset),
            exp_cmd_sn: counters.exp_cmd_sn.wrapping_add(self.cmd_offset),
            max_cmd_sn: counters.max_cmd_sn.wrapping_add(self.cmd_offset),
        }
    }
}

fn carries_cmd_sn(bhs: &Bhs) -> bool {
    matches!(
        bhs.opcode(),
        Opcode::ScsiCommand
            | Opcode::NopOut
            | Opcode::TaskManagementRequest
            | Opcode::LoginRequest
            | Opcode::TextRequest
            | Opcode::LogoutRequest
    )
}

fn carries_window(bhs: &Bhs) -> bool {
    !bhs.opcode().is_initiator() && !matches!(bhs.opcode(), Opcode::Other(_))
}

/// One connection's session state.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    login: LoginTracker,
    negotiation: Negotiation,
    params: Option<OperationalParams>,
    tasks: HashMap<u32, Task>,
    pending_tmfs: HashMap<u32, PendingTmf>,
    queue: VecDeque<Slot>,
    counters: Counters,
    /// The target has answered at least one SCSI command (see [`Disposition::Local`]).
    target_answered: bool,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session {
            phase: Phase::Login,
            login: LoginTracker::new(),
            negotiation: Negotiation::default(),
            params: None,
            tasks: HashMap::new(),
            pending_tmfs: HashMap::new(),
            queue: VecDeque::new(),
            counters: Counters::default(),
            target_answered: false,
        }
    }

    /// Tasks the session follows (forwarded and served) until they complete.
    pub fn outstanding_tasks(&self) -> usize {
        self.tasks.len()
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The parameters in force (after login).
    #[cfg(any(test, feature = "testing"))]
    pub fn params(&self) -> Option<&OperationalParams> {
        self.params.as_ref()
    }

    /// Digests for PDUs the relay encodes now.
    #[cfg(any(test, feature = "testing"))]
    pub fn digests(&self) -> Digests {
        match (&self.params, self.phase) {
            (Some(params), Phase::FullFeature | Phase::LoggingOut) => params.digests(),
            _ => Digests::NONE,
        }
    }

    /// The ISID and TSIH of the session (its identity with InitiatorName).
    #[cfg(any(test, feature = "testing"))]
    pub fn isid_tsih(&self) -> ([u8; 6], u16) {
        (self.login.isid(), self.login.tsih())
    }

    /// Whether the split counters are in use.
    #[cfg(any(test, feature = "testing"))]
    pub fn split(&self) -> bool {
        self.counters.split
    }

    /// Whether the session is one the splicer serves in (a normal session in Full
    /// Feature Phase whose negotiation came out as forced).
    pub fn serving(&self) -> bool {
        self.phase == Phase::FullFeature
            && self
                .params
                .as_ref()
                .is_some_and(OperationalParams::serving_allowed)
    }

    /// Whether PDUs are interpreted (served, translated) rather than passed through.
    fn active(&self) -> bool {
        matches!(self.phase, Phase::FullFeature | Phase::LoggingOut)
            && self
                .params
                .as_ref()
                .is_some_and(OperationalParams::serving_allowed)
    }

    /// The READ in this initiator PDU if it could be served locally (the relay then
    /// checks LUN policy, capacity and cache before choosing a [`Disposition`]).
    pub fn read_candidate(&self, bhs: &Bhs) -> Option<ReadCommand> {
        if !self.serving() || self.tasks.contains_key(&bhs.itt()) || bhs.itt() == RESERVED_TAG {
            return None;
        }
        scsi::local_candidate(bhs)
    }

    // ---- Initiator → target ----

    /// Handle a PDU from the initiator. `disposition` matters only for a PDU
    /// [`Session::read_candidate`] accepted; pass [`Disposition::PassThrough`] otherwise.
    pub fn on_initiator_pdu(&mut self, received: ReceivedPdu, disposition: Disposition) -> Output {
        let mut out = Output::default();
        let bhs = received.pdu.bhs;
        match self.phase {
            Phase::Login => self.initiator_login(received, &mut out),
            _ if !self.active() => {
                self.observe_text(Side::Initiator, &received.pdu, &mut out);
                out.to_target.push(Outgoing::Wire(received.wire));
            }
            _ => match bhs.opcode() {
                Opcode::ScsiCommand => self.initiator_command(received, disposition, &mut out),
                Opcode::TaskManagementRequest => self.initiator_tmf(received, &mut out),
                Opcode::LogoutRequest => {
                    self.cancel_unqueued(|_| true, &mut out);
                    self.phase = Phase::LoggingOut;
                    self.forward_to_target(received, &mut out);
                }
                Opcode::TextRequest => {
                    self.observe_text(Side::Initiator, &received.pdu, &mut out);
                    self.forward_to_target(received, &mut out);
                }
                _ => self.forward_to_target(received, &mut out),
            },
        }
        self.drain(&mut out);
        out
    }

    fn initiator_login(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        if bhs.opcode() != Opcode::LoginRequest {
            out.to_target.push(Outgoing::Wire(received.wire));
            return;
        }
        // Login requests are immediate: the first command after login reuses this CmdSN.
        self.counters.next_target_cmd_sn = bhs.cmd_sn();
        match self.login.on_request(&bhs, &received.pdu.data) {
            Some(edited) => {
                let mut pdu = OutgoingPdu::from(received.pdu);
                pdu.data = vec![edited];
                out.to_target.push(Outgoing::Pdu(pdu));
            }
            None => out.to_target.push(Outgoing::Wire(received.wire)),
        }
    }

    fn initiator_command(
        &mut self,
        received: ReceivedPdu,
        disposition: Disposition,
        out: &mut Output,
    ) {
        let bhs = received.pdu.bhs;
        let itt = bhs.itt();
        let read = match disposition {
            Disposition::PassThrough => None,
            _ => self.read_candidate(&bhs),
        };
        let Some(read) = read else {
            if scsi::command_may_write(&bhs) {
                out.events.push(Event::MediumMayChange { lun: bhs.lun() });
            }
            self.forward_to_target(received, out);
            return;
        };
        let design = match disposition {
            Disposition::Local if self.target_answered => ServeDesign::Local,
            _ => ServeDesign::Shadow,
        };
        let edtl = bhs.expected_data_transfer_length();
        out.fetch.push(FetchRequest {
            itt,
            lun: bhs.lun(),
            read,
            design,
        });
        let served = ServedRead {
            design,
            edtl,
            data: None,
            counters: None,
        };
        match design {
            ServeDesign::Shadow => {
                let shadow = Pdu::header_only(scsi::shadow_command(&bhs, &read));
                let target_cmd_sn = self.send_to_target(shadow, out);
                self.tasks.insert(
                    itt,
                    Task {
                        lun: bhs.lun(),
                        target_cmd_sn: Some(target_cmd_sn),
                        served: Some(served),
                    },
                );
            }
            ServeDesign::Local => {
                self.counters.split = true;
                self.counters.consume_locally(&bhs);
                self.tasks.insert(
                    itt,
                    Task {
                        lun: bhs.lun(),
                        target_cmd_sn: None,
                        served: Some(served),
                    },
                );
            }
        }
    }

    fn initiator_tmf(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        let function = bhs.tmf_function();
        let lun = bhs.lun();
        let rtt = bhs.referenced_task_tag();
        match function {
            TmfFunction::AbortTask => {
                let local = self.tasks.get(&rtt).and_then(|task| task.served.as_ref());
                if let Some(served) = local.filter(|s| s.design == ServeDesign::Local) {
                    // Answered here: the target never saw the task. If its answer already
                    // has a place in the queue it completes first; otherwise it is
                    // dropped. Either way the abort's answer is Function Complete
                    // (§11.6.1: a task whose CmdSN was received counts as done).
                    if served.counters.is_none() {
                        self.tasks.remove(&rtt);
                        out.cancel.push(rtt);
                    }
                    self.counters.consume_locally(&bhs);
                    let counters = self.counters.allocate_local_status();
                    self.queue
                        .push_back(Slot::Ready(Outgoing::Pdu(tmf_answer(&bhs, counters))));
                    return;
                }
            }
            TmfFunction::AbortTaskSet
            | TmfFunction::ClearTaskSet
            | TmfFunction::LogicalUnitReset => {
                self.cancel_unqueued(|task| task.lun == lun, out);
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                self.cancel_unqueued(|_| true, out);
            }
            _ => {}
        }
        self.pending_tmfs.insert(
            bhs.itt(),
            PendingTmf {
                function,
                lun,
                referenced_itt: rtt,
            },
        );
        let mut pdu = received.pdu;
        if self.counters.split {
            // RTT: ITTs pass unchanged (the splicer starts no tasks of its own on the
            // initiator's session), but RefCmdSN is in the initiator's CmdSN space.
            let ref_cmd_sn = self
                .tasks
                .get(&rtt)
                .and_then(|task| task.target_cmd_sn)
                .unwrap_or_else(|| bhs.ref_cmd_sn().wrapping_sub(self.counters.cmd_offset));
            pdu.bhs.set_ref_cmd_sn(ref_cmd_sn);
            self.send_to_target(pdu, out);
        } else {
            self.forward_received(ReceivedPdu { pdu, ..received }, out);
        }
    }

    /// Drop local tasks matching `which` whose answers have no place in the queue yet
    /// (those that do complete normally, ahead of whatever caused the cancel). Shadow
    /// tasks still waiting for the target are left to the target, which aborts them too.
    fn cancel_unqueued(&mut self, which: impl Fn(&Task) -> bool, out: &mut Output) {
        let cancelled: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, task)| {
                which(task)
                    && task
                        .served
                        .as_ref()
                        .is_some_and(|s| s.design == ServeDesign::Local && s.counters.is_none())
            })
            .map(|(itt, _)| *itt)
            .collect();
        for itt in cancelled {
            self.tasks.remove(&itt);
            out.cancel.push(itt);
        }
    }

    /// Forward an initiator PDU: unchanged while counters are shared, translated when
    /// split. Plain SCSI commands are recorded for RefCmdSN translation.
    fn forward_to_target(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        if bhs.opcode() == Opcode::ScsiCommand && bhs.itt() != RESERVED_TAG {
            let target_cmd_sn = bhs.cmd_sn().wrapping_sub(self.counters.cmd_offset);
            self.tasks.insert(
                bhs.itt(),
                Task {
                    lun: bhs.lun(),
                    target_cmd_sn: Some(target_cmd_sn),
                    served: None,
                },
            );
        }
        if self.counters.split {
            self.send_to_target(received.pdu, out);
        } else {
            self.forward_received(received, out);
        }
    }

    fn forward_received(&mut self, received: ReceivedPdu, out: &mut Output) {
        self.note_sent_cmd_sn(&received.pdu.bhs);
        out.to_target.push(Outgoing::Wire(received.wire));
    }

    /// Send a (possibly rebuilt) initiator PDU, translating its numbers; returns the
    /// CmdSN it carries toward the target.
    fn send_to_target(&mut self, mut pdu: Pdu, out: &mut Output) -> u32 {
        if self.counters.split {
            self.counters.translate_toward_target(&mut pdu.bhs);
        }
        self.note_sent_cmd_sn(&pdu.bhs);
        let cmd_sn = pdu.bhs.cmd_sn();
        out.to_target.push(Outgoing::Pdu(pdu.into()));
        cmd_sn
    }

    fn note_sent_cmd_sn(&mut self, bhs: &Bhs) {
        if carries_cmd_sn(bhs) {
            let next = if bhs.advances_cmd_sn() {
                bhs.cmd_sn().wrapping_add(1)
            } else {
                bhs.cmd_sn()
            };
            self.counters.next_target_cmd_sn = next;
        }
    }

    // ---- Target → initiator ----

    /// Handle a PDU from the target.
    pub fn on_target_pdu(&mut self, received: ReceivedPdu) -> Output {
        let mut out = Output::default();
        let bhs = received.pdu.bhs;
        self.counters.observe_target(&bhs);
        match self.phase {
            Phase::Login => self.target_login(received, &mut out),
            _ if !self.active() => {
                self.observe_text(Side::Target, &received.pdu, &mut out);
                if bhs.opcode() == Opcode::LogoutResponse {
                    self.phase = Phase::Ended;
                    out.events.push(Event::LoggedOut);
                }
                self.queue
                    .push_back(Slot::Ready(Outgoing::Wire(received.wire)));
            }
            _ => match bhs.opcode() {
                Opcode::ScsiResponse => self.target_response(received, &mut out),
                Opcode::DataIn => {
                    if bhs.data_in_status() {
                        self.target_answered = true;
                        self.tasks.remove(&bhs.itt());
                    }
                    self.forward_to_initiator(received);
                }
                Opcode::NopIn if bhs.ttt() != RESERVED_TAG && self.counters.split => {
                    // The target pings: answer it here (the initiator's NOP-Out would
                    // carry numbers from its own space), §11.18.
                    let mut answer = Bhs::new(Opcode::NopOut);
                    answer.set_immediate(true);
                    answer.set_final_bit(true);
                    answer.set_itt(RESERVED_TAG);
                    answer.set_ttt(bhs.ttt());
                    answer.set_lun(bhs.lun());
                    answer.set_cmd_sn(self.counters.next_target_cmd_sn);
                    answer.set_exp_stat_sn(self.counters.next_target_stat_sn);
                    out.to_target
                        .push(Outgoing::Pdu(OutgoingPdu::new(answer, Vec::new())));
                }
                Opcode::TaskManagementResponse => self.target_tmf_response(received, &mut out),
                Opcode::LogoutResponse => {
                    self.phase = Phase::Ended;
                    out.events.push(Event::LoggedOut);
                    self.forward_to_initiator(received);
                }
                Opcode::TextResponse => {
                    self.observe_text(Side::Target, &received.pdu, &mut out);
                    self.forward_to_initiator(received);
                }
                Opcode::Reject => self.target_reject(received),
                // Async messages (events 0–4 reflected, §11.9), R2T, NOP-In, others.
                _ => self.forward_to_initiator(received),
            },
        }
        self.drain(&mut out);
        out
    }

    fn target_login(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        self.queue
            .push_back(Slot::Ready(Outgoing::Wire(received.wire)));
        if bhs.opcode() != Opcode::LoginResponse {
            return;
        }
        match self.login.on_response(&bhs, &received.pdu.data) {
            LoginProgress::InProgress => {}
            LoginProgress::FullFeature(params) => {
                self.phase = Phase::FullFeature;
                self.negotiation = self.login.negotiation().clone();
                self.negotiation.enter_full_feature();
                self.params = Some((*params).clone());
                out.events.push(Event::FullFeature(params));
            }
            ended => {
                self.phase = Phase::Ended;
                out.events.push(Event::LoginEnded(ended));
            }
        }
    }

    fn target_response(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        self.target_answered = true;
        let itt = bhs.itt();
        let shadow = self
            .tasks
            .get(&itt)
            .and_then(|task| task.served.as_ref())
            .is_some_and(|served| served.design == ServeDesign::Shadow);
        if !shadow {
            self.tasks.remove(&itt);
            self.forward_to_initiator(received);
            return;
        }
        let good = bhs.response() == 0 && bhs.status() == scsi::status::GOOD;
        if good {
            // The target checked everything and transferred nothing: the local data and
            // status take this response's place (and StatSN).
            let counters = self
                .counters
                .translate_target_counters(StatusCounters::from_target_response(&bhs));
            if let Some(served) = self.tasks.get_mut(&itt).and_then(|t| t.served.as_mut()) {
                served.counters = Some(counters);
            }
            self.queue.push_back(Slot::Answer(itt));
        } else {
            // The target's verdict stands (unit attention, reservation conflict, LBA
            // out of range...); the fetched data is not needed.
            let edtl = self
                .tasks
                .remove(&itt)
                .and_then(|task| task.served)
                .map_or(0, |served| served.edtl);
            out.cancel.push(itt);
            let mut pdu = received.pdu;
            pdu.bhs = datain::restore_shadow_failure(&pdu.bhs, edtl);
            self.counters.translate_toward_initiator(&mut pdu.bhs);
            self.queue.push_back(Slot::Ready(Outgoing::Pdu(pdu.into())));
        }
    }

    fn target_tmf_response(&mut self, received: ReceivedPdu, out: &mut Output) {
        let bhs = received.pdu.bhs;
        if let Some(tmf) = self.pending_tmfs.remove(&bhs.itt()) {
            if bhs.response() == tmf_response::FUNCTION_COMPLETE {
                // Tasks the target aborted get no response: forget them, and with them
                // shadow tasks whose answer has no place in the queue.
                let aborted = |itt: u32, task: &Task| match tmf.function {
                    TmfFunction::AbortTask => itt == tmf.referenced_itt,
                    TmfFunction::AbortTaskSet
                    | TmfFunction::ClearTaskSet
                    | TmfFunction::LogicalUnitReset => task.lun == tmf.lun,
                    TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => true,
                    _ => false,
                };
                let forgotten: Vec<u32> = self
                    .tasks
                    .iter()
                    .filter(|&(&itt, task)| {
                        let answered = task.served.as_ref().is_some_and(|s| s.counters.is_some());
                        !answered && aborted(itt, task)
                    })
                    .map(|(&itt, _)| itt)
                    .collect();
                for itt in forgotten {
                    if self.tasks.remove(&itt).is_some_and(|t| t.served.is_some()) {
                        out.cancel.push(itt);
                    }
                }
            }
        }
        self.forward_to_initiator(received);
    }

    fn target_reject(&mut self, received: ReceivedPdu) {
        let mut pdu = received.pdu;
        if let Some(header) = pdu.data.get(..BHS_LEN) {
            let mut rejected = Bhs(header.try_into().unwrap_or([0; BHS_LEN]));
            // The rejected command will get no response.
            if rejected.opcode() == Opcode::ScsiCommand {
                self.tasks.remove(&rejected.itt());
            }
            if self.counters.split {
                // The copy of our header goes back into the initiator's numbering.
                if carries_cmd_sn(&rejected) {
                    rejected.set_cmd_sn(rejected.cmd_sn().wrapping_add(self.counters.cmd_offset));
                }
                let mut data = rejected.0.to_vec();
                data.extend_from_slice(&pdu.data[BHS_LEN..]);
                pdu.data = Bytes::from(data);
            }
        }
        if self.counters.split {
            self.counters.translate_toward_initiator(&mut pdu.bhs);
            self.queue.push_back(Slot::Ready(Outgoing::Pdu(pdu.into())));
        } else {
            self.queue
                .push_back(Slot::Ready(Outgoing::Wire(received.wire)));
        }
    }

    fn forward_to_initiator(&mut self, received: ReceivedPdu) {
        let item = if self.counters.split {
            let mut pdu = received.pdu;
            self.counters.translate_toward_initiator(&mut pdu.bhs);
            Outgoing::Pdu(pdu.into())
        } else {
            Outgoing::Wire(received.wire)
        };
        self.queue.push_back(Slot::Ready(item));
    }

    /// Follow Text negotiation in Full Feature Phase (§13.12: MaxRecvDataSegmentLength
    /// may change).
    fn observe_text(&mut self, side: Side, pdu: &Pdu, out: &mut Output) {
        let text_opcode = match side {
            Side::Initiator => Opcode::TextRequest,
            Side::Target => Opcode::TextResponse,
        };
        if pdu.bhs.opcode() != text_opcode || self.params.is_none() {
            return;
        }
        self.negotiation.observe(side, &pdu.bhs, &pdu.data);
        let params = self.negotiation.operational();
        if self.params.as_ref() != Some(&params) {
            self.params = Some(params.clone());
            out.events.push(Event::ParamsChanged(Box::new(params)));
        }
    }

    // ---- Local data ----

    /// The blocks a [`FetchRequest`] asked for (exactly blocks × block size bytes, as
    /// buffers in order).
    pub fn data_ready(&mut self, itt: u32, data: Vec<Bytes>) -> Output {
        self.fetched(itt, Ok(data))
    }

    /// The blocks could not be read: the READ is answered with CHECK CONDITION, ABORTED
    /// COMMAND (which initiators retry).
    pub fn data_failed(&mut self, itt: u32) -> Output {
        self.fetched(itt, Err(()))
    }

    fn fetched(&mut self, itt: u32, data: Result<Vec<Bytes>, ()>) -> Output {
        let mut out = Output::default();
        let counters = &mut self.counters;
        if let Some(served) = self.tasks.get_mut(&itt).and_then(|t| t.served.as_mut()) {
            served.data = Some(data);
            if served.design == ServeDesign::Local && served.counters.is_none() {
                // The local answer's StatSN is fixed now, and it queues in that order.
                served.counters = Some(counters.allocate_local_status());
                self.queue.push_back(Slot::Answer(itt));
            }
        }
        self.drain(&mut out);
        out
    }

    /// Move everything ready at the front of the queue to `out`.
    fn drain(&mut self, out: &mut Output) {
        while let Some(slot) = self.queue.front() {
            match slot {
                Slot::Ready(_) => {
                    if let Some(Slot::Ready(item)) = self.queue.pop_front() {
                        out.to_initiator.push(item);
                    }
                }
                Slot::Answer(itt) => {
                    let itt = *itt;
                    let Some(task) = self.tasks.get(&itt) else {
                        self.queue.pop_front();
                        continue;
                    };
                    let Some(answer) = self.answer(itt, task) else {
                        break;
                    };
                    self.tasks.remove(&itt);
                    self.queue.pop_front();
                    out.to_initiator
                        .extend(answer.into_iter().map(Outgoing::Pdu));
                }
            }
        }
    }

    /// The PDUs answering a served task, once its data and numbers are known.
    fn answer(&self, itt: u32, task: &Task) -> Option<Vec<OutgoingPdu>> {
        let served = task.served.as_ref()?;
        let counters = served.counters?;
        let read_task = ReadTask {
            itt,
            lun: task.lun,
            edtl: served.edtl,
        };
        Some(if let Ok(data) = served.data.as_ref()? {
            let limits = self.params.as_ref()?.data_in_limits();
            datain::read_answer(&read_task, data, limits, counters)
        } else {
            // The fetch failed.
            let aborted = Sense {
                key: scsi::sense_key::ABORTED_COMMAND,
                asc: 0,
                ascq: 0,
            };
            vec![datain::check_condition(&read_task, aborted, counters)]
        })
    }
}

/// The splicer's own Function Complete answer to a TMF request.
fn tmf_answer(request: &Bhs, counters: StatusCounters) -> OutgoingPdu {
    let mut bhs = Bhs::new(Opcode::TaskManagementResponse);
    bhs.set_final_bit(true);
    bhs.set_response(tmf_response::FUNCTION_COMPLETE);
    bhs.set_itt(request.itt());
    bhs.set_stat_sn(counters.stat_sn);
    bhs.set_exp_cmd_sn(counters.exp_cmd_sn);
    bhs.set_max_cmd_sn(counters.max_cmd_sn);
    OutgoingPdu::new(bhs, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::pdu::{data_in_flags, PduDecoder, Residual};
    use bytes::BytesMut;

    const LUN1: u64 = 0x0001_0000_0000_0000;

    fn received(bhs: Bhs, data: &[u8]) -> ReceivedPdu {
        let pdu = Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::copy_from_slice(data),
        };
        let mut wire = BytesMut::from(&pdu.encode(Digests::NONE).unwrap().to_bytes()[..]);
        PduDecoder::default().decode(&mut wire).unwrap().unwrap()
    }

    fn bhs_of(out: &[Outgoing]) -> Vec<Bhs> {
        out.iter().map(|o| o.bhs().unwrap()).collect()
    }

    /// A session through login with libiscsi-like parameters: MRDSL 8192 toward the
    /// initiator, CmdSN starting at 1, target StatSN 0 on the final login response.
    fn logged_in(session_type: &str) -> Session {
        let mut session = Session::new();
        let mut req = Bhs::new(Opcode::LoginRequest);
        req.set_immediate(true);
        req.set_flags(0x87);
        req.set_cmd_sn(1);
        let text = format!(
            "InitiatorName=iqn.i\0TargetName=iqn.t\0SessionType={session_type}\0\
             ErrorRecoveryLevel=2\0MaxRecvDataSegmentLength=8192\0"
        );
        let out = session.on_initiator_pdu(received(req, text.as_bytes()), Disposition::PassThrough);
        let Outgoing::Pdu(edited) = &out.to_target[0] else {
            panic!("offer not edited");
        };
        assert!(std::str::from_utf8(&edited.data[0])
            .unwrap()
            .contains("ErrorRecoveryLevel=0\0"));
        let mut resp = Bhs::new(Opcode::LoginResponse);
        resp.set_flags(0x87);
        resp.set_tsih(3);
        resp.set_stat_sn(0);
        resp.set_exp_cmd_sn(1);
        resp.set_max_cmd_sn(128);
        let out = session.on_target_pdu(received(resp, b"ErrorRecoveryLevel=0\0"));
        assert_eq!(out.to_initiator.len(), 1);
        assert!(matches!(out.events[..], [Event::FullFeature(_)]));
        assert_eq!(session.phase(), Phase::FullFeature);
        assert_eq!(session.isid_tsih().1, 3);
        session
    }

    fn read10(itt: u32, cmd_sn: u32, lba: u32, blocks: u16, edtl: u32) -> Bhs {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_final_bit(true);
        bhs.set_command_read(true);
        bhs.set_command_attr(1);
        bhs.set_lun(LUN1);
        bhs.set_itt(itt);
        bhs.set_cmd_sn(cmd_sn);
        bhs.set_exp_stat_sn(1);
        bhs.set_expected_data_transfer_length(edtl);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        bhs.set_cdb(&cdb);
        bhs
    }

    fn command(opcode: u8, itt: u32, cmd_sn: u32) -> Bhs {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_final_bit(true);
        bhs.set_lun(LUN1);
        bhs.set_itt(itt);
        bhs.set_cmd_sn(cmd_sn);
        let mut cdb = [0u8; 16];
        cdb[0] = opcode;
        bhs.set_cdb(&cdb);
        bhs
    }

    fn response(itt: u32, status: u8, stat_sn: u32, exp: u32) -> Bhs {
        let mut bhs = Bhs::new(Opcode::ScsiResponse);
        bhs.set_final_bit(true);
        bhs.set_itt(itt);
        bhs.set_status(status);
        bhs.set_stat_sn(stat_sn);
        bhs.set_exp_cmd_sn(exp);
        bhs.set_max_cmd_sn(exp + 127);
        bhs
    }

    fn blocks(n: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(vec![i as u8; 512])).collect()
    }

    /// Pass one command through and answer it, so local serving is allowed.
    fn first_command_answered(session: &mut Session) {
        let out =
            session.on_initiator_pdu(received(command(0x00, 1, 1), b""), Disposition::PassThrough);
        assert!(matches!(out.to_target[..], [Outgoing::Wire(_)]));
        let out = session.on_target_pdu(received(response(1, 0, 1, 2), b""));
        assert!(matches!(out.to_initiator[..], [Outgoing::Wire(_)]));
    }

    #[test]
    fn discovery_sessions_pass_through() {
        let mut session = logged_in("Discovery");
        let read = read10(5, 1, 0, 8, 4096);
        assert_eq!(session.read_candidate(&read), None);
        let out = session.on_initiator_pdu(received(read, b""), Disposition::Shadow);
        assert!(matches!(out.to_target[..], [Outgoing::Wire(_)]));
        assert!(out.fetch.is_empty());
        let mut text = Bhs::new(Opcode::TextRequest);
        text.set_final_bit(true);
        let out = session.on_initiator_pdu(
            received(text, b"SendTargets=All\0"),
            Disposition::PassThrough,
        );
        assert!(matches!(out.to_target[..], [Outgoing::Wire(_)]));
    }

    #[test]
    fn shadow_read_goes_upstream_empty_and_is_answered_locally() {
        let mut session = logged_in("Normal");
        let read = read10(0x10, 1, 100, 8, 4096);
        assert!(session.read_candidate(&read).is_some());
        let out = session.on_initiator_pdu(received(read, b""), Disposition::Shadow);
        let [shadow] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(shadow.itt(), 0x10);
        assert_eq!(shadow.cmd_sn(), 1);
        assert_eq!(shadow.expected_data_transfer_length(), 0);
        assert!(!shadow.command_read());
        assert_eq!(scsi::parse_read(shadow.cdb()).unwrap().blocks, 0);
        assert_eq!(out.fetch.len(), 1);
        assert_eq!((out.fetch[0].read.lba, out.fetch[0].read.blocks), (100, 8));
        assert_eq!(out.fetch[0].design, ServeDesign::Shadow);

        // Data first, then the target's verdict.
        let out = session.data_ready(0x10, blocks(8));
        assert!(out.to_initiator.is_empty(), "waits for the target's status");
        let out = session.on_target_pdu(received(response(0x10, 0, 1, 2), b""));
        let pdus = bhs_of(&out.to_initiator);
        assert_eq!(pdus.len(), 1, "4096 bytes fit in MRDSL 8192");
        let last = pdus[0];
        assert_eq!(last.opcode(), Opcode::DataIn);
        assert!(last.data_in_status());
        assert_eq!(
            (last.stat_sn(), last.exp_cmd_sn(), last.max_cmd_sn()),
            (1, 2, 129)
        );
        assert!(!session.split());
    }

    #[test]
    fn shadow_answer_holds_later_pdus_in_statsn_order() {
        let mut session = logged_in("Normal");
        session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 8, 4096), b""),
            Disposition::Shadow,
        );
        session.on_initiator_pdu(
            received(command(0x00, 0x11, 2), b""),
            Disposition::PassThrough,
        );
        let out = session.on_target_pdu(received(response(0x10, 0, 1, 2), b""));
        assert!(out.to_initiator.is_empty());
        let out = session.on_target_pdu(received(response(0x11, 0, 2, 3), b""));
        assert!(out.to_initiator.is_empty(), "StatSN 2 waits for StatSN 1");
        let out = session.data_ready(0x10, blocks(8));
        let stat_sns: Vec<u32> = bhs_of(&out.to_initiator).iter().map(Bhs::stat_sn).collect();
        assert_eq!(stat_sns, [1, 2]);
    }

    #[test]
    fn shadow_failure_is_forwarded_with_full_underflow() {
        let mut session = logged_in("Normal");
        session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 8, 4096), b""),
            Disposition::Shadow,
        );
        let sense = scsi::response_sense_segment(Sense::POWER_ON_RESET);
        let out = session.on_target_pdu(received(response(0x10, 2, 1, 2), &sense));
        assert_eq!(out.cancel, [0x10]);
        let [Outgoing::Pdu(pdu)] = &out.to_initiator[..] else {
            panic!()
        };
        assert_eq!(pdu.bhs.status(), scsi::status::CHECK_CONDITION);
        assert_eq!(pdu.bhs.residual(), Residual::Underflow(4096));
        assert_eq!(pdu.data, [sense]);
        // A late fetch result is ignored.
        assert!(session.data_ready(0x10, blocks(8)).to_initiator.is_empty());
    }

    #[test]
    fn failed_fetch_answers_aborted_command() {
        let mut session = logged_in("Normal");
        session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 8, 4096), b""),
            Disposition::Shadow,
        );
        session.on_target_pdu(received(response(0x10, 0, 1, 2), b""));
        let out = session.data_failed(0x10);
        let [Outgoing::Pdu(pdu)] = &out.to_initiator[..] else {
            panic!()
        };
        assert_eq!(pdu.bhs.status(), scsi::status::CHECK_CONDITION);
        assert_eq!(pdu.bhs.stat_sn(), 1);
        let sense = scsi::sense_from_response_segment(&pdu.data[0]).unwrap();
        assert_eq!(sense.key, scsi::sense_key::ABORTED_COMMAND);
    }

    #[test]
    fn local_is_downgraded_to_shadow_until_the_target_answered() {
        let mut session = logged_in("Normal");
        let out = session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 8, 4096), b""),
            Disposition::Local,
        );
        assert_eq!(out.fetch[0].design, ServeDesign::Shadow);
        assert_eq!(out.to_target.len(), 1);
        assert!(!session.split());
    }

    #[test]
    fn local_read_splits_the_counters() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session); // CmdSN 1 used, target StatSN 1, ExpCmdSN 2
        let out = session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 20, 10240), b""),
            Disposition::Local,
        );
        assert!(out.to_target.is_empty(), "the target never sees it");
        assert_eq!(out.fetch[0].design, ServeDesign::Local);
        assert!(session.split());
        let out = session.data_ready(0x20, blocks(20));
        let pdus = bhs_of(&out.to_initiator);
        assert_eq!(pdus.len(), 2, "10240 bytes at MRDSL 8192");
        let last = pdus[1];
        assert!(last.data_in_status());
        assert_eq!(last.stat_sn(), 2, "next StatSN toward the initiator");
        assert_eq!(last.exp_cmd_sn(), 3, "CmdSN 2 consumed locally");
        assert_eq!(last.max_cmd_sn(), 2 + 127 + 1);
        assert_eq!(pdus[0].exp_cmd_sn(), 3);

        // The next forwarded command is renumbered into the target's space...
        let mut next = command(0x00, 0x21, 3);
        next.set_exp_stat_sn(3);
        let out = session.on_initiator_pdu(received(next, b""), Disposition::PassThrough);
        let [fwd] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(fwd.cmd_sn(), 2);
        assert_eq!(fwd.exp_stat_sn(), 2, "acknowledges what the target sent");
        // ...and its response back into the initiator's.
        let out = session.on_target_pdu(received(response(0x21, 0, 2, 3), b""));
        let [back] = &bhs_of(&out.to_initiator)[..] else {
            panic!()
        };
        assert_eq!(
            (back.stat_sn(), back.exp_cmd_sn(), back.max_cmd_sn()),
            (3, 4, 3 + 127 + 1)
        );
    }

    #[test]
    fn abort_of_a_local_task_is_answered_locally() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 8, 4096), b""),
            Disposition::Local,
        );
        let mut tmf = Bhs::new(Opcode::TaskManagementRequest);
        tmf.set_immediate(true);
        tmf.set_tmf_function(TmfFunction::AbortTask);
        tmf.set_itt(0x30);
        tmf.set_referenced_task_tag(0x20);
        tmf.set_cmd_sn(3);
        tmf.set_ref_cmd_sn(2);
        let out = session.on_initiator_pdu(received(tmf, b""), Disposition::PassThrough);
        assert!(out.to_target.is_empty());
        assert_eq!(out.cancel, [0x20]);
        let [resp] = &bhs_of(&out.to_initiator)[..] else {
            panic!()
        };
        assert_eq!(resp.opcode(), Opcode::TaskManagementResponse);
        assert_eq!(resp.itt(), 0x30);
        assert_eq!(resp.response(), tmf_response::FUNCTION_COMPLETE);
        assert_eq!(resp.stat_sn(), 2);
        // Nothing is sent for the task afterwards.
        assert!(session.data_ready(0x20, blocks(8)).to_initiator.is_empty());
    }

    #[test]
    fn abort_of_a_forwarded_task_translates_ref_cmd_sn() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 8, 4096), b""),
            Disposition::Local,
        );
        session.on_initiator_pdu(
            received(command(0x00, 0x21, 3), b""),
            Disposition::PassThrough,
        );
        let mut tmf = Bhs::new(Opcode::TaskManagementRequest);
        tmf.set_immediate(true);
        tmf.set_tmf_function(TmfFunction::AbortTask);
        tmf.set_itt(0x30);
        tmf.set_referenced_task_tag(0x21);
        tmf.set_cmd_sn(4);
        tmf.set_ref_cmd_sn(3);
        let out = session.on_initiator_pdu(received(tmf, b""), Disposition::PassThrough);
        let [fwd] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(fwd.referenced_task_tag(), 0x21);
        assert_eq!(fwd.ref_cmd_sn(), 2);
        assert_eq!(fwd.cmd_sn(), 3);
    }

    #[test]
    fn lun_reset_cancels_local_tasks_and_goes_to_the_target() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 8, 4096), b""),
            Disposition::Local,
        );
        let mut tmf = Bhs::new(Opcode::TaskManagementRequest);
        tmf.set_immediate(true);
        tmf.set_tmf_function(TmfFunction::LogicalUnitReset);
        tmf.set_lun(LUN1);
        tmf.set_itt(0x30);
        tmf.set_referenced_task_tag(RESERVED_TAG);
        tmf.set_cmd_sn(3);
        let out = session.on_initiator_pdu(received(tmf, b""), Disposition::PassThrough);
        assert_eq!(out.cancel, [0x20]);
        let [fwd] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(fwd.tmf_function(), TmfFunction::LogicalUnitReset);
        assert_eq!(fwd.cmd_sn(), 2);
    }

    #[test]
    fn lun_reset_response_forgets_shadow_tasks_the_target_aborted() {
        let mut session = logged_in("Normal");
        session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 8, 4096), b""),
            Disposition::Shadow,
        );
        let mut tmf = Bhs::new(Opcode::TaskManagementRequest);
        tmf.set_immediate(true);
        tmf.set_tmf_function(TmfFunction::LogicalUnitReset);
        tmf.set_lun(LUN1);
        tmf.set_itt(0x30);
        tmf.set_cmd_sn(2);
        let out = session.on_initiator_pdu(received(tmf, b""), Disposition::PassThrough);
        assert!(
            matches!(out.to_target[..], [Outgoing::Wire(_)]),
            "shared counters"
        );
        let mut resp = Bhs::new(Opcode::TaskManagementResponse);
        resp.set_final_bit(true);
        resp.set_itt(0x30);
        resp.set_stat_sn(1);
        resp.set_exp_cmd_sn(2);
        resp.set_max_cmd_sn(129);
        let out = session.on_target_pdu(received(resp, b""));
        assert_eq!(out.cancel, [0x10]);
        assert_eq!(out.to_initiator.len(), 1);
        assert!(session.data_ready(0x10, blocks(8)).to_initiator.is_empty());
    }

    fn nop_in_ping(ttt: u32) -> Bhs {
        let mut nop = Bhs::new(Opcode::NopIn);
        nop.set_final_bit(true);
        nop.set_itt(RESERVED_TAG);
        nop.set_ttt(ttt);
        nop.set_lun(LUN1);
        nop.set_stat_sn(2);
        nop.set_exp_cmd_sn(2);
        nop.set_max_cmd_sn(129);
        nop
    }

    #[test]
    fn target_pings_pass_through_with_shared_counters() {
        let mut session = logged_in("Normal");
        let out = session.on_target_pdu(received(nop_in_ping(7), b""));
        assert!(matches!(out.to_initiator[..], [Outgoing::Wire(_)]));
        assert!(out.to_target.is_empty());
    }

    #[test]
    fn target_pings_are_answered_with_split_counters() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 8, 4096), b""),
            Disposition::Local,
        );
        let out = session.on_target_pdu(received(nop_in_ping(7), b""));
        assert!(out.to_initiator.is_empty());
        let [answer] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(answer.opcode(), Opcode::NopOut);
        assert!(answer.immediate());
        assert_eq!(
            (answer.itt(), answer.ttt(), answer.lun()),
            (RESERVED_TAG, 7, LUN1)
        );
        assert_eq!(answer.cmd_sn(), 2, "the target's next CmdSN");
        assert_eq!(answer.exp_stat_sn(), 2);
    }

    #[test]
    fn writes_mark_the_lun_stale() {
        let mut session = logged_in("Normal");
        let mut write = command(0x2a, 0x40, 1);
        write.set_command_write(true);
        let out = session.on_initiator_pdu(received(write, b""), Disposition::PassThrough);
        assert_eq!(out.events, [Event::MediumMayChange { lun: LUN1 }]);
        assert_eq!(out.to_target.len(), 1);
    }

    #[test]
    fn data_in_for_forwarded_reads_passes_and_completes_the_task() {
        let mut session = logged_in("Normal");
        session.on_initiator_pdu(
            received(read10(0x10, 1, 0, 1, 512), b""),
            Disposition::PassThrough,
        );
        let mut data_in = Bhs::new(Opcode::DataIn);
        data_in.set_flags(data_in_flags::FINAL | data_in_flags::STATUS);
        data_in.set_itt(0x10);
        data_in.set_stat_sn(1);
        let out = session.on_target_pdu(received(data_in, &[0; 512]));
        assert!(matches!(out.to_initiator[..], [Outgoing::Wire(_)]));
        assert!(session.tasks.is_empty());
    }

    #[test]
    fn text_renegotiation_changes_limits() {
        let mut session = logged_in("Normal");
        let mut req = Bhs::new(Opcode::TextRequest);
        req.set_final_bit(true);
        session.on_initiator_pdu(
            received(req, b"MaxRecvDataSegmentLength=65536\0"),
            Disposition::PassThrough,
        );
        let params = session.params().unwrap();
        assert_eq!(params.initiator_max_recv_data_segment_length, 65536);
    }

    #[test]
    fn async_events_are_reflected_translated() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 1, 512), b""),
            Disposition::Local,
        );
        session.data_ready(0x20, blocks(1)); // local StatSN 2
        let mut event = Bhs::new(Opcode::AsyncMessage);
        event.set_final_bit(true);
        event.set_itt(RESERVED_TAG);
        event.0[36] = 1; // target requests logout
        event.set_stat_sn(2);
        event.set_exp_cmd_sn(2);
        event.set_max_cmd_sn(129);
        let out = session.on_target_pdu(received(event, b""));
        let [fwd] = &bhs_of(&out.to_initiator)[..] else {
            panic!()
        };
        assert_eq!(fwd.async_event(), 1);
        assert_eq!((fwd.stat_sn(), fwd.exp_cmd_sn()), (3, 3));
    }

    #[test]
    fn reject_translates_the_embedded_header() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 1, 512), b""),
            Disposition::Local,
        );
        session.on_initiator_pdu(
            received(command(0x00, 0x21, 3), b""),
            Disposition::PassThrough,
        );
        let mut sent = command(0x00, 0x21, 2); // as the target saw it
        sent.set_exp_stat_sn(2);
        let mut reject = Bhs::new(Opcode::Reject);
        reject.set_final_bit(true);
        reject.set_itt(RESERVED_TAG);
        reject.set_stat_sn(2);
        reject.set_exp_cmd_sn(3);
        reject.set_max_cmd_sn(130);
        let out = session.on_target_pdu(received(reject, &sent.0));
        let [Outgoing::Pdu(pdu)] = &out.to_initiator[..] else {
            panic!()
        };
        let embedded = Bhs(pdu.data[0][..48].try_into().unwrap());
        assert_eq!(embedded.cmd_sn(), 3);
        assert_eq!(pdu.bhs.exp_cmd_sn(), 4);
        assert!(!session.tasks.contains_key(&0x21));
    }

    #[test]
    fn logout_cancels_local_tasks_and_ends_the_session() {
        let mut session = logged_in("Normal");
        first_command_answered(&mut session);
        session.on_initiator_pdu(
            received(read10(0x20, 2, 0, 1, 512), b""),
            Disposition::Local,
        );
        let mut logout = Bhs::new(Opcode::LogoutRequest);
        logout.set_immediate(true);
        logout.set_flags(0x80);
        logout.set_itt(0x50);
        logout.set_cmd_sn(3);
        let out = session.on_initiator_pdu(received(logout, b""), Disposition::PassThrough);
        assert_eq!(out.cancel, [0x20]);
        let [fwd] = &bhs_of(&out.to_target)[..] else {
            panic!()
        };
        assert_eq!(fwd.cmd_sn(), 2);
        assert_eq!(session.phase(), Phase::LoggingOut);
        let mut resp = Bhs::new(Opcode::LogoutResponse);
        resp.set_final_bit(true);
        resp.set_itt(0x50);
        resp.set_stat_sn(2);
        let out = session.on_target_pdu(received(resp, b""));
        assert_eq!(out.events, [Event::LoggedOut]);
        assert_eq!(
            bhs_of(&out.to_initiator)[0].stat_sn(),
            2,
            "no local status was sent"
        );
        assert_eq!(session.phase(), Phase::Ended);
    }

    #[test]
    fn failed_login_ends_the_session() {
        let mut session = Session::new();
        let mut resp = Bhs::new(Opcode::LoginResponse);
        resp.set_login_status(2, 0);
        let out = session.on_target_pdu(received(resp, b""));
        assert!(matches!(
            out.events[..],
            [Event::LoginEnded(LoginProgress::Failed { .. })]
        ));
        assert_eq!(session.phase(), Phase::Ended);
    }

    #[test]
    fn digests_start_with_full_feature_phase() {
        let mut session = Session::new();
        assert_eq!(session.digests(), Digests::NONE);
        let mut req = Bhs::new(Opcode::LoginRequest);
        req.set_flags(0x87);
        session.on_initiator_pdu(
            received(req, b"HeaderDigest=CRC32C,None\0DataDigest=CRC32C,None\0"),
            Disposition::PassThrough,
        );
        assert_eq!(session.digests(), Digests::NONE);
        let mut resp = Bhs::new(Opcode::LoginResponse);
        resp.set_flags(0x87);
        session.on_target_pdu(received(resp, b"HeaderDigest=CRC32C\0DataDigest=CRC32C\0"));
        assert_eq!(
            session.digests(),
            Digests {
                header: true,
                data: true
            }
        );
    }

    #[test]
    fn wire_items_frame_unchanged() {
        let rx = received(command(0x00, 1, 1), b"");
        let frame = Outgoing::Wire(rx.wire.clone())
            .into_wire_chain(Digests::NONE)
            .unwrap();
        assert_eq!(frame.to_bytes(), rx.wire);
    }
}
