//! Watching the outbox directory where provider systems drop `*.json` and `*.csv` files: the
//! only module that uses inotify.
//!
//! A file is taken only when its writer has finished: after an `IN_CLOSE_WRITE` or `IN_MOVED_TO`
//! event (or, for files found by a rescan or present at start, where no event was seen, when it
//! is first seen) AND its size and mtime have then stayed unchanged for the settle window, AND no
//! `NAME.lock` sidecar exists. Names starting with `.`, ending `.tmp`, `.part` or `.lock` are
//! ignored (temporary or sidecar files); other names that are not `.json` / `.csv` are refused,
//! so a provider notices a misnamed file. Symlinks, FIFOs, devices, directories and files over the
//! size limit are refused without reading (files are opened with `O_NOFOLLOW` and read to at most
//! the limit + 1 bytes); the identity (device, inode, size, mtime) is checked again after reading,
//! and a file that changed meanwhile is treated as not yet settled.
//! Events can be lost (queue overflow → full rescan) and the daemon may restart: a periodic full
//! rescan is the safety net. A file is emitted once per identity until [`OutboxWatcher::forget`].
//! At most `MAX_TRACKED` names are tracked; beyond that new names wait for a later rescan.
//! Must not: delete or move anything except through [`remove_taken`] and [`reject`].

use std::collections::{HashMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{Inotify, WatchMask};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tracing::warn;

const MAX_TRACKED: usize = 100_000;

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a plain file name")]
    BadName(String),
}

impl OutboxError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// True when the volume is full (the caller pauses and retries).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if matches!(source.raw_os_error(), Some(28) | Some(122)))
    }
}

/// Watcher settings.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub dir: PathBuf,
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub max_file_bytes: u64,
}

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    fn of(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// The kind of referral file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Json,
    Csv,
}

/// A settled file, read whole.
#[derive(Debug)]
pub struct ReadyFile {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub identity: FileIdentity,
    pub kind: FileKind,
}

/// Why a file is refused without being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickupRefusal {
    Symlink,
    NotRegular,
    TooLarge { len: u64, max: u64 },
    UnsupportedName,
    Unreadable(String),
}

impl PickupRefusal {
    /// The rule name used in `NAME.error.json`.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Symlink => "symlink",
            Self::NotRegular => "not_a_regular_file",
            Self::TooLarge { .. } => "file_too_large",
            Self::UnsupportedName => "unsupported_file_name",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

impl std::fmt::Display for PickupRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink => f.write_str(
                "symbolic links are not accepted; write the file itself into the outbox",
            ),
            Self::NotRegular => {
                f.write_str("only regular files are accepted (not pipes, devices or directories)")
            }
            Self::TooLarge { len, max } => write!(
                f,
                "file is {len} bytes; the limit is {max} bytes (split the batch)"
            ),
            Self::UnsupportedName => {
                f.write_str("only *.json (one referral) and *.csv (a batch) are accepted")
            }
            Self::Unreadable(e) => write!(f, "file could not be read: {e}"),
        }
    }
}

/// What the watcher hands to intake.
#[derive(Debug)]
pub enum Pickup {
    Ready(ReadyFile),
    Refused { name: String, reason: PickupRefusal },
}

struct Track {
    /// The writer has closed it (event), or it was found by a scan.
    closed: bool,
    last_change: Instant,
    seen: Option<FileIdentity>,
}

/// The outbox watcher.
pub struct OutboxWatcher {
    cfg: WatchConfig,
    inotify: Option<AsyncFd<Inotify>>,
    tracked: HashMap<String, Track>,
    emitted: HashMap<String, FileIdentity>,
    next_rescan: Instant,
    ready: VecDeque<Pickup>,
}

enum NameClass {
    Ignore,
    Candidate(FileKind),
    Unsupported,
}

fn classify_name(name: &str) -> NameClass {
    if name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".lock")
        || name == "rejected"
    {
        NameClass::Ignore
    } else if name.ends_with(".json") {
        NameClass::Candidate(FileKind::Json)
    } else if name.ends_with(".csv") {
        NameClass::Candidate(FileKind::Csv)
    } else {
        NameClass::Unsupported
    }
}

