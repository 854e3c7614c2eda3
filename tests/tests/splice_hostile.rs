//! Hostile initiators against a served LUN (issue 10): what one initiator sends must
//! never make the splicer serve wrong data, to it or to anyone else, and must not
//! switch serving off for everyone. Each test runs the real tgtd, the rack appliance
//! (steering, splicer) and the project's own initiator as the hostile client, with
//! qemu-img as the well-behaved one. Run as root, after `cargo build -p nearblock`.

use std::{net::SocketAddr, time::Duration};

use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{
    content,
    initiator::{connect_in, lun_field, Initiator, LoginOptions},
    ApplianceOptions, Lab, LunSpec,
};

const IQN_A: &str = "iqn.2026-12.test.nearblock:a";
const IQN_B: &str = "iqn.2026-12.test.nearblock:b";
const MIB: usize = 1 << 20;
const LUN_MIB: usize = 16;
const BLOCK: u32 = 64 * 1024;

/// READ(10) CDB.
fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

/// WRITE(10) CDB of one block (sent without data: it only has to look like a write).
fn write10(lba: u32) -> Vec<u8> {
    let mut c = vec![0x2a, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 1, 0]);
    c
}

fn portal(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.addr4(lab.library()).into(), 3260)
}

fn login(lab: &Lab, node: &str, options: LoginOptions) -> anyhow::Result<Initiator> {
    let stream = connect_in(lab, node, portal(lab), Duration::from_secs(10))?;
    Initiator::login(stream, options)
}

/// The first `len` bytes of LUN 1 as `ini` reads them (512-byte blocks).
fn read_front(ini: &mut Initiator, len: usize) -> Vec<u8> {
    ini.clear_unit_attention(1, 3).expect("unit attention");
    let mut out = Vec::new();
    let chunk_blocks = 256u16; // 128 KiB
    while out.len() < len {
        let lba = (out.len() / 512) as u32;
        let r = ini
            .command(
                1,
                &read10(lba, chunk_blocks),
                u32::from(chunk_blocks) * 512,
                &[],
            )
            .expect("READ(10)");
        assert_eq!(r.status, 0, "READ(10) at {lba}: {:?}", r.sense);
        out.extend_from_slice(&r.data);
    }
    out.truncate(len);
    out
}

/// Start rack1 serving `iqn` LUN 1 (shadow design) from a manifest file of `data`,
/// with `splicer_keys` added to its `[splicer]` table.
fn start_serving(lab: &mut Lab, iqn: &str, name: &str, data: &[u8], splicer_keys: &str) {
    let manifest = manifest_of(name, data, BLOCK);
    let path = lab
        .write_file(
            &format!("{name}.manifest"),
            manifest_to_text(&manifest).as_bytes(),
        )
        .expect("manifest");
    let extra_config = format!(
        "\n[splicer]\ncache_bytes = {}\n{splicer_keys}\n\n[[splicer.lun]]\ntarget = {iqn:?}\nlun = 1\ndesign = \"shadow\"\nmanifest = {:?}\n",
        64 * MIB,
        path.display().to_string()
    );
    let options = ApplianceOptions {
        steer: true,
        extra_config,
    };
    lab.start_appliance("rack1", options).expect("appliance");
}

/// Export `data` read-only as `iqn` LUN 1 of target `tid`, for `allow` (None: any).
fn export(lab: &mut Lab, tid: u32, iqn: &str, data: &[u8], allow: Option<std::net::IpAddr>) {
    let backing = lab
        .write_file(&format!("{tid}.raw"), data)
        .expect("backing");
    let spec = LunSpec {
        tid,
        iqn: iqn.into(),
        lun: 1,
        backing,
        readonly: true,
        allow,
    };
    lab.add_lun(spec).expect("lun");
}

fn served_reads(lab: &Lab) -> u64 {
    let s = lab.status("rack1").expect("status").splicer;
    s.reads_served_shadow + s.reads_served_local
}

