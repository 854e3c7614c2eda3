//! Login and text negotiation as seen from the middle (RFC 7143 §6, §11.10–11.13, §13).
//!
//! This module owns three things: editing the initiator's offers so the session is one
//! the splicer can serve in ([`edit_initiator_text`]: ErrorRecoveryLevel=0,
//! MaxConnections=1, DataPDUInOrder=Yes, DataSequenceInOrder=Yes — edited in the
//! initiator's text because editing the target's answer would leave the two sides
//! disagreeing), following the negotiation to its results per direction
//! ([`Negotiation`] → [`OperationalParams`]), and following the login's stages to the
//! moment Full Feature Phase starts ([`LoginTracker`]).

use super::datain::DataInLimits;
use super::pdu::{Bhs, Digests, LoginStage, Opcode};
use super::text;
use bytes::Bytes;
use std::collections::HashMap;

/// Which end of the connection sent something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Initiator,
    Target,
}

/// The keys forced in the initiator's text, and their forced values (fact sheet,
/// "Negotiation"): a single connection at ErrorRecoveryLevel 0 with in-order data is
/// what local serving and the per-side sequence numbers assume.
pub const FORCED_INITIATOR_KEYS: [(&str, &str); 4] = [
    ("ErrorRecoveryLevel", "0"),
    ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
];

/// Rewrite the forced keys in one initiator Login/Text data segment, leaving everything
/// else byte for byte. A key absent from the text is left absent: each forced value is
/// also the RFC default (§13.10, §13.2, §13.18, §13.19). `continues_previous` says the
/// previous PDU had the C bit, so the first entry is the tail of a split pair; an
/// unterminated last entry is the head of one. Split pairs are not edited (the negotiated
/// result then shows whether serving is allowed: [`OperationalParams::serving_allowed`]).
/// Returns `None` when nothing changed.
pub fn edit_initiator_text(data: &[u8], continues_previous: bool) -> Option<Bytes> {
    let entries: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let last = entries.len() - 1; // `split` always yields at least one entry
    let mut changed = false;
    let mut out = Vec::with_capacity(data.len() + 8);
    for (i, entry) in entries.iter().enumerate() {
        let whole_pair = !(i == 0 && continues_previous) && i != last;
        let replacement = whole_pair
            .then(|| forced_value(entry))
            .flatten()
            .filter(|(_, value)| value.as_bytes() != value_of(entry));
        match replacement {
            Some((key, value)) => {
                changed = true;
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
                out.extend_from_slice(value.as_bytes());
            }
            None => out.extend_from_slice(entry),
        }
        if i != last {
            out.push(0);
        }
    }
    changed.then(|| Bytes::from(out))
}

fn value_of(entry: &[u8]) -> &[u8] {
    entry
        .iter()
        .position(|&b| b == b'=')
        .map_or(&[][..], |at| &entry[at + 1..])
}

fn forced_value(entry: &[u8]) -> Option<(&'static str, &'static str)> {
    let at = entry.iter().position(|&b| b == b'=')?;
    let key = &entry[..at];
    FORCED_INITIATOR_KEYS
        .iter()
        .find(|(forced, _)| forced.as_bytes() == key)
        .copied()
}

/// Normal or discovery session (§13.21).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionType {
    #[default]
    Normal,
    /// SendTargets only: the splicer passes it through untouched.
    Discovery,
}

/// The operational parameters in force after login (or after a Text renegotiation),
/// with RFC 7143 §13 defaults for anything not negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each is one boolean key RFC 7143 §13 negotiates, kept under its own name"
)]
pub struct OperationalParams {
    pub session_type: SessionType,
    pub initiator_name: Option<String>,
    pub target_name: Option<String>,
    /// HeaderDigest=CRC32C (both directions; §13.1).
    pub header_digest: bool,
    /// DataDigest=CRC32C (both directions).
    pub data_digest: bool,
    /// MaxRecvDataSegmentLength the initiator declared: bounds PDUs sent *to* it
    /// (Data-In, responses). Declarative, default 8192 (§13.12).
    pub initiator_max_recv_data_segment_length: u32,
    /// MaxRecvDataSegmentLength the target declared: bounds PDUs sent *to* it.
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    /// Why the session's text could be read more than one way ([`Negotiation`]);
    /// `Some` → never served.
    pub ambiguity: Option<String>,
}

