//! Writing delivered referrals into the inbox directory: exactly once, never half-written.
//!
//! Protocol (the consumer's view is only ever "no file" or "the whole file"):
//! 1. [`InboxDir::stage`] writes `.NAME.tmp` — created fresh (`O_EXCL`, `O_NOFOLLOW`, so a link
//!    planted under that name is never written through), mode 0640 set explicitly whatever the
//!    umask, written whole and `fsync`ed. Consumers ignore dot files.
//! 2. [`InboxDir::publish`] renames it to `NAME` and `fsync`s the directory. Publishing is
//!    idempotent, so recovery after a crash simply publishes again. [`InboxDir::publish_all`]
//!    renames several and syncs the directory once; the running daemon publishes through
//!    [`InboxPublisher`], one thread that does so for every file published at once.
//! 3. After a crash, [`InboxDir::staged`] lists what was staged but maybe not published; the
//!    receiver's store decides, per name, to publish or [`InboxDir::discard`].
//!
//! Names are chosen by refex, never by a sender: [`inbox_name`] builds
//! `<UTC time, ISO 8601 basic>-<envelope id, 32 lowercase hex>.json` from a time the caller
//! picks and a checked envelope id, and every method
//! re-checks the name (a plain file name of `[A-Za-z0-9._-]`, ending `.json`, no leading dot, no
//! `..`, at most [`MAX_NAME_LEN`] bytes) so no path can be shaped from outside.
//! Errors say whether the volume is full ([`InboxError::is_disk_full`]): the receiver then
//! withholds receipts and the sender retries later.
//! Must not: decide whether a file should be published (the receiver's store does), read or
//! interpret file contents, or touch files other than `NAME` and `.NAME.tmp`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rustix::fs::{Mode, OFlags};
use tracing::info;

mod publisher;
pub use publisher::InboxPublisher;

/// Longest inbox file name accepted (an [`inbox_name`] is 54 bytes).
pub const MAX_NAME_LEN: usize = 128;

/// Permissions of inbox files: the consuming system reads them through the group.
const FILE_MODE: u32 = 0o640;

/// Inbox errors.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A filesystem operation failed; `op` names it. See [`InboxError::is_disk_full`].
    #[error("inbox {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A name that is not a plain inbox file name was passed in (a bug in the caller).
    #[error("'{0}' is not a valid inbox file name")]
    BadName(String),
    /// The envelope id given to [`inbox_name`] is not 32 lowercase hex digits.
    #[error("an envelope id must be 32 lowercase hex digits")]
    BadEnvelopeId,
    /// The [`InboxPublisher`] thread has stopped (it panicked); nothing more is published.
    #[error("the inbox publisher thread has stopped")]
    PublisherStopped,
}

impl InboxError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// True when the inbox volume is full or the quota is used up (`ENOSPC`, `EDQUOT`): the
    /// receiver withholds receipts and the sender retries; nothing is wrong with the envelope.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if crate::adapters::durable::is_disk_full(source))
    }
}

/// The inbox file name of a delivered envelope at time `at` (second precision), e.g.
/// `20261120T140511Z-0123456789abcdef0123456789abcdef.json`. The same time and id always give
/// the same name.
pub fn inbox_name(at: DateTime<Utc>, envelope_id_hex: &str) -> Result<String, InboxError> {
    let ok = envelope_id_hex.len() == 32
        && envelope_id_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        // The id came off the wire: it is not echoed into the error.
        return Err(InboxError::BadEnvelopeId);
    }
    Ok(format!(
        "{}-{envelope_id_hex}.json",
        at.format("%Y%m%dT%H%M%SZ")
    ))
}

fn check(name: &str) -> Result<(), InboxError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && !name.contains("..")
        && name.ends_with(".json")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InboxError::BadName(crate::adapters::durable::shown_name(
            name, 40,
        )))
    }
}

/// The inbox directory.
#[derive(Debug)]
pub struct InboxDir {
    dir: PathBuf,
    /// Directory syncs shared by envelopes published at once.
    dir_sync: crate::adapters::durable::DirSync,
}

