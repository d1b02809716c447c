//! Housekeeping: signed audit checkpoints at the configured interval, Victims' Code deadlines
//! crossed while queued (one WARN and one `deadline_missed` record per envelope), the
//! non-delivery window (envelopes still queued after it are marked non-delivered, alerted at
//! ERROR and kept for an operator), and retention purges of receipts, dedup ids, refused files in
//! `rejected/` and audit files. Each second it also hands heap memory freed by a burst back to
//! the kernel (`adapters::heap`), so a node's resident size follows its live heap.
//! Write-ahead: every change here is recorded durably first, then made. If the record cannot be
//! written, nothing changes and the next sweep tries again; a crash between the record and the
//! change repeats the record on the next sweep (a second record, never a missing one).
//! Must not: delete anything whose erasure is not recorded first.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::adapters::audit::{Actor, Event, Operation, Outcome};
use crate::adapters::outbox_dir;
use crate::node::build::Node;

/// How often freed heap memory goes back to the kernel. Shorter keeps the peak resident size
/// nearer the live heap after a burst; the peak inside one is no lower at 250 ms (measured).
const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Periodic work: signed audit checkpoints, the non-delivery window, retention purges.
pub async fn run(h: Arc<Node>, shutdown: CancellationToken) {
    let s = h.settings.clone();
    let mut checkpoint = tokio::time::interval(s.audit.checkpoint_interval);
    let mut sweep = tokio::time::interval(Duration::from_secs(5).min(Duration::from_secs(
        s.delivery.non_delivery_after.num_seconds().unsigned_abs(),
    )));
    let mut purge = tokio::time::interval(Duration::from_secs(3600));
    let mut trim = tokio::time::interval(HEAP_TRIM_INTERVAL);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = checkpoint.tick() => {
                if let Err(e) = h.audit.checkpoint().await {
                    error!("audit checkpoint failed: {e}");
                }
            }
            _ = sweep.tick() => {
                sweep_deadlines(&h).await;
                sweep_non_delivered(&h).await;
            }
            _ = purge.tick() => purge_expired(&h).await,
            _ = trim.tick() => {
                crate::adapters::heap::release_free();
            }
        }
    }
}

/// Queued envelopes that crossed their `due_by` while waiting: one WARN and one record each.
pub(crate) async fn sweep_deadlines(h: &Node) {
    let now = Utc::now();
    let due = match h.store.newly_past_due(now, 1000) {
        Ok(v) => v,
        Err(e) => {
            error!("deadline sweep failed: {e}");
            return;
        }
    };
    for (id, rec) in due {
        let mut ev = Event::new(Operation::Deadline, Actor::System, Outcome::Failed)
            .envelope(id)
            .route(&h.settings.area, &rec.to)
            .priority(rec.priority)
            .reason("deadline_missed");
        if let Some(k) = &rec.subject_key {
            ev = ev.subject_hex(k);
        }
        if let Err(e) = h.audit.record(ev).await {
            error!("audit record of a missed deadline failed; will retry: {e}");
            return;
        }
        warn!(envelope_id = %id, peer = %rec.to, priority = ?rec.priority, due_by = %rec.due_at().to_rfc3339(), attempts = rec.attempts, "referral still queued past its Victims' Code due_by");
        if let Err(e) = h.store.mark_deadline_reported(&id) {
            error!("cannot note a reported deadline: {e}");
        }
    }
    let _ = h.store.durable().await;
}

