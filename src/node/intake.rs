//! Intake: turns files dropped in the outbox into sealed, queued envelopes, or into refusals.
//!
//! For each ready file, `core::plan` first decides everything from the bytes alone (parse, validate,
//! route and classify each referral on its own). Intake then carries the plan out in one fixed,
//! write-ahead order:
//! 1. audit the refusals;
//! 2. seal each accepted referral (signed, encrypted to the destination area, or to ourselves for
//!    a local referral) and store it *held* under its idempotency key (source_system +
//!    source_ref); sync the store;
//! 3. audit: collection; for a batch also the combination (file hash and row); a deadline record
//!    when already past `due_by`; the tally — one audit write and sync for the whole file (all
//!    or none), durable before the next step;
//! 4. release the envelopes into their peers' queues and sync: only now can the sender take them,
//!    so no envelope leaves without its collection on record;
//! 5. write the refused rows to `rejected/` (with an `.error.json` naming file, row, field and
//!    rule), and only then delete the file.
//!
//! Crash or failure at any step before the delete leaves the file in the outbox: it is read again
//! and the idempotency index turns every referral already queued into a logged duplicate, so the
//! file makes each envelope exactly once. An envelope found still held (a crash between steps 2
//! and 4) keeps its id; its records are written unless the log already names it, then it is
//! released. Audit or store unwritable (full, I/O error, read-only): the file is left alone, the
//! error logged once, and intake pauses and retries until it can write again.
//!
//! Pipelined: up to `intake.parallel_files` ready files (and no new one while those in hand hold
//! `intake.parallel_bytes` or `intake.parallel_referrals`, so large or many batches do not
//! multiply memory) are worked on at once: each is parsed and sealed on the blocking pool (so
//! both cores work), then steps 2–5 are carried out for every file sealed at the same time
//! together — one store transaction and sync, one audit job, one release, one directory sync
//! for their deletions (`stage.rs`), each file still in the order above. A batch with more
//! accepted rows than `intake.parallel_referrals` goes through steps 2–4 in slices of that many,
//! one slice after the other, and is removed after the last: a round then holds one slice's
//! store transaction and audit job, not the file's, and a slice is sealed when its turn comes
//! (the first with the parse), so only one slice of sealed envelopes is held; the file's
//! content is let go once it is planned (each row is judged as it is read, and an accepted one
//! kept as its encoded payload, `core::plan`). (A 20,000-row CSV to one peer: sender peak
//! ~500 MB in one round, ~120 MB in slices sealed together, ~48 MB now.) A failure or crash
//! between slices leaves the file, and taken again its queued slices are logged duplicates, as
//! for any file. A name is never taken twice at once (the same name re-appearing while in
//! flight waits for the first to finish), and two files carrying the same referral (idempotency
//! key) never overlap between storing and releasing it: the second waits, then finds it queued
//! (a logged duplicate).
//! Any failure that pauses intake stops new files for the retry pause, as with one file at a
//! time; files in flight finish. Shutdown takes no new file and finishes every file in hand.
//! Must not: send half a file's content, block on one bad file, or write personal data to logs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::adapters::audit::{Actor, Event, Operation, Outcome};
use crate::adapters::outbox_dir::{self, FileKind, OutboxWatcher, Pickup, ReadyFile};
use crate::adapters::store::NewEnvelope;
use crate::core::audit::SubjectKey;
use crate::core::digest::sha256;
use crate::core::envelope::Header;
use crate::core::plan::{self, Accepted, Format, Plan, Refused};
use crate::core::referral::FieldError;
use crate::core::types::{AreaId, EnvelopeId};
use crate::crypto;
use crate::node::build::Node;

mod stage;

