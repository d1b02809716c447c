//! Tests of the outbox watcher and of the ways a file leaves the outbox.

use std::io::Write;

use super::leave::*;
#[allow(unused_imports)]
use super::watcher::*;
use super::*;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::Duration;

use rustix::fs::Mode;
use rustix::io::Errno;

const SETTLE: Duration = Duration::from_millis(300);
const MAX_BYTES: u64 = 1000;
/// Only a guard against hanging: every expected pickup comes far sooner.
const PATIENCE: Duration = Duration::from_secs(20);

fn cfg(dir: &Path) -> WatchConfig {
    WatchConfig {
        dir: dir.to_owned(),
        settle: SETTLE,
        rescan_interval: Duration::from_millis(500),
        max_file_bytes: MAX_BYTES,
    }
}

fn outbox() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn watcher(dir: &tempfile::TempDir) -> OutboxWatcher {
    OutboxWatcher::new(cfg(dir.path())).unwrap()
}

async fn next(w: &mut OutboxWatcher) -> Pickup {
    tokio::time::timeout(PATIENCE, w.next())
        .await
        .expect("a pickup in time")
}

async fn next_ready(w: &mut OutboxWatcher) -> ReadyFile {
    match next(w).await {
        Pickup::Ready(f) => f,
        other => panic!("expected a ready file, got {other:?}"),
    }
}

async fn next_refusal(w: &mut OutboxWatcher) -> (String, PickupRefusal) {
    match next(w).await {
        Pickup::Refused { name, reason } => (name, reason),
        Pickup::Ready(f) => panic!("expected a refusal, got {} ready", f.name),
    }
}

/// True when nothing is picked up for a few settle windows and rescans.
async fn quiet(w: &mut OutboxWatcher) -> bool {
    match tokio::time::timeout(SETTLE * 5, w.next()).await {
        Err(_) => true,
        Ok(p) => {
            eprintln!("unexpected pickup: {p:?}");
            false
        }
    }
}

/// Writes under a temporary name and renames into place, as providers are told to.
fn drop_file(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn a_file_renamed_into_place_is_taken_once() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "a.json", b"{\"a\":1}");
    let f = next_ready(&mut w).await;
    assert_eq!(f.name, "a.json");
    assert_eq!(f.bytes, b"{\"a\":1}");
    assert_eq!(f.kind, FileKind::Json);
    assert_eq!(f.path, dir.path().join("a.json"));
    assert!(quiet(&mut w).await, "emitted once, across rescans");
}

#[tokio::test]
async fn temporary_names_are_ignored_until_renamed_into_place() {
    let dir = outbox();
    let mut w = watcher(&dir);
    for name in [
        ".a.csv",
        "b.csv.tmp",
        "c.csv.part",
        "d.csv.lock",
        "e.CSV.TMP",
    ] {
        fs::write(dir.path().join(name), b"x,y\n").unwrap();
    }
    assert!(quiet(&mut w).await, "temporary names are not taken");
    fs::rename(dir.path().join("c.csv.part"), dir.path().join("c.csv")).unwrap();
    let f = next_ready(&mut w).await;
    assert_eq!((f.name.as_str(), f.kind), ("c.csv", FileKind::Csv));
    assert!(quiet(&mut w).await);
}

#[tokio::test]
async fn upper_case_extensions_are_taken() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "EXPORT.CSV", b"a\n");
    assert_eq!(next_ready(&mut w).await.kind, FileKind::Csv);
}

#[tokio::test]
async fn a_file_written_slowly_in_place_is_taken_once_with_its_final_content() {
    let dir = outbox();
    let mut w = watcher(&dir);
    let path = dir.path().join("slow.csv");
    // Six writes 100 ms apart: the writing spans about 1.5 settle windows, and no single
    // pause is long enough to settle even without the close rule.
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = File::create(&path).unwrap();
        for i in 0..6 {
            writeln!(f, "line {i}").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let f = next_ready(&mut w).await;
    writer.await.unwrap();
    let expected: String = (0..6).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(f.bytes).unwrap(), expected);
    assert!(quiet(&mut w).await, "emitted once");
}

