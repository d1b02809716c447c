//! Audit log tests: chain and checkpoint verification against tampering, rotation, torn tails,
//! group commit, search and the return.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{TimeZone, Utc};

use super::verify::name_of;
use super::*;
use crate::core::types::EnvelopeId;
use crate::crypto::VerifyingKey;

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
        failure.problem.contains("reordered") && !failure.problem.contains("missing"),
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

    one_more_run(dir.path(), &signer).await;
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

macro_rules! clock_at {
    ($name:ident, $d:expr) => {
        fn $name() -> chrono::DateTime<Utc> {
            Utc.with_ymd_and_hms(2026, 11, $d, 12, 0, 0).unwrap()
        }
    };
}
clock_at!(nov16, 16);
clock_at!(nov18, 18);
clock_at!(nov23, 23);
clock_at!(nov24, 24);
clock_at!(nov30, 30);

fn tally(referred: u32, to: &str, p: PriorityClass, c: &str, i: Option<&str>) -> TallyEntry {
    TallyEntry {
        day: NaiveDate::from_ymd_opt(2026, 11, referred).unwrap(),
        referred: NaiveDate::from_ymd_opt(2026, 11, referred),
        late: Some(referred == 20),
        from: "west-midlands".parse().unwrap(),
        to: to.parse().unwrap(),
        priority: p,
        category: c.into(),
        incident: i.map(str::to_owned),
    }
}

/// A known workload across two weeks, each referral taken in on a chosen day (the writer's
/// clock), plus one refusal and one referral received from a peer.
async fn workload(dir: &Path) -> Vec<VerifyingKey> {
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let signer = Arc::new(signer);
    let std = PriorityClass::Standard;
    let enh = PriorityClass::Enhanced;
    // (intake clock, entries): the referral of the 20th is taken in on the 23rd (late).
    type Clock = fn() -> chrono::DateTime<Utc>;
    let days: [(Clock, Vec<TallyEntry>); 5] = [
        (nov16, vec![tally(16, "london", std, "burglary", None)]),
        (nov18, vec![tally(18, "london", std, "burglary", None)]),
        (
            nov23,
            vec![
                tally(20, "london", enh, "burglary", None),
                tally(23, "merseyside", enh, "terrorism", Some("MI-1")),
            ],
        ),
        (
            nov24,
            vec![tally(24, "merseyside", enh, "terrorism", Some("MI-1"))],
        ),
        (nov30, vec![tally(30, "london", std, "theft", None)]),
    ];
    for (clock, entries) in days {
        let mut cfg = config(dir);
        cfg.clock = clock;
        let log = AuditLog::open(cfg, signer.clone()).unwrap();
        log.record_all_counting(Vec::new(), entries).await.unwrap();
        if std::ptr::fn_addr_eq(clock, nov18 as fn() -> _) {
            log.record(
                Event::new(Operation::Refusal, Actor::System, Outcome::Refused)
                    .reason("explicit_consent_required"),
            )
            .await
            .unwrap();
            log.record(
                Event::new(
                    Operation::Collection,
                    Actor::Peer("merseyside".parse().unwrap()),
                    Outcome::Ok,
                )
                .route(&"merseyside".parse().unwrap(), &"london".parse().unwrap())
                .priority(std),
            )
            .await
            .unwrap();
        }
        log.close().await.unwrap();
    }
    keys
}

