//! Watching the outbox directory where provider systems drop `*.json` and `*.csv` files, and
//! the two ways a file leaves it ([`remove_taken`], [`reject`]). The only module that uses
//! inotify.
//!
//! # Which names count
//! - Ignored (never read, never refused): names starting with `.`, ending `.tmp`, `.part` or
//!   `.lock`, and the `rejected` subdirectory. These are how providers write under a temporary
//!   name before renaming into place, and the lock sidecars.
//! - Taken: names ending `.json` (one referral) or `.csv` (a batch); the extension is matched
//!   without regard to case, because Windows tools write `.JSON`.
//! - Everything else is refused as [`PickupRefusal::UnsupportedName`] (and so moved to
//!   `rejected/` by the caller), so a provider notices a misnamed file instead of it lying in
//!   the outbox forever.
//! - Names that are not UTF-8 cannot be carried as a `String`: they are left alone and counted in
//!   a warning at each rescan.
//!
//! # When a file is taken
//! All of these hold:
//! 1. its writer has finished: an `IN_CLOSE_WRITE` or `IN_MOVED_TO` event has been seen since the
//!    last `IN_MODIFY`/`IN_CREATE`, or no event is known for it (found by a rescan, present at
//!    start, or its events were lost in an `IN_Q_OVERFLOW`). A name that was modified but never
//!    closed — NFSv3 writers and hard links produce no close event — counts as finished once no
//!    event has come for `max(settle, rescan_interval)`: a writer that holds a file open without
//!    writing for that long is indistinguishable from a lost close;
//! 2. its identity (device, inode, size, mtime, ctime) has been observed unchanged for the
//!    settle window;
//! 3. no `NAME.lock` sidecar exists;
//! 4. it has not already been emitted with the same identity (until [`OutboxWatcher::forget`]).
//!
//! Symlinks, FIFOs, devices, sockets and directories are refused without being opened (`lstat`);
//! files are opened with `O_NOFOLLOW | O_NONBLOCK` (a swapped-in link fails, a swapped-in FIFO
//! cannot block) and read to at most `max_file_bytes + 1` bytes on the blocking pool. The
//! identity is taken again from the open file after reading; a file that changed meanwhile is
//! not settled and waits another window. Reading is cancel-safe: [`OutboxWatcher::next`] can be
//! dropped at any await point without losing a file.
//!
//! # Events and rescans
//! inotify events are the fast path; a full rescan at start, every `rescan_interval`, and after
//! an event-queue overflow is the safety net. If the watch itself is lost (directory removed,
//! moved or unmounted) the watcher warns, keeps rescanning and re-adds the watch when it can.
//!
//! # Bounds
//! At most [`MAX_TRACKED`] names are tracked (waiting + emitted-but-not-yet-removed). Beyond that
//! new names are not lost, only deferred: a later rescan picks them up once room frees. Finding
//! the next deadline is linear in the tracked names, which is fine for this bound.
//!
//! # Leaving the outbox
//! [`remove_taken`] deletes a file only if it still has the identity that was read, so a version
//! a provider renamed over it meanwhile stays (a residual window of microseconds between the
//! check and the unlink remains: POSIX has no "unlink if inode"). [`reject`] moves a file, or
//! writes the refused rows of a batch, into `rejected/` with `NAME.error.json` beside it; both
//! appear whole (temporary + `fsync` + rename without replacing + directory `fsync`); an earlier
//! rejection of the same name is never overwritten (`NAME`, `NAME.1`, `NAME.2`, …, the same
//! suffix for the file and its error document). The error document is placed first: a crash
//! between the two leaves an error document without its file and the original still in the
//! outbox, which is refused again under the next suffix.
//! Must not: delete or move anything except through [`remove_taken`] and [`reject`]; parse
//! file contents; log file contents.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchMask};
use rustix::fs::{Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Most names tracked at once (waiting to settle, or emitted and not yet removed). Each costs a
/// name and about a hundred bytes; 100,000 is far above any real outbox (a daily export is one
/// file) and keeps a flood of dropped files to a few tens of megabytes.
pub const MAX_TRACKED: usize = 100_000;

/// The subdirectory refused files are moved to.
pub const REJECTED_DIR: &str = "rejected";

/// Longest part of a refused file's name kept in `rejected/`, so that the name plus a numeric
/// suffix plus `.error.json` stays under the 255-byte file name limit.
const MAX_REJECTED_BASE: usize = 200;

/// How many `NAME.N` slots are tried before giving up on filing a rejection.
const MAX_REJECTED_SUFFIX: u32 = 10_000;

/// Shortest wait between two looks, a guard against spinning on a deadline already past.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A filesystem operation failed; `op` names it. See [`OutboxError::is_disk_full`].
    #[error("outbox {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A name that is not a plain file name of the outbox was passed in (a bug in the caller).
    #[error("'{0}' is not a plain outbox file name")]
    BadName(String),
    /// Every `rejected/NAME.N` up to the limit is taken: an operator must clear `rejected/`.
    #[error("no free name left in rejected/ for '{0}'; clear out old rejections")]
    RejectedFull(String),
}

