//! The receiver's side of the store: accepted envelope ids (`seen`) and the end-to-end referral
//! index (`referrals`), with their retention purge. See the layout in the parent module.

use chrono::{DateTime, Utc};

use super::{decode, encode, referral_key, SeenRecord, Store, StoreError};
use crate::core::types::{AreaId, EnvelopeId};

impl Store {
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
