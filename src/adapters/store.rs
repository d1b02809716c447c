//! The node's durable state in sled: the sender's queue of sealed envelopes with their delivery
//! state, the intake idempotency index, and the receiver's memory of accepted envelope ids.
//!
//! Layout (format version 1; every value is CBOR starting with `v: 1`):
//! - tree `envelopes`: envelope id (16 bytes) → [`OutRecord`] (state, sealed bytes until a receipt
//!   arrives, then the receipt instead).
//! - tree `queue`: `to-area ‖ 0x00 ‖ priority (0 enhanced, 1 standard) ‖ due_by (u64 BE, sign bit
//!   flipped) ‖ id` → empty. Only envelopes in state `Queued` have a key, so a prefix scan per peer
//!   yields its queue in delivery order (priority class first, then oldest `due_by`) without
//!   loading the whole outbox into memory.
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
//! before `durable()` returns.
//! Visibility: sled shows a write to readers at once, before any sync. An envelope that
//! [`Store::enqueue`] has written is therefore kept out of [`Store::next_queued`] (so it cannot be
//! sent) until a commit that started after the write has synced: otherwise it could be sent and
//! accepted while its record and idempotency key were only in memory, a crash or power cut would
//! lose both, intake would read the outbox file again under a new envelope id, and the receiver
//! (dedup by envelope id) would deliver the referral twice. The pending set lives in memory only:
//! after a restart everything in sled came from the device.
//! Crash safety: every multi-tree change is one sled transaction, so after a crash a record is
//! either fully queued (envelope + queue key + idempotency key) or absent.
//! Must not: know about files, the network, or how envelopes are made.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
mod export;
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
    /// Waiting in its peer's queue.
    Queued,
    /// Undelivered past the non-delivery window, or refused by the peer: kept for an operator.
    NonDelivered,
    /// A valid signed receipt is stored; the payload is erased.
    Delivered,
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

/// The result of queueing: new, or a duplicate of an envelope queued earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    New(EnvelopeId),
    Duplicate(EnvelopeId),
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
    commit_tx: std::sync::Mutex<Option<mpsc::Sender<Waiter>>>,
    syncs: Arc<AtomicU64>,
    committer: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    pending: Arc<std::sync::Mutex<Pending>>,
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

impl Store {
    /// Opens (or creates) the store in `dir` and starts its committer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .flush_every_ms(None)
            .open()?;
        let (commit_tx, commit_rx) = mpsc::channel::<Waiter>();
        let syncs = Arc::new(AtomicU64::new(0));
        let path = dir.to_owned();
        let db2 = db.clone();
        let syncs2 = syncs.clone();
        let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
        let pending2 = pending.clone();
        let handle = thread::Builder::new()
            .name("refex-store-commit".into())
            .spawn(move || committer(db2, path, commit_rx, syncs2, pending2))
            .map_err(|e| StoreError::Sled {
                message: format!("cannot start committer: {e}"),
                disk_full: false,
            })?;
        let inner = Inner {
            envelopes: db.open_tree("envelopes")?,
            queue: db.open_tree("queue")?,
            idem: db.open_tree("idem")?,
            seen: db.open_tree("seen")?,
            referrals: db.open_tree("referrals")?,
            _db: db.clone(),
            commit_tx: std::sync::Mutex::new(Some(commit_tx)),
            syncs,
            committer: std::sync::Mutex::new(Some(handle)),
            pending,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Returns once everything written before the call is on the device.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self
                .inner
                .commit_tx
                .lock()
                .map_err(|_| StoreError::Closed)?;
            guard
                .as_ref()
                .ok_or(StoreError::Closed)?
                .send(tx)
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// How many device syncs the committer has made (tests and benchmarks).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Queues a sealed envelope unless `idem_key` was seen before. Not yet durable: call
    /// [`Store::durable`] before acknowledging. Not sendable either: [`Store::next_queued`]
    /// skips it until a sync that covers it has finished.
    pub fn enqueue(&self, env: NewEnvelope, idem_key: &[u8; 32]) -> Result<Enqueued, StoreError> {
        let i = &self.inner;
        let rec = OutRecord {
            v: 1,
            to: env.to.clone(),
            priority: env.priority,
            due_by: env.due_by.timestamp(),
            created: env.created.timestamp(),
            state: OutState::Queued,
            attempts: 0,
            last_error: None,
            digest: env.digest.to_vec(),
            subject_key: env.subject_key,
            sealed: Some(serde_bytes::ByteBuf::from(env.sealed)),
            receipt: None,
            peer_audit_head: None,
            finished_at: None,
        };
        let value = encode(&rec);
        let qk = queue_key(&env.to, env.priority, rec.due_by, &env.id);
        let id = env.id;
        // Marked before the write can be seen, so no scan finds it unmarked.
        self.pending_lock()?.ids.insert(id, WRITING);
        let out = (&i.envelopes, &i.queue, &i.idem).transaction(|(envelopes, queue, idem)| {
            if let Some(existing) = idem.get(idem_key)? {
                let existing = EnvelopeId::from_slice(&existing).map_err(|_| {
                    ConflictableTransactionError::Abort(StoreError::Corrupt(
                        "idempotency index".into(),
                    ))
                })?;
                return Ok(Enqueued::Duplicate(existing));
            }
            idem.insert(&idem_key[..], &id.as_bytes()[..])?;
            envelopes.insert(&id.as_bytes()[..], value.clone())?;
            queue.insert(qk.clone(), &[][..])?;
            Ok(Enqueued::New(id))
        });
        let mut pending = self.pending_lock()?;
        match out {
            Ok(Enqueued::New(_)) => {
                // The write is complete: any commit that starts from here on covers it.
                pending.issued += 1;
                let ticket = pending.issued;
                pending.ids.insert(id, ticket);
            }
            _ => {
                pending.ids.remove(&id);
            }
        }
        Ok(out?)
    }

    fn pending_lock(&self) -> Result<std::sync::MutexGuard<'_, Pending>, StoreError> {
        self.inner.pending.lock().map_err(|_| StoreError::Closed)
    }

