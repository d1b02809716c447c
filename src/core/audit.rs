//! The audit record format and hash chain. Pure: no I/O, time passed in.
//!
//! Every record is one JSON line; its hash is SHA-256 of the line's exact bytes (without the
//! newline); each record's `prev` is the previous record's hash (64 zeros for the very first).
//! A checkpoint record carries `head` (= its `prev`), the area, the signer's public key and an
//! Ed25519 signature over `CHECKPOINT_TAG ‖ area ‖ 0 ‖ seq (u64 BE) ‖ head` (version 1) or
//! `CHECKPOINT_TAG_V2 ‖ area ‖ 0 ‖ seq (u64 BE) ‖ time ‖ 0 ‖ head` (version 2: the time is
//! signed too). Version 2 (this code) adds `tally` records (one referral counted: `from`, `to`,
//! `priority`, `category`, `incident`, `referred`, `late`; never a subject key or envelope id)
//! and binds torn-tail notes to the fragment (`length`, `fragment_sha256`). Version-1 lines
//! still parse and verify by their own rules.
//! Verification walks lines in order and names the first record that breaks a rule.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::core::digest::sha256;
use crate::core::types::{AreaId, EnvelopeId, PriorityClass};

pub const RECORD_VERSION: u8 = 2;
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const CHECKPOINT_TAG: &[u8] = b"refex/1 audit-checkpoint\0";
pub const CHECKPOINT_TAG_V2: &[u8] = b"refex/2 audit-checkpoint\0";

/// The s.62 operations, plus the log's own record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Collection,
    Combination,
    Disclosure,
    Receipt,
    Refusal,
    Consultation,
    Erasure,
    /// A Victims' Code deadline event about an envelope (`late_at_intake`, `late_arrival`,
    /// `deadline_missed`): not an s.62 operation, recorded so the returns can count lateness.
    Deadline,
    /// A signed checkpoint of the chain (not an s.62 operation).
    Checkpoint,
    /// A note that the previous run ended with a torn (half-written) line.
    TornTail,
    /// One referral counted for the returns (counts only: no subject key, no envelope id).
    Tally,
}

/// Who did it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// This node's software.
    System,
    /// The peer's TLS-authenticated area identity.
    Peer(AreaId),
    /// A local user running a command.
    User(String),
}

impl Actor {
    fn render(&self) -> String {
        match self {
            Self::System => "system".into(),
            Self::Peer(a) => format!("peer:{a}"),
            Self::User(u) => format!(
                "user:{}",
                u.chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(64)
                    .collect::<String>()
            ),
        }
    }
}

/// The result of the operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Refused,
    Failed,
}

/// A pseudonymous subject key: hex HMAC-SHA-256 of the source system and reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubjectKey(pub String);

impl std::fmt::Display for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a caller records. Build with [`Event::new`] and the chained setters.
#[derive(Clone, Debug)]
pub struct Event {
    pub operation: Operation,
    pub actor: Actor,
    pub outcome: Outcome,
    pub envelope_id: Option<EnvelopeId>,
    pub from: Option<AreaId>,
    pub to: Option<AreaId>,
    pub reason: Option<String>,
    pub payload_digest: Option<[u8; 32]>,
    pub subject_key: Option<String>,
    pub source_system: Option<String>,
    pub source_file_sha256: Option<[u8; 32]>,
    pub source_row: Option<u64>,
    pub priority: Option<PriorityClass>,
    pub peer_audit_head: Option<String>,
    /// Aggregated refusals: how many like this one the record stands for.
    pub count: Option<u64>,
}