#[tokio::test]
async fn a_writer_pausing_longer_than_the_settle_window_is_waited_for_until_it_closes() {
    let dir = outbox();
    // Rescans far apart, so the pause stays well short of the stale-open limit.
    let mut w = OutboxWatcher::new(WatchConfig {
        rescan_interval: Duration::from_secs(10),
        ..cfg(dir.path())
    })
    .unwrap();
    let path = dir.path().join("paused.json");
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = File::create(&path).unwrap();
        f.write_all(b"{\"first\":").unwrap();
        std::thread::sleep(SETTLE * 4);
        f.write_all(b"\"half\"}").unwrap();
    });
    let f = next_ready(&mut w).await;
    writer.await.unwrap();
    assert_eq!(f.bytes, b"{\"first\":\"half\"}");
    assert!(quiet(&mut w).await);
}

#[tokio::test]
async fn a_lock_sidecar_holds_its_file_back_until_removed() {
    let dir = outbox();
    let mut w = watcher(&dir);
    fs::write(dir.path().join("x.json.lock"), b"").unwrap();
    drop_file(dir.path(), "x.json", b"{}");
    drop_file(dir.path(), "y.json", b"{}");
    assert_eq!(next_ready(&mut w).await.name, "y.json", "other files go on");
    assert!(quiet(&mut w).await, "x.json is held");
    fs::remove_file(dir.path().join("x.json.lock")).unwrap();
    assert_eq!(next_ready(&mut w).await.name, "x.json");
}

#[tokio::test]
async fn a_symlink_is_refused_and_never_followed() {
    let dir = outbox();
    let secret = tempfile::NamedTempFile::new().unwrap();
    fs::write(secret.path(), b"{\"not\":\"yours\"}").unwrap();
    let mut w = watcher(&dir);
    std::os::unix::fs::symlink(secret.path(), dir.path().join("link.json")).unwrap();
    assert_eq!(
        next_refusal(&mut w).await,
        ("link.json".into(), PickupRefusal::Symlink)
    );
}

#[tokio::test]
async fn a_fifo_is_refused_without_blocking() {
    let dir = outbox();
    let mut w = watcher(&dir);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.path().join("pipe.json"),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    assert_eq!(
        next_refusal(&mut w).await,
        ("pipe.json".into(), PickupRefusal::NotRegular)
    );
}

#[tokio::test]
async fn a_directory_is_refused() {
    let dir = outbox();
    let mut w = watcher(&dir);
    fs::create_dir(dir.path().join("folder.csv")).unwrap();
    assert_eq!(
        next_refusal(&mut w).await,
        ("folder.csv".into(), PickupRefusal::NotRegular)
    );
}

#[tokio::test]
async fn a_file_over_the_limit_is_refused_and_one_at_the_limit_is_taken() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "big.json", &vec![b' '; MAX_BYTES as usize + 1]);
    assert_eq!(
        next_refusal(&mut w).await,
        (
            "big.json".into(),
            PickupRefusal::TooLarge {
                len: MAX_BYTES + 1,
                max: MAX_BYTES
            }
        )
    );
    drop_file(dir.path(), "full.json", &vec![b' '; MAX_BYTES as usize]);
    assert_eq!(next_ready(&mut w).await.bytes.len() as u64, MAX_BYTES);
}

#[tokio::test]
async fn a_misnamed_file_is_refused_so_the_provider_notices() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "referral.txt", b"{}");
    assert_eq!(
        next_refusal(&mut w).await,
        ("referral.txt".into(), PickupRefusal::UnsupportedName)
    );
    assert!(quiet(&mut w).await, "refused once");
}

