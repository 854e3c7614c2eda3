//! A small iSCSI test initiator: a real client that speaks the protocol (RFC 7143)
//! over TCP, built on the project's own PDU codec (`nearblock::splice::pdu`), for the
//! protocol features no real client in the lab offers (CRC32C-only digests, a small
//! MaxRecvDataSegmentLength, MaxBurstLength below the READ size, session
//! reinstatement, ABORT TASK at a chosen moment).
//!
//! It is deliberately strict about what it receives: every PDU goes through a
//! [`PduDecoder`] checking the negotiated digests and our declared
//! MaxRecvDataSegmentLength, StatSN must advance by one per status-bearing PDU, and a
//! READ's Data-In must have DataSN from 0, contiguous offsets within the EDTL and a
//! status consistent with the residual. Violations are errors (or, for the F bit at
//! burst boundaries, which tgt itself does not set, recorded in [`ReadResult`]).
//!
//! Blocking std I/O with a read timeout on every socket: nothing waits unbounded.
//! [`connect_in`] opens the TCP connection from inside a lab node's network namespace
//! (a short-lived thread `setns`es into it; the socket keeps its namespace), so the
//! initiator itself runs in the test thread, in parallel with other labs.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use nearblock::splice::{
    pdu::{
        self, data_in_flags, login_flags, Bhs, Digests, LoginStage, Opcode, Pdu, PduDecoder,
        TmfFunction, RESERVED_TAG,
    },
    scsi::{self, Sense},
    text,
};

use crate::Lab;

/// Open a TCP connection to `addr` from inside `node`'s namespace.
pub fn connect_in(lab: &Lab, node: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let ns_path = format!("/var/run/netns/{}", lab.ns(node));
    std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpStream> {
            let ns = std::fs::File::open(&ns_path).with_context(|| ns_path.clone())?;
            // SAFETY: setns on a namespace file we opened; it only affects this
            // short-lived thread, which exits after connecting.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connecting to {addr} from {node}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
    })
}

/// What the initiator offers at login.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    pub initiator_name: String,
    pub target_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// Offer `CRC32C` only (else `None` only).
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    /// Bound for every wait.
    pub timeout: Duration,
    /// Pairs appended to the first Login PDU's text as given (hostile-input tests:
    /// a second `TargetName`, garbage keys).
    pub extra_first_text: Vec<(String, String)>,
}

impl LoginOptions {
    pub fn new(initiator_name: &str, target_name: &str) -> LoginOptions {
        LoginOptions {
            initiator_name: initiator_name.into(),
            target_name: target_name.into(),
            isid: [0x80, 0x6e, 0x62, 0x00, 0x00, 0x01],
            tsih: 0,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            timeout: Duration::from_secs(20),
            extra_first_text: Vec::new(),
        }
    }
}

/// The outcome of a SCSI command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandResult {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Data-In reassembled (empty for commands that read nothing).
    pub data: Vec<u8>,
    /// Residual: positive underflow, negative overflow.
    pub residual: i64,
    /// Whether the status rode on the last Data-In (no SCSI Response).
    pub status_in_data_in: bool,
    pub data_in_pdus: usize,
    /// ExpDataSN of a separate SCSI Response (tgt sends 0 there even after Data-In).
    pub exp_data_sn: Option<u32>,
    /// Largest data segment of a Data-In PDU.
    pub max_segment: usize,
    /// End offsets of Data-In PDUs with the F bit.
    pub final_ends: Vec<u32>,
}

/// A READ's Data-In checked against a MaxBurstLength: where F should have been.
pub type ReadResult = CommandResult;

impl CommandResult {
    /// Whether F was set exactly at every `burst` boundary and on the last PDU.
    pub fn finals_at_bursts(&self, burst: u32) -> bool {
        let len = self.data.len() as u32;
        let mut want: Vec<u32> = if burst == 0 {
            Vec::new()
        } else {
            (burst..len).step_by(burst as usize).collect()
        };
        want.push(len);
        self.final_ends == want
    }
}

