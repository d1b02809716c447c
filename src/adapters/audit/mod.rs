//! The audit log (DPA 2018 s.62 / UK GDPR): append-only JSON Lines, hash-chained, with signed
//! checkpoints; plus subject-access search and the aggregate returns.
//!
//! Record format (version 2; see `core::audit` for every field): `v, seq, time, op, envelope_id,
//! from, to, actor, lawful_basis, purpose, outcome, reason, payload_digest, subject_key,
//! source_system, source_file_sha256, source_row, priority, peer_audit_head, [checkpoint: area,
//! head, key, sig], [torn tail / purge: file, offset, anchor_seq, anchor_prev], prev`. Unset
//! fields are omitted. `source_system` is the provider system's name (`wmp-records`), not
//! personal data; it lets a subject access search try every system in the log.
//! Version 2 (see `core::audit`) adds `tally` records and fragment-bound torn-tail notes, and
//! checkpoints sign their time; version-1 logs still verify.
//! Never in a record: names, addresses, dates of birth, free text, offence details. The offence
//! category and incident code appear only in `tally` records, which carry counts only — no
//! subject key, no envelope id (see README, "Data protection"); the report is computed from
//! them, so `verify` covers every figure. A `tally.json` left by older versions is ignored.
//! Chain: `prev` = SHA-256 of the previous line's bytes; it continues across daily files.
//! Recovery: a torn tail (crash mid-write: a last line without its newline, or from the first
//! line that is no record, e.g. one with a block of zeros in it, to the end) is left as it is;
//! the next run writes to a new file, first a `torn_tail` record naming the file and offset and
//! binding the bytes, and `verify` accepts torn bytes only when such a record acknowledges
//! them. Truncation after a checkpoint is caught through `checkpoints.jsonl`. A retention purge
//! removes whole old files and records an erasure naming them and the first surviving record
//! (the new anchor).
//! Must not: be written by two processes at once — enforced by a `flock` on `audit.lock` (the
//! daemon owns it; CLI commands go through its control socket, or open it only when no daemon
//! runs, and get [`AuditError::Locked`] otherwise).

mod log;
mod report;
mod snapshot;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

pub use crate::core::audit::{Actor, Event, Head, Operation, Outcome, Record, SubjectKey};
pub use crate::crypto::SubjectSecret;
pub use log::log_files;
pub use report::{report, Report};
pub use snapshot::{copy_upto, is_locked};
pub use verify::{verify, VerifyFailure, VerifyReport};

use crate::core::types::{AreaId, PriorityClass};
use crate::crypto::SigningKey;

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
    /// Another writer (the daemon, or another command) holds the directory's lock.
    #[error("audit log {0} is in use by another process (the daemon?): only one writer may append to it; use the daemon's control socket or stop it first")]
    Locked(PathBuf),
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
    /// A signed checkpoint also follows every this many records (default 1000).
    pub checkpoint_every_records: u64,
    pub retention_days: u32,
    /// The clock records are stamped with (injectable for tests of daily rotation).
    pub clock: fn() -> DateTime<Utc>,
    /// Failpoint for tests: while true, every append fails with EIO after writing half its
    /// bytes (as a failing device would). Never set outside tests.
    pub fail_appends: Arc<std::sync::atomic::AtomicBool>,
    /// The same failpoint for tests of a whole process: appends fail with EIO while this file
    /// exists (`REFEX_AUDIT_EIO_WHILE=<path>`, read by `node::build`). `None` in production.
    pub fail_appends_while: Option<PathBuf>,
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
            checkpoint_every_records: 1000,
            retention_days,
            clock: Utc::now,
            fail_appends: Arc::default(),
            fail_appends_while: None,
        }
    }
}

/// One referral counted for the returns, written as a chained `tally` record: counts only (no
/// subject key, no envelope id), so the report is computed from the chain and `verify` covers it.
#[derive(Clone, Debug)]
pub struct TallyEntry {
    /// Intake date (the record's own time is what the report uses; kept for callers).
    pub day: NaiveDate,
    pub from: AreaId,
    pub to: AreaId,
    pub priority: PriorityClass,
    pub category: String,
    pub incident: Option<String>,
    /// The referral's own date (`referred_at`), for counts by referral date.
    pub referred: Option<NaiveDate>,
    /// Past `due_by` at intake, when the caller knows.
    pub late: Option<bool>,
}

/// The audit log handle. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Arc<Mutex<Option<log::Sender>>>,
    head: Arc<Mutex<Head>>,
    syncs: Arc<std::sync::atomic::AtomicU64>,
    /// False from a failed write until the next one succeeds.
    writable: Arc<std::sync::atomic::AtomicBool>,
    beat: Arc<std::sync::atomic::AtomicU64>,
    stopped: Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

impl AuditLog {
    /// Opens the log in `cfg.dir`, continuing the chain (see the module doc for torn tails).
    /// Fails with [`AuditError::Locked`] while another writer holds the directory.
    pub fn open(cfg: AuditConfig, signer: Arc<SigningKey>) -> Result<Self, AuditError> {
        let (tx, head, syncs, beat, stopped) = log::start(cfg, signer)?;
        Ok(Self {
            tx: Arc::new(Mutex::new(Some(tx))),
            head,
            syncs,
            writable: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            beat,
            stopped: Arc::new(Mutex::new(Some(stopped))),
        })
    }

    /// Appends `ev`; returns once it is on the device, with the new chain head.
    pub async fn record(&self, ev: Event) -> Result<Head, AuditError> {
        self.submit(log::JobKind::Event(Box::new(ev))).await
    }

