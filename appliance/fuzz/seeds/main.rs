//! Writes the seed corpora: real PDUs and sessions, peer messages, manifests,
//! changes and configuration files, made with nearblock's own encoders (and, for
//! the configs, the examples in docs/operations.md), in the input formats of
//! `nearblock_fuzz`'s harnesses.
//!
//! `seeds [DIR]` (default `corpus`) writes `DIR/<target>/seed-<name>`. Run by
//! `cargo xtask fuzz --seeds`; the corpora are then minimized and checked in.

use std::{path::Path, sync::Arc};

// `cargo fuzz build` builds this binary too, with the coverage instrumentation:
// libFuzzer's runtime (linked through libfuzzer-sys) provides the hooks it calls.
extern crate libfuzzer_sys;

use bytes::Bytes;
use nearblock::config::Config;
use nearblock::index::{BlockHash, Change, Location, Manifest};
use nearblock::peer::config::{AgentConfig, IndexerConfig};
use nearblock::hypervisor::{VmAction, VmState};
use nearblock::peer::build_order::{
    BuildOrder, BuildReport, BuildSource, BuildState, SourceFailure, SourceRun, SourceTally,
};
use nearblock::peer::proto::{
    BlockReply, Holder, HostReport, HostResources, ManifestPiece, Msg, VmReport, HEADER_LEN,
};
use nearblock::plan::place::HostMetrics;
use nearblock::splice::pdu::{Bhs, Digests, Opcode, Pdu};
use nearblock_fuzz::{connection as conn, input::put_chunks, pdu_stream, peer};

const NONE: Digests = Digests::NONE;
const BOTH: Digests = Digests {
    header: true,
    data: true,
};
const HEADER_ONLY: Digests = Digests {
    header: true,
    data: false,
};
const LUN1: u64 = 0x0001_0000_0000_0000;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    for (name, bytes) in pdu_decoder_seeds() {
        write(dir, "pdu_decoder", name, &bytes);
    }
    for (name, bytes) in connection_seeds() {
        let reached = conn::run_and_report(&bytes);
        assert!(
            reached.full_feature && (name == "discovery" || reached.fetches >= 2),
            "connection seed {name} stops short: {reached:?}"
        );
        write(dir, "connection", name, &bytes);
    }
    for (name, bytes) in peer_seeds() {
        write(dir, "peer_messages", name, &bytes);
    }
    for (name, text) in config_seeds() {
        check_config_seed(&name, &text);
        write(dir, "config", &name, text.as_bytes());
    }
    for (name, bytes) in http_seeds() {
        nearblock_fuzz::http::run(&bytes);
        write(dir, "http_messages", name, &bytes);
    }
}