/// A failure that leaves the file in the outbox to be tried again.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] crate::adapters::store::StoreError),
    #[error(transparent)]
    Audit(#[from] crate::adapters::audit::AuditError),
    #[error(transparent)]
    Outbox(#[from] outbox_dir::OutboxError),
    #[error("cannot seal for {0}: {1}")]
    Seal(AreaId, String),
    #[error("intake worker failed: {0}")]
    Worker(String),
    /// A shared step of the round this file was in failed (the error, and whether it pauses
    /// intake); the round's first file carries the error itself.
    #[error("{0}")]
    Shared(String, bool),
}

impl IntakeError {
    /// True when the failure is the node's, not the file's: the audit log or the store cannot be
    /// written (full, I/O error, read-only), or a volume for refused files is full. Intake then
    /// pauses, says so once, and resumes by itself when a file goes through again.
    fn pauses_intake(&self) -> bool {
        match self {
            Self::Store(_) | Self::Audit(_) => true,
            Self::Outbox(e) => e.is_disk_full(),
            Self::Shared(_, pauses) => *pauses,
            Self::Seal(..) | Self::Worker(_) => false,
        }
    }
}

/// The intake component.
pub struct Intake {
    pub node: Arc<Node>,
    pub watcher: OutboxWatcher,
}

/// Idempotency keys of referrals between "stored" and "released" in some intake round in flight
/// (`stage.rs`: at most two rounds run at once).
#[derive(Default)]
struct Claims {
    keys: Mutex<HashSet<[u8; 32]>>,
    freed: tokio::sync::Notify,
}

/// Holds a round's keys; dropping it frees them and wakes the rounds waiting for one.
struct Claim {
    claims: Arc<Claims>,
    keys: Vec<[u8; 32]>,
}

impl Claims {
    /// Waits until none of `keys` is claimed by another round, then claims them all at once (all
    /// or none, so two rounds can never wait for each other).
    async fn claim(self: &Arc<Self>, mut keys: Vec<[u8; 32]>) -> Claim {
        keys.sort_unstable();
        keys.dedup();
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.keys.lock().unwrap_or_else(|e| e.into_inner());
                if keys.iter().all(|k| !held.contains(k)) {
                    held.extend(keys.iter().copied());
                    return Claim {
                        claims: self.clone(),
                        keys,
                    };
                }
            }
            freed.await;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.claims.keys.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
        drop(held);
        self.claims.freed.notify_waiters();
    }
}

/// The work on one file, shared by the files in flight.
#[derive(Clone)]
struct Work {
    node: Arc<Node>,
    claims: Arc<Claims>,
    stage: Arc<stage::Stage>,
}

/// A file's accepted referrals sealed (one per referral, in order), and when they were.
type Sealed = (Vec<(NewEnvelope, SubjectKey)>, DateTime<Utc>);

/// What the intake loop waits for.
enum Next {
    Stop,
    Beat,
    Resume,
    Picked(Pickup),
    Done(String, Result<(), IntakeError>),
}

fn pickup_name(p: &Pickup) -> &str {
    match p {
        Pickup::Refused { name, .. } => name,
        Pickup::Ready(f) => &f.name,
    }
}

/// What a file in hand holds while it is worked on, counted before it is parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    bytes: u64,
    /// One for a JSON file, the lines after the header for a CSV file (an upper bound: a quoted
    /// field may span lines).
    referrals: u64,
}

/// What pickup `p` holds (a refused name holds nothing).
fn held(p: &Pickup) -> Held {
    let Pickup::Ready(f) = p else {
        return Held::default();
    };
    let referrals = match f.kind {
        FileKind::Json => 1,
        FileKind::Csv => {
            let newlines = f.bytes.iter().filter(|&&b| b == b'\n').count();
            let unterminated = usize::from(f.bytes.last().is_some_and(|&b| b != b'\n'));
            (newlines + unterminated).saturating_sub(1).max(1) as u64
        }
    };
    Held {
        bytes: f.bytes.len() as u64,
        referrals,
    }
}

/// What the files in flight hold, per name.
type InFlight = HashMap<String, Held>;

/// Starts work on pickup `p` named `name`: in flight with the bytes and referrals it holds, its
/// task's name kept (to report a task that panicked).
fn start(
    work: &Work,
    p: Pickup,
    name: String,
    in_flight: &mut InFlight,
    tasks: &mut tokio::task::JoinSet<(String, Result<(), IntakeError>)>,
    task_names: &mut HashMap<tokio::task::Id, String>,
) {
    in_flight.insert(name.clone(), held(&p));
    let (work, n) = (work.clone(), name.clone());
    let h = tasks.spawn(async move { (n, work.take(p).await) });
    task_names.insert(h.id(), name);
}