#[tokio::test]
async fn the_return_counts_a_known_workload_from_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let keys = workload(dir.path()).await;
    verify(dir.path(), &keys).unwrap();
    let from = NaiveDate::from_ymd_opt(2026, 11, 16).unwrap();
    let to = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
    let r = report(dir.path(), from, to, true).unwrap();
    assert_eq!(r.total(), 5, "the 30th is outside the range");
    let csv = r.to_csv();
    for want in [
        "sent,week of 2026-11-16,west-midlands,london,standard,burglary,-,2",
        // Referred on the 20th, taken in on the 23rd: the next week by intake date...
        "sent,week of 2026-11-23,west-midlands,london,enhanced,burglary,-,1",
        "sent,week of 2026-11-23,west-midlands,merseyside,enhanced,terrorism,MI-1,2",
        // ...but the week of the 16th by referral date.
        "sent_by_referral_date,week of 2026-11-16,-,-,-,-,-,3",
        "sent_by_referral_date,week of 2026-11-23,-,-,-,-,-,2",
        "received,week of 2026-11-16,merseyside,london,standard,-,-,1",
        "refused,-,-,-,-,explicit_consent_required,-,1",
    ] {
        assert!(csv.contains(want), "missing {want:?} in\n{csv}");
    }
    assert_eq!((r.on_time, r.late, r.late_unknown), (4, 1, 0));
    let table = r.to_table();
    assert!(
        table.contains("total sent: 5") && table.contains("1 late"),
        "{table}"
    );
}

/// Editing a figure is caught by `verify`; and `tally.json` (older versions) is not read.
#[tokio::test]
async fn figures_cannot_be_skewed_outside_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let keys = workload(dir.path()).await;
    let from = NaiveDate::from_ymd_opt(2026, 11, 16).unwrap();
    let to = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
    let before = report(dir.path(), from, to, true).unwrap().to_csv();
    fs::write(
        dir.path().join("tally.json"),
        r#"{"2026-11-17|a|b|standard|x|-":1000}"#,
    )
    .unwrap();
    assert_eq!(report(dir.path(), from, to, true).unwrap().to_csv(), before);
    // Duplicating a tally line (to inflate a count) breaks the chain.
    let file = log::log_files(dir.path()).unwrap()[2].clone();
    edit_lines(&file, |l| {
        let i = l
            .iter()
            .position(|x| x.contains("\"op\":\"tally\""))
            .unwrap();
        let dup = l[i].clone();
        l.insert(i, dup);
    });
    assert!(verify(dir.path(), &keys).is_err());
}

#[tokio::test]
async fn tally_records_carry_counts_only() {
    let dir = tempfile::tempdir().unwrap();
    workload(dir.path()).await;
    let mut n = 0;
    for_each_record(dir.path(), |rec, line| {
        if rec.op == Operation::Tally {
            n += 1;
            assert!(
                rec.subject_key.is_none() && rec.envelope_id.is_none() && rec.actor.is_none(),
                "{line}"
            );
        }
    })
    .unwrap();
    assert_eq!(n, 6);
}

#[tokio::test]
async fn the_svg_chart_renders_with_title_axes_and_legend() {
    let dir = tempfile::tempdir().unwrap();
    workload(dir.path()).await;
    let from = NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
    let to = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
    let svg = report(dir.path(), from, to, true).unwrap().to_svg();
    for want in [
        "<title>",
        "week beginning",
        "referrals",
        "sent (by intake date)",
        "received",
    ] {
        assert!(svg.contains(want), "{want}: {svg}");
    }
    let out = std::env::temp_dir().join("refex-audit-report-test");
    fs::create_dir_all(&out).unwrap();
    let (svg_path, png) = (out.join("report.svg"), out.join("report.png"));
    fs::write(&svg_path, &svg).unwrap();
    match std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(&svg_path)
        .status()
    {
        Ok(st) => {
            assert!(st.success(), "rsvg-convert could not render the chart");
            assert!(fs::metadata(&png).unwrap().len() > 1000);
        }
        Err(e) => eprintln!("rsvg-convert not installed ({e}): PNG rendering not checked"),
    }
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

async fn count_records(log: &AuditLog, k: &SubjectKey, n: u64) {
    for i in 0..n {
        log.record(event(i, k)).await.unwrap();
    }
}

#[tokio::test]
async fn a_failed_append_consumes_no_sequence_number_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let cfg = config(dir.path());
    let fail = cfg.fail_appends.clone();
    let log = AuditLog::open(cfg, Arc::new(signer)).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    count_records(&log, &k, 3).await;
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..4 {
        let e = log.record(event(i, &k)).await.unwrap_err();
        assert!(matches!(e, AuditError::Io { .. }), "{e}");
    }
    assert_eq!(
        log.head().seq,
        3,
        "failed appends consume no sequence number"
    );
    fail.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(log.record(event(9, &k)).await.unwrap().seq, 4);
    log.close().await.unwrap();
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!(report.records, 5);
}