impl OutboxError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// True when the volume is full or the quota used up (`ENOSPC`, `EDQUOT`): the caller pauses
    /// intake and retries; the file itself is fine.
    pub fn is_disk_full(&self) -> bool {
        let full = [Errno::NOSPC, Errno::DQUOT];
        matches!(self, Self::Io { source, .. }
            if source.raw_os_error().is_some_and(|c| full.iter().any(|f| f.raw_os_error() == c)))
    }
}

/// Watcher settings.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// The outbox directory; `rejected/` is inside it.
    pub dir: PathBuf,
    /// How long a file must stay unchanged before it is taken.
    pub settle: Duration,
    /// How often the whole directory is listed, whatever the events say.
    pub rescan_interval: Duration,
    /// Larger files are refused without being read.
    pub max_file_bytes: u64,
}

/// What identifies one version of a file. ctime is included because a writer can restore an
/// mtime (`cp -p`, `touch -r`, rsync `-t`), but not a ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    fn of(m: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The kind of referral file, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `*.json`: one referral.
    Json,
    /// `*.csv`: a batch, one referral per row.
    Csv,
}

/// A settled file, read whole.
#[derive(Debug)]
pub struct ReadyFile {
    /// The file name inside the outbox.
    pub name: String,
    /// `dir/name`.
    pub path: PathBuf,
    /// The whole content (at most `max_file_bytes`).
    pub bytes: Vec<u8>,
    /// The identity the content was read under; [`remove_taken`] checks it.
    pub identity: FileIdentity,
    pub kind: FileKind,
}

/// Why a file is refused without being parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickupRefusal {
    /// A symbolic link (never followed).
    Symlink,
    /// A FIFO, device, socket or directory.
    NotRegular,
    /// Larger than the configured limit.
    TooLarge { len: u64, max: u64 },
    /// Neither `*.json` nor `*.csv`, nor a temporary or lock name.
    UnsupportedName,
    /// refex may not read it (permission denied).
    Unreadable,
}

impl PickupRefusal {
    /// The rule name used in `NAME.error.json` and the audit log.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Symlink => "symlink",
            Self::NotRegular => "not_a_regular_file",
            Self::TooLarge { .. } => "file_too_large",
            Self::UnsupportedName => "unsupported_file_name",
            Self::Unreadable => "unreadable",
        }
    }
}

/// The message an operator reads in `NAME.error.json`.
impl std::fmt::Display for PickupRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink => f.write_str(
                "symbolic links are not accepted; write the file itself into the outbox",
            ),
            Self::NotRegular => f.write_str(
                "only regular files are accepted (not directories, pipes, sockets or devices)",
            ),
            Self::TooLarge { len, max } => write!(
                f,
                "file is {len} bytes; the limit is {max} bytes (split the batch)"
            ),
            Self::UnsupportedName => f.write_str(
                "only *.json (one referral) and *.csv (a batch) are accepted; write under a \
                 name starting with '.' or ending .tmp/.part and rename when complete",
            ),
            Self::Unreadable => f.write_str(
                "refex is not permitted to read this file; give its service account read access",
            ),
        }
    }
}

