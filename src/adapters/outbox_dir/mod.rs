//! Watching the outbox directory where provider systems drop `*.json` and `*.csv` files, and
//! the two ways a file leaves it ([`remove_taken`], [`reject`]). The only module that uses
//! inotify.
//!
//! # Which names count
//! - Ignored (never read, never refused): names ending `.tmp`, `.part` or `.lock`, names of the
//!   form `.X…` (one leading dot, then anything but a dot), and the `rejected` subdirectory.
//!   These are how providers write under a temporary name before renaming into place, and the
//!   lock sidecars.
//! - Refused by name ([`PickupRefusal::ControlCharName`]): a name holding a control character
//!   (newline, escape, DEL, C1…), which no provider writes on purpose and which would corrupt
//!   logs and terminals; the name is only ever shown escaped.
//! - Refused by name ([`PickupRefusal::DotName`]): names starting `..` and the bare `.json` /
//!   `.csv`: not the temporary convention (their rename target would itself be hidden), so
//!   without a refusal they would lie in the outbox forever unnoticed.
//! - Taken: names ending `.json` (one referral) or `.csv` (a batch); the extension is matched
//!   without regard to case, because Windows tools write `.JSON`.
//! - Everything else is refused as [`PickupRefusal::UnsupportedName`] (and so moved to
//!   `rejected/` by the caller), so a provider notices a misnamed file instead of it lying in
//!   the outbox forever.
//! - Refused by name ([`PickupRefusal::NotUtf8Name`]): a name that is not UTF-8 (judged on the
//!   raw bytes: the temporary and lock endings and the one-leading-dot form are ignored as
//!   above). It cannot be carried as a `String`, so the watcher first renames it inside the
//!   outbox, never replacing anything (`RENAME_NOREPLACE`, or link + unlink where that is not
//!   supported), to [`not_utf8_name`]: each byte that is not UTF-8, each control character
//!   and each `\` written `\xNN`, then the ending [`NOT_UTF8_ENDING`] (`.N` before it if the
//!   name is taken). A name with that ending is refused by name alone, so a file renamed just
//!   before a crash is still refused after the restart, never taken. The raw bytes are never
//!   logged. A name that cannot be renamed (permission denied) is left alone and counted in a
//!   warning at each rescan.
//!
//! # When a file is taken
//! All of these hold:
//! 0. a file that appeared by rename (`IN_MOVED_TO`, the last event for its name) is complete by
//!    the contract (REFERRAL.md "Dropping a file"): it is taken at once, without the settle
//!    window of 2. below (3. and 4. still hold, and it is read only if its identity is the same
//!    before and after the read). Any later write to it, and any file found by a rescan (at
//!    start or after an overflow), goes back to the rules below;
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
//! so are hard links (a link count above 1, looked at with `lstat` and again on the open file):
//! a second name for the data means a file outside the outbox (or another user's) could be
//! sent by linking it in;
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
//! Must not: delete or move anything except through [`remove_taken`] and [`reject`] (and the
//! rename of a name that is not UTF-8, above, which never replaces a file); parse file
//! contents; log file contents or raw name bytes.

use std::fs::{self};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

mod leave;
mod watcher;

pub use leave::{
    expired_rejections, reject, remove_all_taken, remove_rejections, remove_taken,
    remove_taken_sharing,
};
pub use watcher::OutboxWatcher;
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

/// The ending given to a name that was not UTF-8 when the watcher renamed it.
pub const NOT_UTF8_ENDING: &str = ".not-utf8";