/// Requests (first byte even) and responses (odd) as curl, wget, qemu-img and
/// nginx send them, and the ambiguous kinds the front end passes through.
fn http_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let requests: [(&str, &str); 5] = [
        ("curl-get", "GET /images/b.raw HTTP/1.1\r\nHost: 10.0.0.2\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"),
        ("qemu-range", "GET /images/b.raw HTTP/1.1\r\nHost: 10.0.0.2\r\nAccept: */*\r\nRange: bytes=262144-524287\r\n\r\n"),
        ("wget-head", "HEAD /images/b.raw HTTP/1.1\r\nHost: 10.0.0.2\r\nConnection: Keep-Alive\r\n\r\n"),
        ("smuggle", "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("suffix", "GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=-100\r\n\r\nGET /b HTTP/1.1\r\n"),
    ];
    let responses: [(&str, &str); 3] = [
        ("nginx-206", "HTTP/1.1 206 Partial Content\r\nServer: nginx/1.22.1\r\nContent-Length: 11\r\nLast-Modified: Mon, 07 Dec 2026 14:45:41 GMT\r\nConnection: keep-alive\r\nETag: \"6b16c695-186a0\"\r\nContent-Range: bytes 10-20/100000\r\n\r\n"),
        ("nginx-416", "HTTP/1.1 416 Requested Range Not Satisfiable\r\nContent-Length: 197\r\nContent-Range: bytes */100000\r\n\r\n"),
        ("chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"a\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ];
    let mut out = Vec::new();
    for (name, text) in requests {
        out.push((name, [&[0u8][..], text.as_bytes()].concat()));
    }
    for (name, text) in responses {
        out.push((name, [&[1u8][..], text.as_bytes()].concat()));
    }
    out
}

/// A config seed must be accepted by its parser, or it teaches the fuzzer only the
/// first error path.
fn check_config_seed(name: &str, text: &str) {
    let parsed = if name.ends_with("agent") {
        AgentConfig::parse(text).map(drop)
    } else if name.ends_with("indexer") {
        IndexerConfig::parse(text).map(drop)
    } else {
        Config::parse(text).map(drop)
    };
    match parsed {
        Ok(()) => {}
        // The agent's and indexer's seeds carry no key_file (the target does not
        // let those parsers read files): every other key must pass validation,
        // which runs before the key is loaded.
        Err(e) if reads_key_files(name) && is_only_the_key_missing(&e.to_string()) => {}
        Err(e) => panic!("config seed {name} does not parse: {e}"),
    }
}

fn reads_key_files(seed: &str) -> bool {
    seed.ends_with("agent") || seed.ends_with("indexer")
}

fn is_only_the_key_missing(error: &str) -> bool {
    error.contains("key_file") && error.contains("missing")
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

// ---- PDUs ----

fn pdu(bhs: Bhs, data: &[u8]) -> Pdu {
    Pdu {
        bhs,
        ahs: Bytes::new(),
        data: Bytes::copy_from_slice(data),
    }
}

fn wire(pdu: &Pdu, digests: Digests) -> Vec<u8> {
    pdu.encode(digests)
        .expect("seed PDUs encode")
        .to_bytes()
        .to_vec()
}

fn login_request(text: &str, cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::LoginRequest);
    bhs.set_immediate(true);
    // T=1, CSG=1 (operational), NSG=3 (full feature).
    bhs.set_flags(0x87);
    bhs.set_isid([0x80, 0, 0, 0x12, 0x34, 0x56]);
    bhs.set_itt(0);
    bhs.set_cmd_sn(cmd_sn);
    pdu(bhs, text.as_bytes())
}

fn login_response(text: &str, stat_sn: u32, exp_cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::LoginResponse);
    bhs.set_flags(0x87);
    bhs.set_isid([0x80, 0, 0, 0x12, 0x34, 0x56]);
    bhs.set_tsih(7);
    bhs.set_stat_sn(stat_sn);
    bhs.set_exp_cmd_sn(exp_cmd_sn);
    bhs.set_max_cmd_sn(exp_cmd_sn + 127);
    pdu(bhs, text.as_bytes())
}

fn command(itt: u32, cmd_sn: u32, cdb: [u8; 16], read: bool, edtl: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::ScsiCommand);
    bhs.set_final_bit(true);
    bhs.set_command_read(read);
    bhs.set_command_attr(1);
    bhs.set_lun(LUN1);
    bhs.set_itt(itt);
    bhs.set_cmd_sn(cmd_sn);
    bhs.set_exp_stat_sn(1);
    bhs.set_expected_data_transfer_length(edtl);
    bhs.set_cdb(&cdb);
    pdu(bhs, &[])
}

fn read10(itt: u32, cmd_sn: u32, lba: u32, blocks: u16, block_size: u32) -> Pdu {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    command(itt, cmd_sn, cdb, true, u32::from(blocks) * block_size)
}

fn response(itt: u32, stat_sn: u32, exp_cmd_sn: u32, status: u8, sense: &[u8]) -> Pdu {
    let mut bhs = Bhs::new(Opcode::ScsiResponse);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_status(status);
    bhs.set_stat_sn(stat_sn);
    bhs.set_exp_cmd_sn(exp_cmd_sn);
    bhs.set_max_cmd_sn(exp_cmd_sn + 127);
    let mut data = Vec::new();
    if !sense.is_empty() {
        data.extend_from_slice(&(sense.len() as u16).to_be_bytes());
        data.extend_from_slice(sense);
    }
    pdu(bhs, &data)
}

