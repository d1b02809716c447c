//! The node's durable state in sled: the sender's queue of sealed envelopes with their delivery
//! state, the intake idempotency index, and the receiver's memory of accepted envelope ids.
//!
//! Layout (format version 1; every value is CBOR starting with `v: 1`):
//! - tree `envelopes`: envelope id (16 bytes) → [`OutRecord`] (state, sealed bytes until a receipt
//!   arrives, then the receipt instead).
//! - tree `queue`: `to-area ‖ 0x00 ‖ priority (0 enhanced, 1 standard) ‖ due_by (u64 BE, sign bit
//!   flipped) ‖ id` → `created` (i64 BE), then one byte 0x01 once the missed deadline is on
//!   record, so the housekeeping sweeps read no record (an older store's entries without them
//!   fall back to the record). Only envelopes in state `Queued` have a key, so a prefix scan per
//!   peer yields its queue in delivery order (priority class first, then oldest `due_by`)
//!   without loading the whole outbox into memory.
//! - tree `idem`: SHA-256 of the intake idempotency key → envelope id.
//! - tree `seen`: envelope id → [`SeenRecord`] (receiver side: the signed receipt and the inbox
//!   file name), kept for the dedup retention period.
//! - tree `referrals`: `from-area ‖ 0x00 ‖ subject key (hex)` → envelope id (16 bytes) ‖
//!   received time (i64 BE): the receiver's end-to-end check that a referral, whatever
//!   envelope carries it, is delivered once per sending area; kept as long as `seen`.
//!
//! Durability: sled's `flush()` only issues `sync_file_range`, which commits neither the device
//! cache nor metadata. [`Store::durable`] therefore flushes and then `fdatasync`s sled's `db`
//! file (and any blob files). A single committer thread serves all waiters: callers that arrive
//! while a commit is running share the next one (group commit), so a burst of N envelopes costs
//! a handful of syncs, not N. Nothing may be acknowledged (outbox file deleted, receipt sent)
//! before `durable()` returns. The hot writes (intake's new envelopes and their release, the
//! sender's stored receipt and erasure) are handed to the committer itself, which applies all
//! that arrived during its last sync in few transactions (up to
//! `changes::WRITES_PER_TRANSACTION` records each) before it syncs once (see `changes`: each
//! sled transaction costs two log-buffer writes).
//! Visibility (write-ahead audit): [`Store::enqueue`] writes an envelope in state `Held`, outside
//! every queue. Intake syncs it, writes its audit records (collection first), and only then
//! [`Store::release`]s it into its peer's queue. So the sender can never take an envelope whose
//! collection is not on record. A crash while it is held leaves the outbox file in place (intake
//! deletes the file only after the release is synced): the file is read again, the idempotency
//! key finds the held envelope ([`Enqueued::Resumed`], same envelope id), its records are written
//! again and it is released. Released envelopes are also kept out of [`Store::next_queued`] until
//! a sync that started after the release has finished: otherwise it could be sent, delivered and
//! erased while the release was only in memory, a crash would put it back to `Held`, and intake
//! would record a collection after the erasure. The pending set lives in memory only: after a
//! restart everything in sled came from the device.
//! Crash safety: every multi-tree change is one sled transaction, so after a crash a record is
//! either fully queued (envelope + queue key + idempotency key) or absent.
//! Must not: know about files, the network, or how envelopes are made.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
mod changes;
mod commit;
mod export;
mod index;
mod operator;

mod seen;
mod sweep;

use changes::{change_in, Job, Tables};
use commit::committer;
pub use commit::EXIT_STORE_LOST;
use tokio::sync::oneshot;

use crate::core::types::{AreaId, EnvelopeId, PriorityClass};

/// Store errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O underneath, or corruption).
    #[error("state store: {message}")]
    Sled { message: String, disk_full: bool },
    /// A sync of the store's files failed; `disk_full` when the device has no space.
    #[error("state store sync failed: {message}")]
    Sync { message: String, disk_full: bool },
    /// A stored value did not decode (written by a newer version, or corrupted).
    #[error("state store record for {0} does not decode")]
    Corrupt(String),
    /// The operation names an envelope the store does not hold.
    #[error("no envelope {0} in the store")]
    NotFound(EnvelopeId),
    /// The envelope is not in a state that allows the operation.
    #[error("envelope {id} is {state:?}; {action} is not possible")]
    WrongState {
        id: EnvelopeId,
        state: OutState,
        action: &'static str,
    },
    /// The committer thread has stopped.
    #[error("state store is closed")]
    Closed,
}

