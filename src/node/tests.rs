//! In-process tests of intake, receiver and sender on real adapters (sled, inotify, quinn, the
//! audit files) in a temp dir — no mocks, no spawned processes — and paused tokio time for the
//! settle window and the retry schedule.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::adapters::audit::log_files;
use crate::adapters::outbox_dir::{OutboxWatcher, Pickup, WatchConfig};
use crate::adapters::store::OutState;
use crate::adapters::transport::Transport;
use crate::core::envelope::{Header, Reply, CONTENT_TYPE_REFERRAL_V1};
use crate::core::referral::{parse_json, Referral};
use crate::core::types::{AreaId, EnvelopeId, PriorityClass};
use crate::crypto;
use crate::node::build::{load_tls, Node};
use crate::node::intake::Intake;
use crate::node::receiver::{Arrived, Receiver};
use crate::node::sender::{PeerWorker, SenderContext};
use crate::node::settings::Settings;

const WM: &str = "west-midlands";
const LONDON: &str = "london";

/// A two-area development federation in `dir`; returns each area's settings.
fn federation(dir: &Path, port: u16) -> (Settings, Settings) {
    let areas: Vec<AreaId> = [WM, LONDON].iter().map(|a| a.parse().unwrap()).collect();
    crate::edge::federation::init(dir, &areas, port).unwrap();
    let load = |a: &str| Settings::load(&dir.join(a).join("refex.toml")).unwrap();
    (load(WM), load(LONDON))
}

/// The burglary sample, living in `area`, as a provider's JSON file. Referred 15 days ago, as
/// the sample's own date was when these tests were written: a fixed day would fall outside the
/// year intake accepts a year later.
fn sample_json(area: &str) -> Vec<u8> {
    let bytes = include_bytes!("../../config/samples/burglary-greater-manchester.json");
    let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    v["residence"] = serde_json::json!({ "area": area });
    // Fixed for the process, so the sample made twice is the same bytes.
    static MADE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let at = MADE.get_or_init(|| {
        (chrono::Utc::now() - chrono::Duration::days(15))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    });
    v["referred_at"] = at.as_str().into();
    serde_json::to_vec(&v).unwrap()
}

fn sample_for(area: &str) -> Referral {
    parse_json(&sample_json(area)).unwrap()
}

/// West Midlands (the sender) and London (the receiving node) of one federation.
fn sender_and_receiver(dir: &Path, port: u16) -> (Arc<Node>, Arc<Node>) {
    let (wm, london) = federation(dir, port);
    (Node::open(wm).unwrap(), Node::open(london).unwrap())
}

/// An envelope from `from` to `to` carrying `r`, sealed as intake would.
fn sealed(from: &Node, to: &AreaId, r: &Referral) -> Vec<u8> {
    sealed_as(from, to, r, EnvelopeId::generate(), &from.signer)
}

/// As [`sealed`], with a chosen id and signing key.
fn sealed_as(
    from: &Node,
    to: &AreaId,
    r: &Referral,
    id: EnvelopeId,
    signer: &crypto::SigningKey,
) -> Vec<u8> {
    let payload = r.to_cbor();
    let header = Header {
        v: 1,
        id,
        from: from.me().clone(),
        to: to.clone(),
        created: Utc::now(),
        priority: PriorityClass::Standard,
        due_by: Utc::now() + chrono::Duration::days(2),
        content_type: CONTENT_TYPE_REFERRAL_V1.into(),
        payload_len: payload.len() as u64,
    };
    let entry = from.directory().get(to).unwrap().clone();
    let shared = entry
        .opens_shared_key_envelopes()
        .then_some(&from.seal_contexts);
    crypto::seal(header, &payload, signer, &entry.encryption_key, shared)
        .unwrap()
        .to_bytes()
}

fn refusal(reply: Reply) -> (String, bool) {
    match reply {
        Reply::Refused {
            code, permanent, ..
        } => (code, permanent),
        Reply::Receipt(_) => panic!("expected a refusal"),
    }
}