/// What the watcher hands to intake.
#[derive(Debug)]
pub enum Pickup {
    /// Settled and read whole.
    Ready(ReadyFile),
    /// Must go to `rejected/` with the reason.
    Refused { name: String, reason: PickupRefusal },
}

enum NameClass {
    Ignore,
    Candidate(FileKind),
    Unsupported,
}

fn classify_name(name: &str) -> NameClass {
    let lower = name.to_ascii_lowercase();
    if name.starts_with('.')
        || name == REJECTED_DIR
        || [".tmp", ".part", ".lock"]
            .iter()
            .any(|s| lower.ends_with(s))
    {
        NameClass::Ignore
    } else if lower.ends_with(".json") {
        NameClass::Candidate(FileKind::Json)
    } else if lower.ends_with(".csv") {
        NameClass::Candidate(FileKind::Csv)
    } else {
        NameClass::Unsupported
    }
}

/// A name the watcher is waiting on.
struct Tracked {
    /// The writer has finished (close/rename event), or no event knowledge exists.
    closed: bool,
    /// When the last event for this name arrived (or tracking began).
    last_event: Instant,
    /// The identity at the last look, and since when it has been the same.
    last_id: Option<FileIdentity>,
    stable_since: Instant,
    /// Not looked at before this.
    due: Instant,
    /// The rescan generation that last listed it.
    listed: u64,
}

/// A name already handed out, with the identity it was handed out under.
struct Emitted {
    id: FileIdentity,
    listed: u64,
}

/// What one look at a tracked name decided.
enum Look {
    Wait,
    Refuse(FileIdentity, PickupRefusal),
    Read(FileIdentity, FileKind),
}

/// What reading a file found.
enum ReadOutcome {
    Whole { bytes: Vec<u8>, after: FileIdentity },
    Changed(FileIdentity),
    NotRegular,
}

/// The outbox watcher. See the module documentation for the rules.
pub struct OutboxWatcher {
    cfg: WatchConfig,
    /// Created in `new`, registered with the reactor on the first `next` (so `new` works outside
    /// a runtime).
    inotify: Option<Inotify>,
    events: Option<AsyncFd<Inotify>>,
    watch_lost: bool,
    tracked: HashMap<String, Tracked>,
    emitted: HashMap<String, Emitted>,
    max_tracked: usize,
    generation: u64,
    next_rescan: Instant,
    rescan_now: bool,
    ready: VecDeque<Pickup>,
}

fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

impl OutboxWatcher {
    /// Creates the outbox and `rejected/` if missing and starts watching; files already present
    /// are taken (after settling) by the first rescan.
    pub fn new(cfg: WatchConfig) -> Result<Self, OutboxError> {
        Self::with_events(cfg, true)
    }

    /// As [`OutboxWatcher::new`]; with `events = false` no inotify watch is set up and only
    /// rescans find files (tests of the safety net).
    pub fn with_events(cfg: WatchConfig, events: bool) -> Result<Self, OutboxError> {
        let rejected = cfg.dir.join(REJECTED_DIR);
        fs::create_dir_all(&rejected).map_err(OutboxError::io("create", &rejected))?;
        let inotify = if events {
            let inotify = Inotify::init().map_err(OutboxError::io("watch", &cfg.dir))?;
            inotify
                .watches()
                .add(&cfg.dir, watch_mask())
                .map_err(OutboxError::io("watch", &cfg.dir))?;
            Some(inotify)
        } else {
            None
        };
        let now = Instant::now();
        Ok(Self {
            cfg,
            inotify,
            events: None,
            watch_lost: false,
            tracked: HashMap::new(),
            emitted: HashMap::new(),
            max_tracked: MAX_TRACKED,
            generation: 0,
            next_rescan: now,
            rescan_now: true,
            ready: VecDeque::new(),
        })
    }