    /// Appends `events` in order in one write and one sync: all of them are durable, or none
    /// is (so no later record of the group can be on the device without an earlier one).
    /// Returns the chain head after the last.
    pub async fn record_all(&self, events: Vec<Event>) -> Result<Head, AuditError> {
        self.submit(log::JobKind::Events(events, Vec::new())).await
    }

    /// [`AuditLog::record_all`], then a tally record for each of `tallies`, in the same write
    /// and sync (all or none): intake's records of one file are one job, not one per record.
    pub async fn record_all_counting(
        &self,
        events: Vec<Event>,
        tallies: Vec<TallyEntry>,
    ) -> Result<Head, AuditError> {
        self.submit(log::JobKind::Events(events, tallies)).await
    }

    /// Submits one job and notes whether the writer could write it.
    async fn submit(&self, kind: log::JobKind) -> Result<Head, AuditError> {
        let r = log::submit(&self.tx, kind).await;
        self.writable.store(r.is_ok(), Ordering::Relaxed);
        r
    }

    /// False once a write failed (disk full, I/O error, writer stopped), until one succeeds.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
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
        self.submit(log::JobKind::Checkpoint).await
    }

    /// Removes audit files past retention, recording the erasure.
    pub async fn purge_expired(&self, now: DateTime<Utc>) -> Result<(), AuditError> {
        self.submit(log::JobKind::Purge(now)).await.map(|_| ())
    }

    /// How many write+sync rounds the writer has made (group commit evidence for tests).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// When the writer thread last went round its loop (ms since the epoch). It beats at least
    /// once a second while idle, so an old value means it is stuck (e.g. in a sync on a dead disk).
    pub fn last_beat_ms(&self) -> u64 {
        self.beat.load(Ordering::Relaxed)
    }

    /// Writes the final checkpoint, stops the writer and waits until it has released the files
    /// and the directory lock.
    pub async fn close(&self) -> Result<(), AuditError> {
        let r = self.checkpoint().await.map(|_| ());
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        let stopped = self.stopped.lock().ok().and_then(|mut g| g.take());
        if let Some(rx) = stopped {
            let _ = rx.await;
        }
        r
    }
}

/// Wall-clock milliseconds since the Unix epoch (the unit of heartbeats).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Calls `f` with every record of the chain, in chain order, streaming.
pub fn for_each_record(dir: &Path, f: impl FnMut(&Record, &str)) -> Result<(), AuditError> {
    for_each_record_in(&log::log_files(dir)?, f)
}

/// [`for_each_record`] over some of the log's files, in chain order. A file is read up to its
/// torn tail, noted or not yet noted: the offset a `torn_tail` note gives, or else its first
/// line that is no record (see `log::each_intact_record`). The records behind it were never
/// acknowledged, so a recovery that asks "is it recorded?" must not count them. The notes of a
/// file are in later files, so `files` must run to the newest.
fn for_each_record_in(
    files: &[PathBuf],
    mut f: impl FnMut(&Record, &str),
) -> Result<(), AuditError> {
    let notes = verify::torn_notes(files).map_err(|e| AuditError::Corrupt(e.to_string()))?;
    for path in files {
        let name = verify::name_of(path);
        let torn_at = notes
            .keys()
            .filter(|(file, _)| *file == name)
            .map(|(_, offset)| *offset)
            .min()
            .unwrap_or(u64::MAX);
        log::each_intact_record(path, torn_at, &mut f)?;
    }
    Ok(())
}

/// True when a record of the chain names envelope `id`, looking only at day files modified at
/// or after `since` (the envelope's creation). Intake uses it when it finds an envelope it
/// stored but never released (a crash in between) to tell whether its records were already
/// written.
pub fn mentions_envelope(
    dir: &Path,
    id: &crate::core::types::EnvelopeId,
    since: std::time::SystemTime,
) -> Result<bool, AuditError> {
    let fresh: Vec<PathBuf> = log::log_files(dir)?
        .into_iter()
        .filter(|path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map(|t| t >= since)
                .unwrap_or(true)
        })
        .collect();
    let id = id.to_string();
    let mut found = false;
    for_each_record_in(&fresh, |rec, _| {
        found |= rec.envelope_id.as_deref() == Some(id.as_str());
    })?;
    Ok(found)
}

/// The provider systems named in the log (to search for a reference without its system).
pub fn source_systems(dir: &Path) -> Result<std::collections::BTreeSet<String>, AuditError> {
    let mut out = std::collections::BTreeSet::new();
    for_each_record(dir, |rec, _| {
        if let Some(s) = &rec.source_system {
            out.insert(s.clone());
        }
    })?;
    Ok(out)
}

/// Every record carrying `key` (subject access requests).
pub fn search(dir: &Path, key: &SubjectKey) -> Result<Vec<String>, AuditError> {
    Ok(search_any(dir, std::slice::from_ref(key))?
        .into_iter()
        .map(|(_, line)| line)
        .collect())
}

/// Every record carrying any of `keys`, in chain order, with the index of the key it carries.
/// One pass over the log, however many keys.
pub fn search_any(dir: &Path, keys: &[SubjectKey]) -> Result<Vec<(usize, String)>, AuditError> {
    let mut out = Vec::new();
    for_each_record(dir, |rec, line| {
        if let Some(k) = &rec.subject_key {
            if let Some(i) = keys.iter().position(|x| &x.0 == k) {
                out.push((i, line.to_owned()));
            }
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests;
