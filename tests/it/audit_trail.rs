//! The audit trail against real daemons: write-ahead under an unwritable audit volume, identity
//! from the kernel, and Victims' Code deadlines on the record.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::harness::{
    audit_lines, audit_records as records, referral, wait_until, Federation, Node, Tmpfs,
};
use crate::history::{self, Required};

const WAIT: Duration = Duration::from_secs(90);
const FAST: &str = "[intake]\nsettle_ms = 100\nrescan_ms = 500\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n";

/// `refex audit verify` of a node whose audit directory is overridden (as it ran).
fn verify_overridden(node: &Node) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refex"))
        .args(["audit", "verify", "--config"])
        .arg(&node.config)
        .envs(node.extra_env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify of {}: {}{}",
        node.area,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops `refs` one file each, `pause` apart, into `node`'s outbox.
fn drop_all(node: &Node, refs: &[String], pause: Duration) {
    for r in refs {
        node.drop_file(&format!("{r}.json"), referral(r, "london").as_bytes());
        std::thread::sleep(pause);
    }
}

/// Waits for every referral to arrive, stops both nodes, and demands every history property:
/// no process is killed here, so nothing is excused. `sender_audit`: where the sender's audit
/// log really is.
fn assert_all_delivered_and_on_record(fed: &mut Federation, refs: &[String], sender_audit: &Path) {
    wait_until(WAIT, "every referral to arrive", || {
        fed.node("london").inbox_files().len() >= refs.len()
    });
    wait_until(WAIT, "the sender's outbox to empty", || {
        fed.node("west-midlands").outbox_files().is_empty()
    });
    wait_until(WAIT, "the sender's queue to drain", || {
        history::queue_is_empty(fed.node("west-midlands"))
    });
    assert!(fed.node_mut("west-midlands").stop().success());
    assert!(fed.node_mut("london").stop().success());
    let (wm, london) = (fed.node("west-midlands"), fed.node("london"));
    history::check(&history::Inputs {
        handed_over: refs,
        sender_audit,
        receiver_audit: &london.settings.paths.audit,
        inbox: london.inbox(),
        outbox: wm.outbox(),
    })
    .assert(&Required::all());
    verify_overridden(wm);
    london.assert_audit_verifies();
}

#[test]
fn fifty_referrals_dropped_while_the_sender_audit_volume_is_full_are_all_on_record() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    let disk = Tmpfs::new("1m");
    let audit = disk.path().join("audit");
    fs::create_dir(&audit).unwrap();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX__PATHS__AUDIT".into(), audit.display().to_string())];
    wm.start();
    fed.node_mut("london").start();
    let refs: Vec<String> = (0..50).map(|i| format!("AUDFULL-{i:02}")).collect();
    // Some go through first, then the volume fills while the rest are dropped.
    drop_all(
        fed.node("west-midlands"),
        &refs[..10],
        Duration::from_millis(20),
    );
    let filler = disk.fill();
    drop_all(
        fed.node("west-midlands"),
        &refs[10..],
        Duration::from_millis(20),
    );
    wait_until(WAIT, "intake to pause", || {
        fed.node("west-midlands")
            .log_text()
            .contains("intake paused")
    });
    std::thread::sleep(Duration::from_secs(2));
    let waiting = fed.node("west-midlands").outbox_files().len();
    assert!(
        waiting > 0,
        "files wait in the outbox while the audit volume is full"
    );
    fs::remove_file(filler).unwrap();
    assert_all_delivered_and_on_record(&mut fed, &refs, &audit);
    assert_eq!(fed.node("london").inbox_files().len(), 50);
}

