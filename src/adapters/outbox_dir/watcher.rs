//! The watcher: inotify events, rescans, settling and reading (rules in the module doc).

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchMask};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::*;
use crate::core::text::escape_for_log;
use std::os::unix::fs::MetadataExt;

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
    pub(super) max_tracked: usize,
    generation: u64,
    next_rescan: Instant,
    rescan_now: bool,
    ready: VecDeque<Pickup>,
    /// Names that were due when last listed, oldest-stable first: looked at in turn before the
    /// tracked names are listed and sorted again (see `evaluate_due`).
    due_in_turn: VecDeque<String>,
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
            due_in_turn: VecDeque::new(),
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
            let batch: Vec<(Option<OsString>, EventMask)> = match fd.get_mut().read_events(&mut buf)
            {
                Ok(events) => events
                    .map(|ev| (ev.name.map(OsStr::to_owned), ev.mask))
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

    fn on_event(&mut self, name: Option<OsString>, mask: EventMask, now: Instant) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            warn!("outbox event queue overflowed; rescanning");
            // Close events may be among the lost ones: everything tracked is now "found by a
            // scan", which still demands the settle window.
            for t in self.tracked.values_mut() {
                t.closed = true;
                t.renamed = false;
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
        let Some(name) = name else {
            return;
        };
        let gone = mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM);
        let name = match name.into_string() {
            Ok(name) => name,
            Err(raw) => {
                if !gone {
                    // A failure is retried (and counted) by the rescans.
                    let _ = self.rename_not_utf8(&raw, now);
                }
                return;
            }
        };
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
        let renamed = mask.contains(EventMask::MOVED_TO);
        let closed = renamed || mask.contains(EventMask::CLOSE_WRITE);
        // A write in progress need not be looked at before a settle window has passed; a close
        // is looked at now (the file may have been stable for long already).
        let due = if closed { now } else { now + self.cfg.settle };
        if let Some(t) = self.tracked.get_mut(&name) {
            t.closed = closed;
            t.renamed = renamed;
            t.last_event = now;
            t.due = due;
        } else if self.has_room() {
            self.tracked.insert(
                name,
                Tracked {
                    closed,
                    renamed,
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
        let mut not_utf8_error = None;
        for entry in entries {
            let Ok(entry) = entry else {
                complete = false;
                break;
            };
            let name = match entry.file_name().into_string() {
                Ok(name) => name,
                Err(raw) => {
                    if let Err(e) = self.rename_not_utf8(&raw, now) {
                        not_utf8 += 1;
                        not_utf8_error = Some(e);
                    }
                    continue;
                }
            };
            if matches!(classify_name(&name), NameClass::Ignore) {
                continue;
            }
            if let Some(t) = self.tracked.get_mut(&name) {
                t.listed = generation;
                if !t.closed && now.duration_since(t.last_event) >= stale_after {
                    debug!(file = %escape_for_log(&name), "no close event came; settling it like a scanned file");
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
                    renamed: false,
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
        if let Some(e) = not_utf8_error {
            warn!(
                count = not_utf8,
                error = %e,
                "outbox file names that are not UTF-8 could not be renamed to be refused; they are left alone"
            );
        }
    }

    /// Renames an outbox name that is not UTF-8 to its escaped form (module doc) and tracks the
    /// new name, which is then refused by name. Names the rules ignore, names held by a lock
    /// sidecar, and names already gone are left alone (`Ok`); `Err` when the rename failed.
    fn rename_not_utf8(&mut self, raw: &OsStr, now: Instant) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = raw.as_bytes();
        if raw_name_ignored(bytes) || !self.has_room() {
            return Ok(());
        }
        let mut lock = raw.to_owned();
        lock.push(".lock");
        if leave::exists(&self.cfg.dir.join(lock)) {
            return Ok(());
        }
        let base = not_utf8_name(bytes);
        let from = self.cfg.dir.join(raw);
        for n in 0..=MAX_REJECTED_SUFFIX {
            let target = if n == 0 {
                format!("{base}{NOT_UTF8_ENDING}")
            } else {
                format!("{base}.{n}{NOT_UTF8_ENDING}")
            };
            match rename_in_outbox(&from, &self.cfg.dir.join(&target)) {
                Ok(false) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
                Ok(true) => {}
            }
            warn!(file = %escape_for_log(&target), "an outbox file name was not UTF-8; renamed to this and refused");
            // The name alone decides, so no settle window (a later write event still waits
            // for its writer).
            let t = self.tracked.entry(target).or_insert(Tracked {
                closed: true,
                renamed: true,
                last_event: now,
                last_id: None,
                stable_since: now,
                due: now,
                listed: self.generation,
            });
            t.due = now;
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "every escaped name is taken",
        ))
    }

    /// Looks at every name whose time has come, oldest-stable first. Refusals are queued; the
    /// first file read whole is returned at once (so at most one file's bytes are held).
    /// The due names are listed and sorted once and then taken in turn, one per call, until
    /// none is left: finding the oldest afresh for every pickup scanned every tracked name each
    /// time, O(n²) for n files dropped at once (~8 % of the sender's CPU with 8,000). A name
    /// that became due after the listing waits for the next one; it is younger than every name
    /// listed, so the order holds. A name looked at and not taken (not settled, or a read cut
    /// short by a dropped `next`) stays tracked and is listed again.
    async fn evaluate_due(&mut self) -> Option<Pickup> {
        let now = Instant::now();
        if self.due_in_turn.is_empty() {
            let mut due: Vec<(Instant, &String)> = self
                .tracked
                .iter()
                .filter(|(_, t)| t.due <= now)
                .map(|(n, t)| (t.stable_since, n))
                .collect();
            due.sort_unstable();
            self.due_in_turn = due.into_iter().map(|(_, n)| n.clone()).collect();
        }
        while let Some(name) = self.due_in_turn.pop_front() {
            // Forgotten, taken or deferred since it was listed.
            if self.tracked.get(&name).is_none_or(|t| t.due > now) {
                continue;
            }
            if let Some(p) = self.take_due(name, now).await {
                return Some(p);
            }
        }
        None
    }

    /// Looks at one due name: a file read whole is returned; a refusal is queued.
    async fn take_due(&mut self, name: String, now: Instant) -> Option<Pickup> {
        match self.look(&name, now) {
            Look::Wait => None,
            Look::Refuse(id, reason) => {
                self.refuse(name, id, reason);
                None
            }
            Look::Read(id, kind) => {
                let path = self.cfg.dir.join(&name);
                let max = self.cfg.max_file_bytes;
                // A small file is read here, as `look` examined it (a few page-cache reads: a
                // trip to the blocking pool and back cost more than the read). Larger files
                // are read off the async threads. If `next` is dropped while one is read,
                // nothing has been recorded yet and the file is simply looked at again.
                let result = if id.len <= READ_INLINE_MAX {
                    Ok(read_whole(&path, max, id))
                } else {
                    let read_path = path.clone();
                    tokio::task::spawn_blocking(move || read_whole(&read_path, max, id)).await
                };
                self.after_read(name, path, id, kind, result)
            }
        }
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
                warn!(file = %escape_for_log(name), error = %e, "outbox file cannot be examined; will retry");
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
            if !t.renamed {
                t.due = now + settle;
                return Look::Wait;
            }
        }
        let settled_at = t.stable_since + settle;
        if now < settled_at && !t.renamed {
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
            NameClass::Refused(reason) => return Look::Refuse(id, reason),
            NameClass::Ignore => {
                self.tracked.remove(name);
                return Look::Wait;
            }
        };
        if meta.nlink() > 1 {
            return Look::Refuse(id, PickupRefusal::HardLink);
        }
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
            Ok(Ok(ReadOutcome::HardLink)) => {
                self.mark_emitted(&name, id);
                return Some(Pickup::Refused {
                    name,
                    reason: PickupRefusal::HardLink,
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
                    warn!(file = %escape_for_log(&name), error = %e, "outbox file could not be read; will retry");
                    None
                };
                if let Some(reason) = reason {
                    self.mark_emitted(&name, id);
                    return Some(Pickup::Refused { name, reason });
                }
                None
            }
            Err(e) => {
                warn!(file = %escape_for_log(&name), error = %e, "outbox read task failed; will retry");
                None
            }
        };
        let recheck = self.cfg.rescan_interval;
        let settle = self.cfg.settle;
        if let Some(t) = self.tracked.get_mut(&name) {
            match changed {
                Some(after) => {
                    debug!(file = %escape_for_log(&name), "outbox file changed while being read; waiting for it to settle");
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

/// Renames inside the outbox without ever replacing a file a provider may have put there:
/// `RENAME_NOREPLACE`, or a hard link and unlink where the filesystem lacks it. `Ok(false)` when
/// `to` exists.
fn rename_in_outbox(from: &Path, to: &Path) -> io::Result<bool> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(Errno::INVAL | Errno::NOSYS) => match fs::hard_link(from, to) {
            Ok(()) => fs::remove_file(from).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
        Err(e) => Err(e.into()),
    }
}

/// Files up to this size are read on the watcher's own thread (see `take_due`).
const READ_INLINE_MAX: u64 = 64 << 10;

/// Opens without following links or blocking, checks it is still the regular file that was
/// looked at, and reads at most `max + 1` bytes.
pub(super) fn read_whole(path: &Path, max: u64, expected: FileIdentity) -> io::Result<ReadOutcome> {
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
    if before.nlink() > 1 {
        return Ok(ReadOutcome::HardLink);
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