fn data_in(itt: u32, stat_sn: u32, exp_cmd_sn: u32, offset: u32, data: &[u8], last: bool) -> Pdu {
    let mut bhs = Bhs::new(Opcode::DataIn);
    bhs.set_itt(itt);
    bhs.set_buffer_offset(offset);
    bhs.set_exp_cmd_sn(exp_cmd_sn);
    bhs.set_max_cmd_sn(exp_cmd_sn + 127);
    if last {
        // F and S: the final Data-In carries GOOD status.
        bhs.set_flags(0x81);
        bhs.set_stat_sn(stat_sn);
    }
    pdu(bhs, data)
}

fn nop_out(itt: u32, cmd_sn: u32, data: &[u8]) -> Pdu {
    let mut bhs = Bhs::new(Opcode::NopOut);
    bhs.set_immediate(true);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_ttt(0xffff_ffff);
    bhs.set_cmd_sn(cmd_sn);
    pdu(bhs, data)
}

fn text_request(text: &str, itt: u32, cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::TextRequest);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_ttt(0xffff_ffff);
    bhs.set_cmd_sn(cmd_sn);
    pdu(bhs, text.as_bytes())
}

fn text_response(text: &str, itt: u32, stat_sn: u32, exp_cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::TextResponse);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_ttt(0xffff_ffff);
    bhs.set_stat_sn(stat_sn);
    bhs.set_exp_cmd_sn(exp_cmd_sn);
    bhs.set_max_cmd_sn(exp_cmd_sn + 127);
    pdu(bhs, text.as_bytes())
}

fn logout(itt: u32, cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::LogoutRequest);
    bhs.set_immediate(true);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_cmd_sn(cmd_sn);
    pdu(bhs, &[])
}

fn logout_response(itt: u32, stat_sn: u32, exp_cmd_sn: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::LogoutResponse);
    bhs.set_final_bit(true);
    bhs.set_itt(itt);
    bhs.set_stat_sn(stat_sn);
    bhs.set_exp_cmd_sn(exp_cmd_sn);
    bhs.set_max_cmd_sn(exp_cmd_sn + 127);
    pdu(bhs, &[])
}

fn abort_task(itt: u32, cmd_sn: u32, referenced: u32) -> Pdu {
    let mut bhs = Bhs::new(Opcode::TaskManagementRequest);
    bhs.set_immediate(true);
    // F and function 1 (ABORT TASK).
    bhs.set_flags(0x81);
    bhs.set_lun(LUN1);
    bhs.set_itt(itt);
    bhs.set_referenced_task_tag(referenced);
    bhs.set_cmd_sn(cmd_sn);
    bhs.set_ref_cmd_sn(cmd_sn - 1);
    pdu(bhs, &[])
}

const INITIATOR_LOGIN: &str = "InitiatorName=iqn.2026-01.org.example:hv1\0\
    TargetName=iqn.2026-01.org.example:library\0SessionType=Normal\0\
    HeaderDigest=CRC32C,None\0DataDigest=CRC32C,None\0ErrorRecoveryLevel=2\0\
    MaxConnections=4\0InitialR2T=No\0ImmediateData=Yes\0\
    MaxRecvDataSegmentLength=262144\0MaxBurstLength=16776192\0\
    FirstBurstLength=262144\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0";
const TARGET_LOGIN_DIGESTS: &str = "HeaderDigest=CRC32C\0DataDigest=CRC32C\0\
    ErrorRecoveryLevel=0\0MaxConnections=1\0InitialR2T=No\0ImmediateData=Yes\0\
    MaxRecvDataSegmentLength=8192\0MaxBurstLength=262144\0FirstBurstLength=65536\0\
    DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0TargetPortalGroupTag=1\0";
const TARGET_LOGIN_PLAIN: &str = "HeaderDigest=None\0DataDigest=None\0\
    ErrorRecoveryLevel=0\0MaxConnections=1\0MaxRecvDataSegmentLength=8192\0\
    DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0TargetPortalGroupTag=1\0";

