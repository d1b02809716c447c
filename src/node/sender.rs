//! The sending side: one worker per peer drains that peer's queue in priority order, many
//! envelopes in flight at once, and stores each signed receipt. Enhanced envelopes go first and
//! alone: no standard one is sent while an enhanced one is in flight, so a backlog also arrives
//! in priority order.
//!
//! Per envelope, write-ahead (each record durable before what it records takes effect):
//! audit `disclosure` (transferred) → send → receipt verified against the peer's signing key,
//! envelope id and the SHA-256 of exactly the bytes we sent → `store_receipt_durably` (state
//! `ReceiptStored`: out of the queue, never sent again; applied and synced by the store's
//! committer with the other receipts of its round) → audit `receipt` (with the peer's audit
//! head, so our log witnesses theirs) and `erasure`, handed over together (one sync) →
//! `mark_delivered_soon` (payload erased by the committer's next round, not awaited: a crash
//! before it is completed at start-up like any `ReceiptStored` envelope). When the transfer record cannot be written nothing is sent. A crash before the
//! receipt's sync leaves the envelope queued: it is sent again and the receiver answers with
//! the original receipt, so nothing is duplicated (its transfer is then recorded twice, both
//! before any erasure). A crash after it leaves a `ReceiptStored` envelope, which the peer's
//! worker completes at start-up: it writes the receipt and erasure records the log does not
//! already name, then erases — so nothing is recorded about an envelope after its erasure.
//! Failures: a transient one (peer down, timeout, peer out of disk) backs the whole peer off
//! (capped exponential backoff with jitter) and blocks no other peer; the back-off ends early
//! when the peer connects to us (it is up: a starting node dials every peer once, so a backlog
//! starts to drain within a handshake of the peer's return, not `retry_max_ms` later); a permanent refusal (the
//! peer says the envelope can never be accepted) marks it non-delivered for an operator, at ERROR.
//! Must not: drop an envelope, or hold more than `max_in_flight_per_peer` in memory per peer
//! (nor more than `max_in_flight_total` for all peers together, except a peer that is the only
//! one busy, which may fill its own window — [`crate::node::slots`]: a send holds a node-wide
//! slot; a worker left without one waits, fairly, in the order they asked, for the next
//! [`SLOT_GROUP`] that free, so a peer's sends leave together rather than one by one).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::adapters::audit::{Actor, Event, Operation, Outcome};
use crate::adapters::store::OutRecord;
use crate::adapters::transport::{PeerAddr, Transport};
use crate::core::envelope::Reply;
use crate::core::types::{AreaId, EnvelopeId, PriorityClass};
use crate::crypto;
use crate::node::build::Node;
use crate::node::receiver::Receiver;

/// How one send ended.
#[derive(Debug)]
enum SendOutcome {
    Delivered,
    /// Try again later; the peer is backed off.
    Transient(String),
    /// The peer will never accept this envelope.
    Permanent(String),
    /// The envelope left the queue (non-delivered, withdrawn) before it was sent.
    Skipped,
    /// The receipt is stored (the envelope is out of its queue) but its records or the erasure
    /// failed: the worker completes it once its backoff ends.
    ReceiptPending(String),
}

/// Shared by all peer workers: the node, the transport, and the local receiving side.
pub struct SenderContext {
    pub node: Arc<Node>,
    pub transport: Transport,
    /// Local delivery (to == me) goes straight to the receiving side, no network hop.
    pub local: Arc<Receiver>,
}

/// Drains one peer's queue.
pub struct PeerWorker {
    pub ctx: Arc<SenderContext>,
    pub peer: AreaId,
    pub wake: Arc<Notify>,
    /// This peer's envelopes left `ReceiptStored` by a crash, when the caller has already
    /// scanned the store once for every peer (`run` does, so 42 workers do not each scan it);
    /// `None`: the worker scans for itself.
    pub stored: Option<Vec<(EnvelopeId, OutRecord)>>,
}

