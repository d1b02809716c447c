//! Crash points for the torture tests: `REFEX_CRASH_AT=<point>[:<n>]` makes the process die by
//! SIGKILL (as `kill -9` would: no cleanup, no flush, no core dump) the n-th time (default 1st)
//! it passes `point`.
//!
//! The points sit in the windows where a crash is most dangerous: between a durable store write
//! and the deletion of the outbox file, between staging and publishing an inbox file, between
//! publishing and answering, between receiving a receipt and storing it. Without the variable
//! this is one relaxed atomic load per call.
//!
//! The points: intake `intake_after_store`, `intake_before_delete`, `intake_after_delete`,
//! `intake_before_release`; store `store_before_sync`, `store_after_sync` (group commit); audit
//! `audit_before_append`, `audit_after_append`, `audit_checkpoint_write` (chain synced,
//! checkpoints file not yet written); receiver `receiver_after_stage`, `receiver_after_seen`
//! (before the inbox rename), `receiver_before_reply` (after it); sender
//! `sender_before_receipt_stored`, `sender_after_receipt_stored` (receipt synced, records not
//! yet written), `sender_after_receipt_records` (receipt and erasure records durable, payload
//! not yet erased), `sender_after_erasure_unsynced` (the erasure handed to the store's committer, not yet synced); housekeeping `purge_rejected_before_delete`,
//! `purge_receipts_before_forget` (erasure recorded, not yet made); control
//! `operator_withdraw_pending` (a withdraw out of its queue, not yet recorded);
//! `operator_before_change` (requeue/withdraw recorded, not yet made); `sighup_reload`.
//! Must not: be set in production (it is only read from the environment; nothing else sets it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let v = std::env::var("REFEX_CRASH_AT").ok()?;
        let (point, n) = match v.split_once(':') {
            Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((point, n.max(1)))
    })
}

/// Aborts the process here if this is the configured crash point and pass.
pub fn hit(point: &str) {
    if let Some((p, n)) = target() {
        if p == point && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("REFEX_CRASH_AT: aborting at {point}");
            // SIGKILL to itself: the crash a test means (no handler, no flush) without the core
            // dump an abort() writes where the host enables them (58 MB into the working
            // directory per crash, and a dumping process the test cannot reap until it is done).
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort();
        }
    }
}

static HOLD: OnceLock<Option<(String, u64)>> = OnceLock::new();

fn hold_target() -> &'static Option<(String, u64)> {
    HOLD.get_or_init(|| {
        let v = std::env::var("REFEX_HOLD_AT").ok()?;
        let (point, ms) = v.split_once(':')?;
        Some((point.to_owned(), ms.parse().ok()?))
    })
}

/// `REFEX_HOLD_AT=<point>:<ms>`: how long to hold the caller at `point` (every pass), so a test
/// can widen a race window and act inside it. The points: `store_before_sync` (between a
/// round's writes and their sync), `sender_after_receipt_stored` (a send between its synced
/// receipt and its receipt and erasure records). The caller sleeps (core has no runtime):
/// `if let Some(d) = hold("p") { sleep(d).await }`. Without the variable this is `None` after
/// one cached read.
pub fn hold(point: &str) -> Option<std::time::Duration> {
    match hold_target() {
        Some((p, ms)) if p == point => {
            eprintln!("REFEX_HOLD_AT: holding at {point} for {ms} ms");
            Some(std::time::Duration::from_millis(*ms))
        }
        _ => None,
    }
}
