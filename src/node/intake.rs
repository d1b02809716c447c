//! Intake: turns files dropped in the outbox into sealed, queued envelopes, or into refusals.
//!
//! For each ready file: parse (JSON: one referral; CSV: one per row), validate, route and
//! classify each referral on its own, seal it (signed, encrypted to the destination area, or to
//! ourselves for a local referral), queue it under its idempotency key (source_system +
//! source_ref), sync the store, audit (collection; for a batch also the combination: file hash
//! and row), and only then delete the file. Refused files or rows go to `rejected/` with an
//! `.error.json` naming file, row, field and rule.
//! Crash or failure at any step before the delete leaves the file in the outbox: it is read again
//! and the idempotency index turns every referral already queued into a logged duplicate, so the
//! file makes each envelope exactly once. Disk full (store, audit or rejected/): the file is
//! left alone, the error logged once, and intake pauses and retries until space returns.
//! Must not: send half a file's content, block on one bad file, or write personal data to logs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::adapters::audit::{
    Actor, AuditLog, Event, Operation, Outcome, SubjectSecret, TallyEntry,
};
use crate::adapters::outbox_dir::{self, FileKind, OutboxWatcher, Pickup, ReadyFile};
use crate::adapters::store::{Enqueued, NewEnvelope, Store};
use crate::core::calendar::Calendar;
use crate::core::digest::sha256;
use crate::core::envelope::Header;
use crate::core::referral::csv::{parse_csv, write_rows, CsvLimits};
use crate::core::referral::{classify, parse_json, Classified, Context, FieldError, Referral};
use crate::core::routing::RoutingTable;
use crate::core::types::{AreaId, EnvelopeId};
use crate::crypto::directory::Directory;
use crate::crypto::{self, SigningKey};

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
}

impl IntakeError {
    fn is_disk_full(&self) -> bool {
        match self {
            Self::Store(e) => e.is_disk_full(),
            Self::Audit(e) => e.is_disk_full(),
            Self::Outbox(e) => e.is_disk_full(),
            Self::Seal(..) => false,
        }
    }
}

/// Everything intake needs.
pub struct IntakeContext {
    pub me: AreaId,
    pub outbox: PathBuf,
    pub directory: Arc<Directory>,
    pub routing: RoutingTable,
    pub calendar: Calendar,
    pub signer: Arc<SigningKey>,
    pub subject: Arc<SubjectSecret>,
    pub store: Store,
    pub audit: AuditLog,
    pub wake: HashMap<AreaId, Arc<Notify>>,
    pub csv_limits: CsvLimits,
}

/// One referral ready to seal, with where it came from.
struct Accepted {
    referral: Referral,
    class: Classified,
    row: Option<u64>,
}

/// The intake component.
pub struct Intake {
    pub ctx: IntakeContext,
    pub watcher: OutboxWatcher,
}