#[tokio::test]
async fn records_written_together_are_all_durable_or_none_is_and_count_towards_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let mut cfg = config(dir.path());
    cfg.checkpoint_every_records = 4;
    let fail = cfg.fail_appends.clone();
    let log = AuditLog::open(cfg, Arc::new(signer)).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    let head = log
        .record_all(vec![event(0, &k), event(1, &k), event(2, &k)])
        .await
        .unwrap();
    assert_eq!(head.seq, 3, "the head after the last of the three");
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    log.record_all(vec![event(3, &k), event(4, &k)])
        .await
        .unwrap_err();
    assert_eq!(
        log.head().seq,
        3,
        "a failed group leaves none of its records"
    );
    fail.store(false, std::sync::atomic::Ordering::Relaxed);
    // Records 4 and 5, then the checkpoint due after 4 records counted across the groups.
    let head = log
        .record_all(vec![event(5, &k), event(6, &k)])
        .await
        .unwrap();
    assert_eq!(head.seq, 5);
    log.close().await.unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(only_file(dir.path()))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let checkpoint_at = lines
        .iter()
        .position(|l| l.to_string().contains("checkpoint"))
        .unwrap();
    assert_eq!(
        checkpoint_at, 5,
        "a checkpoint follows the 4th record's group: {lines:?}"
    );
    let report = verify(dir.path(), &keys).unwrap();
    assert!(report.records >= 6, "{}", report.records);
}

/// A small tmpfs, unmounted on drop (tests run as root).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mounting a tmpfs failed: the disk-full tests need root");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_audit_volume_leaves_a_chain_that_verifies() {
    let fs_ = Tmpfs::new("200k");
    let dir = fs_.0.path().join("audit");
    fs::write(fs_.0.path().join("filler"), vec![0u8; 120 * 1024]).unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let log = AuditLog::open(config(&dir), Arc::new(signer)).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    // Concurrent records until the volume is full, several full episodes in a row.
    let mut full = 0;
    let mut ok = 0u64;
    while full < 20 {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (log, k) = (log.clone(), k.clone());
                tokio::spawn(async move { log.record(event(i, &k)).await })
            })
            .collect();
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(e.is_disk_full(), "{e}");
                    full += 1;
                }
            }
        }
    }
    assert_eq!(
        log.head().seq,
        ok,
        "only acknowledged records hold sequence numbers"
    );
    verify(&dir, &keys).unwrap();
    // Space returns: appends go on, numbered after the last acknowledged record.
    fs::remove_file(fs_.0.path().join("filler")).unwrap();
    count_records(&log, &k, 5).await;
    assert_eq!(log.head().seq, ok + 5);
    log.close().await.unwrap();
    assert_eq!(verify(&dir, &keys).unwrap().records, ok + 6);
}

#[tokio::test]
async fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let log = AuditLog::open(config(dir.path()), signer.clone()).unwrap();
    let second = AuditLog::open(config(dir.path()), signer.clone());
    match second {
        Err(AuditError::Locked(p)) => assert_eq!(p, dir.path()),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second writer opened the same audit directory"),
    }
    let msg = AuditError::Locked(dir.path().to_owned()).to_string();
    assert!(msg.contains("in use by another process"), "{msg}");
    log.close().await.unwrap();
    // Released on close.
    let again = AuditLog::open(config(dir.path()), signer).unwrap();
    again.close().await.unwrap();
}