async fn sweep_non_delivered(h: &Node) {
    let cutoff = Utc::now() - h.settings.delivery.non_delivery_after;
    let ids = match h.store.queued_before(cutoff, 1000) {
        Ok(ids) => ids,
        Err(e) => {
            error!("non-delivery sweep failed: {e}");
            return;
        }
    };
    for id in ids {
        let Ok(Some(rec)) = h.store.get(&id) else {
            continue;
        };
        let mut ev = Event::new(Operation::Disclosure, Actor::System, Outcome::Failed)
            .envelope(id)
            .route(&h.settings.area, &rec.to)
            .reason("non_delivered");
        if let Some(k) = &rec.subject_key {
            ev = ev.subject_hex(k);
        }
        if let Err(e) = h.audit.record(ev).await {
            error!("audit record of a non-delivery failed; envelope left queued: {e}");
            return;
        }
        if h.store
            .mark_non_delivered(&id, "non_delivery_window_passed")
            .is_err()
        {
            continue;
        }
        crate::node::metrics::count_non_delivered();
        error!(envelope_id = %id, peer = %rec.to, attempts = rec.attempts, "envelope NOT DELIVERED within the non-delivery window; kept for an operator (refex outbox requeue|withdraw)");
    }
    let _ = h.store.durable().await;
}

pub(crate) async fn purge_expired(h: &Node) {
    let now = Utc::now();
    purge_rejected(h, now).await;
    let receipts = chrono::Duration::days(i64::from(h.settings.retention.receipts_days));
    match h.store.finished_before(now - receipts, 10_000) {
        Ok(ids) => {
            let mut recorded = Vec::with_capacity(ids.len());
            for id in ids {
                let ev = Event::new(Operation::Erasure, Actor::System, Outcome::Ok)
                    .envelope(id)
                    .reason("retention_receipt");
                match h.audit.record(ev).await {
                    Ok(_) => recorded.push(id),
                    Err(e) => {
                        error!("audit record of a receipt purge failed; kept: {e}");
                        break;
                    }
                }
            }
            crate::core::failpoint::hit("purge_receipts_before_forget");
            if let Err(e) = h.store.forget(&recorded) {
                error!("receipt retention purge failed: {e}");
            }
        }
        Err(e) => error!("receipt retention purge failed: {e}"),
    }
    let seen = chrono::Duration::days(i64::from(h.settings.retention.seen_ids_days));
    let cutoff = now - seen;
    match h.store.count_seen_before(cutoff) {
        Ok(n) if n > 0 => {
            let ev = Event::new(Operation::Erasure, Actor::System, Outcome::Ok)
                .reason(&format!("retention_seen_ids:{n}"));
            match h.audit.record(ev).await {
                Ok(_) => {
                    if let Err(e) = h.store.purge_seen(cutoff) {
                        error!("dedup id retention purge failed: {e}");
                    }
                }
                Err(e) => error!("audit record of a dedup id purge failed; kept: {e}"),
            }
        }
        Ok(_) => {}
        Err(e) => error!("dedup id retention purge failed: {e}"),
    }
    if let Err(e) = h.audit.purge_expired(now).await {
        error!("audit retention purge failed: {e}");
    }
    let _ = h.store.durable().await;
}

/// Refused files in `rejected/` past `intake.rejected_retention_days`: the erasure is recorded
/// (durably) first, then the files are deleted.
async fn purge_rejected(h: &Node, now: chrono::DateTime<Utc>) {
    let outbox = &h.settings.paths.outbox;
    let cutoff: std::time::SystemTime = (now - h.settings.intake.rejected_retention).into();
    let expired = match outbox_dir::expired_rejections(outbox, cutoff) {
        Ok(v) if v.is_empty() => return,
        Ok(v) => v,
        Err(e) => {
            error!("cannot list rejected/ for its retention purge: {e}");
            return;
        }
    };
    let ev = Event::new(Operation::Erasure, Actor::System, Outcome::Ok)
        .reason(&format!("retention_rejected:{}", expired.len()));
    if let Err(e) = h.audit.record(ev).await {
        error!("audit record of a rejected/ purge failed; nothing deleted: {e}");
        return;
    }
    crate::core::failpoint::hit("purge_rejected_before_delete");
    match outbox_dir::remove_rejections(outbox, &expired) {
        Ok(n) => info!(
            files = n,
            "refused files past their retention purged from rejected/"
        ),
        Err(e) => error!("rejected/ retention purge failed: {e}"),
    }
}