#[tokio::test]
async fn files_present_before_the_watcher_starts_are_taken() {
    let dir = outbox();
    fs::write(dir.path().join("early.json"), b"{}").unwrap();
    fs::write(dir.path().join("early.csv"), b"a\n").unwrap();
    let mut w = watcher(&dir);
    let mut names = vec![next_ready(&mut w).await.name, next_ready(&mut w).await.name];
    names.sort();
    assert_eq!(names, ["early.csv", "early.json"]);
}

#[tokio::test]
async fn a_file_no_event_announced_is_found_by_the_rescan() {
    let dir = outbox();
    let mut w = OutboxWatcher::with_events(cfg(dir.path()), false).unwrap();
    assert!(quiet(&mut w).await);
    fs::write(dir.path().join("late.csv"), b"a\n").unwrap();
    assert_eq!(next_ready(&mut w).await.name, "late.csv");
    assert!(quiet(&mut w).await, "rescans do not emit it again");
}

/// Issue 10.7: this test used to expect a hard link to be taken; a second name for the data
/// lets a file from outside the outbox be sent, so it is now refused.
#[tokio::test]
async fn a_hard_link_is_refused_and_the_original_left_alone() {
    let dir = outbox();
    let elsewhere = tempfile::tempdir().unwrap();
    let original = elsewhere.path().join("made-elsewhere.json");
    fs::write(&original, b"{}").unwrap();
    let mut w = watcher(&dir);
    fs::hard_link(&original, dir.path().join("linked.json")).unwrap();
    assert_eq!(
        next_refusal(&mut w).await,
        ("linked.json".into(), PickupRefusal::HardLink)
    );
    assert_eq!(PickupRefusal::HardLink.rule(), "hard_link");
    reject(dir.path(), "linked.json", None, b"{}").unwrap();
    assert_eq!(fs::read(&original).unwrap(), b"{}", "the original stays");
    assert!(quiet(&mut w).await, "refused once");
}

#[test]
fn a_link_made_after_the_look_is_refused_by_the_read() {
    let dir = outbox();
    let path = dir.path().join("late-link.json");
    fs::write(&path, b"{}").unwrap();
    let id = FileIdentity::of(&fs::symlink_metadata(&path).unwrap());
    fs::hard_link(&path, dir.path().join("second-name")).unwrap();
    assert!(matches!(
        read_whole(&path, MAX_BYTES, id),
        Ok(ReadOutcome::HardLink)
    ));
}

#[tokio::test]
async fn names_with_control_characters_and_bad_dot_names_are_refused() {
    let dir = outbox();
    let mut w = watcher(&dir);
    for name in [
        "new\nline.json",
        "esc\u{1b}[2J.csv",
        "del\u{7f}.json",
        "..json",
        ".json",
        ".CSV",
    ] {
        drop_file(dir.path(), name, b"{}");
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next_refusal(&mut w).await);
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("..json", PickupRefusal::DotName),
        (".CSV", PickupRefusal::DotName),
        (".json", PickupRefusal::DotName),
        ("del\u{7f}.json", PickupRefusal::ControlCharName),
        ("esc\u{1b}[2J.csv", PickupRefusal::ControlCharName),
        ("new\nline.json", PickupRefusal::ControlCharName),
    ];
    let got: Vec<(&str, PickupRefusal)> =
        got.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
    assert_eq!(got, want);
    assert!(quiet(&mut w).await, "refused once each");
    // The temporary convention is untouched, whatever it holds.
    assert!(matches!(classify_name(".ref-1.json"), NameClass::Ignore));
    assert!(matches!(
        classify_name(".ref\n1.json.tmp"),
        NameClass::Ignore
    ));
    assert!(matches!(classify_name("..x.part"), NameClass::Ignore));
}

