//! The receiving side: verify an envelope, deduplicate, write the referral into the inbox
//! exactly once, and answer with a signed receipt.
//!
//! One envelope moves through explicit states, one type each (as a TLS handshake does), so
//! every crash point below is a named state in the code:
//!
//! | state | made by | a crash here leaves |
//! |---|---|---|
//! | [`Arrived`] | the transport | nothing |
//! | [`Verified`] | size, decode, recipient, sender = TLS peer, signature, clock window | nothing; a refusal is audited |
//! | [`Fresh`] | claimed (one stream per id at a time) and not seen before — a re-send of an accepted id gets the ORIGINAL receipt (its file published first), never a second inbox file | nothing |
//! | [`Opened`] | decrypted, decoded, re-validated; and not a referral this sender already delivered in another envelope (same HMAC of source system + reference) — such a one is audited and answered with a signed `Duplicate` receipt, with no second inbox file | nothing; a refusal is audited |
//! | [`Staged`] | `.NAME.tmp` written and fsynced (invisible to consumers), while the records below are written | a staged file with no `seen` record: discarded at start; the sender re-sends |
//! | [`Recorded`] | `collection` and `disclosure` (to the local inbox) audited and durable (write-ahead), receipt signed over the new chain head | as above; the records describe an acceptance the re-send completes |
//! | [`Accepted`] | `seen` record with the receipt, store synced | at start (or on re-send) the staged file is published, because the record says it was accepted |
//! | [`Published`] | renamed to NAME, directory fsynced (one sync for the files published at once, on the inbox publisher's thread); then the receipt is sent | the sender re-sends; `Fresh` answers with the original receipt |
//!
//! A receipt therefore always means "durably in this area's inbox, and recorded".
//! Staging and recording run at the same time (neither is visible until the `seen` record
//! accepts the envelope, so their order does not matter; the envelope waits for one sync
//! instead of two in a row) and both must succeed before [`Accepted`]: a crash, or a refusal
//! (disk full) of one of them, leaves a staged file nobody accepted or records of an acceptance
//! the re-send completes (and records again), as in the table.
//! Disk full from `Staged` to `Published`: the envelope is refused as transient (no receipt),
//! logged once until space returns; the sender retries later. Nothing half-written is visible.
//! Must not: block other envelopes while one is slow (each runs on its own stream task), or
//! accept two copies of the same id at once (an in-progress set refuses the second, transiently).
//!
//! Dedup is keyed by (sending area, envelope id), and a re-send must be the same bytes: the same
//! id from the same sender with another digest is refused as `replay_mismatch` (audited) and is
//! never answered with the stored receipt. An envelope no key of its sender in the directory
//! verifies, but which is otherwise intact (it decrypts), is refused as `unknown_signing_key`,
//! transient: the sender retries, and it is accepted once a reload lists the key. A tampered
//! envelope stays `bad_signature`, permanent.
//! Refusal audit records are aggregated per (peer, rule) per minute: the first is written at
//! once, later ones in that minute become one record with a `count` when the minute ends (or at
//! shutdown), so a hostile peer cannot fill the audit volume. Framing violations the transport
//! refuses before an envelope exists (`frame_oversize`, `frame_truncated`, `frame_trailing`)
//! come in through [`Receiver::frame_violation`] and are aggregated the same way.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use crate::adapters::audit::{Actor, Event, Operation, Outcome, SubjectKey};
use crate::adapters::inbox_dir::{inbox_name, InboxError};
use crate::adapters::store::{SeenRecord, StoreError};
use crate::core::envelope::{Header, ReceiptBody, ReceiptStatus, Reply};
use crate::core::referral::{self, Delivery, Referral};
use crate::core::types::{AreaId, EnvelopeId};
use crate::crypto::{self, VerifiedEnvelope};
use crate::node::build::Node;

/// The receiving side of one node.
pub struct Receiver {
    node: Arc<Node>,
    in_progress: Mutex<HashSet<(AreaId, EnvelopeId)>>,
    disk_full: AtomicBool,
    refusals: Mutex<RefusalWindows>,
}

/// Refusals per (peer, rule) in the current minute: the first is recorded at once, the rest
/// only counted (see the module doc).
#[derive(Debug, Default)]
pub struct RefusalWindows {
    open: HashMap<(AreaId, String), (i64, u64)>,
}

