//! Operator and housekeeping state changes of outgoing envelopes: the non-delivery mark,
//! requeue, and the two-step withdraw (out of the queue first, payload erased only once the
//! erasure record is durable; see `node::control`).
//! Must not: erase a payload before [`Store::begin_withdraw`] took the envelope out of its queue.

use chrono::{DateTime, Utc};

use super::{OutRecord, OutState, Store, StoreError};
use crate::core::types::EnvelopeId;

impl Store {
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

    /// First step of an operator's withdraw: takes a queued or non-delivered envelope out of
    /// its queue (`WithdrawPending`, so it is never sent again) and notes who asked; the payload
    /// stays until [`Self::withdraw`], after the erasure record is durable.
    pub fn begin_withdraw(&self, id: &EnvelopeId, user: &str) -> Result<OutRecord, StoreError> {
        self.update(id, |r| match r.state {
            OutState::NonDelivered | OutState::Queued => {
                r.withdraw = Some((user.to_owned(), r.state));
                r.state = OutState::WithdrawPending;
                Ok(r.clone())
            }
            state => Err(StoreError::WrongState {
                id: *id,
                state,
                action: "withdraw",
            }),
        })
    }

    /// Undoes [`Self::begin_withdraw`] when its record could not be written: back to the state
    /// it had (queued again, or non-delivered).
    pub fn cancel_withdraw(&self, id: &EnvelopeId) -> Result<OutRecord, StoreError> {
        self.update(id, |r| {
            if r.state == OutState::WithdrawPending {
                r.state = r.withdraw.take().map_or(OutState::Queued, |(_, prev)| prev);
            }
            Ok(r.clone())
        })
    }

    /// Completes a withdraw begun by [`Self::begin_withdraw`]: erases the payload.
    pub fn withdraw(&self, id: &EnvelopeId, now: DateTime<Utc>) -> Result<OutRecord, StoreError> {
        self.update(id, |r| match r.state {
            OutState::WithdrawPending => {
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

    /// Envelopes whose withdraw was begun but not completed (a crash, or a failed record). A
    /// full scan of the envelope records: run once at start-up.
    pub fn withdrawals_pending(&self) -> Result<Vec<(EnvelopeId, OutRecord)>, StoreError> {
        self.in_state(OutState::WithdrawPending)
    }
}
