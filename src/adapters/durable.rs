//! Durable file writes shared by the file adapters (outbox, inbox, audit): the one place that
//! spells out "written, synced, renamed, directory synced".
//!
//! Order: write the whole content to a temporary file (mode 0640) → `fsync` it → `rename` over
//! the final name → `fsync` the directory. A crash at any point leaves either the old file or
//! the new one, never a torn one; a failed write removes its temporary file.
//! Also the one wait for a lock that a writer which just stopped may still seem to hold
//! ([`retry_while_locked`], for the audit log's and the store's), and the one way a refused file
//! name is shown ([`shown_name`], for the inbox's and the outbox's name checks).
//! Must not: know what the files mean.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Calls `take` again, for up to half a second, while `held` says the lock it takes is held
/// elsewhere. A lock released by a writer that has just stopped can stay held a moment longer
/// by a child process another thread forked meanwhile: the child shares the lock's open file
/// until its exec closes it (flock belongs to the open file, not the descriptor).
pub fn retry_while_locked<T, E>(
    mut take: impl FnMut() -> Result<T, E>,
    held: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let give_up = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        match take() {
            Err(e) if held(&e) && std::time::Instant::now() < give_up => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Creates or truncates `path` (mode 0640), writes `bytes` and syncs them. On error the file is
/// removed, so no partial file is left behind.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let r = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o640)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

/// The one answer to "is this disk full?": `ENOSPC` (no space) or `EDQUOT` (quota used up).
/// Callers pause and retry; nothing is wrong with the data being written.
pub fn is_disk_full(e: &io::Error) -> bool {
    let full = [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT];
    e.raw_os_error()
        .is_some_and(|code| full.iter().any(|f| f.raw_os_error() == code))
}

/// `fsync` of a directory, making renames and deletions in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directory syncs shared by concurrent callers (group commit for renames into one directory).
///
/// [`DirSync::sync`] returns once an `fsync` of the directory that *started after the call*
/// has ended, with that `fsync`'s result; callers arriving while one runs share the next one.
/// So a rename made before the call is durable when it returns `Ok`, and many envelopes
/// published at once cost one directory sync instead of one each. A failed `fsync` fails every
/// caller it covered (each retries as it would after its own failure).
#[derive(Debug)]
pub struct DirSync {
    dir: std::path::PathBuf,
    state: std::sync::Mutex<DirSyncState>,
    ended: std::sync::Condvar,
}

#[derive(Debug)]
struct DirSyncState {
    /// The round new callers join; it has not started.
    next: std::sync::Arc<Round>,
    /// A round's `fsync` is under way (the one before `next`).
    running: bool,
    /// `fsync` calls made, for tests and figures.
    syncs: u64,
}

/// A directory `fsync`'s outcome, kept so that every caller it covered can be given it.
type SyncOutcome = Result<(), (Option<i32>, io::ErrorKind, String)>;

/// One `fsync` and the callers it covers; its result once it has ended.
#[derive(Debug, Default)]
struct Round {
    result: std::sync::OnceLock<SyncOutcome>,
}

impl DirSync {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            state: std::sync::Mutex::new(DirSyncState {
                next: std::sync::Arc::default(),
                running: false,
                syncs: 0,
            }),
            ended: std::sync::Condvar::new(),
        }
    }

    /// How many directory `fsync`s were made.
    pub fn syncs(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).syncs
    }

    /// Blocks until a directory `fsync` that started after this call has ended; its result.
    pub fn sync(&self) -> io::Result<()> {
        let lock = || self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = lock();
        let mine = s.next.clone();
        loop {
            if let Some(r) = mine.result.get() {
                return rebuild(r);
            }
            if !s.running {
                // Only `next` can be without a result while nothing runs: it is ours. Start it;
                // later callers join a new round.
                s.running = true;
                s.syncs += 1;
                s.next = std::sync::Arc::default();
                drop(s);
                let r =
                    sync_dir(&self.dir).map_err(|e| (e.raw_os_error(), e.kind(), e.to_string()));
                let _ = mine.result.set(r);
                let mut s = lock();
                s.running = false;
                drop(s);
                self.ended.notify_all();
                return mine.result.get().map_or(Ok(()), rebuild);
            }
            s = self.ended.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn rebuild(r: &SyncOutcome) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err((Some(code), _, _)) => Err(io::Error::from_raw_os_error(*code)),
        Err((None, kind, message)) => Err(io::Error::new(*kind, message.clone())),
    }
}

/// Replaces `dir/name` with `bytes` atomically and durably, via `dir/tmp_name`.
pub fn replace(dir: &Path, tmp_name: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(tmp_name);
    write_synced(&tmp, bytes)?;
    if let Err(e) = fs::rename(&tmp, dir.join(name)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// A file name refused by a name check, fit to show in an error or a log line: at most
/// `max_chars` characters, control characters replaced by `?` (the name came from a provider or
/// a peer, and must not move a terminal's cursor or split a log line).
pub fn shown_name(name: &str, max_chars: usize) -> String {
    name.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_name_is_shown_cut_short_and_without_control_characters() {
        assert_eq!(shown_name("a\nb\u{1b}[2Jc.json", 80), "a?b?[2Jc.json");
        assert_eq!(shown_name(&"x".repeat(100), 40), "x".repeat(40));
    }

    #[test]
    fn concurrent_dir_syncs_share_fsyncs_and_each_waits_for_one_started_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let ds = std::sync::Arc::new(DirSync::new(dir.path()));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let (ds, dir) = (ds.clone(), dir.path().to_owned());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        fs::write(dir.join(format!("{t}-{i}")), b"x").unwrap();
                        let before = ds.syncs();
                        ds.sync().unwrap();
                        // A sync that started after the call: the count moved on.
                        assert!(ds.syncs() > before);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = ds.syncs();
        assert!((1..=800).contains(&n), "{n} syncs for 800 calls");
    }

    #[test]
    fn a_failed_dir_sync_fails_its_callers_with_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let ds = DirSync::new(&dir.path().join("missing"));
        let e = ds.sync().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.raw_os_error().is_some());
        fs::create_dir(dir.path().join("missing")).unwrap();
        ds.sync().unwrap();
        assert_eq!(ds.syncs(), 2);
    }

    #[test]
    fn replace_leaves_only_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), ".x.tmp", "x", b"one").unwrap();
        replace(dir.path(), ".x.tmp", "x", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("x")).unwrap(), b"two");
        assert!(!dir.path().join(".x.tmp").exists());
    }
}
