//! Finding envelopes without decoding them all: queue figures read from the queue entries
//! (priority and due time are in the key, `created` in the value), and an index of the rare
//! states an operator or a restart looks for — `[tag][id]` for `NonDelivered`, `ReceiptStored`
//! and `WithdrawPending` — and of finished envelopes by when they finished (`finished_at ‖ id`,
//! for the receipt purge), each written in the same transaction as the record
//! (`Store::update`, `Store::forget`) and built once from the records when a store from before
//! it is opened.
//! Must not: be trusted beyond a hint — every id it yields is re-read and its state checked.

use chrono::{DateTime, TimeZone, Utc};

use super::{
    decode, due_from_queue_key, from_queue_value, id_from_queue_key, queue_prefix, OutRecord,
    OutState, QueueStats, Store, StoreError,
};
use crate::core::types::{AreaId, EnvelopeId, PriorityClass};

/// The rare-state index's completion marker (shorter than any `[tag][id]` key).
pub(super) const STATES_BUILT: &[u8] = b"built";
/// The finished index's completion marker (shorter than any `finished_at ‖ id` key).
pub(super) const INDEX_BUILT: &[u8] = b"built";

/// The index tag of a state operators and restarts look for; `None` for the common states.
pub(super) fn rare_tag(state: OutState) -> Option<u8> {
    match state {
        OutState::NonDelivered => Some(1),
        OutState::ReceiptStored => Some(2),
        OutState::WithdrawPending => Some(3),
        _ => None,
    }
}

/// The finished index's key of a delivered or withdrawn record: `finished_at` (i64 BE, sign
/// bit flipped, so keys sort by time) ‖ id; `None` for any other state.
pub(super) fn finished_key(rec: &OutRecord, id: &EnvelopeId) -> Option<Vec<u8>> {
    if !matches!(rec.state, OutState::Delivered | OutState::Withdrawn) {
        return None;
    }
    let at = rec.finished_at?;
    let mut k = Vec::with_capacity(8 + id.as_bytes().len());
    k.extend_from_slice(&((at as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    Some(k)
}

/// `(finished_at, id)` from a finished index key; `None` for the marker.
pub(super) fn from_finished_key(k: &[u8]) -> Option<(i64, EnvelopeId)> {
    let at = u64::from_be_bytes(k.get(..8)?.try_into().ok()?) ^ (1 << 63);
    let id = EnvelopeId::from_slice(k.get(8..)?).ok()?;
    Some((at as i64, id))
}

pub(super) fn state_key(tag: u8, id: &EnvelopeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

impl Store {
    /// Builds the rare-state and finished indexes from the records, once each, for a store
    /// written before they existed (each marker is written last, so an interrupted build is
    /// redone).
    pub(super) fn build_indexes(&self) -> Result<(), StoreError> {
        let i = &self.inner;
        let states = !i.states.contains_key(STATES_BUILT)?;
        let finished = !i.finished.contains_key(INDEX_BUILT)?;
        if !states && !finished {
            return Ok(());
        }
        for kv in i.envelopes.iter() {
            let (k, v) = kv?;
            let Ok(id) = EnvelopeId::from_slice(&k) else {
                continue;
            };
            let rec: OutRecord = decode(id, &v)?;
            if let Some(tag) = rare_tag(rec.state).filter(|_| states) {
                i.states.insert(state_key(tag, &id), &[][..])?;
            }
            if let Some(key) = finished_key(&rec, &id).filter(|_| finished) {
                i.finished.insert(key, &[][..])?;
            }
        }
        i.states.insert(STATES_BUILT, &[][..])?;
        i.finished.insert(INDEX_BUILT, &[][..])?;
        Ok(())
    }

    /// Counts one peer's queue.
    pub fn queue_stats(&self, to: &AreaId, now: DateTime<Utc>) -> Result<QueueStats, StoreError> {
        let mut s = QueueStats::default();
        for kv in self.inner.queue.scan_prefix(queue_prefix(to)) {
            let (k, v) = kv?;
            let Some(id) = id_from_queue_key(&k) else {
                continue;
            };
            // Priority, due time (key) and created (value) without decoding the record; entries
            // written before the value carried `created` fall back to the record.
            let from_key = (|| {
                let priority = *k.get(k.len().checked_sub(25)?)?;
                let due = due_from_queue_key(&k)?;
                let (created, _) = from_queue_value(&v)?;
                Some((priority == 0, due, created))
            })();
            let (enhanced, due, created) = match from_key {
                Some(t) => t,
                None => {
                    let Some(rec) = self.get(&id)? else { continue };
                    (
                        rec.priority == PriorityClass::Enhanced,
                        rec.due_by,
                        rec.created,
                    )
                }
            };
            s.queued += 1;
            if enhanced {
                s.enhanced += 1;
            }
            if due < now.timestamp() {
                s.past_due += 1;
            }
            let created = Utc.timestamp_opt(created, 0).single().unwrap_or_default();
            if s.oldest_created.is_none_or(|o| created < o) {
                s.oldest_created = Some(created);
            }
        }
        Ok(s)
    }

    /// Envelopes in state `NonDelivered` (for status and operators).
    pub fn non_delivered(&self, limit: usize) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut all = self.in_state(OutState::NonDelivered)?;
        all.truncate(limit);
        Ok(all)
    }

    /// Envelopes to `to` whose receipt is stored but not yet completed (a crash came between
    /// [`Self::store_receipt_durably`] and [`Self::mark_delivered`]). A full scan of the envelope
    /// records: run once per peer at start-up.
    pub fn receipts_stored(&self, to: &AreaId) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut all = self.in_state(OutState::ReceiptStored)?;
        all.retain(|(_, r)| &r.to == to);
        Ok(all)
    }

    /// Every envelope in `state`: through the rare-state index for `NonDelivered`,
    /// `ReceiptStored` and `WithdrawPending`; a full scan of the records for any other state.
    pub fn in_state(&self, state: OutState) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        let mut out = Vec::new();
        let Some(tag) = rare_tag(state) else {
            for kv in self.inner.envelopes.iter() {
                let (k, v) = kv?;
                let Ok(id) = EnvelopeId::from_slice(&k) else {
                    continue;
                };
                let rec: OutRecord = decode(id, &v)?;
                if rec.state == state {
                    out.push((id, rec));
                }
            }
            return Ok(out);
        };
        for kv in self.inner.states.scan_prefix([tag]) {
            let (k, _) = kv?;
            let Ok(id) = EnvelopeId::from_slice(&k[1..]) else {
                continue;
            };
            if let Some(rec) = self.get(&id)? {
                if rec.state == state {
                    out.push((id, rec));
                }
            }
        }
        Ok(out)
    }
}
