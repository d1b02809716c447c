//! How a file leaves the outbox: [`remove_taken`] after its envelopes are durable, [`reject`]
//! into `rejected/` with its error document (rules in the module doc).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use tracing::debug;

use super::*;

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
        Err(OutboxError::BadName(crate::adapters::durable::shown_name(
            name, 80,
        )))
    }
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    crate::adapters::durable::sync_dir(dir).map_err(OutboxError::io("sync", dir))
}

pub(super) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Deletes a taken file if it still has the identity it was read under, then syncs the
/// directory. A version a provider put there meanwhile stays (and is taken as a new file); a
/// file already gone is fine.
pub fn remove_taken(dir: &Path, f: &ReadyFile) -> Result<(), OutboxError> {
    let sync = crate::adapters::durable::DirSync::new(dir);
    remove_taken_sharing(&sync, dir, &f.name, f.identity)
}

/// [`remove_taken`] for intake's files in flight: the directory sync that makes the deletion
/// durable is shared with the files removed at the same time (`sync` is `dir`'s). Blocks.
pub fn remove_taken_sharing(
    sync: &crate::adapters::durable::DirSync,
    dir: &Path,
    name: &str,
    identity: FileIdentity,
) -> Result<(), OutboxError> {
    let files = [(name.to_owned(), identity)];
    let mut results = remove_all_taken(sync, dir, &files);
    results.pop().unwrap_or(Ok(()))
}

/// [`remove_taken_sharing`] for several files at once: each is deleted (if it still has the
/// identity it was read under), then one directory sync, shared as there, makes every deletion
/// durable. One result per file, in order; a failed sync fails every file it covered. Blocks.
pub fn remove_all_taken(
    sync: &crate::adapters::durable::DirSync,
    dir: &Path,
    files: &[(String, FileIdentity)],
) -> Vec<Result<(), OutboxError>> {
    let mut results: Vec<Result<bool, OutboxError>> = files
        .iter()
        .map(|(name, identity)| unlink_taken(dir, name, *identity))
        .collect();
    if results.iter().any(|r| matches!(r, Ok(true))) {
        if let Err(e) = sync.sync() {
            for r in results.iter_mut().filter(|r| matches!(r, Ok(true))) {
                *r = Err(OutboxError::io("sync", dir)(io::Error::new(
                    e.kind(),
                    e.to_string(),
                )));
            }
        }
    }
    results.into_iter().map(|r| r.map(|_| ())).collect()
}

/// Deletes `dir/name` if it still has `identity`; true when it was deleted here (a file
/// already gone, or replaced since it was read, is left as it is: false).
fn unlink_taken(dir: &Path, name: &str, identity: FileIdentity) -> Result<bool, OutboxError> {
    check_name(name)?;
    let path = dir.join(name);
    match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(OutboxError::io("examine", &path)(e)),
        Ok(m) if FileIdentity::of(&m) != identity => {
            debug!(file = %crate::core::text::escape_for_log(name), "outbox file replaced after it was read; the new version stays");
            return Ok(false);
        }
        Ok(_) => {}
    }
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(OutboxError::io("remove", &path)(e)),
        Ok(()) => Ok(true),
    }
}

/// Files a refusal in `dir/rejected/` and returns the path of the refused file there.
///
/// Without `replacement`, `dir/name` itself is moved (whatever it is: a link is moved as a link,
/// never followed); if it is already gone only the error document is written. With
/// `replacement` (the refused rows of a batch) those bytes are written instead and `dir/name`
/// is left for the caller. `error_json` becomes `<same name>.error.json`. Nothing earlier in
/// `rejected/` is ever replaced. Control characters in the name become `_` there.
pub fn reject(
    dir: &Path,
    name: &str,
    replacement: Option<&[u8]>,
    error_json: &[u8],
) -> Result<PathBuf, OutboxError> {
    check_name(name)?;
    let rejected = dir.join(REJECTED_DIR);
    fs::create_dir_all(&rejected).map_err(OutboxError::io("create", &rejected))?;
    // Control characters are replaced, so that listing `rejected/` cannot disturb a terminal.
    let base: String = crate::core::text::truncate(name, MAX_REJECTED_BASE)
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
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
        if replacement.is_none() {
            restrict_mode(&rejected.join(&target));
        }
        sync_dir(&rejected)?;
        if replacement.is_none() {
            sync_dir(dir)?;
        }
        return Ok(rejected.join(target));
    }
    Err(OutboxError::RejectedFull(base))
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
    crate::adapters::durable::write_synced(&tmp, bytes).map_err(OutboxError::io("write", &tmp))?;
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

/// Makes a moved refused file 0640 whatever mode its provider gave it: it holds personal data.
/// Opened without following links, so a refused symlink never changes its target's mode.
fn restrict_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let opened = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    );
    if let Ok(fd) = opened {
        let file = File::from(fd);
        if file.metadata().is_ok_and(|m| m.is_file()) {
            let _ = file.set_permissions(fs::Permissions::from_mode(0o640));
        }
    }
}

/// Refused files (and their error documents) in `dir/rejected/` last changed before `cutoff`:
/// they hold personal data and are purged after the configured retention.
pub fn expired_rejections(
    dir: &Path,
    cutoff: std::time::SystemTime,
) -> Result<Vec<PathBuf>, OutboxError> {
    let rejected = dir.join(REJECTED_DIR);
    let entries = match fs::read_dir(&rejected) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(OutboxError::io("list", &rejected)(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() && meta.modified().is_ok_and(|m| m <= cutoff) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes refused files found by [`expired_rejections`] (after their erasure is recorded)
/// and syncs `rejected/`. Returns how many were removed.
pub fn remove_rejections(dir: &Path, paths: &[PathBuf]) -> Result<usize, OutboxError> {
    let mut n = 0;
    for p in paths {
        match fs::remove_file(p) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(OutboxError::io("remove", p)(e)),
        }
    }
    if n > 0 {
        sync_dir(&dir.join(REJECTED_DIR))?;
    }
    Ok(n)
}
