//! The receiving side: verify an envelope, deduplicate, write the referral into the inbox
//! exactly once, and answer with a signed receipt.
//!
//! Order of work for one envelope, and what a crash at each step leaves behind:
//! 1. verify (size, decode, recipient, sender = TLS peer, signature, clock window) — nothing kept;
//!    a refusal is audited.
//! 2. seen? — a re-send of an accepted envelope gets the ORIGINAL receipt (after making sure its
//!    inbox file was published), never a second inbox file.
//! 3. decrypt, decode and re-validate the referral — nothing kept; refusals audited.
//! 4. stage the inbox file as `.NAME.tmp` (written, fsynced; invisible to consumers).
//!    Crash → the staged file has no `seen` record and is discarded at start; the sender re-sends.
//! 5. audit `collection` (durable) and sign the receipt over the new chain head.
//! 6. `seen` record with the receipt, then store sync. Crash → at start (or on re-send) the
//!    staged file is published, because the record says it was accepted.
//! 7. publish: rename to NAME, fsync the directory. 8. audit `disclosure` (written to the local
//!    inbox), durable. 9. send the receipt. Crash before 9 → the sender re-sends; step 2 answers.
//!
//! A receipt therefore always means "durably in this area's inbox".
//! Disk full at 4–8: the envelope is refused as transient (no receipt), logged once until space
//! returns; the sender retries later. Nothing half-written is ever visible.
//! Must not: block other envelopes while one is slow (each runs on its own stream task), or
//! accept two copies of the same id at once (an in-progress set refuses the second, transiently).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use crate::adapters::audit::{Actor, AuditLog, Event, Operation, Outcome, SubjectSecret};
use crate::adapters::inbox_dir::{inbox_name, InboxDir, InboxError};
use crate::adapters::store::{SeenRecord, Store, StoreError};
use crate::core::envelope::{ReceiptBody, ReceiptStatus, Reply};
use crate::core::referral::{self, Delivery, Referral};
use crate::core::types::{AreaId, EnvelopeId};
use crate::crypto::directory::Directory;
use crate::crypto::{self, KemSecretKey, OpenPolicy, SigningKey};

/// Everything the receiving side needs.
pub struct Receiver {
    pub me: AreaId,
    pub directory: Arc<Directory>,
    pub signer: Arc<SigningKey>,
    pub kem: Arc<KemSecretKey>,
    pub subject: Arc<SubjectSecret>,
    pub store: Store,
    pub audit: AuditLog,
    pub inbox: Arc<InboxDir>,
    pub policy: OpenPolicy,
    in_progress: Mutex<HashSet<EnvelopeId>>,
    disk_full: AtomicBool,
}

/// Why an accepted-looking envelope could not be taken now (never a half-done state).
#[derive(Debug, thiserror::Error)]
enum TakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error(transparent)]
    Audit(#[from] crate::adapters::audit::AuditError),
    #[error("background task failed")]
    Join,
}

impl TakeError {
    fn is_disk_full(&self) -> bool {
        match self {
            Self::Store(e) => e.is_disk_full(),
            Self::Inbox(e) => e.is_disk_full(),
            Self::Audit(e) => e.is_disk_full(),
            Self::Join => false,
        }
    }
}

/// Removes an id from the in-progress set when the handling of that envelope ends.
struct InProgress<'a>(&'a Mutex<HashSet<EnvelopeId>>, EnvelopeId);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(&self.1);
        }
    }
}