fn stream_step(out: &mut Vec<u8>, digests: Digests, bytes: &[u8]) {
    let mut op = 0;
    if digests.header {
        op |= pdu_stream::OP_HEADER_DIGEST;
    }
    if digests.data {
        op |= pdu_stream::OP_DATA_DIGEST;
    }
    put_chunks(out, op, bytes);
}

fn pdu_decoder_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let mut seeds = Vec::new();

    // A login exchange without digests, then commands with both digests (the switch
    // at Full Feature Phase).
    let mut s = Vec::new();
    stream_step(
        &mut s,
        NONE,
        &wire(&login_request(INITIATOR_LOGIN, 1), NONE),
    );
    stream_step(
        &mut s,
        NONE,
        &wire(&login_response(TARGET_LOGIN_DIGESTS, 0, 1), NONE),
    );
    stream_step(&mut s, BOTH, &wire(&read10(1, 1, 0, 8, 512), BOTH));
    stream_step(
        &mut s,
        BOTH,
        &wire(&data_in(1, 1, 2, 0, &block, true), BOTH),
    );
    seeds.push(("login-then-digests", s));

    // Data-In split over several reads, header digest only; a NOP-Out whose data
    // needs padding; a CHECK CONDITION response with sense data.
    let mut s = Vec::new();
    let di = wire(&data_in(2, 5, 9, 4096, &block[..1000], false), HEADER_ONLY);
    for piece in di.chunks(300) {
        stream_step(&mut s, HEADER_ONLY, piece);
    }
    stream_step(
        &mut s,
        HEADER_ONLY,
        &wire(&nop_out(3, 9, b"ping!"), HEADER_ONLY),
    );
    let sense = [
        0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0, 0, 0, 0, 0,
    ];
    stream_step(
        &mut s,
        HEADER_ONLY,
        &wire(&response(2, 6, 10, 2, &sense), HEADER_ONLY),
    );
    seeds.push(("split-data-in-header-digest", s));

    // A data segment limit, and a command with an AHS (extended CDB).
    let mut s = vec![pdu_stream::OP_SET_LIMIT];
    s.extend_from_slice(&32u16.to_le_bytes()); // 32 × 256 = 8192 bytes
    s.extend_from_slice(&0u16.to_le_bytes());
    let mut ahs_cmd = command(4, 10, [0x7f; 16], false, 0);
    ahs_cmd.ahs = Bytes::from_static(&[
        0, 12, 1, 0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0, 0, 0, 0,
    ]);
    stream_step(&mut s, BOTH, &wire(&ahs_cmd, BOTH));
    stream_step(
        &mut s,
        BOTH,
        &wire(
            &data_in(5, 7, 11, 0, &block[..9000.min(block.len())], true),
            BOTH,
        ),
    );
    seeds.push(("limit-and-ahs", s));

    // A discovery exchange.
    let mut s = Vec::new();
    stream_step(
        &mut s,
        NONE,
        &wire(&text_request("SendTargets=All\0", 1, 2), NONE),
    );
    stream_step(
        &mut s,
        NONE,
        &wire(
            &text_response(
                "TargetName=iqn.2026-01.org.example:library\0TargetAddress=10.0.0.1:3260,1\0",
                1,
                1,
                3,
            ),
            NONE,
        ),
    );
    seeds.push(("discovery-text", s));
    seeds
}

// ---- Sessions ----

struct Session {
    input: Vec<u8>,
    digests: Digests,
}

impl Session {
    fn new() -> Session {
        Session {
            input: Vec::new(),
            digests: NONE,
        }
    }

    fn initiator(&mut self, pdu: &Pdu, ops: u8) {
        let bytes = wire(pdu, self.digests);
        put_chunks(&mut self.input, conn::OP_INITIATOR | ops, &bytes);
    }

    fn target(&mut self, pdu: &Pdu) {
        let bytes = wire(pdu, self.digests);
        put_chunks(&mut self.input, conn::OP_TARGET, &bytes);
    }