#[tokio::test]
async fn a_resent_id_with_other_bytes_is_refused_and_never_answered_with_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, node) = sender_and_receiver(dir.path(), 17_780);
    let receiver = Receiver::new(node.clone());
    let id = EnvelopeId::generate();
    let arrive = |bytes: Vec<u8>| Arrived {
        peer: sender.me().clone(),
        bytes,
        now: Utc::now(),
    };
    let first = sealed_as(&sender, node.me(), &sample_for(LONDON), id, &sender.signer);
    assert!(matches!(
        receiver.receive(arrive(first.clone())).await,
        Reply::Receipt(_)
    ));
    let mut other = sample_for(LONDON);
    other.source_ref = "OTHER-REF".into();
    let forged = sealed_as(&sender, node.me(), &other, id, &sender.signer);
    let (code, permanent) = refusal(receiver.receive(arrive(forged)).await);
    assert_eq!((code.as_str(), permanent), ("replay_mismatch", true));
    // The genuine re-send is still answered; one inbox file; the mismatch is on the record.
    assert!(matches!(
        receiver.receive(arrive(first)).await,
        Reply::Receipt(_)
    ));
    let files = crate::edge::harness::inbox_files(&node.settings.paths.inbox);
    assert_eq!(files.len(), 1, "{files:?}");
    let reasons: Vec<String> = audit_lines(&node.settings.paths.audit)
        .iter()
        .filter_map(|r| r["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r == "replay_mismatch"),
        "{reasons:?}"
    );
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn an_intact_envelope_signed_by_an_unlisted_key_is_transient_but_a_tampered_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, node) = sender_and_receiver(dir.path(), 17_790);
    let receiver = Receiver::new(node.clone());
    let arrive = |bytes: Vec<u8>| Arrived {
        peer: sender.me().clone(),
        bytes,
        now: Utc::now(),
    };
    // Signed with a key London does not list for West Midlands (London's own).
    let unlisted = sealed_as(
        &sender,
        node.me(),
        &sample_for(LONDON),
        EnvelopeId::generate(),
        &node.signer,
    );
    let (code, permanent) = refusal(receiver.receive(arrive(unlisted)).await);
    assert_eq!((code.as_str(), permanent), ("unknown_signing_key", false));
    // A listed key, but a byte of the ciphertext changed after signing.
    let mut tampered = sealed(&sender, node.me(), &sample_for(LONDON));
    let at = tampered.len() - 80;
    tampered[at] ^= 1;
    let (code, permanent) = refusal(receiver.receive(arrive(tampered)).await);
    assert!(permanent, "{code}");
    assert_ne!(code, "unknown_signing_key");
    node.audit.close().await.unwrap();
}

fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    log_files(dir)
        .unwrap()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn watch(s: &Settings, settle: Duration) -> OutboxWatcher {
    OutboxWatcher::new(WatchConfig {
        dir: s.paths.outbox.clone(),
        settle,
        rescan_interval: Duration::from_secs(3600),
        max_file_bytes: s.intake.max_file_bytes,
    })
    .unwrap()
}

/// Runs intake on the one file waiting in `node`'s outbox, as the daemon would.
async fn take_waiting_file(node: &Arc<Node>) {
    let mut watcher = watch(&node.settings, Duration::from_millis(10));
    let Pickup::Ready(file) = watcher.next().await else {
        panic!("the file is ready");
    };
    Intake {
        node: node.clone(),
        watcher,
    }
    .take_file(&file)
    .await
    .unwrap();
}