    /// True while `id` was enqueued but no sync covering it has finished.
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
    /// and any envelope whose enqueue is not yet synced.
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

    /// Counts one peer's queue.
    pub fn queue_stats(&self, to: &AreaId, now: DateTime<Utc>) -> Result<QueueStats, StoreError> {
        let mut s = QueueStats::default();
        for kv in self.inner.queue.scan_prefix(queue_prefix(to)) {
            let (k, _) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            let Some(rec) = self.get(&id)? else { continue };
            s.queued += 1;
            if rec.priority == PriorityClass::Enhanced {
                s.enhanced += 1;
            }
            if rec.due_by < now.timestamp() {
                s.past_due += 1;
            }
            let created = rec.created_at();
            if s.oldest_created.is_none_or(|o| created < o) {
                s.oldest_created = Some(created);
            }
        }
        Ok(s)
    }

    /// Envelopes in state `NonDelivered` (for status and operators).
    pub fn non_delivered(&self, limit: usize) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.envelopes.iter() {
            let (k, v) = kv?;
            let Ok(id) = EnvelopeId::from_slice(&k) else {
                continue;
            };
            let rec: OutRecord = decode(id, &v)?;
            if rec.state == OutState::NonDelivered {
                out.push((id, rec));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn update<T>(
        &self,
        id: &EnvelopeId,
        f: impl Fn(&mut OutRecord) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let i = &self.inner;
        let out = (&i.envelopes, &i.queue).transaction(|(envelopes, queue)| {
            let Some(v) = envelopes.get(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(StoreError::NotFound(
                    *id,
                )));
            };
            let mut rec: OutRecord = decode(id, &v).map_err(ConflictableTransactionError::Abort)?;
            let was_queued = rec.state == OutState::Queued;
            let qk = queue_key(&rec.to, rec.priority, rec.due_by, id);
            let out = f(&mut rec).map_err(ConflictableTransactionError::Abort)?;
            match (was_queued, rec.state == OutState::Queued) {
                (true, false) => {
                    queue.remove(qk)?;
                }
                (false, true) => {
                    queue.insert(qk, &[][..])?;
                }
                _ => {}
            }
            envelopes.insert(&id.as_bytes()[..], encode(&rec))?;
            Ok(out)
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
            if r.state != OutState::Delivered {
                r.state = OutState::Delivered;
                r.sealed = None;
                r.receipt = Some(serde_bytes::ByteBuf::from(receipt.to_vec()));
                r.peer_audit_head = Some(peer_audit_head.to_owned());
                r.finished_at = Some(now.timestamp());
                r.last_error = None;
            }
            Ok(r.clone())
        })
    }

    /// Takes a queued envelope out of its queue and keeps it for an operator.
    pub fn mark_non_delivered(&self, id: &EnvelopeId, reason: &str) -> Result<(), StoreError> {
        self.update(id, |r| {
            if r.state == OutState::Queued {
                r.state = OutState::NonDelivered;
                r.last_error = Some(reason.chars().take(200).collect());
            }
            Ok(())
        })
    }

    /// Puts a non-delivered envelope back in its queue (operator action).
    pub fn requeue(&self, id: &EnvelopeId) -> Result<OutRecord, StoreError> {
        self.update(id, |r| match r.state {
            OutState::NonDelivered | OutState::Queued => {
                r.state = OutState::Queued;
                // The non-delivery window restarts from the operator's decision.
                r.created = Utc::now().timestamp();
                Ok(r.clone())
            }
            state => Err(StoreError::WrongState {
                id: *id,
                state,
                action: "requeue",
            }),
        })
    }

    /// Withdraws an undelivered envelope and erases its payload (operator action).
    pub fn withdraw(&self, id: &EnvelopeId, now: DateTime<Utc>) -> Result<OutRecord, StoreError> {
        self.update(id, |r| match r.state {
            OutState::NonDelivered | OutState::Queued => {
                r.state = OutState::Withdrawn;
                r.sealed = None;
                r.finished_at = Some(now.timestamp());
                Ok(r.clone())
            }
            state => Err(StoreError::WrongState {
                id: *id,
                state,
                action: "withdraw",
            }),
        })
    }

    /// Queued envelopes whose `created` is before `cutoff` (candidates for non-delivery),
    /// at most `limit`, across all peers.
    pub fn queued_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<EnvelopeId>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.queue.iter() {
            let (k, _) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            if let Some(rec) = self.get(&id)? {
                if rec.created < cutoff.timestamp() {
                    out.push(id);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Forgets finished (delivered or withdrawn) envelopes older than `cutoff`; returns their ids.
    pub fn purge_finished(&self, cutoff: DateTime<Utc>) -> Result<Vec<EnvelopeId>, StoreError> {
        let mut gone = Vec::new();
        for kv in self.inner.envelopes.iter() {
            let (k, v) = kv?;
            let Ok(id) = EnvelopeId::from_slice(&k) else {
                continue;
            };
            let rec: OutRecord = decode(id, &v)?;
            let finished = matches!(rec.state, OutState::Delivered | OutState::Withdrawn);
            if finished && rec.finished_at.is_some_and(|t| t < cutoff.timestamp()) {
                self.inner.envelopes.remove(&k)?;
                gone.push(id);
            }
        }
        Ok(gone)
    }

    // --- receiver side ---

    /// The receiver's record of an accepted envelope, if any.
    pub fn seen(&self, id: &EnvelopeId) -> Result<Option<SeenRecord>, StoreError> {
        match self.inner.seen.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    /// Remembers an accepted envelope with its receipt. Not durable until [`Store::durable`].
    pub fn put_seen(&self, id: &EnvelopeId, rec: &SeenRecord) -> Result<(), StoreError> {
        self.inner.seen.insert(id.as_bytes(), encode(rec))?;
        Ok(())
    }

    /// The envelope that already delivered the referral `subject` from `from`, if any.
    pub fn delivered_referral(
        &self,
        from: &AreaId,
        subject: &str,
    ) -> Result<Option<EnvelopeId>, StoreError> {
        let Some(v) = self.inner.referrals.get(referral_key(from, subject))? else {
            return Ok(None);
        };
        let id = v
            .get(..16)
            .and_then(|b| EnvelopeId::from_slice(b).ok())
            .ok_or_else(|| StoreError::Corrupt("referral record".into()))?;
        Ok(Some(id))
    }

    /// Remembers that envelope `id` delivered the referral `subject` from `from`. Written after
    /// its `seen` record and made durable with it by the same [`Store::durable`].
    pub fn remember_referral(
        &self,
        from: &AreaId,
        subject: &str,
        id: &EnvelopeId,
        received_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut v = id.as_bytes().to_vec();
        v.extend_from_slice(&received_at.timestamp().to_be_bytes());
        self.inner
            .referrals
            .insert(referral_key(from, subject), v)?;
        Ok(())
    }

    /// Accepted envelopes whose inbox file was staged but maybe not yet published.
    pub fn seen_unpublished(&self) -> Result<Vec<(EnvelopeId, SeenRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.seen.iter() {
            let (k, v) = kv?;
            let Ok(id) = EnvelopeId::from_slice(&k) else {
                continue;
            };
            let rec: SeenRecord = decode(id, &v)?;
            if !rec.published {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// Forgets accepted ids older than `cutoff` (end of the dedup window).
    pub fn purge_seen(&self, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.inner.seen.iter() {
            let (k, v) = kv?;
            let rec: SeenRecord = decode("seen id", &v)?;
            if rec.published && rec.received_at < cutoff.timestamp() {
                self.inner.seen.remove(&k)?;
                n += 1;
            }
        }
        for kv in self.inner.referrals.iter() {
            let (k, v) = kv?;
            let at = v
                .get(16..24)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_be_bytes);
            if at.is_some_and(|t| t < cutoff.timestamp()) {
                self.inner.referrals.remove(&k)?;
            }
        }
        Ok(n)
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

/// The group-commit loop: take every waiter that has arrived, flush and sync once, answer all.
fn committer(
    db: sled::Db,
    dir: PathBuf,
    rx: mpsc::Receiver<Waiter>,
    syncs: Arc<AtomicU64>,
    pending: Arc<std::sync::Mutex<Pending>>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        // Every enqueue that finished before this point is in what the flush below writes.
        let upto = pending.lock().map(|p| p.issued).unwrap_or(0);
        let result = db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| sync_files(&dir));
        syncs.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            if let Ok(mut p) = pending.lock() {
                p.covered(upto);
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn sync_error(e: std::io::Error) -> StoreError {
    let disk_full = crate::adapters::durable::is_disk_full(&e);
    StoreError::Sync {
        message: e.to_string(),
        disk_full,
    }
}

/// fdatasync sled's log file and any blob files (sled writes values over its blob threshold to
/// their own files and does not sync them).
fn sync_files(dir: &Path) -> Result<(), StoreError> {
    File::open(dir.join("db"))
        .and_then(|f| f.sync_data())
        .map_err(sync_error)?;
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        let mut any = false;
        for e in entries.flatten() {
            File::open(e.path())
                .and_then(|f| f.sync_data())
                .map_err(sync_error)?;
            any = true;
        }
        if any {
            File::open(&blobs)
                .and_then(|f| f.sync_all())
                .map_err(sync_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(s: &str) -> AreaId {
        s.parse().unwrap()
    }

    fn env(to: &str, priority: PriorityClass, due_secs: i64) -> NewEnvelope {
        NewEnvelope {
            id: EnvelopeId::generate(),
            to: area(to),
            priority,
            due_by: Utc.timestamp_opt(due_secs, 0).unwrap(),
            created: Utc::now(),
            sealed: vec![1, 2, 3],
            digest: [7; 32],
            subject_key: None,
        }
    }

    #[tokio::test]
    async fn the_queue_yields_priority_first_then_oldest_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let late_std = env("london", PriorityClass::Standard, 3_000);
        let early_std = env("london", PriorityClass::Standard, 1_000);
        let late_enh = env("london", PriorityClass::Enhanced, 5_000);
        let other_peer = env("kent", PriorityClass::Enhanced, 1);
        let ids = [late_enh.id, early_std.id, late_std.id];
        for (i, e) in [late_std, early_std, late_enh, other_peer]
            .into_iter()
            .enumerate()
        {
            store.enqueue(e, &[i as u8; 32]).unwrap();
        }
        store.durable().await.unwrap();
        let got: Vec<_> = store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(got, ids);
    }

    #[tokio::test]
    async fn the_same_idempotency_key_queues_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = env("london", PriorityClass::Standard, 1);
        let first_id = first.id;
        assert_eq!(
            store.enqueue(first, &[9; 32]).unwrap(),
            Enqueued::New(first_id)
        );
        let again = env("london", PriorityClass::Standard, 1);
        assert_eq!(
            store.enqueue(again, &[9; 32]).unwrap(),
            Enqueued::Duplicate(first_id)
        );
        store.durable().await.unwrap();
        assert_eq!(
            store
                .next_queued(&area("london"), 10, &HashSet::new())
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn delivery_erases_the_payload_and_leaves_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let e = env("london", PriorityClass::Standard, 1);
        let id = e.id;
        store.enqueue(e, &[1; 32]).unwrap();
        let rec = store
            .mark_delivered(&id, b"receipt", "head", Utc::now())
            .unwrap();
        assert_eq!(rec.state, OutState::Delivered);
        assert!(rec.sealed.is_none());
        assert!(store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .is_empty());
        assert!(
            store.requeue(&id).is_err(),
            "a delivered envelope cannot be requeued"
        );
    }

    #[tokio::test]
    async fn non_delivered_envelopes_can_be_requeued_or_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (
            env("london", PriorityClass::Standard, 1),
            env("london", PriorityClass::Standard, 2),
        );
        let (ida, idb) = (a.id, b.id);
        store.enqueue(a, &[1; 32]).unwrap();
        store.enqueue(b, &[2; 32]).unwrap();
        store.durable().await.unwrap();
        store.mark_non_delivered(&ida, "window passed").unwrap();
        store.mark_non_delivered(&idb, "window passed").unwrap();
        assert_eq!(store.non_delivered(10).unwrap().len(), 2);
        assert!(store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .is_empty());
        store.requeue(&ida).unwrap();
        store.withdraw(&idb, Utc::now()).unwrap();
        let queued = store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].0, ida);
        assert!(store.get(&idb).unwrap().unwrap().sealed.is_none());
    }

    #[tokio::test]
    async fn queued_envelopes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = Store::open(dir.path()).unwrap();
            let e = env("london", PriorityClass::Standard, 1);
            let id = e.id;
            store.enqueue(e, &[1; 32]).unwrap();
            store.close().await.unwrap();
            id
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .next_queued(&area("london"), 10, &HashSet::new())
                .unwrap()[0]
                .0,
            id
        );
    }

    #[tokio::test]
    async fn an_envelope_is_not_sendable_until_its_enqueue_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let london = area("london");
        let e = env("london", PriorityClass::Standard, 1);
        let id = e.id;
        store.enqueue(e, &[1; 32]).unwrap();
        assert!(store.is_pending(&id));
        assert!(
            store
                .next_queued(&london, 10, &HashSet::new())
                .unwrap()
                .is_empty(),
            "an unsynced envelope must not be offered to the sender"
        );
        // It is stored (a re-read of its outbox file sees the idempotency key) and counted.
        assert!(store.get(&id).unwrap().is_some());
        assert_eq!(store.queue_stats(&london, Utc::now()).unwrap().queued, 1);
        store.durable().await.unwrap();
        assert!(!store.is_pending(&id));
        let got = store.next_queued(&london, 10, &HashSet::new()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, id);
    }

    #[tokio::test]
    async fn a_sync_covers_only_enqueues_finished_before_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let london = area("london");
        let a = env("london", PriorityClass::Standard, 1);
        let ida = a.id;
        store.enqueue(a, &[1; 32]).unwrap();
        store.durable().await.unwrap();
        let b = env("london", PriorityClass::Standard, 2);
        let idb = b.id;
        store.enqueue(b, &[2; 32]).unwrap();
        let ids: Vec<_> = store
            .next_queued(&london, 10, &HashSet::new())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [ida], "b was written after the last sync");
        // A duplicate enqueue leaves nothing pending behind.
        let c = env("london", PriorityClass::Standard, 3);
        let idc = c.id;
        assert_eq!(
            store.enqueue(c, &[1; 32]).unwrap(),
            Enqueued::Duplicate(ida)
        );
        assert!(!store.is_pending(&idc));
        store.durable().await.unwrap();
        assert_eq!(
            store
                .next_queued(&london, 10, &HashSet::new())
                .unwrap()
                .len(),
            2
        );
        assert!(!store.is_pending(&idb));
    }

    #[tokio::test]
    async fn concurrent_waiters_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut e = env("london", PriorityClass::Standard, 1);
                e.sealed = i.to_be_bytes().to_vec();
                let mut key = [0; 32];
                key[..4].copy_from_slice(&i.to_be_bytes());
                store.enqueue(e, &key).unwrap();
                store.durable().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            store.sync_count() < 200,
            "{} syncs for 200 waiters",
            store.sync_count()
        );
        assert_eq!(
            store
                .queue_stats(&area("london"), Utc::now())
                .unwrap()
                .queued,
            200
        );
    }
}