#[test]
fn a_rejected_name_holds_no_control_characters() {
    let dir = outbox();
    fs::write(dir.path().join("bad\nname.json"), b"{}").unwrap();
    let placed = reject(dir.path(), "bad\nname.json", None, b"{}").unwrap();
    assert_eq!(placed, dir.path().join(REJECTED_DIR).join("bad_name.json"));
    assert!(dir
        .path()
        .join(REJECTED_DIR)
        .join("bad_name.json.error.json")
        .exists());
}

/// Issue 13.2: with a settle window far longer than the test may take, a file renamed into
/// place is taken at once, while one written in place before it still waits for its window.
#[tokio::test]
async fn a_renamed_file_is_taken_without_the_settle_window_and_one_written_in_place_is_not() {
    let dir = outbox();
    let settle = PATIENCE * 3;
    let mut w = OutboxWatcher::new(WatchConfig {
        settle,
        rescan_interval: settle,
        ..cfg(dir.path())
    })
    .unwrap();
    fs::write(dir.path().join("in-place.json"), b"{}").unwrap();
    let started = std::time::Instant::now();
    let first = tokio::time::timeout(PATIENCE, async {
        // Let the in-place file be seen (and start settling) before the renamed one exists.
        assert!(tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err());
        drop_file(dir.path(), "renamed.json", b"{}");
        w.next().await
    })
    .await
    .expect("the renamed file is taken long before the settle window");
    match first {
        Pickup::Ready(f) => assert_eq!(f.name, "renamed.json"),
        other => panic!("expected renamed.json, got {other:?}"),
    }
    assert!(
        started.elapsed() < settle,
        "taken before its settle window could pass"
    );
    // A file written in place is held for the whole window.
    assert!(tokio::time::timeout(Duration::from_secs(1), w.next())
        .await
        .is_err());
}

#[tokio::test]
async fn files_whose_events_were_lost_in_a_queue_overflow_are_found() {
    let max_queued: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usize::MAX);
    if max_queued > 200_000 {
        eprintln!("skipped: the event queue is too long to overflow cheaply");
        return;
    }
    let dir = outbox();
    let mut w = OutboxWatcher::new(WatchConfig {
        // No periodic rescan within the test: only the overflow can find the files.
        rescan_interval: Duration::from_secs(3600),
        max_file_bytes: 1 << 20,
        ..cfg(dir.path())
    })
    .unwrap();
    assert!(quiet(&mut w).await, "the first rescan is done");
    // Alternate between two files so that no two events in a row coalesce.
    let mut a = File::create(dir.path().join("a.csv")).unwrap();
    let mut b = File::create(dir.path().join("b.csv")).unwrap();
    for _ in 0..=max_queued / 2 + 10 {
        a.write_all(b"a").unwrap();
        b.write_all(b"b").unwrap();
    }
    drop((a, b));
    drop_file(dir.path(), "c.json", b"{}");
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(next_ready(&mut w).await.name);
    }
    names.sort();
    assert_eq!(names, ["a.csv", "b.csv", "c.json"]);
}

#[tokio::test]
async fn without_forget_a_file_is_not_emitted_again_and_after_forget_it_is() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "a.json", b"{}");
    let first = next_ready(&mut w).await;
    assert!(quiet(&mut w).await, "the caller still holds it");
    w.forget("a.json");
    let again = next_ready(&mut w).await;
    assert_eq!((again.name, again.identity), (first.name, first.identity));
}

#[tokio::test]
async fn a_new_version_under_a_name_already_taken_is_a_new_file() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "a.json", b"{\"v\":1}");
    let first = next_ready(&mut w).await;
    drop_file(dir.path(), "a.json", b"{\"v\":2}");
    let second = next_ready(&mut w).await;
    assert_eq!(second.bytes, b"{\"v\":2}");
    assert_ne!(second.identity, first.identity);
}

#[tokio::test]
async fn remove_taken_deletes_the_file_that_was_read() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "a.json", b"{}");
    let f = next_ready(&mut w).await;
    remove_taken(dir.path(), &f).unwrap();
    assert!(!dir.path().join("a.json").exists());
    remove_taken(dir.path(), &f).unwrap();
    assert!(quiet(&mut w).await);
}

