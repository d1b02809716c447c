//! The store's group commit: one thread flushes sled and fdatasyncs its files for every waiter
//! that has arrived (see "Durability" in the parent module).
//!
//! A failed flush or sync is final (the PostgreSQL "fsyncgate" lesson): after a failed `fsync`
//! the kernel may already have dropped the dirty pages and marked them clean, so a second
//! `fsync` on the same file can succeed with the data gone; sled, too, keeps a global error
//! after an I/O error. So the committer never retries: it answers no waiter (nothing is
//! acknowledged), logs one ERROR and exits the process with [`EXIT_STORE_LOST`]. systemd
//! restarts refex, sled recovers from what is on the device, and every outbox file whose
//! deletion was never acknowledged is read again (intake's idempotency key finds what did
//! survive). A read-only or failing state volume therefore makes refex exit and restart (with
//! systemd's back-off) until the volume is writable again; it never runs on unsynced state.
//! Test failpoint: `REFEX_STORE_EIO_WHILE=<path>` makes every sync fail with EIO while `<path>`
//! exists (read from the environment once; unset in production).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use super::{Pending, StoreError, Waiter};

/// The exit status after a failed store flush or sync (EX_TEMPFAIL: restart and recover).
pub const EXIT_STORE_LOST: i32 = 75;

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
        crate::core::failpoint::hit("store_before_sync");
        let result = db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| sync_files(&dir));
        crate::core::failpoint::hit("store_after_sync");
        syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            // Never retry, never answer: the waiters' writes may be lost (see module docs).
            tracing::error!(
                error = %e,
                dir = %dir.display(),
                "state store flush/sync failed; unsynced state is treated as lost and nothing \
                 is acknowledged; exiting (status {EXIT_STORE_LOST}) so the service manager \
                 restarts refex and the store recovers from the device"
            );
            eprintln!("refex: state store sync failed: {e}; exiting with status {EXIT_STORE_LOST}");
            std::process::exit(EXIT_STORE_LOST);
        }
        if let Ok(mut p) = pending.lock() {
            p.covered(upto);
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
    if let Some(e) = injected_eio() {
        return Err(sync_error(e));
    }
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

/// The failpoint `REFEX_STORE_EIO_WHILE=<path>`: EIO while `<path>` exists.
fn injected_eio() -> Option<std::io::Error> {
    static WHILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let flag = WHILE.get_or_init(|| std::env::var_os("REFEX_STORE_EIO_WHILE").map(Into::into));
    flag.as_ref()
        .is_some_and(|p| p.exists())
        .then(|| std::io::Error::from_raw_os_error(5))
}
