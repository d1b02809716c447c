//! Unit tests of the store on a real sled database in a temp dir.

use super::*;

fn area(s: &str) -> AreaId {
    s.parse().unwrap()
}

fn env(to: &str, priority: PriorityClass, due_secs: i64) -> NewEnvelope {
    NewEnvelope {
        id: EnvelopeId::generate(),
        to: area(to),
        priority,
        due_by: Utc.timestamp_opt(due_secs, 0).unwrap(),
        created: Utc::now(),
        sealed: vec![1, 2, 3],
        digest: [7; 32],
        subject_key: None,
    }
}

/// Enqueues and releases at once, as intake does once the records are durable.
fn queue(store: &Store, e: NewEnvelope, key: &[u8; 32]) -> Enqueued {
    let out = store.enqueue(e, key).unwrap();
    store.release(&[out.id()]).unwrap();
    out
}

#[tokio::test]
async fn the_queue_yields_priority_first_then_oldest_due() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let late_std = env("london", PriorityClass::Standard, 3_000);
    let early_std = env("london", PriorityClass::Standard, 1_000);
    let late_enh = env("london", PriorityClass::Enhanced, 5_000);
    let other_peer = env("kent", PriorityClass::Enhanced, 1);
    let ids = [late_enh.id, early_std.id, late_std.id];
    for (i, e) in [late_std, early_std, late_enh, other_peer]
        .into_iter()
        .enumerate()
    {
        queue(&store, e, &[i as u8; 32]);
    }
    store.durable().await.unwrap();
    let got: Vec<_> = store
        .next_queued(&area("london"), 10, &HashSet::new())
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, ids);
}

#[tokio::test]
async fn the_same_idempotency_key_queues_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = env("london", PriorityClass::Standard, 1);
    let first_id = first.id;
    assert_eq!(queue(&store, first, &[9; 32]), Enqueued::New(first_id));
    let again = env("london", PriorityClass::Standard, 1);
    assert_eq!(
        store.enqueue(again, &[9; 32]).unwrap(),
        Enqueued::Duplicate(first_id)
    );
    store.durable().await.unwrap();
    assert_eq!(
        store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn delivery_erases_the_payload_and_leaves_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let e = env("london", PriorityClass::Standard, 1);
    let id = e.id;
    store.enqueue(e, &[1; 32]).unwrap();
    let rec = store
        .mark_delivered(&id, b"receipt", "head", Utc::now())
        .unwrap();
    assert_eq!(rec.state, OutState::Delivered);
    assert!(rec.sealed.is_none());
    assert!(store
        .next_queued(&area("london"), 10, &HashSet::new())
        .unwrap()
        .is_empty());
    assert!(
        store.requeue(&id).is_err(),
        "a delivered envelope cannot be requeued"
    );
}

#[tokio::test]
async fn is_queued_follows_the_state_without_reading_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let e = env("london", PriorityClass::Standard, 1);
    let id = e.id;
    store.enqueue(e, &[1; 32]).unwrap();
    let held = store.get(&id).unwrap().unwrap();
    assert!(
        !store.is_queued(&id, &held).unwrap(),
        "held: not yet queued"
    );
    store.release(&[id]).unwrap();
    assert!(store.is_queued(&id, &held).unwrap(), "released");
    store
        .mark_delivered(&id, b"receipt", "head", Utc::now())
        .unwrap();
    assert!(!store.is_queued(&id, &held).unwrap(), "delivered");
}

#[tokio::test]
async fn non_delivered_envelopes_can_be_requeued_or_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (
        env("london", PriorityClass::Standard, 1),
        env("london", PriorityClass::Standard, 2),
    );
    let (ida, idb) = (a.id, b.id);
    queue(&store, a, &[1; 32]);
    queue(&store, b, &[2; 32]);
    store.durable().await.unwrap();
    store.mark_non_delivered(&ida, "window passed").unwrap();
    store.mark_non_delivered(&idb, "window passed").unwrap();
    assert_eq!(store.non_delivered(10).unwrap().len(), 2);
    assert!(store
        .next_queued(&area("london"), 10, &HashSet::new())
        .unwrap()
        .is_empty());
    store.requeue(&ida).unwrap();
    // A withdraw not yet begun cannot be completed; a begun one is out of the queue at once.
    assert!(store.withdraw(&idb, Utc::now()).is_err());
    store.begin_withdraw(&idb, "operator").unwrap();
    assert_eq!(store.withdrawals_pending().unwrap().len(), 1);
    assert!(
        store.get(&idb).unwrap().unwrap().sealed.is_some(),
        "payload kept until the record"
    );
    store.withdraw(&idb, Utc::now()).unwrap();
    assert!(store.withdrawals_pending().unwrap().is_empty());
    let queued = store
        .next_queued(&area("london"), 10, &HashSet::new())
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].0, ida);
    assert!(store.get(&idb).unwrap().unwrap().sealed.is_none());
}