    fn fetch(&mut self, ok: bool) {
        self.input.push(if ok {
            conn::OP_FETCH_READY
        } else {
            conn::OP_FETCH_FAILED
        });
    }

    /// Login with `target_text`, then one command answered (local serving needs it).
    fn logged_in(target_text: &str, digests: Digests) -> Session {
        let mut s = Session::new();
        s.initiator(&login_request(INITIATOR_LOGIN, 1), 0);
        s.target(&login_response(target_text, 0, 1));
        s.digests = digests;
        let tur = command(1, 1, [0; 16], false, 0);
        s.initiator(&tur, 0);
        s.target(&response(1, 1, 2, 0, &[]));
        s
    }
}

fn connection_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    // Digests on: a shadow READ (its empty upstream twin answered GOOD, the blocks
    // then ready), a local READ, a pass-through READ with its Data-In, NOP, logout.
    let mut s = Session::logged_in(TARGET_LOGIN_DIGESTS, BOTH);
    s.initiator(&read10(2, 2, 0, 8, 512), conn::OP_SHADOW);
    s.target(&response(2, 2, 3, 0, &[]));
    s.fetch(true);
    s.initiator(
        &read10(3, 3, 64, 16, 4096),
        conn::OP_LOCAL | conn::OP_BLOCK_4096,
    );
    s.fetch(true);
    s.initiator(&read10(4, 4, 128, 1, 512), 0);
    s.target(&data_in(4, 3, 4, 0, &[0x11; 512], true));
    s.initiator(&nop_out(5, 5, b""), 0);
    s.initiator(&logout(6, 5), 0);
    s.target(&logout_response(6, 4, 6));
    seeds.push(("digests-shadow-local-logout", s.input));

    // Digests off: a failed fetch, an abort of a local task, a text renegotiation.
    let mut s = Session::logged_in(TARGET_LOGIN_PLAIN, NONE);
    s.initiator(&read10(2, 2, 0, 8, 512), conn::OP_SHADOW);
    s.fetch(false);
    s.target(&response(2, 2, 3, 0, &[]));
    s.initiator(&read10(3, 3, 8, 8, 512), conn::OP_LOCAL);
    s.initiator(&abort_task(4, 4, 3), 0);
    s.fetch(true);
    s.initiator(&text_request("MaxRecvDataSegmentLength=65536\0", 5, 4), 0);
    s.target(&text_response("MaxRecvDataSegmentLength=16384\0", 5, 3, 5));
    seeds.push(("plain-failed-fetch-abort-text", s.input));

    // A discovery session (passed through untouched).
    let mut s = Session::new();
    s.initiator(
        &login_request(
            "InitiatorName=iqn.2026-01.org.example:hv1\0SessionType=Discovery\0",
            1,
        ),
        0,
    );
    s.target(&login_response(TARGET_LOGIN_PLAIN, 0, 1));
    s.initiator(&text_request("SendTargets=All\0", 1, 1), 0);
    s.target(&text_response(
        "TargetName=iqn.2026-01.org.example:library\0",
        1,
        1,
        2,
    ));
    seeds.push(("discovery", s.input));
    seeds
}

// ---- Peer protocol ----

fn hash(i: u8) -> BlockHash {
    BlockHash(*blake3::hash(&[i]).as_bytes())
}

fn message_seed(msg: &Msg) -> Vec<u8> {
    let body = msg.encode(1).slice(4 + HEADER_LEN..);
    Msg::decode(body.clone()).expect("a seed message decodes");
    let mut seed = vec![peer::SELECT_MESSAGE];
    seed.extend_from_slice(&body);
    seed
}

