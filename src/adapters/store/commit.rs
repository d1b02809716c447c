//! The store's group commit: one thread flushes sled and fdatasyncs its files for every waiter
//! that has arrived (see "Durability" in the parent module).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use super::{Pending, StoreError, Waiter};

/// The group-commit loop: take every waiter that has arrived, flush and sync once, answer all.
pub(super) fn committer(
    db: sled::Db,
    dir: PathBuf,
    rx: mpsc::Receiver<Waiter>,
    syncs: Arc<AtomicU64>,
    pending: Arc<std::sync::Mutex<Pending>>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        // Every enqueue that finished before this point is in what the flush below writes.
        let upto = pending.lock().map(|p| p.issued).unwrap_or(0);
        let result = db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| sync_files(&dir));
        syncs.fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            if let Ok(mut p) = pending.lock() {
                p.covered(upto);
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn sync_error(e: std::io::Error) -> StoreError {
    let disk_full = crate::adapters::durable::is_disk_full(&e);
    StoreError::Sync {
        message: e.to_string(),
        disk_full,
    }
}

/// fdatasync sled's log file and any blob files (sled writes values over its blob threshold to
/// their own files and does not sync them).
pub(super) fn sync_files(dir: &Path) -> Result<(), StoreError> {
    File::open(dir.join("db"))
        .and_then(|f| f.sync_data())
        .map_err(sync_error)?;
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        let mut any = false;
        for e in entries.flatten() {
            File::open(e.path())
                .and_then(|f| f.sync_data())
                .map_err(sync_error)?;
            any = true;
        }
        if any {
            File::open(&blobs)
                .and_then(|f| f.sync_all())
                .map_err(sync_error)?;
        }
    }
    Ok(())
}