/// `TargetName=A`, `TargetName=B` in one login. tgt reads the first one: the session
/// is A's, under A's ACL. The splicer used to take the last one and serve B's cached
/// blocks in A's session (wrong data, and B's content to an initiator B's ACL
/// refuses). Now an ambiguous login passes through untouched, so the target alone
/// decides, exactly as direct.
#[test]
fn a_repeated_target_name_passes_through() {
    let mut lab = Lab::default_topology().expect("lab");
    let a = content::image(LUN_MIB * MIB, 21, 30);
    let b = content::image(LUN_MIB * MIB, 22, 30);
    let hv1 = lab.addr4("hv1");
    let hv2 = lab.addr4("hv2");
    export(&mut lab, 1, IQN_A, &a, Some(hv1.into()));
    export(&mut lab, 2, IQN_B, &b, Some(hv2.into()));
    let ini_name = "iqn.2026-12.test.initiator:hostile";
    let both = |first: &str, second: &str| {
        let mut o = LoginOptions::new(ini_name, first);
        o.extra_first_text = vec![("TargetName".into(), second.into())];
        o
    };

    // Direct, before any appliance: what the target itself does.
    let mut direct = login(&lab, "hv1", both(IQN_A, IQN_B)).expect("direct login A,B");
    assert_eq!(read_front(&mut direct, MIB), a[..MIB], "direct A,B reads A");
    drop(direct);
    assert!(
        login(&lab, "hv1", both(IQN_B, IQN_A)).is_err(),
        "direct B,A: B's ACL refuses hv1"
    );

    // rack1 serves B; hv2 (allowed on B) warms the cache with a copy.
    start_serving(&mut lab, IQN_B, "b", &b, "");
    let url_b = lab.lun_url(IQN_B, 1);
    assert_eq!(lab.qemu_copy("hv2", &url_b, "b-cold", "rack1"), b);
    assert_eq!(lab.qemu_copy("hv2", &url_b, "b-warm", "rack1"), b);
    let warm = served_reads(&lab);
    assert!(warm > 0, "hv2's warm copy of B was served");

    let mut hostile = login(&lab, "hv1", both(IQN_A, IQN_B)).expect("login A,B through rack1");
    let got = read_front(&mut hostile, MIB);
    assert!(got == a[..MIB], "A,B through rack1 must read A's bytes");
    drop(hostile);
    assert!(
        login(&lab, "hv1", both(IQN_B, IQN_A)).is_err(),
        "B,A through rack1: B's ACL still refuses hv1"
    );
    let status = lab.status("rack1").expect("status");
    assert_eq!(
        served_reads(&lab),
        warm,
        "nothing was served to the ambiguous sessions"
    );
    // The A,B session is counted; the B,A login never reaches Full Feature Phase
    // (the target refuses it), so there is nothing to count.
    assert_eq!(
        status.splicer.sessions_ambiguous, 1,
        "refusals counted: {}",
        status.splicer.sessions_ambiguous
    );
    // The well-behaved initiator is still served.
    assert_eq!(lab.qemu_copy("hv2", &url_b, "b-again", "rack1"), b);
    assert!(served_reads(&lab) > warm);
}

/// A lab with `data` exported as `IQN_A` LUN 1 (read-only, any initiator) and rack1
/// serving it, warmed by one qemu-img copy from hv2.
fn warm_served_lab(data: &[u8], splicer_keys: &str) -> Lab {
    let mut lab = Lab::default_topology().expect("lab");
    export(&mut lab, 1, IQN_A, data, None);
    start_serving(&mut lab, IQN_A, "a", data, splicer_keys);
    let url = lab.lun_url(IQN_A, 1);
    assert_eq!(lab.qemu_copy("hv2", &url, "warm", "rack1"), data);
    lab
}