impl Event {
    pub fn new(operation: Operation, actor: Actor, outcome: Outcome) -> Self {
        Self {
            operation,
            actor,
            outcome,
            envelope_id: None,
            from: None,
            to: None,
            reason: None,
            payload_digest: None,
            subject_key: None,
            source_system: None,
            source_file_sha256: None,
            source_row: None,
            priority: None,
            peer_audit_head: None,
            count: None,
        }
    }
    /// This record stands for `n` events of the same kind (aggregated refusals).
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }
    pub fn envelope(mut self, id: EnvelopeId) -> Self {
        self.envelope_id = Some(id);
        self
    }
    pub fn route(mut self, from: &AreaId, to: &AreaId) -> Self {
        self.from = Some(from.clone());
        self.to = Some(to.clone());
        self
    }
    /// A rule or error code — never free text from a referral.
    pub fn reason(mut self, r: &str) -> Self {
        self.reason = Some(r.chars().take(200).collect());
        self
    }
    pub fn digest(mut self, d: [u8; 32]) -> Self {
        self.payload_digest = Some(d);
        self
    }
    pub fn subject(mut self, k: SubjectKey) -> Self {
        self.subject_key = Some(k.0);
        self
    }
    /// A subject key already rendered as hex (e.g. stored with an envelope).
    pub fn subject_hex(mut self, k: &str) -> Self {
        if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.subject_key = Some(k.to_owned());
        }
        self
    }
    /// The provider system's name (e.g. `wmp-records`): not personal data, and what lets a
    /// subject access search run without being told the system.
    pub fn source_system(mut self, s: &str) -> Self {
        self.source_system = Some(
            s.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(100)
                .collect(),
        );
        self
    }
    pub fn source(mut self, file_sha256: [u8; 32], row: Option<u64>) -> Self {
        self.source_file_sha256 = Some(file_sha256);
        self.source_row = row;
        self
    }
    pub fn priority(mut self, p: PriorityClass) -> Self {
        self.priority = Some(p);
        self
    }
    pub fn peer_head(mut self, h: &str) -> Self {
        self.peer_audit_head = Some(h.chars().take(100).collect());
        self
    }
}

/// One line of the log, fields in their fixed order. Unset fields are omitted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub v: u8,
    pub seq: u64,
    pub time: String,
    pub op: Operation,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub envelope_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lawful_basis: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub payload_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_file_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_row: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub priority: Option<PriorityClass>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_audit_head: Option<String>,
    /// Checkpoints: the area, the hash signed over, the key and the signature.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub area: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub head: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sig: Option<String>,
    /// Torn-tail notes and retention purges: the file and byte offset / the files removed and
    /// the first surviving record (the chain's new anchor).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub anchor_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub anchor_prev: Option<String>,
    /// Torn-tail notes (v2): the fragment's length and SHA-256, so only those bytes pass.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fragment_sha256: Option<String>,
    /// Tally records (v2): offence category, incident code, referral date, late at intake.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub incident: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub referred: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub late: Option<bool>,
    /// Aggregated refusals: the number of refusals of this peer and rule the record stands
    /// for (absent: one).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub count: Option<u64>,
    pub prev: String,
}

impl Record {
    fn bare(seq: u64, time: DateTime<Utc>, op: Operation, prev: &str) -> Self {
        Self {
            v: RECORD_VERSION,
            seq,
            time: time.to_rfc3339_opts(SecondsFormat::Millis, true),
            op,
            envelope_id: None,
            from: None,
            to: None,
            actor: None,
            lawful_basis: None,
            purpose: None,
            outcome: None,
            reason: None,
            payload_digest: None,
            subject_key: None,
            source_system: None,
            source_file_sha256: None,
            source_row: None,
            priority: None,
            peer_audit_head: None,
            area: None,
            head: None,
            key: None,
            sig: None,
            file: None,
            offset: None,
            anchor_seq: None,
            anchor_prev: None,
            length: None,
            fragment_sha256: None,
            category: None,
            incident: None,
            referred: None,
            late: None,
            count: None,
            prev: prev.to_owned(),
        }
    }

