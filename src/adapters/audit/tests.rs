//! Audit log tests: chain and checkpoint verification against tampering, rotation, torn tails,
//! group commit, search and the return.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{TimeZone, Utc};

use super::*;
use crate::core::types::EnvelopeId;

fn config(dir: &Path) -> AuditConfig {
    AuditConfig::new(
        dir.to_owned(),
        "london".parse().unwrap(),
        Justification {
            lawful_basis: "test basis".into(),
            purpose: "test purpose".into(),
        },
        Duration::from_secs(60),
        30,
    )
}

fn event(i: u64, subject: &SubjectKey) -> Event {
    let _ = i;
    Event::new(Operation::Collection, Actor::System, Outcome::Ok)
        .envelope(EnvelopeId::generate())
        .route(
            &"west-midlands".parse().unwrap(),
            &"london".parse().unwrap(),
        )
        .digest([7; 32])
        .subject(subject.clone())
}

/// A log of `n` records with a checkpoint after every 5, and its verifying key.
async fn sample_log(dir: &Path, n: u64) -> (Vec<VerifyingKey>, SubjectKey, SubjectKey) {
    let (signer, _) = SigningKey::generate().unwrap();
    sample_log_signed(dir, n, Arc::new(signer)).await
}

async fn sample_log_signed(
    dir: &Path,
    n: u64,
    signer: Arc<SigningKey>,
) -> (Vec<VerifyingKey>, SubjectKey, SubjectKey) {
    let keys = vec![signer.public_key()];
    let (secret, _) = SubjectSecret::generate().unwrap();
    let (a, b) = (secret.key("sys", "A-1"), secret.key("sys", "B-2"));
    let log = AuditLog::open(config(dir), signer).unwrap();
    for i in 0..n {
        log.record(event(i, if i % 2 == 0 { &a } else { &b }))
            .await
            .unwrap();
        if i % 5 == 4 {
            log.checkpoint().await.unwrap();
        }
    }
    log.close().await.unwrap();
    (keys, a, b)
}

fn only_file(dir: &Path) -> PathBuf {
    log::log_files(dir).unwrap().pop().unwrap()
}

fn edit_lines(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    f(&mut lines);
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn a_clean_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!(
        report.records,
        12 + 2 + 1,
        "12 events, 2 interval checkpoints, 1 at close"
    );
    assert_eq!(report.checkpoints, 3);
}

#[tokio::test]
async fn an_altered_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    edit_lines(&only_file(dir.path()), |l| {
        l[2] = l[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"refused\"")
    });
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert_eq!((failure.line, failure.seq), (3, Some(3)), "{failure}");
    assert!(failure.problem.contains("altered"), "{failure}");
}

#[tokio::test]
async fn a_deleted_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    edit_lines(&only_file(dir.path()), |l| {
        l.remove(3);
    });
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(
        failure.problem.contains("missing (removed)") && failure.problem.contains("4..=4"),
        "{failure}"
    );
}

#[tokio::test]
async fn reordered_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    edit_lines(&only_file(dir.path()), |l| l.swap(6, 7));
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(
        failure.problem.contains("missing") || failure.problem.contains("out of order"),
        "{failure}"
    );
    assert_eq!(failure.line, 7, "{failure}");
}

#[tokio::test]
async fn truncation_after_a_checkpoint_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    // Chop the tail including the final checkpoint: the chain itself still links.
    edit_lines(&only_file(dir.path()), |l| l.truncate(10));
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(failure.problem.contains("truncated"), "{failure}");
}

#[tokio::test]
async fn a_forged_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 12).await;
    let (other, _) = SigningKey::generate().unwrap();
    assert!(verify(dir.path(), &[other.public_key()])
        .unwrap_err()
        .problem
        .contains("checkpoint signature"));
    // And a checkpoint whose head was edited fails even with the right key.
    edit_lines(&only_file(dir.path()), |l| {
        let i = l
            .iter()
            .position(|x| x.contains("\"op\":\"checkpoint\""))
            .unwrap();
        let rec: Record = serde_json::from_str(&l[i]).unwrap();
        l[i] = l[i].replace(
            &format!("\"head\":\"{}\"", rec.head.unwrap()),
            &format!("\"head\":\"{}\"", "1".repeat(64)),
        );
    });
    assert!(verify(dir.path(), &keys).is_err());
}