fn peer_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let manifest = Manifest {
        image: "debian-12-cloud.raw".into(),
        size: 5 * 4096 + 100,
        block_size: 4096,
        blocks: vec![
            Some(hash(1)),
            None,
            Some(hash(2)),
            Some(hash(1)),
            None,
            Some(hash(3)),
        ],
    };
    let location = Location {
        host: Arc::from("hv1"),
        image: Arc::from("debian-12-cloud.raw"),
        block_size: 4096,
        offset: 8192,
        len: 4096,
    };
    let put = Change::PutImage {
        host: "hv1".into(),
        manifest: manifest.clone(),
    };
    let patch = Change::PatchImage {
        host: "hv1".into(),
        image: "debian-12-cloud.raw".into(),
        block_size: 4096,
        size: 7 * 4096,
        blocks: vec![(1, Some(hash(9))), (6, None)],
    };
    let messages = [
        ("auth-ok", Msg::AuthOk),
        (
            "error",
            Msg::Error {
                code: 4,
                acked: 17,
                message: "gap".into(),
            },
        ),
        (
            "get-blocks",
            Msg::GetBlocks {
                hashes: vec![hash(1), hash(2)],
            },
        ),
        (
            "blocks",
            Msg::Blocks {
                items: vec![
                    BlockReply::Found(Bytes::from_static(&[0x42; 64])),
                    BlockReply::NotFound,
                    BlockReply::Skipped,
                    BlockReply::Failed("io".into()),
                ],
            },
        ),
        (
            "holders",
            Msg::Holders {
                local_only: true,
                hashes: vec![hash(3)],
            },
        ),
        (
            "holders-reply",
            Msg::HoldersReply {
                items: vec![
                    vec![Holder {
                        location,
                        addr: Some("10.0.1.11:7900".into()),
                    }],
                    vec![],
                ],
            },
        ),
        (
            "push",
            Msg::Push {
                node: "hv1".into(),
                resync: false,
                upto: 2,
                addrs: vec![("hv1".into(), "10.0.1.11:7900".into())],
                changes: vec![
                    (1, Bytes::from(put.encode())),
                    (2, Bytes::from(patch.encode())),
                ],
            },
        ),
        ("ack", Msg::Ack { seq: 2 }),
        (
            "host-metrics",
            Msg::HostMetrics {
                reports: vec![HostReport {
                    host: "hv1".into(),
                    metrics: HostMetrics {
                        cpu: Some(0.25),
                        mem: None,
                        disk: Some(0.5),
                    },
                    age_ms: 1500,
                    resources: HostResources {
                        cores: Some(16),
                        mem_bytes: Some(1 << 36),
                        mem_free_bytes: None,
                        disk_free_bytes: Some(1 << 40),
                    },
                    vms: vec![VmReport {
                        name: "web1".into(),
                        image: Some("iqn.2026-11.test:lib/1".into()),
                        size: 1 << 30,
                        state: VmState::Running,
                    }],
                }],
            },
        ),
        (
            "build",
            Msg::Build {
                order: Box::new(BuildOrder {
                    job: 7,
                    vm: "web1".into(),
                    image: "iqn.2026-11.test:lib/1".into(),
                    manifest_host: "library".into(),
                    block_size: 4096,
                    digest: [3; 32],
                    sources: vec![BuildSource {
                        node: "hv2".into(),
                        addr: "10.0.1.12:7900".into(),
                    }],
                    runs: vec![
                        SourceRun { source: 0, count: 9 },
                        SourceRun { source: u16::MAX, count: 2 },
                    ],
                    rates: vec![12_500_000],
                }),
            },
        ),
        ("build-status", Msg::BuildStatus { job: 7 }),
        (
            "import",
            Msg::Import {
                job: 7,
                vm: "web1".into(),
                image: "iqn.2026-12.example:img/1".into(),
                size: 1 << 30,
                source: "iscsi://198.18.0.1:3260/iqn.2026-12.example:img/1".into(),
            },
        ),
        (
            "prefetch-share",
            Msg::PrefetchShare {
                bytes_per_s: 12_500_000,
                counted: true,
            },
        ),
        ("prefetch-state", Msg::PrefetchState { prefetching: true }),
        (
            "track",
            Msg::Track {
                vm: "web1".into(),
                since: Some("bitmap:2".into()),
            },
        ),
        ("untrack", Msg::Untrack { vm: "web1".into() }),
        (
            "unpin",
            Msg::Unpin {
                owner: "hv1/web1".into(),
            },
        ),
        (
            "build-rates",
            Msg::BuildRates {
                job: 7,
                rates: vec![6_250_000, 0],
            },
        ),
        (
            "build-reply",
            Msg::BuildReply {
                report: Box::new(BuildReport {
                    job: 7,
                    vm: "web1".into(),
                    state: BuildState::NeedsSources,
                    blocks_total: 11,
                    blocks_done: 9,
                    bytes_written: 36_864,
                    by_source: vec![SourceTally {
                        node: "hv2".into(),
                        blocks: 9,
                        bytes: 36_864,
                        wire_bytes: 38_001,
                    }],
                    failures: vec![SourceFailure {
                        node: "hv3".into(),
                        reason: "connection refused".into(),
                        blocks_missing: 2,
                    }],
                    error: None,
                }),
            },
        ),
        (
            "vm-action",
            Msg::VmAction {
                vm: "web1".into(),
                action: VmAction::Pause,
            },
        ),
        (
            "get-manifest",
            Msg::GetManifest {
                host: "library".into(),
                image: "debian-12-cloud.raw".into(),
                block_size: 4096,
                known: [0; 32],
                offset: 0,
                max_len: 1 << 20,
            },
        ),
        (
            "manifest-reply",
            Msg::ManifestReply {
                piece: ManifestPiece::of(&manifest.encode(), [0; 32], 0, 1 << 20),
            },
        ),
        (
            "status-reply",
            Msg::StatusReply {
                json: "{\"blocks\":3}".into(),
            },
        ),
        (
            "fragment",
            Msg::Fragment {
                last: true,
                data: Bytes::from_static(b"\x10abc"),
            },
        ),
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> = messages
        .iter()
        .map(|(name, msg)| (*name, message_seed(msg)))
        .collect();

    let encoded = manifest.encode();
    let mut seed = vec![peer::SELECT_MANIFEST];
    seed.extend_from_slice(&encoded[..encoded.len() - 4]);
    seeds.push(("manifest", seed));
    let changes = [
        ("change-put", put),
        ("change-patch", patch),
        (
            "change-remove",
            Change::RemoveImage {
                host: "hv1".into(),
                image: "debian-12-cloud.raw".into(),
                block_size: 4096,
            },
        ),
        (
            "change-remove-host",
            Change::RemoveHost { host: "hv2".into() },
        ),
    ];
    for (name, change) in changes {
        let mut seed = vec![peer::SELECT_CHANGE];
        seed.extend_from_slice(&change.encode());
        seeds.push((name, seed));
    }
    seeds
}