    /// Lets `name` be emitted again at the next rescan, even with the same identity: the caller
    /// could not finish it (for example the disk was full) and left it in the outbox.
    pub fn forget(&mut self, name: &str) {
        self.emitted.remove(name);
        self.tracked.remove(name);
    }

    /// Waits until a file is ready or must be refused. Cancel-safe.
    pub async fn next(&mut self) -> Pickup {
        self.arm_events();
        loop {
            self.drain_events();
            if let Some(p) = self.ready.pop_front() {
                return p;
            }
            if self.rescan_now || Instant::now() >= self.next_rescan {
                self.rescan();
            }
            if let Some(p) = self.evaluate_due().await {
                return p;
            }
            if let Some(p) = self.ready.pop_front() {
                return p;
            }
            let deadline = self.next_deadline();
            match self.events.as_ref() {
                Some(fd) => {
                    tokio::select! {
                        r = fd.readable() => match r {
                            // Cleared before reading, so an event that arrives after the drain
                            // wakes us again.
                            Ok(mut guard) => guard.clear_ready(),
                            Err(e) => {
                                warn!(error = %e, "outbox events failed; relying on rescans");
                                self.events = None;
                            }
                        },
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => tokio::time::sleep_until(deadline).await,
            }
        }
    }

    fn arm_events(&mut self) {
        if let Some(inotify) = self.inotify.take() {
            // `AsyncFd::new` is deprecated because a caller could close the descriptor while it
            // is registered; here the `AsyncFd` owns the `Inotify` (and so the descriptor) by
            // value for its whole life, which is the condition the `unsafe` replacement asks
            // for, and this crate forbids `unsafe`.
            #[allow(deprecated)]
            let registered = AsyncFd::new(inotify);
            match registered {
                Ok(fd) => self.events = Some(fd),
                Err(e) => warn!(error = %e, "outbox events unavailable; relying on rescans"),
            }
        }
    }

    fn has_room(&self) -> bool {
        self.tracked.len() + self.emitted.len() < self.max_tracked
    }

    fn stale_after(&self) -> Duration {
        self.cfg.settle.max(self.cfg.rescan_interval)
    }

    /// Reads every queued event (until the descriptor would block) and applies it.
    fn drain_events(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(fd) = self.events.as_mut() else {
                return;
            };
            let batch: Vec<(Option<String>, EventMask)> = match fd.get_mut().read_events(&mut buf) {
                Ok(events) => events
                    .map(|ev| {
                        let name = ev.name.and_then(|n| n.to_str()).map(str::to_owned);
                        (name, ev.mask)
                    })
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "outbox events could not be read; relying on rescans");
                    self.events = None;
                    return;
                }
            };
            if batch.is_empty() {
                return;
            }
            let now = Instant::now();
            for (name, mask) in batch {
                self.on_event(name, mask, now);
            }
        }
    }

    fn on_event(&mut self, name: Option<String>, mask: EventMask, now: Instant) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            warn!("outbox event queue overflowed; rescanning");
            // Close events may be among the lost ones: everything tracked is now "found by a
            // scan", which still demands the settle window.
            for t in self.tracked.values_mut() {
                t.closed = true;
                t.due = now;
            }
            self.rescan_now = true;
            return;
        }
        if mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
            if !self.watch_lost {
                warn!(dir = %self.cfg.dir.display(), "outbox watch lost (directory removed or moved); rescanning");
            }
            self.watch_lost = true;
            self.rescan_now = true;
            return;
        }
        // Names that are not UTF-8 are counted by the rescan.
        let Some(name) = name else {
            return;
        };
        let gone = mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM);
        if let Some(base) = name.strip_suffix(".lock") {
            // A lock released: look at the file it held at once.
            if gone {
                if let Some(t) = self.tracked.get_mut(base) {
                    t.due = now;
                }
            }
            return;
        }
        if matches!(classify_name(&name), NameClass::Ignore) {
            return;
        }
        if gone {
            self.tracked.remove(&name);
            self.emitted.remove(&name);
            return;
        }
        let closed = mask.intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO);
        // A write in progress need not be looked at before a settle window has passed; a close
        // is looked at now (the file may have been stable for long already).
        let due = if closed { now } else { now + self.cfg.settle };
        if let Some(t) = self.tracked.get_mut(&name) {
            t.closed = closed;
            t.last_event = now;
            t.due = due;
        } else if self.has_room() {
            self.tracked.insert(
                name,
                Tracked {
                    closed,
                    last_event: now,
                    last_id: None,
                    stable_since: now,
                    due,
                    listed: self.generation,
                },
            );
        }
        // Without room the name waits for a rescan after room has freed.
    }

    fn rewatch(&mut self) {
        let Some(fd) = self.events.as_ref() else {
            return;
        };
        match fd.get_ref().watches().add(&self.cfg.dir, watch_mask()) {
            Ok(_) => {
                warn!(dir = %self.cfg.dir.display(), "outbox watch restored");
                self.watch_lost = false;
            }
            Err(e) => debug!(error = %e, "outbox watch not yet restorable"),
        }
    }

    /// Lists the whole directory: picks up names no event announced, applies the stale-open
    /// rule, and forgets emitted names that are gone.
    fn rescan(&mut self) {
        let now = Instant::now();
        self.rescan_now = false;
        self.next_rescan = now + self.cfg.rescan_interval;
        if self.watch_lost {
            self.rewatch();
        }
        let entries = match fs::read_dir(&self.cfg.dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(dir = %self.cfg.dir.display(), error = %e, "outbox cannot be listed");
                return;
            }
        };
        self.generation += 1;
        let generation = self.generation;
        let stale_after = self.stale_after();
        let (mut complete, mut deferred, mut not_utf8) = (true, 0usize, 0usize);
        for entry in entries {
            let Ok(entry) = entry else {
                complete = false;
                break;
            };
            let Ok(name) = entry.file_name().into_string() else {
                not_utf8 += 1;
                continue;
            };
            if matches!(classify_name(&name), NameClass::Ignore) {
                continue;
            }
            if let Some(t) = self.tracked.get_mut(&name) {
                t.listed = generation;
                if !t.closed && now.duration_since(t.last_event) >= stale_after {
                    debug!(file = %name, "no close event came; settling it like a scanned file");
                    t.closed = true;
                    t.due = now;
                }
                continue;
            }
            if let Some(e) = self.emitted.get_mut(&name) {
                e.listed = generation;
                let same =
                    fs::symlink_metadata(entry.path()).is_ok_and(|m| FileIdentity::of(&m) == e.id);
                if same {
                    continue;
                }
                // A new version under a name already handed out: a new file.
            }
            if !self.has_room() {
                deferred += 1;
                continue;
            }
            self.tracked.insert(
                name,
                Tracked {
                    closed: true,
                    last_event: now,
                    last_id: None,
                    stable_since: now,
                    due: now,
                    listed: generation,
                },
            );
        }
        if complete {
            self.emitted.retain(|_, e| e.listed == generation);
            // Not listed: probably gone with its event lost; a look confirms and drops it.
            for t in self.tracked.values_mut() {
                if t.listed != generation {
                    t.due = now;
                }
            }
        }
        if deferred > 0 {
            warn!(
                deferred,
                limit = self.max_tracked,
                "outbox holds more files than are tracked at once; the rest wait for a later rescan"
            );
        }
        if not_utf8 > 0 {
            warn!(
                count = not_utf8,
                "outbox file names that are not UTF-8 are left alone; rename them"
            );
        }
    }

    /// Looks at every name whose time has come, oldest-stable first. Refusals are queued; the
    /// first file read whole is returned at once (so at most one file's bytes are held).
    async fn evaluate_due(&mut self) -> Option<Pickup> {
        let now = Instant::now();
        let mut due: Vec<(Instant, String)> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(n, t)| (t.stable_since, n.clone()))
            .collect();
        due.sort();
        for (_, name) in due {
            match self.look(&name, now) {
                Look::Wait => {}
                Look::Refuse(id, reason) => self.refuse(name, id, reason),
                Look::Read(id, kind) => {
                    let path = self.cfg.dir.join(&name);
                    let max = self.cfg.max_file_bytes;
                    let read_path = path.clone();
                    // Large files are read off the async threads. If `next` is dropped here,
                    // nothing has been recorded yet and the file is simply looked at again.
                    let result =
                        tokio::task::spawn_blocking(move || read_whole(&read_path, max, id)).await;
                    if let Some(p) = self.after_read(name, path, id, kind, result) {
                        return Some(p);
                    }
                }
            }
        }
        None
    }

    fn look(&mut self, name: &str, now: Instant) -> Look {
        let path = self.cfg.dir.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.tracked.remove(name);
                return Look::Wait;
            }
            Err(e) => {
                warn!(file = %name, error = %e, "outbox file cannot be examined; will retry");
                if let Some(t) = self.tracked.get_mut(name) {
                    t.due = now + self.cfg.rescan_interval;
                }
                return Look::Wait;
            }
        };
        let id = FileIdentity::of(&meta);
        if self.emitted.get(name).is_some_and(|e| e.id == id) {
            self.tracked.remove(name);
            return Look::Wait;
        }
        let settle = self.cfg.settle;
        let recheck = self.cfg.rescan_interval;
        let Some(t) = self.tracked.get_mut(name) else {
            return Look::Wait;
        };
        if t.last_id != Some(id) {
            t.last_id = Some(id);
            t.stable_since = now;
            t.due = now + settle;
            return Look::Wait;
        }
        let settled_at = t.stable_since + settle;
        if now < settled_at {
            t.due = settled_at;
            return Look::Wait;
        }
        let file_type = meta.file_type();
        // Only a regular file has a writer to wait for.
        if file_type.is_file() && !t.closed {
            t.due = now + recheck;
            return Look::Wait;
        }
        if fs::symlink_metadata(self.cfg.dir.join(format!("{name}.lock"))).is_ok() {
            // The lock's removal event re-arms this; the poll covers lost events.
            t.due = now + settle;
            return Look::Wait;
        }
        if file_type.is_symlink() {
            return Look::Refuse(id, PickupRefusal::Symlink);
        }
        if !file_type.is_file() || file_type.is_fifo() {
            return Look::Refuse(id, PickupRefusal::NotRegular);
        }
        let kind = match classify_name(name) {
            NameClass::Candidate(kind) => kind,
            NameClass::Unsupported => return Look::Refuse(id, PickupRefusal::UnsupportedName),
            NameClass::Ignore => {
                self.tracked.remove(name);
                return Look::Wait;
            }
        };
        if id.len > self.cfg.max_file_bytes {
            return Look::Refuse(
                id,
                PickupRefusal::TooLarge {
                    len: id.len,
                    max: self.cfg.max_file_bytes,
                },
            );
        }
        Look::Read(id, kind)
    }

    fn refuse(&mut self, name: String, id: FileIdentity, reason: PickupRefusal) {
        self.mark_emitted(&name, id);
        self.ready.push_back(Pickup::Refused { name, reason });
    }

    fn mark_emitted(&mut self, name: &str, id: FileIdentity) {
        self.tracked.remove(name);
        self.emitted.insert(
            name.to_owned(),
            Emitted {
                id,
                listed: self.generation,
            },
        );
    }

    fn after_read(
        &mut self,
        name: String,
        path: PathBuf,
        id: FileIdentity,
        kind: FileKind,
        result: Result<io::Result<ReadOutcome>, tokio::task::JoinError>,
    ) -> Option<Pickup> {
        let now = Instant::now();
        let changed = match result {
            Ok(Ok(ReadOutcome::Whole { bytes, after }))
                if after == id && bytes.len() as u64 == id.len =>
            {
                self.mark_emitted(&name, id);
                return Some(Pickup::Ready(ReadyFile {
                    name,
                    path,
                    bytes,
                    identity: id,
                    kind,
                }));
            }
            Ok(Ok(ReadOutcome::Whole { after, .. })) | Ok(Ok(ReadOutcome::Changed(after))) => {
                Some(after)
            }
            Ok(Ok(ReadOutcome::NotRegular)) => {
                self.mark_emitted(&name, id);
                return Some(Pickup::Refused {
                    name,
                    reason: PickupRefusal::NotRegular,
                });
            }
            Ok(Err(e)) => {
                let errno = e.raw_os_error();
                let reason = if errno == Some(Errno::LOOP.raw_os_error()) {
                    // Replaced by a symlink between the look and the open.
                    Some(PickupRefusal::Symlink)
                } else if errno == Some(Errno::NXIO.raw_os_error()) {
                    Some(PickupRefusal::NotRegular)
                } else if e.kind() == io::ErrorKind::PermissionDenied {
                    Some(PickupRefusal::Unreadable)
                } else if e.kind() == io::ErrorKind::NotFound {
                    self.tracked.remove(&name);
                    return None;
                } else {
                    // EIO, EMFILE, ENOMEM…: not the file's fault; never refuse it for that.
                    warn!(file = %name, error = %e, "outbox file could not be read; will retry");
                    None
                };
                if let Some(reason) = reason {
                    self.mark_emitted(&name, id);
                    return Some(Pickup::Refused { name, reason });
                }
                None
            }
            Err(e) => {
                warn!(file = %name, error = %e, "outbox read task failed; will retry");
                None
            }
        };
        let recheck = self.cfg.rescan_interval;
        let settle = self.cfg.settle;
        if let Some(t) = self.tracked.get_mut(&name) {
            match changed {
                Some(after) => {
                    debug!(file = %name, "outbox file changed while being read; waiting for it to settle");
                    t.last_id = Some(after);
                    t.stable_since = now;
                    t.due = now + settle;
                }
                None => t.due = now + recheck,
            }
        }
        None
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        if self.rescan_now {
            return now;
        }
        let earliest = self
            .tracked
            .values()
            .map(|t| t.due)
            .fold(self.next_rescan, Instant::min);
        earliest.max(now + MIN_WAIT)
    }
}