impl StoreError {
    /// True when the disk (or quota) is full: callers pause and retry, nothing is lost.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Sync { disk_full, .. } => *disk_full,
            Self::Sled { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        let disk_full =
            matches!(&e, sled::Error::Io(io) if crate::adapters::durable::is_disk_full(io));
        Self::Sled {
            message: e.to_string(),
            disk_full,
        }
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

/// Delivery state of an outgoing envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutState {
    /// Stored by intake, not yet released: its audit records may not be durable yet.
    Held,
    /// Waiting in its peer's queue.
    Queued,
    /// Undelivered past the non-delivery window, or refused by the peer: kept for an operator.
    NonDelivered,
    /// A valid signed receipt is stored and synced, out of the queue; its receipt and erasure
    /// audit records may not be written yet. Never sent again: the sender writes the records
    /// (at start-up, those the log does not already hold) and then marks it delivered.
    ReceiptStored,
    /// A valid signed receipt is stored; the payload is erased.
    Delivered,
    /// An operator's withdraw is under way: out of the queue (never sent again), payload still
    /// kept until its `erasure(operator_withdraw)` record is durable; completed at start-up
    /// after a crash (the record written unless the log already holds it, then `Withdrawn`).
    WithdrawPending,
    /// Withdrawn by an operator; the payload is erased.
    Withdrawn,
}

/// What the sender keeps about an outgoing envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutRecord {
    pub v: u8,
    pub to: AreaId,
    pub priority: PriorityClass,
    pub due_by: i64,
    pub created: i64,
    pub state: OutState,
    pub attempts: u32,
    pub last_error: Option<String>,
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
    pub subject_key: Option<String>,
    pub sealed: Option<serde_bytes::ByteBuf>,
    pub receipt: Option<serde_bytes::ByteBuf>,
    pub peer_audit_head: Option<String>,
    pub finished_at: Option<i64>,
    /// Set once the crossing of `due_by` while queued has been recorded (`deadline_missed`).
    #[serde(default)]
    pub deadline_reported: bool,
    /// `WithdrawPending`: the operator (kernel account name) who asked, and the state to go
    /// back to if the withdraw cannot be recorded.
    #[serde(default)]
    pub withdraw: Option<(String, OutState)>,
}

impl OutRecord {
    pub fn created_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.created, 0)
            .single()
            .unwrap_or_default()
    }

    pub fn due_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.due_by, 0)
            .single()
            .unwrap_or_default()
    }
}

/// A sealed envelope ready to be queued.
pub struct NewEnvelope {
    pub id: EnvelopeId,
    pub to: AreaId,
    pub priority: PriorityClass,
    pub due_by: DateTime<Utc>,
    pub created: DateTime<Utc>,
    pub sealed: Vec<u8>,
    pub digest: [u8; 32],
    pub subject_key: Option<String>,
}

/// The result of queueing: new, a duplicate of an envelope queued earlier, or a duplicate of
/// one still held (a crash came between its enqueue and its release: record it and release it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    New(EnvelopeId),
    Duplicate(EnvelopeId),
    Resumed(EnvelopeId),
}

impl Enqueued {
    /// The envelope id, whichever case.
    pub fn id(&self) -> EnvelopeId {
        match self {
            Self::New(id) | Self::Duplicate(id) | Self::Resumed(id) => *id,
        }
    }
}

/// What the receiver keeps about an accepted envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeenRecord {
    pub v: u8,
    pub from: AreaId,
    pub received_at: i64,
    pub inbox_name: String,
    pub published: bool,
    pub receipt: serde_bytes::ByteBuf,
}

