//! Peer outages, the non-delivery window, full disks and graceful shutdown, with real daemons.

use std::fs;
use std::time::Duration;

use crate::harness::{
    audit_records, referral, referral_with, source_refs, wait_until, Federation, Tmpfs,
};

const WAIT: Duration = Duration::from_secs(60);

fn op(r: &serde_json::Value) -> &str {
    r["op"]
        .as_str()
        .or_else(|| r["operation"].as_str())
        .unwrap_or("")
}

#[test]
fn a_backlog_drains_in_priority_order_and_other_peers_are_unaffected() {
    let mut fed = Federation::with_config(
        &["west-midlands", "greater-manchester", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nmax_in_flight_per_peer = 1\nretry_initial_ms = 100\nretry_max_ms = 1000\n",
    );
    fed.node_mut("west-midlands").start();
    fed.node_mut("greater-manchester").start();
    // London is down. Standard referrals first, then enhanced ones.
    for i in 0..6 {
        fed.node("west-midlands").drop_file(
            &format!("s{i}.json"),
            referral_with(&format!("STD-{i}"), "london", "theft", false).as_bytes(),
        );
    }
    wait_until(WAIT, "the standard ones to be queued", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    for i in 0..4 {
        fed.node("west-midlands").drop_file(
            &format!("e{i}.json"),
            referral_with(&format!("ENH-{i}"), "london", "theft", true).as_bytes(),
        );
    }
    fed.node("west-midlands")
        .drop_file("gm.json", referral("GM-1", "greater-manchester").as_bytes());
    wait_until(
        WAIT,
        "greater-manchester to be served while london is down",
        || fed.node("greater-manchester").inbox_files().len() == 1,
    );
    wait_until(WAIT, "everything to be queued", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    // The sender's queue survives its own restart.
    assert!(fed.node_mut("west-midlands").stop().success());
    fed.node_mut("west-midlands").start();
    // London stays down a while longer (REFEX_TEST_OUTAGE_SECS, default 20) while the sender
    // keeps retrying with backoff.
    let outage = std::env::var("REFEX_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    std::thread::sleep(Duration::from_secs(outage));
    fed.node_mut("london").start();
    wait_until(WAIT, "the backlog to drain", || {
        fed.node("london").inbox_files().len() == 10
    });

    let london = fed.node("london");
    let order: Vec<String> = audit_records(&london.settings.paths.audit)
        .iter()
        .filter(|r| op(r) == "collection")
        .map(|r| r["priority"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(order.len(), 10, "{order:?}");
    assert!(
        order[..4].iter().all(|p| p == "enhanced"),
        "enhanced first: {order:?}"
    );
    assert!(order[4..].iter().all(|p| p == "standard"), "{order:?}");
}

/// With the default in-flight window (32) and more enhanced referrals queued than fit in it,
/// every enhanced one still arrives before any standard one: the window is not topped up with
/// standard envelopes while enhanced ones are in flight.
#[test]
fn a_backlog_larger_than_the_window_arrives_enhanced_first() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n[limits]\nhandshake_timeout_ms = 300\n",
    );
    fed.node_mut("west-midlands").start();
    // London is down; 60 standard and 45 enhanced referrals, interleaved, are queued.
    let (standard, enhanced) = (60, 45);
    for i in 0..standard + enhanced {
        let e = i % 7 < 3 && i / 7 * 3 + i % 7 < enhanced;
        let name = if e { "ENH" } else { "STD" };
        fed.node("west-midlands").drop_file(
            &format!("r{i}.json"),
            referral_with(&format!("{name}-{i}"), "london", "theft", e).as_bytes(),
        );
    }
    wait_until(WAIT, "everything to be queued", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    // Sends tried while intake was still queueing (whatever was first then) time out and go
    // back to the queue; the retries after that take it in priority order.
    std::thread::sleep(Duration::from_secs(2));
    fed.node_mut("london").start();
    wait_until(WAIT, "the backlog to drain", || {
        fed.node("london").inbox_files().len() == standard + enhanced
    });
    let order: Vec<String> = audit_records(&fed.node("london").settings.paths.audit)
        .iter()
        .filter(|r| op(r) == "collection")
        .map(|r| r["priority"].as_str().unwrap_or("?").to_owned())
        .collect();
    let first_standard = order.iter().position(|p| p == "standard");
    let last_enhanced = order.iter().rposition(|p| p == "enhanced");
    assert_eq!(
        order.iter().filter(|p| *p == "enhanced").count(),
        enhanced,
        "{order:?}"
    );
    assert!(
        first_standard > last_enhanced,
        "every enhanced referral is collected before any standard one: {order:?}"
    );
}

/// West Midlands queues one referral for London, which is down, and retries every 60 s (30-60 s
/// with equal jitter); London starts `down_for` later and the referral must arrive within
/// `within`, long before the back-off would end.
fn referral_reaches_a_peer_back_after(
    limits: &str,
    down_for: Duration,
    within: Duration,
    why: &str,
) {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        &format!("[intake]\nsettle_ms = 100\n[delivery]\nretry_initial_ms = 60000\nretry_max_ms = 60000\n[limits]\n{limits}"),
    );
    fed.node_mut("west-midlands").start();
    fed.node("west-midlands")
        .drop_file("r.json", referral("BACK-1", "london").as_bytes());
    wait_until(WAIT, "the referral to be queued", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    std::thread::sleep(down_for);
    let back = std::time::Instant::now();
    fed.node_mut("london").start();
    wait_until(within, why, || fed.node("london").inbox_files().len() == 1);
    eprintln!(
        "delivered {:.1} s after the peer started",
        back.elapsed().as_secs_f64()
    );
}

/// A sender backing off after failed sends retries as soon as the peer is back: the peer
/// dials every area once at start, and a connection from it ends the back-off.
#[test]
fn a_peer_back_from_an_outage_is_sent_to_at_once_not_after_the_back_off() {
    // The first send fails after the 300 ms handshake timeout; the worker then backs off.
    referral_reaches_a_peer_back_after(
        "handshake_timeout_ms = 300\n",
        Duration::from_secs(3),
        Duration::from_secs(20),
        "the referral to arrive before the 30-60 s back-off ends",
    );
}

/// A dial under way when the peer comes back starts over: its Initial packets went to a peer
/// that was down and QUIC resends them only on a doubling probe timeout (about 1, 3, 7, 15 and
/// 31 s into the handshake), so with a long handshake timeout a peer back at 16 s would wait
/// for the resend at 31 s. The peer connecting to us restarts the dial at once.
#[test]
fn a_dial_under_way_when_the_peer_comes_back_starts_over() {
    referral_reaches_a_peer_back_after(
        "handshake_timeout_ms = 45000\nrequest_timeout_ms = 60000\n",
        Duration::from_secs(16),
        Duration::from_secs(10),
        "the referral to arrive before the dial's next resend (~15 s after the peer is back)",
    );
}

#[test]
fn an_envelope_past_the_non_delivery_window_is_kept_until_an_operator_acts() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\n[delivery]\nnon_delivery_after_secs = 4\nretry_initial_ms = 100\nretry_max_ms = 500\n[limits]\nhandshake_timeout_ms = 500\nrequest_timeout_ms = 1000\n",
    );
    fed.node_mut("west-midlands").start();
    let wm = fed.node("west-midlands");
    wm.drop_file("a.json", referral("ND-1", "london").as_bytes());
    wm.drop_file("b.json", referral("ND-2", "london").as_bytes());
    let status = |fed: &Federation| -> serde_json::Value {
        let (code, v) = fed.node("west-midlands").status_json();
        assert!(code == 0 || code == 2, "the daemon answers: {v}");
        v
    };
    wait_until(WAIT, "both to be marked non-delivered", || {
        status(&fed)["non_delivered"].as_array().map(Vec::len) == Some(2)
    });
    assert!(
        fed.node("west-midlands")
            .log_text()
            .contains("NOT DELIVERED"),
        "an ERROR alert is logged"
    );
    fed.node_mut("london").start();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        fed.node("london").inbox_files().is_empty(),
        "non-delivered envelopes are kept, not sent"
    );

    let ids: Vec<String> = status(&fed)["non_delivered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let (code, _, err) = fed
        .node("west-midlands")
        .cli(&["outbox", "requeue", &ids[0]]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = fed
        .node("west-midlands")
        .cli(&["outbox", "withdraw", &ids[1]]);
    assert_eq!(code, 0, "{err}");
    wait_until(WAIT, "the requeued one to arrive", || {
        fed.node("london").inbox_files().len() == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fed.node("london").inbox_files().len(),
        1,
        "the withdrawn one never arrives"
    );
    let reasons: Vec<String> = audit_records(&fed.node("west-midlands").settings.paths.audit)
        .iter()
        .filter_map(|r| r["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r == "operator_requeue"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "operator_withdraw"),
        "{reasons:?}"
    );
}

#[test]
fn a_full_inbox_volume_withholds_receipts_and_recovers_by_itself() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n",
    );
    let disk = Tmpfs::new("512k");
    let inbox = disk.path().join("inbox");
    fs::create_dir(&inbox).unwrap();
    let london = fed.node_mut("london");
    london.extra_env = vec![("REFEX__PATHS__INBOX".into(), inbox.display().to_string())];
    london.start();
    fed.node_mut("west-midlands").start();
    let filler = disk.fill();
    for i in 0..5 {
        fed.node("west-midlands").drop_file(
            &format!("f{i}.json"),
            referral(&format!("FULL-{i}"), "london").as_bytes(),
        );
    }
    wait_until(WAIT, "the receiver to report the full volume", || {
        fed.node("london").log_text().contains("volume is full")
    });
    std::thread::sleep(Duration::from_secs(2));
    let visible = fs::read_dir(&inbox)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(visible, 0, "nothing is published while the volume is full");
    assert_eq!(
        fed.node("london")
            .log_text()
            .matches("volume is full")
            .count(),
        1,
        "the error is logged once, not per item"
    );
    fs::remove_file(filler).unwrap();
    let count = || {
        fs::read_dir(&inbox)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    wait_until(WAIT, "delivery to resume", || count() == 5);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(), 5);
}

#[test]
fn a_full_audit_volume_on_the_sender_pauses_intake_without_losing_files() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n",
    );
    let disk = Tmpfs::new("1m");
    let audit = disk.path().join("audit");
    fs::create_dir(&audit).unwrap();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX__PATHS__AUDIT".into(), audit.display().to_string())];
    wm.start();
    fed.node_mut("london").start();
    let filler = disk.fill();
    for i in 0..3 {
        fed.node("west-midlands").drop_file(
            &format!("a{i}.json"),
            referral(&format!("AFULL-{i}"), "london").as_bytes(),
        );
    }
    wait_until(WAIT, "intake to pause", || {
        fed.node("west-midlands")
            .log_text()
            .contains("intake paused")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fed.node("west-midlands").outbox_files().len(),
        3,
        "files stay in the outbox"
    );
    assert_eq!(
        fed.node("west-midlands")
            .log_text()
            .matches("intake paused")
            .count(),
        1,
        "logged once"
    );
    fs::remove_file(filler).unwrap();
    wait_until(WAIT, "intake to resume and deliver", || {
        fed.node("london").inbox_files().len() == 3
    });
    wait_until(WAIT, "the outbox to empty", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
}

#[test]
fn sigterm_mid_flow_exits_cleanly_and_a_restart_continues() {
    let mut fed =
        Federation::with_config(&["west-midlands", "london"], "[intake]\nsettle_ms = 100\n");
    fed.start_all();
    let n = 120;
    for i in 0..n {
        fed.node("west-midlands").drop_file(
            &format!("t{i}.json"),
            referral(&format!("TERM-{i}"), "london").as_bytes(),
        );
    }
    wait_until(WAIT, "delivery to be under way", || {
        !fed.node("london").inbox_files().is_empty()
    });
    assert!(
        fed.node_mut("west-midlands").stop().success(),
        "SIGTERM → exit 0"
    );
    let records = audit_records(&fed.node("west-midlands").settings.paths.audit);
    assert_eq!(
        records.last().map(|r| op(r) == "checkpoint"),
        Some(true),
        "a final checkpoint is written at shutdown"
    );
    fed.node_mut("west-midlands").start();
    wait_until(WAIT, "the rest to arrive", || {
        fed.node("london").inbox_files().len() == n
    });
    wait_until(WAIT, "the outbox to empty", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fed.node("london").inbox_files().len(), n);
}

#[test]
fn a_receipt_lost_after_the_inbox_write_is_answered_from_the_original() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n",
    );
    let london = fed.node_mut("london");
    london.extra_env = vec![("REFEX_CRASH_AT".into(), "receiver_before_reply".into())];
    london.start();
    fed.node_mut("west-midlands").start();
    fed.node("west-midlands")
        .drop_file("lost.json", referral("LOST-RECEIPT-1", "london").as_bytes());
    wait_until(WAIT, "the receiver to die before replying", || {
        fed.node("london")
            .log_text()
            .contains("aborting at receiver_before_reply")
    });
    assert_eq!(
        fed.node("london").inbox_files().len(),
        1,
        "the inbox file was written before the crash"
    );
    let london = fed.node_mut("london");
    london.kill();
    london.extra_env.clear();
    london.start();
    wait_until(WAIT, "the re-send to be answered", || {
        fed.node("london")
            .log_text()
            .contains("answered with its original receipt")
    });
    wait_until(WAIT, "the sender to store the receipt", || {
        audit_records(&fed.node("west-midlands").settings.paths.audit)
            .iter()
            .any(|r| op(r) == "receipt")
    });
    assert_eq!(
        fed.node("london").inbox_files().len(),
        1,
        "no second inbox file"
    );
}

#[test]
fn peers_share_the_node_wide_send_slots_in_turn() {
    // One slot for all peers: each peer's worker waits its turn for it, so neither peer's
    // backlog waits for the other's to empty (nor for a worker's one-second heartbeat). One per
    // peer too, so that neither borrows a lone peer's room while the other is not yet busy.
    let mut fed = Federation::with_config(
        &["west-midlands", "greater-manchester", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nmax_in_flight_total = 1\nmax_in_flight_per_peer = 1\n",
    );
    fed.start_all();
    // One file, so both peers' queues fill in the same store transaction.
    let rows: Vec<(String, &str)> = (0..20)
        .flat_map(|i| ["london", "greater-manchester"].map(|area| (format!("T-{area}-{i}"), area)))
        .collect();
    let csv = crate::harness::theft_csv("turns", &rows);
    fed.node("west-midlands")
        .drop_file("turns.csv", csv.as_bytes());
    let (mut first_done, mut other_then) = (None, 0);
    wait_until(WAIT, "both peers to receive 20", || {
        let l = fed.node("london").inbox_files().len();
        let g = fed.node("greater-manchester").inbox_files().len();
        if first_done.is_none() && (l >= 20 || g >= 20) {
            first_done = Some(if l >= 20 {
                "london"
            } else {
                "greater-manchester"
            });
            other_then = l.min(g);
        }
        l >= 20 && g >= 20
    });
    assert!(
        other_then >= 5,
        "{first_done:?} had all 20 while the other peer had {other_then}: the slot was not shared in turn"
    );
    for area in ["london", "greater-manchester"] {
        let mut refs = source_refs(&fed.node(area).inbox_docs());
        refs.dedup();
        assert_eq!(refs.len(), 20, "{area}: each referral exactly once");
    }
}

/// The sender's `sends_in_flight` from `status --json`: (shared slots, a lone peer's).
fn sends_in_flight(fed: &Federation, area: &str) -> Option<(u64, u64)> {
    let v = fed.node(area).try_status_json()?;
    let s = &v["sends_in_flight"];
    Some((s["shared"].as_u64()?, s["lone_peer"].as_u64()?))
}

#[test]
fn a_peer_alone_fills_its_own_window_past_the_node_wide_slots() {
    // Two slots for all peers, six per peer. London is frozen, so every send to it waits for
    // its reply and stays in flight, where `status` shows it.
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nmax_in_flight_total = 2\nmax_in_flight_per_peer = 6\n",
    );
    fed.start_all();
    fed.node("west-midlands")
        .drop_file("first.json", referral("LONE-0", "london").as_bytes());
    wait_until(WAIT, "a first delivery (the connection is up)", || {
        fed.node("london").inbox_files().len() == 1
    });
    fed.node("london").send(rustix::process::Signal::STOP);
    for i in 1..=10 {
        fed.node("west-midlands").drop_file(
            &format!("r{i}.json"),
            referral(&format!("LONE-{i}"), "london").as_bytes(),
        );
    }
    let mut seen = Vec::new();
    wait_until(WAIT, "the lone peer's whole window in flight", || {
        let now = sends_in_flight(&fed, "west-midlands");
        seen.extend(now);
        now == Some((2, 4))
    });
    fed.node("london").send(rustix::process::Signal::CONT);
    wait_until(WAIT, "all eleven delivered", || {
        fed.node("london").inbox_files().len() == 11
    });
    assert!(
        seen.iter().all(|&(shared, lone)| shared <= 2 && lone <= 4),
        "never more than the peer's six: {seen:?}"
    );
    let mut refs = source_refs(&fed.node("london").inbox_docs());
    refs.dedup();
    assert_eq!(refs.len(), 11, "each referral exactly once");
    wait_until(WAIT, "every slot back", || {
        sends_in_flight(&fed, "west-midlands") == Some((0, 0))
    });
}
