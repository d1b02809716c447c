//! Intake's shared stage: steps 2 (store) to 5 (remove) of the module above, carried out for
//! every file sealed at the same time at once — one store transaction and sync for all their
//! envelopes, one audit write and sync for all their records, one release, one pass of
//! deletions with one directory sync — instead of a hand-off to the store committer, the audit
//! writer and the blocking pool per file and step. Measured before it: a referral dropped as its
//! own JSON file cost the sender ~22 context switches against ~8 for a row of a CSV batch.
//!
//! No task of its own (leader and followers): a file hands its [`Entry`] in and waits for its
//! answer; a file's task that finds a round free (at most [`ROUNDS`] at once, so one round's
//! store sync can overlap another's audit write) takes every entry waiting and carries them out
//! as one round, and again while entries wait, until its own answer is in; leaving with
//! entries waiting, it wakes a waiting file to lead them. So every entry handed in is taken by
//! some round, and no file leads for longer than its own round and those before it.
//! Per file the order is the module's (stored → recorded → released → removed). A failure of a
//! shared step fails every file of its round: each stays in the outbox and is taken again, as
//! it would be alone. Two files of one round never carry the same referral (idempotency key):
//! the later waits for the next round; across rounds the claims keep them apart as before.
//! Must not: leave an entry unanswered (a round that panics drops its answers, which its files
//! see as a worker failure), or remove a file whose refused rows are not yet in `rejected/`
//! (such a file is removed by its own task, after they are written).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, Notify, Semaphore};
use tracing::{info, warn};

use super::{off_thread, IntakeError, Work};
use crate::adapters::audit::{Actor, Event, Operation, Outcome, TallyEntry};
use crate::adapters::outbox_dir::{self, FileIdentity};
use crate::adapters::store::{Enqueued, NewEnvelope};
use crate::core::audit::SubjectKey;
use crate::core::plan::Accepted;
use crate::core::text::escape_for_log;

/// Rounds at once.
const ROUNDS: usize = 2;

/// One file's accepted referrals, sealed, for a round.
pub(super) struct Entry {
    pub name: String,
    pub file_hash: [u8; 32],
    pub items: Vec<Accepted>,
    /// One per item, in order.
    pub sealed: Vec<(NewEnvelope, SubjectKey)>,
    /// The items' idempotency keys, in order.
    pub keys: Vec<[u8; 32]>,
    pub batch: bool,
    pub now: DateTime<Utc>,
    /// Which slice of its file this is (k of n), when the file is carried out in slices.
    pub part: Option<(usize, usize)>,
    /// The identity the file was read under, when the round removes it after the release;
    /// `None` when its own task does (refused rows to write first).
    pub remove: Option<FileIdentity>,
}

type Answer = oneshot::Sender<Result<(), IntakeError>>;

/// What a round writes for its referrals: the audit records and tallies (one job), the ids to
/// release.
#[derive(Default)]
struct Records {
    events: Vec<Event>,
    tallies: Vec<TallyEntry>,
    release: Vec<crate::core::types::EnvelopeId>,
}

/// A file whose round dropped its answer (the round panicked): it stays in the outbox.
fn round_failed() -> IntakeError {
    IntakeError::Worker("the intake round carrying this file failed".into())
}

/// The entries waiting for a round, and the rounds free.
pub(super) struct Stage {
    waiting: Mutex<VecDeque<(Entry, Answer)>>,
    rounds: Semaphore,
    /// Wakes a waiting file to lead when a leader leaves with entries waiting.
    turn: Notify,
}

impl Default for Stage {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            rounds: Semaphore::new(ROUNDS),
            turn: Notify::new(),
        }
    }
}

