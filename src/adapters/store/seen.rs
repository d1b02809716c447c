//! The receiver's side of the store: accepted envelope ids (`seen`) and the end-to-end referral
//! index (`referrals`), with their retention purge. See the layout in the parent module.
//!
//! `seen` keys are `from-area ‖ 0x00 ‖ envelope id (16 bytes)`: the same id from two senders
//! is two records. State format 1 keyed by the bare id (16 bytes); such records are still read
//! (for the sender they name) and are moved to the new key when next written.

use chrono::{DateTime, Utc};

use super::{decode, encode, referral_key, SeenRecord, Store, StoreError};
use crate::core::types::{AreaId, EnvelopeId};

impl Store {
    /// The receiver's record of envelope `id` accepted from `from`, if any.
    pub fn seen(&self, from: &AreaId, id: &EnvelopeId) -> Result<Option<SeenRecord>, StoreError> {
        if let Some(v) = self.inner.seen.get(seen_key(from, id))? {
            return Ok(Some(decode(id, &v)?));
        }
        // State format 1: keyed by id alone; only the sender it names may match it.
        match self.inner.seen.get(id.as_bytes())? {
            Some(v) => {
                let rec: SeenRecord = decode(id, &v)?;
                Ok((&rec.from == from).then_some(rec))
            }
            None => Ok(None),
        }
    }

    /// Remembers an accepted envelope (from `rec.from`) with its receipt, replacing a
    /// format-1 record of the same id and sender. Not durable until [`Store::durable`].
    pub fn put_seen(&self, id: &EnvelopeId, rec: &SeenRecord) -> Result<(), StoreError> {
        self.inner
            .seen
            .insert(seen_key(&rec.from, id), encode(rec))?;
        if let Some(v) = self.inner.seen.get(id.as_bytes())? {
            let old: SeenRecord = decode(id, &v)?;
            if old.from == rec.from {
                self.inner.seen.remove(id.as_bytes())?;
            }
        }
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
            let Some(id) = k
                .len()
                .checked_sub(16)
                .and_then(|at| EnvelopeId::from_slice(&k[at..]).ok())
            else {
                continue;
            };
            let rec: SeenRecord = decode(id, &v)?;
            if !rec.published {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    /// How many accepted ids the dedup-retention purge would forget at `cutoff` (it is recorded
    /// before [`Store::purge_seen`] deletes them).
    pub fn count_seen_before(&self, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
        self.sweep_seen(cutoff, false)
    }

    /// Forgets published accepted ids (and the referral index) received before `cutoff`.
    pub fn purge_seen(&self, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
        self.sweep_seen(cutoff, true)
    }

    fn sweep_seen(&self, cutoff: DateTime<Utc>, delete: bool) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.inner.seen.iter() {
            let (k, v) = kv?;
            let rec: SeenRecord = decode("seen id", &v)?;
            if rec.published && rec.received_at < cutoff.timestamp() {
                if delete {
                    self.inner.seen.remove(&k)?;
                }
                n += 1;
            }
        }
        if !delete {
            return Ok(n);
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
}

/// The `seen` key of envelope `id` from `from`.
fn seen_key(from: &AreaId, id: &EnvelopeId) -> Vec<u8> {
    let mut k = from.to_string().into_bytes();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(from: &str, receipt: u8) -> SeenRecord {
        SeenRecord {
            v: 1,
            from: from.parse().unwrap(),
            received_at: 0,
            inbox_name: "x.json".into(),
            published: true,
            receipt: serde_bytes::ByteBuf::from(vec![receipt]),
        }
    }

    #[test]
    fn the_same_id_from_two_senders_is_two_records_and_format_1_keys_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (a, b): (AreaId, AreaId) = ("kent".parse().unwrap(), "essex".parse().unwrap());
        let id = EnvelopeId::generate();
        store.put_seen(&id, &rec("kent", 1)).unwrap();
        assert!(store.seen(&b, &id).unwrap().is_none());
        store.put_seen(&id, &rec("essex", 2)).unwrap();
        assert_eq!(store.seen(&a, &id).unwrap().unwrap().receipt.as_ref(), &[1]);
        assert_eq!(store.seen(&b, &id).unwrap().unwrap().receipt.as_ref(), &[2]);
        // A format-1 record (bare id key) is found for its sender only, and moved on write.
        let old = EnvelopeId::generate();
        store
            .inner
            .seen
            .insert(old.as_bytes(), encode(&rec("kent", 3)))
            .unwrap();
        assert!(store.seen(&b, &old).unwrap().is_none());
        assert_eq!(
            store.seen(&a, &old).unwrap().unwrap().receipt.as_ref(),
            &[3]
        );
        let mut unpublished = rec("kent", 4);
        unpublished.published = false;
        store.put_seen(&old, &unpublished).unwrap();
        assert!(store.inner.seen.get(old.as_bytes()).unwrap().is_none());
        let found = store.seen_unpublished().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, old);
    }
}
