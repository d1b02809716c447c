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

/// Asserts: the last write to a file matching `target` before line `at` was followed by a
/// completed sync of that file before `at`.
fn assert_synced_before(calls: &[Call], at: usize, target: &dyn Fn(&str) -> bool, what: &str) {
    let last_write = calls
        .iter()
        .filter(|c| is_write(c) && c.end < at && target(fd_path(c)))
        .map(|c| c.end)
        .max();
    let Some(w) = last_write else {
        panic!("no write to {what} before line {at}")
    };
    let synced = calls
        .iter()
        .any(|c| is_sync(c) && target(fd_path(c)) && c.end > w && c.end < at);
    assert!(
        synced,
        "{what}: written at trace line {w} but not synced before the acknowledgement at line {at}"
    );
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
            "strace", "-f", "-y", "-o", &out.display().to_string(),
            "-e", "trace=fsync,fdatasync,syncfs,sync_file_range,rename,renameat,renameat2,unlink,unlinkat,pwrite64,write",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        node.start();
    }
    for i in 0..4 {
        let name = format!("d{i}.json");
        fed.node("west-midlands")
            .drop_file(&name, referral(&format!("DUR-{i}"), "london").as_bytes());
        wait_until(Duration::from_secs(60), "the referral to arrive", || {
            fed.node("london").inbox_files().len() == i + 1
        });
    }
    for node in &mut fed.nodes {
        assert!(node.stop().success());
    }

    // Sender: each outbox file is deleted only after the store and the audit log are synced.
    let trace = std::fs::read_to_string(traces.join("west-midlands.strace")).unwrap();
    let calls = parse(&trace);
    let unlinks: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            c.name.starts_with("unlink") && c.args.contains("/outbox/d") && c.args.contains(".json")
        })
        .collect();
    assert_eq!(unlinks.len(), 4, "each dropped file is deleted once");
    for u in &unlinks {
        assert_synced_before(
            &calls,
            u.start,
            &|p: &str| p.ends_with("/state/db/db"),
            "the sender's store",
        );
        assert_synced_before(
            &calls,
            u.start,
            &|p: &str| p.contains("/audit/audit-"),
            "the sender's audit log",
        );
    }

    // Receiver: each inbox file is synced before it is renamed into place, the accepted-id record
    // is synced before that, and the directory is synced after the rename.
    let trace = std::fs::read_to_string(traces.join("london.strace")).unwrap();
    let calls = parse(&trace);
    let renames: Vec<&Call> = calls
        .iter()
        .filter(|c| c.name.starts_with("rename") && c.args.contains("/inbox/."))
        .collect();
    assert_eq!(renames.len(), 4, "each inbox file is published once");
    for r in &renames {
        let tmp = r.args.split('"').nth(1).unwrap_or("").to_owned();
        assert!(
            calls
                .iter()
                .any(|c| c.name == "fsync" && fd_path(c) == tmp && c.end < r.start),
            "inbox file {tmp} not fsynced before its rename"
        );
        assert_synced_before(
            &calls,
            r.start,
            &|p: &str| p.ends_with("/state/db/db"),
            "the receiver's store",
        );
        assert_synced_before(
            &calls,
            r.start,
            &|p: &str| p.contains("/audit/audit-"),
            "the receiver's audit log",
        );
        assert!(
            calls
                .iter()
                .any(|c| c.name == "fsync" && fd_path(c).ends_with("/inbox") && c.start > r.end),
            "inbox directory not fsynced after the rename"
        );
    }
}