#[tokio::test]
async fn queued_envelopes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = Store::open(dir.path()).unwrap();
        let e = env("london", PriorityClass::Standard, 1);
        let id = e.id;
        queue(&store, e, &[1; 32]);
        store.close().await.unwrap();
        id
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()[0]
            .0,
        id
    );
}

#[tokio::test]
async fn an_envelope_is_not_sendable_until_released_and_the_release_synced() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let london = area("london");
    let e = env("london", PriorityClass::Standard, 1);
    let id = e.id;
    assert_eq!(store.enqueue(e, &[1; 32]).unwrap(), Enqueued::New(id));
    store.durable().await.unwrap();
    assert!(
        store
            .next_queued(&london, 10, &HashSet::new())
            .unwrap()
            .is_empty(),
        "a held envelope (records not yet durable) must not be offered to the sender"
    );
    assert_eq!(store.get(&id).unwrap().unwrap().state, OutState::Held);
    assert_eq!(store.queue_stats(&london, Utc::now()).unwrap().queued, 0);
    store.release(&[id]).unwrap();
    assert!(store.is_pending(&id));
    assert!(
        store
            .next_queued(&london, 10, &HashSet::new())
            .unwrap()
            .is_empty(),
        "an unsynced release must not be offered to the sender"
    );
    assert_eq!(store.queue_stats(&london, Utc::now()).unwrap().queued, 1);
    store.durable().await.unwrap();
    assert!(!store.is_pending(&id));
    let got = store.next_queued(&london, 10, &HashSet::new()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, id);
    // Releasing again changes nothing.
    store.release(&[id]).unwrap();
    store.durable().await.unwrap();
    assert_eq!(store.queue_stats(&london, Utc::now()).unwrap().queued, 1);
}

#[tokio::test]
async fn a_held_envelope_found_again_after_a_crash_is_resumed_not_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = Store::open(dir.path()).unwrap();
        let e = env("london", PriorityClass::Standard, 1);
        let id = e.id;
        store.enqueue(e, &[4; 32]).unwrap();
        store.close().await.unwrap();
        id
    };
    let store = Store::open(dir.path()).unwrap();
    let again = env("london", PriorityClass::Standard, 1);
    assert_eq!(
        store.enqueue(again, &[4; 32]).unwrap(),
        Enqueued::Resumed(id)
    );
    store.release(&[id]).unwrap();
    let again = env("london", PriorityClass::Standard, 1);
    assert_eq!(
        store.enqueue(again, &[4; 32]).unwrap(),
        Enqueued::Duplicate(id)
    );
}

#[tokio::test]
async fn a_sync_covers_only_releases_finished_before_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let london = area("london");
    let a = env("london", PriorityClass::Standard, 1);
    let ida = a.id;
    queue(&store, a, &[1; 32]);
    store.durable().await.unwrap();
    let b = env("london", PriorityClass::Standard, 2);
    let idb = b.id;
    queue(&store, b, &[2; 32]);
    let ids: Vec<_> = store
        .next_queued(&london, 10, &HashSet::new())
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, [ida], "b was released after the last sync");
    store.durable().await.unwrap();
    assert_eq!(
        store
            .next_queued(&london, 10, &HashSet::new())
            .unwrap()
            .len(),
        2
    );
    assert!(!store.is_pending(&idb));
}

#[tokio::test]
async fn a_past_due_envelope_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = Utc::now();
    // Queued two minutes ago, due one minute ago: it crossed its due_by while queued.
    let mut late = env("london", PriorityClass::Standard, now.timestamp() - 60);
    late.created = now - chrono::Duration::seconds(120);
    let already_late = env("london", PriorityClass::Standard, now.timestamp() - 60);
    let on_time = env("london", PriorityClass::Enhanced, now.timestamp() + 3600);
    let held = env("kent", PriorityClass::Standard, now.timestamp() - 60);
    let late_id = late.id;
    queue(&store, late, &[1; 32]);
    queue(&store, on_time, &[2; 32]);
    store.enqueue(held, &[3; 32]).unwrap();
    // Late at intake already: recorded there (`late_at_intake`), not again here.
    queue(&store, already_late, &[4; 32]);
    let due: Vec<_> = store
        .newly_past_due(now, 10)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(due, [late_id], "only the queued, past-due one");
    store.mark_deadline_reported(&late_id).unwrap();
    assert!(store.newly_past_due(now, 10).unwrap().is_empty());
    assert_eq!(store.queue_stats(&area("london"), now).unwrap().past_due, 2);
}