#[tokio::test]
async fn remove_taken_leaves_a_version_a_provider_put_there_meanwhile() {
    let dir = outbox();
    let mut w = watcher(&dir);
    drop_file(dir.path(), "a.json", b"{\"v\":1}");
    let old = next_ready(&mut w).await;
    drop_file(dir.path(), "a.json", b"{\"v\":2}");
    remove_taken(dir.path(), &old).unwrap();
    assert_eq!(fs::read(dir.path().join("a.json")).unwrap(), b"{\"v\":2}");
    let new = next_ready(&mut w).await;
    assert_eq!(new.bytes, b"{\"v\":2}");
    remove_taken(dir.path(), &new).unwrap();
    assert!(!dir.path().join("a.json").exists());
}

#[tokio::test]
async fn beyond_the_tracking_bound_files_are_deferred_not_lost() {
    let dir = outbox();
    for name in ["1.json", "2.json", "3.json"] {
        fs::write(dir.path().join(name), b"{}").unwrap();
    }
    let mut w = watcher(&dir);
    w.max_tracked = 2;
    let mut names = Vec::new();
    for _ in 0..3 {
        let f = next_ready(&mut w).await;
        // Removing a taken file frees its slot for the deferred one.
        remove_taken(dir.path(), &f).unwrap();
        names.push(f.name);
    }
    names.sort();
    assert_eq!(names, ["1.json", "2.json", "3.json"]);
}

#[test]
fn a_file_that_changed_after_the_look_is_not_read_as_settled() {
    let dir = outbox();
    let path = dir.path().join("a.json");
    fs::write(&path, b"{}").unwrap();
    let looked = FileIdentity::of(&fs::symlink_metadata(&path).unwrap());
    fs::write(&path, b"{\"longer\":true}").unwrap();
    assert!(matches!(
        read_whole(&path, MAX_BYTES, looked).unwrap(),
        ReadOutcome::Changed(_)
    ));
    let now = FileIdentity::of(&fs::symlink_metadata(&path).unwrap());
    match read_whole(&path, MAX_BYTES, now).unwrap() {
        ReadOutcome::Whole { bytes, after } => {
            assert_eq!((bytes.as_slice(), after), (&b"{\"longer\":true}"[..], now));
        }
        _ => panic!("an unchanged file is read whole"),
    }
}

#[test]
fn reading_never_goes_past_the_limit_plus_one() {
    let dir = outbox();
    let path = dir.path().join("a.json");
    fs::write(&path, vec![b'x'; 5000]).unwrap();
    let id = FileIdentity::of(&fs::symlink_metadata(&path).unwrap());
    match read_whole(&path, 10, id).unwrap() {
        ReadOutcome::Whole { bytes, .. } => assert_eq!(bytes.len(), 11),
        _ => panic!("expected the first bytes"),
    }
}