fn day_one() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 20, 23, 59, 59).unwrap()
}
fn day_two() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 1).unwrap()
}

#[tokio::test]
async fn rotation_to_a_new_day_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let signer = Arc::new(signer);
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    for clock in [day_one as fn() -> _, day_two] {
        let mut cfg = config(dir.path());
        cfg.clock = clock;
        let log = AuditLog::open(cfg, signer.clone()).unwrap();
        log.record(event(0, &k)).await.unwrap();
        log.close().await.unwrap();
    }
    let files = log::log_files(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    assert!(
        name_of(&files[0]).starts_with("audit-2026-11-20")
            && name_of(&files[1]).starts_with("audit-2026-11-21")
    );
    assert_eq!(verify(dir.path(), &keys).unwrap().records, 4);
    // Removing the first day's file breaks the chain.
    fs::remove_file(&files[0]).unwrap();
    assert!(verify(dir.path(), &keys).is_err());
}

#[tokio::test]
async fn a_torn_last_line_is_reported_and_acknowledged_never_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 3, signer.clone()).await;
    let file = only_file(dir.path());
    let mut bytes = fs::read(&file).unwrap();
    bytes.extend_from_slice(b"{\"v\":1,\"seq\":99,\"ti");
    fs::write(&file, &bytes).unwrap();
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(
        failure.problem.contains("torn"),
        "an unacknowledged torn line fails: {failure}"
    );

    let log = AuditLog::open(config(dir.path()), signer).unwrap();
    log.record(Event::new(
        Operation::Consultation,
        Actor::User("tester".into()),
        Outcome::Ok,
    ))
    .await
    .unwrap();
    log.close().await.unwrap();
    assert_eq!(
        fs::read(&file).unwrap(),
        bytes,
        "the torn bytes are left as they were"
    );
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!(report.torn_acknowledged, 1);
    let text: String = log::log_files(dir.path())
        .unwrap()
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        text.contains("\"op\":\"torn_tail\""),
        "the next run records the torn tail"
    );
}

#[tokio::test]
async fn group_commit_shares_syncs_across_concurrent_records() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let log = AuditLog::open(config(dir.path()), Arc::new(signer)).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (log, k) = (log.clone(), k.clone());
            tokio::spawn(async move { log.record(event(i, &k)).await.unwrap().seq })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
    assert!(
        log.sync_count() < 500,
        "{} syncs for 500 records",
        log.sync_count()
    );
    log.close().await.unwrap();
    assert_eq!(verify(dir.path(), &keys).unwrap().records, 501);
}

#[tokio::test]
async fn search_finds_every_record_of_one_subject_and_none_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let (_, a, b) = sample_log(dir.path(), 10).await;
    let found = search(dir.path(), &a).unwrap();
    assert_eq!(found.len(), 5);
    assert!(found.iter().all(|l| l.contains(&a.0) && !l.contains(&b.0)));
}

#[tokio::test]
async fn the_return_counts_a_known_workload() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let log = AuditLog::open(config(dir.path()), Arc::new(signer)).unwrap();
    let entry = |day: u32, to: &str, p: PriorityClass, c: &str, i: Option<&str>| TallyEntry {
        day: NaiveDate::from_ymd_opt(2026, 11, day).unwrap(),
        from: "west-midlands".parse().unwrap(),
        to: to.parse().unwrap(),
        priority: p,
        category: c.into(),
        incident: i.map(str::to_owned),
    };
    // Week of 16 Nov: 3 burglaries to london (one enhanced); week of 23 Nov: 2 terrorism, incident MI-1.
    for e in [
        entry(16, "london", PriorityClass::Standard, "burglary", None),
        entry(18, "london", PriorityClass::Standard, "burglary", None),
        entry(20, "london", PriorityClass::Enhanced, "burglary", None),
        entry(
            23,
            "merseyside",
            PriorityClass::Enhanced,
            "terrorism",
            Some("MI-1"),
        ),
        entry(
            24,
            "merseyside",
            PriorityClass::Enhanced,
            "terrorism",
            Some("MI-1"),
        ),
        entry(30, "london", PriorityClass::Standard, "theft", None),
    ] {
        log.tally(e).await.unwrap();
    }
    let from = NaiveDate::from_ymd_opt(2026, 11, 16).unwrap();
    let to = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
    let r = report(dir.path(), from, to, true).unwrap();
    assert_eq!(r.total(), 5, "the 30th is outside the range");
    let csv = r.to_csv();
    assert!(
        csv.contains("week of 2026-11-16,west-midlands,london,standard,burglary,-,2"),
        "{csv}"
    );
    assert!(
        csv.contains("week of 2026-11-16,west-midlands,london,enhanced,burglary,-,1"),
        "{csv}"
    );
    assert!(
        csv.contains("week of 2026-11-23,west-midlands,merseyside,enhanced,terrorism,MI-1,2"),
        "{csv}"
    );
    assert!(r.to_table().contains("total: 5"));
    let svg = r.to_svg();
    assert!(
        svg.starts_with("<svg") && svg.contains(">3</text>") && svg.contains(">2</text>"),
        "{svg}"
    );
}

