//! The audit file adapter: appends records with group commit, rotates daily, writes signed
//! checkpoints, handles a torn tail left by a crash, and keeps the aggregate tally.
//!
//! One writer thread owns the files. Callers send requests and wait; the thread takes every
//! request that has arrived, appends all their lines with one `write`, one `fdatasync`, and only
//! then answers — so a record is on the device before its caller acts (group commit).
//! A failed write (disk full) is cut back to the last complete line before anyone is answered,
//! and the callers get the error; the chain head does not move.
//! Files: `audit-YYYY-MM-DD-NN.jsonl` (UTC date of the records; NN starts at 00 and rises when a
//! file must not be appended to, e.g. after a torn tail), created mode 0640 with the directory
//! fsynced; `checkpoints.jsonl` (every checkpoint line again, so truncation of the main log after
//! a checkpoint is detectable); `tally.json` (aggregate counts for reports, written atomically).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
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
    pending_torn: Option<(String, u64)>,
    tally: BTreeMap<String, u64>,
    tally_dirty: bool,
    shared_head: Arc<Mutex<Head>>,
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

/// Files of the log in chain order.
pub fn log_files(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| AuditError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with("audit-") && n.ends_with(".jsonl")
        })
        .collect();
    v.sort();
    Ok(v)
}

fn file_date(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.get(6..16)?, "%Y-%m-%d").ok()
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    crate::adapters::durable::sync_dir(dir).map_err(|e| AuditError::io(dir, e))
}

/// What `start` hands back: the job queue, the shared head, the sync counter.
pub(super) type Started = (Sender, Arc<Mutex<Head>>, Arc<std::sync::atomic::AtomicU64>);

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

/// Starts the writer: finds the chain head, notes a torn tail, loads the tally.
pub(super) fn start(cfg: AuditConfig, signer: Arc<SigningKey>) -> Result<Started, AuditError> {
    fs::create_dir_all(&cfg.dir).map_err(|e| AuditError::io(&cfg.dir, e))?;
    let mut head = Head {
        seq: 0,
        hash: GENESIS.into(),
    };
    let mut pending_torn = None;
    let mut next_suffix = BTreeMap::new();
    let files = log_files(&cfg.dir)?;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let (Some(d), Some(n)) = (
            file_date(&name),
            name.get(17..19).and_then(|s| s.parse::<u32>().ok()),
        ) {
            let e = next_suffix.entry(d).or_insert(0);
            *e = (*e).max(n + 1);
        }
    }
    // The head is the last complete line of the newest file that has one.
    for f in files.iter().rev() {
        let mut bytes = Vec::new();
        File::open(f)
            .and_then(|mut h| h.read_to_end(&mut bytes))
            .map_err(|e| AuditError::io(f, e))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let complete = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => 0,
        };
        if complete < bytes.len() && Some(f) == files.last() {
            error!(file = %name, offset = complete, "audit log ends with a torn record (crash while writing); it is kept and noted, not repaired");
            pending_torn = Some((name.clone(), complete as u64));
        }
        if complete == 0 {
            continue;
        }
        let body = &bytes[..complete - 1];
        let last = match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => &body[i + 1..],
            None => body,
        };
        let rec: Record = serde_json::from_slice(last)
            .map_err(|_| AuditError::Corrupt(format!("{name}: last record does not parse")))?;
        head = Head {
            seq: rec.seq,
            hash: line_hash(last),
        };
        break;
    }
    seal_torn_checkpoints(&cfg.dir)?;
    let tally_path = cfg.dir.join("tally.json");
    let tally = match fs::read(&tally_path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|_| AuditError::Corrupt("tally.json does not parse".into()))?,
        Err(_) => BTreeMap::new(),
    };
    let shared_head = Arc::new(Mutex::new(head.clone()));
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<(JobKind, Reply)>();
    let mut w = Writer {
        cfg,
        signer,
        head,
        file: None,
        next_suffix,
        pending_torn,
        tally,
        tally_dirty: false,
        shared_head: shared_head.clone(),
        syncs: syncs.clone(),
    };
    std::thread::Builder::new()
        .name("refex-audit".into())
        .spawn(move || w.run(rx))
        .map_err(|e| AuditError::Corrupt(format!("cannot start the audit writer: {e}")))?;
    Ok((tx, shared_head, syncs))
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<(JobKind, Reply)>) {
        while let Ok(first) = rx.recv() {
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
        let mut answers = Vec::new();
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
        if let Some((file, offset)) = self.pending_torn.clone() {
            let t = self.now();
            push(
                Record::torn_tail(head.seq + 1, t, &head.hash, &file, offset),
                t,
                &mut head,
                &mut lines,
            );
        }
        let mut checkpoints = Vec::new();
        for (job, reply) in batch {
            let t = self.now();
            match job {
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
                }
                JobKind::Tally(entry) => {
                    *self.tally.entry(entry.key()).or_default() += 1;
                    self.tally_dirty = true;
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
            answers.push((reply, head.clone()));
        }
        let result = self
            .append(&lines)
            .and_then(|_| self.write_checkpoints(&checkpoints))
            .and_then(|_| self.write_tally());
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.pending_torn = None;
                self.head = head;
                if let Ok(mut h) = self.shared_head.lock() {
                    *h = self.head.clone();
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

    fn open_file(&mut self, day: NaiveDate) -> Result<(), AuditError> {
        let n = self.next_suffix.get(&day).copied().unwrap_or(0);
        let name = format!("audit-{}-{n:02}.jsonl", day.format("%Y-%m-%d"));
        let path = self.cfg.dir.join(&name);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        sync_dir(&self.cfg.dir)?;
        self.file = Some((name, f, len));
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
                *self.next_suffix.entry(day).or_insert(0) += 1;
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
            let written = f.write_all(&buf).and_then(|_| f.sync_data());
            if let Err(e) = written {
                // Nothing was acknowledged: cut back to the last complete line.
                let _ = f.set_len(*len);
                let _ = f.sync_data();
                return Err(AuditError::io(&path, e));
            }
            *len += buf.len() as u64;
        }
        Ok(())
    }

    fn write_checkpoints(&self, lines: &[String]) -> Result<(), AuditError> {
        if lines.is_empty() {
            return Ok(());
        }
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

    fn write_tally(&mut self) -> Result<(), AuditError> {
        if !self.tally_dirty {
            return Ok(());
        }
        let path = self.cfg.dir.join("tally.json");
        let bytes = serde_json::to_vec(&self.tally).unwrap_or_default();
        crate::adapters::durable::replace(&self.cfg.dir, ".tally.json.tmp", "tally.json", &bytes)
            .map_err(|e| AuditError::io(&path, e))?;
        self.tally_dirty = false;
        Ok(())
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

/// What a caller asks of the writer.
pub(super) enum JobKind {
    Event(Event),
    Checkpoint,
    Tally(TallyEntry),
    Purge(DateTime<Utc>),
}

pub(super) type Sender = mpsc::Sender<(JobKind, Reply)>;
