//! Writing delivered referrals into the inbox directory, never half-written.
//!
//! A file is staged as `.NAME.tmp` (mode 0640, written, `fsync`ed; consumers ignore dot files),
//! then published by `rename` to `NAME` and an `fsync` of the directory. Publishing is
//! idempotent, so recovery after a crash can simply publish again. Names are chosen by refex:
//! `<received UTC, basic format>-<envelope id, 32 lowercase hex>.json`; nothing a sender writes
//! can shape a path.
//! Must not: decide whether a file should be published (the receiver's store does).

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// Inbox errors.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a valid inbox file name")]
    BadName(String),
}

impl InboxError {
    /// True when the inbox volume is full: receipts are withheld and the sender retries.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if matches!(source.raw_os_error(), Some(28) | Some(122)))
    }
}

/// The file name for a delivered envelope.
pub fn inbox_name(received_at: DateTime<Utc>, envelope_id_hex: &str) -> Result<String, InboxError> {
    let ok = envelope_id_hex.len() == 32
        && envelope_id_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return Err(InboxError::BadName(
            envelope_id_hex.chars().take(40).collect(),
        ));
    }
    Ok(format!(
        "{}-{envelope_id_hex}.json",
        received_at.format("%Y%m%dT%H%M%SZ")
    ))
}

fn check(name: &str) -> Result<(), InboxError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains('/')
        && name.ends_with(".json");
    if ok {
        Ok(())
    } else {
        Err(InboxError::BadName(name.chars().take(80).collect()))
    }
}

/// The inbox directory.
pub struct InboxDir {
    dir: PathBuf,
}

impl InboxDir {
    pub fn open(dir: PathBuf) -> Result<Self, InboxError> {
        fs::create_dir_all(&dir).map_err(|source| InboxError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.tmp"))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InboxError + '_ {
        move |source| InboxError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Writes and syncs `.NAME.tmp`. A failure leaves no partial file behind.
    pub fn stage(&self, name: &str, bytes: &[u8]) -> Result<(), InboxError> {
        check(name)?;
        let tmp = self.tmp(name);
        crate::durable::write_synced(&tmp, bytes).map_err(Self::io(&tmp))?;
        Ok(())
    }

    /// Renames the staged file into place and syncs the directory. Idempotent.
    pub fn publish(&self, name: &str) -> Result<(), InboxError> {
        check(name)?;
        let tmp = self.tmp(name);
        let path = self.dir.join(name);
        match fs::rename(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Already published (or taken by the consumer since): nothing to do.
            }
            Err(e) => return Err(Self::io(&path)(e)),
        }
        crate::durable::sync_dir(&self.dir).map_err(Self::io(&self.dir))
    }

    /// Names with a staged file (left by a crash).
    pub fn staged(&self) -> Result<Vec<String>, InboxError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)
            .map_err(Self::io(&self.dir))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_prefix('.').and_then(|s| s.strip_suffix(".tmp")) {
                if check(name).is_ok() {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a staged file nobody accepted.
    pub fn discard(&self, name: &str) -> Result<(), InboxError> {
        check(name)?;
        match fs::remove_file(self.tmp(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&self.dir)(e)),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_file_is_invisible_until_published_and_publish_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = InboxDir::open(dir.path().to_owned()).unwrap();
        let name = inbox_name(Utc::now(), &"ab".repeat(16)).unwrap();
        inbox.stage(&name, b"{}").unwrap();
        let visible = |d: &Path| {
            fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        };
        assert_eq!(visible(dir.path()), 0);
        assert_eq!(inbox.staged().unwrap(), vec![name.clone()]);
        inbox.publish(&name).unwrap();
        inbox.publish(&name).unwrap();
        assert_eq!(visible(dir.path()), 1);
        assert!(inbox.exists(&name));
        assert!(inbox.staged().unwrap().is_empty());
    }

    #[test]
    fn names_come_only_from_a_checked_id() {
        assert!(inbox_name(Utc::now(), "../../etc/passwd").is_err());
        assert!(inbox_name(Utc::now(), &"AB".repeat(16)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let inbox = InboxDir::open(dir.path().to_owned()).unwrap();
        for bad in ["../x.json", ".hidden.json", "a/b.json", "x.txt"] {
            assert!(inbox.stage(bad, b"{}").is_err(), "{bad}");
        }
    }

    #[test]
    fn discard_removes_only_the_staged_copy() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = InboxDir::open(dir.path().to_owned()).unwrap();
        let name = inbox_name(Utc::now(), &"cd".repeat(16)).unwrap();
        inbox.stage(&name, b"{}").unwrap();
        inbox.discard(&name).unwrap();
        assert!(inbox.staged().unwrap().is_empty());
        assert!(!inbox.exists(&name));
    }

    #[test]
    fn enospc_is_classified_as_disk_full() {
        let e = InboxError::Io {
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(e.is_disk_full());
        let e = InboxError::Io {
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(13),
        };
        assert!(!e.is_disk_full());
    }
}