/// A TMF response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmfResult {
    pub response: u8,
}

/// One session over one connection.
pub struct Initiator {
    stream: TcpStream,
    buf: BytesMut,
    decoder: PduDecoder,
    digests: Digests,
    pub options: LoginOptions,
    /// The target's answers at login, key → value.
    pub negotiated: BTreeMap<String, String>,
    pub tsih: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    /// The target's declared MaxRecvDataSegmentLength (what we may send).
    target_mrdsl: u32,
    /// PDUs received for tasks we no longer wait for (kept for checks).
    pub stray: Vec<Bhs>,
    /// Asynchronous messages received.
    pub async_events: Vec<u8>,
}

fn itt_bhs(opcode: Opcode, itt: u32) -> Bhs {
    let mut bhs = Bhs::new(opcode);
    bhs.set_itt(itt);
    bhs
}

/// The LUN field for a LUN number (peripheral addressing, as libiscsi sends it).
pub fn lun_field(lun: u16) -> u64 {
    if lun < 256 {
        u64::from(lun) << 48
    } else {
        (0x4000 | u64::from(lun)) << 48
    }
}

fn text_segment(pairs: &[(&str, String)]) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    Bytes::from(out)
}

impl Initiator {
    /// Log in over `stream` (a normal session, security stage with AuthMethod=None,
    /// then the operational stage) and enter Full Feature Phase.
    pub fn login(stream: TcpStream, options: LoginOptions) -> Result<Initiator> {
        stream.set_read_timeout(Some(options.timeout))?;
        stream.set_write_timeout(Some(options.timeout))?;
        stream.set_nodelay(true)?;
        let mut ini = Initiator {
            stream,
            buf: BytesMut::with_capacity(1 << 20),
            decoder: PduDecoder::new(Digests::NONE),
            digests: Digests::NONE,
            negotiated: BTreeMap::new(),
            tsih: options.tsih,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            next_itt: 1,
            target_mrdsl: 8192,
            stray: Vec::new(),
            async_events: Vec::new(),
            options,
        };
        ini.do_login().context("login")?;
        Ok(ini)
    }