impl Default for OperationalParams {
    fn default() -> Self {
        OperationalParams {
            session_type: SessionType::Normal,
            initiator_name: None,
            target_name: None,
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            ambiguity: None,
        }
    }
}

impl OperationalParams {
    /// Digest settings of the connection in Full Feature Phase (same both ways).
    pub fn digests(&self) -> Digests {
        Digests {
            header: self.header_digest,
            data: self.data_digest,
        }
    }

    /// Limits for Data-In sent to the initiator.
    pub fn data_in_limits(&self) -> DataInLimits {
        DataInLimits {
            max_recv_data_segment_length: self.initiator_max_recv_data_segment_length,
            max_burst_length: self.max_burst_length,
        }
    }

    /// Whether the session ended up as the splicer needs to serve reads in it: a normal
    /// session, ErrorRecoveryLevel 0, one connection, in-order data. If an edit could not
    /// be applied (or a peer misbehaved) the session is passed through.
    pub fn serving_allowed(&self) -> bool {
        self.ambiguity.is_none()
            && self.session_type == SessionType::Normal
            && self.error_recovery_level == 0
            && self.max_connections == 1
            && self.data_pdu_in_order
            && self.data_sequence_in_order
    }
}

/// How a negotiated key's result is computed (§6.2.2, §13).
#[derive(Clone, Copy)]
enum Function {
    Min,
    Max,
    Or,
    And,
    /// A list of choices; the answer is the choice.
    List,
}

fn function_of(key: &str) -> Option<Function> {
    Some(match key {
        "HeaderDigest" | "DataDigest" => Function::List,
        "MaxConnections" | "MaxBurstLength" | "FirstBurstLength" | "DefaultTime2Retain"
        | "MaxOutstandingR2T" | "ErrorRecoveryLevel" => Function::Min,
        "DefaultTime2Wait" => Function::Max,
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => Function::Or,
        "ImmediateData" => Function::And,
        _ => return None,
    })
}

/// One key's negotiation: who offered what, and the answer if one came.
#[derive(Clone, Debug)]
struct Exchange {
    offered_by: Side,
    offer: String,
    answer: Option<String>,
}

/// Answers that mean "no result": the key keeps its default (§6.2).
fn is_refusal(value: &str) -> bool {
    matches!(value, "NotUnderstood" | "Irrelevant" | "Reject")
}

/// The result of a negotiated key, or `None` for "use the default".
fn result_of(function: Function, exchange: &Exchange) -> Option<String> {
    let answer = exchange.answer.as_deref().filter(|a| !is_refusal(a));
    match (function, answer) {
        // The responder may omit the answer when the offer decides the result (§6.2.2).
        (Function::Or, None) if exchange.offer == "Yes" => Some("Yes".into()),
        (Function::And, None) if exchange.offer == "No" => Some("No".into()),
        (_, None) => None,
        (Function::List, Some(answer)) => Some(answer.into()),
        (Function::Or, Some(answer)) => {
            Some(yes_no(exchange.offer == "Yes" || answer == "Yes").into())
        }
        (Function::And, Some(answer)) => {
            Some(yes_no(exchange.offer == "Yes" && answer == "Yes").into())
        }
        (Function::Min | Function::Max, Some(answer)) => {
            let answer: u32 = answer.parse().ok()?;
            // Recompute rather than trust the answer, so a responder answering out of
            // range cannot make the splicer assume more than the offerer allowed.
            let combined = match (exchange.offer.parse::<u32>(), function) {
                (Ok(offer), Function::Min) => offer.min(answer),
                (Ok(offer), _) => offer.max(answer),
                (Err(_), _) => answer,
            };
            Some(combined.to_string())
        }
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "Yes"
    } else {
        "No"
    }
}

/// RFC 7143 §6 (and §11.12.5): a Login or Text PDU's data segment is at most 8192
/// bytes while the login negotiates; a larger one is not text the splicer reads.
pub const MAX_TEXT_SEGMENT: usize = 8192;

/// The most continued text (C bit) held for one side before it completes: the RFC
/// sets no limit, the splicer needs one (no real key set comes near it).
pub const MAX_CONTINUED_TEXT: usize = 64 * 1024;

