//! Process-wide counters of the running node, read by `status`. Plain atomics.
//! Must not: hold labels derived from referral content.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

static NON_DELIVERED: AtomicU64 = AtomicU64::new(0);

/// Counts an envelope marked non-delivered.
pub fn count_non_delivered() {
    NON_DELIVERED.fetch_add(1, Ordering::Relaxed);
}

/// The counters, for `status`.
pub fn snapshot() -> Value {
    json!({ "non_delivered_marked": NON_DELIVERED.load(Ordering::Relaxed) })
}