impl Intake {
    /// Takes files until `shutdown`, up to `intake.parallel_files` at once (and no new one while
    /// those hold `intake.parallel_bytes` or `intake.parallel_referrals`); the files in hand are
    /// finished first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let work = Work::new(self.node.clone());
        let limit = self.node.settings.intake.parallel_files.max(1);
        let byte_budget = self.node.settings.intake.parallel_bytes;
        let referral_budget = self.node.settings.intake.parallel_referrals;
        let mut paused = false;
        // While set, no new file is started (the retry pause after a failure).
        let mut hold: Option<tokio::time::Instant> = None;
        let mut tasks: tokio::task::JoinSet<(String, Result<(), IntakeError>)> =
            tokio::task::JoinSet::new();
        // Names in flight with the bytes and referrals each holds (read, not yet finished), and
        // pickups of such a name waiting for the first to finish.
        let mut in_flight: InFlight = HashMap::new();
        let mut waiting: HashMap<String, VecDeque<Pickup>> = HashMap::new();
        let mut task_names: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut poisoned: HashSet<String> = HashSet::new();
        let beat = self.node.heartbeats.register("intake");
        loop {
            beat.beat();
            let can_take = hold.is_none()
                && in_flight.len() < limit
                && in_flight.values().map(|h| h.bytes).sum::<u64>() < byte_budget
                && in_flight.values().map(|h| h.referrals).sum::<u64>() < referral_budget;
            let next = tokio::select! {
                _ = shutdown.cancelled() => Next::Stop,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => match joined {
                    Ok((id, (name, r))) => {
                        task_names.remove(&id);
                        Next::Done(name, r)
                    }
                    // A panicking file task: its slot is freed, its file left in the outbox and
                    // not taken again until restart (it would panic again); others go on.
                    Err(e) => {
                        if let Some(name) = task_names.remove(&e.id()) {
                            error!(file = %crate::core::text::escape_for_log(&name), "intake worker ended abnormally ({e}); the file stays in the outbox and is not taken again until refex restarts");
                            in_flight.remove(&name);
                            waiting.remove(&name);
                            poisoned.insert(name);
                        } else {
                            error!("intake worker ended abnormally: {e}");
                        }
                        Next::Beat
                    }
                },
                p = self.watcher.next(), if can_take => Next::Picked(p),
                _ = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)), if hold.is_some() => Next::Resume,
                // `next` is cancel-safe: an idle intake still beats.
                _ = tokio::time::sleep(crate::node::heartbeat::BEAT_EVERY) => Next::Beat,
            };
            match next {
                Next::Stop => break,
                Next::Beat => {}
                Next::Resume => hold = None,
                Next::Picked(p) => {
                    let name = pickup_name(&p).to_owned();
                    if poisoned.contains(&name) {
                        // Reported once when its worker failed.
                    } else if in_flight.contains_key(&name) {
                        waiting.entry(name).or_default().push_back(p);
                    } else {
                        start(&work, p, name, &mut in_flight, &mut tasks, &mut task_names);
                    }
                }
                Next::Done(name, result) => {
                    in_flight.remove(&name);
                    if result.is_err() {
                        self.watcher.forget(&name);
                    }
                    if let Some(p) = waiting.get_mut(&name).and_then(VecDeque::pop_front) {
                        let n = name.clone();
                        start(&work, p, n, &mut in_flight, &mut tasks, &mut task_names);
                    }
                    if waiting.get(&name).is_some_and(VecDeque::is_empty) {
                        waiting.remove(&name);
                    }
                    if Self::outcome(result, &mut paused) {
                        hold = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                    }
                }
            }
        }
        // Shutdown: no new file; every file in hand is finished.
        while let Some(joined) = tasks.join_next().await {
            if let Ok((_, result)) = joined {
                Self::outcome(result, &mut paused);
            }
        }
    }

    /// Logs a file's outcome and tracks the paused state; true when intake must pause.
    fn outcome(result: Result<(), IntakeError>, paused: &mut bool) -> bool {
        match result {
            Ok(()) => {
                crate::node::metrics::intake_paused(false);
                if *paused {
                    info!("intake resumed: the audit log and the store can be written again");
                    *paused = false;
                }
                false
            }
            Err(e) => {
                if e.pauses_intake() {
                    crate::node::metrics::intake_paused(true);
                    if !*paused {
                        error!(
                            "intake paused: cannot write ({}); files stay in the outbox",
                            crate::core::text::escape_for_log(&e.to_string())
                        );
                        *paused = true;
                    }
                } else {
                    error!(
                        "intake failed for a file, will retry: {}",
                        crate::core::text::escape_for_log(&e.to_string())
                    );
                }
                true
            }
        }
    }

    /// Processes one ready file completely, or returns an error and leaves it in place.
    pub async fn take_file(&self, f: &ReadyFile) -> Result<(), IntakeError> {
        Work::new(self.node.clone())
            .take_ready(ReadyFile {
                name: f.name.clone(),
                path: f.path.clone(),
                bytes: f.bytes.clone(),
                identity: f.identity,
                kind: f.kind,
            })
            .await
    }
}