    fn do_login(&mut self) -> Result<()> {
        let o = self.options.clone();
        let yes_no = |b: bool| if b { "CRC32C" } else { "None" }.to_string();
        let mut security = vec![
            ("InitiatorName", o.initiator_name.clone()),
            ("TargetName", o.target_name.clone()),
            ("SessionType", "Normal".to_string()),
            ("AuthMethod", "None".to_string()),
        ];
        for (k, v) in &o.extra_first_text {
            security.push((k.as_str(), v.clone()));
        }
        let operational = vec![
            ("HeaderDigest", yes_no(o.header_digest)),
            ("DataDigest", yes_no(o.data_digest)),
            ("ErrorRecoveryLevel", "0".into()),
            ("MaxConnections", "1".into()),
            ("InitialR2T", "Yes".into()),
            ("ImmediateData", "Yes".into()),
            (
                "MaxRecvDataSegmentLength",
                o.max_recv_data_segment_length.to_string(),
            ),
            ("MaxBurstLength", o.max_burst_length.to_string()),
            ("FirstBurstLength", o.first_burst_length.to_string()),
            ("DefaultTime2Wait", "0".into()),
            ("DefaultTime2Retain", "0".into()),
            ("MaxOutstandingR2T", "1".into()),
            ("DataPDUInOrder", "Yes".into()),
            ("DataSequenceInOrder", "Yes".into()),
        ];
        let mut stage = LoginStage::SecurityNegotiation;
        let mut sent_operational = false;
        for _round in 0..8 {
            let (next, pairs) = match stage {
                LoginStage::SecurityNegotiation => {
                    (LoginStage::OperationalNegotiation, security.clone())
                }
                _ if !sent_operational => {
                    sent_operational = true;
                    (LoginStage::FullFeature, operational.clone())
                }
                _ => (LoginStage::FullFeature, Vec::new()),
            };
            let mut bhs = itt_bhs(Opcode::LoginRequest, 0);
            bhs.set_immediate(true);
            bhs.set_flags(login_flags::TRANSIT);
            bhs.set_login_stages(stage, next);
            bhs.set_isid(o.isid);
            bhs.set_tsih(o.tsih);
            bhs.set_cmd_sn(self.cmd_sn);
            bhs.set_exp_stat_sn(self.exp_stat_sn);
            self.send(&bhs, text_segment(&pairs))?;
            let resp = self.recv().context("waiting for the Login Response")?;
            ensure!(
                resp.bhs.opcode() == Opcode::LoginResponse,
                "expected a Login Response, got {:?}",
                resp.bhs.opcode()
            );
            ensure!(
                resp.bhs.login_status_class() == 0,
                "login failed: status class {} detail {} ({:?})",
                resp.bhs.login_status_class(),
                resp.bhs.login_status_detail(),
                String::from_utf8_lossy(&resp.data)
            );
            for (k, v) in text::pairs(&resp.data) {
                self.negotiated.insert(k.to_string(), v.to_string());
            }
            self.exp_stat_sn = resp.bhs.stat_sn().wrapping_add(1);
            self.max_cmd_sn = resp.bhs.max_cmd_sn();
            if resp.bhs.exp_cmd_sn() != 0 {
                self.cmd_sn = resp.bhs.exp_cmd_sn();
            }
            if resp.bhs.login_transit() {
                stage = resp.bhs.login_nsg();
                if stage == LoginStage::FullFeature {
                    self.tsih = resp.bhs.tsih();
                    return self.enter_full_feature();
                }
            }
        }
        bail!("login did not reach Full Feature Phase in 8 rounds")
    }

    fn enter_full_feature(&mut self) -> Result<()> {
        let get = |k: &str| self.negotiated.get(k).map(String::as_str);
        let want = |b: bool| if b { "CRC32C" } else { "None" };
        ensure!(
            get("HeaderDigest").unwrap_or("None") == want(self.options.header_digest),
            "HeaderDigest negotiated {:?}",
            get("HeaderDigest")
        );
        ensure!(
            get("DataDigest").unwrap_or("None") == want(self.options.data_digest),
            "DataDigest negotiated {:?}",
            get("DataDigest")
        );
        if let Some(v) = get("MaxRecvDataSegmentLength") {
            self.target_mrdsl = v.parse().context("target MaxRecvDataSegmentLength")?;
        }
        self.digests = Digests {
            header: self.options.header_digest,
            data: self.options.data_digest,
        };
        self.decoder.set_digests(self.digests);
        self.decoder
            .set_max_data_segment_length(self.options.max_recv_data_segment_length);
        Ok(())
    }

