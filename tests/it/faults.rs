//! Disk faults beyond a full volume: an I/O error on the store's fsync (fsyncgate) and a state
//! volume that turns read-only. In both the daemon exits (status `EXIT_STORE_LOST`) with one
//! clear ERROR, acknowledging nothing; restarted once the volume works, it delivers every
//! referral exactly once (history checker, strict but for one known property, see
//! `finish_strict`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{referral, wait_until, Federation, Node};

const WAIT: Duration = Duration::from_secs(60);
const FATAL: &str = "state store flush/sync failed";

fn hand_over(fed: &Federation, handed: &mut Vec<String>, prefix: &str, n: usize) {
    for i in 0..n {
        let r = format!("{prefix}-{i}");
        fed.node("west-midlands")
            .drop_file(&format!("{r}.json"), referral(&r, "london").as_bytes());
        handed.push(r);
    }
}

/// Waits until the daemon has exited by itself (a zombie), then reaps it.
fn wait_exit(node: &mut Node) -> std::process::ExitStatus {
    let pid = node.pid();
    wait_until(WAIT, "the daemon to exit by itself", || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    });
    node.stop()
}

fn finish_strict(fed: &mut Federation, handed: &[String]) {
    let wm = fed.node("west-midlands");
    wait_until(WAIT, "the outbox to empty", || wm.outbox_files().is_empty());
    wait_until(WAIT, "the queue to drain", || {
        crate::history::queue_is_empty(wm)
    });
    fed.stop_all_and_verify();
    crate::history::check_nodes(handed, fed.node("west-midlands"), fed.node("london")).assert(
        &crate::history::Required::all_but(&[
            // Known, reported: the sender records a receipt's erasure before the store has
            // synced the receipt; when that sync fails the restart sends the envelope again
            // (the receiver answers it as a duplicate, no second inbox file) and records a
            // second transfer after the first erasure. Everything else is strict.
            crate::history::Property::NothingAfterErasure,
        ]),
    );
}

/// Points a node's state directory at `dir`; the control socket stays where it was.
fn set_state_dir(node: &mut Node, dir: &Path) {
    let sock = node.settings.control_socket.clone();
    let mut doc: toml::Table = fs::read_to_string(&node.config).unwrap().parse().unwrap();
    let paths = doc
        .entry("paths")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = paths {
        t.insert(
            "state".into(),
            toml::Value::String(dir.display().to_string()),
        );
    }
    let control = doc
        .entry("control")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = control {
        t.insert(
            "socket".into(),
            toml::Value::String(sock.display().to_string()),
        );
    }
    fs::write(&node.config, toml::to_string(&doc).unwrap()).unwrap();
    node.settings = refex::node::settings::Settings::load(&node.config).unwrap();
}

fn inbox_count(fed: &Federation) -> usize {
    fed.node("london").inbox_files().len()
}

#[test]
fn an_eio_on_the_store_sync_acknowledges_nothing_and_the_restart_delivers_once() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        crate::harness::FAST_CRASH_CONFIG,
    );
    let flag = fed.dir.path().join("store-eio.flag");
    fed.node_mut("london").start();
    let wm = fed.node_mut("west-midlands");
    wm.extra_env = vec![("REFEX_STORE_EIO_WHILE".into(), flag.display().to_string())];
    wm.start();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "EIO-A", 3);
    wait_until(WAIT, "the first three delivered", || inbox_count(&fed) == 3);
    fs::write(&flag, b"").unwrap();
    hand_over(&fed, &mut handed, "EIO-B", 5);
    let wm = fed.node_mut("west-midlands");
    let status = wait_exit(wm);
    assert_eq!(
        status.code(),
        Some(refex::adapters::store::EXIT_STORE_LOST),
        "a failed store sync ends the process for a restart"
    );
    let log = wm.log_text();
    assert_eq!(log.matches(FATAL).count(), 1, "one clear ERROR: {log}");
    assert!(log.contains("ERROR"), "logged at ERROR: {log}");
    // Nothing after the failed sync was acknowledged: those files are all still there.
    let left = wm.outbox_files().len();
    assert!(left > 0, "an outbox file was deleted after the failed sync");
    fs::remove_file(&flag).unwrap();
    wm.start();
    finish_strict(&mut fed, &handed);
}