/// The text exchanged so far on a connection, by key, following continuation (C bit)
/// and offers/answers per side. Reused for Text renegotiation in Full Feature Phase.
///
/// Text that a target might read differently from the splicer makes the session
/// *ambiguous*, and an ambiguous session is never served (it passes through, so the
/// target alone decides what it means): a malformed entry, a key repeated within one
/// text, a declarative key declared twice during the login, an identity key
/// (`TargetName`, `InitiatorName`, `SessionType`) anywhere but the initiator's first
/// text, or text over the size caps. tgt, for one, reads the identity keys from the
/// first Login PDU only and takes the first of repeated keys; the splicer used to take
/// the last, so `TargetName=A`, `TargetName=B` logged in to A while B's LUN was served.
#[derive(Clone, Debug, Default)]
pub struct Negotiation {
    exchanges: HashMap<String, Exchange>,
    /// Declarative keys (MaxRecvDataSegmentLength, names, SessionType) by side.
    declared: HashMap<(Side, String), String>,
    /// Text of PDUs with C set, waiting for the PDU that completes it.
    partial: HashMap<Side, Vec<u8>>,
    /// Completed texts per side so far.
    texts: HashMap<Side, u32>,
    /// Set once the login has ended: Text renegotiation may redeclare
    /// MaxRecvDataSegmentLength (§13.12), the login may not redeclare anything.
    full_feature: bool,
    /// The first reason the text is ambiguous.
    ambiguity: Option<String>,
}

/// Keys that name the session: read from the initiator's first text only.
fn is_identity(key: &str) -> bool {
    matches!(key, "TargetName" | "InitiatorName" | "SessionType")
}

fn is_declarative(key: &str) -> bool {
    matches!(
        key,
        "MaxRecvDataSegmentLength"
            | "InitiatorName"
            | "TargetName"
            | "SessionType"
            | "TargetAlias"
            | "InitiatorAlias"
            | "TargetPortalGroupTag"
    )
}

impl Negotiation {
    /// Observe the data segment of a Login or Text PDU sent by `side`. Text continued
    /// with the C bit is held until the PDU that completes it.
    pub fn observe(&mut self, side: Side, bhs: &Bhs, data: &[u8]) {
        if data.len() > MAX_TEXT_SEGMENT {
            self.partial.remove(&side);
            self.set_ambiguous(format!(
                "{side:?} text segment of {} bytes (over {MAX_TEXT_SEGMENT})",
                data.len()
            ));
            return;
        }
        let buffered = self.partial.entry(side).or_default();
        if buffered.len() + data.len() > MAX_CONTINUED_TEXT {
            self.partial.remove(&side);
            self.set_ambiguous(format!(
                "{side:?} continued text over {MAX_CONTINUED_TEXT} bytes"
            ));
            return;
        }
        buffered.extend_from_slice(data);
        if bhs.text_continue() {
            return;
        }
        let text = std::mem::take(buffered);
        let count = self.texts.entry(side).or_default();
        let first_text = *count == 0;
        *count += 1;
        let pairs = match text::strict_pairs(&text) {
            Ok(pairs) => pairs,
            Err(e) => {
                self.set_ambiguous(format!("malformed {side:?} text: {e}"));
                return;
            }
        };
        // A target's SendTargets answer (Text in Full Feature Phase) lists
        // TargetName and TargetAddress once per target: only its login text is held
        // to the rules, and it never names the session.
        let strict = side == Side::Initiator || !self.full_feature;
        let mut keys = std::collections::HashSet::new();
        for (key, value) in pairs {
            if strict && !keys.insert(key) {
                self.set_ambiguous(format!("{side:?} repeated {key} in one text"));
                continue;
            }
            if is_identity(key) {
                if side == Side::Target {
                    continue;
                }
                if self.full_feature || !first_text {
                    self.set_ambiguous(format!("{key} outside the initiator's first login text"));
                    continue;
                }
            }
            if is_declarative(key)
                && !self.full_feature
                && self.declared.contains_key(&(side, key.to_string()))
            {
                self.set_ambiguous(format!("{side:?} declared {key} twice in the login"));
                continue;
            }
            self.record(side, key, value);
        }
    }

    fn set_ambiguous(&mut self, why: String) {
        self.ambiguity.get_or_insert(why);
    }

    /// The login has ended: what follows is Text negotiation in Full Feature Phase.
    pub fn enter_full_feature(&mut self) {
        self.full_feature = true;
    }