impl PeerWorker {
    /// Runs until `shutdown`; then lets in-flight sends finish for at most `grace`.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let span = tracing::info_span!("peer", peer = %self.peer);
        self.run_inner(shutdown, grace).instrument(span).await
    }

    async fn run_inner(mut self, shutdown: CancellationToken, grace: Duration) {
        // Receipts stored before a crash (or whose completion failed) are completed, never
        // re-sent: first at start, then after a failure once the backoff ends.
        let mut resume = true;
        let mut in_flight: HashSet<EnvelopeId> = HashSet::new();
        // The enhanced envelopes among them.
        let mut enhanced: HashSet<EnvelopeId> = HashSet::new();
        let mut task_ids: HashMap<tokio::task::Id, EnvelopeId> = HashMap::new();
        let mut tasks: JoinSet<(EnvelopeId, SendOutcome)> = JoinSet::new();
        let mut failures: u32 = 0;
        let mut backoff_until: Option<Instant> = None;
        let max = self.ctx.node.settings.delivery.max_in_flight_per_peer.get() as usize;
        let slots = self.ctx.node.send_slots.clone();
        // Busy while it has sends in flight or waits for a slot (see `node::slots`).
        let mut busy = slots.mark();
        let total = self.ctx.node.settings.delivery.max_in_flight_total.get() as usize;
        // Node-wide slots taken while waiting for them, used by the next sends.
        let mut spare: Option<tokio::sync::OwnedSemaphorePermit> = None;
        // Queued envelopes were left unsent for want of a node-wide slot.
        let mut starved = false;
        let beat = self
            .ctx
            .node
            .heartbeats
            .register(&format!("sender {}", self.peer));
        loop {
            beat.beat();
            if shutdown.is_cancelled() {
                break;
            }
            let mut backing_off = backoff_until.is_some_and(|t| t > Instant::now());
            // The peer connected to us: it is up, so a back-off after failed sends ends now
            // (the failure count stays, so a peer that connects but refuses cannot make us
            // retry faster than it connects).
            if self.ctx.node.take_peer_connected(&self.peer) && failures > 0 && backing_off {
                info!(
                    after_failures = failures,
                    "peer connected to us; retrying now"
                );
                backoff_until = None;
                backing_off = false;
            }
            if backing_off {
                // A node-wide slot is not held through a back-off.
                spare = None;
            }
            // Busy: sends in flight, or waiting for a slot (not through a back-off).
            busy.set(!in_flight.is_empty() || (starved && !backing_off));
            // Only with no send in flight: a send between storing its receipt and writing its
            // records would otherwise have that envelope's records written twice (by it and by
            // the resume, which finds its receipt stored).
            if resume && !backing_off && tasks.is_empty() {
                let known = self.stored.take();
                resume = complete_stored_receipts(&self.ctx, &self.peer, known).await > 0;
                if resume {
                    backoff_until = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            // While stored receipts wait to be completed, nothing new is sent: they go first
            // (and the sends in flight drain, so the resume can run).
            if !backing_off && !resume && in_flight.len() < max {
                let room = max - in_flight.len();
                // No more is read than the free node-wide slots can send now (at least one, to
                // learn whether anything waits): what is read beyond them is decoded and
                // dropped, and with 42 peers sharing 64 slots a worker woken for one slot read
                // its whole queue for each send (~20 % of a national node's CPU).
                // Busy while it reads, so that a peer alone may read its whole window.
                busy.set(true);
                let free = slots.available(&busy) + spare.as_ref().map_or(0, |p| p.num_permits());
                let want = room.min(free.max(1));
                match self
                    .ctx
                    .node
                    .store
                    .next_queued(&self.peer, want, &in_flight)
                {
                    Ok(batch) => {
                        starved = false;
                        // The slots limited the read: more may be queued, so wait for a slot.
                        let limited = batch.len() == want && want < room;
                        let mut held_back = false;
                        for (id, rec) in batch {
                            // Enhanced first, strictly: no standard envelope is sent while an
                            // enhanced one is still in flight, so a backlog arrives in priority
                            // order, not merely leaves in it (the batch is priority-ordered, so
                            // what is skipped here is read again once the enhanced ones finish).
                            if rec.priority != PriorityClass::Enhanced && !enhanced.is_empty() {
                                held_back = true;
                                break;
                            }
                            // Node-wide, at most `max_in_flight_total` sends at once; what is
                            // left is read again once a slot frees (the branch below waits).
                            let one = match spare.as_mut() {
                                Some(p) if p.num_permits() > 1 => p.split(1),
                                _ => spare.take(),
                            };
                            let Some(slot) = one.or_else(|| slots.try_take(&busy)) else {
                                starved = true;
                                break;
                            };
                            if rec.priority == PriorityClass::Enhanced {
                                enhanced.insert(id);
                            }
                            in_flight.insert(id);
                            let (ctx, peer) = (self.ctx.clone(), self.peer.clone());
                            let task = tasks.spawn(async move {
                                let outcome = send_one(&ctx, &peer, id, rec).await;
                                drop(slot);
                                (id, outcome)
                            });
                            task_ids.insert(task.id(), id);
                        }
                        // Held back behind enhanced sends, a slot would only be taken and given
                        // back: the finishing enhanced send wakes this worker instead.
                        if limited && !held_back {
                            starved = true;
                        }
                        // Slots waited for but not used (nothing more queued, or only standard
                        // envelopes behind an enhanced one in flight) go back at once.
                        spare = None;
                    }
                    Err(e) => {
                        error!("cannot read the queue: {e}");
                        backoff_until = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                // What the read left: sends in flight, or a wait for a slot.
                busy.set(!in_flight.is_empty() || starved);
            }
            // Never longer than a heartbeat: an idle or backing-off worker still beats.
            let beat_due = Instant::now() + crate::node::heartbeat::BEAT_EVERY;
            let sleep_until = match backoff_until {
                Some(t) if t > Instant::now() => t.min(beat_due),
                _ => beat_due,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Ok(slot) = slots.shared().acquire_many_owned(slot_group(total, max.saturating_sub(in_flight.len()))), if starved && spare.is_none() && !backing_off => {
                    spare = Some(slot);
                    starved = false;
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (id, outcome) = match joined {
                        Ok((task, (id, outcome))) => {
                            task_ids.remove(&task);
                            (id, outcome)
                        }
                        Err(e) => {
                            // A send that panicked: its envelope stays queued and is tried again
                            // (it must not keep its in-flight slot, or hold standard ones back).
                            if let Some(id) = task_ids.remove(&e.id()) {
                                error!(envelope_id = %id, "a send task failed: {e}");
                                in_flight.remove(&id);
                                enhanced.remove(&id);
                            }
                            backoff_until = Some(Instant::now() + Duration::from_secs(1));
                            continue;
                        }
                    };
                    in_flight.remove(&id);
                    enhanced.remove(&id);
                    match outcome {
                        SendOutcome::Delivered => {
                            crate::node::metrics::delivered(&self.peer);
                            if failures > 0 {
                                info!(after_failures = failures, "peer reachable again");
                            }
                            failures = 0;
                            backoff_until = None;
                        }
                        SendOutcome::Transient(why) => {
                            crate::node::metrics::failed(&self.peer, &why);
                            let delay = self.ctx.node.backoff().delay(failures, unit_random());
                            if failures == 0 {
                                warn!(envelope_id = %id, retry_in_ms = delay.as_millis() as u64, "delivery failed, will retry: {}", crate::core::text::escape_for_log(&why));
                            } else {
                                debug!(envelope_id = %id, attempt = failures, "delivery failed again: {}", crate::core::text::escape_for_log(&why));
                            }
                            failures = failures.saturating_add(1);
                            backoff_until = Some(Instant::now() + delay);
                        }
                        SendOutcome::ReceiptPending(why) => {
                            error!(envelope_id = %id, "receipt stored but its records or erasure failed; completing it again shortly: {}", crate::core::text::escape_for_log(&why));
                            resume = true;
                            backoff_until = Some(Instant::now() + Duration::from_secs(1));
                        }
                        SendOutcome::Skipped => debug!(envelope_id = %id, "no longer queued; not sent"),
                        SendOutcome::Permanent(why) => {
                            error!(envelope_id = %id, "peer refused envelope permanently; kept as non-delivered for an operator: {}", crate::core::text::escape_for_log(&why));
                        }
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
        }
        // Park: let what is in flight finish briefly; anything unfinished stays queued.
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
    }
}

/// How many node-wide slots a worker left without one waits for at once. One at a time, 42
/// peers sharing 64 slots each sent alone: every envelope in its own datagram, its own ACK and
/// stream credit back, and each wake-up of either node found one event. Eight together leave
/// in one burst (GSO), are acknowledged together and are received, stored and receipted in the
/// same rounds. National run (43 areas × 50), seven pairs alternating with one at a time: CPU
/// per delivery −14 % (median), 0.1–0.7 fewer loopback packets and 1–3 fewer context
/// switches per delivery (README, national scale).
const SLOT_GROUP: usize = 8;

/// The slots to wait for: [`SLOT_GROUP`], but never more than the node has (`total`, or the
/// wait would never end) nor than this peer may still put in flight (`room`), and at least one.
fn slot_group(total: usize, room: usize) -> u32 {
    SLOT_GROUP.min(total).min(room).max(1) as u32
}

fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    crypto::random_bytes(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

fn still_queued(ctx: &SenderContext, id: &EnvelopeId, rec: &OutRecord) -> bool {
    matches!(ctx.node.store.is_queued(id, rec), Ok(true))
}

/// An audit event about outgoing envelope `id` to `peer`: route, payload digest, subject key.
fn envelope_event(
    ctx: &SenderContext,
    peer: &AreaId,
    id: EnvelopeId,
    rec: &OutRecord,
    op: Operation,
    actor: Actor,
) -> Event {
    let digest: [u8; 32] = rec.digest.as_slice().try_into().unwrap_or([0; 32]);
    let ev = Event::new(op, actor, Outcome::Ok)
        .envelope(id)
        .route(ctx.node.me(), peer)
        .digest(digest);
    match &rec.subject_key {
        Some(k) => ev.subject_hex(k),
        None => ev,
    }
}

/// Which of an envelope's completion records the audit log already holds.
#[derive(Default, Clone, Copy)]
struct Recorded {
    receipt: bool,
    erasure: bool,
}

/// Writes the receipt and erasure records not yet in `recorded`, then marks the envelope
/// delivered (payload erased). Write-ahead: both records are durable before the erasure (one
/// audit write and sync for the two, all or none, so the erasure record never stands without
/// the receipt record before it); an error
/// leaves the envelope in `ReceiptStored`, out of its queue. The erasure's own store sync is
/// requested, not waited for: a crash before it leaves the envelope `ReceiptStored`, which
/// start-up completes again (its records are already in the log, so none is written twice).
async fn complete(
    ctx: &SenderContext,
    peer: &AreaId,
    id: EnvelopeId,
    rec: &OutRecord,
    peer_head: &str,
    recorded: Recorded,
) -> Result<(), String> {
    let event = |op, actor| envelope_event(ctx, peer, id, rec, op, actor);
    let mut records = Vec::with_capacity(2);
    if !recorded.receipt {
        records.push(event(Operation::Receipt, Actor::Peer(peer.clone())).peer_head(peer_head));
    }
    if !recorded.erasure {
        records
            .push(event(Operation::Erasure, Actor::System).reason("payload_erased_after_receipt"));
    }
    if !records.is_empty() {
        ctx.node
            .audit
            .record_all(records)
            .await
            .map_err(|e| format!("audit unavailable: {e}"))?;
    }
    crate::core::failpoint::hit("sender_after_receipt_records");
    let receipt = rec
        .receipt
        .as_deref()
        .map(|b| b.to_vec())
        .unwrap_or_default();
    ctx.node
        .store
        .mark_delivered_soon(&id, &receipt, peer_head, Utc::now())
        .map_err(|e| format!("cannot mark delivered: {e}"))?;
    crate::core::failpoint::hit("sender_after_erasure_unsynced");
    Ok(())
}

/// Sender recovery for one peer, at its worker's start: envelopes whose receipt was stored
/// before a crash get the receipt and erasure records the log does not already hold, then are
/// marked delivered — never sent again. When the log cannot be read, the records are written
/// again: a second record is better than a missing one. Returns how many could not be
/// completed (retried later).
async fn complete_stored_receipts(
    ctx: &SenderContext,
    peer: &AreaId,
    known: Option<Vec<(EnvelopeId, OutRecord)>>,
) -> usize {
    let stored = match known.map_or_else(|| ctx.node.store.receipts_stored(peer), Ok) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot read stored receipts: {e}");
            return 1;
        }
    };
    if stored.is_empty() {
        return 0;
    }
    let mut found: std::collections::HashMap<String, Recorded> = stored
        .iter()
        .map(|(id, _)| (id.to_string(), Recorded::default()))
        .collect();
    let read = crate::adapters::audit::for_each_record(&ctx.node.settings.paths.audit, |r, _| {
        if let Some(f) = r.envelope_id.as_ref().and_then(|e| found.get_mut(e)) {
            match r.op {
                Operation::Receipt => f.receipt = true,
                Operation::Erasure => f.erasure = true,
                _ => {}
            }
        }
    });
    if let Err(e) = read {
        warn!("cannot read the audit log to resume stored receipts; recording them again: {e}");
        found.values_mut().for_each(|f| *f = Recorded::default());
    }
    let mut failed = 0;
    for (id, rec) in &stored {
        let recorded = found.get(&id.to_string()).copied().unwrap_or_default();
        let head = rec.peer_audit_head.clone().unwrap_or_default();
        info!(envelope_id = %id, receipt_recorded = recorded.receipt, erasure_recorded = recorded.erasure, "completing a receipt stored before a crash");
        match complete(ctx, peer, *id, rec, &head, recorded).await {
            Ok(()) => crate::node::metrics::delivered(peer),
            Err(e) => {
                failed += 1;
                error!(envelope_id = %id, "cannot complete a stored receipt; retried shortly: {e}");
            }
        }
    }
    failed
}

async fn send_one(
    ctx: &SenderContext,
    peer: &AreaId,
    id: EnvelopeId,
    rec: OutRecord,
) -> SendOutcome {
    let Some(sealed) = rec.sealed.as_ref() else {
        return SendOutcome::Permanent("queued envelope has no payload".into());
    };
    let directory = ctx.node.directory();
    let Some(entry) = directory.get(peer) else {
        // Removed from the directory by a reload: kept queued (not lost, not non-delivered)
        // until the area is listed again or an operator acts.
        warn!(envelope_id = %id, peer = %peer, "peer is not in the directory (removed by a reload?); envelope stays queued");
        return SendOutcome::Transient("peer is not in the directory".into());
    };
    let digest: [u8; 32] = rec.digest.as_slice().try_into().unwrap_or([0; 32]);
    let event = |op, actor| envelope_event(ctx, peer, id, &rec, op, actor);
    // Write-ahead: the transfer is on the record before the bytes leave; if it cannot be
    // written, nothing is sent (the envelope stays queued and is retried).
    let transfer = event(Operation::Disclosure, Actor::Peer(peer.clone()))
        .priority(rec.priority)
        .reason("transferred");
    let record_transfer = || async {
        ctx.node
            .audit
            .record(transfer.clone())
            .await
            .map(|_| ())
            .map_err(|e| SendOutcome::Transient(format!("audit unavailable, not sent: {e}")))
    };
    let reply_bytes = if peer == ctx.node.me() {
        if !still_queued(ctx, &id, &rec) {
            return SendOutcome::Skipped;
        }
        if let Err(o) = record_transfer().await {
            return o;
        }
        ctx.local
            .handle(ctx.node.me().clone(), sealed.to_vec())
            .await
    } else {
        let addr = PeerAddr {
            area: peer.clone(),
            addr: entry.address,
            server_name: entry.server_name.clone(),
        };
        // Connecting can take a while when the peer is down; the envelope may have been marked
        // non-delivered or withdrawn meanwhile. Check again once connected, just before sending.
        if let Err(e) = ctx.transport.connect(&addr).await {
            let _ = ctx.node.store.note_attempt(&id, &e.to_string());
            return SendOutcome::Transient(e.to_string());
        }
        if !still_queued(ctx, &id, &rec) {
            return SendOutcome::Skipped;
        }
        if let Err(o) = record_transfer().await {
            return o;
        }
        match ctx.transport.request(&addr, sealed).await {
            Ok(r) => r,
            Err(e) if e.is_transient() => {
                let _ = ctx.node.store.note_attempt(&id, &e.to_string());
                return SendOutcome::Transient(e.to_string());
            }
            Err(e) => {
                // An identity or protocol failure is a property of the peer, not the envelope:
                // retry with backoff, loudly, rather than giving the envelope up.
                let _ = ctx.node.store.note_attempt(&id, &e.to_string());
                error!(envelope_id = %id, "peer connection failed: {e}");
                return SendOutcome::Transient(e.to_string());
            }
        }
    };
    let reply = match Reply::decode(&reply_bytes) {
        Ok(r) => r,
        Err(e) => {
            let _ = ctx.node.store.note_attempt(&id, "undecodable reply");
            return SendOutcome::Transient(format!("peer sent an undecodable reply: {e}"));
        }
    };
    match reply {
        Reply::Receipt(receipt) => {
            let body =
                match crypto::verify_receipt(&receipt, &entry.signing_keys, &id, &digest, peer) {
                    Ok(b) => b,
                    Err(e) => {
                        // A peer that answers with a bad receipt has not proved delivery: keep it queued.
                        let _ = ctx.node.store.note_attempt(&id, "invalid receipt");
                        error!(envelope_id = %id, "peer returned an invalid receipt: {e}");
                        return SendOutcome::Transient(format!("invalid receipt: {e}"));
                    }
                };
            // The verified receipt is stored and synced first, taking the envelope out of its
            // queue: from here on it is never sent again. Then its receipt and erasure records,
            // then the payload is erased. A crash after the store is completed at start-up
            // ([`complete_stored_receipts`]) without a re-send, so nothing about the envelope is
            // recorded after its erasure.
            crate::core::failpoint::hit("sender_before_receipt_stored");
            if let Err(e) = ctx
                .node
                .store
                .store_receipt_durably(&id, &receipt, &body.audit_head)
                .await
            {
                return SendOutcome::Transient(format!("cannot store receipt: {e}"));
            }
            crate::core::failpoint::hit("sender_after_receipt_stored");
            if let Some(d) = crate::core::failpoint::hold("sender_after_receipt_stored") {
                tokio::time::sleep(d).await;
            }
            if let Err(e) =
                complete(ctx, peer, id, &rec, &body.audit_head, Recorded::default()).await
            {
                // The receipt is stored: the envelope is out of the queue, and the worker's next
                // start completes it. Not a failure of the peer.
                return SendOutcome::ReceiptPending(e);
            }
            info!(envelope_id = %id, priority = %rec.priority, "delivered; receipt stored");
            SendOutcome::Delivered
        }
        Reply::Refused {
            code,
            message,
            permanent,
        } => {
            if permanent {
                // Write-ahead: the refusal is on record before the envelope leaves its queue.
                let mut ev = Event::new(
                    Operation::Refusal,
                    Actor::Peer(peer.clone()),
                    Outcome::Refused,
                )
                .envelope(id)
                .route(ctx.node.me(), peer)
                .reason(&code);
                if let Some(k) = &rec.subject_key {
                    ev = ev.subject_hex(k);
                }
                if let Err(e) = ctx.node.audit.record(ev).await {
                    error!(envelope_id = %id, "audit record of a refusal failed; kept queued: {e}");
                    return SendOutcome::Transient(format!("audit unavailable: {e}"));
                }
                let _ = ctx.node.store.mark_non_delivered(&id, &code);
                let _ = ctx.node.store.durable().await;
                SendOutcome::Permanent(format!("{code}: {message}"))
            } else {
                let _ = ctx.node.store.note_attempt(&id, &code);
                SendOutcome::Transient(format!("{code}: {message}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slot_group;

    #[test]
    fn a_slot_group_never_asks_for_more_than_the_node_has_or_the_peer_may_send() {
        assert_eq!(slot_group(64, 64), 8, "the default: eight at once");
        // `max_in_flight_total = 1` (the turn-taking test runs with it): waiting for eight
        // slots of a node that has one would never end.
        assert_eq!(slot_group(1, 64), 1);
        assert_eq!(slot_group(5, 64), 5);
        assert_eq!(slot_group(64, 3), 3, "the peer's own room");
        assert_eq!(slot_group(64, 0), 1, "at least one");
    }
}