impl OutboxWatcher {
    /// Creates the directories and the inotify watch; files already present are taken.
    pub fn new(cfg: WatchConfig) -> Result<Self, OutboxError> {
        Self::with_events(cfg, true)
    }

    /// As `new`; without events (`events = false`) only the rescan finds files (tests).
    pub fn with_events(cfg: WatchConfig, events: bool) -> Result<Self, OutboxError> {
        fs::create_dir_all(cfg.dir.join("rejected")).map_err(|e| OutboxError::io(&cfg.dir, e))?;
        let inotify = if events {
            let inotify = Inotify::init().map_err(|e| OutboxError::io(&cfg.dir, e))?;
            inotify
                .watches()
                .add(
                    &cfg.dir,
                    WatchMask::CREATE
                        | WatchMask::MODIFY
                        | WatchMask::CLOSE_WRITE
                        | WatchMask::MOVED_TO
                        | WatchMask::MOVED_FROM
                        | WatchMask::DELETE,
                )
                .map_err(|e| OutboxError::io(&cfg.dir, e))?;
            // The watcher owns the inotify descriptor alone for its whole life, which is what
            // the deprecated (safe) constructor needs; the replacement is `unsafe`.
            #[allow(deprecated)]
            let fd = AsyncFd::new(inotify);
            Some(fd.map_err(|e| OutboxError::io(&cfg.dir, e))?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            inotify,
            tracked: HashMap::new(),
            emitted: HashMap::new(),
            next_rescan: Instant::now(),
            ready: VecDeque::new(),
        })
    }

    /// Lets `name` be emitted again (the caller could not finish it).
    pub fn forget(&mut self, name: &str) {
        self.emitted.remove(name);
        self.tracked.remove(name);
    }

    fn touch(&mut self, name: &str, closed: bool) {
        if self.tracked.len() >= MAX_TRACKED && !self.tracked.contains_key(name) {
            return;
        }
        let t = self.tracked.entry(name.to_owned()).or_insert(Track {
            closed,
            last_change: Instant::now(),
            seen: None,
        });
        t.closed = closed;
        t.last_change = Instant::now();
    }