#[tokio::test]
async fn intake_queues_a_dropped_file_for_its_area_audits_it_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (wm, _) = federation(dir.path(), 17_700);
    let node = Node::open(wm).unwrap();
    let s = node.settings.clone();
    let bytes = sample_json(LONDON);
    std::fs::write(s.paths.outbox.join("one.json"), &bytes).unwrap();
    take_waiting_file(&node).await;

    assert!(!s.paths.outbox.join("one.json").exists(), "file removed");
    let london: AreaId = LONDON.parse().unwrap();
    let queued = node
        .store
        .next_queued(&london, 10, &Default::default())
        .unwrap();
    assert_eq!(queued.len(), 1, "one envelope for london");
    let ops: Vec<String> = audit_lines(&s.paths.audit)
        .iter()
        .map(|r| r["op"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(ops.contains(&"collection".to_owned()), "{ops:?}");
    // The sample was referred on 2026-11-20: past its due_by (two working days) already.
    let late = |dir: &Path| {
        audit_lines(dir)
            .iter()
            .filter(|r| r["reason"] == "late_at_intake")
            .count()
    };
    assert_eq!(late(&s.paths.audit), 1, "one late_at_intake record");
    // Taking the same bytes again (a re-read after a crash) makes no second envelope.
    std::fs::write(s.paths.outbox.join("one.json"), &bytes).unwrap();
    take_waiting_file(&node).await;
    let queued = node
        .store
        .next_queued(&london, 10, &Default::default())
        .unwrap();
    assert_eq!(queued.len(), 1, "the re-read is a duplicate");
    assert_eq!(late(&s.paths.audit), 1, "a duplicate is not late twice");
    // A referral made just now is on time: no deadline record.
    let mut v: serde_json::Value = serde_json::from_slice(&sample_json(LONDON)).unwrap();
    v["source_ref"] = "ON-TIME-1".into();
    v["referred_at"] = Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        .into();
    std::fs::write(
        s.paths.outbox.join("two.json"),
        serde_json::to_vec(&v).unwrap(),
    )
    .unwrap();
    take_waiting_file(&node).await;
    assert_eq!(late(&s.paths.audit), 1, "on time: no late record");
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn the_receiver_writes_an_envelope_once_and_answers_a_resend_with_the_same_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, node) = sender_and_receiver(dir.path(), 17_710);
    let receiver = Receiver::new(node.clone());
    let bytes = sealed(&sender, node.me(), &sample_for(LONDON));
    let arrive = || Arrived {
        peer: sender.me().clone(),
        bytes: bytes.clone(),
        now: Utc::now(),
    };
    let Reply::Receipt(first) = receiver.receive(arrive()).await else {
        panic!("accepted");
    };
    let Reply::Receipt(again) = receiver.receive(arrive()).await else {
        panic!("a re-send is answered");
    };
    assert_eq!(first, again, "the original receipt");
    let files = crate::edge::harness::inbox_files(&node.settings.paths.inbox);
    assert_eq!(files.len(), 1, "{files:?}");
    // Collection and inbox disclosure are both on the record before the receipt.
    let ops: Vec<String> = audit_lines(&node.settings.paths.audit)
        .iter()
        .map(|r| r["op"].as_str().unwrap_or("").to_owned())
        .collect();
    let c = ops.iter().position(|o| o == "collection").unwrap();
    let d = ops.iter().position(|o| o == "disclosure").unwrap();
    assert!(c < d, "{ops:?}");
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn a_different_envelope_carrying_a_delivered_referral_is_answered_as_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, node) = sender_and_receiver(dir.path(), 17_750);
    let receiver = Receiver::new(node.clone());
    let referral = sample_for(LONDON);
    // Two envelopes (two ids), one referral: what a sender that lost its records would send.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let bytes = sealed(&sender, node.me(), &referral);
        let id = crypto::SealedEnvelope::from_stored(bytes.clone())
            .unwrap()
            .id();
        let reply = receiver
            .receive(Arrived {
                peer: sender.me().clone(),
                bytes: bytes.clone(),
                now: Utc::now(),
            })
            .await;
        let Reply::Receipt(receipt) = reply else {
            panic!("both are answered with a receipt: {reply:?}");
        };
        // Each receipt is valid for its own envelope, so the sender can finish with it.
        let keys = sender.directory().signing_keys(node.me()).unwrap();
        let digest = crate::core::digest::sha256(&bytes);
        let body = crypto::verify_receipt(&receipt, &keys, &id, &digest, node.me()).unwrap();
        statuses.push(body.status);
    }
    use crate::core::envelope::ReceiptStatus;
    assert_eq!(
        statuses,
        vec![ReceiptStatus::Delivered, ReceiptStatus::Duplicate]
    );
    let files = crate::edge::harness::inbox_files(&node.settings.paths.inbox);
    assert_eq!(files.len(), 1, "one inbox file: {files:?}");
    let duplicates: Vec<_> = audit_lines(&node.settings.paths.audit)
        .into_iter()
        .filter(|r| r["reason"] == "duplicate_referral")
        .collect();
    assert_eq!(duplicates.len(), 1, "the duplicate is on the record");
    assert!(duplicates[0]["subject_key"].is_string());
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn the_receiver_refuses_an_envelope_claiming_another_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, node) = sender_and_receiver(dir.path(), 17_720);
    let receiver = Receiver::new(node.clone());
    let bytes = sealed(&sender, node.me(), &sample_for(LONDON));
    // The TLS peer is london itself, not the west-midlands envelope's sender.
    let reply = receiver
        .receive(Arrived {
            peer: node.me().clone(),
            bytes,
            now: Utc::now(),
        })
        .await;
    let Reply::Refused { code, .. } = reply else {
        panic!("refused");
    };
    assert_eq!(code, "sender_mismatch");
    assert!(crate::edge::harness::inbox_files(&node.settings.paths.inbox).is_empty());
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn the_sender_delivers_a_local_referral_and_keeps_only_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wm, _) = federation(dir.path(), 17_730);
    wm.listen = "127.0.0.1:0".parse().unwrap();
    let node = Node::open(wm).unwrap();
    let s = node.settings.clone();
    let bytes = sample_json(WM);
    std::fs::write(s.paths.outbox.join("local.json"), &bytes).unwrap();
    take_waiting_file(&node).await;

    let transport =
        Transport::bind(s.listen, &load_tls(&s).unwrap(), s.limits.transport.clone()).unwrap();
    let ctx = Arc::new(SenderContext {
        node: node.clone(),
        transport,
        local: Arc::new(Receiver::new(node.clone())),
    });
    let me = node.me().clone();
    let worker = PeerWorker {
        ctx,
        peer: me.clone(),
        wake: node.wake[&me].clone(),
        stored: None,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone(), Duration::from_secs(5)));
    let inbox = s.paths.inbox.clone();
    tokio::time::timeout(Duration::from_secs(30), async {
        while crate::edge::harness::inbox_files(&inbox).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("delivered locally");
    shutdown.cancel();
    task.await.unwrap();
    let ids = node.store.queued_before(Utc::now(), 10).unwrap();
    assert!(ids.is_empty(), "nothing left queued");
    let delivered: Vec<_> = audit_lines(&s.paths.audit)
        .into_iter()
        .filter(|r| r["op"] == "receipt")
        .collect();
    assert_eq!(delivered.len(), 1, "the receipt is on the record");
    let id: EnvelopeId = delivered[0]["envelope_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let rec = node.store.get(&id).unwrap().unwrap();
    assert_eq!(rec.state, OutState::Delivered);
    assert!(rec.sealed.is_none(), "payload erased after the receipt");
    // The delivery record keeps the receiver's signed receipt, the proof of delivery.
    let receipt = rec.receipt.as_deref().expect("receipt kept");
    let digest: [u8; 32] = rec.digest.as_slice().try_into().unwrap();
    let keys = node.directory().get(&me).unwrap().signing_keys.clone();
    let body = crate::crypto::verify_receipt(receipt, &keys, &id, &digest, &me)
        .expect("the kept receipt verifies");
    assert_eq!(body.status, crate::core::envelope::ReceiptStatus::Delivered);
    node.audit.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_file_written_in_place_is_taken_only_after_the_settle_window() {
    let dir = tempfile::tempdir().unwrap();
    let (wm, _) = federation(dir.path(), 17_740);
    std::fs::create_dir_all(&wm.paths.outbox).unwrap();
    std::fs::write(wm.paths.outbox.join("slow.json"), b"{}").unwrap();
    let settle = Duration::from_secs(600);
    let mut watcher = watch(&wm, settle);
    let start = tokio::time::Instant::now();
    // Ten virtual minutes pass at once; the file must not come out before them.
    let early = tokio::time::timeout(settle - Duration::from_secs(1), watcher.next()).await;
    assert!(early.is_err(), "taken before its settle window");
    let Pickup::Ready(file) = watcher.next().await else {
        panic!("taken once settled");
    };
    assert_eq!(file.name, "slow.json");
    assert!(start.elapsed() >= settle);
}

#[tokio::test(start_paused = true)]
async fn a_down_peer_is_retried_on_the_backoff_schedule_not_in_a_tight_loop() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on london's port: every attempt ends at the handshake timeout.
    let (mut wm, _) = federation(dir.path(), 17_760);
    wm.listen = "127.0.0.1:0".parse().unwrap();
    wm.delivery.retry_initial = Duration::from_millis(500);
    wm.delivery.retry_max = Duration::from_secs(60);
    wm.limits.transport.handshake_timeout = Duration::from_secs(5);
    let node = Node::open(wm).unwrap();
    let london: AreaId = LONDON.parse().unwrap();
    let bytes = sealed(&node, &london, &sample_for(LONDON));
    let id = crypto::SealedEnvelope::from_stored(bytes.clone())
        .unwrap()
        .id();
    let new = crate::adapters::store::NewEnvelope {
        id,
        to: london.clone(),
        priority: PriorityClass::Standard,
        due_by: Utc::now() + chrono::Duration::days(2),
        created: Utc::now(),
        digest: crate::core::digest::sha256(&bytes),
        sealed: bytes,
        subject_key: None,
    };
    node.store.enqueue(new, &[7; 32]).unwrap();
    node.store.release(&[id]).unwrap();
    node.store.durable().await.unwrap();

    let s = node.settings.clone();
    let transport =
        Transport::bind(s.listen, &load_tls(&s).unwrap(), s.limits.transport.clone()).unwrap();
    let worker = PeerWorker {
        ctx: Arc::new(SenderContext {
            node: node.clone(),
            transport,
            local: Arc::new(Receiver::new(node.clone())),
        }),
        peer: london.clone(),
        wake: node.wake[&london].clone(),
        stored: None,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone(), Duration::from_secs(1)));
    // Ten virtual minutes. The schedule (0.5 s doubling to 60 s, half-to-full jitter, plus the
    // 5 s handshake each time) allows between 9 and 26 attempts in that time; a retry loop
    // without backoff would make ~120.
    tokio::time::sleep(Duration::from_secs(600)).await;
    shutdown.cancel();
    task.await.unwrap();
    let rec = node.store.get(&id).unwrap().unwrap();
    assert_eq!(rec.state, OutState::Queued, "still queued, never dropped");
    assert!(
        (9..=26).contains(&rec.attempts),
        "{} attempts in ten minutes",
        rec.attempts
    );
    node.audit.close().await.unwrap();
}

#[tokio::test]
async fn refused_files_are_kept_0640_and_purged_after_their_retention_with_a_record() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut wm, _) = federation(dir.path(), 17_770);
    wm.intake.rejected_retention = chrono::Duration::zero();
    let node = Node::open(wm).unwrap();
    let s = node.settings.clone();
    let path = s.paths.outbox.join("bad.json");
    std::fs::write(&path, b"{ not json").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    take_waiting_file(&node).await;
    let moved = s.paths.outbox.join("rejected/bad.json");
    let mode = std::fs::metadata(&moved).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "refused file readable by others: {mode:o}");

    crate::node::housekeeping::purge_expired(&node).await;
    assert!(!moved.exists(), "purged after a 0-day retention");
    assert!(!s.paths.outbox.join("rejected/bad.json.error.json").exists());
    let purges: Vec<_> = audit_lines(&s.paths.audit)
        .into_iter()
        .filter(|r| {
            r["op"] == "erasure"
                && r["reason"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("retention_rejected"))
        })
        .collect();
    assert_eq!(purges.len(), 1, "the purge is on the record");
    node.audit.close().await.unwrap();
}