impl Intake {
    /// Takes files until `shutdown`; the file in hand is finished first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut disk_full_reported = false;
        loop {
            let pickup = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = self.watcher.next() => p,
            };
            let result = match pickup {
                Pickup::Refused { name, reason } => {
                    let err = FieldError {
                        row: None,
                        field: "file".into(),
                        rule: reason.rule().into(),
                        message: reason.to_string(),
                    };
                    self.ctx
                        .refuse_file(&name, None, vec![err], None, None)
                        .await
                        .map(|_| ())
                        .inspect_err(|_| self.watcher.forget(&name))
                }
                Pickup::Ready(file) => {
                    let r = self.ctx.take_file(&file).await;
                    if r.is_err() {
                        self.watcher.forget(&file.name);
                    }
                    r
                }
            };
            match result {
                Ok(()) => {
                    if disk_full_reported {
                        info!("intake resumed: space is available again");
                        disk_full_reported = false;
                    }
                }
                Err(e) => {
                    if e.is_disk_full() {
                        if !disk_full_reported {
                            error!(
                                "intake paused: a volume is full ({e}); files stay in the outbox"
                            );
                            disk_full_reported = true;
                        }
                    } else {
                        error!("intake failed for a file, will retry: {e}");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
    }
}

impl IntakeContext {
    /// Processes one ready file completely, or returns an error and leaves it in place.
    pub async fn take_file(&self, f: &ReadyFile) -> Result<(), IntakeError> {
        let now = Utc::now();
        let file_hash = sha256(&f.bytes);
        match f.kind {
            FileKind::Json => match parse_json(&f.bytes) {
                Err(errors) => {
                    let subject = subject_of_json(&f.bytes, &self.subject);
                    self.refuse_file(&f.name, None, errors, subject, Some(file_hash))
                        .await?;
                }
                Ok(referral) => match classify(
                    &referral,
                    &Context {
                        routing: &self.routing,
                        calendar: &self.calendar,
                        is_known_area: &self.known_area(),
                    },
                ) {
                    Err(errors) => {
                        let subject = Some(
                            self.subject
                                .key(&referral.source_system, &referral.source_ref)
                                .to_string(),
                        );
                        self.refuse_file(&f.name, None, errors, subject, Some(file_hash))
                            .await?;
                    }
                    Ok(class) => {
                        self.accept(
                            &f.name,
                            file_hash,
                            vec![Accepted {
                                referral,
                                class,
                                row: None,
                            }],
                            false,
                            now,
                        )
                        .await?;
                        crate::core::failpoint::hit("intake_before_delete");
                        outbox_dir::remove_taken(&self.outbox, f)?;
                    }
                },
            },
            FileKind::Csv => match parse_csv(&f.bytes, &self.csv_limits) {
                Err(errors) => {
                    self.refuse_file(&f.name, None, errors, None, Some(file_hash))
                        .await?;
                }
                Ok(batch) => {
                    let mut good = Vec::new();
                    let mut bad = Vec::new();
                    let mut errors = Vec::new();
                    let known = self.known_area();
                    let ctx = Context {
                        routing: &self.routing,
                        calendar: &self.calendar,
                        is_known_area: &known,
                    };
                    for row in &batch.rows {
                        let outcome = match &row.parsed {
                            Ok(r) => classify(r, &ctx).map(|c| (r.clone(), c)),
                            Err(e) => Err(e.clone()),
                        };
                        match outcome {
                            Ok((referral, class)) => good.push(Accepted {
                                referral,
                                class,
                                row: Some(row.row),
                            }),
                            Err(mut e) => {
                                for err in &mut e {
                                    err.row = Some(row.row);
                                    if err.field.contains('.') {
                                        err.field =
                                            crate::core::referral::csv::column_for(&err.field);
                                    }
                                }
                                let subject =
                                    subject_of_row(&batch.header, &row.raw, &self.subject);
                                self.audit_refusal(&f.name, Some(row.row), &e, subject, file_hash)
                                    .await?;
                                errors.extend(e);
                                bad.push(row);
                            }
                        }
                    }
                    self.accept(&f.name, file_hash, good, true, now).await?;
                    crate::core::failpoint::hit("intake_before_delete");
                    if !bad.is_empty() {
                        warn!(file = %f.name, refused_rows = bad.len(), "batch rows refused; written to rejected/");
                        let rows = write_rows(&batch.header, &bad);
                        let doc = error_document(&f.name, now, &errors);
                        outbox_dir::reject(&self.outbox, &f.name, Some(&rows), &doc)?;
                    }
                    outbox_dir::remove_taken(&self.outbox, f)?;
                }
            },
        }
        Ok(())
    }

    fn known_area(&self) -> impl Fn(&AreaId) -> bool + Sync + '_ {
        |a: &AreaId| self.directory.contains(a)
    }

    /// Seals and queues every accepted referral of one file, syncs, audits, wakes the senders.
    async fn accept(
        &self,
        file: &str,
        file_hash: [u8; 32],
        items: Vec<Accepted>,
        batch: bool,
        now: DateTime<Utc>,
    ) -> Result<(), IntakeError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut queued = Vec::new();
        for item in &items {
            let to = &item.class.to;
            let entry = self
                .directory
                .get(to)
                .ok_or_else(|| IntakeError::Seal(to.clone(), "area not in the directory".into()))?;
            let payload = item.referral.to_cbor();
            let header = Header {
                v: 1,
                id: EnvelopeId::generate(),
                from: self.me.clone(),
                to: to.clone(),
                created: now,
                priority: item.class.priority,
                due_by: item.class.due_by,
                content_type: crate::core::envelope::CONTENT_TYPE_REFERRAL_V1.into(),
                payload_len: payload.len() as u64,
            };
            let sealed = crypto::seal(header, &payload, &self.signer, &entry.encryption_key)
                .map_err(|e| IntakeError::Seal(to.clone(), e.to_string()))?;
            let subject = self
                .subject
                .key(&item.referral.source_system, &item.referral.source_ref);
            let bytes = sealed.to_bytes();
            let digest = sha256(&bytes);
            let idem = sha256(item.referral.idempotency_key().as_bytes());
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
            let result = self.store.enqueue(new, &idem)?;
            queued.push((result, digest, subject));
        }
        self.store.durable().await?;
        crate::core::failpoint::hit("intake_after_store");

        // The records of a whole file are submitted together so the audit writer commits them
        // with a few syncs (group commit), and all are durable before the file is deleted.
        let mut jobs = tokio::task::JoinSet::new();
        for (item, (result, digest, subject)) in items.iter().zip(&queued) {
            let (id, duplicate) = match result {
                Enqueued::New(id) => (*id, false),
                Enqueued::Duplicate(id) => (*id, true),
            };
            let mut ev = Event::new(Operation::Collection, Actor::System, Outcome::Ok)
                .envelope(id)
                .route(&self.me, &item.class.to)
                .digest(*digest)
                .subject(subject.clone())
                .source_system(&item.referral.source_system)
                .priority(item.class.priority)
                .source(file_hash, item.row);
            if duplicate {
                ev = ev.reason("duplicate");
                info!(file = %file, row = item.row, envelope_id = %id, "referral already queued earlier; duplicate not sent again");
            }
            let audit = self.audit.clone();
            jobs.spawn(async move { audit.record(ev).await.map(|_| ()) });
            if batch && !duplicate {
                let ev = Event::new(Operation::Combination, Actor::System, Outcome::Ok)
                    .envelope(id)
                    .subject(subject.clone())
                    .source_system(&item.referral.source_system)
                    .source(file_hash, item.row)
                    .reason("batch_split");
                let audit = self.audit.clone();
                jobs.spawn(async move { audit.record(ev).await.map(|_| ()) });
            }
            if !duplicate {
                let entry = TallyEntry {
                    day: now.date_naive(),
                    from: self.me.clone(),
                    to: item.class.to.clone(),
                    priority: item.class.priority,
                    category: item.class.category.as_str().to_owned(),
                    incident: item.class.incident.clone(),
                    referred: chrono::DateTime::parse_from_rfc3339(&item.referral.referred_at)
                        .ok()
                        .map(|d| d.date_naive()),
                    late: None,
                };
                let audit = self.audit.clone();
                jobs.spawn(async move { audit.tally(entry).await });
            }
        }
        let mut first_error = None;
        while let Some(joined) = jobs.join_next().await {
            let result = joined.unwrap_or(Err(crate::adapters::audit::AuditError::Closed));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        let new = queued
            .iter()
            .filter(|(r, ..)| matches!(r, Enqueued::New(_)))
            .count();
        info!(file = %file, queued = new, duplicates = queued.len() - new, "file taken");
        for item in &items {
            if let Some(w) = self.wake.get(&item.class.to) {
                w.notify_one();
            }
        }
        Ok(())
    }

    /// Moves a whole file to `rejected/` with its error document, and audits the refusal.
    async fn refuse_file(
        &self,
        name: &str,
        row: Option<u64>,
        errors: Vec<FieldError>,
        subject: Option<String>,
        file_hash: Option<[u8; 32]>,
    ) -> Result<(), IntakeError> {
        let now = Utc::now();
        let rules: Vec<&str> = errors.iter().map(|e| e.rule.as_str()).collect();
        warn!(file = %name, rules = %rules.join(","), "file refused; moved to rejected/");
        self.audit_refusal(name, row, &errors, subject, file_hash.unwrap_or([0; 32]))
            .await?;
        let doc = error_document(name, now, &errors);
        outbox_dir::reject(&self.outbox, name, None, &doc)?;
        Ok(())
    }

    async fn audit_refusal(
        &self,
        _file: &str,
        row: Option<u64>,
        errors: &[FieldError],
        subject: Option<String>,
        file_hash: [u8; 32],
    ) -> Result<(), IntakeError> {
        let mut rules: Vec<&str> = errors.iter().map(|e| e.rule.as_str()).collect();
        rules.sort_unstable();
        rules.dedup();
        let mut ev = Event::new(Operation::Refusal, Actor::System, Outcome::Refused)
            .reason(&rules.join(","))
            .source(file_hash, row);
        if let Some(s) = subject {
            ev = ev.subject_hex(&s);
        }
        self.audit.record(ev).await?;
        Ok(())
    }
}

/// The `NAME.error.json` document of REFERRAL.md.
fn error_document(file: &str, now: DateTime<Utc>, errors: &[FieldError]) -> Vec<u8> {
    let doc = json!({
        "file": file,
        "refused_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "errors": errors,
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

/// The subject key of a refused JSON file, when its source fields can be read at all.
fn subject_of_json(bytes: &[u8], secret: &SubjectSecret) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let system = v.get("source_system")?.as_str()?;
    let reference = v.get("source_ref")?.as_str()?;
    Some(secret.key(system, reference).to_string())
}

/// The subject key of a refused CSV row, when its source columns are present.
fn subject_of_row(header: &[String], raw: &[String], secret: &SubjectSecret) -> Option<String> {
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .and_then(|i| raw.get(i))
            .filter(|v| !v.is_empty())
    };
    Some(
        secret
            .key(col("source_system")?, col("source_ref")?)
            .to_string(),
    )
}
