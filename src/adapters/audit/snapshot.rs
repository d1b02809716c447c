//! A consistent copy of the audit log up to a given head, for `state backup`: the writer only
//! ever appends, so every file is copied line by line until the line whose hash is the head's,
//! and `checkpoints.jsonl` keeps only checkpoints at or before the head. Records appended while
//! copying are simply not in the copy. Also: whether another process holds the writer lock.
//! Must not: write to the source directory.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use super::{log, AuditError, Head};
use crate::core::audit::line_hash;

/// Copies the log in `dir` up to and including the record `head` into `dest` (created).
pub fn copy_upto(dir: &Path, dest: &Path, head: &Head) -> Result<(), AuditError> {
    fs::create_dir_all(dest).map_err(|e| AuditError::io(dest, e))?;
    let mut found = head.seq == 0;
    for path in log::log_files(dir)? {
        if found {
            break;
        }
        let name = path.file_name().unwrap_or_default();
        let out_path = dest.join(name);
        let mut out = File::create(&out_path).map_err(|e| AuditError::io(&out_path, e))?;
        let file = File::open(&path).map_err(|e| AuditError::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| AuditError::io(&path, e))?;
            if n == 0 {
                break;
            }
            out.write_all(&line)
                .map_err(|e| AuditError::io(&out_path, e))?;
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if line.ends_with(b"\n") && line_hash(body) == head.hash {
                found = true;
                break;
            }
        }
        out.sync_all().map_err(|e| AuditError::io(&out_path, e))?;
    }
    if !found {
        return Err(AuditError::Corrupt(format!(
            "record {} is not in {}",
            head,
            dir.display()
        )));
    }
    let cps = dir.join("checkpoints.jsonl");
    if let Ok(text) = fs::read_to_string(&cps) {
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= head.seq)
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        let out = dest.join("checkpoints.jsonl");
        crate::adapters::durable::write_synced(&out, kept.as_bytes())
            .map_err(|e| AuditError::io(&out, e))?;
    }
    crate::adapters::durable::sync_dir(dest).map_err(|e| AuditError::io(dest, e))
}

/// True while some process (the daemon) holds the writer lock of `dir`.
pub fn is_locked(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join("audit.lock")) else {
        return false;
    };
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = rustix::fs::flock(&f, rustix::fs::FlockOperation::Unlock);
            false
        }
        Err(_) => true,
    }
}