/// Opens without following links or blocking, checks it is still the regular file that was
/// looked at, and reads at most `max + 1` bytes.
fn read_whole(path: &Path, max: u64, expected: FileIdentity) -> io::Result<ReadOutcome> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    let before = file.metadata()?;
    if !before.file_type().is_file() {
        return Ok(ReadOutcome::NotRegular);
    }
    let before = FileIdentity::of(&before);
    if before != expected {
        return Ok(ReadOutcome::Changed(before));
    }
    let capacity = usize::try_from(expected.len.min(max)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    (&file)
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    let after = FileIdentity::of(&file.metadata()?);
    Ok(ReadOutcome::Whole { bytes, after })
}

/// A name directly inside the outbox: not empty, no `/` or NUL, not `.`/`..`/`rejected`.
fn check_name(name: &str) -> Result<(), OutboxError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
        && name != REJECTED_DIR;
    if ok {
        Ok(())
    } else {
        let shown: String = name
            .chars()
            .take(80)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Err(OutboxError::BadName(shown))
    }
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    crate::durable::sync_dir(dir).map_err(OutboxError::io("sync", dir))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Deletes a taken file if it still has the identity it was read under, then syncs the
/// directory. A version a provider put there meanwhile stays (and is taken as a new file); a
/// file already gone is fine.
pub fn remove_taken(dir: &Path, f: &ReadyFile) -> Result<(), OutboxError> {
    check_name(&f.name)?;
    let path = dir.join(&f.name);
    match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(OutboxError::io("examine", &path)(e)),
        Ok(m) if FileIdentity::of(&m) != f.identity => {
            debug!(file = %f.name, "outbox file replaced after it was read; the new version stays");
            return Ok(());
        }
        Ok(_) => {}
    }
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(OutboxError::io("remove", &path)(e)),
        Ok(()) => {}
    }
    sync_dir(dir)
}

