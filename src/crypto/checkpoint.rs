//! Signed audit checkpoints: the Ed25519 signature over the bytes
//! [`checkpoint_message_v2`](crate::core::audit::checkpoint_message_v2) names (area, sequence,
//! time, head); version-1 checkpoints (no time) still verify by their own message.
//! The record format itself is pure and lives in `core::audit`; only signing lives here.
//! Must not: read or write audit files (that is `adapters::audit`).

use chrono::{DateTime, Utc};

use super::{SigningKey, VerifyingKey};
use crate::core::audit::{checkpoint_message, checkpoint_message_v2, Record};
use crate::core::types::AreaId;

/// A signed checkpoint over `prev` (the chain head before it).
pub fn sign(
    seq: u64,
    time: DateTime<Utc>,
    prev: &str,
    area: &AreaId,
    signer: &SigningKey,
) -> Record {
    let mut r = Record::checkpoint_unsigned(seq, time, prev, area);
    r.key = Some(signer.public_key().to_hex());
    r.sig = Some(hex::encode(signer.sign(&checkpoint_message_v2(
        area.as_str(),
        seq,
        &r.time,
        prev,
    ))));
    r
}

/// True when `r` is a checkpoint whose signature verifies with one of `keys`.
pub fn is_valid(r: &Record, keys: &[VerifyingKey]) -> bool {
    let (Some(area), Some(head), Some(sig), Some(key)) = (&r.area, &r.head, &r.sig, &r.key) else {
        return false;
    };
    let Ok(sig) = hex::decode(sig) else {
        return false;
    };
    let msg = if r.v >= 2 {
        checkpoint_message_v2(area, r.seq, &r.time, head)
    } else {
        checkpoint_message(area, r.seq, head)
    };
    head == &r.prev
        && keys
            .iter()
            .any(|k| &k.to_hex() == key && k.verify(&msg, &sig))
}
