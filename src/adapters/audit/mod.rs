//! The audit log (DPA 2018 s.62 / UK GDPR): append-only JSON Lines, hash-chained, with signed
//! checkpoints; plus subject-access search and the aggregate returns.
//!
//! Record format (version 1; see `chain.rs` for every field): `v, seq, time, op, envelope_id,
//! from, to, actor, lawful_basis, purpose, outcome, reason, payload_digest, subject_key,
//! source_system, source_file_sha256, source_row, priority, peer_audit_head, [checkpoint: area,
//! head, key, sig], [torn tail / purge: file, offset, anchor_seq, anchor_prev], prev`. Unset
//! fields are omitted. `source_system` is the provider system's name (`wmp-records`), not
//! personal data; it lets a subject access search try every system in the log.
//! Never in a record: names, addresses, dates of birth, free text, offence details. The offence
//! category and incident code are counted only in `tally.json`, aggregated by day, area pair and
//! priority, with no subject key, envelope id or time of day (see README, "Data protection").
//! Chain: `prev` = SHA-256 of the previous line's bytes; it continues across daily files.
//! Recovery: a torn last line (crash mid-write) is left as it is; the next run writes to a new
//! file, first a `torn_tail` record naming the file and offset, and `verify` accepts a torn line
//! only when such a record acknowledges it. Truncation after a checkpoint is caught through
//! `checkpoints.jsonl`. A retention purge removes whole old files and records an erasure naming
//! them and the first surviving record (the new anchor).
//! Must not: be written by two processes at once (the daemon owns it; CLI commands go through
//! its control socket, or open it only when no daemon runs).

mod log;
mod report;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

pub use crate::core::audit::{Actor, Event, Head, Operation, Outcome, Record, SubjectKey};
pub use crate::crypto::SubjectSecret;
pub use log::log_files;
pub use report::{report, Report};

use crate::core::types::{AreaId, PriorityClass};
use crate::crypto::{SigningKey, VerifyingKey};

/// Audit errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read or written; `disk_full` when the volume has no space.
    #[error("audit file {path}: {message}")]
    Io {
        path: PathBuf,
        message: String,
        disk_full: bool,
    },
    /// Existing audit files do not parse where the log must read them.
    #[error("audit log: {0}")]
    Corrupt(String),
    /// The writer has stopped.
    #[error("audit log is closed")]
    Closed,
}

impl AuditError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            disk_full: crate::adapters::durable::is_disk_full(&e),
            message: e.to_string(),
        }
    }

    /// True when the audit volume is full: callers pause and retry.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            Self::Io {
                disk_full: true,
                ..
            }
        )
    }
}

/// The lawful basis and purpose written into every record.
#[derive(Clone, Debug)]
pub struct Justification {
    pub lawful_basis: String,
    pub purpose: String,
}

/// Audit log settings.
#[derive(Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub area: AreaId,
    pub justification: Justification,
    pub checkpoint_interval: Duration,
    pub retention_days: u32,
    /// The clock records are stamped with (injectable for tests of daily rotation).
    pub clock: fn() -> DateTime<Utc>,
}

impl AuditConfig {
    pub fn new(
        dir: PathBuf,
        area: AreaId,
        justification: Justification,
        checkpoint_interval: Duration,
        retention_days: u32,
    ) -> Self {
        Self {
            dir,
            area,
            justification,
            checkpoint_interval,
            retention_days,
            clock: Utc::now,
        }
    }
}

/// One referral counted for the returns (no subject key, no time of day).
#[derive(Clone, Debug)]
pub struct TallyEntry {
    pub day: NaiveDate,
    pub from: AreaId,
    pub to: AreaId,
    pub priority: PriorityClass,
    pub category: String,
    pub incident: Option<String>,
}

impl TallyEntry {
    fn key(&self) -> String {
        let incident: String = self
            .incident
            .as_deref()
            .unwrap_or("-")
            .chars()
            .filter(|c| *c != '|')
            .take(40)
            .collect();
        format!(
            "{}|{}|{}|{}|{}|{}",
            self.day, self.from, self.to, self.priority, self.category, incident
        )
    }
}

