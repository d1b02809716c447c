//! Crashes (REFEX_CRASH_AT, a SIGKILL the daemon sends itself) during a SIGHUP reload, a retention
//! purge, an operator's withdraw and an audit checkpoint write. After each: restart, nothing lost
//! or duplicated (history checker), both chains verify, and — record before change — the
//! operation's record exists although the change was never made.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation, Node};

const WAIT: Duration = Duration::from_secs(60);

/// Every record of a node's chain, as JSON.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    refex::adapters::audit::log_files(dir)
        .unwrap_or_default()
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn count_reason(node: &Node, prefix: &str) -> usize {
    records(&node.settings.paths.audit)
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|s| s.starts_with(prefix)))
        .count()
}

/// Waits for the abort at `point`, then reaps the process.
fn wait_crash(node: &mut Node, point: &str) {
    let needle = format!("aborting at {point}");
    wait_until(WAIT, &needle, || node.log_text().contains(&needle));
    node.kill();
    node.extra_env.clear();
}

fn hand_over(fed: &Federation, handed: &mut Vec<String>, prefix: &str, n: usize) {
    for i in 0..n {
        let r = format!("{prefix}-{i}");
        fed.node("west-midlands")
            .drop_file(&format!("{r}.json"), referral(&r, "london").as_bytes());
        handed.push(r);
    }
}

/// Drains, stops both nodes (exit 0), verifies both chains and runs the history checker.
fn finish(fed: &mut Federation, handed: &[String]) {
    finish_requiring(fed, handed, crate::history::required_under_crashes());
}

fn finish_requiring(fed: &mut Federation, handed: &[String], required: crate::history::Required) {
    let wm = fed.node("west-midlands");
    wait_until(WAIT, "the outbox to empty", || wm.outbox_files().is_empty());
    wait_until(WAIT, "the queue to drain", || {
        crate::history::queue_is_empty(wm)
    });
    fed.stop_all_and_verify();
    crate::history::check_nodes(handed, fed.node("west-midlands"), fed.node("london"))
        .assert(&required);
}

#[test]
fn a_crash_during_a_sighup_reload_loses_nothing() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        crate::harness::FAST_CRASH_CONFIG,
    );
    fed.node_mut("london").start();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX_CRASH_AT".into(), "sighup_reload".into())];
    wm.start();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "HUP-A", 5);
    fed.node("west-midlands").hangup();
    wait_crash(fed.node_mut("west-midlands"), "sighup_reload");
    hand_over(&fed, &mut handed, "HUP-B", 5);
    fed.node_mut("west-midlands").start();
    finish(&mut fed, &handed);
}

#[test]
fn a_crash_between_the_purge_record_and_the_delete_keeps_the_record() {
    let cfg = crate::harness::FAST_CRASH_CONFIG
        .replace("[intake]\n", "[intake]\nrejected_retention_days = 0\n");
    let mut fed = Federation::with_config(&["west-midlands", "london"], &cfg);
    fed.start_all();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "PURGE", 3);
    fed.node("west-midlands")
        .drop_file("broken.json", b"{ this is not a referral");
    let wm = fed.node("west-midlands");
    wait_until(WAIT, "the refused file in rejected/", || {
        !wm.rejected_files().is_empty()
    });
    wait_until(WAIT, "the outbox to empty", || wm.outbox_files().is_empty());
    // The purge runs at start; crash between its erasure record and the delete.
    let wm = fed.node_mut("west-midlands");
    wm.stop();
    wm.extra_env = vec![(
        "REFEX_CRASH_AT".into(),
        "purge_rejected_before_delete".into(),
    )];
    wm.start();
    wait_crash(wm, "purge_rejected_before_delete");
    assert_eq!(
        count_reason(wm, "retention_rejected"),
        1,
        "the erasure is recorded first"
    );
    assert!(
        !wm.rejected_files().is_empty(),
        "nothing deleted before the crash"
    );
    wm.start();
    wait_until(WAIT, "the purge to be repeated", || {
        wm.rejected_files().is_empty()
    });
    assert_eq!(
        count_reason(wm, "retention_rejected"),
        2,
        "the repeated purge is recorded again (a second record, never a missing one)"
    );
    finish(&mut fed, &handed);
}