#[test]
fn reject_moves_the_file_and_writes_its_error_document_beside_it() {
    let dir = outbox();
    fs::write(dir.path().join("a.json"), b"{bad").unwrap();
    let to = reject(dir.path(), "a.json", None, b"{\"errors\":[]}").unwrap();
    assert_eq!(to, dir.path().join("rejected/a.json"));
    assert_eq!(fs::read(&to).unwrap(), b"{bad");
    assert_eq!(
        fs::read(dir.path().join("rejected/a.json.error.json")).unwrap(),
        b"{\"errors\":[]}"
    );
    assert!(!dir.path().join("a.json").exists());
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("rejected"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no temporaries left: {leftovers:?}");
}

#[test]
fn a_second_rejection_of_the_same_name_is_numbered_and_the_first_kept() {
    let dir = outbox();
    fs::write(dir.path().join("a.csv"), b"one").unwrap();
    let first = reject(dir.path(), "a.csv", None, b"{\"e\":1}").unwrap();
    fs::write(dir.path().join("a.csv"), b"two").unwrap();
    let second = reject(dir.path(), "a.csv", Some(b"bad rows"), b"{\"e\":2}").unwrap();
    let third = reject(dir.path(), "a.csv", Some(b"more rows"), b"{\"e\":3}").unwrap();
    let rejected = dir.path().join("rejected");
    assert_eq!(
        (first.clone(), second.clone(), third.clone()),
        (
            rejected.join("a.csv"),
            rejected.join("a.csv.1"),
            rejected.join("a.csv.2")
        )
    );
    assert_eq!(fs::read(&first).unwrap(), b"one");
    assert_eq!(fs::read(&second).unwrap(), b"bad rows");
    assert_eq!(
        fs::read(rejected.join("a.csv.error.json")).unwrap(),
        b"{\"e\":1}"
    );
    assert_eq!(
        fs::read(rejected.join("a.csv.1.error.json")).unwrap(),
        b"{\"e\":2}"
    );
    assert_eq!(
        fs::read(rejected.join("a.csv.2.error.json")).unwrap(),
        b"{\"e\":3}"
    );
    assert_eq!(
        fs::read(dir.path().join("a.csv")).unwrap(),
        b"two",
        "with a replacement the original is left for the caller"
    );
}

#[test]
fn a_rejected_symlink_is_moved_as_a_link_and_its_target_untouched() {
    let dir = outbox();
    let target = tempfile::NamedTempFile::new().unwrap();
    fs::write(target.path(), b"elsewhere").unwrap();
    std::os::unix::fs::symlink(target.path(), dir.path().join("l.json")).unwrap();
    let to = reject(dir.path(), "l.json", None, b"{}").unwrap();
    assert!(fs::symlink_metadata(&to).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(target.path()).unwrap(), b"elsewhere");
    // A dangling link in rejected/ still occupies its name.
    drop(target);
    fs::write(dir.path().join("l.json"), b"{}").unwrap();
    let again = reject(dir.path(), "l.json", None, b"{}").unwrap();
    assert!(again.ends_with("rejected/l.json.1"));
}

#[test]
fn a_very_long_name_is_shortened_in_rejected() {
    let dir = outbox();
    let long = format!("{}.json", "é".repeat(120));
    fs::write(dir.path().join(&long), b"{}").unwrap();
    let to = reject(dir.path(), &long, None, b"{}").unwrap();
    let kept = to.file_name().unwrap().to_str().unwrap();
    assert!(kept.len() <= MAX_REJECTED_BASE && long.starts_with(kept));
    assert!(exists(
        &dir.path().join(format!("rejected/{kept}.error.json"))
    ));
}

#[test]
fn reject_and_remove_taken_refuse_names_outside_the_outbox() {
    let dir = outbox();
    for bad in ["../x", "a/b", "", ".", "..", "rejected", "a\0b"] {
        assert!(
            matches!(
                reject(dir.path(), bad, None, b"{}"),
                Err(OutboxError::BadName(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn no_space_and_no_quota_are_disk_full() {
    let err = |code: Errno| OutboxError::Io {
        op: "write",
        path: "x".into(),
        source: io::Error::from_raw_os_error(code.raw_os_error()),
    };
    assert!(err(Errno::NOSPC).is_disk_full());
    assert!(err(Errno::DQUOT).is_disk_full());
    assert!(!err(Errno::ACCESS).is_disk_full());
    assert!(!OutboxError::BadName("x".into()).is_disk_full());
}

fn raw(bytes: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes).to_owned()
}

/// Issue 10.7: a name that is not UTF-8 is renamed within the outbox to its escaped form (never
/// over a file already there) and refused by name; temporary and dot-names stay ignored.
async fn not_utf8_names_are_renamed_escaped_and_refused(events: bool) {
    let dir = outbox();
    let mut w = OutboxWatcher::with_events(cfg(dir.path()), events).unwrap();
    // Already taken: the renamed file must take the next name, and this one stays as it is.
    fs::write(dir.path().join("ref-\\xff\\xfe.json.not-utf8"), b"first").unwrap();
    fs::write(dir.path().join(raw(b"ref-\xff\xfe.json")), b"second").unwrap();
    fs::write(dir.path().join(raw(b"a\\b\n\xc3.csv")), b"third").unwrap();
    for ignored in [&b".\xff.json"[..], b"x\xff.json.tmp", b"x\xff.JSON.Part"] {
        fs::write(dir.path().join(raw(ignored)), b"tmp").unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_refusal(&mut w).await);
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("a\\x5cb\\x0a\\xc3.csv.not-utf8", PickupRefusal::NotUtf8Name),
        ("ref-\\xff\\xfe.json.1.not-utf8", PickupRefusal::NotUtf8Name),
        ("ref-\\xff\\xfe.json.not-utf8", PickupRefusal::NotUtf8Name),
    ];
    let got: Vec<(&str, PickupRefusal)> =
        got.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
    assert_eq!(got, want);
    assert_eq!(got[0].1.rule(), "name_not_utf8");
    let read = |n: &str| fs::read(dir.path().join(n)).unwrap();
    assert_eq!(
        read("ref-\\xff\\xfe.json.not-utf8"),
        b"first",
        "never overwritten"
    );
    assert_eq!(read("ref-\\xff\\xfe.json.1.not-utf8"), b"second");
    assert_eq!(read("a\\x5cb\\x0a\\xc3.csv.not-utf8"), b"third");
    assert!(quiet(&mut w).await, "refused once each");
    let mut left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_str().is_none())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            raw(b".\xff.json"),
            raw(b"x\xff.JSON.Part"),
            raw(b"x\xff.json.tmp")
        ],
        "temporary names are left alone"
    );
}

#[tokio::test]
async fn not_utf8_names_announced_by_events_are_renamed_and_refused() {
    not_utf8_names_are_renamed_escaped_and_refused(true).await;
}

#[tokio::test]
async fn not_utf8_names_found_by_a_rescan_are_renamed_and_refused() {
    not_utf8_names_are_renamed_escaped_and_refused(false).await;
}

#[test]
fn an_escaped_not_utf8_name_stays_short_and_holds_no_control_characters() {
    let long = not_utf8_name(&[0xff; 250]);
    assert!(long.len() <= 200, "{}", long.len());
    assert!(
        long.ends_with("\\xff") && long.len() % 4 == 0,
        "whole escapes only"
    );
    let name = not_utf8_name(b"ok-\x1b[2J\xe2\x80\xaeq\xc2\x85\xf0.json");
    assert_eq!(name, "ok-\\x1b[2J\u{202e}q\\xc2\\x85\\xf0.json");
    assert!(!name.chars().any(char::is_control));
    assert!(matches!(
        classify_name("x.NOT-UTF8"),
        NameClass::Refused(PickupRefusal::NotUtf8Name)
    ));
}

#[tokio::test]
async fn files_are_taken_oldest_first_and_a_later_arrival_does_not_jump_the_queue() {
    let dir = outbox();
    let mut w = watcher(&dir);
    let early: Vec<String> = (0..30).map(|i| format!("n{i:02}.json")).collect();
    for name in &early {
        drop_file(dir.path(), name, b"{}");
    }
    let mut taken = Vec::new();
    for _ in 0..10 {
        taken.push(next_ready(&mut w).await.name);
    }
    // Sorts before every early name, but arrived after them.
    drop_file(dir.path(), "a-late.json", b"{}");
    for _ in 10..31 {
        taken.push(next_ready(&mut w).await.name);
    }
    let mut expected = early.clone();
    expected.push("a-late.json".into());
    assert_eq!(taken, expected);
    assert!(quiet(&mut w).await, "each file is taken once");
}