/// Longest escaped part of a renamed non-UTF-8 name, so that it plus a numeric suffix plus
/// [`NOT_UTF8_ENDING`] stays well under the 255-byte file name limit.
const MAX_NOT_UTF8_BASE: usize = 200;

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
        matches!(self, Self::Io { source, .. } if crate::adapters::durable::is_disk_full(source))
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
    /// A regular file with more than one name (link count > 1).
    HardLink,
    /// The name holds a control character.
    ControlCharName,
    /// A dot-name that is not the temporary convention (`..x`, `.json`, `.csv`).
    DotName,
    /// The name was not UTF-8 (it was renamed to its escaped form, see the module doc).
    NotUtf8Name,
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
            Self::HardLink => "hard_link",
            Self::ControlCharName => "control_character_in_name",
            Self::DotName => "hidden_file_name",
            Self::NotUtf8Name => "name_not_utf8",
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
            Self::HardLink => f.write_str(
                "the file has more than one name (a hard link); copy or write the file itself \
                 into the outbox",
            ),
            Self::ControlCharName => f.write_str(
                "the file name holds a control character (newline, escape, …); use letters, \
                 digits, '-', '_' and '.'",
            ),
            Self::DotName => f.write_str(
                "names starting with '.' are temporary names and are never taken, but this one \
                 cannot be renamed into a takeable name; name the file like ref-123.json",
            ),
            Self::NotUtf8Name => f.write_str(
                "the file name was not UTF-8 text; refex renamed it to this name, which is the \
                 original with each byte that is not UTF-8 (and each control character and \
                 '\\') written \\xNN, and the ending .not-utf8 (a .N before it when the name \
                 was taken); use letters, digits, '-', '_' and '.'",
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
    Refused(PickupRefusal),
}

fn classify_name(name: &str) -> NameClass {
    let lower = name.to_ascii_lowercase();
    if name == REJECTED_DIR
        || [".tmp", ".part", ".lock"]
            .iter()
            .any(|s| lower.ends_with(s))
    {
        // Temporary and lock names are never touched, whatever else they hold: moving one away
        // could break a writer between its close and its rename.
        NameClass::Ignore
    } else if name.chars().any(char::is_control) {
        NameClass::Refused(PickupRefusal::ControlCharName)
    } else if lower.ends_with(NOT_UTF8_ENDING) {
        NameClass::Refused(PickupRefusal::NotUtf8Name)
    } else if name.starts_with("..") || lower == ".json" || lower == ".csv" {
        NameClass::Refused(PickupRefusal::DotName)
    } else if name.starts_with('.') {
        NameClass::Ignore
    } else if lower.ends_with(".json") {
        NameClass::Candidate(FileKind::Json)
    } else if lower.ends_with(".csv") {
        NameClass::Candidate(FileKind::Csv)
    } else {
        NameClass::Refused(PickupRefusal::UnsupportedName)
    }
}

/// True for a raw (not UTF-8) name that the rules above ignore: a temporary or lock ending, or
/// one leading dot followed by anything but a dot. Judged on the bytes, as [`classify_name`]
/// judges a `String`.
fn raw_name_ignored(name: &[u8]) -> bool {
    let ends =
        |s: &[u8]| name.len() >= s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s);
    [b".tmp".as_slice(), b".part", b".lock"]
        .iter()
        .any(|s| ends(s))
        || (name.first() == Some(&b'.') && name.get(1) != Some(&b'.'))
}

/// The UTF-8 name a raw name is renamed to before it is refused (without [`NOT_UTF8_ENDING`]):
/// valid text is kept except control characters and `\`, which, like each byte that is not
/// UTF-8, become `\xNN` per byte. At most [`MAX_NOT_UTF8_BASE`] bytes (whole escapes only).
pub fn not_utf8_name(name: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut push = |piece: &str| {
        if out.len() + piece.len() > MAX_NOT_UTF8_BASE {
            return false;
        }
        out.push_str(piece);
        true
    };
    let escape = |bytes: &[u8]| {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "\\x{b:02x}");
            s
        })
    };
    'chunks: for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            let mut buf = [0u8; 4];
            let text = c.encode_utf8(&mut buf);
            let piece = if c.is_control() || c == '\\' {
                escape(text.as_bytes())
            } else {
                text.to_owned()
            };
            if !push(&piece) {
                break 'chunks;
            }
        }
        if !push(&escape(chunk.invalid())) {
            break;
        }
    }
    out
}

/// A name the watcher is waiting on.
struct Tracked {
    /// The writer has finished (close/rename event), or no event knowledge exists.
    closed: bool,
    /// The last event was its rename into place: complete by the contract, no settle window.
    renamed: bool,
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
    HardLink,
}

#[cfg(test)]
mod tests;