impl Work {
    fn new(node: Arc<Node>) -> Self {
        Self {
            node,
            claims: Arc::default(),
            stage: Arc::default(),
        }
    }

    /// Accepted referrals carried out (sealed, stored, recorded, released) at a time:
    /// `intake.parallel_referrals`.
    fn slice(&self) -> usize {
        usize::try_from(self.node.settings.intake.parallel_referrals)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// One pickup, start to finish.
    async fn take(&self, p: Pickup) -> Result<(), IntakeError> {
        match p {
            Pickup::Refused { name, reason } => {
                let err = FieldError {
                    row: None,
                    field: "file".into(),
                    rule: reason.rule().into(),
                    message: reason.to_string(),
                };
                let now = Utc::now();
                let plan = plan::refuse_whole(&name, vec![err], now);
                self.carry_out(&name, None, plan, None, Ok((Vec::new(), now)))
                    .await
            }
            Pickup::Ready(file) => self.take_ready(file).await,
        }
    }

    /// Plans one read file and seals its first slice of accepted referrals (all of them, unless
    /// the file is larger than a slice), in one trip to the blocking pool (parsing a batch and
    /// sealing are CPU work; sealing stores nothing, so it needs no claim), and carries the plan
    /// out; [`Self::carry_out`] seals each later slice just before storing it.
    async fn take_ready(&self, f: ReadyFile) -> Result<(), IntakeError> {
        let node = self.node.clone();
        let slice = self.slice();
        let (f, plan, hash, sealed) = off_thread(move || {
            let mut f = f;
            let now = Utc::now();
            let format = match f.kind {
                FileKind::Json => Format::Json,
                FileKind::Csv => Format::Csv,
            };
            let plan = node.with_referral_context(|ctx| {
                plan::plan(format, &f.name, &f.bytes, ctx, &node.csv_limits(), now)
            });
            let hash = sha256(&f.bytes);
            // The plan holds what it needs; the content is not kept while the file is carried
            // out (a large batch's slices take a while).
            drop(std::mem::take(&mut f.bytes));
            let sealed = match &plan {
                Plan::Take { accepted, .. } => {
                    seal_all(&node, &accepted[..slice.min(accepted.len())], now)
                }
                Plan::RefuseFile { .. } => Ok(Vec::new()),
            };
            (f, plan, hash, sealed.map(|s| (s, now)))
        })
        .await?;
        self.carry_out(&f.name, Some(&f), plan, Some(hash), sealed)
            .await
    }

    /// Carries out a plan in the one fixed order: refusals audited → accepted referrals queued,
    /// synced and audited with the other files of their round → refused rows written to
    /// `rejected/` → the file removed (by the round when it has no refused rows). `sealed` holds
    /// the first slice's envelopes (one per accepted referral, in order, sealed at `now`); a
    /// later slice is sealed on the blocking pool when its turn comes, so a large batch holds
    /// one slice of sealed envelopes at a time, not the file's. `file` is `None` for a file
    /// refused before it was read (it is moved, not removed).
    async fn carry_out(
        &self,
        name: &str,
        file: Option<&ReadyFile>,
        plan: Plan,
        file_hash: Option<[u8; 32]>,
        sealed: Result<Sealed, IntakeError>,
    ) -> Result<(), IntakeError> {
        let outbox = &self.node.settings.paths.outbox;
        match plan {
            Plan::RefuseFile { refused, error_doc } => {
                let rules: Vec<&str> = refused.errors.iter().map(|e| e.rule.as_str()).collect();
                warn!(file = %crate::core::text::escape_for_log(name), rules = %rules.join(","), "file refused; moved to rejected/");
                self.audit_refusal(&refused, file_hash.unwrap_or([0; 32]))
                    .await?;
                reject(outbox, name, None, error_doc).await?;
            }
            Plan::Take {
                accepted,
                refused,
                batch,
                rejected,
            } => {
                let file_hash = file_hash.unwrap_or([0; 32]);
                for r in &refused {
                    self.audit_refusal(r, file_hash).await?;
                }
                let (sealed, now) = sealed?;
                // The round removes the file unless refused rows must reach `rejected/` first.
                let removed_by_round = !accepted.is_empty() && rejected.is_none() && file.is_some();
                // A batch larger than `intake.parallel_referrals` is carried out in slices of
                // that many, one after the other (stored, recorded, released), the file removed
                // with the last: a round holds one slice's store transaction and audit job, not
                // the whole file's (20,000 rows in one round peaked at ~500 MB). A failure
                // between slices leaves the file: taken again, the slices already queued are
                // logged duplicates, as after a crash.
                let slice = self.slice();
                let parts = accepted.len().div_ceil(slice);
                let (mut items, mut first) = (accepted.into_iter(), Some(sealed));
                for part in 1..=parts {
                    let items: Vec<_> = items.by_ref().take(slice).collect();
                    let (items, sealed) = match first.take() {
                        Some(sealed) => (items, sealed),
                        None => {
                            let node = self.node.clone();
                            let (items, sealed) = off_thread(move || {
                                let sealed = seal_all(&node, &items, now);
                                (items, sealed)
                            })
                            .await?;
                            (items, sealed?)
                        }
                    };
                    debug_assert_eq!(sealed.len(), items.len(), "one envelope per referral");
                    let keys = items
                        .iter()
                        .map(|i| self.node.subject.index_key(&i.source_system, &i.source_ref))
                        .collect();
                    let entry = stage::Entry {
                        name: name.to_owned(),
                        file_hash,
                        items,
                        sealed,
                        keys,
                        batch,
                        now,
                        part: (parts > 1).then_some((part, parts)),
                        remove: file
                            .filter(|_| removed_by_round && part == parts)
                            .map(|f| f.identity),
                    };
                    self.staged(entry).await?;
                }
                if removed_by_round {
                    return Ok(());
                }
                crate::core::failpoint::hit("intake_before_delete");
                if let Some((rows, doc)) = rejected {
                    warn!(file = %crate::core::text::escape_for_log(name), refused_rows = refused.len(), "batch rows refused; written to rejected/");
                    reject(outbox, name, Some(rows), doc).await?;
                }
                if let Some(f) = file {
                    // Off the async threads: the directory sync waits for the device.
                    let (node, dir) = (self.node.clone(), outbox.clone());
                    let (name, identity) = (f.name.clone(), f.identity);
                    off_thread(move || {
                        outbox_dir::remove_taken_sharing(&node.outbox_sync, &dir, &name, identity)
                    })
                    .await??;
                    crate::core::failpoint::hit("intake_after_delete");
                }
            }
        }
        Ok(())
    }

    /// For an envelope stored but never released: whether the log already holds its records
    /// (a crash after step 3). When the log cannot be read, it is recorded again: a second
    /// record is better than a missing one.
    fn already_recorded(&self, id: &EnvelopeId, now: DateTime<Utc>) -> bool {
        let since = self
            .node
            .store
            .get(id)
            .ok()
            .flatten()
            .map(|r| r.created_at())
            .unwrap_or(now);
        let found = crate::adapters::audit::mentions_envelope(
            &self.node.settings.paths.audit,
            id,
            since.into(),
        )
        .unwrap_or(false);
        info!(envelope_id = %id, already_recorded = found, "resuming an envelope stored before a crash but not yet released");
        found
    }

    /// Audits one refusal (a whole file or a row), with its rules and, where the source fields
    /// could be read, the subject key and source system.
    async fn audit_refusal(&self, r: &Refused, file_hash: [u8; 32]) -> Result<(), IntakeError> {
        let mut rules: Vec<&str> = r.errors.iter().map(|e| e.rule.as_str()).collect();
        rules.sort_unstable();
        rules.dedup();
        crate::node::metrics::refused(&rules);
        let mut ev = Event::new(Operation::Refusal, Actor::System, Outcome::Refused)
            .reason(&rules.join(","))
            .source(file_hash, r.row);
        if let Some((system, reference)) = &r.source {
            ev = ev
                .subject(self.node.subject.key(system, reference))
                .source_system(system);
        }
        self.node.audit.record(ev).await?;
        Ok(())
    }
}

/// [`outbox_dir::reject`] on the blocking pool: it writes and syncs files and `rejected/`.
async fn reject(
    outbox: &std::path::Path,
    name: &str,
    rows: Option<Vec<u8>>,
    error_doc: Vec<u8>,
) -> Result<(), IntakeError> {
    let (dir, name) = (outbox.to_owned(), name.to_owned());
    off_thread(move || outbox_dir::reject(&dir, &name, rows.as_deref(), &error_doc)).await??;
    Ok(())
}

/// Runs `f` on the blocking pool (file I/O, syncs, parsing, sealing); a worker that panicked
/// is [`IntakeError::Worker`].
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, IntakeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IntakeError::Worker(e.to_string()))
}