#[tokio::test]
async fn checkpoints_follow_every_n_records_and_verify_counts_the_unsigned_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let keys = vec![signer.public_key()];
    let mut cfg = config(dir.path());
    cfg.checkpoint_every_records = 4;
    let log = AuditLog::open(cfg, Arc::new(signer)).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    count_records(&log, &k, 10).await;
    // Not closed (no final checkpoint): 10 records, checkpoints after the 4th and 8th.
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!((report.records, report.checkpoints), (12, 2), "{report}");
    assert_eq!(report.after_last_checkpoint, 2, "{report}");
    assert!(report
        .to_string()
        .contains("2 record(s) after the last checkpoint"));
    // Deleting that tail still links, but shows as a smaller unsigned tail.
    drop(log);
    edit_lines(&only_file(dir.path()), |l| l.truncate(l.len() - 1));
    assert_eq!(verify(dir.path(), &keys).unwrap().after_last_checkpoint, 1);
}

#[tokio::test]
async fn a_checkpoint_signature_covers_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, ..) = sample_log(dir.path(), 6).await;
    edit_lines(&only_file(dir.path()), |l| {
        let i = l
            .iter()
            .position(|x| x.contains("\"op\":\"checkpoint\""))
            .unwrap();
        let rec: Record = serde_json::from_str(&l[i]).unwrap();
        l[i] = l[i].replace(&rec.time, "2020-01-01T00:00:00.000Z");
    });
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(
        failure.problem.contains("checkpoint signature"),
        "{failure}"
    );
}

#[tokio::test]
async fn a_torn_tail_note_binds_the_fragment_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 3, signer.clone()).await;
    let file = only_file(dir.path());
    let mut bytes = fs::read(&file).unwrap();
    bytes.extend_from_slice(b"{\"v\":2,\"seq\":99,\"ti");
    fs::write(&file, &bytes).unwrap();
    let log = AuditLog::open(config(dir.path()), signer).unwrap();
    log.close().await.unwrap();
    verify(dir.path(), &keys).unwrap();
    // Same offset, same length, other bytes: refused.
    let n = bytes.len();
    bytes[n - 3] = b'X';
    fs::write(&file, &bytes).unwrap();
    let failure = verify(dir.path(), &keys).unwrap_err();
    assert!(failure.problem.contains("torn fragment"), "{failure}");
    // Longer (a record appended behind the note): refused.
    bytes[n - 3] = b'"';
    bytes.extend_from_slice(b"me\":\"x\"}\n");
    fs::write(&file, &bytes).unwrap();
    assert!(verify(dir.path(), &keys).is_err());
}

/// One consultation recorded by a fresh run of the writer, then closed.
async fn one_more_run(dir: &Path, signer: &Arc<SigningKey>) -> Head {
    let log = AuditLog::open(config(dir), signer.clone()).unwrap();
    let head = log
        .record(Event::new(
            Operation::Consultation,
            Actor::User("tester".into()),
            Outcome::Ok,
        ))
        .await
        .unwrap();
    log.close().await.unwrap();
    head
}

/// A crash during an append can leave a block that never reached the disk (zeros) in front of
/// one that did: a line that ends in a newline but is no record, then whole records. That used
/// to stop the writer ("last record does not parse") or, when the last line happened to parse,
/// to continue the chain from a record behind the damage, which `verify` then refused forever.
#[tokio::test]
async fn a_hole_in_an_unsynced_tail_is_noted_with_all_that_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 3, signer.clone()).await;
    let file = only_file(dir.path());
    let intact = fs::read(&file).unwrap();
    let last_seq = verify(dir.path(), &keys).unwrap().records;
    let first_line = intact.split(|b| *b == b'\n').next().unwrap().to_vec();
    for (case, damage) in [
        // A hole, the end of a line, then a whole record that parses.
        [&[0u8; 40][..], b"\"}\n", &first_line, b"\n"].concat(),
        // A last line that is complete but no record.
        [&[0u8; 7][..], b"}\n"].concat(),
    ]
    .iter()
    .enumerate()
    {
        let case_dir = tempfile::tempdir().unwrap();
        let case_file = case_dir.path().join(name_of(&file));
        let bytes = [&intact[..], damage].concat();
        fs::write(&case_file, &bytes).unwrap();
        let failure = verify(case_dir.path(), &keys).unwrap_err();
        assert!(
            failure.problem.contains("does not parse"),
            "case {case}: {failure}"
        );
        let head = one_more_run(case_dir.path(), &signer).await;
        assert_eq!(
            head.seq,
            last_seq + 2,
            "case {case}: the chain goes on from the last intact record, after the note"
        );
        assert_eq!(fs::read(&case_file).unwrap(), bytes, "case {case}: kept");
        let report = verify(case_dir.path(), &keys).unwrap();
        assert_eq!(report.torn_acknowledged, 1, "case {case}");
    }
}

