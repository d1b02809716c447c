//! What refex leaves on disk: every directory it creates is at most 0750 and every file at most
//! 0640 (keys 0600), whatever umask the caller had.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation};

/// Every path under `dir` whose mode grants more than `max_dir` (directories) or `max_file`
/// (regular files). Sockets are skipped (the control socket is 0660 by design).
fn too_open(dir: &Path, max_dir: u32, max_file: u32, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if mode & !max_dir != 0 {
                out.push(format!("{} is {mode:o}", e.path().display()));
            }
            too_open(&e.path(), max_dir, max_file, out);
        } else if meta.is_file() && mode & !max_file != 0 {
            out.push(format!("{} is {mode:o}", e.path().display()));
        } else if meta.file_type().is_socket() {
            continue;
        }
    }
}

#[test]
fn everything_refex_creates_is_0750_or_0640_at_most() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        "[intake]\nsettle_ms = 100\nrescan_ms = 500\n",
    );
    fed.start_all();
    let wm = fed.node("west-midlands");
    wm.drop_file("ok.json", referral("MODES-1", "london").as_bytes());
    wm.drop_file("bad.json", b"{ not json");
    wait_until(Duration::from_secs(60), "delivery and refusal", || {
        fed.node("london").inbox_files().len() == 1 && wm.rejected_files().len() >= 2
    });
    assert!(fed.node_mut("west-midlands").stop().success());
    assert!(fed.node_mut("london").stop().success());
    let mut bad = Vec::new();
    for n in &fed.nodes {
        let p = &n.settings.paths;
        for d in [&p.state, &p.audit, &p.inbox] {
            too_open(d, 0o750, 0o640, &mut bad);
        }
        too_open(&p.outbox.join("rejected"), 0o750, 0o640, &mut bad);
        for key in [
            &n.settings.keys.signing_key,
            &n.settings.keys.subject_secret,
        ] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    assert!(bad.is_empty(), "too open: {bad:#?}");
}