#[test]
fn an_io_error_on_the_sender_audit_file_loses_and_doubles_nothing() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    let flag = fed.dir.path().join("audit-eio");
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX_AUDIT_EIO_WHILE".into(), flag.display().to_string())];
    wm.start();
    fed.node_mut("london").start();
    let refs: Vec<String> = (0..30).map(|i| format!("AUDEIO-{i:02}")).collect();
    drop_all(
        fed.node("west-midlands"),
        &refs[..5],
        Duration::from_millis(20),
    );
    fs::write(&flag, b"").unwrap();
    drop_all(
        fed.node("west-midlands"),
        &refs[5..],
        Duration::from_millis(20),
    );
    wait_until(WAIT, "intake to pause on the I/O error", || {
        fed.node("west-midlands")
            .log_text()
            .contains("intake paused")
    });
    std::thread::sleep(Duration::from_secs(2));
    let before = fed.node("london").inbox_files().len();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fed.node("london").inbox_files().len(),
        before,
        "nothing leaves while its records cannot be written"
    );
    assert_eq!(
        fed.node("west-midlands")
            .log_text()
            .matches("intake paused")
            .count(),
        1,
        "the pause is logged once"
    );
    fs::remove_file(&flag).unwrap();
    let audit = fed.node("west-midlands").settings.paths.audit.clone();
    assert_all_delivered_and_on_record(&mut fed, &refs, &audit);
    assert_eq!(fed.node("london").inbox_files().len(), 30);
    assert!(fed
        .node("west-midlands")
        .log_text()
        .contains("intake resumed"));
}

/// One request line over the control socket, as any local client could send it.
fn control(node: &Node, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(&node.settings.control_socket).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap()
}

fn real_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_actor_is_the_kernel_account_whatever_the_environment_or_the_client_says() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    fed.start_all();
    let wm = fed.node("west-midlands");
    wm.drop_file("who.json", referral("WHO-1", "london").as_bytes());
    wait_until(WAIT, "delivery", || {
        fed.node("london").inbox_files().len() == 1
    });
    let spoof = |node: &Node| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_refex"))
            .args(["audit", "search", "--source-ref", "WHO-1", "--config"])
            .arg(&node.config)
            .env("USER", "chief.constable")
            .env("LOGNAME", "chief.constable")
            .env("SUDO_USER", "chief.constable")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A refused referral is found by its reference alone (refusals carry source_system).
    let mut refused: serde_json::Value =
        serde_json::from_str(&referral("REFUSED-1", "london")).unwrap();
    refused["consent"]["referral"] = false.into();
    wm.drop_file("refused.json", refused.to_string().as_bytes());
    wait_until(WAIT, "the refusal", || wm.rejected_files().len() >= 2);
    let (code, found, err) = wm.cli(&["audit", "search", "--source-ref", "REFUSED-1", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        found.lines().any(|l| l.contains("\"op\":\"refusal\"")),
        "the refusal is found without --source-system: {found}"
    );
    assert_eq!(
        found.matches("\"op\":\"consultation\"").count(),
        0,
        "the search's own consultation is recorded, not shown as found: {found}"
    );
    // Through the daemon's socket (SO_PEERCRED) ...
    spoof(wm);
    // ... and a raw client that names another user and sends free text.
    let subject = "ab".repeat(32);
    let bad = control(
        wm,
        &serde_json::json!({"v": 1, "cmd": "consultation", "user": "chief.constable",
            "what": "Jane Fakename 07700 900123", "subject": subject})
        .to_string(),
    );
    assert_eq!(bad["ok"], false, "free text is refused: {bad}");
    let good = control(
        wm,
        &serde_json::json!({"v": 1, "cmd": "consultation", "user": "chief.constable",
            "what": "dpo_review", "subject": subject})
        .to_string(),
    );
    assert_eq!(good["ok"], true, "{good}");
    let not_hex = control(
        wm,
        &serde_json::json!({"v": 1, "cmd": "consultation", "what": "dpo_review",
            "subject": "Jane Fakename"})
        .to_string(),
    );
    assert_eq!(not_hex["ok"], false, "subject keys must be hex: {not_hex}");
    // ... and the CLI's own fallback when no daemon answers (the real uid).
    assert!(fed.node_mut("west-midlands").stop().success());
    spoof(fed.node("west-midlands"));

    let dir = &fed.node("west-midlands").settings.paths.audit;
    let text = audit_lines(dir).join("\n");
    for leaked in ["chief.constable", "Jane Fakename", "07700 900123"] {
        assert!(!text.contains(leaked), "'{leaked}' reached the audit log");
    }
    let actors: Vec<String> = records(dir)
        .iter()
        .filter(|r| r["op"] == "consultation")
        .map(|r| r["actor"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        actors.len(),
        4,
        "three searches (one subject matched each) and one socket request: {actors:?}"
    );
    let me = format!("user:{}", real_user());
    assert!(
        actors.iter().all(|a| *a == me),
        "{actors:?} should all be {me}"
    );
    fed.node("west-midlands").assert_audit_verifies();
}

/// A referral made at `at` (offence and consent the same moment).
fn referral_made_at(source_ref: &str, at: DateTime<Utc>) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(&referral(source_ref, "london")).unwrap();
    let stamp = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    doc["referred_at"] = stamp.clone().into();
    doc["offence"]["date"] = at.date_naive().to_string().into();
    doc["consent"]["explicit"]["recorded_at"] = stamp.into();
    doc.to_string()
}