/// The audit log handle. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Arc<Mutex<Option<log::Sender>>>,
    head: Arc<Mutex<Head>>,
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl AuditLog {
    /// Opens the log in `cfg.dir`, continuing the chain (see the module doc for torn tails).
    pub fn open(cfg: AuditConfig, signer: Arc<SigningKey>) -> Result<Self, AuditError> {
        let (tx, head, syncs) = log::start(cfg, signer)?;
        Ok(Self {
            tx: Arc::new(Mutex::new(Some(tx))),
            head,
            syncs,
        })
    }

    /// Appends `ev`; returns once it is on the device, with the new chain head.
    pub async fn record(&self, ev: Event) -> Result<Head, AuditError> {
        log::submit(&self.tx, log::JobKind::Event(ev)).await
    }

    /// The last durable record.
    pub fn head(&self) -> Head {
        self.head.lock().map(|h| h.clone()).unwrap_or(Head {
            seq: 0,
            hash: crate::core::audit::GENESIS.into(),
        })
    }

    /// Writes a signed checkpoint.
    pub async fn checkpoint(&self) -> Result<Head, AuditError> {
        log::submit(&self.tx, log::JobKind::Checkpoint).await
    }

    /// Counts one referral in the aggregate tally (durable on return).
    pub async fn tally(&self, t: TallyEntry) -> Result<(), AuditError> {
        log::submit(&self.tx, log::JobKind::Tally(t))
            .await
            .map(|_| ())
    }

    /// Removes audit files past retention, recording the erasure.
    pub async fn purge_expired(&self, now: DateTime<Utc>) -> Result<(), AuditError> {
        log::submit(&self.tx, log::JobKind::Purge(now))
            .await
            .map(|_| ())
    }

    /// How many write+sync rounds the writer has made (group commit evidence for tests).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Writes the final checkpoint and stops the writer.
    pub async fn close(&self) -> Result<(), AuditError> {
        let r = self.checkpoint().await.map(|_| ());
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        r
    }
}

/// What `verify` found in a good log.
#[derive(Debug)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
    pub files: usize,
    pub torn_acknowledged: usize,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records in {} files, {} signed checkpoints",
            self.records, self.files, self.checkpoints
        )?;
        if self.torn_acknowledged > 0 {
            write!(
                f,
                ", {} torn record(s) from crashes, acknowledged",
                self.torn_acknowledged
            )?;
        }
        Ok(())
    }
}

