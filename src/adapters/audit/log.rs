//! The audit file adapter: appends records with group commit, rotates daily, writes signed
//! checkpoints (on a timer, every N records, at close), notes torn tails, and chains the tally.
//!
//! One writer thread owns the files, and an exclusive `flock` on `audit.lock` in the directory
//! makes it the only writer there is (a second open, in this process or another, fails with
//! [`AuditError::Locked`]). Callers send requests and wait; the thread takes every request that
//! has arrived, appends all their lines with one `write`, one `fdatasync`, and only then
//! answers — so a record is on the device before its caller acts (group commit).
//! A failed append (disk full, I/O error): the fd is dropped (a failed `fdatasync` is never
//! retried on it — the page cache may already have dropped the data), the file is cut back to
//! the last acknowledged byte through a fresh fd and synced, and the callers get the error; no
//! sequence number is consumed and the head does not move. If the cut-back fails too, the file
//! is abandoned: the next write goes to a new file and starts with a `torn_tail` record binding
//! the leftover bytes (offset, length, SHA-256), which `verify` then skips. Once the chain
//! append is durable the head moves even if `checkpoints.jsonl` then fails (its lines are
//! retried with the next commit), so the chain never holds two records under one sequence
//! number (the unacknowledged records of a noted torn tail are outside it).
//! Start after a crash: the head is the last record of the newest file's intact part (its lines
//! from the start while each parses as a record). The rest of the file is a torn tail, noted by
//! the first write: a last line without its newline, or, where blocks of the unsynced append
//! reached the disk out of order, a line with a hole in it and the records behind it.
//! Files: `audit-YYYY-MM-DD-NN.jsonl` (UTC date of the records; NN starts at 00 and rises when a
//! file must not be appended to, e.g. after a torn tail; 100 and on have three digits, and the
//! chain order is by date, then NN as a number), always created new (`O_EXCL`, mode 0640)
//! with the directory fsynced; `checkpoints.jsonl` (every checkpoint line again, so truncation
//! of the main log after a checkpoint is detectable). Tally counts are chained `tally` records
//! (no `tally.json`).
//! Must not: answer a caller before its record is durable; append to a file after a failed
//! sync on it without first cutting it back through a fresh fd.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::oneshot;
use tracing::error;

use super::{AuditConfig, AuditError, TallyEntry};
use crate::core::audit::{line_hash, Event, Head, Record, GENESIS};
use crate::crypto::SigningKey;

type Reply = oneshot::Sender<Result<Head, AuditError>>;

struct Writer {
    cfg: AuditConfig,
    signer: Arc<SigningKey>,
    head: Head,
    file: Option<(String, File, u64)>,
    next_suffix: BTreeMap<NaiveDate, u32>,
    /// Files with bytes past `offset` that are not in the chain (noted before the next record).
    pending_torn: Vec<(String, u64)>,
    /// Checkpoint lines durable in the chain but not yet in `checkpoints.jsonl`.
    pending_checkpoints: Vec<String>,
    /// Records since the last checkpoint (for `checkpoint_every_records`).
    since_checkpoint: u64,
    _lock: File,
    shared_head: Arc<Mutex<Head>>,
    syncs: Arc<std::sync::atomic::AtomicU64>,
    /// When the writer last went round its loop (ms since the epoch; beats even when idle).
    beat: Arc<std::sync::atomic::AtomicU64>,
}

/// Files of the log in chain order: by date, then by the suffix as a number. (By name, the
/// 101st file of a day, `…-100`, sorted before `…-11`: the writer then took its head from
/// `…-99` and reused sequence numbers, and `verify` reported records missing.)
pub fn log_files(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    // (date and suffix when the name has them, the name, the path)
    type Keyed = (Option<(NaiveDate, u32)>, String, PathBuf);
    let mut v: Vec<Keyed> = fs::read_dir(dir)
        .map_err(|e| AuditError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let n = p.file_name()?.to_string_lossy().into_owned();
            (n.starts_with("audit-") && n.ends_with(".jsonl")).then_some((n, p))
        })
        .map(|(n, p)| (file_key(&n), n, p))
        .collect();
    v.sort();
    Ok(v.into_iter().map(|(_, _, p)| p).collect())
}

/// The chain position in a file's name: its date, then `NN` as a number.
fn file_key(name: &str) -> Option<(NaiveDate, u32)> {
    file_date(name).zip(file_suffix(name))
}

fn file_date(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.get(6..16)?, "%Y-%m-%d").ok()
}