/// A referral whose `due_by` (referred_at + 2 working days) is `due`, if the calendar has one.
fn referral_due_at(source_ref: &str, due: DateTime<Utc>) -> Option<String> {
    let cal =
        refex::core::calendar::Calendar::from_toml(include_str!("../../config/bank-holidays.toml"))
            .unwrap();
    let at = (2..8)
        .map(|d| due - chrono::Duration::days(d))
        .find(|t| cal.due_by(*t) == due)?;
    Some(referral_made_at(source_ref, at))
}

fn deadline_records(dir: &Path, reason: &str) -> usize {
    records(dir)
        .iter()
        .filter(|r| r["op"] == "deadline" && r["reason"] == reason)
        .count()
}

#[test]
fn deadlines_missed_before_and_during_queueing_are_warned_and_recorded_once() {
    let now = Utc::now();
    let due_soon = now + chrono::Duration::seconds(8);
    let due_soon = DateTime::from_timestamp(due_soon.timestamp(), 0).unwrap();
    let Some(crossing) = referral_due_at("DUE-SOON", due_soon) else {
        eprintln!(
            "SKIPPED: {due_soon} is not a working day, so no referral can fall due within seconds"
        );
        return;
    };
    // Made a minute ago: due in two working days, on time throughout.
    let fresh = referral_made_at("DUE-LATER", now - chrono::Duration::minutes(1));
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    // london stays down: everything waits in the queue.
    fed.node_mut("west-midlands").start();
    let wm = fed.node("west-midlands");
    // The harness's standard referral was made in November: late at intake.
    wm.drop_file("late.json", referral("DUE-PAST", "london").as_bytes());
    wm.drop_file("soon.json", crossing.as_bytes());
    wm.drop_file("later.json", fresh.as_bytes());
    let dir = wm.settings.paths.audit.clone();
    wait_until(WAIT, "the late referral's record", || {
        deadline_records(&dir, "late_at_intake") == 1
    });
    wait_until(WAIT, "the crossing's record", || {
        deadline_records(&dir, "deadline_missed") >= 1
    });
    // Two sweeps later, still one record per envelope.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(deadline_records(&dir, "late_at_intake"), 1);
    assert_eq!(
        deadline_records(&dir, "deadline_missed"),
        1,
        "the one that crossed its due_by while queued, once (the late one has its own record)"
    );
    let log = wm.log_text();
    assert_eq!(log.matches("already past its due_by at intake").count(), 1);
    assert_eq!(
        log.matches("still queued past its Victims' Code due_by")
            .count(),
        1
    );
    let (_, status) = wm.status_json();
    assert_eq!(status["peers"]["london"]["past_due"], 2, "{status}");
    let queued = 3;
    assert_eq!(status["peers"]["london"]["queued"], queued, "{status}");
    // The receiver records the late arrivals when its peer comes back.
    fed.node_mut("london").start();
    let rdir = fed.node("london").settings.paths.audit.clone();
    wait_until(WAIT, "delivery", || {
        fed.node("london").inbox_files().len() == queued
    });
    wait_until(WAIT, "late arrivals on record", || {
        deadline_records(&rdir, "late_arrival") == 2
    });
    fed.node("west-midlands").assert_audit_verifies();
}

