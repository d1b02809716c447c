//! Durable file writes shared by the file adapters (outbox, inbox, audit): the one place that
//! spells out "written, synced, renamed, directory synced".
//!
//! Order: write the whole content to a temporary file (mode 0640) → `fsync` it → `rename` over
//! the final name → `fsync` the directory. A crash at any point leaves either the old file or
//! the new one, never a torn one; a failed write removes its temporary file.
//! Must not: know what the files mean.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_only_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), ".x.tmp", "x", b"one").unwrap();
        replace(dir.path(), ".x.tmp", "x", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("x")).unwrap(), b"two");
        assert!(!dir.path().join(".x.tmp").exists());
    }
}