#[tokio::test]
async fn a_retention_purge_removes_old_files_and_the_log_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let signer = Arc::new(signer);
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    for (i, clock) in [day_one as fn() -> _, day_two].into_iter().enumerate() {
        let mut cfg = config(dir.path());
        cfg.clock = clock;
        cfg.retention_days = 0;
        let log = AuditLog::open(cfg, signer.clone()).unwrap();
        log.record(event(0, &k)).await.unwrap();
        if i == 1 {
            log.purge_expired(day_two()).await.unwrap();
        }
        log.close().await.unwrap();
    }
    let files = log::log_files(dir.path()).unwrap();
    assert_eq!(files.len(), 1, "the first day's file is gone");
    let text = fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains("retention_audit_files"),
        "the purge is recorded as an erasure"
    );
    verify(dir.path(), &keys).unwrap();
}

#[test]
fn records_carry_only_the_documented_fields() {
    let ev = Event::new(
        Operation::Collection,
        Actor::Peer("london".parse().unwrap()),
        Outcome::Ok,
    )
    .envelope(EnvelopeId::generate())
    .route(
        &"west-midlands".parse().unwrap(),
        &"london".parse().unwrap(),
    )
    .digest([1; 32])
    .subject_hex(&"a".repeat(64))
    .source([2; 32], Some(3))
    .priority(PriorityClass::Enhanced)
    .peer_head("5:abc")
    .reason("rule");
    let rec = Record::from_event(&ev, 1, Utc::now(), crate::core::audit::GENESIS, "b", "p");
    let v: serde_json::Value = serde_json::from_str(&rec.line()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let allowed = [
        "v",
        "seq",
        "time",
        "op",
        "envelope_id",
        "from",
        "to",
        "actor",
        "lawful_basis",
        "purpose",
        "outcome",
        "reason",
        "payload_digest",
        "subject_key",
        "source_system",
        "source_file_sha256",
        "source_row",
        "priority",
        "peer_audit_head",
        "prev",
    ];
    assert!(keys.iter().all(|k| allowed.contains(k)), "{keys:?}");
    assert!(subject_hex_rejects_non_hex());
}

fn subject_hex_rejects_non_hex() -> bool {
    Event::new(Operation::Collection, Actor::System, Outcome::Ok)
        .subject_hex("Alex Example")
        .subject_key
        .is_none()
}

#[tokio::test]
async fn a_torn_checkpoints_file_is_sealed_and_only_true_fragments_pass() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 6, signer.clone()).await;
    let cp = dir.path().join("checkpoints.jsonl");
    let text = fs::read_to_string(&cp).unwrap();
    let last = text.lines().last().unwrap().to_owned();
    // A crash half-way through appending the last checkpoint again.
    fs::write(&cp, format!("{text}{}", &last[..last.len() / 2])).unwrap();
    let log = AuditLog::open(config(dir.path()), signer).unwrap();
    log.close().await.unwrap();
    verify(dir.path(), &keys).unwrap();
    // A line that is not the start of a real checkpoint still fails.
    let mut text = fs::read_to_string(&cp).unwrap();
    text.push_str("{\"forged\n");
    fs::write(&cp, text).unwrap();
    assert!(verify(dir.path(), &keys)
        .unwrap_err()
        .problem
        .contains("does not parse"));
}