/// Seals accepted referrals (signed, encrypted to their areas), CPU work for the blocking pool.
/// Nothing is stored here.
fn seal_all(
    node: &Node,
    items: &[Accepted],
    now: DateTime<Utc>,
) -> Result<Vec<(NewEnvelope, SubjectKey)>, IntakeError> {
    let directory = node.directory();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let to = &item.class.to;
        let entry = directory
            .get(to)
            .ok_or_else(|| IntakeError::Seal(to.clone(), "area not in the directory".into()))?;
        let payload = &item.payload;
        let header = Header {
            v: 1,
            id: EnvelopeId::generate(),
            from: node.me().clone(),
            to: to.clone(),
            created: now,
            priority: item.class.priority,
            due_by: item.class.due_by,
            content_type: crate::core::envelope::CONTENT_TYPE_REFERRAL_V1.into(),
            payload_len: payload.len() as u64,
        };
        let shared = entry
            .opens_shared_key_envelopes()
            .then_some(&node.seal_contexts);
        let sealed = crypto::seal(header, payload, &node.signer, &entry.encryption_key, shared)
            .map_err(|e| IntakeError::Seal(to.clone(), e.to_string()))?;
        let subject = node.subject.key(&item.source_system, &item.source_ref);
        let bytes = sealed.to_bytes();
        let digest = sha256(&bytes);
        let new = NewEnvelope {
            id: sealed.id(),
            to: to.clone(),
            priority: item.class.priority,
            due_by: item.class.due_by,
            created: now,
            sealed: bytes,
            digest,
            subject_key: Some(subject.to_string()),
        };
        out.push((new, subject));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::outbox_dir::FileIdentity;

    fn ready(kind: FileKind, bytes: &[u8]) -> Pickup {
        Pickup::Ready(ReadyFile {
            name: "f".into(),
            path: "f".into(),
            bytes: bytes.to_vec(),
            identity: FileIdentity {
                dev: 0,
                ino: 0,
                len: bytes.len() as u64,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            kind,
        })
    }

    #[test]
    fn a_file_in_hand_counts_its_referrals_before_it_is_parsed() {
        let json = held(&ready(FileKind::Json, b"{}"));
        assert_eq!((json.bytes, json.referrals), (2, 1));
        let csv = |b: &[u8]| held(&ready(FileKind::Csv, b)).referrals;
        assert_eq!(csv(b"h\na\nb\nc\n"), 3, "header and three rows");
        assert_eq!(csv(b"h\na\nb\nc"), 3, "the last row without its newline");
        assert_eq!(csv(b"h\n"), 1, "a header alone still holds a slot");
        assert_eq!(csv(b""), 1);
        let refused = Pickup::Refused {
            name: "x".into(),
            reason: outbox_dir::PickupRefusal::Symlink,
        };
        assert_eq!(
            held(&refused),
            Held::default(),
            "a refused name holds nothing"
        );
    }
}