/// 1,025 WRITEs with CmdSNs outside the command window (the target never answers
/// them) from one initiator: that session stops being served, every other
/// initiator's READs still are.
#[test]
fn out_of_window_writes_do_not_stop_serving_for_others() {
    let data = content::image(LUN_MIB * MIB, 23, 30);
    let lab = warm_served_lab(&data, "");
    let mut hostile = login(
        &lab,
        "hv1",
        LoginOptions::new("iqn.2026-12.test.initiator:writer", IQN_A),
    )
    .expect("login");
    hostile.clear_unit_attention(1, 3).expect("unit attention");
    let far = hostile.next_cmd_sn().wrapping_add(1 << 30);
    for i in 0..1025u32 {
        hostile
            .send_command_raw(lun_field(1), far.wrapping_add(i), &write10(i), 0)
            .expect("send WRITE");
    }
    // An in-window READ after them: answered (by the target: this session no
    // longer has the LUN served) and right.
    let itt = hostile
        .send_command_raw(lun_field(1), hostile.next_cmd_sn(), &read10(0, 128), 65536)
        .expect("send READ");
    let r = hostile.wait_command(itt, 65536).expect("READ");
    assert_eq!(r.status, 0);
    assert!(r.data == data[..65536]);

    let before = served_reads(&lab);
    let url = lab.lun_url(IQN_A, 1);
    assert_eq!(lab.qemu_copy("hv2", &url, "after", "rack1"), data);
    let status = lab.status("rack1").expect("status");
    assert!(
        served_reads(&lab) > before,
        "hv2's reads are still served (LUN: {:?})",
        status.splicer.luns
    );
    assert!(status.splicer.sessions_tainted >= 1);
    drop(hostile);
}

/// LUN fields that are not the canonical single-level encoding of a served LUN
/// (flat space below 256 aliases LUN 1's peripheral form) are passed through, never
/// served: the target alone decides which LUN they mean.
#[test]
fn non_canonical_lun_encodings_pass_through() {
    let data = content::image(LUN_MIB * MIB, 24, 30);
    let lab = warm_served_lab(&data, "");
    let mut ini = login(
        &lab,
        "hv1",
        LoginOptions::new("iqn.2026-12.test.initiator:alias", IQN_A),
    )
    .expect("login");
    ini.clear_unit_attention(1, 3).expect("unit attention");
    let before = served_reads(&lab);
    for field in [0x4001u64 << 48, 0x0101u64 << 48] {
        let itt = ini
            .send_command_raw(field, ini.next_cmd_sn(), &read10(0, 128), 65536)
            .expect("send READ");
        let r = ini.wait_command(itt, 65536).expect("READ");
        // Whatever the target makes of it (data or an error), it came from the target.
        if r.status == 0 {
            assert!(r.data == data[..65536] || r.data.iter().all(|&x| x == 0));
        }
    }
    assert_eq!(served_reads(&lab), before, "aliases were not served");
    // The canonical field of the same LUN is served.
    let r = ini.read10(1, 0, 128, 512).expect("READ");
    assert_eq!(r.status, 0);
    assert!(r.data == data[..65536]);
    assert!(served_reads(&lab) > before);
}

/// A 48-byte BHS: `opcode` (with the I bit for requests that are immediate),
/// flags, TotalAHSLength, DataSegmentLength; the rest zero.
fn raw_bhs(opcode: u8, flags: u8, total_ahs_words: u8, data_segment_length: u32) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    b[4] = total_ahs_words;
    b[5..8].copy_from_slice(&data_segment_length.to_be_bytes()[1..]);
    b
}

/// Open a connection from hv1 to the portal (steered through rack1), send
/// `bytes`, and report whether the connection was closed within `within`.
fn send_raw(lab: &Lab, bytes: &[u8], within: Duration) -> bool {
    use std::io::{Read, Write};
    let mut s = connect_in(lab, "hv1", portal(lab), Duration::from_secs(10)).expect("connect");
    // A peer that closes early may reset the rest of the write: that is fine.
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(within)).expect("timeout");
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