impl Stage {
    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<(Entry, Answer)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Work {
    /// Hands `entry` to the stage and returns once its round has carried it out (or failed).
    pub(super) async fn staged(&self, entry: Entry) -> Result<(), IntakeError> {
        let (tx, mut rx) = oneshot::channel();
        self.stage.waiting().push_back((entry, tx));
        loop {
            if let Some(answer) = self.lead(&mut rx).await {
                return answer;
            }
            tokio::select! {
                answer = &mut rx => return answer.unwrap_or_else(|_| Err(round_failed())),
                // A leader left with entries waiting: try to lead them.
                _ = self.stage.turn.notified() => {}
            }
        }
    }

    /// Runs rounds while entries wait and a round is free, until this file's own answer is in
    /// (then returned). Leaving with entries waiting, it wakes a waiting file to lead them; an
    /// entry handed in after it found none waiting finds a round free itself.
    async fn lead(
        &self,
        rx: &mut oneshot::Receiver<Result<(), IntakeError>>,
    ) -> Option<Result<(), IntakeError>> {
        while let Ok(round) = self.stage.rounds.try_acquire() {
            let entries: Vec<_> = self.stage.waiting().drain(..).collect();
            if entries.is_empty() {
                drop(round);
                if self.stage.waiting().is_empty() {
                    break;
                }
                continue;
            }
            self.round(entries).await;
            drop(round);
            let answer = match rx.try_recv() {
                Ok(answer) => answer,
                Err(oneshot::error::TryRecvError::Empty) => continue,
                Err(oneshot::error::TryRecvError::Closed) => Err(round_failed()),
            };
            if !self.stage.waiting().is_empty() {
                self.stage.turn.notify_one();
            }
            return Some(answer);
        }
        None
    }

    /// One round: the entries whose keys no earlier entry of it holds, together; the others
    /// go back to wait for the next.
    async fn round(&self, entries: Vec<(Entry, Answer)>) {
        let mut keys: HashSet<[u8; 32]> = HashSet::new();
        let mut together = Vec::with_capacity(entries.len());
        let mut later = Vec::new();
        for (entry, answer) in entries {
            if entry.keys.iter().any(|k| keys.contains(k)) {
                later.push((entry, answer));
            } else {
                keys.extend(entry.keys.iter().copied());
                together.push((entry, answer));
            }
        }
        if !later.is_empty() {
            let mut waiting = self.stage.waiting();
            for e in later.into_iter().rev() {
                waiting.push_front(e);
            }
        }
        let (entries, answers): (Vec<_>, Vec<_>) = together.into_iter().unzip();
        let results = match self.carry_out_round(entries).await {
            Ok(each) => each,
            Err(e) => {
                // Shared by every file of the round; the first carries the error itself.
                let (message, pauses) = (e.to_string(), e.pauses_intake());
                let mut first = Some(e);
                answers
                    .iter()
                    .map(|_| {
                        Err(first
                            .take()
                            .unwrap_or(IntakeError::Shared(message.clone(), pauses)))
                    })
                    .collect()
            }
        };
        for (answer, result) in answers.into_iter().zip(results) {
            // A file whose task is gone (it cannot be: tasks are never aborted) is taken again.
            let _ = answer.send(result);
        }
    }

    /// Stores, records, releases and (where the round does) removes the files of one round;
    /// one result per file for the removal, or the error of a shared step.
    async fn carry_out_round(
        &self,
        entries: Vec<Entry>,
    ) -> Result<Vec<Result<(), IntakeError>>, IntakeError> {
        let keys: Vec<[u8; 32]> = entries
            .iter()
            .flat_map(|e| e.keys.iter().copied())
            .collect();
        // No file of another round may store or release one of these referrals until this
        // round has released them (held until the end of this function).
        let _claim = self.claims.claim(keys).await;
        let mut entries = entries;
        let mut envs = Vec::new();
        let mut meta = Vec::new();
        for e in &mut entries {
            for ((new, subject), idem) in e.sealed.drain(..).zip(&e.keys) {
                meta.push((new.digest, subject));
                envs.push((new, *idem));
            }
        }
        let mut queued = self
            .node
            .store
            .enqueue_all_durably(envs)
            .await?
            .into_iter()
            .zip(meta);
        crate::core::failpoint::hit("intake_after_store");

        // Every record of the round is one audit job (one write and sync, all or none), and
        // all are durable before any envelope is released.
        let mut out = Records::default();
        let mut taken = Vec::with_capacity(entries.len());
        for e in &entries {
            let mut new = 0;
            for item in &e.items {
                let Some((result, (digest, subject))) = queued.next() else {
                    return Err(IntakeError::Worker(
                        "the store answered for fewer envelopes than it was given".into(),
                    ));
                };
                new += usize::from(!matches!(result, Enqueued::Duplicate(_)));
                self.records_of(e, item, result, digest, subject, &mut out);
            }
            taken.push((new, e.items.len() - new));
        }
        let Records {
            events,
            tallies,
            release,
        } = out;
        self.node.audit.record_all_counting(events, tallies).await?;
        crate::core::failpoint::hit("intake_before_release");
        self.node.store.release_durably(&release).await?;
        let mut woken = HashSet::new();
        for (e, (new, duplicates)) in entries.iter().zip(taken) {
            // `part` (k/n) only for a file carried out in slices; absent otherwise.
            let part = e
                .part
                .map(|(k, n)| tracing::field::display(format!("{k}/{n}")));
            info!(file = %escape_for_log(&e.name), part, queued = new, duplicates, "file taken");
            for item in &e.items {
                if woken.insert(&item.class.to) {
                    self.node.wake(&item.class.to);
                }
            }
        }
        self.remove_taken(&entries).await
    }

    /// The records of one referral of `e` (collection; for a batch the combination; a deadline
    /// already missed; its tally) and, unless a duplicate, its id to release.
    fn records_of(
        &self,
        e: &Entry,
        item: &Accepted,
        result: Enqueued,
        digest: [u8; 32],
        subject: SubjectKey,
        out: &mut Records,
    ) {
        let Records {
            events,
            tallies,
            release,
        } = out;
        let (now, id) = (e.now, result.id());
        let duplicate = match result {
            Enqueued::New(_) => false,
            Enqueued::Duplicate(_) => true,
            Enqueued::Resumed(_) => self.already_recorded(&id, now),
        };
        if !matches!(result, Enqueued::Duplicate(_)) {
            release.push(id);
        }
        let mut ev = Event::new(Operation::Collection, Actor::System, Outcome::Ok)
            .envelope(id)
            .route(self.node.me(), &item.class.to)
            .digest(digest)
            .subject(subject.clone())
            .source_system(&item.source_system)
            .priority(item.class.priority)
            .source(e.file_hash, item.row);
        if duplicate {
            ev = ev.reason("duplicate");
            info!(file = %escape_for_log(&e.name), row = item.row, envelope_id = %id, "referral already queued earlier; duplicate not sent again");
        }
        events.push(ev);
        if duplicate {
            return;
        }
        if e.batch {
            let ev = Event::new(Operation::Combination, Actor::System, Outcome::Ok)
                .envelope(id)
                .subject(subject.clone())
                .source_system(&item.source_system)
                .source(e.file_hash, item.row)
                .reason("batch_split");
            events.push(ev);
        }
        let late = item.class.due_by < now;
        if late {
            // Victims' Code deadline already missed before refex saw the referral.
            warn!(file = %escape_for_log(&e.name), row = item.row, envelope_id = %id, due_by = %item.class.due_by.to_rfc3339(), "referral is already past its due_by at intake");
            let ev = Event::new(Operation::Deadline, Actor::System, Outcome::Failed)
                .envelope(id)
                .route(self.node.me(), &item.class.to)
                .subject(subject)
                .source_system(&item.source_system)
                .priority(item.class.priority)
                .reason("late_at_intake");
            events.push(ev);
        }
        tallies.push(TallyEntry {
            day: now.date_naive(),
            from: self.node.me().clone(),
            to: item.class.to.clone(),
            priority: item.class.priority,
            category: item.class.category.as_str().to_owned(),
            incident: item.class.incident.clone(),
            referred: item.referred_on,
            late: Some(late),
        });
    }

    /// Deletes the files the round removes, with one shared directory sync (on the blocking
    /// pool: it waits for the device); one result per entry (`Ok` for those it leaves).
    async fn remove_taken(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Result<(), IntakeError>>, IntakeError> {
        let files: Vec<(usize, (String, FileIdentity))> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.remove.map(|id| (i, (e.name.clone(), id))))
            .collect();
        let mut results: Vec<Result<(), IntakeError>> = entries.iter().map(|_| Ok(())).collect();
        if files.is_empty() {
            return Ok(results);
        }
        crate::core::failpoint::hit("intake_before_delete");
        let (node, dir) = (self.node.clone(), self.node.settings.paths.outbox.clone());
        let (at, files): (Vec<usize>, Vec<_>) = files.into_iter().unzip();
        let removed =
            off_thread(move || outbox_dir::remove_all_taken(&node.outbox_sync, &dir, &files))
                .await?;
        crate::core::failpoint::hit("intake_after_delete");
        for (i, r) in at.into_iter().zip(removed) {
            results[i] = r.map_err(IntakeError::from);
        }
        Ok(results)
    }
}