#[tokio::test]
async fn the_sweeps_over_a_reported_queue_read_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = Utc::now();
    let mut late = env("london", PriorityClass::Standard, now.timestamp() - 60);
    late.created = now - chrono::Duration::seconds(120);
    let id = late.id;
    queue(&store, late, &[1; 32]);
    store.mark_deadline_reported(&id).unwrap();
    let entries: Vec<_> = store.inner.queue.iter().map(|kv| kv.unwrap().1).collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        from_queue_value(&entries[0]),
        Some(((now - chrono::Duration::seconds(120)).timestamp(), true)),
        "the queue entry carries created and the reported flag"
    );
    // A record that cannot be decoded: a sweep that read it would fail.
    store
        .inner
        .envelopes
        .insert(id.as_bytes(), &b"not a record"[..])
        .unwrap();
    assert!(store.newly_past_due(now, 10).unwrap().is_empty());
    assert_eq!(
        store
            .queued_before(now - chrono::Duration::seconds(60), 10)
            .unwrap(),
        [id]
    );
    assert!(store
        .queued_before(now - chrono::Duration::seconds(180), 10)
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn the_receipt_purge_lists_then_forgets_only_finished_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = Utc::now();
    let (a, b) = (
        env("london", PriorityClass::Standard, 1),
        env("london", PriorityClass::Standard, 2),
    );
    let (ida, idb) = (a.id, b.id);
    queue(&store, a, &[1; 32]);
    queue(&store, b, &[2; 32]);
    store
        .mark_delivered(&ida, b"r", "head", now - chrono::Duration::days(2))
        .unwrap();
    let old = store
        .finished_before(now - chrono::Duration::days(1), 10)
        .unwrap();
    assert_eq!(old, [ida]);
    assert_eq!(
        store.forget(&[ida, idb]).unwrap(),
        1,
        "the queued one stays"
    );
    assert!(store.get(&ida).unwrap().is_none());
    assert!(store.get(&idb).unwrap().is_some());
}

#[tokio::test]
async fn the_purge_reads_only_expired_records_through_the_finished_index() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let days = |d| now - chrono::Duration::days(d);
    let (old, older, recent, queued) = {
        let store = Store::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for k in 1..=4u8 {
            let e = env("london", PriorityClass::Standard, 1);
            ids.push(e.id);
            queue(&store, e, &[k; 32]);
        }
        store.mark_delivered(&ids[0], b"r", "h", days(3)).unwrap();
        store.mark_delivered(&ids[1], b"r", "h", days(5)).unwrap();
        store.mark_delivered(&ids[2], b"r", "h", now).unwrap();
        // A store from before the index: no keys, no marker.
        store.inner.finished.clear().unwrap();
        store.close().await.unwrap();
        (ids[0], ids[1], ids[2], ids[3])
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.finished_before(days(1), 10).unwrap(),
        [older, old],
        "built from the records on open, oldest first"
    );
    assert_eq!(store.finished_before(days(1), 1).unwrap(), [older]);
    // The queued record is never read: one that cannot be decoded fails no purge.
    store
        .inner
        .envelopes
        .insert(queued.as_bytes(), &b"not a record"[..])
        .unwrap();
    assert_eq!(store.forget(&[older, old]).unwrap(), 2);
    assert!(store.finished_before(days(1), 10).unwrap().is_empty());
    assert_eq!(
        store.inner.finished.len(),
        2,
        "forget removes the key with the record: the recent one and the marker are left"
    );
    assert!(store.get(&recent).unwrap().is_some());
}

#[tokio::test]
async fn concurrent_waiters_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut e = env("london", PriorityClass::Standard, 1);
            e.sealed = i.to_be_bytes().to_vec();
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            queue(&store, e, &key);
            store.durable().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        store.sync_count() < 200,
        "{} syncs for 200 waiters",
        store.sync_count()
    );
    assert_eq!(
        store
            .queue_stats(&area("london"), Utc::now())
            .unwrap()
            .queued,
        200
    );
}