/// Hostile PDUs through the rack appliance (standing part of the tests): after
/// each, the daemon is alive, its counters name what it refused, and a clean
/// qemu-img copy is bit-identical and served.
#[test]
fn hostile_pdus_leave_the_daemon_serving() {
    let data = content::image(LUN_MIB * MIB, 25, 30);
    // Half logins are closed after 2 s here (30 s by default).
    let lab = warm_served_lab(&data, "login_timeout_secs = 2");
    let url = lab.lun_url(IQN_A, 1);
    let before = lab.status("rack1").expect("status").splicer;

    let login_text = format!("InitiatorName=iqn.2026-12.test:h\0TargetName={IQN_A}\0");
    let mut login = raw_bhs(0x43, 0x87, 0, login_text.len() as u32);
    login.extend_from_slice(login_text.as_bytes());
    login.resize(login.len().div_ceil(4) * 4, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated BHS", raw_bhs(0x43, 0x87, 0, 0)[..20].to_vec()),
        // 16 MiB - 1 declared before login: over the receive limit.
        ("huge DataSegmentLength", raw_bhs(0x43, 0x87, 0, 0xff_ffff)),
        ("maximal AHS", {
            let mut b = raw_bhs(0x43, 0x87, 255, 0);
            b.extend(std::iter::repeat_n(0xa5u8, 255 * 4));
            b
        }),
        ("garbage login keys", {
            let text = b"\xff\xfe\x00===\x00TargetName\x00";
            let mut b = raw_bhs(0x43, 0x87, 0, text.len() as u32);
            b.extend_from_slice(text);
            b.resize(b.len().div_ceil(4) * 4, 0);
            b
        }),
        ("a command before login", {
            let mut b = raw_bhs(0x01, 0xc0, 0, 0);
            b[32..42].copy_from_slice(&read10(0, 8));
            b
        }),
        // Half a login, then nothing: closed by the login timeout (2 s here).
        ("slow-loris login", login[..30].to_vec()),
    ];
    for (name, bytes) in &cases {
        let closed = send_raw(&lab, bytes, Duration::from_secs(8));
        eprintln!("{name}: closed {closed}");
        assert!(closed, "{name}: the connection was not closed");
        assert!(lab.status("rack1").is_ok(), "{name}: the daemon died");
    }

    // After a good login: a NOP flood, a READ past the end, a wrong header digest.
    // tgt offers no digests unless told to.
    lab.set_target_param(1, "HeaderDigest", "CRC32C,None")
        .expect("tgt digest setting");
    let mut o = LoginOptions::new("iqn.2026-12.test.initiator:flood", IQN_A);
    o.header_digest = true;
    let mut ini = login_to(&lab, o);
    ini.clear_unit_attention(1, 3).expect("unit attention");
    let (blocks, block_length) = ini.read_capacity16(1).expect("READ CAPACITY(16)");
    for i in 0..2000u32 {
        ini.ping(&i.to_be_bytes()).expect("NOP-Out answered");
    }
    let past = ini
        .read16(1, blocks, 8, block_length)
        .expect("READ past the end");
    assert_eq!(
        past.status, 2,
        "READ past the end: CHECK CONDITION from the target"
    );
    let mut nop = nearblock::splice::pdu::Bhs::new(nearblock::splice::pdu::Opcode::NopOut);
    nop.set_immediate(true);
    nop.set_final_bit(true);
    nop.set_itt(0xffff_ffff);
    nop.set_ttt(0xffff_ffff);
    let mut frame = nearblock::splice::pdu::Pdu::header_only(nop)
        .encode(nearblock::splice::pdu::Digests {
            header: true,
            data: false,
        })
        .expect("encode")
        .to_bytes()
        .to_vec();
    frame[50] ^= 0xff;
    ini.send_bytes(&frame).expect("send");
    assert!(
        ini.closed_within(Duration::from_secs(8)),
        "a wrong header digest closes the connection"
    );
    // RST right after login.
    let ini = login_to(
        &lab,
        LoginOptions::new("iqn.2026-12.test.initiator:rst", IQN_A),
    );
    ini.reset();

    let after = lab.status("rack1").expect("the daemon is alive").splicer;
    eprintln!("refusals: {after:?}");
    assert!(
        after.protocol_errors >= before.protocol_errors + 3,
        "undecodable PDUs, the wrong digest and the slow login are counted: {} → {}",
        before.protocol_errors,
        after.protocol_errors
    );
    let served = served_reads(&lab);
    assert_eq!(lab.qemu_copy("hv2", &url, "after", "rack1"), data);
    assert!(
        served_reads(&lab) > served,
        "still served after the hostile input"
    );
}

fn login_to(lab: &Lab, options: LoginOptions) -> Initiator {
    login(lab, "hv1", options).expect("login")
}
