//! The housekeeping scans: past-due and non-delivery sweeps over the queue entries, and the
//! receipt purge over the finished index. None of them reads a queued record: each read pulls
//! a sealed envelope into sled's page cache, which sled does not hold to its cap (with 100,000
//! queued and past due, a restarted daemon held 122-254 MB where it now holds 44 MB).

use chrono::{DateTime, Utc};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::index::{finished_key, from_finished_key};
use super::{
    decode, due_from_queue_key, from_queue_value, id_from_queue_key, OutRecord, OutState, Store,
    StoreError,
};
use crate::core::types::EnvelopeId;

impl Store {
    /// Queued envelopes whose `created` is before `cutoff` (candidates for non-delivery),
    /// at most `limit`, across all peers.
    pub fn queued_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<EnvelopeId>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.queue.iter() {
            let (k, v) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            // An older store's entry without `created` falls back to the record.
            let created = match from_queue_value(&v) {
                Some((created, _)) => created,
                None => match self.get(&id)? {
                    Some(rec) => rec.created,
                    None => continue,
                },
            };
            if created < cutoff.timestamp() {
                out.push(id);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Queued envelopes past their `due_by` at `now` whose crossing is not yet recorded, at
    /// most `limit`. Reads a record only when its queue key (which holds `due_by`) is past due
    /// and its value does not say the crossing is on record, so a sweep over a long queue that
    /// is all past due and reported reads no record (see the module doc).
    pub fn newly_past_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.queue.iter() {
            let (k, v) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            if due_from_queue_key(&k).is_some_and(|due| due >= now.timestamp()) {
                continue;
            }
            if from_queue_value(&v).is_some_and(|(_, reported)| reported) {
                continue;
            }
            if let Some(rec) = self.get(&id)? {
                if rec.state == OutState::Queued && !rec.deadline_reported {
                    out.push((id, rec));
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Notes that the envelope's missed deadline is on record (it is reported once).
    pub fn mark_deadline_reported(&self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.update(id, |r| {
            r.deadline_reported = true;
            Ok(())
        })
    }

    /// Finished (delivered or withdrawn) envelopes older than `cutoff`, at most `limit`: the
    /// candidates of the receipt-retention purge, recorded before [`Store::forget`] deletes them.
    /// Walks the finished index oldest first and stops at `cutoff`, so it reads only expired
    /// records (scanning the records themselves pulled every queued sealed envelope into
    /// sled's cache: 100,000 queued took a restarted daemon to over 150 MB).
    pub fn finished_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<EnvelopeId>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.finished.iter() {
            let (k, _) = kv?;
            let Some((at, id)) = from_finished_key(&k) else {
                continue;
            };
            if at >= cutoff.timestamp() {
                break;
            }
            // A hint only: the record says whether it is still there and finished.
            if let Some(rec) = self.get(&id)? {
                if finished_key(&rec, &id).as_deref() == Some(&k[..]) {
                    out.push(id);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes finished envelopes (their erasure is already on record), each with its finished
    /// index key in one transaction. Queued or held ones are never deleted here.
    pub fn forget(&self, ids: &[EnvelopeId]) -> Result<usize, StoreError> {
        let i = &self.inner;
        let _gate = i.gate.read().map_err(|_| StoreError::Closed)?;
        let mut n = 0;
        for id in ids {
            let gone = (&i.envelopes, &i.finished).transaction(|(envelopes, finished)| {
                let Some(v) = envelopes.get(id.as_bytes())? else {
                    return Ok(false);
                };
                let rec: OutRecord = decode(id, &v).map_err(ConflictableTransactionError::Abort)?;
                if !matches!(rec.state, OutState::Delivered | OutState::Withdrawn) {
                    return Ok(false);
                }
                envelopes.remove(id.as_bytes())?;
                if let Some(k) = finished_key(&rec, id) {
                    finished.remove(k)?;
                }
                Ok(true)
            })?;
            n += usize::from(gone);
        }
        Ok(n)
    }
}