    /// The record for `ev`.
    pub fn from_event(
        ev: &Event,
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        basis: &str,
        purpose: &str,
    ) -> Self {
        let mut r = Self::bare(seq, time, ev.operation, prev);
        r.envelope_id = ev.envelope_id.map(|i| i.to_string());
        r.from = ev.from.as_ref().map(ToString::to_string);
        r.to = ev.to.as_ref().map(ToString::to_string);
        r.actor = Some(ev.actor.render());
        r.lawful_basis = Some(basis.to_owned());
        r.purpose = Some(purpose.to_owned());
        r.outcome = Some(ev.outcome);
        r.reason = ev.reason.clone();
        r.payload_digest = ev.payload_digest.map(hex::encode);
        r.subject_key = ev.subject_key.clone();
        r.source_system = ev.source_system.clone();
        r.source_file_sha256 = ev.source_file_sha256.map(hex::encode);
        r.source_row = ev.source_row;
        r.priority = ev.priority;
        r.peer_audit_head = ev.peer_audit_head.clone();
        r.count = ev.count;
        r
    }

    /// An unsigned checkpoint over `prev` (the chain head before it); `crypto::checkpoint`
    /// signs it.
    pub fn checkpoint_unsigned(seq: u64, time: DateTime<Utc>, prev: &str, area: &AreaId) -> Self {
        let mut r = Self::bare(seq, time, Operation::Checkpoint, prev);
        r.area = Some(area.to_string());
        r.head = Some(prev.to_owned());
        r
    }

    /// A note that `file` holds `length` bytes from `offset` on (SHA-256 `fragment`) that are
    /// not part of the chain: a crash mid-write, or a failed write that could not be cut back.
    pub fn torn_tail(
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        file: &str,
        offset: u64,
        fragment: (u64, [u8; 32]),
    ) -> Self {
        let mut r = Self::bare(seq, time, Operation::TornTail, prev);
        r.file = Some(file.to_owned());
        r.offset = Some(offset);
        r.length = Some(fragment.0);
        r.fragment_sha256 = Some(hex::encode(fragment.1));
        r.reason =
            Some("previous run ended while writing this line; it is kept, not repaired".into());
        r
    }

    pub fn purge(
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        files: &[String],
        anchor_seq: u64,
        anchor_prev: &str,
    ) -> Self {
        let mut r = Self::bare(seq, time, Operation::Erasure, prev);
        r.actor = Some("system".into());
        r.outcome = Some(Outcome::Ok);
        r.reason = Some("retention_audit_files".into());
        r.file = Some(files.join(","));
        r.anchor_seq = Some(anchor_seq);
        r.anchor_prev = Some(anchor_prev.to_owned());
        r
    }

    /// One referral counted for the returns: counts only, no subject key, no envelope id.
    #[allow(clippy::too_many_arguments)]
    pub fn tally(
        seq: u64,
        time: DateTime<Utc>,
        prev: &str,
        route: (&AreaId, &AreaId),
        priority: PriorityClass,
        category: &str,
        incident: Option<&str>,
        referred: Option<chrono::NaiveDate>,
        late: Option<bool>,
    ) -> Self {
        let mut r = Self::bare(seq, time, Operation::Tally, prev);
        r.from = Some(route.0.to_string());
        r.to = Some(route.1.to_string());
        r.priority = Some(priority);
        r.category = Some(clean(category, 60));
        r.incident = incident.map(|i| clean(i, 40));
        r.referred = referred.map(|d| d.to_string());
        r.late = late;
        r
    }

    /// The exact line (no newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn clean(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

/// The bytes a version-1 checkpoint signature covers (no time; kept to verify old logs).
pub fn checkpoint_message(area: &str, seq: u64, head: &str) -> Vec<u8> {
    let mut m = CHECKPOINT_TAG.to_vec();
    m.extend_from_slice(area.as_bytes());
    m.push(0);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head.as_bytes());
    m
}

/// The bytes a version-2 checkpoint signature covers: area, sequence, time and head.
pub fn checkpoint_message_v2(area: &str, seq: u64, time: &str, head: &str) -> Vec<u8> {
    let mut m = CHECKPOINT_TAG_V2.to_vec();
    m.extend_from_slice(area.as_bytes());
    m.push(0);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(time.as_bytes());
    m.push(0);
    m.extend_from_slice(head.as_bytes());
    m
}

/// The hash of a line, as the next record's `prev`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(sha256(line))
}

/// The chain head: the last durable record's sequence number and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}
