//! Day-2 operations against real daemons: the systemd notify protocol through a real
//! `NOTIFY_SOCKET`, the watchdog tied to progress, format markers checked at start, and
//! backup/restore of a node's state.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::harness::{referral, source_refs, wait_until, Federation};

const WAIT: Duration = Duration::from_secs(30);

/// Datagrams received on `sock` until `until` matches one (or the time is up).
fn collect_until(sock: &UnixDatagram, seen: &mut Vec<String>, until: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(&until);
            seen.push(msg);
            if done {
                return;
            }
        }
    }
    panic!("no matching notification; got {seen:?}");
}

#[test]
fn systemd_hears_ready_reloading_ready_watchdog_and_stopping() {
    let mut fed = Federation::new(&["west-midlands"]);
    let sock_path = fed.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    // Pings every second, each only if every loop beat within the last two seconds.
    wm.extra_env
        .push(("WATCHDOG_USEC".into(), "4000000".into()));
    wm.start();
    let mut seen = Vec::new();
    collect_until(&sock, &mut seen, |l| l == "READY=1");
    collect_until(&sock, &mut seen, |l| l == "WATCHDOG=1");
    // Load while the watchdog runs: referrals keep it pinging (progress, not idleness).
    wm.drop_file("a.json", referral("D2-1", "west-midlands").as_bytes());
    collect_until(&sock, &mut seen, |l| l == "WATCHDOG=1");

    seen.clear();
    wm.hangup();
    collect_until(&sock, &mut seen, |l| l == "READY=1");
    let reload: Vec<&str> = seen
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| *l != "WATCHDOG=1")
        .collect();
    assert_eq!(reload.first(), Some(&"RELOADING=1"), "{seen:?}");
    assert!(
        reload.iter().any(|l| l.starts_with("MONOTONIC_USEC=")
            && l["MONOTONIC_USEC=".len()..].parse::<u64>().is_ok()),
        "{seen:?}"
    );
    assert_eq!(reload.last(), Some(&"READY=1"), "{seen:?}");

    seen.clear();
    // SIGTERM and wait; the datagram stays queued on the socket.
    assert!(wm.stop().success());
    collect_until(&sock, &mut seen, |l| l == "STOPPING=1");
}

#[test]
fn a_state_directory_from_a_newer_version_is_refused_at_start_with_exit_78() {
    let mut fed = Federation::new(&["west-midlands"]);
    let wm = fed.node_mut("west-midlands");
    wm.start();
    assert!(wm.stop().success());
    let marker = wm.settings.paths.state.join("FORMAT");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "refex-state 1\n");
    assert_eq!(
        std::fs::read_to_string(wm.settings.paths.audit.join("FORMAT")).unwrap(),
        "refex-audit 1\n"
    );
    std::fs::write(&marker, "refex-state 9\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refex"))
        .arg("run")
        .arg("--config")
        .arg(&wm.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&marker.display().to_string())
            && err.contains("'refex-state 9'")
            && err.contains("supports only 'refex-state 1'"),
        "{err}"
    );
}

#[test]
fn a_backup_taken_under_load_restores_and_its_queue_is_delivered_exactly_once() {
    let mut fed = Federation::new(&["west-midlands", "greater-manchester"]);
    fed.node_mut("west-midlands").start();
    let backup_dir = fed.dir.path().join("backup-wm");
    let backup_arg = backup_dir.display().to_string();
    // Greater Manchester is down: referrals for it stay queued in West Midlands' store.
    let queued: Vec<String> = (0..20).map(|i| format!("BK-{i:02}")).collect();
    {
        let wm = fed.node("west-midlands");
        for r in &queued {
            wm.drop_file(
                &format!("{r}.json"),
                referral(r, "greater-manchester").as_bytes(),
            );
        }
        wait_until(WAIT, "intake to take every file", || {
            wm.outbox_files().is_empty()
        });
        // More keep arriving while the backup is taken (they may or may not be in it).
        for i in 0..10 {
            let r = format!("LATE-{i:02}");
            wm.drop_file(
                &format!("{r}.json"),
                referral(&r, "greater-manchester").as_bytes(),
            );
        }
        let (code, out, err) = wm.cli(&["state", "backup", "--to", &backup_arg]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("written by the daemon") && out.contains("keys NOT included"),
            "{out}"
        );
        assert!(!backup_dir.join("keys").exists());
        assert!(
            !err.contains('\u{1b}') && !out.contains('\u{1b}'),
            "no escape codes off a terminal"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(backup_dir.join("MANIFEST.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["area"], "west-midlands");
        assert!(manifest["files"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("audit/audit-")));

        let (code, out, err) = wm.cli(&["state", "restore", "--from", &backup_arg]);
        assert_ne!(code, 0, "restore while running must be refused: {out}");
        assert!(err.contains("stop the daemon"), "{err}");
    }
    let wm = fed.node_mut("west-midlands");
    assert!(wm.stop().success());
    // Lose the node's state entirely, then restore it.
    std::fs::remove_dir_all(&wm.settings.paths.state).unwrap();
    std::fs::remove_dir_all(&wm.settings.paths.audit).unwrap();
    let (code, out, err) = wm.cli(&["state", "restore", "--from", &backup_arg]);
    assert_eq!(code, 0, "{out}{err}");
    wm.start();
    fed.node_mut("greater-manchester").start();
    let gm = fed.node("greater-manchester");
    wait_until(WAIT, "every backed-up referral delivered", || {
        let got = source_refs(&gm.inbox_docs());
        queued.iter().all(|r| got.contains(r))
    });
    wait_until(WAIT, "the queue to drain", || {
        fed.node("west-midlands")
            .try_status_json()
            .and_then(|v| v["peers"]["greater-manchester"]["queued"].as_u64())
            == Some(0)
    });
    let got = source_refs(&gm.inbox_docs());
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(got, dedup, "a referral was delivered twice");
    for node in &mut fed.nodes {
        assert!(node.stop().success());
        let (code, out, err) = node.cli(&["audit", "verify"]);
        assert_eq!(code, 0, "{}: audit verify failed: {out}{err}", node.area);
    }
}

#[test]
fn a_backup_of_a_stopped_node_with_keys_and_a_tampered_backup_is_refused() {
    let mut fed = Federation::new(&["west-midlands"]);
    let wm = fed.node_mut("west-midlands");
    wm.start();
    assert!(wm.stop().success());
    let dir = fed.dir.path().join("b");
    let arg = dir.display().to_string();
    let (code, out, err) =
        fed.node("west-midlands")
            .cli(&["state", "backup", "--to", &arg, "--with-keys"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("daemon not running") && out.contains("keys included"),
        "{out}"
    );
    assert!(dir.join("keys").read_dir().unwrap().count() == 3);
    // A backup into a non-empty directory is refused.
    let (code, _, err) = fed
        .node("west-midlands")
        .cli(&["state", "backup", "--to", &arg]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    // One flipped byte in the backup: restore names the file and changes nothing.
    let audit_file = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit-")
        })
        .unwrap();
    let mut bytes = std::fs::read(&audit_file).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&audit_file, bytes).unwrap();
    let (code, _, err) = fed
        .node("west-midlands")
        .cli(&["state", "restore", "--from", &arg]);
    assert_ne!(code, 0);
    assert!(err.contains("SHA-256 does not match"), "{err}");
    let (code, out, err) = fed.node("west-midlands").cli(&["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
}