/// The `NN` of `audit-YYYY-MM-DD-NN.jsonl`: two digits or more (`{n:02}`).
fn file_suffix(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".jsonl")?.get(17..)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    crate::adapters::durable::sync_dir(dir).map_err(|e| AuditError::io(dir, e))
}

/// What `start` hands back: the job queue, the shared head, the sync counter, the writer's
/// heartbeat, the stop signal.
pub(super) type Started = (
    Sender,
    Arc<Mutex<Head>>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
    oneshot::Receiver<()>,
);

/// A crash while appending to `checkpoints.jsonl` leaves a fragment without a newline; later
/// appends must not glue onto it. The fragment is kept (never repaired) and closed with a newline;
/// `verify` accepts it only as the start of a checkpoint the chain holds whole.
fn seal_torn_checkpoints(dir: &Path) -> Result<(), AuditError> {
    let path = dir.join("checkpoints.jsonl");
    let Ok(bytes) = fs::read(&path) else {
        return Ok(());
    };
    if bytes.last().is_some_and(|b| *b != b'\n') {
        error!(
            "checkpoints.jsonl ends with a torn line (crash while writing); it is kept and closed"
        );
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        f.write_all(b"\n")
            .and_then(|_| f.sync_data())
            .map_err(|e| AuditError::io(&path, e))?;
    }
    Ok(())
}

/// Takes the directory's exclusive writer lock (released when the writer thread ends); one
/// held elsewhere is tried again for up to half a second before `Locked`
/// ([`crate::adapters::durable::retry_while_locked`]).
fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join("audit.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| AuditError::io(&path, e))?;
    let flock = || rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    match crate::adapters::durable::retry_while_locked(flock, |e| {
        *e == rustix::io::Errno::WOULDBLOCK
    }) {
        Ok(()) => Ok(f),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(AuditError::Locked(dir.to_owned())),
        Err(e) => Err(AuditError::io(&path, e.into())),
    }
}

/// SHA-256 and length of `path` from `offset` to its end, streamed.
pub(super) fn fragment_digest(path: &Path, offset: u64) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((len, out))
}

/// Reads the records of the log file `path` in order, up to `stop` (a noted torn tail's
/// offset) or its torn tail not yet noted: a last line without its newline, or the first line
/// that is no record. Calls `f` with each record and its line; returns where it stopped.
/// Streams, one line (at most `MAX_LINE`) in memory.
///
/// After a crash during an append, not only can the last line lack its newline: blocks of the
/// unsynced write can reach the disk out of order, so one that never did reads back as zeros
/// (or, on some filesystems, old bytes) in front of one that did. Such a line ends in a
/// newline and may be followed by whole records, none of them acknowledged. So everything
/// from the first line that is not a record to the end is the torn tail. Records that parse
/// but do not chain are not cut off here: no crash makes those, `verify` names them.
pub(super) fn each_intact_record(
    path: &Path,
    stop: u64,
    mut f: impl FnMut(&Record, &str),
) -> Result<u64, AuditError> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    let mut r = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut offset = 0u64;
    while offset < stop {
        line.clear();
        let n = r
            .by_ref()
            .take(super::verify::MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| AuditError::io(path, e))?;
        if line.pop() != Some(b'\n') {
            break;
        }
        let Some((rec, text)) = std::str::from_utf8(&line)
            .ok()
            .and_then(|t| Some((serde_json::from_str::<Record>(t).ok()?, t)))
        else {
            break;
        };
        f(&rec, text);
        offset += n as u64;
    }
    Ok(offset)
}