impl RefusalWindows {
    /// Notes one refusal in `minute`. Returns whether to record it now (the first of its
    /// minute), and the count of an earlier minute of the same (peer, rule) that it ends.
    pub fn note(&mut self, peer: &AreaId, rule: &str, minute: i64) -> (bool, Option<u64>) {
        match self.open.get_mut(&(peer.clone(), rule.to_owned())) {
            Some((m, n)) if *m == minute => {
                *n += 1;
                (false, None)
            }
            Some((m, n)) => {
                let ended = (*n > 0).then_some(*n);
                (*m, *n) = (minute, 0);
                (true, ended)
            }
            None => {
                self.open
                    .insert((peer.clone(), rule.to_owned()), (minute, 0));
                (true, None)
            }
        }
    }

    /// Removes the windows of minutes before `now_minute` (all of them when `None`), returning
    /// those that counted refusals beyond their first: (peer, rule, count).
    pub fn ended(&mut self, now_minute: Option<i64>) -> Vec<(AreaId, String, u64)> {
        let mut out = Vec::new();
        self.open.retain(|(peer, rule), (m, n)| {
            if now_minute.is_some_and(|now| *m >= now) {
                return true;
            }
            if *n > 0 {
                out.push((peer.clone(), rule.clone(), *n));
            }
            false
        });
        out
    }
}

/// Bytes from a peer (or from this node, for local delivery), not yet checked.
pub struct Arrived {
    pub peer: AreaId,
    pub bytes: Vec<u8>,
    pub now: DateTime<Utc>,
}

/// Signature, sender and clock window checked.
pub struct Verified {
    peer: AreaId,
    envelope: VerifiedEnvelope,
    now: DateTime<Utc>,
}

/// Claimed by this stream and never accepted before. Dropping it releases the claim.
pub struct Fresh<'a> {
    verified: Verified,
    _claim: Claim<'a>,
}

/// Decrypted, decoded and re-validated.
pub struct Opened<'a> {
    peer: AreaId,
    header: Header,
    digest: [u8; 32],
    referral: Referral,
    now: DateTime<Utc>,
    _claim: Claim<'a>,
}

/// The inbox file is staged (`.NAME.tmp`, fsynced).
pub struct Staged<'a> {
    opened: Opened<'a>,
    name: String,
}

/// Collection and disclosure are durable in the audit log; the receipt is signed.
pub struct Recorded<'a> {
    staged: Staged<'a>,
    receipt: Vec<u8>,
}

/// The `seen` record (with the receipt) is durable: the envelope is accepted.
pub struct Accepted<'a> {
    recorded: Recorded<'a>,
    seen: SeenRecord,
}

/// The inbox file is visible under its final name; the receipt may go.
pub struct Published {
    receipt: Vec<u8>,
}

/// Holds an id in the in-progress set while one stream handles it.
struct Claim<'a>(
    &'a Mutex<HashSet<(AreaId, EnvelopeId)>>,
    (AreaId, EnvelopeId),
);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(&self.1);
        }
    }
}

/// The answer a state gives instead of moving on.
type Step<T> = Result<T, Reply>;