    /// The negotiated MaxBurstLength (the lower of both offers).
    pub fn max_burst_length(&self) -> u32 {
        self.negotiated
            .get("MaxBurstLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(262_144)
            .min(self.options.max_burst_length)
    }

    fn send(&mut self, bhs: &Bhs, data: Bytes) -> Result<()> {
        let mut frame = pdu::encode(bhs, Bytes::new(), &[data], self.digests)?;
        let bytes = frame.copy_to_bytes(frame.remaining());
        self.stream.write_all(&bytes).context("sending a PDU")?;
        Ok(())
    }

    /// The next PDU (digests and our MaxRecvDataSegmentLength checked by the decoder),
    /// with StatSN followed; NOP-In pings answered, async messages recorded.
    fn recv(&mut self) -> Result<Pdu> {
        loop {
            let pdu = self.recv_raw()?;
            let bhs = &pdu.bhs;
            if bhs.opcode() != Opcode::LoginResponse && bhs.advances_stat_sn() {
                ensure!(
                    bhs.stat_sn() == self.exp_stat_sn,
                    "StatSN {} where {} was expected ({:?})",
                    bhs.stat_sn(),
                    self.exp_stat_sn,
                    bhs.opcode()
                );
                self.exp_stat_sn = bhs.stat_sn().wrapping_add(1);
            }
            if matches!(
                bhs.opcode(),
                Opcode::ScsiResponse
                    | Opcode::DataIn
                    | Opcode::NopIn
                    | Opcode::TaskManagementResponse
                    | Opcode::LogoutResponse
                    | Opcode::AsyncMessage
                    | Opcode::Reject
            ) && (bhs.opcode() != Opcode::DataIn || bhs.data_in_status())
            {
                self.max_cmd_sn = bhs.max_cmd_sn();
            }
            match bhs.opcode() {
                Opcode::NopIn if bhs.itt() == RESERVED_TAG => {
                    if bhs.ttt() != RESERVED_TAG {
                        let mut out = itt_bhs(Opcode::NopOut, RESERVED_TAG);
                        out.set_immediate(true);
                        out.set_final_bit(true);
                        out.set_ttt(bhs.ttt());
                        out.set_lun(bhs.lun());
                        out.set_cmd_sn(self.cmd_sn);
                        out.set_exp_stat_sn(self.exp_stat_sn);
                        self.send(&out, Bytes::new())?;
                    }
                }
                Opcode::AsyncMessage => self.async_events.push(bhs.async_event()),
                Opcode::Reject => bail!("target sent a Reject (reason {:#x})", bhs.reject_reason()),
                _ => return Ok(pdu),
            }
        }
    }

    fn recv_raw(&mut self) -> Result<Pdu> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf)? {
                return Ok(p.pdu);
            }
            if Instant::now() > deadline {
                bail!("no PDU within {:?}", self.options.timeout);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("connection closed by the peer"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no PDU within {:?}", self.options.timeout)
                }
                Err(e) => return Err(e).context("reading from the connection"),
            }
        }
    }

    /// Whether the peer closed the connection (EOF or reset) within `within`.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(within));
        let mut chunk = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return true,
            }
        }
        false
    }

    fn take_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1).max(1);
        itt
    }

    /// Send a SCSI command (non-immediate, simple attribute). `write` goes as immediate
    /// data (must fit the target's MaxRecvDataSegmentLength and FirstBurstLength).
    /// Returns its ITT.
    pub fn send_command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        read_len: u32,
        write: &[u8],
    ) -> Result<u32> {
        ensure!(cdb.len() <= 16, "CDB longer than 16 bytes");
        ensure!(
            write.len() as u32 <= self.target_mrdsl,
            "write data above the target's MaxRecvDataSegmentLength"
        );
        ensure!(
            self.cmd_sn.wrapping_sub(self.max_cmd_sn).cast_signed() <= 0,
            "command window closed (CmdSN {}, MaxCmdSN {})",
            self.cmd_sn,
            self.max_cmd_sn
        );
        let itt = self.take_itt();
        let mut bhs = itt_bhs(Opcode::ScsiCommand, itt);
        bhs.set_final_bit(true);
        bhs.set_command_attr(1);
        bhs.set_lun(lun_field(lun));
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        bhs.set_cdb(&c);
        if write.is_empty() {
            bhs.set_command_read(read_len > 0);
            bhs.set_expected_data_transfer_length(read_len);
        } else {
            ensure!(read_len == 0, "bidirectional commands are not supported");
            bhs.set_command_write(true);
            bhs.set_expected_data_transfer_length(write.len() as u32);
        }
        bhs.set_cmd_sn(self.cmd_sn);
        bhs.set_exp_stat_sn(self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&bhs, Bytes::copy_from_slice(write))?;
        Ok(itt)
    }

    /// Send a SCSI command as given: an explicit 8-byte LUN field and CmdSN (which
    /// may lie outside the command window; [`Initiator::next_cmd_sn`] is the next
    /// in-window one, and sending it advances it), no data. Returns its ITT. For
    /// hostile input: nothing checks that the target will accept it.
    pub fn send_command_raw(
        &mut self,
        lun_field: u64,
        cmd_sn: u32,
        cdb: &[u8],
        read_len: u32,
    ) -> Result<u32> {
        ensure!(cdb.len() <= 16, "CDB longer than 16 bytes");
        let itt = self.take_itt();
        let mut bhs = itt_bhs(Opcode::ScsiCommand, itt);
        bhs.set_final_bit(true);
        bhs.set_command_attr(1);
        bhs.set_lun(lun_field);
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        bhs.set_cdb(&c);
        bhs.set_command_read(read_len > 0);
        bhs.set_expected_data_transfer_length(read_len);
        bhs.set_cmd_sn(cmd_sn);
        bhs.set_exp_stat_sn(self.exp_stat_sn);
        if cmd_sn == self.cmd_sn {
            // The next in-window command: later ones follow it.
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
        }
        self.send(&bhs, Bytes::new())?;
        Ok(itt)
    }

    /// Send `bytes` as they are (a truncated or malformed PDU).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending bytes")
    }

    /// Wait for the outcome of task `itt` (sent with `edtl`), checking its Data-In.
    /// PDUs for other tasks are kept in [`Initiator::stray`].
    pub fn wait_command(&mut self, itt: u32, edtl: u32) -> Result<CommandResult> {
        let mut r = CommandResult::default();
        let mut next_data_sn = 0u32;
        loop {
            let p = self.recv()?;
            if p.bhs.itt() != itt {
                self.stray.push(p.bhs);
                continue;
            }
            match p.bhs.opcode() {
                Opcode::DataIn => {
                    let b = &p.bhs;
                    ensure!(
                        b.data_sn() == next_data_sn,
                        "DataSN {} where {next_data_sn} was expected",
                        b.data_sn()
                    );
                    next_data_sn += 1;
                    ensure!(
                        b.buffer_offset() as usize == r.data.len(),
                        "Data-In offset {} where {} was expected",
                        b.buffer_offset(),
                        r.data.len()
                    );
                    ensure!(
                        r.data.len() + p.data.len() <= edtl as usize,
                        "Data-In beyond the EDTL {edtl}"
                    );
                    r.data.extend_from_slice(&p.data);
                    r.data_in_pdus += 1;
                    r.max_segment = r.max_segment.max(p.data.len());
                    if b.flags() & data_in_flags::FINAL != 0 {
                        r.final_ends.push(r.data.len() as u32);
                    }
                    if b.data_in_status() {
                        ensure!(b.final_bit(), "S without F on a Data-In");
                        r.status = b.status();
                        r.status_in_data_in = true;
                        r.residual = residual_of(b);
                        check_residual(&r, edtl)?;
                        return Ok(r);
                    }
                }
                Opcode::ScsiResponse => {
                    ensure!(
                        p.bhs.response() == 0,
                        "SCSI Response: iSCSI response {:#x}",
                        p.bhs.response()
                    );
                    r.exp_data_sn = Some(p.bhs.data_sn());
                    r.status = p.bhs.status();
                    r.sense = scsi::sense_from_response_segment(&p.data);
                    r.residual = residual_of(&p.bhs);
                    if r.status == scsi::status::GOOD {
                        check_residual(&r, edtl)?;
                    }
                    return Ok(r);
                }
                other => bail!("unexpected {other:?} for task {itt:#x}"),
            }
        }
    }

    /// Run one command to completion.
    pub fn command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        read_len: u32,
        write: &[u8],
    ) -> Result<CommandResult> {
        let itt = self.send_command(lun, cdb, read_len, write)?;
        self.wait_command(itt, if write.is_empty() { read_len } else { 0 })
    }

    /// READ(16) of `blocks` blocks of `block_size` bytes at `lba`.
    pub fn read16(
        &mut self,
        lun: u16,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<CommandResult> {
        self.command(lun, &read16_cdb(lba, blocks), blocks * block_size, &[])
    }

    /// READ(10).
    pub fn read10(
        &mut self,
        lun: u16,
        lba: u32,
        blocks: u16,
        block_size: u32,
    ) -> Result<CommandResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = scsi::opcode::READ_10;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.command(lun, &cdb, u32::from(blocks) * block_size, &[])
    }

    pub fn test_unit_ready(&mut self, lun: u16) -> Result<CommandResult> {
        self.command(lun, &[0u8; 6], 0, &[])
    }

    /// TEST UNIT READY until GOOD (tgt answers the first command of a session with a
    /// unit attention); at most `tries` times. Returns the statuses seen.
    pub fn clear_unit_attention(&mut self, lun: u16, tries: usize) -> Result<Vec<u8>> {
        let mut seen = Vec::new();
        for _ in 0..tries {
            let r = self.test_unit_ready(lun)?;
            seen.push(r.status);
            if r.status == scsi::status::GOOD {
                return Ok(seen);
            }
        }
        bail!("TEST UNIT READY never GOOD: {seen:?}")
    }

    /// READ CAPACITY(16): (last LBA + 1, block size).
    pub fn read_capacity16(&mut self, lun: u16) -> Result<(u64, u32)> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let r = self.command(lun, &cdb, 32, &[])?;
        ensure!(r.status == 0, "READ CAPACITY(16) status {:#x}", r.status);
        ensure!(r.data.len() >= 12, "short READ CAPACITY(16) data");
        let last = u64::from_be_bytes(r.data[0..8].try_into()?);
        let bs = u32::from_be_bytes(r.data[8..12].try_into()?);
        Ok((last + 1, bs))
    }

    /// Send ABORT TASK (immediate) for `referenced` (sent with `ref_cmd_sn`); returns
    /// the TMF's ITT.
    pub fn send_abort_task(&mut self, lun: u16, referenced: u32, ref_cmd_sn: u32) -> Result<u32> {
        let itt = self.take_itt();
        let mut bhs = itt_bhs(Opcode::TaskManagementRequest, itt);
        bhs.set_immediate(true);
        bhs.set_final_bit(true);
        bhs.set_tmf_function(TmfFunction::AbortTask);
        bhs.set_lun(lun_field(lun));
        bhs.set_referenced_task_tag(referenced);
        bhs.set_ref_cmd_sn(ref_cmd_sn);
        bhs.set_cmd_sn(self.cmd_sn);
        bhs.set_exp_stat_sn(self.exp_stat_sn);
        self.send(&bhs, Bytes::new())?;
        Ok(itt)
    }

    /// Send a READ and an ABORT TASK for it in one write (one TCP segment as far as the
    /// stack allows), so the abort reaches the other side before the READ can have
    /// been answered. Returns (READ ITT, TMF ITT).
    pub fn send_read_and_abort(
        &mut self,
        lun: u16,
        cdb: &[u8; 16],
        read_len: u32,
    ) -> Result<(u32, u32)> {
        let cmd_sn = self.cmd_sn;
        let itt = self.take_itt();
        let mut cmd = itt_bhs(Opcode::ScsiCommand, itt);
        cmd.set_final_bit(true);
        cmd.set_command_attr(1);
        cmd.set_lun(lun_field(lun));
        cmd.set_cdb(cdb);
        cmd.set_command_read(true);
        cmd.set_expected_data_transfer_length(read_len);
        cmd.set_cmd_sn(cmd_sn);
        cmd.set_exp_stat_sn(self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let tmf_itt = self.take_itt();
        let mut tmf = itt_bhs(Opcode::TaskManagementRequest, tmf_itt);
        tmf.set_immediate(true);
        tmf.set_final_bit(true);
        tmf.set_tmf_function(TmfFunction::AbortTask);
        tmf.set_lun(lun_field(lun));
        tmf.set_referenced_task_tag(itt);
        tmf.set_ref_cmd_sn(cmd_sn);
        tmf.set_cmd_sn(self.cmd_sn);
        tmf.set_exp_stat_sn(self.exp_stat_sn);
        let mut wire = Vec::new();
        for bhs in [cmd, tmf] {
            let mut frame = pdu::encode(&bhs, Bytes::new(), &[], self.digests)?;
            wire.extend_from_slice(&frame.copy_to_bytes(frame.remaining()));
        }
        self.stream
            .write_all(&wire)
            .context("sending READ + ABORT TASK")?;
        Ok((itt, tmf_itt))
    }

    /// The CmdSN the next command will carry.
    pub fn next_cmd_sn(&self) -> u32 {
        self.cmd_sn
    }

    /// Receive until the TMF response for `itt`; everything else is returned alongside
    /// (in order), so the caller can see what arrived for the aborted task.
    pub fn wait_tmf(&mut self, itt: u32) -> Result<(TmfResult, Vec<Pdu>)> {
        let mut before = Vec::new();
        loop {
            let p = self.recv()?;
            if p.bhs.opcode() == Opcode::TaskManagementResponse && p.bhs.itt() == itt {
                return Ok((
                    TmfResult {
                        response: p.bhs.response(),
                    },
                    before,
                ));
            }
            before.push(p);
        }
    }

    /// NOP-Out ping with `payload` (echoed back); returns the PDUs that arrived before
    /// the NOP-In.
    pub fn ping(&mut self, payload: &[u8]) -> Result<Vec<Pdu>> {
        let itt = self.take_itt();
        let mut bhs = itt_bhs(Opcode::NopOut, itt);
        bhs.set_final_bit(true);
        bhs.set_ttt(RESERVED_TAG);
        bhs.set_cmd_sn(self.cmd_sn);
        bhs.set_exp_stat_sn(self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&bhs, Bytes::copy_from_slice(payload))?;
        let mut before = Vec::new();
        loop {
            let p = self.recv()?;
            if p.bhs.opcode() == Opcode::NopIn && p.bhs.itt() == itt {
                ensure!(
                    p.data.as_ref() == payload,
                    "NOP-In did not echo the ping data"
                );
                return Ok(before);
            }
            before.push(p);
        }
    }

    /// Logout (close the session) and wait for the response.
    pub fn logout(mut self) -> Result<()> {
        let itt = self.take_itt();
        let mut bhs = itt_bhs(Opcode::LogoutRequest, itt);
        bhs.set_immediate(true);
        bhs.set_final_bit(true);
        bhs.set_cmd_sn(self.cmd_sn);
        bhs.set_exp_stat_sn(self.exp_stat_sn);
        self.send(&bhs, Bytes::new())?;
        loop {
            let p = self.recv()?;
            if p.bhs.opcode() == Opcode::LogoutResponse {
                ensure!(
                    p.bhs.response() == 0,
                    "logout response {}",
                    p.bhs.response()
                );
                let _ = self.stream.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
    }

    /// Drop the TCP connection without logging out.
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Abort the connection with an RST (`SO_LINGER` 0, then close).
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a correctly sized value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(self.stream);
    }
}

/// A READ(16) CDB.
pub fn read16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = scsi::opcode::READ_16;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn residual_of(bhs: &Bhs) -> i64 {
    let count = i64::from(bhs.residual_count());
    if bhs.residual_underflow() {
        count
    } else if bhs.residual_overflow() {
        -count
    } else {
        0
    }
}

fn check_residual(r: &CommandResult, edtl: u32) -> Result<()> {
    let expected = i64::from(edtl) - i64::try_from(r.data.len())?;
    ensure!(
        r.residual == expected || (r.residual < 0 && r.data.len() as u32 == edtl),
        "residual {} but {} of {edtl} bytes arrived",
        r.residual,
        r.data.len()
    );
    Ok(())
}
