//! Power cuts and the duplicate's root cause.
//!
//! `an_envelope_is_not_sent_before_its_queue_record_is_synced` reproduces the duplicate one soak
//! run found: intake is held (REFEX_HOLD_AT) between the store's `enqueue` and its `durable()`
//! while the sender's periodic rescan runs, and the sender aborts (REFEX_CRASH_AT) once the
//! receipt is back. Before the store hid unsynced envelopes from `next_queued`, the envelope was
//! sent and written to the inbox while its queue record and idempotency key were only in memory;
//! the crash lost both, intake read the outbox file again under a new envelope id, and the
//! receiver (dedup by envelope id) wrote a second inbox file.

use std::fs;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation};

pub const FAST: &str = r#"
[intake]
settle_ms = 100
rescan_ms = 500
[delivery]
retry_initial_ms = 50
retry_max_ms = 500
[limits]
handshake_timeout_ms = 1000
request_timeout_ms = 3000
"#;

#[test]
fn an_envelope_is_not_sent_before_its_queue_record_is_synced() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.node_mut("london").start();
    let wm = fed.node_mut("west-midlands");
    // Longer than the sender's idle rescan (5 s), so the rescan falls inside the window.
    wm.extra_env = vec![
        ("REFEX_HOLD_AT".into(), "intake_before_durable:7000".into()),
        (
            "REFEX_CRASH_AT".into(),
            "sender_before_receipt_stored".into(),
        ),
    ];
    wm.start();
    wm.drop_file("held.json", referral("HOLD-1", "london").as_bytes());
    // The first inbox file must not appear before intake has synced (its collection record is
    // written only after `durable()` returns).
    let london_inbox = fed.node("london").inbox().to_owned();
    let wm = fed.node("west-midlands");
    wait_until(Duration::from_secs(40), "HOLD-1 in the inbox", || {
        fs::read_dir(&london_inbox)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
    });
    let synced_first = crate::history::has_record(&wm.settings.paths.audit, "collection");
    let wm = fed.node_mut("west-midlands");
    wait_until(
        Duration::from_secs(40),
        "the sender to crash at the receipt",
        || {
            wm.log_text()
                .contains("aborting at sender_before_receipt_stored")
        },
    );
    assert!(
        wm.log_text().contains("holding at intake_before_durable"),
        "intake never reached the hold point"
    );
    wm.kill();
    wm.extra_env.clear();
    wm.start();
    let wm = fed.node("west-midlands");
    wait_until(Duration::from_secs(40), "the outbox to empty", || {
        wm.outbox_files().is_empty()
    });
    wait_until(
        Duration::from_secs(40),
        "the sender's queue to drain",
        || crate::history::queue_is_empty(wm),
    );
    let london = fed.node("london");
    let docs = london.inbox_docs();
    let ids: Vec<String> = docs
        .iter()
        .map(|d| d["delivery"]["envelope_id"].to_string())
        .collect();
    assert!(
        synced_first,
        "HOLD-1 was delivered while intake had not yet synced its queue record"
    );
    assert_eq!(
        docs.len(),
        1,
        "HOLD-1 delivered {} times, envelope ids {ids:?}",
        docs.len()
    );
}