/// Recovery asks the log "is it recorded?" (intake's unreleased envelopes, the sender's stored
/// receipts, withdrawals, the return): a record behind a hole in a torn tail was never
/// acknowledged and is not in the chain, so it must not count — before the tail is noted and
/// after.
#[tokio::test]
async fn records_behind_a_torn_tail_are_not_read_as_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 3, signer.clone()).await;
    let file = only_file(dir.path());
    let mut bytes = fs::read(&file).unwrap();
    let first_line =
        String::from_utf8(bytes.split(|b| *b == b'\n').next().unwrap().to_vec()).unwrap();
    let first: Record = serde_json::from_str(&first_line).unwrap();
    let behind = EnvelopeId::generate();
    let unacknowledged =
        first_line.replace(first.envelope_id.as_deref().unwrap(), &behind.to_string());
    bytes.extend_from_slice(&[0; 30]);
    bytes.extend_from_slice(format!("\"}}\n{unacknowledged}\n").as_bytes());
    fs::write(&file, &bytes).unwrap();
    let since = std::time::SystemTime::UNIX_EPOCH;
    let count = |dir: &Path| {
        let mut n = 0;
        for_each_record(dir, |_, _| n += 1).unwrap();
        n
    };
    let intact = count(dir.path());
    assert_eq!(intact, 4, "three records and the closing checkpoint");
    assert!(!mentions_envelope(dir.path(), &behind, since).unwrap());
    assert!(mentions_envelope(
        dir.path(),
        &first.envelope_id.unwrap().parse().unwrap(),
        since
    )
    .unwrap());
    one_more_run(dir.path(), &signer).await;
    assert_eq!(verify(dir.path(), &keys).unwrap().torn_acknowledged, 1);
    assert_eq!(
        count(dir.path()),
        intact + 3,
        "the note, the consultation and the closing checkpoint"
    );
    assert!(!mentions_envelope(dir.path(), &behind, since).unwrap());
}

/// The newest file damaged from its first byte: its first line was the note of the torn tail
/// before it, so that tail is noted again with it, and the chain goes on from the file before.
#[tokio::test]
async fn a_newest_file_damaged_from_its_start_is_noted_with_the_tail_it_noted() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let (keys, ..) = sample_log_signed(dir.path(), 3, signer.clone()).await;
    let first = only_file(dir.path());
    let last_seq = verify(dir.path(), &keys).unwrap().records;
    let mut torn = fs::read(&first).unwrap();
    torn.extend_from_slice(b"{\"v\":2,\"seq\":99,\"ti");
    fs::write(&first, &torn).unwrap();
    let copies = dir.path().join("checkpoints.jsonl");
    let copies_before = fs::read(&copies).unwrap();
    one_more_run(dir.path(), &signer).await;
    // The second run's append never fully reached the disk: its first block is zeros, and the
    // copy of its closing checkpoint was never written.
    let second = only_file(dir.path());
    assert_ne!(second, first);
    let mut bytes = fs::read(&second).unwrap();
    assert!(String::from_utf8_lossy(&bytes).starts_with("{\"v\":2,\"seq\":"));
    bytes[..64].fill(0);
    fs::write(&second, &bytes).unwrap();
    fs::write(&copies, &copies_before).unwrap();

    let head = one_more_run(dir.path(), &signer).await;
    assert_eq!(head.seq, last_seq + 3, "two notes, then the consultation");
    assert_eq!(fs::read(&first).unwrap(), torn);
    assert_eq!(fs::read(&second).unwrap(), bytes);
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!(report.torn_acknowledged, 2);
    assert_eq!(report.files, 3);
}

