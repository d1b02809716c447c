//! Real durability, shown with strace: every acknowledgement (outbox file deleted, inbox file
//! published) happens only after the data behind it is on the device — an fdatasync/fsync that
//! completed after the last write, not sled's `sync_file_range` flush alone.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation};

/// One traced system call: name, argument text, and the trace lines where it started and ended.
#[derive(Debug)]
struct Call {
    name: String,
    args: String,
    start: usize,
    end: usize,
}

/// Parses `strace -f -y` output, joining `<unfinished ...>` with `<... resumed>` lines.
fn parse(trace: &str) -> Vec<Call> {
    let mut open: HashMap<String, (String, String, usize)> = HashMap::new();
    let mut calls = Vec::new();
    for (i, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("<... ") {
            let name = r.split_whitespace().next().unwrap_or("").to_owned();
            if let Some((n, args, start)) = open.remove(pid) {
                if n == name {
                    calls.push(Call {
                        name: n,
                        args,
                        start,
                        end: i,
                    });
                }
            }
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if rest.ends_with("<unfinished ...>") {
            open.insert(pid.to_owned(), (name.to_owned(), args.to_owned(), i));
        } else if rest.contains(") = ") {
            calls.push(Call {
                name: name.to_owned(),
                args: args.to_owned(),
                start: i,
                end: i,
            });
        }
    }
    calls
}

fn is_sync(c: &Call) -> bool {
    matches!(c.name.as_str(), "fsync" | "fdatasync" | "syncfs") && !c.args.contains("= -1")
}

fn is_write(c: &Call) -> bool {
    matches!(
        c.name.as_str(),
        "pwrite64" | "write" | "pwritev" | "pwritev2" | "writev"
    )
}

/// The first argument's path as strace -y prints it: `7</path/to/file>`.
fn fd_path(c: &Call) -> &str {
    c.args
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(p, _)| p)
        .unwrap_or("")
}

/// The first write to a file matching `target` whose traced bytes match `carries`: the write
/// that carried one referral's own record (`what` names it in the failure).
fn write_carrying<'a>(
    calls: &'a [Call],
    target: &dyn Fn(&str) -> bool,
    carries: &dyn Fn(&str) -> bool,
    what: &str,
) -> &'a Call {
    calls
        .iter()
        .filter(|c| is_write(c) && target(fd_path(c)) && carries(&c.args))
        .min_by_key(|c| c.start)
        .unwrap_or_else(|| panic!("no write carries {what}"))
}

/// Asserts: `write` ended before line `at` and a sync of the same file started after it ended
/// and completed before `at`. Other referrals' records may be written at any time in between
/// (files, envelopes and receipts move concurrently), so the check follows this referral's own
/// write, not merely the last write before `at`.
fn assert_synced_before(
    calls: &[Call],
    write: &Call,
    at: usize,
    target: &dyn Fn(&str) -> bool,
    what: &str,
) {
    let w = write.end;
    assert!(
        w < at,
        "{what}: the record is written at trace line {w}, after the acknowledgement at line {at}"
    );
    let synced = calls
        .iter()
        .any(|c| is_sync(c) && target(fd_path(c)) && c.start > w && c.end < at);
    assert!(
        synced,
        "{what}: written at trace line {w} but not synced before the acknowledgement at line {at}"
    );
}

/// The 64 hex digits after `"field":"` in a traced JSON line (strace escapes the quotes).
fn traced_field(args: &str, field: &str) -> String {
    let key = format!("\\\"{field}\\\":\\\"");
    let at = args
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} in the traced record"));
    args[at + key.len()..].chars().take(64).collect()
}