/// A small ext4 volume on a loop device, mounted with `errors=remount-ro`, so it can be made to
/// turn read-only under a running daemon (ext4's `trigger_fs_error`), as a failing disk would.
struct Ext4Vol {
    image: PathBuf,
    mnt: PathBuf,
}

impl Ext4Vol {
    fn new(dir: &Path) -> Self {
        let (image, mnt) = (dir.join("state.img"), dir.join("statevol"));
        fs::create_dir_all(&mnt).unwrap();
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            ok(Command::new("truncate").arg("-s").arg("64m").arg(&image))
                && ok(Command::new("mkfs.ext4").arg("-q").arg(&image)),
            "making an ext4 image failed (needs e2fsprogs)"
        );
        let me = Self { image, mnt };
        me.mount();
        me
    }
    fn mount(&self) {
        let st = Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a loop device failed: this test needs root"
        );
    }
    fn device(&self) -> String {
        let o = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.mnt)
            .output()
            .unwrap();
        let src = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        src.rsplit('/').next().unwrap_or_default().to_owned()
    }
    /// The volume turns read-only (an ext4 error with `errors=remount-ro`).
    fn fail(&self) {
        let p = format!("/sys/fs/ext4/{}/trigger_fs_error", self.device());
        fs::write(&p, "refex test: simulated disk error").unwrap();
    }
    /// The operator's repair: unmount, fsck, mount again (ext4 refuses `remount,rw` after an
    /// error).
    fn repair(&self) {
        assert!(Command::new("umount")
            .arg(&self.mnt)
            .status()
            .unwrap()
            .success());
        let _ = Command::new("e2fsck").arg("-fy").arg(&self.image).output();
        self.mount();
    }
}

impl Drop for Ext4Vol {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn a_read_only_state_volume_stops_the_node_with_one_error_and_a_restart_recovers() {
    let mut fed = Federation::with_config(
        &["west-midlands", "london"],
        crate::harness::FAST_CRASH_CONFIG,
    );
    let vol = Ext4Vol::new(fed.dir.path());
    let state = vol.mnt.join("state");
    fs::create_dir(&state).unwrap();
    fed.node_mut("london").start();
    let wm = fed.node_mut("west-midlands");
    set_state_dir(wm, &state);
    wm.start();
    let mut handed = Vec::new();
    hand_over(&fed, &mut handed, "RO-A", 3);
    wait_until(WAIT, "the first three delivered", || inbox_count(&fed) == 3);
    vol.fail();
    hand_over(&fed, &mut handed, "RO-B", 5);
    let wm = fed.node_mut("west-midlands");
    let status = wait_exit(wm);
    assert_eq!(
        status.code(),
        Some(refex::adapters::store::EXIT_STORE_LOST),
        "a read-only state volume ends the process for a restart"
    );
    let log = wm.log_text();
    assert_eq!(log.matches(FATAL).count(), 1, "one clear ERROR: {log}");
    // A sync already in flight when ext4 aborts its journal fails with EIO; any later write
    // or sync with EROFS. Either way the device's own error is named.
    assert!(
        log.contains("Read-only file system") || log.contains("Input/output error"),
        "the cause is named: {log}"
    );
    assert!(
        !wm.outbox_files().is_empty(),
        "files were acknowledged on a read-only store"
    );
    // Restarted while still read-only (systemd's Restart=on-failure), it cannot open the store
    // (or its first sync fails again) and exits non-zero — a status systemd restarts, not 78
    // (EX_CONFIG, which RestartPreventExitStatus stops) — and still acknowledges nothing.
    let before = wm.outbox_files().len();
    wm.start_expecting_exit();
    let again = wait_exit(wm);
    assert!(
        !again.success() && again.code() != Some(78),
        "a start on the read-only volume: {again:?}"
    );
    assert_eq!(
        wm.outbox_files().len(),
        before,
        "acknowledged on a read-only store"
    );
    let log = wm.log_text();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .unwrap_or("");
    assert!(
        last.contains("Read-only file system"),
        "the restart names the cause: {last}"
    );
    vol.repair();
    wm.start();
    finish_strict(&mut fed, &handed);
}