impl Receiver {
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            node,
            in_progress: Mutex::new(HashSet::new()),
            disk_full: AtomicBool::new(false),
            refusals: Mutex::new(RefusalWindows::default()),
        }
    }

    /// Finishes what a crash interrupted: publishes staged files of accepted envelopes and
    /// discards staged files nobody accepted. Run before serving.
    pub fn recover(&self) -> Result<(usize, usize), String> {
        let (store, inbox) = (&self.node.store, &self.node.inbox);
        let mut published = 0;
        let mut accepted_names = HashSet::new();
        for (id, rec) in store.seen_unpublished().map_err(|e| e.to_string())? {
            inbox.publish(&rec.inbox_name).map_err(|e| e.to_string())?;
            let mut rec = rec;
            rec.published = true;
            store.put_seen(&id, &rec).map_err(|e| e.to_string())?;
            accepted_names.insert(rec.inbox_name);
            published += 1;
        }
        let mut discarded = 0;
        for name in inbox.staged().map_err(|e| e.to_string())? {
            if !accepted_names.contains(&name) {
                inbox.discard(&name).map_err(|e| e.to_string())?;
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
        crate::node::metrics::received(&peer);
        let arrived = Arrived {
            peer,
            bytes,
            now: Utc::now(),
        };
        self.receive(arrived).await.encode()
    }

    /// Walks one envelope through every state; any state may answer instead of moving on.
    pub async fn receive(&self, arrived: Arrived) -> Reply {
        let walk = async {
            let verified = self.verify(arrived).await?;
            let fresh = self.claim(verified).await?;
            let opened = self.open(fresh).await?;
            let recorded = self.stage_and_record(opened).await?;
            let accepted = self.accept(recorded).await?;
            self.publish(accepted).await
        };
        match walk.await {
            Ok(Published { receipt }) => {
                if self.disk_full.swap(false, Ordering::Relaxed) {
                    info!("inbox and state volumes writable again; receipts resume");
                }
                Reply::Receipt(receipt)
            }
            Err(reply) => reply,
        }
    }

    async fn verify(&self, a: Arrived) -> Step<Verified> {
        let directory = self.node.directory();
        match crypto::verify(
            &a.bytes,
            self.node.me(),
            &a.peer,
            |area| directory.signing_keys(area),
            a.now,
            &self.node.settings.limits.open,
        ) {
            Ok(envelope) => Ok(Verified {
                peer: a.peer,
                envelope,
                now: a.now,
            }),
            Err(e @ (crypto::OpenError::UnknownSender(_) | crypto::OpenError::BadSignature))
                if crypto::intact_but_unknown_signer(&a.bytes, &self.node.kem) =>
            {
                let code = "unknown_signing_key";
                warn!(peer = %a.peer, code, "envelope refused until the directory lists its signing key: {e}");
                self.audit_refusal(&a.peer, None, code).await;
                Err(Reply::refused(
                    code,
                    "no signing key of the sender in this node's directory verifies the envelope; retry after the directory is reloaded",
                    false,
                ))
            }
            Err(e) => {
                warn!(peer = %a.peer, code = e.code(), "envelope refused: {e}");
                self.audit_refusal(&a.peer, None, e.code()).await;
                Err(Reply::refused(e.code(), &e.to_string(), e.is_permanent()))
            }
        }
    }

    async fn claim(&self, v: Verified) -> Step<Fresh<'_>> {
        let id = v.envelope.header().id;
        let key = (v.peer.clone(), id);
        let claim = {
            let Ok(mut set) = self.in_progress.lock() else {
                return Err(Reply::refused(
                    "internal",
                    "receiver state unavailable",
                    false,
                ));
            };
            if !set.insert(key.clone()) {
                return Err(Reply::refused(
                    "in_progress",
                    "this envelope is being accepted on another stream",
                    false,
                ));
            }
            Claim(&self.in_progress, key)
        };
        match self.node.store.seen(&v.peer, &id) {
            Ok(Some(rec)) => match receipt_digest(&rec.receipt) {
                Some(d) if d == v.envelope.digest() => Err(self.answer_resend(id, rec).await),
                Some(_) => {
                    warn!(peer = %v.peer, envelope_id = %id, "envelope refused: an accepted id re-sent with different bytes");
                    self.audit_refusal(&v.peer, Some(id), "replay_mismatch")
                        .await;
                    Err(Reply::refused(
                        "replay_mismatch",
                        "this envelope id was accepted with different content",
                        true,
                    ))
                }
                None => Err(self.transient("stored receipt does not decode", false)),
            },
            Ok(None) => Ok(Fresh {
                verified: v,
                _claim: claim,
            }),
            Err(e) => Err(self.transient(&e.to_string(), e.is_disk_full())),
        }
    }

    async fn open<'a>(&self, f: Fresh<'a>) -> Step<Opened<'a>> {
        let Verified {
            peer,
            envelope,
            now,
        } = f.verified;
        let header = envelope.header().clone();
        let digest = envelope.digest();
        let id = header.id;
        let opened = match envelope.decrypt(&self.node.kem) {
            Ok(o) => o,
            Err(e) => {
                warn!(peer = %peer, envelope_id = %id, code = e.code(), "envelope refused: {e}");
                self.audit_refusal(&peer, Some(id), e.code()).await;
                return Err(Reply::refused(e.code(), &e.to_string(), e.is_permanent()));
            }
        };
        match Referral::from_cbor(&opened.payload) {
            Ok(referral) if referral::validate(&referral).is_empty() => {
                let o = Opened {
                    peer,
                    header,
                    digest,
                    referral,
                    now,
                    _claim: f._claim,
                };
                self.check_not_delivered(&o).await?;
                Ok(o)
            }
            _ => {
                warn!(peer = %peer, envelope_id = %id, "envelope refused: payload is not a valid referral");
                self.audit_refusal(&peer, Some(id), "payload_invalid").await;
                Err(Reply::refused(
                    "payload_invalid",
                    "payload is not a valid refex.referral.v1",
                    true,
                ))
            }
        }
    }

    /// Stages the inbox file and writes the collection and disclosure records at the same
    /// time: neither is visible to anyone until the `seen` record accepts the envelope, so
    /// their order does not matter, and the envelope waits for one sync instead of two in a
    /// row. Both must succeed before the `seen` record is written.
    async fn stage_and_record<'a>(&self, o: Opened<'a>) -> Step<Recorded<'a>> {
        let (name, receipt) = {
            let (staged, recorded) = tokio::join!(self.stage(&o), self.record(&o));
            (staged?, recorded?)
        };
        Ok(Recorded {
            staged: Staged { opened: o, name },
            receipt,
        })
    }

    /// Writes and syncs `.NAME.tmp`; returns NAME.
    async fn stage(&self, o: &Opened<'_>) -> Step<String> {
        // Named from the (signed) envelope, not the arrival time: if an accepted envelope were
        // ever delivered again, it would replace its own file rather than add a second one.
        let name = inbox_name(o.header.created, &o.header.id.to_string())
            .map_err(|e| self.transient(&e.to_string(), e.is_disk_full()))?;
        let delivery = Delivery {
            envelope_id: o.header.id.to_string(),
            from_area: o.header.from.to_string(),
            to_area: o.header.to.to_string(),
            received_at: o.now,
            priority: o.header.priority,
            due_by: o.header.due_by,
        };
        let doc = referral::inbox_document(&o.referral, &delivery);
        let inbox = self.node.inbox.clone();
        let staged_name = name.clone();
        self.blocking(move || inbox.stage(&staged_name, &doc))
            .await?;
        crate::core::failpoint::hit("receiver_after_stage");
        Ok(name)
    }

    /// Writes collection and disclosure (and a late arrival) durably; returns the receipt,
    /// signed over the audit head that covers them.
    async fn record(&self, o: &Opened<'_>) -> Step<Vec<u8>> {
        let collection = self
            .event(
                o,
                Operation::Collection,
                Actor::Peer(o.peer.clone()),
                Outcome::Ok,
            )
            .priority(o.header.priority);
        let disclosure = self
            .event(o, Operation::Disclosure, Actor::System, Outcome::Ok)
            .reason("written_to_inbox");
        // One job: the writer commits them with one write and sync, all or none; the receipt is
        // signed over the head after the last (write-ahead: recorded before it takes effect).
        let mut records = vec![collection, disclosure];
        if o.header.due_by < o.now {
            warn!(peer = %o.peer, envelope_id = %o.header.id, due_by = %o.header.due_by.to_rfc3339(), "referral arrived after its due_by");
            records.push(
                self.event(o, Operation::Deadline, Actor::System, Outcome::Failed)
                    .priority(o.header.priority)
                    .reason("late_arrival"),
            );
        }
        let head = self
            .node
            .audit
            .record_all(records)
            .await
            .map_err(|e| self.transient(&e.to_string(), e.is_disk_full()))?;
        Ok(self.sign(o, ReceiptStatus::Delivered, &head))
    }

    async fn accept<'a>(&self, r: Recorded<'a>) -> Step<Accepted<'a>> {
        let o = &r.staged.opened;
        let seen = SeenRecord {
            v: 1,
            from: o.peer.clone(),
            received_at: o.now.timestamp(),
            inbox_name: r.staged.name.clone(),
            published: false,
            receipt: serde_bytes::ByteBuf::from(r.receipt.clone()),
        };
        let store = &self.node.store;
        let subject = self.subject_of(o).to_string();
        self.write_durably(|| {
            store.put_seen(&o.header.id, &seen)?;
            store.remember_referral(&o.peer, &subject, &o.header.id, o.now)
        })
        .await?;
        crate::core::failpoint::hit("receiver_after_seen");
        Ok(Accepted { recorded: r, seen })
    }

    async fn publish(&self, a: Accepted<'_>) -> Step<Published> {
        let Accepted { recorded, seen } = a;
        let o = &recorded.staged.opened;
        let id = o.header.id;
        self.publish_file(recorded.staged.name.clone()).await?;
        let published = SeenRecord {
            published: true,
            ..seen
        };
        if let Err(e) = self.node.store.put_seen(&id, &published) {
            return Err(self.transient(&e.to_string(), e.is_disk_full()));
        }
        crate::core::failpoint::hit("receiver_before_reply");
        info!(peer = %o.peer, envelope_id = %id, priority = %o.header.priority, "referral delivered to inbox");
        Ok(Published {
            receipt: recorded.receipt,
        })
    }

    /// The end-to-end check: a *different* envelope carrying a referral this area already
    /// delivered from the same sender (same HMAC of source system + reference) is answered with
    /// a signed `Duplicate` receipt, audited, and writes no second inbox file.
    async fn check_not_delivered(&self, o: &Opened<'_>) -> Step<()> {
        let subject = self.subject_of(o);
        let store = &self.node.store;
        let original = match store.delivered_referral(&o.peer, &subject.to_string()) {
            Ok(Some(orig)) if orig != o.header.id => orig,
            Ok(_) => return Ok(()),
            Err(e) => return Err(self.transient(&e.to_string(), e.is_disk_full())),
        };
        let ev = self
            .event(
                o,
                Operation::Refusal,
                Actor::Peer(o.peer.clone()),
                Outcome::Refused,
            )
            .reason("duplicate_referral");
        let head = match self.node.audit.record(ev).await {
            Ok(h) => h,
            Err(e) => return Err(self.transient(&e.to_string(), e.is_disk_full())),
        };
        let receipt = self.sign(o, ReceiptStatus::Duplicate, &head);
        let inbox_name = match store.seen(&o.peer, &original) {
            Ok(Some(rec)) if rec.from == o.peer => rec.inbox_name,
            _ => String::new(),
        };
        let seen = SeenRecord {
            v: 1,
            from: o.peer.clone(),
            received_at: o.now.timestamp(),
            inbox_name,
            published: true,
            receipt: serde_bytes::ByteBuf::from(receipt.clone()),
        };
        self.write_durably(|| store.put_seen(&o.header.id, &seen))
            .await?;
        warn!(peer = %o.peer, envelope_id = %o.header.id, original = %original, "referral already delivered by another envelope; answered as a duplicate, no second inbox file");
        Err(Reply::Receipt(receipt))
    }

    fn sign(
        &self,
        o: &Opened<'_>,
        status: ReceiptStatus,
        head: &crate::core::audit::Head,
    ) -> Vec<u8> {
        let body = ReceiptBody {
            v: 1,
            envelope_id: o.header.id,
            envelope_sha256: o.digest,
            receiver: self.node.me().clone(),
            received_at: o.now,
            status,
            audit_head: head.to_string(),
        };
        crypto::sign_receipt(&body, &self.node.signer).to_bytes()
    }

    /// An audit event about an opened envelope: its id, route, digest, subject and source.
    fn event(&self, o: &Opened<'_>, op: Operation, actor: Actor, outcome: Outcome) -> Event {
        Event::new(op, actor, outcome)
            .envelope(o.header.id)
            .route(&o.header.from, &o.header.to)
            .digest(o.digest)
            .subject(self.subject_of(o))
            .source_system(&o.referral.source_system)
    }

    fn subject_of(&self, o: &Opened<'_>) -> SubjectKey {
        self.node
            .subject
            .key(&o.referral.source_system, &o.referral.source_ref)
    }

    /// Writes to the store, then syncs it; a failure of either is a transient refusal.
    async fn write_durably(&self, write: impl FnOnce() -> Result<(), StoreError>) -> Step<()> {
        let synced = match write() {
            Ok(()) => self.node.store.durable().await,
            Err(e) => Err(e),
        };
        synced.map_err(|e| self.transient(&e.to_string(), e.is_disk_full()))
    }

    /// Runs a blocking inbox operation off the runtime; errors become transient refusals.
    async fn blocking(
        &self,
        f: impl FnOnce() -> Result<(), InboxError> + Send + 'static,
    ) -> Step<()> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.transient(&e.to_string(), e.is_disk_full())),
            Err(_) => Err(self.transient("background task failed", false)),
        }
    }

    /// Publishes `name` on the inbox publisher's thread; errors become transient refusals.
    async fn publish_file(&self, name: String) -> Step<()> {
        self.node
            .inbox_publisher
            .publish(name)
            .await
            .map_err(|e| self.transient(&e.to_string(), e.is_disk_full()))
    }

    /// A re-send of an envelope already accepted: make sure its file is published, then answer
    /// with the original receipt.
    async fn answer_resend(&self, id: EnvelopeId, rec: SeenRecord) -> Reply {
        if !rec.published {
            if let Err(reply) = self.publish_file(rec.inbox_name.clone()).await {
                return reply;
            }
            let _ = self.node.store.put_seen(
                &id,
                &SeenRecord {
                    published: true,
                    ..rec.clone()
                },
            );
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

    /// Records a refusal, aggregated per (peer, rule) per minute (see the module doc).
    async fn audit_refusal(&self, peer: &AreaId, id: Option<EnvelopeId>, code: &str) {
        crate::node::metrics::refused(&[code]);
        let minute = Utc::now().timestamp().div_euclid(60);
        let (now, ended) = match self.refusals.lock() {
            Ok(mut w) => w.note(peer, code, minute),
            Err(_) => (true, None),
        };
        if let Some(n) = ended {
            self.write_refusal(peer, None, code, Some(n)).await;
        }
        if now {
            self.write_refusal(peer, id, code, None).await;
        }
    }

    /// Audits a framing violation the transport refused on a stream of `peer` (the
    /// TLS-authenticated area): aggregated like every other refusal, so a flood of broken
    /// frames costs at most two records per (peer, rule) and minute.
    pub async fn frame_violation(&self, peer: &AreaId, rule: &str) {
        self.audit_refusal(peer, None, rule).await;
    }

    /// Writes the aggregated records of ended minutes (every open one when `all`, at shutdown).
    pub async fn flush_refusals(&self, all: bool) {
        let minute = Utc::now().timestamp().div_euclid(60);
        let ended = match self.refusals.lock() {
            Ok(mut w) => w.ended((!all).then_some(minute)),
            Err(_) => return,
        };
        for (peer, code, n) in ended {
            self.write_refusal(&peer, None, &code, Some(n)).await;
        }
    }

    async fn write_refusal(
        &self,
        peer: &AreaId,
        id: Option<EnvelopeId>,
        code: &str,
        count: Option<u64>,
    ) {
        let mut ev = Event::new(
            Operation::Refusal,
            Actor::Peer(peer.clone()),
            Outcome::Refused,
        )
        .reason(code);
        if let Some(id) = id {
            ev = ev.envelope(id);
        }
        if let Some(n) = count {
            ev = ev.count(n);
        }
        if let Err(e) = self.node.audit.record(ev).await {
            error!("audit record of a refusal failed: {e}");
        }
    }
}

/// The envelope digest a stored receipt names (`None` if it does not decode).
fn receipt_digest(receipt: &[u8]) -> Option<[u8; 32]> {
    let signed = crate::core::envelope::SignedReceipt::decode(receipt).ok()?;
    let body = ReceiptBody::decode(&signed.body).ok()?;
    Some(body.envelope_sha256)
}

#[cfg(test)]
mod tests {
    use super::RefusalWindows;

    #[test]
    fn a_hundred_refusals_in_a_minute_are_two_records_with_the_count() {
        let mut w = RefusalWindows::default();
        let (peer, other) = ("kent".parse().unwrap(), "essex".parse().unwrap());
        let mut written = Vec::new();
        for _ in 0..100 {
            let (now, ended) = w.note(&peer, "decode", 1000);
            if now {
                written.push(None);
            }
            written.extend(ended.map(Some));
        }
        assert_eq!(w.ended(Some(1000)), vec![], "the minute has not ended");
        written.extend(w.ended(Some(1001)).into_iter().map(|(_, _, n)| Some(n)));
        assert_eq!(written, vec![None, Some(99)]);
        // Another peer or rule is its own window; a new minute records its first at once.
        assert_eq!(w.note(&other, "decode", 1001), (true, None));
        assert_eq!(w.note(&peer, "stale", 1001), (true, None));
        assert_eq!(w.note(&peer, "stale", 1001), (false, None));
        assert_eq!(w.note(&peer, "stale", 1002), (true, Some(1)));
        assert_eq!(
            w.ended(None).len(),
            0,
            "nothing beyond the firsts is pending"
        );
    }
}
