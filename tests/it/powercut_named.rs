//! Power cuts at named operations: the process kills itself at a crash point just before or
//! just after the operation (REFEX_CRASH_AT), every daemon is killed at once and LazyFS drops
//! everything not fsynced (`clear-cache`) — the power cut lands exactly there. The operations:
//! the outbox unlink (intake), the store's fsync (group commit), the audit append (sender and
//! receiver) and the inbox rename (publish). One federation on one LazyFS mount takes every cut
//! in turn; at the end the history checker, `refex audit verify` on both sides, and the store
//! opens.

use std::fs;
use std::time::Duration;

use crate::harness::wait_until;

/// (node, crash point[:pass]) — before and after each named operation.
const CUTS: &[(&str, &str)] = &[
    ("west-midlands", "intake_before_delete"),
    ("west-midlands", "intake_after_delete"),
    ("west-midlands", "store_before_sync:3"),
    ("west-midlands", "store_after_sync:3"),
    ("west-midlands", "audit_before_append:3"),
    ("west-midlands", "audit_after_append:3"),
    ("london", "receiver_after_seen"),
    ("london", "receiver_before_reply"),
    ("london", "audit_before_append:2"),
    ("london", "audit_after_append:2"),
];

#[test]
fn power_cuts_at_named_operations_lose_and_duplicate_nothing() {
    let Some((mut fed, mut lfs, mut provider)) = crate::powercut::on_lazyfs() else {
        return;
    };
    let mut k = 0;
    for (cut, (area, point)) in CUTS.iter().enumerate() {
        fed.node_mut(area).extra_env = vec![("REFEX_CRASH_AT".into(), (*point).into())];
        fed.start_all();
        let outbox = fed.node("west-midlands").outbox().to_owned();
        for _ in 0..4 {
            provider.hand_over(&outbox, &format!("n-{k}.json"), &format!("NC-{k}"));
            k += 1;
        }
        let name = point.split(':').next().unwrap_or(point);
        let needle = format!("aborting at {name}");
        let node = fed.node(area);
        wait_until(Duration::from_secs(60), &needle, || {
            lfs.assert_alive();
            node.log_text().contains(&needle)
        });
        // The power cut: every process dies at once, then everything unsynced is gone.
        for n in &mut fed.nodes {
            n.kill();
        }
        lfs.clear_cache();
        fed.node_mut(area).extra_env.clear();
        eprintln!("named power cut {cut}: {area} at {point}, {k} handed over so far");
    }
    fed.start_all();
    crate::powercut::drain_stop_and_verify(&mut fed, &mut lfs);
    crate::powercut::assert_exactly_once(&fed, &provider.handed);
    fed.node_mut("london").start();
    assert!(fed.node_mut("london").stop().success());
    eprintln!("LazyFS at the end: {}", lfs.memory());
    drop(lfs);
}

/// LazyFS itself killed at a named operation (its `crash` fault: the filesystem dies just
/// before the operation, with everything unsynced): before an inbox file's publishing rename,
/// then before a fsync of the sender's store. Each time the daemons are killed, the same backing
/// directory is mounted again and they restart; at the end every referral arrived exactly once.
/// (It was ignored for a while: under load the batch after the remount "never drained" because
/// a `.fuse_hidden*` file stayed in the outbox — the test's provider still held a file open when
/// refex took and unlinked it, FUSE renames such a file until the handle closes, and the mount
/// died first. refex ignores dot-named files, as the contract says; the provider now closes its
/// file before the rename. 2 of 16 runs failed that way (8 at once beside two busy loops);
/// 32 of 32 pass since (beside two and three).)
#[test]
fn lazyfs_killed_at_a_named_operation_loses_and_duplicates_nothing() {
    let Some((mut fed, mut lfs, mut provider)) = crate::powercut::on_lazyfs() else {
        return;
    };
    let faults = [
        // `from_rgx` too: LazyFS (multi-path ops) never fires a crash fault given only `to_rgx`
        // (its check compares the source path with the literal regex "none").
        r"lazyfs::crash::timing=before::op=rename::from_rgx=.*::to_rgx=london/inbox/[^./][^/]*\.json",
        "lazyfs::crash::timing=before::op=fsync::from_rgx=west-midlands/state/",
    ];
    let mut k = 0;
    let mut uncertain = Vec::new();
    fed.start_all();
    for fault in faults {
        let outbox = fed.node("west-midlands").outbox().to_owned();
        // Delivered first, so the fault lands mid-run, not at start-up.
        for _ in 0..3 {
            provider.hand_over(&outbox, &format!("c-{k}.json"), &format!("LC-{k}"));
            k += 1;
        }
        let wm = fed.node("west-midlands");
        let drained = refex::edge::harness::wait_for(Duration::from_secs(60), || {
            lfs.assert_alive();
            wm.outbox_files().is_empty() && crate::history::queue_is_empty(wm)
        });
        if !drained {
            // What is left, for the diagnosis (see the ignore reason).
            let (_, status, _) = wm.cli(&["status", "--json"]);
            let left: Vec<String> = fs::read_dir(&outbox)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            panic!("the first batch did not drain in 60 s: outbox holds {left:?}; status {status}");
        }
        lfs.command(fault);
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..4 {
            // The provider's hand-over fails once the mount is dead: not handed over.
            let name = format!("c-{k}.json");
            let r = format!("LC-{k}");
            k += 1;
            if lfs.has_exited() {
                break;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                provider.hand_over(&outbox, &name, &r)
            }))
            .is_err()
            {
                // Its outcome is unknown to the provider (the rename may have landed before
                // the directory fsync failed): delivered at most once, checked at the end.
                uncertain.push(r);
                break;
            }
        }
        wait_until(
            Duration::from_secs(60),
            "LazyFS to die at the fault",
            || lfs.has_exited(),
        );
        for n in &mut fed.nodes {
            n.kill();
        }
        eprintln!(
            "LazyFS killed at '{fault}', {} handed over so far",
            provider.handed.len()
        );
        lfs.remount();
        // The provider's own recovery: a hand-over that failed when the mount died may have
        // left its temporary file (fsynced before the rename). refex rightly ignores it (a
        // provider's temp name); the provider removes it, as it would after its own crash.
        for e in fs::read_dir(&outbox).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(e.path()).unwrap();
            }
        }
        fed.start_all();
    }
    crate::powercut::drain_stop_and_verify(&mut fed, &mut lfs);
    // An interrupted hand-over that did land counts as handed over: exactly once, like any other.
    let delivered: Vec<String> = fed
        .node("london")
        .inbox_docs()
        .iter()
        .filter_map(|d| d["source_ref"].as_str().map(str::to_owned))
        .collect();
    let mut handed = provider.handed.clone();
    handed.extend(uncertain.into_iter().filter(|r| delivered.contains(r)));
    crate::powercut::assert_exactly_once(&fed, &handed);
    drop(lfs);
}