/// Runs intake (as the daemon does) until `left(outbox)`, the files not yet taken, is 0 (at
/// most 60 s), then stops it.
async fn run_intake_until_taken(
    node: &Arc<Node>,
    watcher: OutboxWatcher,
    left: impl Fn(&Path) -> usize,
) {
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(
        Intake {
            node: node.clone(),
            watcher,
        }
        .run(shutdown.clone()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = left(&node.settings.paths.outbox);
        if n == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} files not taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    run.await.unwrap();
}

/// Drops `n` distinct referral files at once into a fresh West Midlands outbox and runs intake
/// (as the daemon does) with `parallel` files (holding at most `bytes` and `referrals`) at once
/// until all are taken; returns the store syncs, audit fsyncs and outbox directory syncs that
/// took, after checking every referral was queued exactly once.
async fn take_many_at_once(
    n: usize,
    parallel: usize,
    budgets: (u64, u64),
    port: u16,
) -> (u64, u64, u64) {
    take_many_carrying(n, n, parallel, budgets, port).await
}

/// [`take_many_at_once`] with the `n` files carrying `distinct` referrals between them (file `i`
/// the referral `i % distinct`): each is queued once, every other copy is a logged duplicate.
async fn take_many_carrying(
    n: usize,
    distinct: usize,
    parallel: usize,
    (bytes, referrals): (u64, u64),
    port: u16,
) -> (u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut wm, _) = federation(dir.path(), port);
    wm.intake.parallel_files = parallel;
    wm.intake.parallel_bytes = bytes;
    wm.intake.parallel_referrals = referrals;
    let node = Node::open(wm).unwrap();
    let s = node.settings.clone();
    let watcher = watch(&s, Duration::from_millis(10));
    for i in 0..n {
        let mut v: serde_json::Value = serde_json::from_slice(&sample_json(LONDON)).unwrap();
        v["source_ref"] = format!("MANY-{}", i % distinct).into();
        std::fs::write(
            s.paths.outbox.join(format!("m{i}.json")),
            serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    }
    let (store0, audit0) = (node.store.sync_count(), node.audit.sync_count());
    let outbox0 = node.outbox_sync.syncs();
    run_intake_until_taken(&node, watcher, |outbox| {
        std::fs::read_dir(outbox)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count()
    })
    .await;
    let london: AreaId = LONDON.parse().unwrap();
    let syncs = (
        node.store.sync_count() - store0,
        node.audit.sync_count() - audit0,
        node.outbox_sync.syncs() - outbox0,
    );
    let queued = node
        .store
        .next_queued(&london, 10 * n, &Default::default())
        .unwrap();
    assert_eq!(
        queued.len(),
        distinct,
        "each referral made exactly one envelope"
    );
    let lines = audit_lines(&s.paths.audit);
    let collections: Vec<String> = lines
        .iter()
        .filter(|r| r["op"] == "collection" && r["reason"] != "duplicate")
        .map(|r| r["envelope_id"].to_string())
        .collect();
    let ids: std::collections::HashSet<&String> = collections.iter().collect();
    assert_eq!(
        collections.len(),
        distinct,
        "one collection record per referral"
    );
    assert_eq!(ids.len(), distinct, "no envelope recorded twice");
    let duplicates = lines
        .iter()
        .filter(|r| r["op"] == "collection" && r["reason"] == "duplicate")
        .count();
    assert_eq!(
        duplicates,
        n - distinct,
        "every other copy is a logged duplicate"
    );
    node.audit.close().await.unwrap();
    syncs
}

/// Budgets that hold every file of these tests: 8 MiB (the default) and 256 referrals.
const ROOMY: (u64, u64) = (8 << 20, 256);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_files_dropped_at_once_are_each_queued_once_sharing_store_syncs() {
    let n = 50;
    // One at a time: each file syncs the store at least twice (stored, then released).
    let (one_store, one_audit, one_outbox) = take_many_at_once(n, 1, ROOMY, 17_860).await;
    let (par_store, par_audit, par_outbox) = take_many_at_once(n, 16, ROOMY, 17_870).await;
    eprintln!(
        "{n} files: one at a time {one_store} store syncs / {one_audit} audit fsyncs / \
         {one_outbox} outbox syncs; 16 at once {par_store} / {par_audit} / {par_outbox}"
    );
    assert!(one_store >= 2 * n as u64, "{one_store}");
    // At once: fewer syncs than the two per file one at a time needs. How many are shared
    // depends on how long a sync takes against a seal: under 50 where this was written, 63-80
    // on a disk whose 4 KiB O_DSYNC write takes 0.2 ms (so `< n` held on one machine only).
    assert!(
        par_store < one_store,
        "16 files at once share store syncs: {par_store} for {n} files, {one_store} one at a time"
    );
    // Each deletion is made durable by an outbox directory sync: one per file one at a time,
    // shared by the files removed together at once.
    assert_eq!(one_outbox, n as u64);
    assert!(
        par_outbox < one_outbox,
        "16 files at once share outbox syncs: {par_outbox} for {n} files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_dropped_at_once_carrying_the_same_referral_queue_it_once() {
    // Taken together, files sealed at the same time share one round of syncs; two carrying the
    // same referral must not share one (the second would be stored beside the first, held):
    // the later waits for the next round and finds the referral queued.
    let n = 24;
    let (store, _, outbox) = take_many_carrying(n, 3, 16, ROOMY, 17_920).await;
    eprintln!("{n} files, 3 referrals: {store} store syncs, {outbox} outbox syncs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_hand_stay_within_the_byte_budget() {
    // Every file (~2 KB) exceeds a 1-byte budget, so each is taken alone although 16 files
    // may be in flight: each deletion then has its own directory sync, as one at a time.
    let n = 20;
    let (store, _, outbox) = take_many_at_once(n, 16, (1, 256), 17_880).await;
    assert_eq!(outbox, n as u64, "one file in hand at a time");
    assert!(store >= 2 * n as u64, "{store}");
    // A budget that holds them all lets them share again.
    let (_, _, shared) = take_many_at_once(n, 16, ROOMY, 17_890).await;
    assert!(shared < n as u64, "{shared}");
}

/// One CSV batch of `rows` referrals to London taken by intake with `intake.parallel_referrals`
/// = `slice`; returns the store transactions and audit fsyncs that took, after checking every
/// row was queued once with its collection and combination records and the file removed.
async fn take_one_batch(rows: usize, slice: u64, port: u16) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut wm, _) = federation(dir.path(), port);
    wm.intake.parallel_referrals = slice;
    let node = Node::open(wm).unwrap();
    let s = node.settings.clone();
    let watcher = watch(&s, Duration::from_millis(10));
    let at = chrono::Utc::now() - chrono::Duration::days(1);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut csv = String::from(
        "source_system,source_ref,referred_at,residence_area,victim_name,victim_phone,\
         offence_category,consent_referral\n",
    );
    for i in 0..rows {
        csv.push_str(&format!(
            "test-batch,SLICE-{i},{at},london,Test Person,07700 900999,theft,yes\n"
        ));
    }
    std::fs::write(s.paths.outbox.join("batch.csv"), csv).unwrap();
    let (tx0, audit0) = (node.store.transaction_count(), node.audit.sync_count());
    run_intake_until_taken(&node, watcher, |outbox| {
        usize::from(outbox.join("batch.csv").exists())
    })
    .await;
    let counts = (
        node.store.transaction_count() - tx0,
        node.audit.sync_count() - audit0,
    );
    let london: AreaId = LONDON.parse().unwrap();
    let queued = node
        .store
        .next_queued(&london, 10 * rows, &Default::default())
        .unwrap();
    let refused = std::fs::read_to_string(s.paths.outbox.join("rejected/batch.csv.error.json"))
        .unwrap_or_default();
    assert_eq!(
        queued.len(),
        rows,
        "each row made exactly one envelope; {refused}"
    );
    let lines = audit_lines(&s.paths.audit);
    for op in ["collection", "combination"] {
        let ids: std::collections::HashSet<String> = lines
            .iter()
            .filter(|r| r["op"] == op)
            .map(|r| r["envelope_id"].to_string())
            .collect();
        assert_eq!(ids.len(), rows, "one {op} record per row");
    }
    assert!(
        !lines.iter().any(|r| r["op"] == "refusal"),
        "no row refused"
    );
    node.audit.close().await.unwrap();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_referral_budget_is_carried_out_in_slices() {
    // 25 rows with a budget of 10: three slices, each stored, recorded and released on its
    // own (a round holds one slice, not the whole file); within the budget, one round.
    let rows = 25;
    let (sliced_tx, sliced_audit) = take_one_batch(rows, 10, 17_930).await;
    let (whole_tx, whole_audit) = take_one_batch(rows, 256, 17_940).await;
    eprintln!(
        "{rows} rows: slices of 10 {sliced_tx} store transactions / {sliced_audit} audit fsyncs; \
         whole {whole_tx} / {whole_audit}"
    );
    assert!(sliced_audit >= 3, "one audit job per slice: {sliced_audit}");
    assert!(
        sliced_audit > whole_audit && sliced_tx > whole_tx,
        "slices of 10: {sliced_tx} transactions, {sliced_audit} audit fsyncs; \
         whole: {whole_tx}, {whole_audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_hand_stay_within_the_referral_budget() {
    // Each JSON file is one referral: with a budget of one, each file is taken alone although
    // 16 may be in flight and the byte budget holds them all, so each deletion has its own
    // directory sync, as one at a time.
    let n = 20;
    let (store, _, outbox) = take_many_at_once(n, 16, (8 << 20, 1), 17_900).await;
    assert_eq!(outbox, n as u64, "one file in hand at a time");
    assert!(store >= 2 * n as u64, "{store}");
    // A budget that holds all 16 lets files share syncs again (with four in hand, sharing
    // depends on two deletions meeting: CI once saw 20 syncs for 20 files).
    let (_, _, shared) = take_many_at_once(n, 16, (8 << 20, 16), 17_910).await;
    assert!(shared < n as u64, "{shared}");
}