    fn record(&mut self, side: Side, key: &str, value: &str) {
        if is_declarative(key) {
            self.declared.insert((side, key.into()), value.into());
            return;
        }
        if function_of(key).is_none() {
            return;
        }
        match self.exchanges.get_mut(key) {
            Some(exchange) if exchange.offered_by != side && exchange.answer.is_none() => {
                exchange.answer = Some(value.into());
            }
            _ => {
                self.exchanges.insert(
                    key.into(),
                    Exchange {
                        offered_by: side,
                        offer: value.into(),
                        answer: None,
                    },
                );
            }
        }
    }

    fn negotiated(&self, key: &str) -> Option<String> {
        let exchange = self.exchanges.get(key)?;
        result_of(function_of(key)?, exchange)
    }

    fn declared(&self, side: Side, key: &str) -> Option<&str> {
        self.declared
            .get(&(side, key.to_string()))
            .map(String::as_str)
    }

    /// The parameters in force given everything observed.
    pub fn operational(&self) -> OperationalParams {
        let defaults = OperationalParams::default();
        let number = |key: &str, default: u32| {
            self.negotiated(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let boolean =
            |key: &str, default: bool| self.negotiated(key).map_or(default, |v| v == "Yes");
        let digest = |key: &str| self.negotiated(key).is_some_and(|v| v == "CRC32C");
        let mrdsl = |side: Side| {
            self.declared(side, "MaxRecvDataSegmentLength")
                .and_then(|v| v.parse().ok())
                // §13.12: 512 to 2^24 - 1.
                .map_or(8192, |v: u32| v.clamp(512, (1 << 24) - 1))
        };
        OperationalParams {
            session_type: match self.declared(Side::Initiator, "SessionType") {
                Some("Discovery") => SessionType::Discovery,
                _ => SessionType::Normal,
            },
            initiator_name: self
                .declared(Side::Initiator, "InitiatorName")
                .map(String::from),
            target_name: self
                .declared(Side::Initiator, "TargetName")
                .map(String::from),
            header_digest: digest("HeaderDigest"),
            data_digest: digest("DataDigest"),
            initiator_max_recv_data_segment_length: mrdsl(Side::Initiator),
            target_max_recv_data_segment_length: mrdsl(Side::Target),
            max_burst_length: number("MaxBurstLength", defaults.max_burst_length),
            first_burst_length: number("FirstBurstLength", defaults.first_burst_length),
            initial_r2t: boolean("InitialR2T", defaults.initial_r2t),
            immediate_data: boolean("ImmediateData", defaults.immediate_data),
            max_outstanding_r2t: number("MaxOutstandingR2T", defaults.max_outstanding_r2t),
            data_pdu_in_order: boolean("DataPDUInOrder", defaults.data_pdu_in_order),
            data_sequence_in_order: boolean("DataSequenceInOrder", defaults.data_sequence_in_order),
            error_recovery_level: number("ErrorRecoveryLevel", defaults.error_recovery_level),
            max_connections: number("MaxConnections", defaults.max_connections),
            default_time2wait: number("DefaultTime2Wait", defaults.default_time2wait),
            default_time2retain: number("DefaultTime2Retain", defaults.default_time2retain),
            ambiguity: self.ambiguity.clone(),
        }
    }
}

/// What a Login Response did to the login (§6.3, §11.13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginProgress {
    /// More login PDUs follow.
    InProgress,
    /// The response moved the connection to Full Feature Phase: every PDU after it uses
    /// `params` (digests included).
    FullFeature(Box<OperationalParams>),
    /// Status-Class 1: the target redirects the initiator (TargetAddress in the text);
    /// the target closes the connection. A transparent splicer passes it on.
    Redirected,
    /// Status-Class 2 or 3: the login failed; the target closes the connection.
    Failed { class: u8, detail: u8 },
}

/// One connection's login, from its first Login Request to Full Feature Phase.
#[derive(Clone, Debug, Default)]
pub struct LoginTracker {
    negotiation: Negotiation,
    isid: [u8; 6],
    tsih: u16,
    /// Whether the last initiator Login PDU had C set (its successor's first pair is
    /// split).
    initiator_continued: bool,
}

impl LoginTracker {
    pub fn new() -> LoginTracker {
        LoginTracker::default()
    }

    /// The ISID the initiator gave (with InitiatorName, the session's identity).
    #[cfg(any(test, feature = "testing"))]
    pub fn isid(&self) -> [u8; 6] {
        self.isid
    }