// ---- Configuration ----

/// The TOML examples of docs/operations.md: the daemon's, and the agent's and the
/// indexer's (one block in the docs, split at their `# agent` / `# indexer` comments,
/// the shared `[peer]` table given to both), with an inline `secret` in place of
/// `secret_file` (the harness keeps texts naming a file from those parsers).
fn config_seeds() -> Vec<(String, String)> {
    let doc = include_str!("../../../docs/operations.md");
    let mut blocks = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```toml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(block);
        }
    }
    let mut seeds = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let text = block.join("\n") + "\n";
        let split = text.starts_with("# agent");
        let (Some(agent), Some(indexer), true) =
            (text.find("# agent"), text.find("# indexer"), split)
        else {
            seeds.push((format!("operations-{}", i + 1), text));
            continue;
        };
        let peer = text.find("[peer]").unwrap_or(text.len());
        // Without the lines naming files: the target keeps texts that name them
        // away from these two parsers (they would read the path it spells).
        let inline = |part: &str| {
            part.lines()
                .filter(|l| !l.starts_with("key_file") && !l.starts_with("peers_file"))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        };
        let peer_table = &text[peer..];
        seeds.push((
            "operations-agent".into(),
            inline(&text[agent..indexer]) + peer_table,
        ));
        seeds.push((
            "operations-indexer".into(),
            inline(&text[indexer..peer]) + peer_table,
        ));
    }
    seeds
}