#[tokio::test]
async fn a_withdraw_that_cannot_be_recorded_goes_back_to_the_state_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let id = queue(&store, env("london", PriorityClass::Standard, 10), &[9; 32]).id();
    store.durable().await.unwrap();
    assert_eq!(
        store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .len(),
        1
    );
    store.begin_withdraw(&id, "operator").unwrap();
    store.durable().await.unwrap();
    assert!(
        store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .is_empty(),
        "a withdraw under way is never sent"
    );
    store.cancel_withdraw(&id).unwrap();
    store.durable().await.unwrap();
    let rec = store.get(&id).unwrap().unwrap();
    assert_eq!(rec.state, OutState::Queued);
    assert_eq!(
        store
            .next_queued(&area("london"), 10, &HashSet::new())
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn queue_figures_come_from_the_queue_entries_and_match_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = Utc::now();
    let mut oldest = env("london", PriorityClass::Standard, now.timestamp() - 60);
    oldest.created = now - chrono::Duration::hours(3);
    let enhanced = env("london", PriorityClass::Enhanced, now.timestamp() + 3_600);
    let later = env("london", PriorityClass::Standard, now.timestamp() + 7_200);
    for (i, e) in [oldest, enhanced, later].into_iter().enumerate() {
        queue(&store, e, &[i as u8; 32]);
    }
    let expect = |s: QueueStats| {
        assert_eq!((s.queued, s.enhanced, s.past_due), (3, 1, 1));
        assert_eq!(
            s.oldest_created.map(|t| t.timestamp()),
            Some((now - chrono::Duration::hours(3)).timestamp())
        );
    };
    assert!(
        store.inner.queue.iter().all(|kv| kv.unwrap().1.len() == 8),
        "each queue entry carries its envelope's created time"
    );
    expect(store.queue_stats(&area("london"), now).unwrap());
    // Entries written before the value carried `created` (empty values) give the same figures.
    let keys: Vec<_> = store.inner.queue.iter().map(|kv| kv.unwrap().0).collect();
    for k in keys {
        store.inner.queue.insert(k, &[][..]).unwrap();
    }
    expect(store.queue_stats(&area("london"), now).unwrap());
}

#[tokio::test]
async fn rare_states_are_found_through_their_index_which_an_older_store_gets_built() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let store = Store::open(dir.path()).unwrap();
        let a = queue(&store, env("london", PriorityClass::Standard, 10), &[1; 32]).id();
        let b = queue(&store, env("london", PriorityClass::Standard, 20), &[2; 32]).id();
        queue(&store, env("london", PriorityClass::Standard, 30), &[3; 32]);
        store.mark_non_delivered(&a, "window passed").unwrap();
        store.begin_withdraw(&b, "operator").unwrap();
        let ids =
            |v: Vec<(EnvelopeId, OutRecord)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(store.non_delivered(10).unwrap()), [a]);
        assert_eq!(ids(store.withdrawals_pending().unwrap()), [b]);
        // Leaving a rare state takes it out of the index.
        store.requeue(&a).unwrap();
        assert!(store.non_delivered(10).unwrap().is_empty());
        store.mark_non_delivered(&a, "window passed").unwrap();
        // As a store written before the index existed: no index, no marker.
        store.inner.states.clear().unwrap();
        store.close().await.unwrap();
        (a, b)
    };
    let store = Store::open(dir.path()).unwrap();
    let ids = |v: Vec<(EnvelopeId, OutRecord)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    assert_eq!(ids(store.non_delivered(10).unwrap()), [a]);
    assert_eq!(ids(store.withdrawals_pending().unwrap()), [b]);
}