/// Counts of one peer's queue, for `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueStats {
    pub queued: u64,
    pub enhanced: u64,
    pub past_due: u64,
    pub oldest_created: Option<DateTime<Utc>>,
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// The state store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept so the database outlives every tree handle.
    _db: sled::Db,
    envelopes: sled::Tree,
    queue: sled::Tree,
    idem: sled::Tree,
    seen: sled::Tree,
    referrals: sled::Tree,
    /// Index of the rare states an operator or a restart must find without scanning every
    /// envelope: `[tag][id]` for `NonDelivered`, `ReceiptStored` and `WithdrawPending`
    /// (see `index`); kept in the same transaction as the record. `BUILT` marks it complete
    /// (built once from the records when a store from before it is opened).
    states: sled::Tree,
    /// Index of finished (delivered or withdrawn) envelopes by when they finished:
    /// `finished_at (i64 BE, sign bit flipped) ‖ id`, so the receipt purge reads only the
    /// expired ones (see `index`); kept in the same transaction as the record.
    finished: sled::Tree,
    commit_tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    syncs: Arc<AtomicU64>,
    committer: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    pending: Arc<std::sync::Mutex<Pending>>,
    /// Multi-tree transactions hold it shared; a backup holds it exclusively while it copies,
    /// so the copy never has half of one (see `export`).
    gate: Arc<std::sync::RwLock<()>>,
    /// Multi-tree transactions made (tests and benchmarks).
    transactions: Arc<AtomicU64>,
}

/// Enqueued envelopes not yet covered by a completed sync (see "Visibility" above).
#[derive(Default)]
struct Pending {
    /// Envelope id → the write's ticket; `WRITING` while the transaction is still running.
    ids: HashMap<EnvelopeId, u64>,
    /// Tickets handed out so far: a write gets one once its transaction has returned.
    issued: u64,
}

const WRITING: u64 = u64::MAX;

impl Pending {
    /// Forgets every write whose ticket is at most `upto` (covered by a finished sync).
    fn covered(&mut self, upto: u64) {
        self.ids.retain(|_, t| *t > upto);
    }
}