/// A file with the name the writer would take next (here it appeared after the writer
/// started) is never appended to: the writer takes the name after it.
#[tokio::test]
async fn the_writer_never_appends_to_a_file_it_did_not_start() {
    static NEXT_DAY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn clock() -> chrono::DateTime<Utc> {
        if NEXT_DAY.load(std::sync::atomic::Ordering::SeqCst) {
            day_two()
        } else {
            day_one()
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SigningKey::generate().unwrap().0);
    let keys = vec![signer.public_key()];
    let mut cfg = config(dir.path());
    cfg.clock = clock;
    let log = AuditLog::open(cfg, signer).unwrap();
    let (secret, _) = SubjectSecret::generate().unwrap();
    let k = secret.key("s", "r");
    log.record(event(0, &k)).await.unwrap();
    let planted = dir.path().join("audit-2026-11-21-00.jsonl");
    fs::write(&planted, b"").unwrap();
    NEXT_DAY.store(true, std::sync::atomic::Ordering::SeqCst);
    log.record(event(1, &k)).await.unwrap();
    log.close().await.unwrap();
    assert_eq!(fs::read(&planted).unwrap(), b"", "left alone");
    let names: Vec<String> = log::log_files(dir.path())
        .unwrap()
        .iter()
        .map(|p| name_of(p).to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "audit-2026-11-20-00.jsonl",
            "audit-2026-11-21-00.jsonl",
            "audit-2026-11-21-01.jsonl"
        ]
    );
    assert_eq!(verify(dir.path(), &keys).unwrap().records, 3);
}

#[tokio::test]
async fn search_any_finds_records_under_several_keys_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (_, a, b) = sample_log(dir.path(), 10).await;
    let (other, _) = SubjectSecret::generate().unwrap();
    let c = other.key("sys", "C-3");
    let found = search_any(dir.path(), &[c, b.clone(), a.clone()]).unwrap();
    assert_eq!(found.len(), 10);
    assert!(found
        .iter()
        .all(|(i, l)| *i != 0 && l.contains(if *i == 1 { &b.0 } else { &a.0 })));
}

/// The 101st file of a day is `…-100`: by name it sorted before `…-11`, so a restart took its
/// head from `…-99` and reused sequence numbers (found by the 100-cut power-cut soak, where
/// every cut leaves a torn tail and so a new file). Files are ordered by suffix as a number.
#[tokio::test]
async fn a_day_with_more_than_a_hundred_files_keeps_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let signer = Arc::new(signer);
    let keys = vec![signer.public_key()];
    let (secret, _) = SubjectSecret::generate().unwrap();
    let a = secret.key("sys", "A-1");
    let session = |n: u64| {
        let (dir, signer, a) = (dir.path().to_owned(), signer.clone(), a.clone());
        async move {
            let log = AuditLog::open(config(&dir), signer).unwrap();
            for i in 0..n {
                log.record(event(i, &a)).await.unwrap();
            }
            let head = log.head();
            log.close().await.unwrap();
            head
        }
    };
    session(2).await;
    // As if 99 files had come before: the day's only file becomes its 100th.
    let first = only_file(dir.path());
    let day_99 = first.with_file_name(name_of(&first).replace("-00.jsonl", "-99.jsonl"));
    fs::rename(&first, &day_99).unwrap();
    session(2).await; // opens `…-100`
    let names: Vec<String> = log::log_files(dir.path())
        .unwrap()
        .iter()
        .map(|p| name_of(p).to_owned())
        .collect();
    assert!(
        names[0].ends_with("-99.jsonl") && names[1].ends_with("-100.jsonl"),
        "{names:?}"
    );
    let before = verify(dir.path(), &keys).unwrap().records;
    let head = session(1).await; // must continue from `…-100`, in `…-101`
    assert_eq!(
        head.seq,
        before + 1,
        "the chain goes on from the newest file"
    );
    let report = verify(dir.path(), &keys).unwrap();
    assert_eq!(
        report.records,
        before + 2,
        "one event and its closing checkpoint"
    );
    assert_eq!(report.files, 3);
}