/// Starts the writer: takes the lock, finds the chain head, notes a torn tail.
pub(super) fn start(cfg: AuditConfig, signer: Arc<SigningKey>) -> Result<Started, AuditError> {
    fs::create_dir_all(&cfg.dir).map_err(|e| AuditError::io(&cfg.dir, e))?;
    let lock = lock_dir(&cfg.dir)?;
    let mut head = Head {
        seq: 0,
        hash: GENESIS.into(),
    };
    let mut pending_torn = Vec::new();
    let mut next_suffix = BTreeMap::new();
    let files = log_files(&cfg.dir)?;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some((d, n)) = file_key(&name) {
            let e = next_suffix.entry(d).or_insert(0);
            *e = (*e).max(n + 1);
        }
    }
    // The head is the last record of the intact part of the newest file that has one. A file
    // walked past (nothing intact in it) may hold the only note of an older file's damage, so
    // every damaged file on the way is noted again.
    for f in files.iter().rev() {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut last: Option<(u64, Vec<u8>)> = None;
        let intact = each_intact_record(f, u64::MAX, |rec, line| {
            let (seq, bytes) = last.get_or_insert_with(Default::default);
            *seq = rec.seq;
            bytes.clear();
            bytes.extend_from_slice(line.as_bytes());
        })?;
        let len = fs::metadata(f).map_err(|e| AuditError::io(f, e))?.len();
        if intact < len {
            error!(file = %name, offset = intact, damaged_bytes = len - intact, "audit log ends with a torn or damaged tail (crash while writing); it is kept and noted, not repaired");
            pending_torn.push((name, intact));
        }
        if let Some((seq, line)) = last {
            head = Head {
                seq,
                hash: line_hash(&line),
            };
            break;
        }
    }
    pending_torn.reverse();
    seal_torn_checkpoints(&cfg.dir)?;
    let shared_head = Arc::new(Mutex::new(head.clone()));
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let beat = Arc::new(std::sync::atomic::AtomicU64::new(super::now_ms()));
    let (tx, rx) = mpsc::channel::<(JobKind, Reply)>();
    let mut w = Writer {
        cfg,
        signer,
        head,
        file: None,
        next_suffix,
        pending_torn,
        pending_checkpoints: Vec::new(),
        since_checkpoint: 0,
        _lock: lock,
        shared_head: shared_head.clone(),
        syncs: syncs.clone(),
        beat: beat.clone(),
    };
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("refex-audit".into())
        .spawn(move || {
            w.run(rx);
            // Files and the lock are released before anyone waiting in `close` goes on.
            drop(w);
            let _ = done_tx.send(());
        })
        .map_err(|e| AuditError::Corrupt(format!("cannot start the audit writer: {e}")))?;
    Ok((tx, shared_head, syncs, beat, done_rx))
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<(JobKind, Reply)>) {
        use std::sync::atomic::Ordering;
        loop {
            self.beat.store(super::now_ms(), Ordering::Relaxed);
            let first = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            self.commit(batch);
        }
    }

    fn now(&self) -> DateTime<Utc> {
        (self.cfg.clock)()
    }

    /// Appends every record of the batch with one write and one sync, then answers.
    fn commit(&mut self, batch: Vec<(JobKind, Reply)>) {
        let mut lines: Vec<(DateTime<Utc>, String)> = Vec::new();
        let mut head = self.head.clone();
        let mut since = self.since_checkpoint;
        let mut answers = Vec::new();
        let mut checkpoints = Vec::new();
        let push = |rec: Record,
                    time: DateTime<Utc>,
                    head: &mut Head,
                    lines: &mut Vec<(DateTime<Utc>, String)>| {
            let line = rec.line();
            *head = Head {
                seq: rec.seq,
                hash: line_hash(line.as_bytes()),
            };
            lines.push((time, line));
        };
        for (file, offset) in self.pending_torn.clone() {
            let t = self.now();
            let path = self.cfg.dir.join(&file);
            match fragment_digest(&path, offset) {
                Ok(fragment) => {
                    push(
                        Record::torn_tail(head.seq + 1, t, &head.hash, &file, offset, fragment),
                        t,
                        &mut head,
                        &mut lines,
                    );
                    since += 1;
                }
                Err(e) => {
                    let e = AuditError::io(&path, e);
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
        let every = self.cfg.checkpoint_every_records.max(1);
        for (job, reply) in batch {
            let t = self.now();
            let mut is_checkpoint = false;
            // Records this job adds (for the checkpoint count).
            let mut added = 1;
            match job {
                JobKind::Events(evs, tallies) => {
                    let j = &self.cfg.justification;
                    added = (evs.len() + tallies.len()) as u64;
                    for ev in &evs {
                        let rec = Record::from_event(
                            ev,
                            head.seq + 1,
                            t,
                            &head.hash,
                            &j.lawful_basis,
                            &j.purpose,
                        );
                        push(rec, t, &mut head, &mut lines);
                    }
                    for e in &tallies {
                        push(tally_record(e, &head, t), t, &mut head, &mut lines);
                    }
                }
                JobKind::Event(ev) => {
                    let j = &self.cfg.justification;
                    let rec = Record::from_event(
                        &ev,
                        head.seq + 1,
                        t,
                        &head.hash,
                        &j.lawful_basis,
                        &j.purpose,
                    );
                    push(rec, t, &mut head, &mut lines);
                }
                JobKind::Checkpoint => {
                    let rec = crate::crypto::checkpoint::sign(
                        head.seq + 1,
                        t,
                        &head.hash,
                        &self.cfg.area,
                        &self.signer,
                    );
                    checkpoints.push(rec.line());
                    push(rec, t, &mut head, &mut lines);
                    is_checkpoint = true;
                }
                JobKind::Purge(now) => match self.purge(now, &head) {
                    Ok(Some(rec)) => push(rec, t, &mut head, &mut lines),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                },
            }
            since = if is_checkpoint { 0 } else { since + added };
            answers.push((reply, head.clone()));
            if since >= every {
                let rec = crate::crypto::checkpoint::sign(
                    head.seq + 1,
                    t,
                    &head.hash,
                    &self.cfg.area,
                    &self.signer,
                );
                checkpoints.push(rec.line());
                push(rec, t, &mut head, &mut lines);
                since = 0;
            }
        }
        let result = self.append(&lines);
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(()) => {
                // The chain is durable: the head moves whatever happens to the copy below.
                self.pending_torn.clear();
                self.head = head;
                self.since_checkpoint = since;
                if let Ok(mut h) = self.shared_head.lock() {
                    *h = self.head.clone();
                }
                self.pending_checkpoints.extend(checkpoints);
                let copied = self.write_checkpoints();
                match copied {
                    Ok(()) => self.pending_checkpoints.clear(),
                    Err(e) => {
                        error!("checkpoints.jsonl not written (retried with the next record): {e}")
                    }
                }
                for (reply, h) in answers {
                    let _ = reply.send(Ok(h));
                }
            }
            Err(e) => {
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// After a failed write or sync on the current file: drop its fd, cut the file back to the
    /// last acknowledged byte through a fresh fd, sync it; if that fails, abandon the file and
    /// note the leftover bytes for the next record (`torn_tail`).
    fn recover(&mut self) {
        let Some((name, fd, len)) = self.file.take() else {
            return;
        };
        drop(fd);
        let path = self.cfg.dir.join(&name);
        let fresh = OpenOptions::new().append(true).open(&path).and_then(|f| {
            f.set_len(len)?;
            f.sync_all()?;
            Ok(f)
        });
        match fresh {
            Ok(f) => self.file = Some((name, f, len)),
            Err(e) => {
                error!(file = %name, offset = len, "audit file could not be cut back after a failed write ({e}); it is abandoned and the leftover bytes are noted");
                self.pending_torn.push((name, len));
            }
        }
    }

    /// Starts the day's next file. Always a new one (`O_EXCL`): a name that exists already is
    /// skipped, so the writer never appends to a file it did not start, such as one that may
    /// end in a torn line. A new file that does not read back as empty is removed again and the
    /// write fails (the next takes the next name): the filesystem is not telling the truth, and
    /// a line appended there would not land where the writer counts it.
    fn open_file(&mut self, day: NaiveDate) -> Result<(), AuditError> {
        let n = self.next_suffix.entry(day).or_insert(0);
        let (name, f) = loop {
            let name = format!("audit-{}-{:02}.jsonl", day.format("%Y-%m-%d"), *n);
            let path = self.cfg.dir.join(&name);
            *n += 1;
            match OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o640)
                .open(&path)
            {
                Ok(f) => break (name, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(AuditError::io(&path, e)),
            }
        };
        let path = self.cfg.dir.join(&name);
        let len = f.metadata().map_err(|e| AuditError::io(&path, e))?.len();
        if len != 0 {
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(AuditError::io(
                &path,
                std::io::Error::other(format!(
                    "created just now, yet the filesystem says it holds {len} bytes; not written to"
                )),
            ));
        }
        if let Err(e) = sync_dir(&self.cfg.dir) {
            // Not started after all: the next write takes this name again, so a directory that
            // keeps failing its sync does not fill with empty files.
            drop(f);
            if fs::remove_file(&path).is_ok() {
                *self.next_suffix.entry(day).or_insert(1) -= 1;
            }
            return Err(e);
        }
        self.file = Some((name, f, 0));
        Ok(())
    }

    fn append(&mut self, lines: &[(DateTime<Utc>, String)]) -> Result<(), AuditError> {
        let mut i = 0;
        while i < lines.len() {
            let day = lines[i].0.date_naive();
            let current_ok = matches!(&self.file, Some((name, ..)) if file_date(name) == Some(day));
            if !current_ok {
                // A new day, or a first write after start: never append to a file that may end
                // in a torn line; take the next file number of the day.
                self.open_file(day)?;
            }
            let mut buf = Vec::new();
            while i < lines.len() && lines[i].0.date_naive() == day {
                buf.extend_from_slice(lines[i].1.as_bytes());
                buf.push(b'\n');
                i += 1;
            }
            let Some((name, f, len)) = self.file.as_mut() else {
                continue;
            };
            let path = self.cfg.dir.join(&*name);
            let written = match fail_injected(&self.cfg) {
                Some(e) => {
                    // A failpoint for tests: half the batch reaches the file, then the error.
                    let _ = f.write_all(&buf[..buf.len() / 2]);
                    Err(e)
                }
                None => {
                    crate::core::failpoint::hit("audit_before_append");
                    f.write_all(&buf).and_then(|_| f.sync_data())
                }
            };
            if let Err(e) = written {
                // Nothing was acknowledged: the whole commit is undone.
                self.recover();
                return Err(AuditError::io(&path, e));
            }
            *len += buf.len() as u64;
            crate::core::failpoint::hit("audit_after_append");
        }
        Ok(())
    }

    fn write_checkpoints(&self) -> Result<(), AuditError> {
        let lines = &self.pending_checkpoints;
        if lines.is_empty() {
            return Ok(());
        }
        crate::core::failpoint::hit("audit_checkpoint_write");
        let path = self.cfg.dir.join("checkpoints.jsonl");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        let mut buf = String::new();
        for l in lines {
            buf.push_str(l);
            buf.push('\n');
        }
        f.write_all(buf.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| AuditError::io(&path, e))
    }

    /// Removes whole daily files older than the retention period (never the newest file).
    fn purge(&mut self, now: DateTime<Utc>, head: &Head) -> Result<Option<Record>, AuditError> {
        let cutoff = now.date_naive() - chrono::Duration::days(i64::from(self.cfg.retention_days));
        let files = log_files(&self.cfg.dir)?;
        let Some((keep_from, _)) = files.iter().enumerate().find(|(i, f)| {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            *i + 1 == files.len() || file_date(&name).is_none_or(|d| d >= cutoff)
        }) else {
            return Ok(None);
        };
        if keep_from == 0 {
            return Ok(None);
        }
        let anchor_file = &files[keep_from];
        let text = fs::read_to_string(anchor_file).map_err(|e| AuditError::io(anchor_file, e))?;
        let Some(first) = text
            .lines()
            .next()
            .and_then(|l| serde_json::from_str::<Record>(l).ok())
        else {
            return Ok(None);
        };
        let mut names = Vec::new();
        for f in &files[..keep_from] {
            fs::remove_file(f).map_err(|e| AuditError::io(f, e))?;
            names.push(
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        sync_dir(&self.cfg.dir)?;
        Ok(Some(Record::purge(
            head.seq + 1,
            self.now(),
            &head.hash,
            &names,
            first.seq,
            &first.prev,
        )))
    }
}

/// Sends a job to the writer and waits for it to be durable.
pub(super) async fn submit(
    tx: &Mutex<Option<mpsc::Sender<(JobKind, Reply)>>>,
    job: JobKind,
) -> Result<Head, AuditError> {
    let (reply, rx) = oneshot::channel();
    {
        let guard = tx.lock().map_err(|_| AuditError::Closed)?;
        guard
            .as_ref()
            .ok_or(AuditError::Closed)?
            .send((job, reply))
            .map_err(|_| AuditError::Closed)?;
    }
    rx.await.map_err(|_| AuditError::Closed)?
}

/// The failpoints of [`AuditConfig::fail_appends`] and [`AuditConfig::fail_appends_while`]: an
/// I/O error (EIO) while either is set.
fn fail_injected(cfg: &AuditConfig) -> Option<std::io::Error> {
    let on = cfg.fail_appends.load(std::sync::atomic::Ordering::Relaxed)
        || cfg.fail_appends_while.as_ref().is_some_and(|p| p.exists());
    on.then(|| std::io::Error::from_raw_os_error(5))
}

/// What a caller asks of the writer.
pub(super) enum JobKind {
    /// Boxed: an event is ~300 bytes, the other jobs a few words.
    Event(Box<Event>),
    /// Several events written in order, then tally records for `tallies`, in the same write and
    /// sync (all or none), one answer.
    Events(Vec<Event>, Vec<TallyEntry>),
    Checkpoint,
    Purge(DateTime<Utc>),
}

pub(super) type Sender = mpsc::Sender<(JobKind, Reply)>;

/// The chained `tally` record of `e`, next after `head`.
fn tally_record(e: &TallyEntry, head: &Head, t: DateTime<Utc>) -> Record {
    Record::tally(
        head.seq + 1,
        t,
        &head.hash,
        (&e.from, &e.to),
        e.priority,
        &e.category,
        e.incident.as_deref(),
        e.referred,
        e.late,
    )
}