/// Whether a traced sled write holds the envelope of `subject` in state `queued` (its release by
/// intake): the record's CBOR names its state shortly before its subject key.
fn released(args: &str, subject: &str) -> bool {
    args.match_indices(subject).any(|(at, _)| {
        let before = &args[at.saturating_sub(400)..at];
        before
            .rfind("estate")
            .is_some_and(|s| before[s..].starts_with("estatefqueued"))
    })
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn acknowledgements_follow_device_syncs() {
    assert!(
        strace_available(),
        "strace is needed (installed by .ci/run: apt-get install strace)"
    );
    let mut fed =
        Federation::with_config(&["west-midlands", "london"], "[intake]\nsettle_ms = 100\n");
    let traces = fed.dir.path().to_owned();
    for node in &mut fed.nodes {
        let out = traces.join(format!("{}.strace", node.area));
        node.wrapper = [
            "strace", "-f", "-y", "-s", "16384", "-o", &out.display().to_string(),
            "-e", "trace=fsync,fdatasync,syncfs,sync_file_range,rename,renameat,renameat2,unlink,unlinkat,pwrite64,write",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        node.start();
    }
    let mut file_digests = Vec::new();
    for i in 0..4 {
        let name = format!("d{i}.json");
        let body = referral(&format!("DUR-{i}"), "london");
        file_digests.push((
            name.clone(),
            hex::encode(refex::core::digest::sha256(body.as_bytes())),
        ));
        fed.node("west-midlands").drop_file(&name, body.as_bytes());
        wait_until(Duration::from_secs(60), "the referral to arrive", || {
            fed.node("london").inbox_files().len() == i + 1
        });
    }
    for node in &mut fed.nodes {
        assert!(node.stop().success());
    }

    // Sender: each outbox file is deleted only after its own records are synced: the audit
    // record of its collection (found by the file's SHA-256) and its envelope in the store
    // (found by the subject key that record names).
    let trace = std::fs::read_to_string(traces.join("west-midlands.strace")).unwrap();
    let calls = parse(&trace);
    let store = |p: &str| p.ends_with("/state/db/db");
    let audit = |p: &str| p.contains("/audit/audit-");
    let mut envelope_ids = Vec::new();
    for (name, sha) in &file_digests {
        let unlinks: Vec<&Call> = calls
            .iter()
            .filter(|c| {
                c.name.starts_with("unlink") && c.args.contains(&format!("/outbox/{name}\""))
            })
            .collect();
        assert_eq!(unlinks.len(), 1, "{name} is deleted once");
        let at = unlinks[0].start;
        let record = write_carrying(
            &calls,
            &audit,
            &|a: &str| a.contains(sha.as_str()),
            &format!("the collection record of {name}"),
        );
        assert_synced_before(&calls, record, at, &audit, "the sender's audit log");
        let subject = traced_field(&record.args, "subject_key");
        let release = write_carrying(
            &calls,
            &store,
            &|a: &str| released(a, &subject),
            &format!("the release of {name}'s envelope in the store"),
        );
        assert_synced_before(&calls, release, at, &store, "the sender's store (release)");
        envelope_ids.push(traced_field(&record.args, "envelope_id")[..32].to_owned());
    }

    // Receiver: each inbox file is synced before it is renamed into place, its envelope's
    // accepted-id record in the store and every audit record of its envelope are synced before
    // that, and the directory is synced after the rename.
    let trace = std::fs::read_to_string(traces.join("london.strace")).unwrap();
    let calls = parse(&trace);
    let renames: Vec<&Call> = calls
        .iter()
        .filter(|c| c.name.starts_with("rename") && c.args.contains("/inbox/."))
        .collect();
    assert_eq!(renames.len(), 4, "each inbox file is published once");
    let mut published = Vec::new();
    for r in &renames {
        let tmp = r.args.split('"').nth(1).unwrap_or("").to_owned();
        let id = tmp
            .trim_end_matches(".json.tmp")
            .rsplit('-')
            .next()
            .unwrap_or("")
            .to_owned();
        published.push(id.clone());
        assert!(
            calls
                .iter()
                .any(|c| c.name == "fsync" && fd_path(c) == tmp && c.end < r.start),
            "inbox file {tmp} not fsynced before its rename"
        );
        let accepted = write_carrying(
            &calls,
            &store,
            &|a: &str| a.contains(id.as_str()),
            &format!("the accepted-id record of {id}"),
        );
        assert_synced_before(&calls, accepted, r.start, &store, "the receiver's store");
        let records: Vec<&Call> = calls
            .iter()
            .filter(|c| is_write(c) && audit(fd_path(c)) && c.args.contains(&id))
            .filter(|c| c.start < r.start)
            .collect();
        let text: String = records.iter().map(|c| c.args.as_str()).collect();
        assert!(
            text.contains("collection") && text.contains("written_to_inbox"),
            "the receiver's audit log: collection and disclosure of {id} before its rename"
        );
        for w in records {
            assert_synced_before(&calls, w, r.start, &audit, "the receiver's audit log");
        }
        assert!(
            calls
                .iter()
                .any(|c| c.name == "fsync" && fd_path(c).ends_with("/inbox") && c.start > r.end),
            "inbox directory not fsynced after the rename"
        );
    }
    published.sort();
    envelope_ids.sort();
    assert_eq!(
        published, envelope_ids,
        "london publishes the envelopes the sender made"
    );
}

/// The checks above on a hand-made trace: the same record synced before and after its
/// acknowledgement, and a later write of another referral's record in between.
#[test]
fn the_sync_check_follows_the_referrals_own_record() {
    let trace = |sync_first: bool| {
        let write = r#"7 write(15</n/audit/audit-2026-12-04-00.jsonl>, "{\"source_file_sha256\":\"ab\"}", 30) = 30"#;
        let sync = "7 fdatasync(15</n/audit/audit-2026-12-04-00.jsonl>) = 0";
        let other =
            r#"7 write(15</n/audit/audit-2026-12-04-00.jsonl>, "{\"op\":\"receipt\"}", 17) = 17"#;
        let unlink = r#"9 unlink("/n/outbox/d0.json") = 0"#;
        let lines = if sync_first {
            [write, sync, other, unlink, sync]
        } else {
            [write, other, unlink, sync, sync]
        };
        parse(&lines.join("\n"))
    };
    let audit = |p: &str| p.contains("/audit/audit-");
    let at = |calls: &[Call]| calls.iter().find(|c| c.name == "unlink").unwrap().start;

    let carries = |a: &str| a.contains("source_file_sha256");
    let good = trace(true);
    let w = write_carrying(&good, &audit, &carries, "the record");
    assert_synced_before(&good, w, at(&good), &audit, "audit");

    let bad = trace(false);
    let w = write_carrying(&bad, &audit, &carries, "the record");
    let failed = std::panic::catch_unwind(|| {
        assert_synced_before(&bad, w, at(&bad), &audit, "audit");
    });
    assert!(
        failed.is_err(),
        "a record synced only after the unlink must fail the check"
    );
}