/// A crash inside an operator's withdraw, at `point`: after the envelope left its queue
/// (`operator_withdraw_pending`, before the record) or after the erasure record (before the
/// payload is erased). Either way the restart completes the withdraw — one
/// `erasure(operator_withdraw)` record, by the operator — and the referral is never delivered,
/// so nothing is recorded after its erasure; a referral handed over later still arrives.
fn a_crash_inside_a_withdraw_completes_it_at_restart(point: &str) {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        crate::harness::FAST_CRASH_CONFIG,
    );
    // London is down, so the envelope stays queued.
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX_CRASH_AT".into(), point.into())];
    wm.start();
    let mut withdrawn = Vec::new();
    hand_over(&fed, &mut withdrawn, "WD", 1);
    let wm = fed.node("west-midlands");
    wait_until(WAIT, "the referral to be collected", || {
        wm.outbox_files().is_empty()
    });
    let id = records(&wm.settings.paths.audit)
        .iter()
        .find(|r| r["op"] == "collection")
        .and_then(|r| r["envelope_id"].as_str().map(str::to_owned))
        .expect("a collection record with an envelope id");
    let (code, _, _) = wm.cli(&["outbox", "withdraw", &id]);
    assert_ne!(
        code, 0,
        "the withdraw cannot report success when the daemon died"
    );
    let wm = fed.node_mut("west-midlands");
    wait_crash(wm, point);
    wm.start();
    fed.node_mut("london").start();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "AFTER", 2);
    let wm = fed.node("west-midlands");
    assert!(
        wm.log_text().contains("withdraw completed at start-up"),
        "the restart completes the withdraw"
    );
    finish(&mut fed, &handed);
    let wm = fed.node("west-midlands");
    assert_eq!(
        count_reason(wm, "operator_withdraw"),
        1,
        "one erasure record for the withdraw, whichever side of it the crash came"
    );
    let by_operator = records(&wm.settings.paths.audit)
        .iter()
        .filter(|r| r["reason"] == "operator_withdraw")
        .all(|r| r["actor"].as_str().is_some_and(|a| a.starts_with("user:")));
    assert!(by_operator, "the record names the operator");
    let london = fed.node("london");
    assert!(
        !london
            .inbox_docs()
            .iter()
            .any(|d| d["source_ref"] == withdrawn[0].as_str()),
        "a withdrawn referral is never delivered"
    );
}

#[test]
fn a_crash_after_a_withdraw_left_the_queue_completes_it_at_restart() {
    a_crash_inside_a_withdraw_completes_it_at_restart("operator_withdraw_pending");
}

#[test]
fn a_crash_between_the_withdraw_record_and_the_erasure_completes_it_at_restart() {
    a_crash_inside_a_withdraw_completes_it_at_restart("operator_before_change");
}

#[test]
fn a_crash_during_a_checkpoint_write_keeps_the_chain_verifiable() {
    let cfg = format!(
        "{}[audit]\ncheckpoint_every_records = 4\n",
        crate::harness::FAST_CRASH_CONFIG
    );
    let mut fed = Federation::with_config(&["west-midlands", "london"], &cfg);
    fed.node_mut("london").start();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX_CRASH_AT".into(), "audit_checkpoint_write".into())];
    wm.start();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "CKPT-A", 4);
    wait_crash(fed.node_mut("west-midlands"), "audit_checkpoint_write");
    let wm = fed.node("west-midlands");
    assert!(
        crate::history::has_record(&wm.settings.paths.audit, "checkpoint"),
        "the checkpoint record is in the chain before the checkpoints file is written"
    );
    hand_over(&fed, &mut handed, "CKPT-B", 4);
    fed.node_mut("west-midlands").start();
    finish(&mut fed, &handed);
}

/// A crash around the stored receipt: before it is stored (the envelope is sent again and
/// answered with the original receipt), after it is stored and synced but before its records,
/// after the receipt and erasure records (written together) but before the payload is erased,
/// and after the erasure whose store sync was requested but not waited for. After a restart
/// every property holds — in particular nothing is recorded about an envelope after its erasure (on the old order,
/// records before the store, a crash there re-sent the envelope and recorded its transfer and
/// receipt again after the erasure).
#[test]
fn a_crash_around_the_stored_receipt_records_nothing_after_erasure() {
    for (k, point) in [
        "sender_before_receipt_stored:2",
        "sender_after_receipt_stored:2",
        "sender_after_receipt_records:2",
        "sender_after_erasure_unsynced:2",
    ]
    .into_iter()
    .enumerate()
    {
        let mut fed = Federation::with_config(
            &["west-midlands", "london"],
            crate::harness::FAST_CRASH_CONFIG,
        );
        fed.node_mut("london").start();
        let wm = fed.node_mut("west-midlands");
        wm.extra_env = vec![("REFEX_CRASH_AT".into(), point.into())];
        wm.start();
        let mut handed = Vec::new();
        hand_over(&fed, &mut handed, &format!("RCPT{k}"), 4);
        let name = point.split(':').next().unwrap_or(point);
        wait_crash(fed.node_mut("west-midlands"), name);
        fed.node_mut("west-midlands").start();
        let wm = fed.node("west-midlands");
        wait_until(WAIT, "the outbox to empty", || wm.outbox_files().is_empty());
        wait_until(WAIT, "the queue to drain", || {
            crate::history::queue_is_empty(wm)
        });
        fed.stop_all_and_verify();
        let report =
            crate::history::check_nodes(&handed, fed.node("west-midlands"), fed.node("london"));
        eprintln!("crash at {point}: checked");
        report.assert(&crate::history::Required::all());
    }
}