#[tokio::test]
async fn changes_sent_to_the_committer_share_a_transaction_each_with_its_own_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ids: Vec<EnvelopeId> = (0..20u8)
        .map(|n| {
            store
                .enqueue(env("london", PriorityClass::Standard, 1_000), &[n; 32])
                .unwrap()
                .id()
        })
        .collect();
    store.durable().await.unwrap();
    // Twenty releases at once, as twenty files finishing together: the old path made one
    // transaction each.
    let before = store.transaction_count();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let store = store.clone();
        tasks.spawn(async move { store.release_durably(&[id]).await });
    }
    let released = tasks.join_all().await;
    assert!(released.iter().all(Result::is_ok), "{released:?}");
    let made = store.transaction_count() - before;
    assert!(made < 20, "20 releases made {made} transactions");
    // Durable on return, so sendable at once.
    let queued = store
        .next_queued(&area("london"), 100, &HashSet::new())
        .unwrap();
    assert_eq!(queued.len(), 20);

    // A change that finds no record fails alone and writes nothing; the others in the same
    // transaction are applied.
    let missing = EnvelopeId::generate();
    let (a, b) = (ids[0], ids[1]);
    let receipt = |id| -> (EnvelopeId, changes::Change) {
        (
            id,
            Box::new(|r: &mut OutRecord| receipt_stored(r, b"receipt", "head")),
        )
    };
    let job = Job::Apply {
        changes: vec![receipt(a), receipt(missing), receipt(b)],
        release: false,
        done: None,
    };
    let outcomes = match tables(&store).apply(&[job]).pop() {
        Some(changes::Outcome::Changed(each)) => each,
        other => panic!("{other:?}"),
    };
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    assert!(matches!(outcomes[1], Err(StoreError::NotFound(id)) if id == missing));
    assert!(store.get(&missing).unwrap().is_none());
    for id in [a, b] {
        assert_eq!(
            store.get(&id).unwrap().unwrap().state,
            OutState::ReceiptStored
        );
    }
    assert_eq!(store.in_state(OutState::ReceiptStored).unwrap().len(), 2);
    let queued = store
        .next_queued(&area("london"), 100, &HashSet::new())
        .unwrap();
    assert_eq!(queued.len(), 18, "stored receipts leave the queue");

    // The sender's path: stored receipt synced on return, erasure applied by the next round.
    let c = ids[2];
    store.store_receipt_durably(&c, b"rc", "hc").await.unwrap();
    assert_eq!(
        store.get(&c).unwrap().unwrap().state,
        OutState::ReceiptStored
    );
    store
        .mark_delivered_soon(&c, b"rc", "hc", Utc::now())
        .unwrap();
    store.durable().await.unwrap();
    let rec = store.get(&c).unwrap().unwrap();
    assert_eq!(rec.state, OutState::Delivered);
    assert!(rec.sealed.is_none(), "the payload is erased");
    assert_eq!(rec.receipt.as_deref().map(|r| &r[..]), Some(&b"rc"[..]));
    // An unknown id given to the not-awaited path is logged, and harms nothing else.
    store
        .mark_delivered_soon(&missing, b"r", "h", Utc::now())
        .unwrap();
    store.durable().await.unwrap();
    assert!(store.get(&missing).unwrap().is_none());
}

/// A large round goes into transactions of at most `WRITES_PER_TRANSACTION` records, in order,
/// each job whole; every job keeps its own outcome.
#[test]
fn a_large_round_is_applied_in_bounded_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ids: Vec<EnvelopeId> = (0..200u16)
        .map(|n| {
            let mut key = [0u8; 32];
            key[..2].copy_from_slice(&n.to_be_bytes());
            store
                .enqueue(env("london", PriorityClass::Standard, 1_000), &key)
                .unwrap()
                .id()
        })
        .collect();
    let release = |id: &EnvelopeId| Job::Apply {
        changes: vec![(*id, changes::release_change())],
        release: false,
        done: None,
    };
    // 200 one-record jobs: 64 + 64 + 64 + 8.
    let before = store.transaction_count();
    let out = tables(&store).apply(&ids.iter().map(release).collect::<Vec<_>>());
    assert_eq!(store.transaction_count() - before, 4);
    assert_eq!(out.len(), 200);
    assert!(out
        .iter()
        .all(|o| matches!(o, changes::Outcome::Changed(c) if c.len() == 1 && c[0].is_ok())));
    for id in &ids {
        assert_eq!(store.get(id).unwrap().unwrap().state, OutState::Queued);
    }
}

#[test]
fn runs_keep_order_stay_within_the_limit_and_never_split_a_job() {
    let limit = changes::WRITES_PER_TRANSACTION;
    assert_eq!(
        changes::runs(&[], limit),
        Vec::<std::ops::Range<usize>>::new()
    );
    assert_eq!(changes::runs(&[0, 0, 0], limit), vec![(0..3)]);
    assert_eq!(changes::runs(&[limit], limit), vec![(0..1)]);
    assert_eq!(changes::runs(&[limit, 1], limit), [0..1, 1..2]);
    assert_eq!(changes::runs(&[1, limit + 5, 1], limit), [0..1, 1..2, 2..3]);
    assert_eq!(changes::runs(&[40, 24, 1, 0], limit), [0..2, 2..4]);
}