impl InboxDir {
    /// Opens the inbox, creating the directory if it is missing.
    pub fn open(dir: PathBuf) -> Result<Self, InboxError> {
        fs::create_dir_all(&dir).map_err(InboxError::io("create", &dir))?;
        let dir_sync = crate::adapters::durable::DirSync::new(&dir);
        Ok(Self { dir, dir_sync })
    }

    /// The directory this inbox writes to.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.tmp"))
    }

    /// Writes `bytes` to `.NAME.tmp` and syncs it; an earlier staged copy is replaced. A failure
    /// leaves no partial file behind.
    pub fn stage(&self, name: &str, bytes: &[u8]) -> Result<(), InboxError> {
        check(name)?;
        let tmp = self.tmp(name);
        // Created fresh (O_EXCL); a stale staged file (a crash, or a re-send) is removed first
        // rather than truncated: truncating would write through a hard link or symlink someone
        // with access to the inbox planted under the staging name. Only tried on EEXIST, so
        // the common case is one create (an unlink takes the directory's lock).
        let mut result = write_new_synced(&tmp, bytes);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
            remove_if_present(&tmp).map_err(InboxError::io("remove stale", &tmp))?;
            result = write_new_synced(&tmp, bytes);
        }
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(InboxError::io("stage", &tmp))
    }

    /// Renames the staged file into place and syncs the directory.
    ///
    /// Idempotent: when the staged file is gone and `NAME` exists, it was published before. When
    /// both are gone the consumer has already taken the published file (a crash came between
    /// publishing and recording it), which is also success.
    pub fn publish(&self, name: &str) -> Result<(), InboxError> {
        self.publish_all(&[name]).pop().unwrap_or(Ok(()))
    }

    /// [`InboxDir::publish`] for several files at once, one result each, in order: all are
    /// renamed, then the directory is synced once for them.
    pub fn publish_all(&self, names: &[&str]) -> Vec<Result<(), InboxError>> {
        let renamed: Vec<_> = names.iter().map(|name| self.rename_staged(name)).collect();
        // Synced even when there was nothing to rename: an earlier rename may have been cut
        // short by a crash before its directory sync. Envelopes published at once share it.
        let synced = self.dir_sync.sync();
        renamed
            .into_iter()
            .map(|r| {
                r?;
                // Each gets its own copy of the error (the OS code kept: disk full stays so).
                synced.as_ref().map_err(|e| {
                    let copy = e.raw_os_error().map_or_else(
                        || io::Error::new(e.kind(), e.to_string()),
                        io::Error::from_raw_os_error,
                    );
                    InboxError::io("sync", &self.dir)(copy)
                })?;
                Ok(())
            })
            .collect()
    }

    fn rename_staged(&self, name: &str) -> Result<(), InboxError> {
        check(name)?;
        let tmp = self.tmp(name);
        let path = self.dir.join(name);
        match fs::rename(&tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if fs::symlink_metadata(&path).is_err() {
                    info!(file = %name, "nothing to publish: taken by the consumer already");
                }
                Ok(())
            }
            Err(e) => Err(InboxError::io("publish", &path)(e)),
        }
    }

    /// Directory syncs made by [`InboxDir::publish`] (shared among concurrent publishes).
    pub fn dir_syncs(&self) -> u64 {
        self.dir_sync.syncs()
    }

    /// Names that have a staged file (left by a crash between staging and publishing), sorted.
    pub fn staged(&self) -> Result<Vec<String>, InboxError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(InboxError::io("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(InboxError::io("list", &self.dir))?;
            let Ok(file_name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(name) = file_name
                .strip_prefix('.')
                .and_then(|s| s.strip_suffix(".tmp"))
            {
                if check(name).is_ok() {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a staged file nobody accepted. Not synced: a staged file that reappears after a
    /// crash is simply discarded again by recovery.
    pub fn discard(&self, name: &str) -> Result<(), InboxError> {
        check(name)?;
        let tmp = self.tmp(name);
        remove_if_present(&tmp).map_err(InboxError::io("discard", &tmp))
    }

    /// True when `NAME` has been published and not yet taken by the consumer.
    pub fn exists(&self, name: &str) -> bool {
        check(name).is_ok() && fs::symlink_metadata(self.dir.join(name)).is_ok()
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates `path` (it must not exist), mode 0640 whatever the umask, writes and syncs it.
fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let fd = rustix::fs::open(
        path,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )?;
    // The umask may have cleared the group bit the consumer needs.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(FILE_MODE))?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn inbox() -> (tempfile::TempDir, InboxDir) {
        let dir = tempfile::tempdir().unwrap();
        let inbox = InboxDir::open(dir.path().join("inbox")).unwrap();
        (dir, inbox)
    }

    /// What a consuming system that skips dot files sees.
    fn visible(inbox: &InboxDir) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(inbox.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    fn name() -> String {
        inbox_name(Utc::now(), ID).unwrap()
    }

    #[test]
    fn open_creates_a_missing_directory() {
        let (_dir, inbox) = inbox();
        assert!(inbox.path().is_dir());
    }

    #[test]
    fn inbox_names_are_the_time_and_the_envelope_id() {
        let at = DateTime::parse_from_rfc3339("2026-11-20T14:05:11.734Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            inbox_name(at, ID).unwrap(),
            format!("20261120T140511Z-{ID}.json")
        );
    }

    #[test]
    fn an_envelope_id_that_is_not_32_lowercase_hex_makes_no_name() {
        for bad in [
            "../../etc/passwd",
            &ID.to_uppercase(),
            &ID[..31],
            &format!("{ID}0"),
            "0123456789abcdef0123456789abcdeg",
            "",
        ] {
            assert!(
                matches!(inbox_name(Utc::now(), bad), Err(InboxError::BadEnvelopeId)),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_staged_file_is_invisible_to_the_consumer_until_published() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"{\"a\":1}").unwrap();
        assert!(visible(&inbox).is_empty(), "only the dot file exists");
        assert!(!inbox.exists(&name));
        inbox.publish(&name).unwrap();
        assert_eq!(visible(&inbox), vec![name.clone()]);
        assert_eq!(fs::read(inbox.path().join(&name)).unwrap(), b"{\"a\":1}");
        assert!(
            !inbox.path().join(format!(".{name}.tmp")).exists(),
            "the staged copy became the published file"
        );
    }

    #[test]
    fn published_files_are_mode_0640_whatever_the_umask_allowed() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"{}").unwrap();
        inbox.publish(&name).unwrap();
        let mode = fs::metadata(inbox.path().join(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn publishing_twice_is_harmless_and_changes_nothing() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"{}").unwrap();
        inbox.publish(&name).unwrap();
        inbox.publish(&name).unwrap();
        assert_eq!(visible(&inbox), vec![name.clone()]);
        assert!(inbox.exists(&name));
    }

    #[test]
    fn publishing_a_file_the_consumer_already_took_succeeds() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"{}").unwrap();
        inbox.publish(&name).unwrap();
        fs::remove_file(inbox.path().join(&name)).unwrap();
        inbox.publish(&name).unwrap();
        assert!(visible(&inbox).is_empty());
    }

    #[test]
    fn staging_again_replaces_the_staged_copy() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"first, longer content").unwrap();
        inbox.stage(&name, b"second").unwrap();
        inbox.publish(&name).unwrap();
        assert_eq!(fs::read(inbox.path().join(&name)).unwrap(), b"second");
    }

    #[test]
    fn staging_never_writes_through_a_link_planted_under_the_staging_name() {
        let (dir, inbox) = inbox();
        let name = name();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, inbox.path().join(format!(".{name}.tmp"))).unwrap();
        inbox.stage(&name, b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        let hard = inbox.path().join(format!(".{}.tmp", "x.json"));
        fs::hard_link(&victim, &hard).unwrap();
        inbox.stage("x.json", b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
    }

    #[test]
    fn staged_lists_what_a_crash_left_between_staging_and_publishing() {
        let (_dir, inbox) = inbox();
        let a = inbox_name(Utc::now(), &"a".repeat(32)).unwrap();
        let b = inbox_name(Utc::now(), &"b".repeat(32)).unwrap();
        inbox.stage(&b, b"{}").unwrap();
        inbox.stage(&a, b"{}").unwrap();
        fs::write(inbox.path().join(".editor-swap.tmp.x"), b"").unwrap();
        fs::write(inbox.path().join("published.json"), b"{}").unwrap();
        assert_eq!(inbox.staged().unwrap(), vec![a.clone(), b.clone()]);
        inbox.publish(&a).unwrap();
        assert_eq!(inbox.staged().unwrap(), vec![b]);
    }

    #[test]
    fn discard_removes_only_the_staged_copy_and_tolerates_its_absence() {
        let (_dir, inbox) = inbox();
        let name = name();
        inbox.stage(&name, b"{}").unwrap();
        inbox.discard(&name).unwrap();
        inbox.discard(&name).unwrap();
        assert!(inbox.staged().unwrap().is_empty());
        assert!(!inbox.exists(&name));
        assert!(fs::read_dir(inbox.path()).unwrap().next().is_none());
    }

    #[test]
    fn names_that_could_leave_the_directory_or_hide_are_refused_everywhere() {
        let (_dir, inbox) = inbox();
        let long = format!("{}.json", "a".repeat(MAX_NAME_LEN));
        for bad in [
            "../x.json",
            "a/b.json",
            ".hidden.json",
            "..json",
            "x..json",
            "x.txt",
            "",
            "a b.json",
            "a\nb.json",
            long.as_str(),
        ] {
            assert!(
                matches!(inbox.stage(bad, b"{}"), Err(InboxError::BadName(_))),
                "stage {bad:?}"
            );
            assert!(
                matches!(inbox.publish(bad), Err(InboxError::BadName(_))),
                "publish {bad:?}"
            );
            assert!(
                matches!(inbox.discard(bad), Err(InboxError::BadName(_))),
                "discard {bad:?}"
            );
            assert!(!inbox.exists(bad));
        }
        assert!(fs::read_dir(inbox.path()).unwrap().next().is_none());
    }

    #[test]
    fn no_space_and_no_quota_are_disk_full_and_other_errors_are_not() {
        let err = |code: i32| InboxError::Io {
            op: "stage",
            path: "x".into(),
            source: io::Error::from_raw_os_error(code),
        };
        assert!(err(rustix::io::Errno::NOSPC.raw_os_error()).is_disk_full());
        assert!(err(rustix::io::Errno::DQUOT.raw_os_error()).is_disk_full());
        assert!(!err(rustix::io::Errno::ACCESS.raw_os_error()).is_disk_full());
        assert!(!err(rustix::io::Errno::IO.raw_os_error()).is_disk_full());
        assert!(!InboxError::BadEnvelopeId.is_disk_full());
    }

    /// A 64 KiB tmpfs, mounted only where the test may mount (root in a sandbox); elsewhere
    /// the classifier test above stands in.
    struct TinyTmpfs {
        dir: tempfile::TempDir,
    }

    impl TinyTmpfs {
        fn mount() -> Option<Self> {
            let dir = tempfile::tempdir().ok()?;
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Self { dir })
        }
    }

    impl Drop for TinyTmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn a_full_volume_is_reported_as_disk_full_and_leaves_no_staged_file() {
        let Some(fs_) = TinyTmpfs::mount() else {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        };
        let inbox = InboxDir::open(fs_.dir.path().join("inbox")).unwrap();
        let name = name();
        let err = inbox.stage(&name, &vec![b'x'; 256 * 1024]).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert!(inbox.staged().unwrap().is_empty(), "no partial file");
    }
}