    fn rescan(&mut self) {
        self.next_rescan = Instant::now() + self.cfg.rescan_interval;
        let Ok(entries) = fs::read_dir(&self.cfg.dir) else {
            warn!(dir = %self.cfg.dir.display(), "outbox cannot be listed");
            return;
        };
        let mut present = std::collections::HashSet::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            present.insert(name.clone());
            if matches!(classify_name(&name), NameClass::Ignore) || self.tracked.contains_key(&name)
            {
                continue;
            }
            if let Some(id) = self.emitted.get(&name) {
                if fs::symlink_metadata(e.path())
                    .map(|m| FileIdentity::of(&m))
                    .ok()
                    .as_ref()
                    == Some(id)
                {
                    continue;
                }
            }
            self.touch(&name, true);
        }
        self.emitted.retain(|n, _| present.contains(n));
        self.tracked.retain(|n, _| present.contains(n));
    }

    fn on_events(&mut self) {
        let Some(fd) = self.inotify.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8192];
        let mut changes = Vec::new();
        let mut overflow = false;
        loop {
            match fd.get_mut().read_events(&mut buf) {
                Ok(events) => {
                    let mut any = false;
                    for ev in events {
                        any = true;
                        if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                            overflow = true;
                            continue;
                        }
                        let Some(name) = ev.name.map(|n| n.to_string_lossy().into_owned()) else {
                            continue;
                        };
                        changes.push((name, ev.mask));
                    }
                    if !any {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("outbox events failed, relying on rescans: {e}");
                    break;
                }
            }
        }
        for (name, mask) in changes {
            if matches!(classify_name(&name), NameClass::Ignore) {
                continue;
            }
            if mask.intersects(inotify::EventMask::DELETE | inotify::EventMask::MOVED_FROM) {
                self.tracked.remove(&name);
                self.emitted.remove(&name);
            } else if mask
                .intersects(inotify::EventMask::CLOSE_WRITE | inotify::EventMask::MOVED_TO)
            {
                self.emitted.remove(&name);
                self.touch(&name, true);
            } else {
                self.emitted.remove(&name);
                self.touch(&name, false);
            }
        }
        if overflow {
            warn!("outbox event queue overflowed; rescanning");
            self.rescan();
        }
    }

    /// Looks at every tracked file whose settle window has passed.
    fn evaluate(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.closed && now.duration_since(t.last_change) >= self.cfg.settle)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let path = self.cfg.dir.join(&name);
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => {
                    self.tracked.remove(&name);
                    continue;
                }
            };
            if self.cfg.dir.join(format!("{name}.lock")).exists() {
                continue;
            }
            let id = FileIdentity::of(&meta);
            let refusal = if meta.file_type().is_symlink() {
                Some(PickupRefusal::Symlink)
            } else if !meta.file_type().is_file() || meta.file_type().is_fifo() {
                Some(PickupRefusal::NotRegular)
            } else if meta.len() > self.cfg.max_file_bytes {
                Some(PickupRefusal::TooLarge {
                    len: meta.len(),
                    max: self.cfg.max_file_bytes,
                })
            } else if matches!(classify_name(&name), NameClass::Unsupported) {
                Some(PickupRefusal::UnsupportedName)
            } else {
                None
            };
            if let Some(reason) = refusal {
                self.tracked.remove(&name);
                self.emitted.insert(name.clone(), id);
                self.ready.push_back(Pickup::Refused { name, reason });
                continue;
            }
            let Some(track) = self.tracked.get_mut(&name) else {
                continue;
            };
            if track.seen != Some(id) {
                // First look, or it changed since: wait one more settle window.
                track.seen = Some(id);
                track.last_change = now;
                continue;
            }
            let NameClass::Candidate(kind) = classify_name(&name) else {
                continue;
            };
            match read_bounded(&path, self.cfg.max_file_bytes) {
                Ok((bytes, after)) if after == id => {
                    self.tracked.remove(&name);
                    self.emitted.insert(name.clone(), id);
                    self.ready.push_back(Pickup::Ready(ReadyFile {
                        name,
                        path,
                        bytes,
                        identity: id,
                        kind,
                    }));
                }
                Ok((_, after)) => {
                    track.seen = Some(after);
                    track.last_change = now;
                }
                Err(e) if e.raw_os_error() == Some(40) => {
                    // ELOOP: replaced by a symlink between the look and the open.
                    self.tracked.remove(&name);
                    self.ready.push_back(Pickup::Refused {
                        name,
                        reason: PickupRefusal::Symlink,
                    });
                }
                Err(e) => {
                    self.tracked.remove(&name);
                    self.emitted.insert(name.clone(), id);
                    self.ready.push_back(Pickup::Refused {
                        name,
                        reason: PickupRefusal::Unreadable(e.kind().to_string()),
                    });
                }
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let settle = self
            .tracked
            .values()
            .filter(|t| t.closed)
            .map(|t| t.last_change + self.cfg.settle)
            .min()
            .unwrap_or(self.next_rescan);
        settle
            .min(self.next_rescan)
            .max(Instant::now() + Duration::from_millis(10))
    }

    /// Waits for the next file that is ready or must be refused.
    pub async fn next(&mut self) -> Pickup {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return p;
            }
            if Instant::now() >= self.next_rescan {
                self.rescan();
            }
            self.evaluate();
            if let Some(p) = self.ready.pop_front() {
                return p;
            }
            let deadline = self.next_deadline();
            match self.inotify.as_ref() {
                Some(fd) => {
                    tokio::select! {
                        r = fd.readable() => {
                            if let Ok(mut guard) = r {
                                guard.clear_ready();
                            }
                            self.on_events();
                        }
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => tokio::time::sleep_until(deadline).await,
            }
        }
    }
}