fn referral_key(from: &AreaId, subject: &str) -> Vec<u8> {
    let mut k = from.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(subject.as_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail.
    serde_cbor::to_vec(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(
    what: impl std::fmt::Display,
    b: &[u8],
) -> Result<T, StoreError> {
    serde_cbor::from_slice(b).map_err(|_| StoreError::Corrupt(what.to_string()))
}

fn queue_key(to: &AreaId, priority: PriorityClass, due_by: i64, id: &EnvelopeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(to.as_str().len() + 1 + 1 + 8 + 16);
    k.extend_from_slice(to.as_str().as_bytes());
    k.push(0);
    k.push(match priority {
        PriorityClass::Enhanced => 0,
        PriorityClass::Standard => 1,
    });
    k.extend_from_slice(&((due_by as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The `due_by` a queue key carries (the 8 bytes before the id).
fn due_from_queue_key(k: &[u8]) -> Option<i64> {
    let at = k.len().checked_sub(24)?;
    let b: [u8; 8] = k.get(at..at + 8)?.try_into().ok()?;
    Some((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

/// A queue entry's value: `created`, then 0x01 once the missed deadline is on record.
fn queue_value(rec: &OutRecord) -> Vec<u8> {
    let mut v = rec.created.to_be_bytes().to_vec();
    if rec.deadline_reported {
        v.push(1);
    }
    v
}

/// `(created, deadline on record)` from a queue entry's value; `None` for an entry written
/// before the value carried them (read the record instead).
fn from_queue_value(v: &[u8]) -> Option<(i64, bool)> {
    let created = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    match v.get(8..)? {
        [] => Some((created, false)),
        [1] => Some((created, true)),
        _ => None,
    }
}

fn queue_prefix(to: &AreaId) -> Vec<u8> {
    let mut k = to.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn id_from_queue_key(k: &[u8]) -> Option<EnvelopeId> {
    k.len()
        .checked_sub(16)
        .and_then(|at| EnvelopeId::from_slice(&k[at..]).ok())
}

/// sled's page cache. The hot data is small (the queue's heads, records written since the last
/// sync); the rest is read from sled's log through the OS page cache, which 43 nodes on one
/// machine share instead of each keeping its own copy. 2 MiB instead of 8: national run's
/// largest node 27.9 MiB against 29.3–30.8 the same hour, restart with 100,000 queued and the
/// drain after a 10-minute outage unchanged (README, "National scale and cost model").
const CACHE_BYTES: u64 = 2 << 20;

impl Store {
    /// Opens (or creates) the store in `dir` and starts its committer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled's lock, held elsewhere, is tried again for a moment (see `retry_while_locked`).
        let open = || {
            sled::Config::new()
                .path(dir)
                .cache_capacity(CACHE_BYTES)
                .flush_every_ms(None)
                .open()
        };
        let db = crate::adapters::durable::retry_while_locked(
            open,
            |e| matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock")),
        )?;
        let (commit_tx, commit_rx) = mpsc::channel::<Job>();
        let syncs = Arc::new(AtomicU64::new(0));
        let path = dir.to_owned();
        let db2 = db.clone();
        let syncs2 = syncs.clone();
        let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
        let pending2 = pending.clone();
        let tables = Tables {
            envelopes: db.open_tree("envelopes")?,
            idem: db.open_tree("idem")?,
            queue: db.open_tree("queue")?,
            states: db.open_tree("states")?,
            finished: db.open_tree("finished")?,
            gate: Arc::default(),
            transactions: Arc::default(),
        };
        let tables2 = tables.clone();
        let handle = thread::Builder::new()
            .name("refex-store-commit".into())
            .spawn(move || committer(db2, path, commit_rx, syncs2, pending2, tables2))
            .map_err(|e| StoreError::Sled {
                message: format!("cannot start committer: {e}"),
                disk_full: false,
            })?;
        let inner = Inner {
            envelopes: tables.envelopes,
            queue: tables.queue,
            idem: tables.idem,
            seen: db.open_tree("seen")?,
            referrals: db.open_tree("referrals")?,
            states: tables.states,
            finished: tables.finished,
            _db: db.clone(),
            commit_tx: std::sync::Mutex::new(Some(commit_tx)),
            syncs,
            committer: std::sync::Mutex::new(Some(handle)),
            pending,
            gate: tables.gate,
            transactions: tables.transactions,
        };
        let store = Self {
            inner: Arc::new(inner),
        };
        store.build_indexes()?;
        Ok(store)
    }

    /// Returns once everything written before the call is on the device.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send_job(Job::Sync(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Hands the committer a job; `Closed` once the store is closing.
    fn send_job(&self, job: Job) -> Result<(), StoreError> {
        let guard = self
            .inner
            .commit_tx
            .lock()
            .map_err(|_| StoreError::Closed)?;
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)
    }

    /// How many multi-tree transactions were made, the committer's included (tests and
    /// benchmarks): each costs sled two log-buffer writes (see `changes`).
    pub fn transaction_count(&self) -> u64 {
        self.inner.transactions.load(Ordering::Relaxed)
    }

    /// How many device syncs the committer has made (tests and benchmarks).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Stores a sealed envelope as `Held` unless `idem_key` was seen before. Not yet durable
    /// (call [`Store::durable`]) and not sendable: [`Store::release`] queues it once its audit
    /// records are durable.
    pub fn enqueue(&self, env: NewEnvelope, idem_key: &[u8; 32]) -> Result<Enqueued, StoreError> {
        let mut out = self.enqueue_all(vec![(env, *idem_key)])?;
        out.pop()
            .ok_or_else(|| StoreError::Corrupt("enqueue returned nothing".into()))
    }

    /// [`Store::enqueue`] for every envelope of a file, in ONE transaction (sled writes its log
    /// buffer out twice per transaction, see `changes`): all are stored or none. Outcomes in
    /// order; a later one sees an earlier one's idempotency key. Intake uses
    /// [`Store::enqueue_all_durably`] (shared with other files, synced); this serves tests and
    /// the benches' store fill.
    pub fn enqueue_all(
        &self,
        envs: Vec<(NewEnvelope, [u8; 32])>,
    ) -> Result<Vec<Enqueued>, StoreError> {
        let i = &self.inner;
        let items = new_items(envs);
        let _gate = i.gate.read().map_err(|_| StoreError::Closed)?;
        i.transactions.fetch_add(1, Ordering::Relaxed);
        let out = (&i.envelopes, &i.idem)
            .transaction(|(envelopes, idem)| enqueue_file_in(envelopes, idem, &items))?;
        Ok(out)
    }

    /// Moves held envelopes into their peers' queues (intake, once their records are durable).
    /// Idempotent. They become sendable once a sync that starts after this call has finished.
    pub fn release(&self, ids: &[EnvelopeId]) -> Result<(), StoreError> {
        for id in ids {
            // Marked before the write can be seen, so no scan finds it unmarked.
            self.pending_lock()?.ids.insert(*id, WRITING);
            let out = self.update(id, |r| {
                if r.state == OutState::Held {
                    r.state = OutState::Queued;
                }
                Ok(())
            });
            let mut pending = self.pending_lock()?;
            match out {
                Ok(()) => {
                    // The write is complete: any commit that starts from here on covers it.
                    pending.issued += 1;
                    let ticket = pending.issued;
                    pending.ids.insert(*id, ticket);
                }
                Err(e) => {
                    pending.ids.remove(id);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn pending_lock(&self) -> Result<std::sync::MutexGuard<'_, Pending>, StoreError> {
        self.inner.pending.lock().map_err(|_| StoreError::Closed)
    }

    /// True while `id` was released but no sync covering the release has finished.
    pub fn is_pending(&self, id: &EnvelopeId) -> bool {
        self.pending_lock()
            .map(|p| p.ids.contains_key(id))
            .unwrap_or(true)
    }

    /// One outgoing envelope's record.
    pub fn get(&self, id: &EnvelopeId) -> Result<Option<OutRecord>, StoreError> {
        match self.inner.envelopes.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` queued envelopes for `to`, in delivery order, skipping `skip` (in flight)
    /// and any envelope whose release is not yet synced.
    /// Reads lazily: never more than `limit + skip.len()` plus unsynced queue keys.
    pub fn next_queued(
        &self,
        to: &AreaId,
        limit: usize,
        skip: &HashSet<EnvelopeId>,
    ) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.queue.scan_prefix(queue_prefix(to)) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            if skip.contains(&id) || self.is_pending(&id) {
                continue;
            }
            if let Some(rec) = self.get(&id)? {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// Whether `id`, whose record `rec` was read earlier, is still in its peer's queue: one
    /// lookup of its queue entry (kept in the same transaction as the record's state), without
    /// reading and decoding the record and its payload.
    pub fn is_queued(&self, id: &EnvelopeId, rec: &OutRecord) -> Result<bool, StoreError> {
        let key = queue_key(&rec.to, rec.priority, rec.due_by, id);
        Ok(self.inner.queue.contains_key(key)?)
    }

    fn update<T>(
        &self,
        id: &EnvelopeId,
        f: impl Fn(&mut OutRecord) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let i = &self.inner;
        let _gate = i.gate.read().map_err(|_| StoreError::Closed)?;
        i.transactions.fetch_add(1, Ordering::Relaxed);
        let trees = (&i.envelopes, &i.queue, &i.states, &i.finished);
        let out = trees.transaction(|(envelopes, queue, states, finished)| {
            change_in((envelopes, queue, states, finished), id, &f)?
                .map_err(ConflictableTransactionError::Abort)
        })?;
        Ok(out)
    }

    /// Records a failed attempt (transient; the envelope stays queued).
    pub fn note_attempt(&self, id: &EnvelopeId, error: &str) -> Result<(), StoreError> {
        self.update(id, |r| {
            r.attempts = r.attempts.saturating_add(1);
            r.last_error = Some(error.chars().take(200).collect());
            Ok(())
        })
    }

    /// Stores the receipt, erases the payload and leaves the queue. Idempotent.
    pub fn mark_delivered(
        &self,
        id: &EnvelopeId,
        receipt: &[u8],
        peer_audit_head: &str,
        now: DateTime<Utc>,
    ) -> Result<OutRecord, StoreError> {
        self.update(id, |r| {
            delivered(r, receipt, peer_audit_head, now);
            Ok(r.clone())
        })
    }

    /// Stops the committer after a final flush and sync.
    pub async fn close(&self) -> Result<(), StoreError> {
        let r = self.durable().await;
        if let Ok(mut g) = self.inner.commit_tx.lock() {
            g.take();
        }
        // Wait for the committer to let go of the database, so it can be reopened.
        let handle = self.inner.committer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        r
    }
}

/// The envelopes of a file as stored: id, encoded `Held` record, idempotency key.
fn new_items(envs: Vec<(NewEnvelope, [u8; 32])>) -> Vec<changes::NewItem> {
    envs.into_iter()
        .map(|(env, key)| (env.id, encode(&held_record(env)), key))
        .collect()
}

/// A new envelope's record: `Held`, outside every queue.
fn held_record(env: NewEnvelope) -> OutRecord {
    OutRecord {
        v: 1,
        to: env.to,
        priority: env.priority,
        due_by: env.due_by.timestamp(),
        created: env.created.timestamp(),
        state: OutState::Held,
        attempts: 0,
        last_error: None,
        digest: env.digest.to_vec(),
        subject_key: env.subject_key,
        sealed: Some(serde_bytes::ByteBuf::from(env.sealed)),
        receipt: None,
        peer_audit_head: None,
        finished_at: None,
        // Already past due when queued: intake records it as `late_at_intake` instead.
        deadline_reported: env.due_by < env.created,
        withdraw: None,
    }
}

/// Stores a file's envelopes ([`enqueue_in`] each, in order), inside the caller's transaction:
/// an error aborts it, so all are stored or none.
fn enqueue_file_in(
    envelopes: &sled::transaction::TransactionalTree,
    idem: &sled::transaction::TransactionalTree,
    items: &[changes::NewItem],
) -> Result<Vec<Enqueued>, ConflictableTransactionError<StoreError>> {
    items
        .iter()
        .map(|(id, value, idem_key)| enqueue_in(envelopes, idem, *id, value, idem_key))
        .collect()
}

/// Stores one held envelope unless its idempotency key is known (then: the envelope it names,
/// resumed while still held, else a duplicate).
fn enqueue_in(
    envelopes: &sled::transaction::TransactionalTree,
    idem: &sled::transaction::TransactionalTree,
    id: EnvelopeId,
    value: &[u8],
    idem_key: &[u8; 32],
) -> Result<Enqueued, ConflictableTransactionError<StoreError>> {
    if let Some(existing) = idem.get(idem_key)? {
        let existing = EnvelopeId::from_slice(&existing).map_err(|_| {
            ConflictableTransactionError::Abort(StoreError::Corrupt("idempotency index".into()))
        })?;
        let held = match envelopes.get(existing.as_bytes())? {
            Some(v) => {
                decode::<OutRecord>(existing, &v)
                    .map_err(ConflictableTransactionError::Abort)?
                    .state
                    == OutState::Held
            }
            None => false,
        };
        return Ok(if held {
            Enqueued::Resumed(existing)
        } else {
            Enqueued::Duplicate(existing)
        });
    }
    idem.insert(&idem_key[..], &id.as_bytes()[..])?;
    envelopes.insert(&id.as_bytes()[..], value)?;
    Ok(Enqueued::New(id))
}

/// The record change of a stored receipt: out of the queue, payload kept. A no-op once delivered.
fn receipt_stored(r: &mut OutRecord, receipt: &[u8], peer_audit_head: &str) {
    if r.state != OutState::Delivered {
        r.state = OutState::ReceiptStored;
        r.receipt = Some(serde_bytes::ByteBuf::from(receipt.to_vec()));
        r.peer_audit_head = Some(peer_audit_head.to_owned());
        r.last_error = None;
    }
}

/// The record change of a delivery: receipt kept, payload erased, finished now. Idempotent.
fn delivered(r: &mut OutRecord, receipt: &[u8], peer_audit_head: &str, now: DateTime<Utc>) {
    if r.state != OutState::Delivered {
        r.state = OutState::Delivered;
        r.sealed = None;
        // The receipt stored before (and synced) is the proof of delivery: never replaced.
        if r.receipt.as_ref().is_none_or(|b| b.is_empty()) {
            r.receipt = Some(serde_bytes::ByteBuf::from(receipt.to_vec()));
        }
        r.peer_audit_head = Some(peer_audit_head.to_owned());
        r.finished_at = Some(now.timestamp());
        r.last_error = None;
    }
}

#[cfg(test)]
mod tests;