/// Files a refusal in `dir/rejected/` and returns the path of the refused file there.
///
/// Without `replacement`, `dir/name` itself is moved (whatever it is: a link is moved as a link,
/// never followed); if it is already gone only the error document is written. With
/// `replacement` (the refused rows of a batch) those bytes are written instead and `dir/name`
/// is left for the caller. `error_json` becomes `<same name>.error.json`. Nothing earlier in
/// `rejected/` is ever replaced.
pub fn reject(
    dir: &Path,
    name: &str,
    replacement: Option<&[u8]>,
    error_json: &[u8],
) -> Result<PathBuf, OutboxError> {
    check_name(name)?;
    let rejected = dir.join(REJECTED_DIR);
    fs::create_dir_all(&rejected).map_err(OutboxError::io("create", &rejected))?;
    let base = truncate_at_char(name, MAX_REJECTED_BASE);
    for n in 0..=MAX_REJECTED_SUFFIX {
        let target = if n == 0 {
            base.to_owned()
        } else {
            format!("{base}.{n}")
        };
        let doc = format!("{target}.error.json");
        if exists(&rejected.join(&target)) || exists(&rejected.join(&doc)) {
            continue;
        }
        if !place_new(&rejected, &doc, error_json)? {
            continue;
        }
        let placed = match replacement {
            Some(bytes) => place_new(&rejected, &target, bytes),
            None => move_new(&dir.join(name), &rejected.join(&target)),
        };
        match placed {
            Ok(true) => {}
            Ok(false) => {
                // Someone else filled this slot between the check and the move: next one.
                let _ = fs::remove_file(rejected.join(&doc));
                continue;
            }
            Err(e) => {
                // Leave no error document without its file.
                let _ = fs::remove_file(rejected.join(&doc));
                return Err(e);
            }
        }
        sync_dir(&rejected)?;
        if replacement.is_none() {
            sync_dir(dir)?;
        }
        return Ok(rejected.join(target));
    }
    Err(OutboxError::RejectedFull(base.to_owned()))
}

fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Renames without replacing. `Ok(false)` when `to` exists. Falls back to check-then-rename on
/// filesystems without `RENAME_NOREPLACE` (refex is the only writer of `rejected/`).
fn rename_new(from: &Path, to: &Path) -> io::Result<bool> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(Errno::INVAL | Errno::NOSYS) => {
            if exists(to) {
                return Ok(false);
            }
            fs::rename(from, to).map(|()| true)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `dir/name` whole via a synced temporary, never replacing an existing file.
fn place_new(dir: &Path, name: &str, bytes: &[u8]) -> Result<bool, OutboxError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    crate::durable::write_synced(&tmp, bytes).map_err(OutboxError::io("write", &tmp))?;
    let to = dir.join(name);
    let placed = rename_new(&tmp, &to);
    if !matches!(placed, Ok(true)) {
        let _ = fs::remove_file(&tmp);
    }
    placed.map_err(OutboxError::io("rename", &to))
}

/// Moves `from` to `to` without replacing; a missing `from` counts as done.
fn move_new(from: &Path, to: &Path) -> Result<bool, OutboxError> {
    match rename_new(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        other => other.map_err(OutboxError::io("move", from)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

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

    #[tokio::test]
    async fn a_hard_link_which_has_no_close_event_is_still_taken() {
        let dir = outbox();
        let elsewhere = tempfile::tempdir().unwrap();
        let original = elsewhere.path().join("made-elsewhere.json");
        fs::write(&original, b"{}").unwrap();
        let mut w = watcher(&dir);
        fs::hard_link(&original, dir.path().join("linked.json")).unwrap();
        assert_eq!(next_ready(&mut w).await.name, "linked.json");
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
}