    /// The TSIH: what the initiator sent (0 for a new session, or the session being
    /// reinstated/joined), then what the target assigned in its final response.
    #[cfg(any(test, feature = "testing"))]
    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    /// The negotiation so far (continued into Full Feature Phase by the session).
    pub fn negotiation(&self) -> &Negotiation {
        &self.negotiation
    }

    /// The negotiation, continued into Full Feature Phase.
    #[cfg(any(test, feature = "testing"))]
    pub fn into_negotiation(self) -> Negotiation {
        let mut negotiation = self.negotiation;
        negotiation.enter_full_feature();
        negotiation
    }

    /// A Login Request from the initiator: record it and return its data segment with
    /// the forced keys edited (`None`: forward the PDU unchanged).
    pub fn on_request(&mut self, bhs: &Bhs, data: &[u8]) -> Option<Bytes> {
        debug_assert_eq!(bhs.opcode(), Opcode::LoginRequest);
        self.isid = bhs.isid();
        self.tsih = bhs.tsih();
        let edited = edit_initiator_text(data, self.initiator_continued);
        self.initiator_continued = bhs.text_continue();
        let forwarded = edited.as_deref().unwrap_or(data);
        self.negotiation.observe(Side::Initiator, bhs, forwarded);
        edited
    }

    /// A Login Response from the target.
    pub fn on_response(&mut self, bhs: &Bhs, data: &[u8]) -> LoginProgress {
        debug_assert_eq!(bhs.opcode(), Opcode::LoginResponse);
        match bhs.login_status_class() {
            0 => {}
            1 => return LoginProgress::Redirected,
            class => {
                return LoginProgress::Failed {
                    class,
                    detail: bhs.login_status_detail(),
                }
            }
        }
        self.negotiation.observe(Side::Target, bhs, data);
        // §11.13: the target's T bit with NSG 3 ends the login; the C bit never
        // coexists with T.
        if bhs.login_transit() && !bhs.text_continue() && bhs.login_nsg() == LoginStage::FullFeature
        {
            self.tsih = bhs.tsih();
            LoginProgress::FullFeature(Box::new(self.negotiation.operational()))
        } else {
            LoginProgress::InProgress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_bhs(opcode: Opcode, flags: u8) -> Bhs {
        let mut bhs = Bhs::new(opcode);
        bhs.set_flags(flags);
        bhs
    }

    #[test]
    fn edits_forced_keys_and_keeps_the_rest_byte_for_byte() {
        let offer = b"InitiatorName=iqn.x\0ErrorRecoveryLevel=2\0MaxConnections=8\0\
DataPDUInOrder=No\0DataSequenceInOrder=No\0MaxBurstLength=1048576\0";
        let edited = edit_initiator_text(offer, false).unwrap();
        assert_eq!(
            &edited[..],
            &b"InitiatorName=iqn.x\0ErrorRecoveryLevel=0\0MaxConnections=1\0\
DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0MaxBurstLength=1048576\0"[..]
        );
    }

    #[test]
    fn leaves_conforming_or_absent_keys_alone() {
        assert_eq!(
            edit_initiator_text(b"ErrorRecoveryLevel=0\0MaxConnections=1\0", false),
            None
        );
        assert_eq!(edit_initiator_text(b"HeaderDigest=None\0", false), None);
        assert_eq!(edit_initiator_text(b"", false), None);
        // Non-UTF-8 bytes elsewhere survive.
        let odd = b"X-odd=\xff\xfe\0ErrorRecoveryLevel=1\0";
        let edited = edit_initiator_text(odd, false).unwrap();
        assert_eq!(&edited[..], &b"X-odd=\xff\xfe\0ErrorRecoveryLevel=0\0"[..]);
    }

    #[test]
    fn does_not_edit_pairs_split_across_pdus() {
        // Unterminated last entry: the head of a pair continued in the next PDU.
        assert_eq!(
            edit_initiator_text(b"A=1\0ErrorRecoveryLevel=2", false),
            None
        );
        // First entry after a C-bit PDU: the tail of a split pair.
        assert_eq!(edit_initiator_text(b"MaxConnections=4\0", true), None);
        let edited = edit_initiator_text(b"X\0MaxConnections=4\0", true).unwrap();
        assert_eq!(&edited[..], &b"X\0MaxConnections=1\0"[..]);
    }

    /// The login libiscsi does against tgt (fact sheet values).
    fn libiscsi_tgt_login() -> (LoginTracker, LoginProgress) {
        let mut login = LoginTracker::new();
        let mut req = login_bhs(Opcode::LoginRequest, 0x81); // T, CSG 0, NSG 1
        req.set_isid([0x80, 0, 0, 0, 0x12, 0x34]);
        let sec = b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test\0\
TargetName=iqn.2024-01.test:lib\0SessionType=Normal\0AuthMethod=None\0";
        assert_eq!(login.on_request(&req, sec), None);
        let mut resp = login_bhs(Opcode::LoginResponse, 0x81);
        assert_eq!(
            login.on_response(&resp, b"TargetPortalGroupTag=1\0AuthMethod=None\0"),
            LoginProgress::InProgress
        );
        req.set_flags(0x87); // T, CSG 1, NSG 3
        let op = b"HeaderDigest=None,CRC32C\0DataDigest=None,CRC32C\0InitialR2T=Yes\0\
ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=262144\0\
MaxRecvDataSegmentLength=262144\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0\
ErrorRecoveryLevel=0\0MaxConnections=1\0";
        assert_eq!(login.on_request(&req, op), None);
        resp.set_flags(0x87);
        resp.set_tsih(7);
        let answer = b"HeaderDigest=None\0DataDigest=None\0InitialR2T=Yes\0\
ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=65536\0\
DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0ErrorRecoveryLevel=0\0MaxConnections=1\0";
        let progress = login.on_response(&resp, answer);
        (login, progress)
    }

    /// A one-PDU login (T, CSG 1 → NSG 3) with `text` from the initiator, answered
    /// with an empty final response.
    fn one_pdu_login(text: &[u8]) -> OperationalParams {
        let mut login = LoginTracker::new();
        let req = login_bhs(Opcode::LoginRequest, 0x87);
        login.on_request(&req, text);
        let resp = login_bhs(Opcode::LoginResponse, 0x87);
        match login.on_response(&resp, b"") {
            LoginProgress::FullFeature(p) => *p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_repeated_target_name_is_ambiguous_and_never_served() {
        let p = one_pdu_login(b"InitiatorName=iqn.i\0TargetName=iqn.a\0TargetName=iqn.b\0");
        assert!(!p.serving_allowed());
        assert!(p.ambiguity.as_deref().unwrap().contains("TargetName"));
        // The first one is the one the target reads (tgt), should anything report it.
        assert_eq!(p.target_name.as_deref(), Some("iqn.a"));
        assert!(one_pdu_login(b"InitiatorName=iqn.i\0TargetName=iqn.a\0").serving_allowed());
    }

    #[test]
    fn identity_keys_after_the_first_login_text_are_ambiguous() {
        let mut login = LoginTracker::new();
        let req = login_bhs(Opcode::LoginRequest, 0x81);
        login.on_request(
            &req,
            b"InitiatorName=iqn.i\0TargetName=iqn.a\0AuthMethod=None\0",
        );
        let resp = login_bhs(Opcode::LoginResponse, 0x81);
        assert_eq!(
            login.on_response(&resp, b"AuthMethod=None\0"),
            LoginProgress::InProgress
        );
        let req = login_bhs(Opcode::LoginRequest, 0x87);
        login.on_request(&req, b"TargetName=iqn.b\0");
        let resp = login_bhs(Opcode::LoginResponse, 0x87);
        let LoginProgress::FullFeature(p) = login.on_response(&resp, b"") else {
            panic!()
        };
        assert!(!p.serving_allowed(), "{p:?}");
        assert_eq!(p.target_name.as_deref(), Some("iqn.a"));
    }

    #[test]
    fn malformed_or_oversized_login_text_is_ambiguous() {
        assert!(!one_pdu_login(b"TargetName=iqn.a\0garbage\0").serving_allowed());
        assert!(!one_pdu_login(b"TargetName=iqn.a\0\xff\xfe=1\0").serving_allowed());
        let mut big = b"TargetName=iqn.a\0X-Pad=".to_vec();
        big.resize(MAX_TEXT_SEGMENT + 1, b'p');
        assert!(!one_pdu_login(&big).serving_allowed());
        // Continued text past the total cap.
        let mut n = Negotiation::default();
        let continued = login_bhs(Opcode::LoginRequest, 0x40);
        let chunk = vec![b'p'; MAX_TEXT_SEGMENT];
        for _ in 0..=MAX_CONTINUED_TEXT / MAX_TEXT_SEGMENT {
            n.observe(Side::Initiator, &continued, &chunk);
        }
        assert!(n.operational().ambiguity.is_some());
        assert!(n.partial.get(&Side::Initiator).is_none_or(Vec::is_empty));
    }

    #[test]
    fn a_declaration_repeated_during_login_is_ambiguous() {
        let mut login = LoginTracker::new();
        let req = login_bhs(Opcode::LoginRequest, 0x81);
        login.on_request(&req, b"TargetName=iqn.a\0MaxRecvDataSegmentLength=8192\0");
        let resp = login_bhs(Opcode::LoginResponse, 0x81);
        login.on_response(&resp, b"");
        let req = login_bhs(Opcode::LoginRequest, 0x87);
        login.on_request(&req, b"MaxRecvDataSegmentLength=512\0");
        let resp = login_bhs(Opcode::LoginResponse, 0x87);
        let LoginProgress::FullFeature(p) = login.on_response(&resp, b"") else {
            panic!()
        };
        assert!(!p.serving_allowed());
    }

    #[test]
    fn send_targets_answers_in_full_feature_phase_are_not_ambiguous() {
        let (login, _) = libiscsi_tgt_login();
        let mut n = login.into_negotiation();
        let text = login_bhs(Opcode::TextResponse, 0x80);
        n.observe(
            Side::Target,
            &text,
            b"TargetName=iqn.a\0TargetAddress=198.18.0.1:3260,1\0\
TargetName=iqn.b\0TargetAddress=198.18.0.1:3260,1\0",
        );
        assert!(n.operational().serving_allowed());
        // The initiator may not rename the session in Full Feature Phase.
        let text = login_bhs(Opcode::TextRequest, 0x80);
        n.observe(Side::Initiator, &text, b"TargetName=iqn.b\0");
        assert!(!n.operational().serving_allowed());
    }

    #[test]
    fn libiscsi_against_tgt_reaches_full_feature_phase() {
        let (login, progress) = libiscsi_tgt_login();
        let LoginProgress::FullFeature(params) = progress else {
            panic!("{progress:?}");
        };
        assert_eq!(login.tsih(), 7);
        assert_eq!(login.isid(), [0x80, 0, 0, 0, 0x12, 0x34]);
        assert_eq!(params.session_type, SessionType::Normal);
        assert_eq!(params.target_name.as_deref(), Some("iqn.2024-01.test:lib"));
        assert_eq!(params.digests(), Digests::NONE);
        assert_eq!(params.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(
            params.target_max_recv_data_segment_length, 8192,
            "tgt declared none"
        );
        assert_eq!(params.max_burst_length, 262_144);
        assert_eq!(params.first_burst_length, 65_536);
        assert!(params.initial_r2t && params.immediate_data);
        assert_eq!(params.error_recovery_level, 0);
        assert!(params.serving_allowed());
        assert_eq!(
            params.data_in_limits(),
            DataInLimits {
                max_recv_data_segment_length: 262_144,
                max_burst_length: 262_144
            }
        );
    }

    #[test]
    fn digests_negotiated_to_crc32c() {
        let mut n = Negotiation::default();
        let bhs = login_bhs(Opcode::LoginRequest, 0);
        n.observe(
            Side::Initiator,
            &bhs,
            b"HeaderDigest=CRC32C,None\0DataDigest=CRC32C\0",
        );
        n.observe(
            Side::Target,
            &bhs,
            b"HeaderDigest=CRC32C\0DataDigest=Reject\0",
        );
        let params = n.operational();
        assert!(params.header_digest);
        assert!(!params.data_digest, "Reject keeps the default");
    }

    #[test]
    fn numeric_and_boolean_functions() {
        let mut n = Negotiation::default();
        let bhs = login_bhs(Opcode::LoginRequest, 0);
        n.observe(
            Side::Initiator,
            &bhs,
            b"MaxBurstLength=1048576\0DefaultTime2Wait=0\0InitialR2T=No\0ImmediateData=No\0\
MaxOutstandingR2T=4\0DataPDUInOrder=Yes\0",
        );
        n.observe(
            Side::Target,
            &bhs,
            // An out-of-range answer to a min function is clamped to the offer.
            b"MaxBurstLength=2097152\0DefaultTime2Wait=3\0InitialR2T=No\0\
MaxOutstandingR2T=1\0",
        );
        let p = n.operational();
        assert_eq!(p.max_burst_length, 1_048_576);
        assert_eq!(p.default_time2wait, 3, "max function");
        assert!(!p.initial_r2t, "OR of No and No");
        assert!(!p.immediate_data, "AND with offer No needs no answer");
        assert_eq!(p.max_outstanding_r2t, 1);
        assert!(p.data_pdu_in_order, "OR with offer Yes needs no answer");
    }

    #[test]
    fn target_offers_are_answered_by_the_initiator() {
        let mut n = Negotiation::default();
        let bhs = login_bhs(Opcode::LoginResponse, 0);
        n.observe(Side::Target, &bhs, b"MaxBurstLength=65536\0");
        n.observe(Side::Initiator, &bhs, b"MaxBurstLength=32768\0");
        assert_eq!(n.operational().max_burst_length, 32_768);
    }

    #[test]
    fn unanswered_offers_keep_defaults() {
        let mut n = Negotiation::default();
        let bhs = login_bhs(Opcode::LoginRequest, 0);
        n.observe(
            Side::Initiator,
            &bhs,
            b"MaxBurstLength=4096\0ErrorRecoveryLevel=2\0",
        );
        let p = n.operational();
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.error_recovery_level, 0);
    }

    #[test]
    fn continued_text_is_joined_before_parsing() {
        let mut n = Negotiation::default();
        let continued = login_bhs(Opcode::LoginRequest, 0x40);
        let last = login_bhs(Opcode::LoginRequest, 0x00);
        n.observe(Side::Initiator, &continued, b"SessionType=Disc");
        n.observe(
            Side::Initiator,
            &last,
            b"overy\0MaxRecvDataSegmentLength=512\0",
        );
        let p = n.operational();
        assert_eq!(p.session_type, SessionType::Discovery);
        assert!(!p.serving_allowed());
        assert_eq!(p.initiator_max_recv_data_segment_length, 512);
    }

    #[test]
    fn renegotiation_in_full_feature_phase_replaces_declarations() {
        let (login, _) = libiscsi_tgt_login();
        let mut n = login.into_negotiation();
        let text = login_bhs(Opcode::TextRequest, 0x80);
        n.observe(Side::Target, &text, b"MaxRecvDataSegmentLength=65536\0");
        n.observe(Side::Initiator, &text, b"MaxRecvDataSegmentLength=8192\0");
        let p = n.operational();
        assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
        assert_eq!(p.target_max_recv_data_segment_length, 65536);
    }

    #[test]
    fn initiator_offer_is_edited_and_recorded_as_edited() {
        let mut login = LoginTracker::new();
        let req = login_bhs(Opcode::LoginRequest, 0x87);
        let edited = login
            .on_request(&req, b"ErrorRecoveryLevel=2\0MaxConnections=4\0")
            .unwrap();
        assert_eq!(&edited[..], b"ErrorRecoveryLevel=0\0MaxConnections=1\0");
        let resp = login_bhs(Opcode::LoginResponse, 0x87);
        let LoginProgress::FullFeature(p) =
            login.on_response(&resp, b"ErrorRecoveryLevel=0\0MaxConnections=1\0")
        else {
            panic!()
        };
        assert!(p.serving_allowed());
    }

    #[test]
    fn login_failures_and_redirects() {
        let mut login = LoginTracker::new();
        let mut resp = login_bhs(Opcode::LoginResponse, 0x87);
        resp.set_login_status(2, 1);
        assert_eq!(
            login.on_response(&resp, b""),
            LoginProgress::Failed {
                class: 2,
                detail: 1
            }
        );
        resp.set_login_status(1, 1);
        assert_eq!(login.on_response(&resp, b""), LoginProgress::Redirected);
    }

    #[test]
    fn stage_transitions() {
        let mut login = LoginTracker::new();
        // T to operational, not yet full feature.
        let resp = login_bhs(Opcode::LoginResponse, 0x81);
        assert_eq!(login.on_response(&resp, b""), LoginProgress::InProgress);
        // No T bit: stays.
        let resp = login_bhs(Opcode::LoginResponse, 0x07);
        assert_eq!(login.on_response(&resp, b""), LoginProgress::InProgress);
        // T with NSG 3 from security stage directly.
        let resp = login_bhs(Opcode::LoginResponse, 0x83);
        assert!(matches!(
            login.on_response(&resp, b""),
            LoginProgress::FullFeature(_)
        ));
    }
}
