//! Record changes: one function writes a changed [`OutRecord`] with its queue entry and index
//! keys inside a transaction, for a caller's own transaction ([`Store::update`]) or for the
//! committer's shared one.
//!
//! Why the committer applies the hot changes: every sled transaction writes sled's log buffer
//! out twice (sled rolls the buffer before and after a batch), each write a job for sled's I/O
//! pool, whose every job wakes all seven of its waiting threads, and a `sync_file_range` that
//! waits for the device. Measured on the 2,000-file bench: ~9 such writes per referral, sled's
//! pool ~16 % of both daemons' CPU. So the changes that are synced at once anyway — intake's
//! release, the sender's stored receipt and its erasure after the receipt — are sent to the
//! committer ([`Store::release_durably`], [`Store::store_receipt_durably`],
//! [`Store::mark_delivered_soon`]), which applies all that arrived while it last synced in as
//! few transactions as the bound below allows, then flushes and syncs once. Each change keeps
//! its own outcome: one that finds no record fails alone, with no write, and never aborts the
//! others.
//! Intake's new envelopes go the same way ([`Store::enqueue_all_durably`]): storing a file's
//! envelopes in a transaction of their own cost two more log-buffer writes per file. A file's
//! envelopes are all stored or none: an enqueue that fails inside the shared transaction aborts
//! it, and the committer then applies each job in a transaction of its own, so the failure stays
//! with its file.
//! A round's jobs go into transactions of at most [`WRITES_PER_TRANSACTION`] records each (a job
//! is never split), all synced once. Why: sled copies a leaf for every write into it, and a
//! transaction keeps every copy it made until it ends, so one transaction of a whole round grew
//! with the round — after a slow sync on a loaded host, hundreds of records, and a national
//! node's heap rose by ~10 MB within 0.2 s (heaptrack of every node: sled leaf copies, log
//! buffers and values of one committer transaction).
//! Must not: decide what a change does (callers pass it in) or sync (the committer does).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use sled::Transactional;
use tokio::sync::oneshot;

use super::index::{finished_key, rare_tag, state_key};
use super::{
    decode, encode, enqueue_file_in, queue_key, queue_value, Enqueued, NewEnvelope, OutRecord,
    OutState, Store, StoreError,
};
use crate::core::types::EnvelopeId;

/// A change to one record; may run more than once (sled retries a conflicting transaction).
pub(super) type Change = Box<dyn Fn(&mut OutRecord) + Send>;

/// What the committer is sent. Every job is answered once the sync of its round has ended.
pub(super) enum Job {
    /// Wait for a sync that starts after the call.
    Sync(super::Waiter),
    /// Apply these changes in the round's transaction, then sync. `release`: the ids are in the
    /// pending set until that sync has ended. No waiter: nobody waits, a failure is logged.
    Apply {
        changes: Vec<(EnvelopeId, Change)>,
        release: bool,
        done: Option<super::Waiter>,
    },
    /// Store a file's new envelopes (`Held`) unless their idempotency keys are known: all or
    /// none, in the round's transaction, answered once synced.
    Enqueue {
        items: Vec<NewItem>,
        done: oneshot::Sender<Result<Vec<Enqueued>, StoreError>>,
    },
}

/// A new envelope as stored: its id, its encoded `Held` record, its idempotency key.
pub(super) type NewItem = (EnvelopeId, Vec<u8>, [u8; 32]);

/// What one job's part of a round came to.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A sync: nothing applied.
    Nothing,
    /// One outcome per change, in order.
    Changed(Vec<Result<(), StoreError>>),
    /// The file's envelopes: all stored (or found by their keys), or an error and none.
    Enqueued(Result<Vec<Enqueued>, StoreError>),
}

impl Outcome {
    /// The outcome of `job` when its transaction failed with `e`: nothing of it was written.
    fn failed(job: &Job, e: &StoreError) -> Self {
        match job {
            Job::Sync(_) => Self::Nothing,
            Job::Apply { changes, .. } => Self::Changed(vec![Err(e.clone()); changes.len()]),
            Job::Enqueue { .. } => Self::Enqueued(Err(e.clone())),
        }
    }
}

/// The trees a record change touches, handed to the committer.
#[derive(Clone)]
pub(super) struct Tables {
    pub envelopes: sled::Tree,
    pub idem: sled::Tree,
    pub queue: sled::Tree,
    pub states: sled::Tree,
    pub finished: sled::Tree,
    pub gate: Arc<std::sync::RwLock<()>>,
    /// Transactions made on these trees (tests and benchmarks).
    pub transactions: Arc<std::sync::atomic::AtomicU64>,
}