/// The first thing wrong with a log.
#[derive(Debug)]
pub struct VerifyFailure {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(s) => write!(f, "{}:{} (seq {s}): {}", self.file, self.line, self.problem),
            None => write!(f, "{}:{}: {}", self.file, self.line, self.problem),
        }
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Checks the whole log: chain links, sequence, checkpoint signatures, the checkpoints file,
/// torn lines. Names the first bad record.
pub fn verify(dir: &Path, keys: &[VerifyingKey]) -> Result<VerifyReport, VerifyFailure> {
    let fail = |file: &str, line: usize, seq: Option<u64>, problem: String| VerifyFailure {
        file: file.into(),
        line,
        seq,
        problem,
    };
    let files = log::log_files(dir).map_err(|e| fail("-", 0, None, e.to_string()))?;
    let mut prev_hash: Option<String> = None;
    let mut prev_seq: Option<u64> = None;
    let mut prev_at: (String, usize) = ("-".into(), 0);
    let mut first: Option<(u64, String, String, usize)> = None;
    let mut anchors: Vec<(u64, String)> = Vec::new();
    let mut torn: Vec<(String, u64, usize)> = Vec::new();
    let mut acknowledged: Vec<(String, u64)> = Vec::new();
    let mut chain_checkpoints: BTreeMap<u64, String> = BTreeMap::new();
    let mut checkpoint_lines: Vec<String> = Vec::new();
    let mut records = 0;
    for path in &files {
        let name = name_of(path);
        let bytes = std::fs::read(path).map_err(|e| fail(&name, 0, None, e.to_string()))?;
        let mut offset = 0usize;
        let mut line_no = 0;
        while offset < bytes.len() {
            line_no += 1;
            let end = bytes[offset..]
                .iter()
                .position(|b| *b == b'\n')
                .map(|i| offset + i);
            let Some(end) = end else {
                // A torn last line: acceptable only if a later torn_tail record names it.
                torn.push((name.clone(), offset as u64, line_no));
                break;
            };
            let line = &bytes[offset..end];
            let rec: Record = serde_json::from_slice(line).map_err(|_| {
                fail(
                    &name,
                    line_no,
                    None,
                    "record does not parse (altered or damaged)".into(),
                )
            })?;
            if let (Some(ps), Some(ph)) = (prev_seq, &prev_hash) {
                if rec.seq <= ps {
                    return Err(fail(
                        &name,
                        line_no,
                        Some(rec.seq),
                        format!("out of order: seq {} follows seq {ps} (reordered)", rec.seq),
                    ));
                }
                if rec.seq != ps + 1 {
                    return Err(fail(
                        &name,
                        line_no,
                        Some(rec.seq),
                        format!("records {}..={} are missing (removed)", ps + 1, rec.seq - 1),
                    ));
                }
                if &rec.prev != ph {
                    return Err(fail(
                        &prev_at.0,
                        prev_at.1,
                        Some(ps),
                        "record was altered: the next record's hash link does not match it".into(),
                    ));
                }
            } else {
                first = Some((rec.seq, rec.prev.clone(), name.clone(), line_no));
            }
            match rec.op {
                Operation::Checkpoint => {
                    if !crate::crypto::checkpoint::is_valid(&rec, keys) {
                        return Err(fail(
                            &name,
                            line_no,
                            Some(rec.seq),
                            "checkpoint signature does not verify (forged or altered)".into(),
                        ));
                    }
                    chain_checkpoints.insert(rec.seq, rec.prev.clone());
                    checkpoint_lines.push(String::from_utf8_lossy(line).into_owned());
                }
                Operation::TornTail => {
                    if let (Some(f), Some(o)) = (&rec.file, rec.offset) {
                        acknowledged.push((f.clone(), o));
                    }
                }
                Operation::Erasure => {
                    if let (Some(s), Some(p)) = (rec.anchor_seq, &rec.anchor_prev) {
                        anchors.push((s, p.clone()));
                    }
                }
                _ => {}
            }
            prev_hash = Some(crate::core::audit::line_hash(line));
            prev_seq = Some(rec.seq);
            prev_at = (name.clone(), line_no);
            records += 1;
            offset = end + 1;
        }
    }
    if let Some((seq, prev, file, line)) = &first {
        let genesis = *seq == 1 && prev == crate::core::audit::GENESIS;
        if !genesis && !anchors.iter().any(|(s, p)| s == seq && p == prev) {
            return Err(fail(file, *line, Some(*seq), "the log does not start at the first record and no retention purge accounts for it (records removed)".into()));
        }
    }
    for (file, offset, line) in &torn {
        if !acknowledged.iter().any(|(f, o)| f == file && o == offset) {
            return Err(fail(
                file,
                *line,
                None,
                "torn record not acknowledged by a later torn_tail record (truncated or damaged)"
                    .into(),
            ));
        }
    }
    let cp_path = dir.join("checkpoints.jsonl");
    let first_seq = first.as_ref().map(|f| f.0).unwrap_or(1);
    let mut checkpoints = 0;
    if let Ok(text) = std::fs::read_to_string(&cp_path) {
        for (i, l) in text.lines().enumerate() {
            let Ok(cp) = serde_json::from_str::<Record>(l) else {
                // A crash while appending leaves a fragment, sealed by the next run with a
                // newline. It is accepted only as the start of a checkpoint the chain holds
                // whole (the chain is written first), so nothing can be added this way.
                if !l.is_empty() && checkpoint_lines.iter().any(|c| c.starts_with(l)) {
                    continue;
                }
                return Err(fail(
                    "checkpoints.jsonl",
                    i + 1,
                    None,
                    "checkpoint does not parse".into(),
                ));
            };
            if cp.seq < first_seq {
                continue;
            }
            match chain_checkpoints.get(&cp.seq) {
                Some(head) if head == &cp.prev => checkpoints += 1,
                Some(_) => {
                    return Err(fail(
                        "checkpoints.jsonl",
                        i + 1,
                        Some(cp.seq),
                        "the log's checkpoint differs from the one recorded (altered)".into(),
                    ))
                }
                None if prev_seq.is_some_and(|s| cp.seq > s) || prev_seq.is_none() => {
                    return Err(fail(
                        &prev_at.0,
                        prev_at.1,
                        prev_seq,
                        format!(
                            "log truncated: checkpoint seq {} is missing from the end of the log",
                            cp.seq
                        ),
                    ));
                }
                None => {
                    return Err(fail(
                        "checkpoints.jsonl",
                        i + 1,
                        Some(cp.seq),
                        "checkpoint missing from the log (removed)".into(),
                    ))
                }
            }
        }
    }
    Ok(VerifyReport {
        records,
        checkpoints,
        files: files.len(),
        torn_acknowledged: torn.len(),
    })
}

/// The provider systems named in the log (to search for a reference without its system).
pub fn source_systems(dir: &Path) -> Result<std::collections::BTreeSet<String>, AuditError> {
    let mut out = std::collections::BTreeSet::new();
    for path in log::log_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|e| AuditError::io(&path, e))?;
        for line in text.lines() {
            if let Ok(Record {
                source_system: Some(s),
                ..
            }) = serde_json::from_str::<Record>(line)
            {
                out.insert(s);
            }
        }
    }
    Ok(out)
}

/// Every record carrying `key` (subject access requests).
pub fn search(dir: &Path, key: &SubjectKey) -> Result<Vec<String>, AuditError> {
    let mut out = Vec::new();
    for path in log::log_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|e| AuditError::io(&path, e))?;
        for line in text.lines() {
            if let Ok(rec) = serde_json::from_str::<Record>(line) {
                if rec.subject_key.as_deref() == Some(key.0.as_str()) {
                    out.push(line.to_owned());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
