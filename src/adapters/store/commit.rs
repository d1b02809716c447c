//! The store's group commit: one thread applies the record changes sent to it in transactions
//! of at most [`super::changes::WRITES_PER_TRANSACTION`] records, then flushes sled and
//! fdatasyncs its files for every waiter that has arrived (see "Durability" in the parent
//! module).
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

use super::changes::{Job, Outcome, Tables};
use super::{Pending, StoreError, WRITING};

/// The exit status after a failed store flush or sync (EX_TEMPFAIL: restart and recover).
pub const EXIT_STORE_LOST: i32 = 75;

/// The group-commit loop: take every job that has arrived, apply their record changes (see
/// `changes`), flush and sync once, answer all.
pub(super) fn committer(
    db: sled::Db,
    dir: PathBuf,
    rx: mpsc::Receiver<Job>,
    syncs: Arc<AtomicU64>,
    pending: Arc<std::sync::Mutex<Pending>>,
    tables: Tables,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let outcomes = tables.apply(&jobs);
        // A test widens the window between the round's writes and their sync (`REFEX_HOLD_AT`).
        if let Some(d) = crate::core::failpoint::hold("store_before_sync") {
            std::thread::sleep(d);
        }
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
            // Released in this round and now synced: sendable.
            for j in &jobs {
                if let Job::Apply {
                    changes,
                    release: true,
                    ..
                } = j
                {
                    for (id, _) in changes {
                        if p.ids.get(id) == Some(&WRITING) {
                            p.ids.remove(id);
                        }
                    }
                }
            }
        }
        answer(jobs, outcomes, &result);
    }
}

/// Gives every job its outcome: its own writes' (a change's first failure), else the sync's.
fn answer(jobs: Vec<Job>, outcomes: Vec<Outcome>, synced: &Result<(), StoreError>) {
    for (job, outcome) in jobs.into_iter().zip(outcomes) {
        match (job, outcome) {
            (Job::Sync(w), _) => {
                let _ = w.send(synced.clone());
            }
            (Job::Apply { changes, done, .. }, outcome) => {
                let own = match outcome {
                    Outcome::Changed(each) => each,
                    _ => Vec::new(),
                };
                let mut out = synced.clone();
                for ((id, _), r) in changes.iter().zip(own) {
                    if let Err(e) = r {
                        if done.is_none() {
                            tracing::warn!(envelope_id = %id, "record change left to the next commit failed: {e}");
                        }
                        if out.is_ok() {
                            out = Err(e);
                        }
                    }
                }
                if let Some(w) = done {
                    let _ = w.send(out);
                }
            }
            (Job::Enqueue { done, .. }, outcome) => {
                let out = match (outcome, synced) {
                    (Outcome::Enqueued(Err(e)), _) => Err(e),
                    (_, Err(e)) => Err(e.clone()),
                    (Outcome::Enqueued(Ok(each)), Ok(())) => Ok(each),
                    _ => Err(StoreError::Corrupt("enqueue without an outcome".into())),
                };
                let _ = done.send(out);
            }
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