/// envelopes, queue, states, finished: the trees of a record change, inside a transaction.
pub(super) type TxTrees<'a> = (
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
);

/// Reads `id`'s record, applies `f` and writes the record with its queue entry and index keys
/// (envelopes, queue, states, finished). The outer error is sled's (the transaction is retried
/// or fails); the inner one is the change's own, with nothing written.
pub(super) fn change_in<T>(
    (envelopes, queue, states, finished): TxTrees<'_>,
    id: &EnvelopeId,
    f: &dyn Fn(&mut OutRecord) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, UnabortableTransactionError> {
    let Some(v) = envelopes.get(id.as_bytes())? else {
        return Ok(Err(StoreError::NotFound(*id)));
    };
    let mut rec: OutRecord = match decode(id, &v) {
        Ok(rec) => rec,
        Err(e) => return Ok(Err(e)),
    };
    // A queued envelope's entry carries `created` and the deadline flag, so queue figures and
    // sweeps need no record decode.
    let was_entry = (rec.state == OutState::Queued).then(|| queue_value(&rec));
    let was_tag = rare_tag(rec.state);
    let was_finished = finished_key(&rec, id);
    let qk = queue_key(&rec.to, rec.priority, rec.due_by, id);
    let out = match f(&mut rec) {
        Ok(out) => out,
        Err(e) => return Ok(Err(e)),
    };
    let entry = (rec.state == OutState::Queued).then(|| queue_value(&rec));
    if entry != was_entry {
        match entry {
            Some(v) => queue.insert(qk, v)?,
            None => queue.remove(qk)?,
        };
    }
    let tag = rare_tag(rec.state);
    if tag != was_tag {
        if let Some(t) = was_tag {
            states.remove(state_key(t, id))?;
        }
        if let Some(t) = tag {
            states.insert(state_key(t, id), &[][..])?;
        }
    }
    let fin = finished_key(&rec, id);
    if fin != was_finished {
        if let Some(k) = was_finished {
            finished.remove(k)?;
        }
        if let Some(k) = fin {
            finished.insert(k, &[][..])?;
        }
    }
    envelopes.insert(&id.as_bytes()[..], encode(&rec))?;
    Ok(Ok(out))
}

/// Records (envelopes stored, records changed) one transaction writes at most, unless one job
/// alone has more: a file's envelopes stay all or none.
pub(super) const WRITES_PER_TRANSACTION: usize = 64;

impl Job {
    /// The records this job writes.
    fn writes(&self) -> usize {
        match self {
            Job::Sync(_) => 0,
            Job::Apply { changes, .. } => changes.len(),
            Job::Enqueue { items, .. } => items.len(),
        }
    }
}

/// The jobs of a round (`writes`: the records each writes) cut, in order, into runs that write
/// at most `limit` records each; a job with more than `limit` is a run of its own.
pub(super) fn runs(writes: &[usize], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, &w) in writes.iter().enumerate() {
        if i > start && sum + w > limit {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += w;
    }
    if start < writes.len() {
        out.push(start..writes.len());
    }
    out
}

impl Tables {
    /// Applies the jobs' writes in transactions of at most [`WRITES_PER_TRANSACTION`] records;
    /// one outcome per job, in order.
    pub(super) fn apply(&self, jobs: &[Job]) -> Vec<Outcome> {
        let writes: Vec<usize> = jobs.iter().map(Job::writes).collect();
        runs(&writes, WRITES_PER_TRANSACTION)
            .into_iter()
            .flat_map(|r| self.apply_together(&jobs[r]))
            .collect()
    }

    /// Applies every job's writes in ONE transaction; one outcome per job, in order. When an
    /// enqueue fails (which aborts the shared transaction, a file being all or nothing), each
    /// job is applied again in a transaction of its own, so only that file fails.
    fn apply_together(&self, jobs: &[Job]) -> Vec<Outcome> {
        if jobs.iter().all(|j| matches!(j, Job::Sync(_))) {
            return jobs.iter().map(|_| Outcome::Nothing).collect();
        }
        match self.transact(jobs) {
            Ok(out) => out,
            Err(_) if jobs.len() > 1 => jobs
                .iter()
                .map(|j| match j {
                    Job::Sync(_) => Outcome::Nothing,
                    _ => match self.transact(std::slice::from_ref(j)) {
                        Ok(mut one) => one.pop().unwrap_or(Outcome::Nothing),
                        Err(e) => Outcome::failed(j, &e),
                    },
                })
                .collect(),
            Err(e) => jobs.iter().map(|j| Outcome::failed(j, &e)).collect(),
        }
    }

    /// `jobs`' writes in one transaction. `Err`: it failed or an enqueue aborted it; nothing
    /// was written.
    fn transact(&self, jobs: &[Job]) -> Result<Vec<Outcome>, StoreError> {
        let _gate = self.gate.read().map_err(|_| StoreError::Closed)?;
        self.transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = (
            &self.envelopes,
            &self.queue,
            &self.states,
            &self.finished,
            &self.idem,
        );
        let out = t.transaction(|(envelopes, queue, states, finished, idem)| {
            let trees = (envelopes, queue, states, finished);
            let mut outcomes = Vec::with_capacity(jobs.len());
            for job in jobs {
                outcomes.push(match job {
                    Job::Sync(_) => Outcome::Nothing,
                    Job::Apply { changes, .. } => {
                        let mut each = Vec::with_capacity(changes.len());
                        for (id, change) in changes {
                            let apply = |r: &mut OutRecord| {
                                change(r);
                                Ok(())
                            };
                            each.push(change_in(trees, id, &apply)?);
                        }
                        Outcome::Changed(each)
                    }
                    Job::Enqueue { items, .. } => {
                        Outcome::Enqueued(Ok(enqueue_file_in(envelopes, idem, items)?))
                    }
                });
            }
            Ok(outcomes)
        })?;
        Ok(out)
    }
}

pub(super) fn release_change() -> Change {
    Box::new(|r: &mut OutRecord| {
        if r.state == OutState::Held {
            r.state = OutState::Queued;
        }
    })
}

impl Store {
    fn submit(
        &self,
        changes: Vec<(EnvelopeId, Change)>,
        release: bool,
        done: Option<super::Waiter>,
    ) -> Result<(), StoreError> {
        self.send_job(Job::Apply {
            changes,
            release,
            done,
        })
    }

    async fn apply_durably(
        &self,
        changes: Vec<(EnvelopeId, Change)>,
        release: bool,
    ) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(changes, release, Some(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::enqueue_all`] applied by the committer in its shared transaction (all of the
    /// file's envelopes or none); returns once synced.
    pub async fn enqueue_all_durably(
        &self,
        envs: Vec<(NewEnvelope, [u8; 32])>,
    ) -> Result<Vec<Enqueued>, StoreError> {
        let items = super::new_items(envs);
        let (tx, rx) = oneshot::channel();
        self.send_job(Job::Enqueue { items, done: tx })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::release`] applied by the committer with whatever else is waiting, in one
    /// transaction; returns once synced. The ids stay out of [`Store::next_queued`] until then.
    pub async fn release_durably(&self, ids: &[EnvelopeId]) -> Result<(), StoreError> {
        {
            let mut pending = self.pending_lock()?;
            for id in ids {
                pending.ids.insert(*id, super::WRITING);
            }
        }
        let changes = ids.iter().map(|id| (*id, release_change())).collect();
        let out = self.apply_durably(changes, true).await;
        if out.is_err() {
            // Not released (or the committer is gone): nothing to keep out of the queue.
            let mut pending = self.pending_lock()?;
            for id in ids {
                pending.ids.remove(id);
            }
        }
        out
    }

    /// Stores a verified receipt and takes the envelope out of its queue (`ReceiptStored`),
    /// before its receipt and erasure records are written; the payload stays until
    /// [`Store::mark_delivered_soon`]. A no-op on an envelope already delivered. Applied by the
    /// committer in its shared transaction; returns once synced.
    pub async fn store_receipt_durably(
        &self,
        id: &EnvelopeId,
        receipt: &[u8],
        peer_audit_head: &str,
    ) -> Result<(), StoreError> {
        let (receipt, head) = (receipt.to_vec(), peer_audit_head.to_owned());
        let change: Change = Box::new(move |r: &mut OutRecord| {
            super::receipt_stored(r, &receipt, &head);
        });
        self.apply_durably(vec![(*id, change)], false).await
    }

    /// [`Store::mark_delivered`] left to the committer's next round, not waited for: a crash
    /// before that round's sync leaves the envelope `ReceiptStored`, which the sender completes
    /// at its next start (as after a crash before an awaited sync). A failure is logged.
    pub fn mark_delivered_soon(
        &self,
        id: &EnvelopeId,
        receipt: &[u8],
        peer_audit_head: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (receipt, head) = (receipt.to_vec(), peer_audit_head.to_owned());
        let change: Change = Box::new(move |r: &mut OutRecord| {
            super::delivered(r, &receipt, &head, now);
        });
        self.submit(vec![(*id, change)], false, None)
    }
}