impl Receiver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: AreaId,
        directory: Arc<Directory>,
        signer: Arc<SigningKey>,
        kem: Arc<KemSecretKey>,
        subject: Arc<SubjectSecret>,
        store: Store,
        audit: AuditLog,
        inbox: Arc<InboxDir>,
        policy: OpenPolicy,
    ) -> Self {
        Self {
            me,
            directory,
            signer,
            kem,
            subject,
            store,
            audit,
            inbox,
            policy,
            in_progress: Mutex::new(HashSet::new()),
            disk_full: AtomicBool::new(false),
        }
    }

    /// Finishes what a crash interrupted: publishes staged files of accepted envelopes and
    /// discards staged files nobody accepted. Run before serving.
    pub fn recover(&self) -> Result<(usize, usize), String> {
        let mut published = 0;
        let mut accepted_names = HashSet::new();
        for (id, rec) in self.store.seen_unpublished().map_err(|e| e.to_string())? {
            self.inbox
                .publish(&rec.inbox_name)
                .map_err(|e| e.to_string())?;
            let mut rec = rec;
            rec.published = true;
            self.store.put_seen(&id, &rec).map_err(|e| e.to_string())?;
            accepted_names.insert(rec.inbox_name);
            published += 1;
        }
        let mut discarded = 0;
        for name in self.inbox.staged().map_err(|e| e.to_string())? {
            if !accepted_names.contains(&name) {
                self.inbox.discard(&name).map_err(|e| e.to_string())?;
                discarded += 1;
            }
        }
        if published + discarded > 0 {
            info!(published, discarded, "inbox recovery finished");
        }
        Ok((published, discarded))
    }

    /// Handles one envelope from `peer` (the TLS-authenticated area, or this area for local
    /// delivery) and returns the encoded reply.
    pub async fn handle(&self, peer: AreaId, bytes: Vec<u8>) -> Vec<u8> {
        self.handle_at(peer, bytes, Utc::now()).await.encode()
    }

    async fn handle_at(&self, peer: AreaId, bytes: Vec<u8>, now: DateTime<Utc>) -> Reply {
        let directory = self.directory.clone();
        let verified = match crypto::verify(
            &bytes,
            &self.me,
            &peer,
            |a| directory.signing_keys(a),
            now,
            &self.policy,
        ) {
            Ok(v) => v,
            Err(e) => {
                warn!(peer = %peer, code = e.code(), "envelope refused: {e}");
                self.audit_refusal(&peer, None, e.code()).await;
                return Reply::refused(e.code(), &e.to_string(), e.is_permanent());
            }
        };
        let id = verified.header().id;
        let _guard = {
            let Ok(mut set) = self.in_progress.lock() else {
                return Reply::refused("internal", "receiver state unavailable", false);
            };
            if !set.insert(id) {
                return Reply::refused(
                    "in_progress",
                    "this envelope is being accepted on another stream",
                    false,
                );
            }
            InProgress(&self.in_progress, id)
        };
        match self.store.seen(&id) {
            Ok(Some(rec)) => return self.answer_resend(id, rec).await,
            Ok(None) => {}
            Err(e) => return self.transient(&e.to_string(), e.is_disk_full()),
        }
        let header = verified.header().clone();
        let digest = verified.digest();
        let opened = match verified.decrypt(&self.kem) {
            Ok(o) => o,
            Err(e) => {
                warn!(peer = %peer, envelope_id = %id, code = e.code(), "envelope refused: {e}");
                self.audit_refusal(&peer, Some(id), e.code()).await;
                return Reply::refused(e.code(), &e.to_string(), e.is_permanent());
            }
        };
        let referral = match Referral::from_cbor(&opened.payload) {
            Ok(r) if referral::validate(&r).is_empty() => r,
            _ => {
                warn!(peer = %peer, envelope_id = %id, "envelope refused: payload is not a valid referral");
                self.audit_refusal(&peer, Some(id), "payload_invalid").await;
                return Reply::refused(
                    "payload_invalid",
                    "payload is not a valid refex.referral.v1",
                    true,
                );
            }
        };
        match self.take(&peer, id, &header, digest, &referral, now).await {
            Ok(receipt) => {
                if self.disk_full.swap(false, Ordering::Relaxed) {
                    info!("inbox and state volumes writable again; receipts resume");
                }
                Reply::Receipt(receipt)
            }
            Err(e) => self.transient(&e.to_string(), e.is_disk_full()),
        }
    }

    async fn take(
        &self,
        peer: &AreaId,
        id: EnvelopeId,
        header: &crate::core::envelope::Header,
        digest: [u8; 32],
        referral: &Referral,
        now: DateTime<Utc>,
    ) -> Result<Vec<u8>, TakeError> {
        // Named from the (signed) envelope, not the arrival time: if an accepted envelope were ever
        // delivered again, it would replace its own file rather than add a second one.
        let name = inbox_name(header.created, &id.to_string()).map_err(TakeError::Inbox)?;
        let delivery = Delivery {
            envelope_id: id.to_string(),
            from_area: header.from.to_string(),
            to_area: header.to.to_string(),
            received_at: now,
            priority: header.priority,
            due_by: header.due_by,
        };
        let doc = referral::inbox_document(referral, &delivery);
        let inbox = self.inbox.clone();
        let staged_name = name.clone();
        tokio::task::spawn_blocking(move || inbox.stage(&staged_name, &doc))
            .await
            .map_err(|_| TakeError::Join)??;
        crate::core::failpoint::hit("receiver_after_stage");

        let subject = self
            .subject
            .key(&referral.source_system, &referral.source_ref);
        let head = self
            .audit
            .record(
                Event::new(
                    Operation::Collection,
                    Actor::Peer(peer.clone()),
                    Outcome::Ok,
                )
                .envelope(id)
                .route(&header.from, &header.to)
                .digest(digest)
                .subject(subject.clone())
                .source_system(&referral.source_system)
                .priority(header.priority),
            )
            .await?;
        let body = ReceiptBody {
            v: 1,
            envelope_id: id,
            envelope_sha256: digest,
            receiver: self.me.clone(),
            received_at: now,
            status: ReceiptStatus::Delivered,
            audit_head: head.to_string(),
        };
        let receipt = crypto::sign_receipt(&body, &self.signer).to_bytes();
        let rec = SeenRecord {
            v: 1,
            from: peer.clone(),
            received_at: now.timestamp(),
            inbox_name: name.clone(),
            published: false,
            receipt: serde_bytes::ByteBuf::from(receipt.clone()),
        };
        self.store.put_seen(&id, &rec)?;
        self.store.durable().await?;
        crate::core::failpoint::hit("receiver_after_seen");

        let inbox = self.inbox.clone();
        tokio::task::spawn_blocking(move || inbox.publish(&name))
            .await
            .map_err(|_| TakeError::Join)??;
        self.store.put_seen(
            &id,
            &SeenRecord {
                published: true,
                ..rec
            },
        )?;
        self.audit
            .record(
                Event::new(Operation::Disclosure, Actor::System, Outcome::Ok)
                    .envelope(id)
                    .route(&header.from, &header.to)
                    .digest(digest)
                    .subject(subject)
                    .source_system(&referral.source_system)
                    .reason("written_to_inbox"),
            )
            .await?;
        crate::core::failpoint::hit("receiver_before_reply");
        info!(peer = %peer, envelope_id = %id, priority = %header.priority, "referral delivered to inbox");
        Ok(receipt)
    }

    /// A re-send of an envelope already accepted: make sure its file is published, then answer
    /// with the original receipt.
    async fn answer_resend(&self, id: EnvelopeId, rec: SeenRecord) -> Reply {
        if !rec.published {
            let inbox = self.inbox.clone();
            let name = rec.inbox_name.clone();
            match tokio::task::spawn_blocking(move || inbox.publish(&name)).await {
                Ok(Ok(())) => {
                    let _ = self.store.put_seen(
                        &id,
                        &SeenRecord {
                            published: true,
                            ..rec.clone()
                        },
                    );
                }
                Ok(Err(e)) => return self.transient(&e.to_string(), e.is_disk_full()),
                Err(_) => return self.transient("background task failed", false),
            }
        }
        info!(envelope_id = %id, "re-sent envelope answered with its original receipt");
        Reply::Receipt(rec.receipt.into_vec())
    }

    fn transient(&self, msg: &str, disk_full: bool) -> Reply {
        if disk_full {
            if !self.disk_full.swap(true, Ordering::Relaxed) {
                error!("inbox, state or audit volume is full: receipts are withheld until space returns");
            }
            return Reply::refused(
                "disk_full",
                "receiving node is out of disk space; retry later",
                false,
            );
        }
        error!("cannot accept envelope now: {msg}");
        Reply::refused(
            "receiver_unavailable",
            "receiving node cannot accept now; retry later",
            false,
        )
    }

    async fn audit_refusal(&self, peer: &AreaId, id: Option<EnvelopeId>, code: &str) {
        let mut ev = Event::new(
            Operation::Refusal,
            Actor::Peer(peer.clone()),
            Outcome::Refused,
        )
        .reason(code);
        if let Some(id) = id {
            ev = ev.envelope(id);
        }
        if let Err(e) = self.audit.record(ev).await {
            error!("audit record of a refusal failed: {e}");
        }
    }
}