/// Reads at most `max + 1` bytes without following a symlink; returns the identity after.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, FileIdentity)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut bytes = Vec::new();
    (&f).take(max + 1).read_to_end(&mut bytes)?;
    let after = FileIdentity::of(&f.metadata()?);
    Ok((bytes, after))
}

fn check_name(name: &str) -> Result<(), OutboxError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.len() > 255 {
        return Err(OutboxError::BadName(name.chars().take(80).collect()));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    crate::durable::sync_dir(dir).map_err(|e| OutboxError::io(dir, e))
}

/// Deletes a taken file if it is still the version that was read, then syncs the directory.
pub fn remove_taken(dir: &Path, f: &ReadyFile) -> Result<(), OutboxError> {
    match fs::symlink_metadata(&f.path) {
        Ok(m) if FileIdentity::of(&m) == f.identity => {
            fs::remove_file(&f.path).map_err(|e| OutboxError::io(&f.path, e))?;
            sync_dir(dir)
        }
        // Replaced by a new version, or already gone: leave it.
        _ => Ok(()),
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), OutboxError> {
    crate::durable::replace(dir, &format!(".{name}.tmp"), name, bytes)
        .map_err(|e| OutboxError::io(&dir.join(name), e))
}

/// Files a refusal: moves `dir/name` into `dir/rejected/` (or, with `replacement`, writes those
/// bytes there instead and leaves the original alone) with `NAME.error.json` beside it. An
/// earlier rejection of the same name is never overwritten (`name.1`, `name.2`, …).
pub fn reject(
    dir: &Path,
    name: &str,
    replacement: Option<&[u8]>,
    error_json: &[u8],
) -> Result<PathBuf, OutboxError> {
    check_name(name)?;
    let rejected = dir.join("rejected");
    fs::create_dir_all(&rejected).map_err(|e| OutboxError::io(&rejected, e))?;
    let mut target = name.to_owned();
    let mut n = 0;
    while rejected.join(&target).exists() || rejected.join(format!("{target}.error.json")).exists()
    {
        n += 1;
        target = format!("{name}.{n}");
    }
    write_atomic(&rejected, &format!("{target}.error.json"), error_json)?;
    match replacement {
        Some(bytes) => write_atomic(&rejected, &target, bytes)?,
        None => {
            let from = dir.join(name);
            if fs::symlink_metadata(&from).is_ok() {
                fs::rename(&from, rejected.join(&target)).map_err(|e| OutboxError::io(&from, e))?;
            }
        }
    }
    sync_dir(&rejected)?;
    sync_dir(dir)?;
    Ok(rejected.join(target))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn cfg(dir: &Path) -> WatchConfig {
        WatchConfig {
            dir: dir.to_owned(),
            settle: Duration::from_millis(150),
            rescan_interval: Duration::from_millis(400),
            max_file_bytes: 1000,
        }
    }

    async fn next(w: &mut OutboxWatcher) -> Pickup {
        tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("a pickup within 10 s")
    }

    async fn nothing(w: &mut OutboxWatcher, for_ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(for_ms), w.next())
            .await
            .is_err()
    }

    fn ready(p: Pickup) -> ReadyFile {
        match p {
            Pickup::Ready(f) => f,
            other => panic!("expected a ready file, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_renamed_file_is_taken_once_and_temporary_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        fs::write(dir.path().join(".a.json"), b"{}").unwrap();
        fs::write(dir.path().join("b.json.tmp"), b"{}").unwrap();
        fs::write(dir.path().join("c.csv.part"), b"x").unwrap();
        assert!(nothing(&mut w, 800).await, "temporary names are not taken");
        fs::rename(dir.path().join(".a.json"), dir.path().join("a.json")).unwrap();
        let f = ready(next(&mut w).await);
        assert_eq!(
            (f.name.as_str(), f.bytes.as_slice(), f.kind),
            ("a.json", &b"{}"[..], FileKind::Json)
        );
        assert!(nothing(&mut w, 1000).await, "emitted once");
    }

    #[tokio::test]
    async fn a_file_written_slowly_in_place_is_taken_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        let path = dir.path().join("slow.csv");
        let writer = tokio::spawn(async move {
            let mut f = fs::File::create(&path).unwrap();
            for i in 0..8 {
                f.write_all(format!("line {i}\n").as_bytes()).unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        });
        let f = ready(next(&mut w).await);
        writer.await.unwrap();
        assert_eq!(
            f.bytes.iter().filter(|b| **b == b'\n').count(),
            8,
            "{}",
            String::from_utf8_lossy(&f.bytes)
        );
        assert!(nothing(&mut w, 800).await);
    }

    #[tokio::test]
    async fn a_lock_sidecar_holds_a_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        fs::write(dir.path().join("x.json.lock"), b"").unwrap();
        fs::write(dir.path().join("x.json"), b"{}").unwrap();
        assert!(nothing(&mut w, 800).await);
        fs::remove_file(dir.path().join("x.json.lock")).unwrap();
        assert_eq!(ready(next(&mut w).await).name, "x.json");
    }

    #[tokio::test]
    async fn symlinks_fifos_large_and_misnamed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link.json")).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(dir.path().join("pipe.json"))
            .status()
            .unwrap()
            .success());
        fs::write(dir.path().join("big.json"), vec![b' '; 1001]).unwrap();
        fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            match next(&mut w).await {
                Pickup::Refused { name, reason } => got.push((name, reason.rule())),
                other => panic!("{other:?}"),
            }
        }
        got.sort();
        assert_eq!(
            got,
            vec![
                ("big.json".into(), "file_too_large"),
                ("link.json".into(), "symlink"),
                ("notes.txt".into(), "unsupported_file_name"),
                ("pipe.json".into(), "not_a_regular_file"),
            ]
        );
    }

    #[tokio::test]
    async fn files_present_at_start_and_missed_events_are_found_by_rescans() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("early.json"), b"{}").unwrap();
        let mut w = OutboxWatcher::with_events(cfg(dir.path()), false).unwrap();
        assert_eq!(ready(next(&mut w).await).name, "early.json");
        fs::write(dir.path().join("late.csv"), b"a").unwrap();
        assert_eq!(
            ready(next(&mut w).await).name,
            "late.csv",
            "no events: the rescan finds it"
        );
    }

    #[tokio::test]
    async fn forget_makes_a_file_eligible_again() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json"), b"{}").unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        assert_eq!(ready(next(&mut w).await).name, "a.json");
        assert!(nothing(&mut w, 700).await);
        w.forget("a.json");
        assert_eq!(ready(next(&mut w).await).name, "a.json");
    }

    #[tokio::test]
    async fn remove_taken_leaves_a_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json"), b"{}").unwrap();
        let mut w = OutboxWatcher::new(cfg(dir.path())).unwrap();
        let f = ready(next(&mut w).await);
        fs::write(dir.path().join(".new"), b"{\"new\":1}").unwrap();
        fs::rename(dir.path().join(".new"), dir.path().join("a.json")).unwrap();
        remove_taken(dir.path(), &f).unwrap();
        assert!(dir.path().join("a.json").exists(), "the new version stays");
        let f2 = ready(next(&mut w).await);
        remove_taken(dir.path(), &f2).unwrap();
        assert!(!dir.path().join("a.json").exists());
    }

    #[test]
    fn rejections_are_numbered_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.csv"), b"one").unwrap();
        let p1 = reject(dir.path(), "a.csv", None, b"{\"e\":1}").unwrap();
        fs::write(dir.path().join("a.csv"), b"two").unwrap();
        let p2 = reject(dir.path(), "a.csv", Some(b"rows"), b"{\"e\":2}").unwrap();
        assert_eq!(fs::read(&p1).unwrap(), b"one");
        assert_eq!(fs::read(&p2).unwrap(), b"rows");
        assert!(p2.ends_with("rejected/a.csv.1"));
        assert_eq!(
            fs::read(dir.path().join("rejected/a.csv.1.error.json")).unwrap(),
            b"{\"e\":2}"
        );
        assert!(
            dir.path().join("a.csv").exists(),
            "with a replacement, the original is left for the caller"
        );
        assert!(reject(dir.path(), "../x", None, b"{}").is_err());
    }
}