/// The committer's tables, to hand it a round directly.
fn tables(store: &Store) -> changes::Tables {
    let i = &store.inner;
    changes::Tables {
        envelopes: i.envelopes.clone(),
        idem: i.idem.clone(),
        queue: i.queue.clone(),
        states: i.states.clone(),
        finished: i.finished.clone(),
        gate: i.gate.clone(),
        transactions: i.transactions.clone(),
    }
}

fn file_of(n: u8, first_key: u8) -> Vec<(NewEnvelope, [u8; 32])> {
    (0..n)
        .map(|k| {
            let e = env("london", PriorityClass::Standard, 1_000);
            (e, [first_key + k; 32])
        })
        .collect()
}

#[tokio::test]
async fn a_files_envelopes_are_stored_in_one_transaction_shared_with_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let envs = file_of(100, 0);
    let first = envs[0].0.id;
    let mut again = env("london", PriorityClass::Standard, 1_000);
    let before = store.transaction_count();
    let mut batch = envs;
    // The same idempotency key twice in one file: the second finds the first, still held.
    again.id = EnvelopeId::generate();
    batch.push((again, [0; 32]));
    let out = store.enqueue_all_durably(batch).await.unwrap();
    assert_eq!(store.transaction_count() - before, 1);
    assert_eq!(out.len(), 101);
    assert!(out[..100].iter().all(|e| matches!(e, Enqueued::New(_))));
    assert!(matches!(out[100], Enqueued::Resumed(id) if id == first));
    assert_eq!(store.get(&first).unwrap().unwrap().state, OutState::Held);

    // Twenty one-referral files at once, as intake's files in flight: they share the
    // committer's transactions (each alone made one before).
    let before = store.transaction_count();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..20u8 {
        let store = store.clone();
        tasks.spawn(async move { store.enqueue_all_durably(file_of(1, 200 + n)).await });
    }
    let stored = tasks.join_all().await;
    assert!(
        stored
            .iter()
            .all(|r| matches!(r.as_deref(), Ok([Enqueued::New(_)]))),
        "{stored:?}"
    );
    let made = store.transaction_count() - before;
    assert!(made < 20, "20 files made {made} transactions");
}

#[tokio::test]
async fn a_file_that_cannot_be_stored_fails_alone_and_stores_none_of_its_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let held = store.enqueue(env("london", PriorityClass::Standard, 1_000), &[9; 32]);
    let held = held.unwrap().id();
    // A damaged idempotency entry: it names no envelope id.
    store.inner.idem.insert([7u8; 32], &b"bad"[..]).unwrap();
    let good = file_of(3, 10);
    let mut bad = file_of(2, 20);
    bad.push((env("london", PriorityClass::Standard, 1_000), [7; 32]));
    let bad_ids: Vec<EnvelopeId> = bad.iter().map(|(e, _)| e.id).collect();
    let enqueue = |f| Job::Enqueue {
        items: new_items(f),
        done: oneshot::channel().0,
    };
    let release = Job::Apply {
        changes: vec![(held, changes::release_change())],
        release: false,
        done: None,
    };
    // One round: the bad file's failure aborts the shared transaction, so each job is applied
    // again in its own; the other file and the release are written.
    let before = store.transaction_count();
    let out = tables(&store).apply(&[enqueue(good), enqueue(bad), release]);
    assert_eq!(store.transaction_count() - before, 1 + 3);
    assert!(
        matches!(&out[0], changes::Outcome::Enqueued(Ok(e)) if e.len() == 3 && e.iter().all(|e| matches!(e, Enqueued::New(_)))),
        "{out:?}"
    );
    assert!(
        matches!(
            &out[1],
            changes::Outcome::Enqueued(Err(StoreError::Corrupt(_)))
        ),
        "{out:?}"
    );
    assert!(
        matches!(&out[2], changes::Outcome::Changed(c) if c.len() == 1 && c[0].is_ok()),
        "{out:?}"
    );
    for id in &bad_ids {
        assert!(
            store.get(id).unwrap().is_none(),
            "a failed file's envelope was stored"
        );
    }
    assert_eq!(store.get(&held).unwrap().unwrap().state, OutState::Queued);
    // Through the committer: the failure reaches the caller, the store stays usable.
    let mut again = file_of(1, 30);
    again.push((env("london", PriorityClass::Standard, 1_000), [7; 32]));
    let e = store.enqueue_all_durably(again).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
    assert!(store.enqueue_all_durably(file_of(1, 40)).await.is_ok());
}