/// The window an earlier fix closed (sender: a stored receipt is completed again only with no
/// send in flight). A receipt whose records failed is completed again once a 1 s back-off ends;
/// a send that had stored its own receipt and was still between storing it and writing its
/// records must not be completed by that resume as well: its receipt and erasure records would
/// be written twice, the second pair after its erasure. Every send is held 5 s after storing its
/// receipt (`REFEX_HOLD_AT`), so the order is forced: A stores its receipt, B stores its own
/// about 2 s later, A's records fail (audit EIO), the EIO clears, and A's back-off ends while B
/// is still held.
#[test]
fn a_receipt_completed_again_after_an_audit_failure_leaves_a_send_in_flight_to_itself() {
    const HELD: &str = "REFEX_HOLD_AT: holding at sender_after_receipt_stored";
    const FAILED: &str = "receipt stored but its records or erasure failed";
    let mut fed = Federation::with_config(&["west-midlands", "london"], FAST);
    let flag = fed.dir.path().join("audit-eio");
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![
        ("REFEX_AUDIT_EIO_WHILE".into(), flag.display().to_string()),
        (
            "REFEX_HOLD_AT".into(),
            "sender_after_receipt_stored:5000".into(),
        ),
    ];
    wm.start();
    fed.node_mut("london").start();
    let refs = ["RESUME-A".to_owned(), "RESUME-B".to_owned()];
    let log = |fed: &Federation| fed.node("west-midlands").log_text();
    drop_all(fed.node("west-midlands"), &refs[..1], Duration::ZERO);
    wait_until(WAIT, "A's receipt to be stored", || {
        log(&fed).matches(HELD).count() == 1
    });
    // B's receipt is stored more than the back-off after A's, so B is still held when A's
    // back-off ends.
    std::thread::sleep(Duration::from_secs(2));
    drop_all(fed.node("west-midlands"), &refs[1..], Duration::ZERO);
    wait_until(WAIT, "B's receipt to be stored", || {
        log(&fed).matches(HELD).count() == 2
    });
    let before = log(&fed);
    assert!(
        !before.contains(FAILED) && !before.contains("delivered; receipt stored"),
        "A and B are both still held when the audit starts failing"
    );
    fs::write(&flag, b"").unwrap();
    wait_until(WAIT, "A's records to fail", || log(&fed).contains(FAILED));
    fs::remove_file(&flag).unwrap();
    let audit = fed.node("west-midlands").settings.paths.audit.clone();
    let envelope_of = |fed: &Federation, source_ref: &str| {
        fed.node("london")
            .inbox_docs()
            .iter()
            .find(|d| d["source_ref"] == source_ref)
            .and_then(|d| d["delivery"]["envelope_id"].as_str().map(str::to_owned))
            .unwrap()
    };
    let (a, b) = (envelope_of(&fed, &refs[0]), envelope_of(&fed, &refs[1]));
    let count = |op: &str, id: &str| {
        records(&audit)
            .iter()
            .filter(|r| r["op"] == op && r["envelope_id"] == id)
            .count()
    };
    // The window is open: B has stored its receipt and not yet written its records.
    assert_eq!(
        count("receipt", &b),
        0,
        "B is between its stored receipt and its records"
    );
    // Both completed: B by its own send, A by the resume (after B, with the fix; before B's
    // own completion, without it).
    wait_until(WAIT, "B's own completion and A's erasure", || {
        log(&fed).contains("delivered; receipt stored") && count("erasure", &a) > 0
    });
    assert_all_delivered_and_on_record(&mut fed, &refs, &audit);
    for (name, id) in [("A", &a), ("B", &b)] {
        assert_eq!(count("receipt", id), 1, "{name}: one receipt record");
        assert_eq!(count("erasure", id), 1, "{name}: one erasure record");
    }
}
